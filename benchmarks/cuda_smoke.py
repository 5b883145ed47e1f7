"""Every kdfast op on CUDA at small odd shapes, compared with its CPU kernel; exit status 1 on a mismatch.

Made to run under compute-sanitizer (the memory pool off, so that memcheck sees each tensor's own
bounds; ``--kernel-name kns=kdfast`` instruments only kdfast's kernels, not cuBLAS's)::

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --kernel-name kns=kdfast \\
        python benchmarks/cuda_smoke.py
    compute-sanitizer --tool racecheck --kernel-name kns=kdfast python benchmarks/cuda_smoke.py --quick

What it calls (reduction="none" with a random upstream gradient, so that the backward sees
different values per row; every CUDA call is followed by a synchronize, so a fault is blamed on
the check that caused it):

* ``kdfast.distillation_loss`` forward + backward, float64, float32, bfloat16 and float16, for
  each term alone and all together (hard CE with label smoothing and ignored rows, soft KD at
  T = 2, double distillation with sigmoid and with one-minus-prob weights), and without a target;
* ``kdfast.fused_linear_distillation_loss`` forward + backward (grads of hidden, weight, bias),
  float32 and bfloat16, for each teacher form (none, dense logits, linear on the fly with a
  bias, ``kdfast.TopK``) and both target kinds (int64 with ignored rows, ``MultiTarget`` with
  an empty row), with the default class tile and with 128-class tiles (V = 1031: 8 full
  tiles and one of 7); plus exact=False, non-contiguous inputs, V smaller than a tile,
  and a batch whose every row is ignored; and (not with ``--quick``) each teacher form and
  target kind in float16 and in float32 with TF32 allowed (the fused kernels' tf32 products;
  tolerance 5e-3 against the CPU's exact float32);
* ``kdfast.teacher_topk`` float32 and bfloat16, k = 1, 7, 40 and k = V, with a bias, T = 1.5.

CUDA and CPU get the same values (drawn in float64, rounded once to the dtype). Tolerances
are on ``||cuda - cpu|| / ||cpu||``: 1e-10 float64, 1e-4 float32 (TF32 off), 5e-3 float16,
2e-2 bfloat16 (the CUDA backward rounds dL/dlogits to the input dtype for the tensor-core
GEMMs). Top-k indices may differ only where the true logits tie: the check compares the
float64 logits of the returned classes.

``--device cpu`` runs the same comparisons CPU against CPU: a check of this script, not of
any kernel.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable
from typing import Any

import torch

B, D_S, D_T, V = 37, 19, 45, 1031  # odd sizes: no dimension a multiple of a warp, a tile or a vector width
IGNORE = (3, 17, 30)  # rows whose int target is ignore_index
TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
DTYPE_NAMES = {torch.float64: "f64", torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
TF32_TOL = 5e-3  # float32 inputs with TF32 allowed, against exact float32 (tf32 keeps 10 mantissa bits)

DENSE_CONFIGS = {
    "hard": {"hard_weight": 1.0, "label_smoothing": 0.1},
    "soft": {"hard_weight": 0.0, "soft_weight": 1.0, "temperature": 2.0},
    "double-sigmoid": {"hard_weight": 0.0, "double_weight": 1.0, "negative_scale": 1.5, "negative_shift": 0.3},
    "double-omp": {"hard_weight": 0.0, "double_weight": 1.0, "negative_weighting": "one_minus_prob"},
    "all": {"hard_weight": 0.3, "soft_weight": 0.5, "double_weight": 0.2, "temperature": 3.0,
            "label_smoothing": 0.05},
}
FUSED_ALL = {"hard_weight": 0.3, "soft_weight": 0.5, "double_weight": 0.2, "temperature": 2.0,
             "negative_scale": 1.5, "negative_shift": 0.3}
FUSED_OMP = {"hard_weight": 0.3, "soft_weight": 0.5, "double_weight": 0.2, "temperature": 2.0,
             "negative_weighting": "one_minus_prob"}


class Checks:
    """The outcome of every check: one printed line each, and a count of failures."""

    def __init__(self) -> None:
        self.total = 0
        self.failed: list[str] = []

    def record(self, name: str, ok: bool, detail: str) -> None:
        self.total += 1
        if not ok:
            self.failed.append(name)
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """``||got - ref|| / ||ref||`` in float64; inf when ``got`` is not finite where ``ref`` is."""
    got, ref = got.detach().cpu().double(), ref.detach().cpu().double()
    if got.shape != ref.shape:
        return float("inf")
    finite = torch.isfinite(ref)
    if not torch.equal(torch.isfinite(got), finite):
        return float("inf")
    num = (got[finite] - ref[finite]).norm()
    den = ref[finite].norm()
    return float(num / den) if den > 0 else float(num)


def run_both(fn: Callable[[str], Any], device: str) -> tuple[Any, Any, str | None]:
    """``(fn("cpu"), fn(device), problem)``. If both raise the same exception type that is
    agreement (e.g. an unsupported combination refused on both); one raising is a problem."""
    out, errs = [], []
    for dev in ("cpu", device):
        try:
            out.append(fn(dev))
            if dev.startswith("cuda"):
                torch.cuda.synchronize()
            errs.append(None)
        except Exception as exc:  # noqa: BLE001  (a failing kernel is a failed check, not the end)
            out.append(None)
            errs.append(exc)
    if errs[0] is None and errs[1] is None:
        return out[0], out[1], None
    if errs[0] is not None and errs[1] is not None and type(errs[0]) is type(errs[1]):
        return None, None, f"both raise {type(errs[0]).__name__}"
    bad = errs[1] if errs[1] is not None else errs[0]
    where = device if errs[1] is not None else "cpu"
    if errs[1] is not None:
        traceback.print_exception(errs[1])
    return None, None, f"only {where} raises {type(bad).__name__}: {str(bad).strip().splitlines()[0][:200]}"


def compare(checks: Checks, name: str, pairs: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]],
            tol: float) -> None:
    """Record one check from ``{what: (cpu, device)}`` tensors: every relative error within ``tol``."""
    parts, ok = [], True
    for what, (ref, got) in pairs.items():
        if ref is None or got is None:  # every output compared here must exist (a gradient included)
            parts.append(f"{what} missing on {'cpu' if ref is None else 'device'}")
            ok = False
            continue
        e = rel_err(got, ref)
        ok &= e <= tol
        parts.append(f"{what} {e:.1e}")
    checks.record(name, ok, ", ".join(parts) + f" (tol {tol:g})")


def _randn(g: torch.Generator, *shape: int, s: float = 1.0) -> torch.Tensor:
    return s * torch.randn(*shape, generator=g, dtype=torch.float64)


# ---------------------------------------------------------------------------- distillation_loss


def dense_checks(checks: Checks, device: str, quick: bool) -> None:
    import kdfast

    g = torch.Generator().manual_seed(1)
    f64, s64 = _randn(g, B, V), _randn(g, B, V, s=2.0)
    target = torch.randint(0, V, (B,), generator=g)
    target[list(IGNORE)] = -100
    up = torch.rand(B, generator=g, dtype=torch.float64) + 0.5  # upstream gradient, one per row
    dtypes = (torch.float32, torch.bfloat16) if quick else (torch.float64, torch.float32, torch.bfloat16, torch.float16)
    configs = dict(DENSE_CONFIGS)
    configs["soft-no-target"] = {"hard_weight": 0.0, "soft_weight": 1.0, "temperature": 2.0, "_no_target": True}
    for dtype in dtypes:
        for cname, cfg in configs.items():
            kw = {k: v for k, v in cfg.items() if not k.startswith("_")}
            needs_teacher = kw.get("soft_weight", 0) > 0 or kw.get("double_weight", 0) > 0

            def run(dev: str, kw=kw, needs_teacher=needs_teacher, cfg=cfg, dtype=dtype):
                f = f64.to(dev, dtype, copy=True).requires_grad_(True)  # a fresh leaf, also for float64
                t = None if cfg.get("_no_target") else target.to(dev)
                s = s64.to(dev, dtype) if needs_teacher else None
                losses = kdfast.distillation_loss(f, t, s, reduction="none", **kw)
                (losses.double() * up.to(dev)).sum().backward()
                return losses.detach(), f.grad

            name = f"distillation_loss/{cname}/{DTYPE_NAMES[dtype]}"
            ref, got, problem = run_both(run, device)
            if problem:
                checks.record(name, problem.startswith("both"), problem)
                continue
            compare(checks, name, {"losses": (ref[0], got[0]), "grad": (ref[1], got[1])}, TOL[dtype])


# ---------------------------------------------------------------------- fused_linear_distillation_loss


def _fused_problem(seed: int, b: int, v: int) -> dict:
    """float64 values of one fused problem; rounded to the dtype per run."""
    g = torch.Generator().manual_seed(seed)
    p = {
        "h": _randn(g, b, D_S), "W": _randn(g, v, D_S, s=2.0 / D_S**0.5), "b": _randn(g, v, s=0.5),
        "th": _randn(g, b, D_T), "tW": _randn(g, v, D_T, s=2.0 / D_T**0.5), "tb": _randn(g, v, s=0.5),
        "s": _randn(g, b, v, s=2.0), "up": torch.rand(b, generator=g, dtype=torch.float64) + 0.5,
    }
    target = torch.randint(0, v, (b,), generator=g)
    target[[i for i in IGNORE if i < b]] = -100
    p["target"] = target
    rows = []
    for i in range(b):
        c = 0 if i == 1 else int(torch.randint(1, 5, (1,), generator=g))
        rows.append(sorted(torch.randperm(v, generator=g)[: min(c, v)].tolist()))
    p["multi"] = rows
    k = min(5, v)
    logits, idx = p["s"].topk(k, dim=1)
    perm = torch.argsort(torch.rand(b, k, generator=g), dim=1)  # any order within a row
    p["topk"] = (idx.gather(1, perm), logits.gather(1, perm), torch.logsumexp(p["s"], dim=1))
    return p


def _fused_run(p: dict, dev: str, dtype: torch.dtype, form: str | None, target_kind: str, cfg: dict,
               tile: int | None, exact: bool = True, noncontig: bool = False):
    """One fused forward + backward; returns (losses, grad hidden, grad weight, grad bias)."""
    import kdfast

    if noncontig:  # a column slice of a wider hidden, a transposed weight: the op must not assume strides
        hw = torch.cat([p["h"], p["h"][:, :3]], dim=1).to(dev, dtype)
        h = hw[:, : p["h"].shape[1]].detach().requires_grad_(True)
        W = p["W"].t().contiguous().to(dev, dtype).t().detach().requires_grad_(True)
    else:
        h = p["h"].to(dev, dtype, copy=True).requires_grad_(True)
        W = p["W"].to(dev, dtype, copy=True).requires_grad_(True)
    bias = p["b"].to(dev, dtype, copy=True).requires_grad_(True)
    if target_kind == "int":
        target = p["target"].to(dev)
    else:
        target = kdfast.MultiTarget.from_lists(p["multi"], device=dev)
    kw: dict = {}
    if form == "dense":
        kw["teacher_logits"] = p["s"].to(dev, dtype)
    elif form == "linear":
        kw.update(teacher_hidden=p["th"].to(dev, dtype), teacher_weight=p["tW"].to(dev, dtype),
                  teacher_bias=p["tb"].to(dev, dtype))
    elif form == "topk":
        idx, logits, lse = p["topk"]
        kw["teacher_topk"] = kdfast.TopK(idx.to(dev), logits.to(dev, dtype), lse.to(dev, dtype))
    losses = kdfast.fused_linear_distillation_loss(h, W, target, student_bias=bias, reduction="none", exact=exact,
                                                   tile_size=tile, **kw, **cfg)
    (losses.double() * p["up"].to(dev)).sum().backward()
    return losses.detach(), h.grad, W.grad, bias.grad


def fused_checks(checks: Checks, device: str, quick: bool) -> None:
    p = _fused_problem(2, B, V)
    tiles = (128,) if quick else (None, 128)
    for dtype in (torch.float32, torch.bfloat16):
        for form in (None, "dense", "linear", "topk"):
            cfgs = {"hard": {"hard_weight": 1.0, "label_smoothing": 0.1}} if form is None else {"all": FUSED_ALL}
            if form is not None and not quick:
                cfgs["omp"] = FUSED_OMP
            for target_kind in ("int", "multi"):
                for cname, cfg in cfgs.items():
                    for tile in tiles:
                        name = (f"fused/{form or 'no-teacher'}/{target_kind}/{cname}/{DTYPE_NAMES[dtype]}/"
                                f"tile={tile or 'default'}")
                        ref, got, problem = run_both(
                            lambda dev, d=dtype, f=form, t=target_kind, c=cfg, ti=tile: _fused_run(p, dev, d, f, t, c, ti),
                            device)
                        _record_fused(checks, name, ref, got, problem, TOL[dtype])
        # the default gradient filter (each at its dtype's eps: few entries of this problem are below it)
        name = f"fused/linear/int/all/{DTYPE_NAMES[dtype]}/exact=False"
        ref, got, problem = run_both(lambda dev, d=dtype: _fused_run(p, dev, d, "linear", "int", FUSED_ALL, None,
                                                                     exact=False), device)
        _record_fused(checks, name, ref, got, problem, TOL[dtype])
        name = f"fused/dense/multi/all/{DTYPE_NAMES[dtype]}/non-contiguous"
        ref, got, problem = run_both(lambda dev, d=dtype: _fused_run(p, dev, d, "dense", "multi", FUSED_ALL, 128,
                                                                     noncontig=True), device)
        _record_fused(checks, name, ref, got, problem, TOL[dtype])
    # fp16 (whose fused backward scales each gradient tile before rounding it) and float32 with TF32
    # allowed (the fused kernels' tf32 products, compared with exact float32 at TF32_TOL): each
    # teacher form once, both target kinds
    for dtype, tf32 in () if quick else ((torch.float16, False), (torch.float32, True)):
        for form in (None, "dense", "linear", "topk"):
            cfg = {"hard_weight": 1.0, "label_smoothing": 0.1} if form is None else FUSED_OMP
            for target_kind in ("int", "multi"):
                name = f"fused/{form or 'no-teacher'}/{target_kind}/{'tf32' if tf32 else DTYPE_NAMES[dtype]}"

                def run(dev, d=dtype, f=form, t=target_kind, c=cfg, tf32=tf32):
                    torch.backends.cuda.matmul.allow_tf32 = tf32 and dev != "cpu"
                    try:
                        return _fused_run(p, dev, d, f, t, c, None)
                    finally:
                        torch.backends.cuda.matmul.allow_tf32 = False

                ref, got, problem = run_both(run, device)
                _record_fused(checks, name, ref, got, problem, TF32_TOL if tf32 else TOL[dtype])
    # edge shapes: V below one tile, one row; and a batch with every row ignored
    small = _fused_problem(3, 1, 5)
    for form in ("linear", "topk"):
        name = f"fused/{form}/int/all/f32/B=1,V=5"
        ref, got, problem = run_both(lambda dev, f=form: _fused_run(small, dev, torch.float32, f, "int", FUSED_ALL,
                                                                    None), device)
        _record_fused(checks, name, ref, got, problem, TOL[torch.float32])
    ignored = dict(p, target=torch.full((B,), -100, dtype=torch.int64))
    ref, got, problem = run_both(lambda dev: _fused_run(ignored, dev, torch.float32, "linear", "int", FUSED_ALL, 128),
                                 device)
    _record_fused(checks, "fused/linear/int/all/f32/every-row-ignored", ref, got, problem, TOL[torch.float32])


def _record_fused(checks: Checks, name: str, ref, got, problem: str | None, tol: float) -> None:
    if problem:
        checks.record(name, problem.startswith("both"), problem)
        return
    compare(checks, name, {"losses": (ref[0], got[0]), "grad_h": (ref[1], got[1]), "grad_W": (ref[2], got[2]),
                           "grad_b": (ref[3], got[3])}, tol)


# ---------------------------------------------------------------------------------- teacher_topk


def topk_checks(checks: Checks, device: str, quick: bool) -> None:
    import kdfast

    g = torch.Generator().manual_seed(4)
    h64, W64, b64 = _randn(g, B, D_T), _randn(g, V, D_T, s=2.0 / D_T**0.5), _randn(g, V, s=0.5)
    cases = [(B, V, k, tile) for k in (1, 7, 40) for tile in ((128,) if quick else (None, 128))] + [(3, 5, 5, None)]
    for dtype in (torch.float32, torch.bfloat16):
        for b, v, k, tile in cases:
            h, W, bias = h64[:b].to(dtype), W64[:v].to(dtype), b64[:v].to(dtype)
            true = h.double() @ W.double().t() + bias.double()  # the logits of the rounded inputs

            def run(dev: str, h=h, W=W, bias=bias, k=k, tile=tile):
                return kdfast.teacher_topk(h.to(dev), W.to(dev), bias.to(dev), k=k, temperature=1.5, tile_size=tile)

            name = f"teacher_topk/{DTYPE_NAMES[dtype]}/B={b},V={v},k={k}/tile={tile or 'default'}"
            ref, got, problem = run_both(run, device)
            if problem:
                checks.record(name, problem.startswith("both"), problem)
                continue
            tol = TOL[dtype]
            idx = got.indices.cpu()
            valid = bool(((idx >= 0) & (idx < v)).all()) and all(len(set(r)) == k for r in idx.tolist())
            # a tie may come back in another order or as another class: compare the true logits of the classes
            gap = float((true.gather(1, idx.clamp(0, v - 1)) - true.gather(1, ref.indices)).abs().max())
            gap_ok = gap <= 1e-4 * float(true.abs().max())
            pairs = {"logits": (ref.logits, got.logits), "lse": (ref.lse, got.lse), "entropy": (ref.entropy, got.entropy),
                     "covered": (ref.covered, got.covered)}
            errs = {w: rel_err(gt, rf) for w, (rf, gt) in pairs.items()}
            ok = valid and gap_ok and all(e <= tol for e in errs.values())
            detail = ", ".join(f"{w} {e:.1e}" for w, e in errs.items())
            checks.record(name, ok, f"{detail}; indices {'valid' if valid else 'INVALID'}, "
                                    f"true-logit gap {gap:.1e} (tol {tol:g})")


# ---------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer combinations (128-class tiles only; for racecheck)")
    p.add_argument("--only", default="dense,fused,topk", help="comma-separated subset of dense,fused,topk")
    p.add_argument("--device", default="cuda", help="the device compared with the CPU (default cuda; "
                                                     "cpu: a self-check of this script)")
    args = p.parse_args(argv)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    if not only <= {"dense", "fused", "topk"}:
        p.error(f"--only: unknown {sorted(only - {'dense', 'fused', 'topk'})}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"cuda_smoke: no CUDA device (torch {torch.__version__}, built with CUDA {torch.version.cuda}, "
              "torch.cuda.is_available() is False): nothing was checked", file=sys.stderr)
        return 2
    try:
        import kdfast  # (registers the ops)
    except ImportError as exc:
        print(f"cuda_smoke: kdfast does not import ({exc}); build it first", file=sys.stderr)
        return 3
    if args.device.startswith("cuda"):
        missing = kdfast.ops.missing_cuda_kernels()
        if missing:
            print(f"cuda_smoke: kdfast has no CUDA kernel for {', '.join(missing)} (built without CUDA?)",
                  file=sys.stderr)
            return 3
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 is compared at float32 tolerances
        print(f"cuda_smoke: {torch.cuda.get_device_name()} · torch {torch.__version__} (CUDA {torch.version.cuda})")
    checks = Checks()
    for part, fn in (("dense", dense_checks), ("fused", fused_checks), ("topk", topk_checks)):
        if part in only:
            fn(checks, args.device, args.quick)
    print(f"\ncuda_smoke: {checks.total} checks, {len(checks.failed)} failed"
          + (": " + ", ".join(checks.failed[:20]) + (" ..." if len(checks.failed) > 20 else "") if checks.failed else ""))
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())
