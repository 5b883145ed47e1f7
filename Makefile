# make run   — the main job: experiments/amazon670k.py (seed 003 Table 1)
# make test  — the test suite, plus an nvcc compile-check of csrc/cuda/*.cu where nvcc exists,
#              then the CUDA ops' tests again through the CUDA code emulated on the CPU
# make bench — the benchmarks
# Each target first does whatever set-up is missing: a virtual environment in .venv
# (seeing the system's packages, so a torch already installed there is used), torch 2.13.0
# unless a torch is importable, and the editable build of kdfast against that torch.

VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
STAMP   := $(VENV)/.kdfast-build-stamp
SOURCES := $(shell find csrc -type f 2>/dev/null) setup.py pyproject.toml
NVCC    ?= $(shell command -v nvcc 2>/dev/null)
CUDA_CHECK_DIR := build/cuda-check
CUDA_ARCH_FLAGS := -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90a,code=sm_90a

.PHONY: run test test-cuda-emu bench install cuda-check clean

$(PY):
	python3 -m venv --system-site-packages $(VENV)

$(STAMP): $(PY) $(SOURCES)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PY) -c "import setuptools, wheel, ninja" 2>/dev/null || $(PIP) install setuptools wheel ninja
	$(PIP) install --no-build-isolation -e ".[dev,experiments]"
	$(PY) -c "import torch, kdfast; print('kdfast', kdfast.__version__, 'built against torch', torch.__version__)"
	touch $@

install: $(STAMP)

run: $(STAMP)
	$(PY) experiments/amazon670k.py

# tests/, then the benchmarks' own tests (arguments, arithmetic, tiny CPU runs; the timed cases
# run once, untimed: --benchmark-disable) in a process of their own: their `common` module
# would meet experiments/common.py, which tests/ imports
test: $(STAMP) cuda-check
	$(PY) -m pytest tests -q
	$(PY) -m pytest benchmarks -q --benchmark-disable
	$(MAKE) --no-print-directory test-cuda-emu

# The tests of kdfast's CUDA ops again, with the CPU kernels of those ops replaced by the CUDA
# glue and kernels built as CPU code and run by an emulator (tests/cuda_emu/README.md): the
# code a CUDA build runs, tested without a GPU.
# The labeling pipeline's tests come too (its teacher_topk through the CUDA glue), but for the three
# that compare this process's labels with those of a child process, which runs the CPU kernels.
CUDA_EMU_TESTS := tests/test_fused_linear.py tests/test_distillation_loss.py tests/test_teacher_topk.py \
	tests/test_cuda_emulated.py tests/test_cuda_index_checks.py tests/test_labeling_pipeline.py
CUDA_EMU_DESELECT := $(addprefix --deselect tests/test_labeling_pipeline.py::,test_kill_and_resume_is_byte_identical \
	test_torchrun_two_ranks_equal_one_rank test_cli_end_to_end)
test-cuda-emu: $(STAMP)
	KDFAST_CUDA_EMU=1 $(PY) -m pytest $(CUDA_EMU_TESTS) $(CUDA_EMU_DESELECT) -q

# every benchmark script in turn (about 30 minutes on 2 cores: the fused benchmark alone takes
# ~20 with its torch.compile baseline); each writes its rows and its
# section of BENCHMARKS.md
bench: $(STAMP)
	$(PY) benchmarks/bench_losses.py
	$(PY) benchmarks/bench_fused_linear.py
	$(PY) benchmarks/bench_labeling.py
	$(PY) benchmarks/bench_reader.py
	$(PY) benchmarks/bench_cpu_bf16.py
	$(PY) benchmarks/bench_cpu_gemm_kinds.py

# Compile-check every CUDA kernel file with plain nvcc (no GPU, no torch headers needed),
# then syntax-check the torch glue (csrc/cuda_ops.cpp) against this torch's headers and the
# CUDA runtime's (nvcc drives the host compiler, so it finds its own headers). A CPU torch
# ships c10/cuda's headers without the one cmake generates (cuda_cmake_macros.h): an empty
# stand-in is made for the check.
cuda-check: $(STAMP)
	@files=$$(ls csrc/cuda/*.cu 2>/dev/null); \
	if [ -z "$(NVCC)" ]; then echo "cuda-check: nvcc not found, skipped"; \
	elif [ -z "$$files" ]; then echo "cuda-check: no csrc/cuda/*.cu files yet"; \
	else mkdir -p $(CUDA_CHECK_DIR)/shim/c10/cuda/impl && for f in $$files; do \
		echo "nvcc -c $$f (sm_80, sm_90a)"; \
		$(NVCC) -std=c++17 -O2 $(CUDA_ARCH_FLAGS) -c $$f -o $(CUDA_CHECK_DIR)/$$(basename $$f .cu).o || exit 1; \
	done; \
	echo "#pragma once" > $(CUDA_CHECK_DIR)/shim/c10/cuda/impl/cuda_cmake_macros.h; \
	torch_inc=$$($(PY) -c "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))"); \
	py_inc=$$($(PY) -c "import sysconfig; print('-I' + sysconfig.get_paths()['include'])"); \
	echo "nvcc (host compiler) -fsyntax-only csrc/cuda_ops.cpp"; \
	$(NVCC) -std=c++17 -Xcompiler -fsyntax-only -Xcompiler -w -DKDFAST_WITH_CUDA -Icsrc $$torch_inc $$py_inc \
		-I$(CUDA_CHECK_DIR)/shim -c csrc/cuda_ops.cpp -o /dev/null || exit 1; \
	fi

clean:
	rm -rf build $(CUDA_CHECK_DIR) kdfast/_C*.so *.egg-info
