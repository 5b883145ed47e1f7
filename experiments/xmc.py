"""Seed 003 Table 1 end to end: teacher, student, student + distillation and student +
double distillation on an extreme multi-label data set, trained with kdfast's fused ops
over the full label space with the pick-all-labels reduction.

Shared by ``experiments/amazon670k.py`` and ``experiments/amazoncat13k.py``; run those.

Models (seed 003 section 5.3): sparse features -> linear hidden layer (EmbeddingBag with
per-sample weights) of width 512 (teacher) or 64 / 8 (student) -> softmax over all labels.
Every model is trained with :func:`kdfast.fused_linear_distillation_loss` and a
:class:`kdfast.MultiTarget` (one example per (point, label) pair, one pass per point):

1. teacher on the labels (hard cross-entropy);
2. student on the labels;
3. student + distillation: the teacher's probabilities as targets (soft term);
4. student + double distillation: the teacher's probabilities as positives and
   ``1 - sigmoid(a (s - b))`` negative weights (double term).

The teacher signal of 3 and 4 comes from a top-k label store written by
:func:`kdfast.label_dataset` after the teacher is trained (default on CPU, or given with
``--teacher-labels``), or from the trained teacher on the fly (``--teacher-signal
on-the-fly``, default on a GPU). Evaluation: P@k, nDCG@k, PSP@k (k = 1, 3, 5) from a fused
top-k over the test set (:func:`kdfast.teacher_topk` on each model's output layer, never a
test x labels matrix).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

import kdfast
from kdfast.data import l2_normalize, read_xmlrepo, scaled_preset
from kdfast.metrics import evaluate, inverse_propensity
from kdfast.models import SparseLinearClassifier, save_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Log, config_dict, device_description, git_commit

try:
    from tqdm.auto import tqdm
except ImportError:  # tqdm is an `experiments` extra
    tqdm = None

REPO = Path(__file__).resolve().parent.parent
MODELS = ("teacher", "student", "student_kd", "student_dd")


def model_seed(seed: int, name: str, stream: int = 0) -> int:
    """The seed of one model's random stream (0: its initialization, 1: its batch order), derived
    from the run's seed with numpy's SeedSequence so that no two (seed, model, stream) share one
    (seed + offset schemes collide: model 2 of seed 0 would be model 1 of seed 1)."""
    return int(np.random.SeedSequence([seed, MODELS.index(name), stream]).generate_state(1)[0])


def seed_model(seed: int, name: str) -> None:
    """Seed torch for `name`'s initialization: the same weights whatever else the run does."""
    torch.manual_seed(model_seed(seed, name))
MODEL_TITLES = {
    "teacher": "Teacher",
    "student": "Student",
    "student_kd": "Student + distillation",
    "student_dd": "Student + double-distillation",
}
KS = (1, 3, 5)
TRAIN_EVAL_ROWS = 5000  # training points each model is also scored on, to show memorization


@dataclass(frozen=True)
class DatasetSpec:
    """What differs between the two data sets of Table 1."""

    name: str                      # preset name in kdfast.data.PRESETS
    title: str
    student_width: int
    propensity: tuple[float, float]  # A, B of the PSP weights
    paper: dict[str, tuple[float, float, float]]  # P@1, P@3, P@5 per model (seed 003 Table 1)


AMAZON670K = DatasetSpec(
    name="amazon670k", title="Amazon-670K", student_width=64, propensity=(0.6, 2.6),
    paper={
        "teacher": (0.3983, 0.3598, 0.3298),
        "student": (0.3307, 0.3004, 0.2753),
        "student_kd": (0.3461, 0.3151, 0.2892),
        "student_dd": (0.3480, 0.3161, 0.2865),
    },
)
AMAZONCAT13K = DatasetSpec(
    name="amazoncat13k", title="AmazonCat-13K", student_width=8, propensity=(0.55, 1.5),
    paper={
        "teacher": (0.8495, 0.7412, 0.6109),
        "student": (0.7913, 0.6156, 0.4774),
        "student_kd": (0.8131, 0.6363, 0.4918),
        "student_dd": (0.8560, 0.7148, 0.5715),
    },
)


# --------------------------------------------------------------------------- arguments


