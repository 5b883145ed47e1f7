"""Models of the experiments, and their checkpoints.

:class:`SparseLinearClassifier` is the teacher / student architecture of seed 003 (Menon et
al. 2020, extreme classification): sparse bag-of-words features -> a linear hidden layer ->
a linear output layer over all classes. The experiment scripts train it, save it with
:func:`save_checkpoint`, and ``python -m kdfast label`` loads it with :func:`load_checkpoint`
to label a data set with :func:`kdfast.label_dataset`.

Checkpoint format (``torch.save`` of a plain dict, read back with ``weights_only=True``)::

    {
        "format": "kdfast.SparseLinearClassifier/1",
        "config": {"num_features": int, "hidden_dim": int, "num_classes": int, "bias": bool},
        "state_dict": {name: tensor},      # model.state_dict()
        "metadata": {...},                 # JSON-serializable keywords given to save_checkpoint
    }

:func:`model_fingerprint` is the sha256 of a model's parameters (the teacher fingerprint of a
label store).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CHECKPOINT_FORMAT",
    "SparseLinearClassifier",
    "load_checkpoint",
    "model_fingerprint",
    "save_checkpoint",
    "tensor_bytes",
]

CHECKPOINT_FORMAT = "kdfast.SparseLinearClassifier/1"


def _is_scipy_sparse(x: Any) -> bool:
    try:
        import scipy.sparse as sp
    except ImportError:  # pragma: no cover - scipy is a dependency
        return False
    return sp.issparse(x)


class SparseLinearClassifier(nn.Module):
    """Sparse features -> linear hidden layer of width ``hidden_dim`` -> linear output layer.

    ``hidden = x @ H + c`` is made by an ``nn.EmbeddingBag(num_features, hidden_dim, mode="sum")``
    (``self.hidden``; ``H`` is ``self.hidden.weight`` ``[num_features, hidden_dim]``) fed the
    nonzeros of each row as ``per_sample_weights``, plus ``self.hidden_bias`` ``[hidden_dim]``;
    the output layer ``self.output`` is an ``nn.Linear(hidden_dim, num_classes)``. There is no
    nonlinearity (seed 003: "a linear hidden layer"). ``bias=False`` drops both biases.

    ``self.output.weight`` / ``self.output.bias`` are the teacher's output layer for
    :func:`kdfast.teacher_topk`, :func:`kdfast.label_dataset` (with ``encoder=model.encode``)
    and the on-the-fly teacher of :func:`kdfast.fused_linear_distillation_loss`.

    The hidden weights start as ``N(0, 1 / hidden_dim)``, so a row of unit L2 norm (tf-idf rows
    are L2-normalized) gets hidden states of about unit norm; the output layer has
    ``nn.Linear``'s initialization.
    """

    def __init__(self, num_features: int, hidden_dim: int, num_classes: int, bias: bool = True) -> None:
        super().__init__()
        for name, value in (("num_features", num_features), ("hidden_dim", hidden_dim), ("num_classes", num_classes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.num_features = num_features
        self.hidden_dim = hidden_dim
        self.num_classes = num_classes
        self.has_bias = bool(bias)
        self.hidden = nn.EmbeddingBag(num_features, hidden_dim, mode="sum")
        nn.init.normal_(self.hidden.weight, std=hidden_dim**-0.5)
        self.hidden_bias = nn.Parameter(torch.zeros(hidden_dim)) if bias else None
        self.output = nn.Linear(hidden_dim, num_classes, bias=bias)
        self.metadata: dict[str, Any] = {}

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments (what a checkpoint stores to rebuild the model)."""
        return {
            "num_features": self.num_features,
            "hidden_dim": self.hidden_dim,
            "num_classes": self.num_classes,
            "bias": self.has_bias,
        }

    def encode(self, features: Any) -> Tensor:
        """Hidden states ``[b, hidden_dim]`` of a batch of feature rows ``[b, num_features]``.

        ``features``: a ``scipy.sparse`` matrix (any format; CSR is used as is), a torch sparse
        CSR or COO tensor, or a dense tensor / numpy array. Values are cast to the model's dtype
        and moved to its device.
        """
        weight = self.hidden.weight
        if _is_scipy_sparse(features):
            csr = features.tocsr()
            self._check_columns(csr.shape)
            crow = torch.from_numpy(np.asarray(csr.indptr, dtype=np.int64))
            col = torch.from_numpy(np.asarray(csr.indices, dtype=np.int64))
            values = torch.from_numpy(np.asarray(csr.data))
            hidden = self._bag(crow, col, values)
        elif isinstance(features, Tensor) and features.layout in (torch.sparse_coo, torch.sparse_csr):
            self._check_columns(features.shape)
            if features.layout == torch.sparse_coo:
                features = features.coalesce().to_sparse_csr()
            hidden = self._bag(features.crow_indices(), features.col_indices(), features.values())
        else:
            if not isinstance(features, Tensor):
                features = torch.as_tensor(np.asarray(features))
            if features.layout != torch.strided:
                raise TypeError(f"features: unsupported tensor layout {features.layout}")
            if features.dim() != 2:
                raise ValueError(f"features must be 2-D [b, num_features], got shape {tuple(features.shape)}")
            self._check_columns(features.shape)
            hidden = features.to(device=weight.device, dtype=weight.dtype) @ weight
        if self.hidden_bias is not None:
            hidden = hidden + self.hidden_bias
        return hidden

    def _check_columns(self, shape: Any) -> None:
        if len(shape) != 2:
            raise ValueError(f"features must be 2-D [b, num_features], got shape {tuple(shape)}")
        if shape[1] != self.num_features:
            raise ValueError(
                f"features have {shape[1]} columns but the model takes num_features = {self.num_features}"
            )

    def _bag(self, crow: Tensor, col: Tensor, values: Tensor) -> Tensor:
        weight = self.hidden.weight
        crow = crow.to(device=weight.device, dtype=torch.int64)
        col = col.to(device=weight.device, dtype=torch.int64)
        values = values.to(device=weight.device, dtype=weight.dtype)
        if crow.numel() <= 1:  # no rows
            return weight.new_zeros(0, self.hidden_dim)
        # offsets = row starts; include_last_offset makes the last bag end at crow[-1]
        return F.embedding_bag(
            col, weight, crow, mode="sum", per_sample_weights=values, include_last_offset=True
        )

    def forward(self, features: Any) -> Tensor:
        """Logits ``[b, num_classes]`` — only for a small number of classes: at large ``V`` use
        :meth:`encode` with the fused ops (:func:`kdfast.teacher_topk`,
        :func:`kdfast.fused_linear_distillation_loss`), which never make the ``[b, V]`` logits."""
        return self.output(self.encode(features))

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config.items())


