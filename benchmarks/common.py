"""Helpers shared by the benchmark scripts in ``benchmarks/``.

* environment / row metadata: :func:`env_metadata` (date, commit, device, versions);
* timing: :func:`time_fn` (warmup, then one wall time per repeat; median in the caller);
* peak memory: :func:`peak_memory_growth_mb` (CPU: growth of the resident set over the
  call, from the kernel's high-water mark; CUDA: ``torch.cuda.max_memory_allocated``);
* subprocess workers: :func:`run_worker` / :func:`emit_worker_result` so that each
  measurement can run in a fresh process (:func:`try_run_worker`: a failed worker is a result,
  not an exception);
* CUDA timing: :func:`time_cuda` (CUDA events around each call);
* output: :func:`append_csv`, :func:`markdown_table` and :func:`update_markdown_section`,
  which rewrites the part of ``BENCHMARKS.md`` between ``<!-- NAME:begin -->`` and
  ``<!-- NAME:end -->``.

Nothing here imports kdfast, so the eager baselines can be measured without the extension.
"""

from __future__ import annotations

import csv
import datetime as _dt
import gc
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
BENCHMARKS_MD = REPO_ROOT / "BENCHMARKS.md"

MB = 1024 * 1024  # "MB" in every table is MiB: 2**20 bytes

# ---------------------------------------------------------------------------
# environment / row metadata
# ---------------------------------------------------------------------------


def utc_now_iso() -> str:
    """The current time in UTC, ISO 8601 to the second (``2025-01-31T12:00:00+00:00``)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def git_commit(repo: Path = REPO_ROOT) -> str:
    """``git rev-parse --short HEAD``, plus ``-dirty`` when tracked files differ from it.

    ``"no-commit"`` in a repository without commits, ``"unknown"`` outside git.
    Untracked files (e.g. new result files) do not make the tree dirty, as in
    ``git describe --dirty``.
    """

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=False)

    try:
        head = git("rev-parse", "--short", "HEAD")
        if head.returncode != 0:
            inside = git("rev-parse", "--is-inside-work-tree")
            return "no-commit" if inside.returncode == 0 else "unknown"
        status = git("status", "--porcelain", "--untracked-files=no")
        dirty = status.returncode != 0 or bool(status.stdout.strip())
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except OSError:  # no git executable
        return "unknown"


def cpu_model() -> str:
    """The CPU's marketing name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: str = "cpu", threads: int | None = None) -> str:
    """``"<CPU model> (<n> threads)"`` for CPU runs, the GPU name for CUDA runs."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    n = torch.get_num_threads() if threads is None else threads
    return f"{cpu_model()} ({n} threads)"


def package_version(name: str) -> str:
    """``name.__version__`` if ``name`` imports, otherwise ``"unavailable"``."""
    try:
        module = __import__(name)
    except Exception:  # noqa: BLE001  (a broken extension build must not stop a baseline run)
        return "unavailable"
    return str(getattr(module, "__version__", "unknown"))


def env_metadata(device: str = "cpu", threads: int | None = None) -> dict[str, str]:
    """The columns every result row starts with: date, commit, device, and versions."""
    return {
        "date": utc_now_iso(),
        "commit": git_commit(),
        "device": device_name(device, threads),
        "torch": torch.__version__,
        "kdfast": package_version("kdfast"),
        "python": platform.python_version(),
    }


BUSY_LOAD = 0.5  # 1-minute load average above which the timings are flagged as disturbed


def load_average() -> float | None:
    """The 1-minute load average (``None`` where the OS has none): a run started on a busy
    machine has distorted timings."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def announce_load() -> float | None:
    """Print the 1-minute load average at the start of a run, with a warning above
    :data:`BUSY_LOAD`; return it."""
    load = load_average()
    if load is not None:
        print(f"load average at start: {load:.2f}")
        if load > BUSY_LOAD:
            print(f"warning: the machine is busy (load {load:.2f}); other processes will distort the timings")
    print()
    return load


