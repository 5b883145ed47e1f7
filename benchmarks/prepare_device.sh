#!/usr/bin/env bash
# Prepares here, on a CPU machine, what one call of the device tool needs, so that its few
# minutes go to the GPU and not to downloads or builds. From the repository root:
#
#   wheels  .whl/: the peers' wheels (liger-kernel 0.8.5, cut-cross-entropy 25.1.1, no
#           dependencies; torch and triton are the device's), for gpu_check.sh's wheels step
#   so      kdfast/_C.cpython-312-x86_64-linux-gnu.so: kdfast with its CUDA kernels, built against
#           the device's torch (DEVICE_TORCH, default 2.11.0, CUDA 13.0) for its Python (3.12),
#           for sm_90a, with AVX2 CPU kernels (the device's CPU is not this one), debug info
#           stripped; for gpu_check.sh with PREBUILT=1 (which builds there if it does not load)
#   tests   the CPU test suite under the device's torch and the CUDA build: torch versions
#           drift (2.11 warned where CI's 2.13 does not), and here that costs no device time
#
# The torch build, its CUDA libraries and the build tree go in WORK (default
# /tmp/kdfast-device, about 5 GB); the repository's own .venv and build are not touched. Needs
# PyPI, nvcc 13 (NVCC_HOME, default /usr/local/cuda) and a Python 3.12 (PYTHON312; default the
# first python3.12 on PATH or under ~/.pyenv). cuBLAS's headers come with torch's CUDA wheels.
#
# Environment: STEPS="wheels so tests" (any of them, in this order), WORK, DEVICE_TORCH,
# PYTHON312, NVCC_HOME, TORCH_CUDA_ARCH_LIST (default 9.0a).
# Then, with the device tool: carry [".whl", "kdfast/_C.cpython-312-x86_64-linux-gnu.so"] and
#   PREBUILT=1 STEPS="wheels info build register tests sanitizer profile bench" ... bash benchmarks/gpu_check.sh
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
STEPS="${STEPS:-wheels so tests}"
WORK="${WORK:-/tmp/kdfast-device}"
DEVICE_TORCH="${DEVICE_TORCH:-2.11.0}"
NVCC_HOME="${NVCC_HOME:-/usr/local/cuda}"
SO_NAME="_C.cpython-312-x86_64-linux-gnu.so"
want() { [[ " $STEPS " == *" $1 "* ]]; }
log() { echo "[prepare_device] $*"; }

find_python312() {
  if [[ -n "${PYTHON312:-}" ]]; then echo "$PYTHON312"; return; fi
  local p
  # (a pyenv shim on PATH may name a python3.12 that it will not run)
  for p in "$(command -v python3.12 2>/dev/null)" "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do
    [[ -x "$p" ]] && "$p" --version >/dev/null 2>&1 && { echo "$p"; return; }
  done
  echo "prepare_device: no Python 3.12 found: set PYTHON312" >&2
  exit 1
}

if want wheels; then
  log "wheels -> .whl/"
  mkdir -p .whl
  python3 -m pip download -q --no-deps -d .whl liger-kernel==0.8.5 cut-cross-entropy==25.1.1
  ls -l .whl
fi

VENV="$WORK/venv"
SRC="$WORK/src"
if want so || want tests; then
  py312=$(find_python312)
  if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$DEVICE_TORCH')" 2>/dev/null; then
    log "venv $VENV: torch $DEVICE_TORCH with its CUDA libraries, for $("$py312" --version)"
    rm -rf "$VENV"
    "$py312" -m venv "$VENV"
    "$VENV/bin/pip" install -q "torch==$DEVICE_TORCH" numpy scipy setuptools wheel ninja \
      pytest pytest-benchmark hypothesis expecttest scikit-learn matplotlib tqdm
  fi
  "$VENV/bin/python" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
  # the working tree as it is (tracked and untracked files that git does not ignore)
  rm -rf "$SRC" && mkdir -p "$SRC"
  git ls-files -co --exclude-standard | while IFS= read -r f; do [[ -e "$f" ]] && echo "$f"; done \
    | tar -cf - -T - | tar -xf - -C "$SRC"
fi

if want so; then
  log "build in $SRC (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}, AVX2 CPU kernels)"
  cuda_wheels=$("$VENV/bin/python" -c "import nvidia, os; print(os.path.join(nvidia.__path__[0], 'cu13'))")
  (cd "$SRC" && CUDA_HOME="$NVCC_HOME" PATH="$NVCC_HOME/bin:$PATH" CPATH="$cuda_wheels/include" \
     LIBRARY_PATH="$cuda_wheels/lib" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}" \
     KDFAST_CPU_ARCH=avx2 KDFAST_FORCE_CUDA=1 "$VENV/bin/pip" install -q --no-build-isolation --no-deps -e .)
  strip --strip-debug -o "kdfast/$SO_NAME" "$SRC/kdfast/$SO_NAME"
  (cd "$SRC" && "$VENV/bin/python" -c '
import kdfast
missing = kdfast.ops.missing_cuda_kernels()
assert not missing, f"no CUDA kernel registered for {missing}"
print("CUDA kernels registered for", ", ".join(kdfast.ops.CUDA_OPS))')
  log "kdfast/$SO_NAME ($(du -h "kdfast/$SO_NAME" | cut -f1))"
fi

if want tests; then
  log "CPU tests under torch $DEVICE_TORCH (about 4 minutes on 2 cores)"
  [[ -f "$SRC/kdfast/$SO_NAME" ]] || cp "kdfast/$SO_NAME" "$SRC/kdfast/"  # tests without so: the one made before
  (cd "$SRC" && PYTHONPATH="$SRC" "$VENV/bin/python" -m pytest tests -q -p no:cacheprovider)
fi
