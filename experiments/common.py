"""Helpers every experiment script shares: the log, the run's provenance, JSON output.

Scripts put this directory on ``sys.path`` and ``from common import ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent


class Log:
    """Print and keep every line for log.txt."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, msg: str = "") -> None:
        print(msg, flush=True)
        self.lines.append(msg)

    def save(self, path: Path) -> None:
        """Write every line so far to ``path`` (a run's log.txt)."""
        path.write_text("\n".join(self.lines) + "\n")


def config_dict(args: argparse.Namespace) -> dict[str, Any]:
    """The command-line arguments as JSON-ready values (paths as strings), for results.json."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def run_parts(
    parts: Iterable[str],
    run: Callable[[str], Any],
    log: Log,
    after: Callable[[str, Any], None] | None = None,
) -> tuple[dict[str, Any], dict[str, float]]:
    """Run ``run(part)`` for each part in order, logging how long each took.

    ``after(part, result)`` (optional) runs after each part, e.g. to log its claims.
    Returns the results and the seconds, both by part.
    """
    results: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    for part in parts:
        start = time.perf_counter()
        results[part] = run(part)
        seconds[part] = time.perf_counter() - start
        if after is not None:
            after(part, results[part])
        log(f"{part} done in {seconds[part]:.1f} s")
    return results, seconds


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=False)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=False).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def device_description(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    model = platform.processor() or "CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model} ({torch.get_num_threads()} threads)"


def json_default(value):
    """numpy scalars as Python ones (a numpy bool stays a bool), for ``json.dumps(default=...)``."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