def kdfast_missing(meta: Mapping[str, str], impls: Sequence[str]) -> bool:
    """True (after printing how to build it) when kdfast is to be timed but does not import."""
    if "kdfast" in impls and meta["kdfast"] == "unavailable":
        print("error: kdfast does not import (build it with `make` or `pip install --no-build-isolation -e .`), "
              "or run the eager baselines alone with --impls eager", file=sys.stderr)
        return True
    return False


def set_threads(threads: str | int | None) -> int:
    """Apply a ``--threads`` value (``"default"``/``None`` keeps torch's choice); return the count."""
    if threads not in (None, "default"):
        n = int(threads)
        if n < 1:
            raise ValueError(f"--threads must be >= 1 or 'default', got {threads}")
        torch.set_num_threads(n)
    return torch.get_num_threads()


# ---------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------


def synchronize(device: str = "cpu") -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def time_fn(
    fn: Callable[[], Any],
    *,
    repeats: int = 3,
    warmup: int = 1,
    setup: Callable[[], Any] | None = None,
    device: str = "cpu",
) -> list[float]:
    """Wall-clock seconds of ``fn()`` for each of ``repeats`` runs after ``warmup`` untimed runs.

    ``setup()`` (not timed) runs before every call, e.g. to drop the previous gradient.
    The device is synchronized around each timed call.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


# ---------------------------------------------------------------------------
# peak memory
# ---------------------------------------------------------------------------


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int | None:
    """Current resident set size (``VmRSS``), or ``None`` without ``/proc``."""
    kb = _proc_status_kb("VmRSS")
    return None if kb is None else kb * 1024


def hwm_bytes() -> int | None:
    """Peak resident set size since start or the last reset (``VmHWM``)."""
    kb = _proc_status_kb("VmHWM")
    return None if kb is None else kb * 1024


def maxrss_bytes() -> int:
    """``getrusage(RUSAGE_SELF).ru_maxrss`` in bytes (kB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS by writing ``5`` to ``/proc/self/clear_refs``
    (Linux >= 4.0). Returns whether the write was accepted."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


_HWM_RESET_WORKS: bool | None = None


def hwm_reset_works(probe_mb: int = 64) -> bool:
    """Check (once per process) that resetting the high-water mark really lowers ``VmHWM``:
    touch ``probe_mb`` MB, free it, reset, and see the peak drop back to the current RSS."""
    global _HWM_RESET_WORKS
    if _HWM_RESET_WORKS is None:
        ok = False
        if rss_bytes() is not None and hwm_bytes() is not None:
            probe = b"\x01" * (probe_mb * MB)  # written, so resident
            del probe
            raised = hwm_bytes() - rss_bytes() >= probe_mb * MB // 2
            if raised and reset_peak_rss():
                ok = hwm_bytes() - rss_bytes() < probe_mb * MB // 4
        _HWM_RESET_WORKS = ok
    return _HWM_RESET_WORKS


def peak_memory_growth_mb(fn: Callable[[], Any], device: str = "cpu") -> tuple[float, str, Any]:
    """Run ``fn()`` once and return ``(peak growth in MB, method, fn's result)``.

    CPU: growth of the resident set over the call, ``VmHWM - VmRSS_before``, after resetting
    the high-water mark (method ``"vmhwm"``). Where that reset is not available the fallback
    is ``ru_maxrss - VmRSS_before`` (method ``"ru_maxrss"``), which is only right if the
    process never had more resident before the call than at its start, so run it in a
    fresh process whose inputs were made without big temporaries. Memory that ``fn``'s result
    keeps (e.g. a ``.grad``) counts, as it was resident at the peak.

    CUDA: ``max_memory_allocated - memory_allocated_before`` (method ``"cuda_allocator"``).
    """
    gc.collect()
    if str(device).startswith("cuda"):
        dev = torch.device(device)
        torch.cuda.synchronize(dev)
        before = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        out = fn()
        torch.cuda.synchronize(dev)
        return (torch.cuda.max_memory_allocated(dev) - before) / MB, "cuda_allocator", out
    if hwm_reset_works():
        before = rss_bytes()
        reset_peak_rss()
        out = fn()
        return (hwm_bytes() - before) / MB, "vmhwm", out
    before = rss_bytes()
    if before is None:
        raise RuntimeError("peak memory needs /proc/self/status (Linux)")
    out = fn()
    return (maxrss_bytes() - before) / MB, "ru_maxrss", out


# ---------------------------------------------------------------------------
# subprocess workers
# ---------------------------------------------------------------------------

RESULT_MARKER = "@@BENCH_RESULT "


def emit_worker_result(result: Mapping[str, Any]) -> None:
    """Print a worker's result as one marked JSON line on stdout (read by :func:`run_worker`)."""
    sys.stdout.write(RESULT_MARKER + json.dumps(dict(result)) + "\n")
    sys.stdout.flush()


def run_worker(argv: Sequence[str], *, timeout: float | None = None, env: Mapping[str, str] | None = None) -> dict:
    """Run ``python argv...`` in a fresh process and return the dict it emitted.

    The worker's stderr goes straight to ours; its other stdout lines are echoed.
    Raises ``RuntimeError`` with the worker's output if it fails or emits nothing.
    """
    cmd = [sys.executable, *argv]
    proc = subprocess.run(
        cmd, stdout=subprocess.PIPE, text=True, timeout=timeout, check=False,
        env=None if env is None else {**os.environ, **env},
    )
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            result = json.loads(line[len(RESULT_MARKER):])
        elif line.strip():
            print(f"    | {line}", flush=True)
    if proc.returncode != 0 or result is None:
        raise RuntimeError(f"worker {' '.join(cmd)} failed (exit status {proc.returncode})")
    return result


def try_run_worker(argv: Sequence[str], *, timeout: float | None = None,
                   env: Mapping[str, str] | None = None) -> tuple[dict | None, str]:
    """Like :func:`run_worker`, but never raises: returns ``(result, problem)``.

    ``result`` is the dict the worker emitted (``None`` if it emitted none) and ``problem`` is
    ``""`` when the worker exited cleanly, else a short description (``"timeout after 120 s"``,
    ``"exit status -6"``, ...): a worker that crashes the CUDA context or hangs becomes one
    error row of a benchmark instead of ending the run. Worker output is echoed as by
    :func:`run_worker`.
    """
    cmd = [sys.executable, *argv]
    full_env = None if env is None else {**os.environ, **env}
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=timeout, check=False, env=full_env)
        stdout, problem = proc.stdout, ("" if proc.returncode == 0 else f"exit status {proc.returncode}")
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout or ""
        stdout = out.decode(errors="replace") if isinstance(out, bytes) else out
        problem = f"timeout after {timeout:.0f} s"
    result = None
    for line in stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            result = json.loads(line[len(RESULT_MARKER):])
        elif line.strip():
            print(f"    | {line}", flush=True)
    if result is None and not problem:
        problem = "the worker emitted no result"
    return result, problem


