"""vLLM connector tests (run in .venv-vllm)."""
