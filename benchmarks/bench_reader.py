"""Single-core throughput of the XMLRepo BoW reader (issue 5: at least 50 MB/s on one core).

Writes a file with Amazon-670K's statistics (``shared/DESIGN.md`` section 4: 135,909 features,
670,091 labels, about 75 features and 5.45 labels per point, tf-idf-like values written with 6
significant digits as in the repository's files) and reads it, with one thread, through

* ``parse``:   ``torch.ops.kdfast.read_xmlrepo``, the C++ parser returning the CSR arrays (the goal);
* ``reader``:  ``kdfast.data.read_xmlrepo``, the parser plus the scipy matrices (sorted, summed);
* ``sklearn``: ``sklearn.datasets.load_svmlight_file(multilabel=True)`` on the same lines (after the
  header), the Cython reader of the nearest common format, as a baseline.

The file is read once before timing, so every timed read comes from the page cache: this
measures parsing, not the disk. Time is the median of ``--repeats``; MB/s is the file size over
it. Rows go to ``benchmarks/results/reader.csv`` and the ``bench_reader`` section of
``BENCHMARKS.md`` (unless ``--no-write``).

    python benchmarks/bench_reader.py                    # 50,000 points (~40 MB), ~1 minute
    python benchmarks/bench_reader.py --points 200000 --no-write
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

FEATURES, LABELS = 135_909, 670_091  # Amazon-670K
FEATURES_PER_POINT, LABELS_PER_POINT = 75, 5.45
GOAL_MB_S = 50.0
IMPLS = ("parse", "reader", "sklearn")
IMPL_TITLES = {
    "parse": "kdfast C++ parser (torch.ops.kdfast.read_xmlrepo)",
    "reader": "kdfast.data.read_xmlrepo (parser + scipy CSR)",
    "sklearn": "sklearn load_svmlight_file(multilabel=True)",
}
CSV_COLUMNS = ("date", "commit", "device", "torch", "kdfast", "python", "impl", "points", "file_mb", "time_s", "mb_per_s")
CSV_PATH = common.RESULTS_DIR / "reader.csv"
MD_SECTION = "bench_reader"


def make_file(path: Path, points: int, seed: int = 0) -> None:
    """An XMLRepo file of ``points`` rows with Amazon-670K's shape (random ids, Poisson counts)."""
    import kdfast.data as kd

    rng = np.random.default_rng(seed)
    nnz = rng.poisson(FEATURES_PER_POINT, points).clip(1)
    cols = np.concatenate([np.sort(rng.choice(FEATURES, n, replace=False)) for n in nnz])
    values = rng.uniform(0.005, 0.3, cols.size).astype(np.float32)
    X = sp.csr_matrix((values, cols, np.concatenate([[0], np.cumsum(nnz)])), shape=(points, FEATURES))
    labels = rng.poisson(LABELS_PER_POINT - 1, points) + 1
    lcols = np.concatenate([np.sort(rng.choice(LABELS, n, replace=False)) for n in labels])
    Y = sp.csr_matrix((np.ones(lcols.size, np.float32), lcols, np.concatenate([[0], np.cumsum(labels)])),
                      shape=(points, LABELS))
    kd.write_xmlrepo(path, X, Y, value_format="%.6g")


def read_fn(impl: str, path: Path):
    if impl == "parse":
        import kdfast  # noqa: F401  (registers the op)

        return lambda: torch.ops.kdfast.read_xmlrepo(str(path))
    if impl == "reader":
        import kdfast.data as kd

        return lambda: kd.read_xmlrepo(path)
    if impl == "sklearn":
        from sklearn.datasets import load_svmlight_file

        def read():
            with open(path, "rb") as f:
                f.readline()  # the XMLRepo header "N D L"
                return load_svmlight_file(f, n_features=FEATURES, multilabel=True, zero_based=True)

        return read
    raise ValueError(f"unknown impl {impl!r}")


