"""Command line of kdfast: ``python -m kdfast SUBCOMMAND ...``.

Subcommands:

* ``label``: label a data set with a teacher checkpoint (:func:`kdfast.label_dataset`)::

      python -m kdfast label --teacher teacher.pt --data train.npz --out labels/ --k 32

  The checkpoint is a :class:`kdfast.models.SparseLinearClassifier` saved by
  :func:`kdfast.models.save_checkpoint`; the data a path read by :func:`kdfast.load_features`.
  Run it again to resume (``--batch-size`` can be left out: a store is resumed with its own); under
  ``torchrun`` the ranks share the shards.

Errors in the input (a missing file, a mismatched store, a bad ``--k``) end the command with
exit status 1 and a one-line message on stderr; argparse's usage errors exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m kdfast",
        description="kdfast: fused knowledge-distillation losses and teacher labeling for extreme label spaces.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    label = sub.add_parser(
        "label",
        help="label a data set with a teacher checkpoint (top-k logits, lse, entropy, covered mass)",
        description=(
            "Label every row of --data with the teacher in --teacher and write a resumable, checksummed "
            "label store to --out (read it with kdfast.LabelStore). Running the same command again "
            "resumes: complete shards are kept, missing or corrupted ones relabelled. Under torchrun the "
            "ranks label disjoint shards."
        ),
    )
    label.add_argument("--teacher", required=True, metavar="CKPT",
                       help="teacher checkpoint saved by kdfast.models.save_checkpoint")
    label.add_argument("--data", required=True, metavar="PATH",
                       help="features: .npy (dense, numpy.save), .npz (scipy.sparse.save_npz) or .txt (XMLRepo BoW, rows L2-normalized)")
    label.add_argument("--out", required=True, metavar="DIR", help="label store directory (created if missing)")
    label.add_argument("--k", type=_positive_int, default=32, help="classes kept per row (default: 32)")
    label.add_argument("--temperature", type=float, default=1.0,
                       help="temperature of lse, entropy and covered mass (default: 1)")
    label.add_argument("--batch-size", type=_positive_int, default=None,
                       help="rows per teacher_topk call (default: the store's own when --out holds one to resume, "
                            "else 4096); another value than the store's is refused")
    label.add_argument("--shard-rows", type=_positive_int, default=65536, help="rows per shard file (default: 65536)")
    label.add_argument("--device", default="cpu", help="device to label on (default: cpu)")
    label.add_argument("--overwrite", action="store_true",
                       help="replace a store in --out made with another teacher, data, k, temperature or sizes")
    label.add_argument("--no-progress", action="store_true", help="no progress bar and no summary line")
    label.set_defaults(func=_label)
    return parser


def _label(args: argparse.Namespace) -> int:
    import torch

    from .labeling import label_dataset
    from .models import load_checkpoint

    device = torch.device(args.device)
    model = load_checkpoint(args.teacher, map_location=device)
    label_dataset(
        model.encode,
        model.output.weight,
        args.data,
        args.out,
        bias=model.output.bias,
        k=args.k,
        temperature=args.temperature,
        batch_size=args.batch_size,
        shard_rows=args.shard_rows,
        device=device,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError, NotImplementedError, RuntimeError) as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"{parser.prog} {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
