"""kdfast: fused knowledge-distillation losses for extreme label spaces.

The ops are registered under ``torch.ops.kdfast`` by the C++ extension ``kdfast._C``;
this package adds the Python API around them.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import data, eigen, metrics, ops, reference, wide  # noqa: F401  (ops loads the extension and registers fakes/autograd)
from .eigen import EigenBasis, data_eigenbasis, eigenprojection, patch_eigenbasis
from .fused import FusedLinearDistillationLoss, LinearTeacher, default_filter_eps, fused_linear_distillation_loss
from .labeling import LabelStore, ShardVerificationError, label_dataset, load_features, teacher_topk
from .losses import DistillationLoss, distillation_loss
from .models import SparseLinearClassifier, load_checkpoint, model_fingerprint, save_checkpoint
from .targets import MultiTarget, TopK
from .wide import effective_student_logits

__all__ = [
    "DistillationLoss",
    "EigenBasis",
    "FusedLinearDistillationLoss",
    "LabelStore",
    "LinearTeacher",
    "MultiTarget",
    "ShardVerificationError",
    "SparseLinearClassifier",
    "TopK",
    "__version__",
    "data_eigenbasis",
    "default_filter_eps",
    "distillation_loss",
    "effective_student_logits",
    "eigen",
    "eigenprojection",
    "fused_linear_distillation_loss",
    "label_dataset",
    "load_checkpoint",
    "load_features",
    "model_fingerprint",
    "ops",
    "patch_eigenbasis",
    "reference",
    "save_checkpoint",
    "teacher_topk",
    "wide",
]
