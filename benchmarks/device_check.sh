#!/usr/bin/env bash
# Everything issue 4 asks of a GPU, in one call on a lent device machine (~5 min, untried on a
# GPU so far: no device was lent to this project's sessions yet). Prepare here, then:
#   make device-wheels                      # lz4, structlog, OpenTelemetry for the image's Python 3.12
#   run(command="bash benchmarks/device_check.sh", carry=[".device-wheels"], timeout_s=540)
# It writes logs and JSON under $OUT (the device tool brings them back) and prints a short
# summary last. Each step runs even when an earlier one failed; the exit status is the worst.
set -uo pipefail
OUT=${OUT:-device-out}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
summary=()

step() {  # step NAME LOGFILE COMMAND...: run, keep the log, remember the outcome
    local name=$1 log=$2
    shift 2
    echo "== $name"
    local start=$SECONDS
    "$@" >"$OUT/$log" 2>&1
    local rc=$?
    tail -n 15 "$OUT/$log"
    summary+=("$(printf '%-44s rc=%-3s %4ss  %s' "$name" "$rc" "$((SECONDS - start))" "$log")")
    [ "$rc" -ne 0 ] && status=1
    return "$rc"
}

need_packages() {
    "$PY" -c "import lz4.block, structlog, opentelemetry.sdk" 2>/dev/null && return 0
    "$PY" -m pip install --quiet --no-index --find-links .device-wheels lz4 structlog opentelemetry-sdk
}

step "packages (from .device-wheels)" packages.txt need_packages || { printf '%s\n' "${summary[@]}"; exit 1; }
step "device" device.txt bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
    && $PY -c 'import torch, cupy; assert torch.cuda.is_available(); print(torch.__version__, cupy.__version__)'" \
    || { printf '%s\n' "${summary[@]}"; exit 1; }
step "kernels compile (nvcc: sm_80, sm_90)" kernel-build.txt \
    "$PY" -m pytest tests/test_kernel_build.py -q -p no:cacheprovider -rs
step "GPU tests (kernels = torch fallback, streaming)" gpu-tests.txt \
    "$PY" -m pytest tests/gpu tests/test_paged_copy.py -q -p no:cacheprovider -rs --junitxml "$OUT/gpu-tests.xml"
for tier in memory disk; do
    step "pipeline benchmark, $tier tier (Llama-3-8B layers)" "pipeline-$tier.txt" \
        timeout 200 "$PY" -m streamkv.cli bench pipeline --device cuda --tier "$tier" --repeat 5 \
        --json "$OUT/pipeline-$tier.json"
done

echo "== summary"
printf '%s\n' "${summary[@]}" | tee "$OUT/summary.txt"
for tier in memory disk; do
    [ -f "$OUT/pipeline-$tier.txt" ] && grep -E "overlap efficiency|H2D|gather|scatter|d2d" "$OUT/pipeline-$tier.txt" | sed "s/^/$tier: /"
done
exit "$status"