def time_cuda(fn: Callable[[], Any], *, repeats: int, setup: Callable[[], Any] | None = None) -> list[float]:
    """Seconds of ``fn()`` on the current CUDA stream for each of ``repeats`` runs, timed with
    CUDA events (no warm-up here: the caller warms up). ``setup()`` runs untimed before each
    call, and the device is synchronized after each, so one run never overlaps the next."""
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def write_json(path: Path | str, obj: Any) -> None:
    """Write ``obj`` as JSON through a temporary file and a rename, so that a run killed while
    writing leaves the previous complete file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------
# output: CSV and BENCHMARKS.md
# ---------------------------------------------------------------------------


def append_csv(path: Path | str, rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> None:
    """Append ``rows`` to the CSV at ``path``, writing the header first if the file is new/empty.

    An existing file with a different header is an error (rather than a silently misaligned table).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with open(path, newline="") as fh:
            header = next(csv.reader(fh), None)
        if header != list(columns):
            raise ValueError(f"{path} has columns {header}, expected {list(columns)}; move it aside")
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="raise")
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in columns})


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub markdown table; ``align`` is one character per column from ``l``, ``r``, ``c``."""
    rows = [[str(c) for c in r] for r in rows]
    align = align or "l" * len(headers)
    rule = {"l": "---", "r": "---:", "c": ":---:"}
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join(rule[a] for a in align) + "|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def section_markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def update_markdown_section(path: Path | str, name: str, content: str) -> None:
    """Replace what lies between ``<!-- name:begin -->`` and ``<!-- name:end -->`` in ``path``
    with ``content``; append a new marked section at the end when the markers are missing
    (and create the file if need be). Everything outside the markers is left as it is."""
    path = Path(path)
    begin, end = section_markers(name)
    block = f"{begin}\n{content.strip()}\n{end}"
    text = path.read_text() if path.exists() else ""
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if text.count(begin) > 1 or text.count(end) > 1:
        raise ValueError(f"{path}: the markers of section {name!r} appear more than once")
    if pattern.search(text):
        text = pattern.sub(lambda _m: block, text, count=1)
    elif begin in text or end in text:
        raise ValueError(f"{path}: only one of the markers {begin} / {end} is present")
    else:
        text = text.rstrip("\n") + ("\n\n" if text.strip() else "") + block + "\n"
    path.write_text(text)


# ---------------------------------------------------------------------------
# command-line arguments shared by the benchmark scripts
# ---------------------------------------------------------------------------


def parse_subset(parser, flag: str, value: str, allowed: Sequence[str]) -> list[str]:
    """``value`` of ``flag``: ``"all"`` or a comma-separated subset of ``allowed``, in ``allowed``'s order;
    anything else is a usage error."""
    if value == "all":
        return list(allowed)
    chosen = [c.strip() for c in value.split(",") if c.strip()]
    bad = [c for c in chosen if c not in allowed]
    if bad or not chosen:
        parser.error(f"{flag}: unknown {bad or value!r}; choose from {', '.join(allowed)} or all")
    return [c for c in allowed if c in chosen]


def check_threads_arg(parser, threads: str) -> None:
    """``--threads``: a positive integer or ``"default"``."""
    if threads == "default":
        return
    try:
        if int(threads) < 1:
            raise ValueError
    except ValueError:
        parser.error(f"--threads must be a positive integer or 'default', got {threads!r}")


# ---------------------------------------------------------------------------
def run_cases(cases: Sequence[str], impls: Sequence[str], argv_for: Callable[[str, str], Sequence[str]],
              describe: Callable[[dict], str]) -> dict[tuple[str, str], dict]:
    """Run one fresh worker process per (case, impl), in order, printing a progress line
    before each and ``describe(result)`` after it; return the results by (case, impl)."""
    width = max(len(c) for c in cases)
    results: dict[tuple[str, str], dict] = {}
    for case in cases:
        for impl in impls:
            print(f"  {case:{width}s} {impl:7s} ...", flush=True)
            r = run_worker(argv_for(case, impl))
            results[(case, impl)] = r
            times = ", ".join(f"{t:.3f}" for t in r["times"])
            print(f"  {case:{width}s} {impl:7s} time {r['time_s']:.3f} s (runs: {times})  {describe(r)}", flush=True)
    return results


def print_checks(checks: Sequence[str]) -> None:
    """The kdfast-vs-eager correctness lines of a run, if any."""
    print()
    if checks:
        print("correctness (kdfast vs eager, same inputs):")
        for c in checks:
            print("  " + c)
        print()


# console tables
# ---------------------------------------------------------------------------


def fmt(x: float | None, spec: str) -> str:
    """``format(x, spec)``, or ``"-"`` for a missing or NaN value."""
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Left-aligned columns, a rule under the header."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
