"""One vLLM engine run, in its own process: generate greedily, print JSON results.

Used by the end-to-end tests: ``python vllm_run_llm.py '<json args>'``.
vLLM's engine core is a spawned process, hence the ``__main__`` guard."""

from __future__ import annotations

import json
import os
import sys
import time


def main(args: dict) -> dict:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # The same OpenMP team with and without a connector: vLLM reserves one more core when a
    # kv_transfer_config is set, which on 2 cores leaves it none to reserve and runs the model
    # on 2 threads instead of 1; GEMMs then round differently and greedy tokens of these
    # random prompts can differ (seen on a 2-vCPU EPYC) with no KV ever loaded.
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    kw = {}
    if args.get("connector"):
        kw["kv_transfer_config"] = KVTransferConfig(
            kv_connector="StreamKVConnector", kv_connector_module_path="streamkv.adapters.vllm",
            kv_role="kv_both", kv_connector_extra_config=args["extra"],
            kv_load_failure_policy=args.get("failure_policy", "recompute"))
    t0 = time.perf_counter()
    llm = LLM(model=args["model"], dtype="bfloat16", enforce_eager=True,
              enable_prefix_caching=bool(args.get("prefix_caching", False)),
              max_model_len=args.get("max_model_len", 4096), max_num_batched_tokens=args.get("batch", 4096),
              seed=0, disable_log_stats=False, **kw)
    startup = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=args.get("max_tokens", 8))
    results = []
    for prompt in args["prompts"]:  # one at a time: TTFT per prompt, and later prompts can hit
        t = time.perf_counter()
        out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
        wall = time.perf_counter() - t
        m = out.metrics
        ttft = None
        if m is not None and getattr(m, "first_token_ts", 0) and getattr(m, "scheduled_ts", 0):
            ttft = m.first_token_ts - m.scheduled_ts
        results.append({"tokens": list(out.outputs[0].token_ids), "wall_s": wall, "ttft_s": ttft,
                        "num_cached_tokens": out.num_cached_tokens})
    llm.llm_engine.engine_core.shutdown()  # stops the engine core and its workers
    return {"startup_s": startup, "results": results}


if __name__ == "__main__":
    out = main(json.loads(sys.argv[1]))
    sys.stdout.write("RESULT " + json.dumps(out) + "\n")
    sys.stdout.flush()
