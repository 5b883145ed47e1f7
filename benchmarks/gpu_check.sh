#!/usr/bin/env bash
# Every GPU check of kdfast, in order, on a fresh GPU machine, from the repository root:
#
#   wheels     install the peer libraries carried as wheels in .whl/ (Liger-Kernel, Cut Cross-Entropy)
#              into /tmp/site, no index, no dependencies (torch and triton are the machine's)
#   info       nvidia-smi, torch / CUDA / nvcc / compute-sanitizer versions
#   build      TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 pip install --no-build-isolation --no-deps -e .
#              (PREBUILT=1: skip it and use a kdfast/_C*.so carried from an earlier call)
#   register   assert that kdfast's CUDA kernels are registered
#   tests      pytest on the CUDA tests only (-k "cuda or another_device"; every failure shown, not just the first)
#   sanitizer  compute-sanitizer memcheck and racecheck on benchmarks/cuda_smoke.py
#   profile    benchmarks/profile_fused.py --device cuda: one forward and one backward of each case under
#              torch.profiler, the device time split into tile GEMMs, kdfast's kernels and the glue between
#              (what a fused GEMM + loss kernel has to remove)
#   xmc        experiments/amazon670k.py --scale full --estimate: issue 5's run on this GPU projected from
#              timed real steps of each model (its goal: the four models in <= 15 min, <= 40 GB), once
#              per --matmul-precision (exact float32, and TF32), into gpu_check.log
#   bench      benchmarks/bench_fused_linear.py --device cuda (raw results as JSON)
#   alltests   python3 -m pytest tests -q -x -p no:cacheprovider (the whole suite; last, as the CPU half of
#              it also runs in CI, and it is the step most likely to be cut by the deadline)
#
# Each step logs to a file under "${OUT:-benchmarks/results/gpu-run}" (few files: the device tool
# brings back at most 8), runs under `timeout`, and a failure does not stop the next step. A
# summary is printed at the end. The whole script keeps inside DEADLINE seconds (default 570: the
# device tool stops a command at 600), and each step gets what is left when it starts.
#
# Environment:
#   STEPS="wheels info build register tests sanitizer profile xmc bench alltests"   the steps to run (always in this order)
#   DEADLINE=570          seconds for the whole script
#   PREBUILT=1            skip the build when a carried kdfast/_C*.so loads (benchmarks/prepare_device.sh
#                         makes one here); build as usual when it does not
#   SAVE_SO=1             copy the built kdfast/_C*.so (debug info stripped) to the output folder, to carry
#                         it into a later call as kdfast/_C....so with PREBUILT=1 (SAVE_SO=0: don't)
#   TESTS_TIMEOUT=240     TESTS_ARGS="-k 'cuda or another_device' --maxfail=25"   the tests step (pytest tests -q -p no:cacheprovider ...)
#   ALLTESTS_TIMEOUT=400  ALLTESTS_ARGS="-x"                  the alltests step
#   SANITIZER_TOOLS="memcheck racecheck"          SANITIZER_TIMEOUT=150 (each tool)
#   PROFILE_TIMEOUT=90    PROFILE_ARGS="--cases ce,ce_kd_linear,dd_linear,topk"   the profile step
#   XMC_TIMEOUT=120       XMC_ARGS=""   the xmc step, each precision (extra arguments of amazon670k.py,
#                         e.g. "--estimate-steps 3")   XMC_PRECISIONS="highest high"
#   BENCH_ARGS=""         extra arguments of bench_fused_linear.py (e.g. "--cases ce,pal --impls kdfast,cce")
#   KDFAST_COMMIT=        the commit the results are recorded under (the device's copy may have no .git)
#   BENCH_TIMEOUT=        seconds for the bench step (default: all that is left, so put alltests in
#                         another call or give the bench less)
#   KDFAST_CUDA_FUSED=0   (read by kdfast itself) the tiled cuBLAS path instead of the fused kernels for
#                         bf16/fp16, e.g. to bench both: a first call as usual, a second with this and
#                         BENCH_ARGS="--impls kdfast --no-write"
#                         (BENCH_ARGS="--dtype tf32": float32 inputs with TF32 allowed, which the fused
#                         kernels take too; plain --dtype float32 stays exact, on the tiled path)
#
# Usage (device tool). Since 2026-12 a session has 15 minutes of device time in all, machine start
# included, so plan for ONE call (a second is possible only if the first ends early). First, here:
#   bash benchmarks/prepare_device.sh     # .whl/, the device's .so, and the CPU tests under its torch
# then with carry [".whl", "kdfast/_C.cpython-312-x86_64-linux-gnu.so"] and timeout_s 600,
#   PREBUILT=1 STEPS="wheels info build register tests sanitizer profile bench" SANITIZER_TOOLS=memcheck TESTS_TIMEOUT=180 \
#     BENCH_ARGS="--impls kdfast,eager,cce,liger --cases ce,ce_kd_linear,dd_linear,topk" bash benchmarks/gpu_check.sh
# (without the .so, or where it does not load, the build step builds there: a few minutes less for the rest)
# (the bench step gets what is left before DEADLINE and stops starting workers 20 s before it).
# Issue 5's projection does not fit in that call (the bench would get no time): it is a call of its own,
# about 3 minutes of device time with the machine's start, the same carry, timeout_s 300:
#   PREBUILT=1 STEPS="info build register xmc" DEADLINE=280 bash benchmarks/gpu_check.sh
# With more device time, a first call as above without the limits, then, with the stripped .so it
# returned copied to kdfast/ and carried too (carry [".whl",
# "kdfast/_C.cpython-312-x86_64-linux-gnu.so"]; without it PREBUILT=1 just builds again):
#   PREBUILT=1 STEPS="wheels build register bench alltests" BENCH_ARGS="--impls liger,compile" \
#     BENCH_TIMEOUT=400 bash benchmarks/gpu_check.sh
# and here: python benchmarks/bench_fused_linear.py --device cuda --merge-json run1.json run2.json
set -u -o pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 1
OUT_DIR="${OUT:-$REPO/benchmarks/results/gpu-run}"
mkdir -p "$OUT_DIR"
STEPS="${STEPS:-wheels info build register tests sanitizer profile xmc bench alltests}"
DEADLINE="${DEADLINE:-570}"
PY="${PYTHON:-python3}"
START=$(date +%s)
LOG="$OUT_DIR/gpu_check.log"
SUMMARY=()
export PYTHONUNBUFFERED=1
# the repository first, so that `import kdfast` finds the build (or a carried .so) without an install
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

