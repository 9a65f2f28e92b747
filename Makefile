# Concord's two entry points: `make demo` trains the demo config on 2 local ranks; `make test` runs the
# test suite. Both create .venv on first use and install the pinned CPU stack once (stamp file).
# `make install-gpu` builds a separate .venv-gpu with the CUDA stack (docs/gpu.md); the CPU path is
# left as it is.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.concord-installed
PIP := $(BIN)/python -m pip --disable-pip-version-check -q
ARGS ?=  # config overrides for demo and bench, e.g. ARGS="train.resume=false"
TEST_WORKERS ?= 2  # pytest-xdist workers for make test; 0 runs the suite in one process

GPU_VENV := .venv-gpu
GPU_STAMP := $(GPU_VENV)/.concord-installed
GPU_PIP := $(GPU_VENV)/bin/python -m pip --disable-pip-version-check -q

.PHONY: install install-gpu demo test bench clean

install: $(STAMP)

# torchrec's metadata asks for the CUDA `fbgemm-gpu`, which cannot load without libtorch_cuda: install
# torchrec with --no-deps and its other requirements (requirements/cpu.txt) beside fbgemm-gpu-cpu.
# torch goes first and pinned, so that nothing later resolves a CUDA build.
$(STAMP): pyproject.toml requirements/cpu.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -r requirements/cpu.txt
	$(PIP) install --no-deps torchrec==1.8.0
	$(PIP) install --no-deps -e .
	$(BIN)/python -c "import torch, torchrec, fbgemm_gpu, torchx, pyarrow; print('concord: torch', torch.__version__, 'torchrec', torchrec.__version__)"
	$(BIN)/python -c "from concord.balancing.native import native_ops; print('concord: native boundary node', 'built' if native_ops() else 'not built (the Python node is used)')"
	touch $@

install-gpu: $(GPU_STAMP)

# PyPI's Linux torch wheel is the CUDA build; fbgemm-gpu is FBGEMM's CUDA build for that torch. Local
# wheel folders (find-links) are ignored here, since they may hold a CPU torch of the same version.
$(GPU_STAMP): pyproject.toml requirements/cuda.txt
	test -x $(GPU_VENV)/bin/python || $(PYTHON) -m venv $(GPU_VENV)
	PIP_FIND_LINKS= $(GPU_PIP) install torch==2.13.0
	$(GPU_PIP) install -r requirements/cuda.txt
	$(GPU_PIP) install --no-deps torchrec==1.8.0
	$(GPU_PIP) install --no-deps -e .
	$(GPU_VENV)/bin/python -c "import torch, torchrec, fbgemm_gpu; assert torch.version.cuda, 'a CPU torch was installed'; print('concord (CUDA): torch', torch.__version__, 'CUDA', torch.version.cuda, 'GPUs', torch.cuda.device_count())"
	touch $@

# The demo's synthetic data is written once, explicitly: training never generates data for a missing path.
demo: $(STAMP)
	$(BIN)/concord synth --config configs/demo.yaml --if-missing
	$(BIN)/concord train --config configs/demo.yaml $(ARGS)

# One pytest process leaves a core idle much of the time (its tests wait on the ranks they start), so
# two workers share a 2-core machine. Each takes whole files, so a module's fixture trains once.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

bench: $(STAMP)
	$(BIN)/concord synth --config configs/demo.yaml --if-missing
	$(BIN)/concord bench --config configs/demo.yaml $(ARGS)

clean:
	rm -rf $(VENV) $(GPU_VENV) runs data
