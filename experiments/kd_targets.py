"""Why does distillation lose to the hard labels on the synthetic Amazon-670K? An ablation of the
distillation target (a follow-up to seed 003 Table 1, ``experiments/amazon670k.py``).

    python experiments/kd_targets.py                   # scale 'cpu', seed 0 (~20 min on 2 cores)
    python experiments/kd_targets.py --teacher-labels experiments/results/amazon670k/cpu-seed0/teacher_labels
    python experiments/kd_targets.py --scale tiny      # a CI smoke run

The Table 1 student trained on the teacher's probabilities ("student + distillation") ends far
below the student trained on the labels. Its loss per point is ``m KL(q || softmax(f)) =
m [LSE(f) - <q, f> - H(q)]`` with ``m`` the point's number of positives and ``q`` the teacher's
top-k probabilities; with ``q`` uniform over the point's positives this is the hard
pick-all-labels loss ``m LSE(f) - sum_y f_y`` less the constant ``m log m``: the same gradients.
So the two runs differ only in ``q``, and this script trains the same student on targets
between the two:

* ``uniform_pos``: 1/m on each positive (the hard-label student, written as a soft target);
* ``kd``: the teacher's top-k probabilities (the Table 1 distilled student);
* ``teacher_pos``: the teacher's probabilities restricted to the positives, renormalized (KD's
  weighting among the positives, nothing on negatives);
* ``pos_uniform_neg_teacher``: the teacher's probabilities, with the mass it gives the positives
  spread evenly over them (KD's mass on negatives, not its weighting among positives);
* ``mix``: half ``uniform_pos``, half ``kd``.

Every variant is the soft term of :func:`kdfast.fused_linear_distillation_loss` (T = 1) on dense
``[batch, labels]`` target logits ``log q``, with the labels' ``MultiTarget`` for the
multiplicity ``m`` and the mean over positives. Before training, the script checks on one batch
that ``uniform_pos`` gives the hard loss (less ``m log m``) and its gradients. Writes ``results.json``, ``report.md``, ``log.txt`` and
``pk.png`` under ``experiments/results/kd_targets/<scale>-seed<seed>/``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import xmc
from common import Log, config_dict, device_description, git_commit

import kdfast
from kdfast.metrics import evaluate, inverse_propensity
from kdfast.models import SparseLinearClassifier

VARIANTS = {
    "uniform_pos": "1/m on each positive (= the hard-label student)",
    "kd": "the teacher's top-k probabilities (= Table 1's distilled student)",
    "teacher_pos": "the teacher's probabilities on the positives only, renormalized",
    "pos_uniform_neg_teacher": "the teacher's, with its mass on the positives spread evenly over them",
    "mix": "half uniform_pos, half kd",
}
MAX_TARGET_ELEMENTS = 1 << 28  # the dense [batch, labels] float32 targets: 1 GiB


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, argparse.Namespace]:
    """This script's flags, and the Table 1 experiment's (data, widths, epochs, ...) for the rest."""
    p = argparse.ArgumentParser(
        description="Ablation of the distillation target on the synthetic Amazon-670K: which part of the "
        "teacher's soft labels costs accuracy. Other flags are those of experiments/amazon670k.py "
        "(--scale, --seed, --student-width, --student-epochs, --teacher-labels, ...).",
    )
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    ours, rest = p.parse_known_args(argv)
    variants = [v.strip() for v in ours.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        p.error(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    ours.variants = variants
    args = xmc.parse_args(xmc.AMAZON670K, rest)
    if args.kd_temperature != 1.0:
        p.error("--kd-temperature: the targets q are compared at T = 1 (the soft term trains on q itself)")
    if args.teacher_signal != "topk":
        p.error("--teacher-signal: the targets are built from a top-k label store; use topk")
    return ours, args


def positives_mask(Y: sp.csr_matrix, V: int) -> torch.Tensor:
    """The [rows, V] bool mask of each row's positives."""
    rows = torch.from_numpy(np.repeat(np.arange(Y.shape[0]), np.diff(Y.indptr)))
    mask = torch.zeros(Y.shape[0], V, dtype=torch.bool)
    mask[rows, torch.from_numpy(Y.indices.astype(np.int64))] = True
    return mask