def tensor_bytes(t: Tensor) -> memoryview:
    """The raw bytes of a tensor's elements in row-major order (host byte order, which is
    little-endian on every platform torch supports)."""
    t = t.detach()
    if t.layout != torch.strided:
        raise TypeError(f"cannot fingerprint a tensor with layout {t.layout}")
    flat = t.cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def _hash_tensor(h: Any, name: str, t: Tensor) -> None:
    h.update(f"{name}\0{str(t.dtype).removeprefix('torch.')}\0{list(t.shape)}\0".encode())
    h.update(tensor_bytes(t))


def model_fingerprint(model: nn.Module | Mapping[str, Tensor]) -> str:
    """sha256 (hex) of a model's ``state_dict`` (or of a given state dict).

    For every key in sorted order it hashes ``"{key}\\0{dtype}\\0{shape as a list}\\0"`` (UTF-8),
    then the tensor's raw bytes (row-major, little-endian), after the prefix
    ``b"kdfast.model_fingerprint/1\\0"``. Equal parameters give equal fingerprints whatever the
    device or the model object; any change of a value, dtype, shape or name changes it.
    """
    state = model.state_dict() if isinstance(model, nn.Module) else model
    h = hashlib.sha256(b"kdfast.model_fingerprint/1\0")
    for key in sorted(state):
        value = state[key]
        if not isinstance(value, Tensor):
            raise TypeError(f"state_dict entry {key!r} is a {type(value).__name__}, not a tensor")
        _hash_tensor(h, key, value)
    return h.hexdigest()


def save_checkpoint(model: SparseLinearClassifier, path: str | os.PathLike, **metadata: Any) -> None:
    """Save ``model`` to ``path`` in the format of the module docstring (atomically: a temporary
    file in the same directory, fsynced, then renamed). ``metadata`` must be JSON-serializable
    (plain numbers, strings, lists, dicts): training settings, data set, metrics."""
    if not isinstance(model, SparseLinearClassifier):
        raise TypeError(f"model must be a kdfast.models.SparseLinearClassifier, got {type(model).__name__}")
    try:
        json.dumps(metadata)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"checkpoint metadata must be JSON-serializable: {exc}") from None
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {"format": CHECKPOINT_FORMAT, "config": model.config, "state_dict": state, "metadata": metadata}
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> SparseLinearClassifier:
    """Load a checkpoint written by :func:`save_checkpoint`: the model (in eval mode, on
    ``map_location``) with the saved metadata in ``model.metadata``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"teacher checkpoint {path!r} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001  (torch raises many kinds of errors on a non-checkpoint file)
        raise ValueError(f"{path!r} is not a kdfast checkpoint (torch.load failed: {exc})".splitlines()[0]) from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{path!r} is not a {CHECKPOINT_FORMAT} checkpoint (format: {found!r})")
    config = payload["config"]
    model = SparseLinearClassifier(
        int(config["num_features"]), int(config["hidden_dim"]), int(config["num_classes"]), bias=bool(config["bias"])
    )
    model.load_state_dict(payload["state_dict"])
    model.metadata = dict(payload.get("metadata") or {})
    return model.to(map_location).eval()