def cuda_usable() -> bool:
    """A GPU is visible and kdfast was built with CUDA kernels for its ops."""
    return torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
        "kdfast::fused_linear_loss_forward", "CUDA")


def parse_args(spec: DatasetSpec, argv: list[str] | None) -> argparse.Namespace:
    gpu = cuda_usable()
    p = argparse.ArgumentParser(
        description=f"Seed 003 Table 1 on {spec.title}: teacher, student, student + distillation, "
        "student + double distillation, trained with kdfast's fused losses.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", type=Path, help="directory with the real XMLRepo train.txt / test.txt "
                   "(default: a synthetic set with the data set's statistics)")
    p.add_argument("--scale", choices=("tiny", "cpu", "full"), default="full" if gpu else "cpu",
                   help="synthetic data scale: tiny (CI smoke), cpu (minutes on 2 cores), full (real shape)")
    p.add_argument("--seed", type=int, default=0, help="seed of data generation, initialization and shuffling")
    p.add_argument("--device", default="cuda" if gpu else "cpu")
    p.add_argument("--teacher-width", type=int, default=512)
    p.add_argument("--student-width", type=int, default=spec.student_width)
    p.add_argument("--teacher-epochs", type=int, default=None, help="default: by scale")
    p.add_argument("--student-epochs", type=int, default=None, help="default: by scale")
    p.add_argument("--batch-size", type=int, default=None, help="points per step (default: by scale)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default: by scale)")
    p.add_argument("--kd-temperature", type=float, default=1.0, help="temperature of the distillation term")
    p.add_argument("--dd-scale", type=float, default=1.0, help="a of the double-distillation weights")
    p.add_argument("--dd-shift", type=float, default=0.0, help="b of the double-distillation weights")
    p.add_argument("--teacher-signal", choices=("topk", "on-the-fly"), default="on-the-fly" if gpu else "topk",
                   help="where models 3 and 4 get the teacher from: a top-k label store, or the teacher itself")
    p.add_argument("--teacher-k", type=int, default=64, help="k of the top-k label store")
    p.add_argument("--teacher-labels", type=Path, help="an existing label store (skips labeling)")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ",".join(MODELS))
    p.add_argument("--out", type=Path, help="output directory (default experiments/results/<data set>/<run>)")
    p.add_argument("--cache-dir", type=Path, default=REPO / "experiments" / "cache",
                   help="where generated data sets are cached")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--matmul-precision", choices=("highest", "high"), default="highest",
                   help="float32 matrix products (torch.set_float32_matmul_precision): highest, exact float32 "
                   "(PyTorch's default), or high, TF32 tensor cores on a GPU (kdfast's fused CUDA kernels then "
                   "take the float32 models)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--estimate", action="store_true",
                   help="train nothing: time --estimate-steps real training steps of each model (after one "
                   "warm-up step) and the labeling and evaluation of one batch, project the whole run's wall "
                   "time and peak memory from them, write estimate.json and log.txt, and exit")
    p.add_argument("--estimate-steps", type=int, default=5, help="timed training steps per model of --estimate")
    args = p.parse_args(argv)
    # (teacher epochs, student epochs, Adam learning rate, points per step) by scale; 'cpu' is
    # sized for the whole run in ~7 minutes on 2 cores
    defaults = {"tiny": (2, 3, 1e-2, 256), "cpu": (3, 8, 1e-2, 1024), "full": (5, 8, 4e-3, 4096)}[args.scale]
    for name, value in zip(("teacher_epochs", "student_epochs", "lr", "batch_size"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, value)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        p.error(f"--models: unknown {unknown}; choose from {MODELS}")
    if {"student_kd", "student_dd"} & set(models) and "teacher" not in models and args.teacher_labels is None:
        p.error("student_kd / student_dd need the teacher: include 'teacher' in --models or pass --teacher-labels")
    args.models = models
    for name in ("batch_size", "teacher_width", "student_width", "teacher_k", "estimate_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


# --------------------------------------------------------------------------- logging


def progress(iterable, total: int, desc: str, enabled: bool):
    if tqdm is None or not enabled:
        return iterable
    return tqdm(iterable, total=total, desc=desc, unit="step", leave=False, dynamic_ncols=True)


# --------------------------------------------------------------------------- data


@dataclass
class Data:
    X_train: sp.csr_matrix
    Y_train: sp.csr_matrix
    X_test: sp.csr_matrix
    Y_test: sp.csr_matrix
    description: str

    @property
    def num_features(self) -> int:
        return self.X_train.shape[1]

    @property
    def num_labels(self) -> int:
        return self.Y_train.shape[1]


def load_data(spec: DatasetSpec, args: argparse.Namespace, log: Log) -> Data:
    if args.data is not None:
        start = time.perf_counter()
        X_train, Y_train = read_xmlrepo(args.data / "train.txt")
        X_test, Y_test = read_xmlrepo(args.data / "test.txt")
        if X_test.shape[1] != X_train.shape[1] or Y_test.shape[1] != Y_train.shape[1]:
            raise ValueError(f"{args.data}: train and test headers disagree on D or L")
        # the XMLRepo BoW values are tf-idf already: only the rows' L2 norms are set
        X_train, X_test = l2_normalize(X_train), l2_normalize(X_test)
        desc = (f"real {spec.title} from {args.data}: {X_train.shape[0]:,} train / {X_test.shape[0]:,} test "
                f"points, {X_train.shape[1]:,} features, {Y_train.shape[1]:,} labels; rows L2-normalized "
                f"(read in {time.perf_counter() - start:.1f} s)")
        return Data(X_train, Y_train, X_test, Y_test, desc)
    preset = scaled_preset(spec.name, args.scale)
    log(f"generating the synthetic stand-in: {preset.describe()}")
    data = preset.generate(seed=args.seed, cache_dir=args.cache_dir)
    return Data(data.X_train, data.Y_train, data.X_test, data.Y_test,
                f"synthetic {spec.title} stand-in, scale '{args.scale}', seed {args.seed}:\n{data.description}")


def batch_targets(Y: sp.csr_matrix, rows: np.ndarray, device: str) -> kdfast.MultiTarget:
    """The positives of `rows` as a MultiTarget (sorted within each row)."""
    sub = Y[rows]
    sub.sort_indices()
    return kdfast.MultiTarget(
        torch.from_numpy(sub.indptr.astype(np.int64)).to(device),
        torch.from_numpy(sub.indices.astype(np.int64)).to(device),
    )


LABEL_BATCH = 4096  # rows per batch of the labeling and of predict_topk in a run


def synchronize(device: str) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so that a clock reads its end."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: str) -> float:
    """Seconds `fn()` takes, its device work included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def duration(seconds: float) -> str:
    """Seconds as a person reads them: '42.0 s', '3.5 min', '2.1 h'."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.1f} h"


# --------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    name: str
    seconds: float
    steps: int
    final_loss: float
    losses: list[float] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    train_metrics: dict[str, float] = field(default_factory=dict)  # on the first TRAIN_EVAL_ROWS training points
    eval_seconds: float = 0.0


def loss_keywords(name: str, args: argparse.Namespace) -> dict[str, Any]:
    if name in ("teacher", "student"):
        return {"hard_weight": 1.0}
    if name == "student_kd":
        return {"hard_weight": 0.0, "soft_weight": 1.0, "temperature": args.kd_temperature}
    return {"hard_weight": 0.0, "double_weight": 1.0, "negative_weighting": "sigmoid",
            "negative_scale": args.dd_scale, "negative_shift": args.dd_shift}


def make_step(
    name: str, model: SparseLinearClassifier, data: Data, args: argparse.Namespace, *,
    teacher: SparseLinearClassifier | None = None, store: kdfast.LabelStore | None = None,
    teacher_keywords: Callable[[np.ndarray], dict[str, Any]] | None = None,
) -> Callable[[np.ndarray], float]:
    """`name`'s training step, with an Adam of its own: for a batch's sorted training rows, the
    teacher signal from `teacher` (on the fly), `store` (top-k) or `teacher_keywords(rows)` (the
    fused loss's teacher keywords), the fused loss with pick-all-labels targets, backward and the
    update. The step returns the batch's loss (a float: on a GPU it waits for the step)."""
    device = args.device
    keywords = loss_keywords(name, args)
    # fused: one kernel per parameter and no parameter-sized temporaries (foreach Adam's made
    # the teacher's steps fault ~300 MB of fresh pages in each; 20% of its step time on 2 cores)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, fused=True)

    def step(rows: np.ndarray) -> float:
        hidden = model.encode(data.X_train[rows])
        teacher_kw: dict[str, Any] = {}
        if teacher_keywords is not None:
            teacher_kw = teacher_keywords(rows)
        elif teacher is not None:
            with torch.no_grad():
                teacher_kw = {"teacher_hidden": teacher.encode(data.X_train[rows]),
                              "teacher_weight": teacher.output.weight, "teacher_bias": teacher.output.bias}
        elif store is not None:
            teacher_kw = {"teacher_topk": store[rows].to(device)}
        loss = kdfast.fused_linear_distillation_loss(
            hidden, model.output.weight, batch_targets(data.Y_train, rows, device),
            student_bias=model.output.bias, reduction="mean", **teacher_kw, **keywords,
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def train_model(
    name: str, model: SparseLinearClassifier, data: Data, args: argparse.Namespace, log: Log, *,
    epochs: int, teacher: SparseLinearClassifier | None = None, store: kdfast.LabelStore | None = None,
    teacher_keywords: Callable[[np.ndarray], dict[str, Any]] | None = None,
) -> TrainResult:
    """Adam over shuffled batches of points (make_step's step); the teacher signal comes from
    `teacher` (on the fly), `store` (top-k), or `teacher_keywords(rows)` (the fused loss's teacher
    keywords for a batch's sorted training rows)."""
    step = make_step(name, model, data, args, teacher=teacher, store=store, teacher_keywords=teacher_keywords)
    n = data.X_train.shape[0]
    steps_per_epoch = math.ceil(n / args.batch_size)
    rng = np.random.default_rng(model_seed(args.seed, name, stream=1))
    losses: list[float] = []
    start = time.perf_counter()
    model.train()
    for epoch in range(epochs):
        order = rng.permutation(n)
        bar = progress(range(steps_per_epoch), steps_per_epoch, f"{name} epoch {epoch + 1}/{epochs}",
                       not args.no_progress)
        epoch_loss = 0.0
        for i in bar:
            value = step(np.sort(order[i * args.batch_size:(i + 1) * args.batch_size]))
            epoch_loss += value
            losses.append(value)
            if tqdm is not None and not args.no_progress:
                bar.set_postfix(loss=f"{value:.4f}")
        log(f"  {name} epoch {epoch + 1}/{epochs}: mean loss {epoch_loss / steps_per_epoch:.4f} "
            f"({time.perf_counter() - start:.1f} s)")
    synchronize(args.device)
    return TrainResult(name, time.perf_counter() - start, epochs * steps_per_epoch, losses[-1] if losses else float("nan"),
                       losses)


@torch.no_grad()
def predict_topk(model: SparseLinearClassifier, X: sp.csr_matrix, k: int, batch_size: int = LABEL_BATCH) -> np.ndarray:
    """The model's top-k labels of every row of X by the fused top-k (never a rows x labels matrix)."""
    model.eval()
    out = []
    for start in range(0, X.shape[0], batch_size):
        hidden = model.encode(X[start:start + batch_size])
        top = kdfast.teacher_topk(hidden, model.output.weight, model.output.bias, k=k)
        out.append(top.indices.cpu().numpy())
    model.train()
    return np.concatenate(out) if out else np.zeros((0, k), dtype=np.int64)


# --------------------------------------------------------------------------- report


def paper_orderings(spec: DatasetSpec, results: dict[str, TrainResult]) -> list[str]:
    """The orderings of Table 1 and whether our numbers show them."""
    lines = []

    def compare(better: str, worse: str, claim: str) -> None:
        if better not in results or worse not in results:
            return
        for k in KS:
            ours_b, ours_w = results[better].metrics[f"P@{k}"], results[worse].metrics[f"P@{k}"]
            paper_b, paper_w = spec.paper[better][KS.index(k)], spec.paper[worse][KS.index(k)]
            paper_holds = paper_b > paper_w
            held = ours_b > ours_w
            verdict = "holds" if held == paper_holds else "does NOT hold"
            lines.append(f"- {claim} at P@{k}: paper {paper_b:.4f} vs {paper_w:.4f} "
                         f"({'>' if paper_holds else '<='}); ours {ours_b:.4f} vs {ours_w:.4f} -> {verdict}")

    compare("teacher", "student", "teacher beats the student")
    compare("student_kd", "student", "distillation beats the plain student")
    compare("student_dd", "student", "double distillation beats the plain student")
    compare("student_dd", "student_kd", "double distillation beats distillation")
    return lines


def table_markdown(spec: DatasetSpec, results: dict[str, TrainResult]) -> str:
    head = "| model | paper P@1 / P@3 / P@5 | ours P@1 / P@3 / P@5 | ours nDCG@1 / @3 / @5 | ours PSP@1 / @3 / @5 |"
    rows = [head, "|---|---|---|---|---|"]
    for name in MODELS:
        paper = " / ".join(f"{v:.4f}" for v in spec.paper[name])
        if name in results:
            m = results[name].metrics
            ours = " / ".join(f"{m[f'P@{k}']:.4f}" for k in KS)
            ndcg = " / ".join(f"{m[f'nDCG@{k}']:.4f}" for k in KS)
            psp = " / ".join(f"{m[f'PSP@{k}']:.4f}" for k in KS)
        else:
            ours = ndcg = psp = "not run"
        rows.append(f"| {MODEL_TITLES[name]} | {paper} | {ours} | {ndcg} | {psp} |")
    return "\n".join(rows)


def bar_chart(spec: DatasetSpec, results: dict[str, TrainResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in MODELS if n in results]
    fig, axes = plt.subplots(1, len(KS), figsize=(4 * len(KS), 3.6), sharey=False)
    x = np.arange(len(names))
    for ax, k in zip(axes, KS):
        paper = [spec.paper[n][KS.index(k)] for n in names]
        ours = [results[n].metrics[f"P@{k}"] for n in names]
        ax.bar(x - 0.2, paper, 0.4, label="paper", color="#9db4d0")
        ax.bar(x + 0.2, ours, 0.4, label="ours", color="#d1495b")
        ax.set_xticks(x, [MODEL_TITLES[n].replace("Student + ", "S + ") for n in names], rotation=25, ha="right",
                      fontsize=8)
        ax.set_title(f"P@{k}")
    axes[0].legend()
    fig.suptitle(f"Seed 003 Table 1, {spec.title}: paper vs ours")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def estimate_seconds(data: Data, args: argparse.Namespace) -> float:
    """A rough estimate of the whole run from one timed step per model width, for a run's first
    lines (--estimate's estimate_run times each model's real step)."""
    n = data.X_train.shape[0]
    steps_per_epoch = math.ceil(n / args.batch_size)
    rows = np.arange(min(args.batch_size, n))
    total = 0.0
    for name in args.models:
        width = args.teacher_width if name == "teacher" else args.student_width
        model = SparseLinearClassifier(data.num_features, width, data.num_labels).to(args.device)
        hidden = model.encode(data.X_train[rows])
        target = batch_targets(data.Y_train, rows, args.device)
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            loss = kdfast.fused_linear_distillation_loss(hidden, model.output.weight, target,
                                                         student_bias=model.output.bias)
            loss.backward(retain_graph=True)
            synchronize(args.device)
            times.append(time.perf_counter() - t0)
        per_step = min(times) * 1.3  # encode, optimizer, data
        epochs = args.teacher_epochs if name == "teacher" else args.student_epochs
        if name in ("student_kd", "student_dd") and args.teacher_signal == "on-the-fly":
            per_step *= 1 + 2 * args.teacher_width / args.student_width
        total += per_step * epochs * steps_per_epoch
    return total


def peak_memory(device: str) -> tuple[int, str]:
    """The process's peak memory so far in bytes, and what was measured."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS of the process (CPU)"


def estimate_run(data: Data, args: argparse.Namespace, log: Log, data_seconds: float) -> dict[str, Any]:
    """--estimate: the whole run's wall time and peak memory projected from timed pieces of it.

    Each model takes one warm-up and ``args.estimate_steps`` timed steps of its real training step
    (make_step: the same batch size, teacher signal and Adam) on random batches; its training is
    projected as the median step time times the run's steps. Evaluation and labeling are timed
    on one batch of rows (after a warm-up batch) and projected per row. The data's time is this
    run's (a cached data set loads in seconds). Measured on a 2-core EPYC at cpu scale: 4.7 min
    projected, 5.6 min run, every model's steps 10-20% slower in the run than timed here (the
    models here are untrained; a trained model's gradient filter could only make its steps faster)."""
    device = args.device
    n, n_test = data.X_train.shape[0], data.X_test.shape[0]
    steps_per_epoch = math.ceil(n / args.batch_size)
    rng = np.random.default_rng(model_seed(args.seed, "teacher", stream=1))
    batches = [np.sort(rng.permutation(n)[:args.batch_size]) for _ in range(args.estimate_steps + 1)]
    eval_rows = n_test + min(TRAIN_EVAL_ROWS, n)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)

    def per_row_seconds(fn: Callable[[np.ndarray], Any], X: sp.csr_matrix) -> float:
        # a warm-up batch, then one timed batch of up to LABEL_BATCH rows
        rows = np.arange(min(LABEL_BATCH, X.shape[0]))
        fn(rows)
        return timed(lambda: fn(rows), device) / max(len(rows), 1)

    models: dict[str, dict[str, Any]] = {}

    def estimate_model(name: str, model: SparseLinearClassifier, **signal: Any) -> None:
        step = make_step(name, model, data, args, **signal)
        step(batches[0])
        times = [timed(lambda rows=rows: step(rows), device) for rows in batches[1:]]
        epochs = args.teacher_epochs if name == "teacher" else args.student_epochs
        steps = epochs * steps_per_epoch
        per_step = float(np.median(times))
        eval_per_row = per_row_seconds(lambda rows: predict_topk(model, data.X_test[rows], max(KS)), data.X_test)
        models[name] = {"steps": steps, "timed_step_seconds": times, "seconds_per_step": per_step,
                        "train_seconds": per_step * steps, "eval_seconds": eval_per_row * eval_rows}
        log(f"  {MODEL_TITLES[name]}: {per_step:.3f} s per step (median of {len(times)}) x {steps:,} steps "
            f"= {duration(per_step * steps)} of training")

    log(f"estimate: {args.estimate_steps} timed step{'s' if args.estimate_steps > 1 else ''} per model after a "
        f"warm-up step, batches of {args.batch_size:,} points, {steps_per_epoch:,} steps per epoch")
    teacher = None
    if "teacher" in args.models:
        seed_model(args.seed, "teacher")
        teacher = SparseLinearClassifier(data.num_features, args.teacher_width, data.num_labels).to(device)
        estimate_model("teacher", teacher)
        teacher.eval()
        for param in teacher.parameters():
            param.requires_grad_(False)

    labeling_seconds = 0.0
    signal: dict[str, Any] = {}
    if {"student_kd", "student_dd"} & set(args.models):
        if args.teacher_labels is not None:
            signal = {"store": kdfast.LabelStore(args.teacher_labels)}
        elif args.teacher_signal == "on-the-fly":
            signal = {"teacher": teacher}
        else:
            def label(rows: np.ndarray) -> kdfast.TopK:
                with torch.no_grad():
                    return kdfast.teacher_topk(teacher.encode(data.X_train[rows]), teacher.output.weight,
                                               teacher.output.bias, k=args.teacher_k)

            labeling_seconds = per_row_seconds(label, data.X_train) * n
            log(f"  labeling: top-{args.teacher_k} of {n:,} training points, {duration(labeling_seconds)}")
            # the timed batches' labels, as the store would give them
            labels = {rows.tobytes(): label(rows) for rows in batches}
            signal = {"teacher_keywords": lambda rows: {"teacher_topk": labels[rows.tobytes()]}}

    for name in ("student", "student_kd", "student_dd"):
        if name in args.models:
            seed_model(args.seed, name)
            student = SparseLinearClassifier(data.num_features, args.student_width, data.num_labels).to(device)
            estimate_model(name, student, **(signal if name != "student" else {}))
            del student

    peak, peak_kind = peak_memory(device)
    train_s = sum(m["train_seconds"] for m in models.values())
    eval_s = sum(m["eval_seconds"] for m in models.values())
    total = data_seconds + train_s + eval_s + labeling_seconds
    log(f"projected wall time: {duration(total)} (data {duration(data_seconds)}, training {duration(train_s)}, "
        f"labeling {duration(labeling_seconds)}, evaluation {duration(eval_s)}); peak memory "
        f"{peak / 2**30:.2f} GiB ({peak_kind})")
    return {"models": models, "labeling_seconds": labeling_seconds, "data_seconds": data_seconds,
            "train_seconds": train_s, "eval_seconds": eval_s, "total_seconds": total,
            "peak_memory_bytes": peak, "peak_memory_kind": peak_kind}


def main(spec: DatasetSpec, argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(spec, argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision(args.matmul_precision)
    torch.manual_seed(args.seed)
    run_name = f"{args.scale if args.data is None else 'real'}-seed{args.seed}"
    out = args.out or REPO / "experiments" / "results" / spec.name / run_name
    out.mkdir(parents=True, exist_ok=True)
    log = Log()
    wall_start = time.perf_counter()
    log(f"Seed 003 Table 1 on {spec.title} — kdfast {kdfast.__version__}, torch {torch.__version__}, "
        f"commit {git_commit()}")
    log(f"device: {args.device} — {device_description(args.device)}")
    config = config_dict(args)
    log("configuration: " + json.dumps(config, sort_keys=True))

    data_start = time.perf_counter()
    data = load_data(spec, args, log)
    log(data.description)
    if args.estimate:
        estimate = estimate_run(data, args, log, time.perf_counter() - data_start)
        summary = {"dataset": spec.name, "data": data.description, "config": config,
                   "device": device_description(args.device), "commit": git_commit(), "torch": torch.__version__,
                   "kdfast": kdfast.__version__, "estimate": estimate}
        (out / "estimate.json").write_text(json.dumps(summary, indent=2, default=float))
        log.save(out / "log.txt")
        print(f"estimate in {out}")
        return summary
    inv_prop = inverse_propensity(data.Y_train, *spec.propensity)
    est = estimate_seconds(data, args)
    log(f"estimated training time: ~{est / 60:.1f} min for {len(args.models)} models "
        f"(plus data, labeling and evaluation)")

    results: dict[str, TrainResult] = {}
    teacher = None
    store = None

    def finish(result: TrainResult, model: SparseLinearClassifier) -> None:
        t0 = time.perf_counter()
        top = predict_topk(model, data.X_test, max(KS))
        result.metrics = evaluate(top, data.Y_test, inv_prop, ks=KS)
        rows = slice(0, min(TRAIN_EVAL_ROWS, data.X_train.shape[0]))
        result.train_metrics = evaluate(predict_topk(model, data.X_train[rows], max(KS)), data.Y_train[rows], ks=KS)
        result.eval_seconds = time.perf_counter() - t0
        results[result.name] = result
        m = result.metrics
        log(f"{MODEL_TITLES[result.name]}: P@1/3/5 = {m['P@1']:.4f} / {m['P@3']:.4f} / {m['P@5']:.4f}, "
            f"PSP@1/3/5 = {m['PSP@1']:.4f} / {m['PSP@3']:.4f} / {m['PSP@5']:.4f} "
            f"(train {result.seconds:.1f} s, eval {result.eval_seconds:.1f} s); on training points "
            f"P@1/3/5 = {result.train_metrics['P@1']:.4f} / {result.train_metrics['P@3']:.4f} / "
            f"{result.train_metrics['P@5']:.4f}")

    if "teacher" in args.models:
        log(f"[1/4] teacher (width {args.teacher_width}), {args.teacher_epochs} epochs")
        seed_model(args.seed, "teacher")
        teacher = SparseLinearClassifier(data.num_features, args.teacher_width, data.num_labels).to(args.device)
        finish(train_model("teacher", teacher, data, args, log, epochs=args.teacher_epochs), teacher)
        save_checkpoint(teacher, out / "teacher.pt", dataset=spec.name, seed=args.seed)
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)

    needs_teacher = {"student_kd", "student_dd"} & set(args.models)
    if needs_teacher and args.teacher_signal == "topk":
        if args.teacher_labels is not None:
            store = kdfast.LabelStore(args.teacher_labels)
            log(f"teacher signal: the label store {args.teacher_labels} ({len(store):,} rows, k = "
                f"{store.manifest['k']})")
        else:
            t0 = time.perf_counter()
            store = kdfast.label_dataset(teacher.encode, teacher.output.weight, data.X_train, out / "teacher_labels",
                                         bias=teacher.output.bias, k=args.teacher_k, batch_size=LABEL_BATCH,
                                         device=args.device, overwrite=True, progress=not args.no_progress)
            s = store.summary()
            log(f"teacher signal: top-{args.teacher_k} labels of the {len(store):,} training points in "
                f"{time.perf_counter() - t0:.1f} s; mean covered mass {s['mean_covered']:.3f} "
                f"(5th percentile {s['p5_covered']:.3f}), mean entropy {s['mean_entropy']:.3f}")
        if len(store) != data.X_train.shape[0]:
            raise ValueError(f"the label store has {len(store):,} rows but the training set {data.X_train.shape[0]:,}")
    elif needs_teacher:
        log("teacher signal: the trained teacher on the fly (its logits made tile by tile in the fused op)")

    for i, name in enumerate(("student", "student_kd", "student_dd"), start=2):
        if name not in args.models:
            continue
        log(f"[{i}/4] {MODEL_TITLES[name].lower()} (width {args.student_width}), {args.student_epochs} epochs")
        seed_model(args.seed, name)
        student = SparseLinearClassifier(data.num_features, args.student_width, data.num_labels).to(args.device)
        use_teacher = teacher if name != "student" and args.teacher_signal == "on-the-fly" else None
        use_store = store if name != "student" and args.teacher_signal == "topk" else None
        finish(train_model(name, student, data, args, log, epochs=args.student_epochs, teacher=use_teacher,
                           store=use_store), student)

    wall = time.perf_counter() - wall_start
    table = table_markdown(spec, results)
    orderings = paper_orderings(spec, results)
    log("")
    log(f"Seed 003 Table 1, {spec.title} (paper numbers beside ours):")
    log(table)
    log("")
    log("The paper's orderings:")
    for line in orderings:
        log(line)
    log(f"wall time {wall / 60:.1f} min")

    summary = {
        "dataset": spec.name, "data": data.description, "config": config, "device": device_description(args.device),
        "commit": git_commit(), "torch": torch.__version__, "kdfast": kdfast.__version__,
        "wall_seconds": wall, "paper": {k: list(v) for k, v in spec.paper.items()},
        "results": {k: {**asdict(v), "losses": v.losses[:: max(1, len(v.losses) // 200)]} for k, v in results.items()},
        "orderings": orderings,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=float))
    report = [
        f"# Seed 003 Table 1 — {spec.title}", "",
        f"- data: {data.description}".replace("\n", " "),
        (f"- device: {summary['device']}; commit `{summary['commit']}`; torch {torch.__version__}; "
         f"kdfast {kdfast.__version__}"),
        f"- configuration: `{json.dumps(config, sort_keys=True)}`",
        f"- command: `python {' '.join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:]))}`",
        f"- wall time: {wall / 60:.1f} min; per model (train / eval): "
        + ", ".join(f"{MODEL_TITLES[k]} {v.seconds:.0f} s / {v.eval_seconds:.0f} s" for k, v in results.items()),
        "", table, "",
        f"P@1 / P@5 on the first {min(TRAIN_EVAL_ROWS, data.X_train.shape[0]):,} training points (a teacher far "
        "above its test numbers has "
        "memorized them, and its labels there carry little beyond the hard labels): "
        + "; ".join(f"{MODEL_TITLES[k]} {v.train_metrics['P@1']:.4f} / {v.train_metrics['P@5']:.4f}"
                    for k, v in results.items()) + ".",
        "", "## The paper's orderings", "", *orderings, "",
        "Synthetic data cannot reproduce the paper's absolute numbers; the orderings are the claim under test."
        if args.data is None else "Real data: the absolute numbers are comparable to the paper's.",
        "", "![P@k: paper vs ours](pk.png)", "",
    ]
    (out / "report.md").write_text("\n".join(report))
    if results:
        bar_chart(spec, results, out / "pk.png")
    log.save(out / "log.txt")
    print(f"results in {out}")
    return summary