def target_logits(variant: str, indices: torch.Tensor, logits: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """log q [rows, V] of a variant (-inf where q = 0) from the stored top-k and the positives."""
    p_top = torch.softmax(logits.float(), 1)  # renormalized over the stored k, as the fused op does
    t = torch.zeros(pos.shape).scatter_(1, indices, p_top)
    m = pos.sum(1, keepdim=True).clamp_min(1)
    if variant == "uniform_pos":
        q = pos / m
    elif variant == "kd":
        q = t
    elif variant == "teacher_pos":
        # a positive outside the stored top-k gets the smallest stored probability
        w = torch.where(pos, torch.maximum(t, p_top.min(1, keepdim=True).values), torch.zeros(()))
        q = w / w.sum(1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    elif variant == "pos_uniform_neg_teacher":
        mass = (t * pos).sum(1, keepdim=True)
        q = torch.where(pos, mass / m, t)
    elif variant == "mix":
        q = 0.5 * t + 0.5 * pos / m
    else:
        raise ValueError(f"unknown variant {variant!r}")
    return q.log()


def check_uniform_is_hard(data: xmc.Data, args: argparse.Namespace, store: kdfast.LabelStore, log: Log) -> str:
    """On one batch: the soft term with q uniform over the positives is the hard loss less the
    mean of m log m, with the same gradients."""
    torch.manual_seed(args.seed)
    model = SparseLinearClassifier(data.num_features, args.student_width, data.num_labels)
    rows = np.arange(min(args.batch_size, data.X_train.shape[0]))
    target = xmc.batch_targets(data.Y_train, rows, "cpu")
    idx, logits = store[rows][:2]
    q_logits = target_logits("uniform_pos", idx, logits, positives_mask(data.Y_train[rows], data.num_labels))
    params = list(model.parameters())

    def loss_and_grads(**terms):
        loss = kdfast.fused_linear_distillation_loss(model.encode(data.X_train[rows]), model.output.weight, target,
                                                     student_bias=model.output.bias, reduction="mean", **terms)
        return loss.detach(), torch.autograd.grad(loss, params)

    hard, hard_grads = loss_and_grads()
    soft, soft_grads = loss_and_grads(hard_weight=0.0, soft_weight=1.0, teacher_logits=q_logits)
    m = torch.from_numpy(np.diff(target.indptr.numpy())).double()
    entropy = float((m * m.clamp_min(1).log()).sum() / m.sum())  # mean over positives of log m
    grad_ok = all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(soft_grads, hard_grads))
    if not (abs(soft.item() + entropy - hard.item()) <= 1e-4 * abs(hard.item()) and grad_ok):
        raise RuntimeError(f"uniform_pos soft loss {soft.item():.6f} + {entropy:.6f} != hard loss {hard.item():.6f}"
                           f" or the gradients differ ({'equal' if grad_ok else 'different'})")
    line = (f"check: uniform_pos soft loss {soft.item():.6f} + mean log m {entropy:.6f} = hard pick-all-labels "
            f"loss {hard.item():.6f}, gradients equal")
    log(line)
    return line


def train_variant(variant: str, data: xmc.Data, args: argparse.Namespace, store: kdfast.LabelStore,
                  log: Log) -> tuple[SparseLinearClassifier, float, list[float]]:
    """The student (width args.student_width) trained as Table 1's distilled student (its loss,
    initialization, batches and optimizer) on one variant's targets."""
    xmc.seed_model(args.seed, "student_kd")  # the initialization of Table 1's distilled student
    model = SparseLinearClassifier(data.num_features, args.student_width, data.num_labels)

    def targets(rows: np.ndarray) -> dict:
        idx, logits = store[rows][:2]
        return {"teacher_logits": target_logits(variant, idx, logits,
                                                positives_mask(data.Y_train[rows], data.num_labels))}

    r = xmc.train_model("student_kd", model, data, args, log, epochs=args.student_epochs, teacher_keywords=targets)
    return model, r.seconds, r.losses


def bar_chart(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(9, 4))
    for j, k in enumerate(xmc.KS):
        ax.bar(x + (j - 1) * 0.27, [results[n]["metrics"][f"P@{k}"] for n in names], 0.27, label=f"P@{k}")
    ax.set_xticks(x, names, rotation=15)
    ax.set_ylabel("test precision")
    ax.set_title("Student trained on each distillation target (soft term only)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ours, args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device != "cpu":
        raise SystemExit("kd_targets.py runs on the CPU (dense [batch, labels] targets); pass --device cpu")
    out = args.out or xmc.REPO / "experiments" / "results" / "kd_targets" / f"{args.scale}-seed{args.seed}"
    out.mkdir(parents=True, exist_ok=True)
    log = Log()
    wall = time.perf_counter()
    log(f"Distillation-target ablation on the synthetic Amazon-670K — kdfast {kdfast.__version__}, "
        f"torch {torch.__version__}, commit {git_commit()}")
    data = xmc.load_data(xmc.AMAZON670K, args, log)
    log(data.description)
    if args.batch_size * data.num_labels > MAX_TARGET_ELEMENTS:
        raise SystemExit(f"--batch-size {args.batch_size} x {data.num_labels:,} labels of dense targets is over "
                         f"{MAX_TARGET_ELEMENTS:,} elements: use a smaller --batch-size or --scale")
    inv_prop = inverse_propensity(data.Y_train, *xmc.AMAZON670K.propensity)

    if args.teacher_labels is not None:
        store = kdfast.LabelStore(args.teacher_labels)
        log(f"teacher: the label store {args.teacher_labels} ({len(store):,} rows, k = {store.manifest['k']})")
    else:
        log(f"teacher (width {args.teacher_width}), {args.teacher_epochs} epochs, as in Table 1")
        xmc.seed_model(args.seed, "teacher")  # Table 1's teacher
        teacher = SparseLinearClassifier(data.num_features, args.teacher_width, data.num_labels)
        xmc.train_model("teacher", teacher, data, args, log, epochs=args.teacher_epochs)
        teacher.eval()
        store = kdfast.label_dataset(teacher.encode, teacher.output.weight, data.X_train, out / "teacher_labels",
                                     bias=teacher.output.bias, k=args.teacher_k, batch_size=4096, overwrite=True,
                                     progress=not args.no_progress)
    if len(store) != data.X_train.shape[0]:
        raise ValueError(f"the label store has {len(store):,} rows but the training set {data.X_train.shape[0]:,}")
    check = check_uniform_is_hard(data, args, store, log)

    results: dict[str, dict] = {}
    train_rows = slice(0, min(xmc.TRAIN_EVAL_ROWS, data.X_train.shape[0]))
    for variant in ours.variants:
        log(f"{variant}: {VARIANTS[variant]}")
        model, seconds, losses = train_variant(variant, data, args, store, log)
        metrics = evaluate(xmc.predict_topk(model, data.X_test, max(xmc.KS)), data.Y_test, inv_prop, ks=xmc.KS)
        train = evaluate(xmc.predict_topk(model, data.X_train[train_rows], max(xmc.KS)), data.Y_train[train_rows],
                         ks=xmc.KS)
        results[variant] = {"metrics": metrics, "train_metrics": train, "seconds": seconds,
                            "losses": losses[:: max(1, len(losses) // 200)]}
        log(f"  test P@1/3/5 = {metrics['P@1']:.4f} / {metrics['P@3']:.4f} / {metrics['P@5']:.4f}, "
            f"PSP@1 {metrics['PSP@1']:.4f}; training points P@1/5 = {train['P@1']:.4f} / {train['P@5']:.4f}")

    rows = [f"| {v} | {VARIANTS[v]} | {r['metrics']['P@1']:.4f} / {r['metrics']['P@3']:.4f} / "
            f"{r['metrics']['P@5']:.4f} | {r['metrics']['PSP@1']:.4f} | {r['train_metrics']['P@1']:.4f} / "
            f"{r['train_metrics']['P@5']:.4f} |" for v, r in results.items()]
    table = "\n".join(["| target | q | test P@1 / P@3 / P@5 | test PSP@1 | train P@1 / P@5 |",
                       "|---|---|---|---|---|", *rows])
    comparisons = []
    if "uniform_pos" in results:
        base = results["uniform_pos"]["metrics"]["P@1"]
        comparisons = [f"- {v}: test P@1 {r['metrics']['P@1'] - base:+.4f} against uniform_pos"
                       for v, r in results.items() if v != "uniform_pos"]
    log("")
    log(table)
    for line in comparisons:
        log(line)
    minutes = (time.perf_counter() - wall) / 60
    log(f"wall time {minutes:.1f} min")

    config = config_dict(args)
    summary = {"data": data.description, "config": config, "variants": ours.variants, "check": check,
               "device": device_description("cpu"), "commit": git_commit(), "wall_minutes": minutes,
               "results": results}
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=float))
    report = ["# Distillation-target ablation — synthetic Amazon-670K", "",
              f"- data: {data.description}".replace("\n", " "),
              f"- device: {summary['device']}; commit `{summary['commit']}`; wall time {minutes:.1f} min",
              f"- configuration: `{json.dumps(config, sort_keys=True)}`", f"- {check}", "",
              ("The same student (Table 1's width, epochs, learning rate and initialization) trained on the soft "
              "term only, `m KL(q || softmax(f))` per point, for each target q:"), "", table, "", *comparisons, "",
              "![P@k by target](pk.png)", ""]
    (out / "report.md").write_text("\n".join(report))
    log.save(out / "log.txt")
    bar_chart(results, out / "pk.png")
    print(f"results in {out}")
    return summary


if __name__ == "__main__":
    main()
