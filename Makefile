# Two commands: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# Where there is no CUDA, take the CPU build of torch (a bare `torch` pulls GBs of CUDA packages) from PyTorch's
# CPU index when it answers within 5 s; otherwise the registry's torch==$(TORCH_VERSION) (a local CPU wheel on
# machines that provide one).
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: demo test test-slow test-cpus lint install clean-demo

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then \
		$(PY) -m pip install -q torch==$(TORCH_VERSION); \
	elif $(PY) -c "import urllib.request as u; u.urlopen('$(TORCH_CPU_INDEX)/', timeout=5)" >/dev/null 2>&1; then \
		$(PY) -m pip install -q torch==$(TORCH_VERSION) --extra-index-url $(TORCH_CPU_INDEX); \
	else \
		$(PY) -m pip install -q torch==$(TORCH_VERSION); \
	fi
	$(PY) -m pip install -q -e .
	touch $@

# the test extras (pytest, ruff, lm-eval, datasets) only for the commands that need them
$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/mlpmem run demo
	@echo "the mlpmem command: $(VENV)/bin/mlpmem, or run 'source $(VENV)/bin/activate' first"

lint: $(VENV)/.installed-test
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks

test: lint
	$(PY) -m pytest -q

test-slow: $(VENV)/.installed-test
	$(PY) -m pytest -q -m slow

# The numeric tests under each CPU kind this machine can take: native (AMX / AVX-512 bf16 where present), held
# below AMX (AVX-512 with bf16), and held to AVX2 (no bf16: "auto" dtypes resolve to float32 there).
CPU_CAPS := native \
	"ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16" \
	"ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2"
test-cpus: $(VENV)/.installed-test
	@set -e; for cap in $(CPU_CAPS); do \
		echo "== numeric tests, CPU cap: $$cap"; \
		if [ "$$cap" = native ]; then $(PY) -m pytest -q -m "numeric and not slow"; \
		else env $$cap $(PY) -m pytest -q -m "numeric and not slow"; fi; \
	done

clean-demo:
	rm -rf runs/demo