def check_same(path: Path) -> str:
    """The parser's matrices against sklearn's on the same file (a check that both read it all)."""
    import kdfast.data as kd

    X, Y = kd.read_xmlrepo(path)
    Xs, ys = read_fn("sklearn", path)()
    same_x = X.shape == Xs.shape and abs(X - Xs.astype(np.float32)).max() == 0
    same_y = len(ys) == Y.shape[0] and all(sorted(int(v) for v in ys[i]) == Y.indices[Y.indptr[i]:Y.indptr[i + 1]].tolist()
                                          for i in range(0, Y.shape[0], max(1, Y.shape[0] // 1000)))
    return f"features {'equal' if same_x else 'DIFFER'}, labels {'equal' if same_y else 'DIFFER'} (every 1000th row)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--points", type=int, default=50_000, help="rows of the generated file (default 50,000)")
    p.add_argument("--repeats", type=int, default=5, help="timed reads per implementation; the median is reported (default 5)")
    p.add_argument("--impls", default="all", help=f"comma-separated subset of {','.join(IMPLS)}, or all")
    p.add_argument("--no-write", action="store_true", help="print only: no CSV row, no BENCHMARKS.md update")
    args = p.parse_args(argv)
    if args.points < 1 or args.repeats < 1:
        p.error("--points and --repeats must be >= 1")
    impls = common.parse_subset(p, "--impls", args.impls, IMPLS)
    torch.set_num_threads(1)
    meta = common.env_metadata("cpu", 1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.txt"
        t0 = time.perf_counter()
        make_file(path, args.points)
        mb = os.path.getsize(path) / 1e6
        print(f"bench_reader: {args.points:,} points, {mb:.1f} MB (written in {time.perf_counter() - t0:.1f} s) "
              f"on {meta['device']}; one thread; commit {meta['commit']}")
        results = {}
        for impl in impls:
            try:
                fn = read_fn(impl, path)
            except ImportError as exc:
                print(f"  {impl:8s} not installed ({exc})")
                continue
            fn()  # warm-up: the file is in the page cache from here on
            times = common.time_fn(fn, repeats=args.repeats, warmup=0)
            t = common.median(times)
            results[impl] = {"time_s": t, "mb_per_s": mb / t}
            print(f"  {impl:8s} {t:.3f} s  {mb / t:6.1f} MB/s  (runs: {', '.join(f'{x:.3f}' for x in times)})", flush=True)
        check = check_same(path) if "sklearn" in results else None
    if check:
        print(f"  kdfast vs sklearn on this file: {check}")
    goal = results.get("parse")
    verdict = None if goal is None else goal["mb_per_s"] >= GOAL_MB_S
    if verdict is not None:
        print(f"goal (issue 5, >= {GOAL_MB_S:g} MB/s on one core): {'PASS' if verdict else 'FAIL'} "
              f"({goal['mb_per_s']:.1f} MB/s)")
    if not args.no_write and results:
        common.append_csv(CSV_PATH, [
            {**meta, "impl": impl, "points": args.points, "file_mb": f"{mb:.1f}", "time_s": f"{r['time_s']:.4f}",
             "mb_per_s": f"{r['mb_per_s']:.1f}"} for impl, r in results.items()], CSV_COLUMNS)
        rows = [[IMPL_TITLES[impl], f"{r['time_s']:.3f}", f"{r['mb_per_s']:.1f}",
                 f"{r['mb_per_s'] / results['sklearn']['mb_per_s']:.2f}" if "sklearn" in results else "-"]
                for impl, r in results.items()]
        lines = [
            (f"Device: {meta['device']} · commit `{meta['commit']}` · {meta['date']} · torch {meta['torch']} · "
            f"kdfast {meta['kdfast']} · Python {meta['python']}"),
            "",
            (f"{args.points:,} points with Amazon-670K's shape ({mb:.1f} MB), one thread, file in the page cache; "
            f"time = median of {args.repeats}."),
            "",
            common.markdown_table(["implementation", "time s", "MB/s", "vs sklearn"], rows, "lrrr"),
            "",
        ]
        if check:
            lines.append(f"kdfast vs sklearn on this file: {check}.")
        if verdict is not None:
            lines.append(f"Goal (issue 5: the parser at >= {GOAL_MB_S:g} MB/s on one core): "
                         f"{'PASS' if verdict else 'FAIL'} ({goal['mb_per_s']:.1f} MB/s).")
        common.update_markdown_section(common.BENCHMARKS_MD, MD_SECTION, "\n".join(lines))
        print(f"wrote {CSV_PATH.relative_to(common.REPO_ROOT)} and the {MD_SECTION} section of BENCHMARKS.md")
    return 0 if verdict in (None, True) else 1


if __name__ == "__main__":
    sys.exit(main())