elapsed() { echo $(( $(date +%s) - START )); }
remaining() { echo $(( DEADLINE - $(elapsed) )); }
log() { echo "[gpu_check +$(elapsed)s] $*" | tee -a "$LOG"; }
want() { [[ " $STEPS " == *" $1 "* ]]; }
record() { SUMMARY+=("$(printf '%-10s %s' "$1" "$2")"); log "step $1: $2"; }

# seconds a step may take: its own limit, or what is left before the deadline minus a reserve for the summary
budget() {
  local want_s=$1 left
  left=$(( $(remaining) - 15 ))
  (( left < want_s )) && want_s=$left
  (( want_s < 0 )) && want_s=0
  echo "$want_s"
}

# run_step NAME LOGFILE SECONDS CMD...: the command under `timeout`, its output appended to LOGFILE
run_step() {
  local name=$1 logfile=$2 secs=$3 rc
  shift 3
  if (( secs < 10 )); then
    record "$name" "SKIPPED (no time left before the ${DEADLINE}s deadline)"
    return 99
  fi
  local cmd="$*"
  cmd="${cmd//$'\n'/ }"
  (( ${#cmd} > 200 )) && cmd="${cmd:0:200}..."
  log "$name: $cmd (limit ${secs}s, log $(basename "$logfile"))"
  echo "=== [+$(elapsed)s] $name: $*" >>"$logfile"
  timeout --kill-after=10 "$secs" "$@" >>"$logfile" 2>&1
  rc=$?
  echo "=== [+$(elapsed)s] $name: exit status $rc" >>"$logfile"
  if (( rc == 124 || rc == 137 )); then
    record "$name" "TIMEOUT after ${secs}s (exit $rc)"
  elif (( rc == 0 )); then
    record "$name" "ok"
  else
    record "$name" "FAILED (exit $rc)"
  fi
  return "$rc"
}

log "steps: $STEPS; output in $OUT_DIR; deadline ${DEADLINE}s"

# ------------------------------------------------------------------ wheels
if want wheels; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    run_step wheels "$LOG" "$(budget 60)" "$PY" -m pip install -q --no-index --no-deps --no-compile \
      --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
  else
    record wheels "SKIPPED (no .whl/*.whl: carry .whl; the peers will be reported as not installed)"
  fi
fi

# ------------------------------------------------------------------ info
if want info; then
  {
    echo "=== nvidia-smi"; nvidia-smi 2>&1 || echo "nvidia-smi failed"
    echo "=== versions"
    "$PY" - <<'EOF' 2>&1
import importlib.util, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", torch.cuda.get_device_name(0), "sm", torch.cuda.get_device_capability(0),
          "SMs", p.multi_processor_count, "memory GiB", round(p.total_memory / 2**30, 1))
for m in ("triton", "liger_kernel", "cut_cross_entropy", "pytest", "xdist"):
    print(m, "found" if importlib.util.find_spec(m) else "MISSING")
EOF
    echo "=== nvcc"; nvcc --version 2>&1 | tail -2 || echo "nvcc not found"
    echo "=== compute-sanitizer"; compute-sanitizer --version 2>&1 | tail -2 || echo "compute-sanitizer not found"
    echo "=== nproc $(nproc), $(free -g | awk '/Mem:/ {print $2 " GiB RAM"}')"
  } >>"$LOG" 2>&1
  record info "written to $(basename "$LOG")"
fi

# ------------------------------------------------------------------ build
if want build; then
  prebuilt_ok=0
  if [[ "${PREBUILT:-0}" == 1 ]] && compgen -G "kdfast/_C*.so" >/dev/null; then
    # a .so made elsewhere (benchmarks/prepare_device.sh) may not load here: then build after all
    if "$PY" -c "import kdfast._C" >>"$LOG" 2>&1; then
      prebuilt_ok=1
    else
      log "PREBUILT=1: kdfast/_C*.so does not load here (see above): building"
      rm -f kdfast/_C*.so
    fi
  fi
  if (( prebuilt_ok )); then
    record build "SKIPPED (PREBUILT=1: using $(ls kdfast/_C*.so | head -1))"
  else
    TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}" MAX_JOBS="${MAX_JOBS:-16}" \
      run_step build "$OUT_DIR/build.log" "$(budget 330)" \
      "$PY" -m pip install --no-build-isolation --no-deps -e .
    if [[ "${SAVE_SO:-1}" == 1 ]]; then
      # a copy without debug info (the device tool brings back files of at most 16 MiB; the debug
      # info is most of the build's size), to carry into a later call with PREBUILT=1
      for so in kdfast/_C*.so; do
        [[ -f "$so" ]] || continue
        dest="$OUT_DIR/$(basename "$so")"
        strip --strip-debug -o "$dest" "$so" 2>/dev/null || cp "$so" "$dest"
        if (( $(stat -c %s "$dest") < 16 * 1024 * 1024 )); then
          log "copied $so to the output folder ($(du -h "$dest" | cut -f1), debug info stripped)"
        else
          rm -f "$dest"
          log "$so is over 16 MiB even stripped: not copied"
        fi
      done
    fi
  fi
fi

# ------------------------------------------------------------------ register
if want register; then
  run_step register "$LOG" "$(budget 60)" "$PY" -c '
import sys, torch, kdfast
missing = kdfast.ops.missing_cuda_kernels()
print("kdfast", kdfast.__version__, "from", kdfast.__file__, "- CUDA kernels missing for:", missing or "none")
sys.exit(0 if not missing and torch.cuda.is_available() else 1)'
fi

# ------------------------------------------------------------------ tests
if want tests; then
  eval "tests_args=(${TESTS_ARGS:--k \"cuda or another_device\" --maxfail=25})"
  run_step tests "$OUT_DIR/tests.log" "$(budget "${TESTS_TIMEOUT:-240}")" \
    "$PY" -m pytest tests -q -p no:cacheprovider "${tests_args[@]}"
fi

# ------------------------------------------------------------------ sanitizer
if want sanitizer; then
  if command -v compute-sanitizer >/dev/null; then
    filter=()
    # only kdfast's kernels are instrumented (cuBLAS and PyTorch's run at full speed), where this
    # compute-sanitizer has the option
    # (probed on `true`: a compute-sanitizer that does not know the option fails at once)
    if compute-sanitizer --kernel-name kns=kdfast true >/dev/null 2>&1; then
      filter=(--kernel-name kns=kdfast)
    else
      log "compute-sanitizer does not take --kernel-name kns=kdfast: every kernel is instrumented (slower)"
    fi
    for tool in ${SANITIZER_TOOLS:-memcheck racecheck}; do
      extra=()
      [[ "$tool" != memcheck ]] && extra=(--quick)  # racecheck is the slow one
      # no caching allocator: memcheck then sees each tensor's own bounds, not a pooled block's
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 run_step "sanitizer-$tool" "$OUT_DIR/sanitizer.log" \
        "$(budget "${SANITIZER_TIMEOUT:-150}")" \
        compute-sanitizer --tool "$tool" "${filter[@]}" --error-exitcode 86 \
        "$PY" benchmarks/cuda_smoke.py "${extra[@]}"
    done
    # the last lines of each tool's report, for the summary
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|cuda_smoke: [0-9]+ checks" "$OUT_DIR/sanitizer.log" | tail -6 \
      | while read -r line; do log "  $line"; done
  else
    record sanitizer "SKIPPED (compute-sanitizer not found)"
    # still compare CUDA with the CPU once
    run_step cuda-smoke "$OUT_DIR/sanitizer.log" "$(budget 120)" "$PY" benchmarks/cuda_smoke.py
  fi
fi

# ------------------------------------------------------------------ profile
if want profile; then
  eval "profile_args=(${PROFILE_ARGS:---cases ce,ce_kd_linear,dd_linear,topk})"
  # the numbers are in the log; the JSON stays on the machine (the device tool brings back 8 files)
  run_step profile "$OUT_DIR/profile.log" "$(budget "${PROFILE_TIMEOUT:-90}")" \
    "$PY" benchmarks/profile_fused.py --device cuda --json /tmp/kdfast_profile_fused.json "${profile_args[@]}"
fi

# ------------------------------------------------------------------ xmc
if want xmc; then
  # the data set is generated on this machine (~20 s); the output folder stays here (the device
  # tool brings back 8 files): the projection is in gpu_check.log
  eval "xmc_args=(${XMC_ARGS:-})"
  for precision in ${XMC_PRECISIONS:-highest high}; do
    run_step "xmc-$precision" "$LOG" "$(budget "${XMC_TIMEOUT:-120}")" \
      "$PY" experiments/amazon670k.py --scale full --estimate --no-progress --matmul-precision "$precision" \
      --out "/tmp/kdfast_xmc_estimate_$precision" --cache-dir /tmp/kdfast_xmc_cache "${xmc_args[@]}"
  done
fi

# ------------------------------------------------------------------ bench
if want bench; then
  BENCH_SECS=$(budget "${BENCH_TIMEOUT:-3600}")
  # the benchmark stops starting new (case, impl) processes 20 s before its own limit, and writes its report
  eval "bench_args=(${BENCH_ARGS:-})"
  run_step bench "$OUT_DIR/bench.log" "$BENCH_SECS" \
    "$PY" benchmarks/bench_fused_linear.py --device cuda --json "$OUT_DIR/fused_linear_cuda.json" \
    --time-budget "$(( BENCH_SECS > 40 ? BENCH_SECS - 20 : BENCH_SECS ))" "${bench_args[@]}"
fi

# ------------------------------------------------------------------ alltests
if want alltests; then
  eval "alltests_args=(${ALLTESTS_ARGS:--x})"
  run_step alltests "$OUT_DIR/tests.log" "$(budget "${ALLTESTS_TIMEOUT:-400}")" \
    "$PY" -m pytest tests -q -p no:cacheprovider "${alltests_args[@]}"
fi

# ------------------------------------------------------------------ summary
{
  echo
  echo "================ gpu_check summary (+$(elapsed)s) ================"
  printf '%s\n' "${SUMMARY[@]}"
  if [[ -f "$OUT_DIR/tests.log" ]]; then
    echo "--- pytest"
    grep -E "^(FAILED|ERROR) |[0-9]+ (passed|failed|error)" "$OUT_DIR/tests.log" | tail -15
  fi
  if [[ -f "$OUT_DIR/sanitizer.log" ]]; then
    echo "--- sanitizer / cuda_smoke"
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|^FAIL |cuda_smoke: " "$OUT_DIR/sanitizer.log" | tail -12
  fi
  if [[ -f "$OUT_DIR/profile.log" ]]; then
    echo "--- profile (device time by kind)"
    grep -E "^[a-z_]+: |^  (forward|backward) " "$OUT_DIR/profile.log" | head -14
  fi
  if want xmc; then
    echo "--- xmc (issue 5 at --scale full, projected; exact float32, then TF32)"
    grep -E "^=== .* xmc-|^  [A-Z][a-z].*s per step|^  labeling: |^projected wall time" "$LOG" | tail -16
  fi
  if [[ -f "$OUT_DIR/bench.log" ]]; then
    echo "--- bench (goals)"
    sed -n '/^goals (issue 6):/,$p' "$OUT_DIR/bench.log" | head -12
  fi
  echo "--- files in $OUT_DIR"
  ls -la "$OUT_DIR" | tail -n +2
} 2>&1 | tee -a "$LOG"

for line in "${SUMMARY[@]}"; do
  [[ "$line" == *FAILED* || "$line" == *TIMEOUT* ]] && exit 1
done
exit 0
