"""kdfast: fused knowledge-distillation losses for extreme label spaces.

The ops are registered under ``torch.ops.kdfast`` by the C++ extension ``kdfast._C``;
this package adds the Python API around them.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import ops, reference  # noqa: F401  (ops loads the extension and registers fakes/autograd)
from .fused import FusedLinearDistillationLoss, LinearTeacher, default_filter_eps, fused_linear_distillation_loss
from .labeling import teacher_topk
from .losses import DistillationLoss, distillation_loss
from .targets import MultiTarget, TopK

__all__ = [
    "DistillationLoss",
    "FusedLinearDistillationLoss",
    "LinearTeacher",
    "MultiTarget",
    "TopK",
    "default_filter_eps",
    "distillation_loss",
    "fused_linear_distillation_loss",
    "ops",
    "reference",
    "teacher_topk",
    "__version__",
]
