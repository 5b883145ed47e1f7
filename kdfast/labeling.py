"""Batched teacher labeling: the fused top-k op.

:func:`teacher_topk` turns a teacher's hidden states and output layer into the
:class:`kdfast.TopK` the fused losses read, class tile by class tile, never
making the ``[B, V]`` logits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import ops
from .losses import _check_number, as_tensor
from .targets import TopK

__all__ = ["teacher_topk"]


def teacher_topk(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    k: int = 32,
    temperature: float = 1.0,
    tile_size: int | None = None,
) -> TopK:
    """Label a batch with a teacher's output layer: per row of ``logits = hidden @ weight.T + bias``,
    the ``k`` largest logits and their classes, and statistics of ``softmax(logits / temperature)``.

    Args:
        hidden: ``[B, d]`` teacher hidden states (float16, bfloat16, float32 or float64).
        weight: ``[V, d]`` teacher output weights, same dtype; ``bias``: ``[V]``.
        k: entries kept per row, ``1 <= k <= V``.
        temperature: the temperature of ``lse``, ``entropy`` and ``covered``.
        tile_size: classes per tile (default: from ``B`` and a per-thread memory budget).

    Returns:
        A :class:`kdfast.TopK` with ``indices`` ``[B, k]`` int64 (descending logit; ties to the
        lower class index, deterministic — ``indices[:, 0]`` is the hard label), ``logits``
        ``[B, k]`` (raw, not divided by the temperature), ``lse`` ``[B]`` = LSE(logits / T) over
        all classes, ``entropy`` ``[B]`` of softmax(logits / T) and ``covered`` ``[B]``, its mass
        inside the top-k. Values are float32 (float64 for float64 inputs). No gradient flows.
    """
    hidden = as_tensor(hidden, "hidden").detach()
    weight = as_tensor(weight, "weight").detach()
    bias = None if bias is None else as_tensor(bias, "bias").detach()
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    temperature = _check_number("temperature", temperature)
    if not hidden.is_floating_point():
        raise TypeError(f"hidden must be a floating-point tensor, got dtype {hidden.dtype}")
    if hidden.dim() != 2:
        raise ValueError(f"hidden must have shape [B, d], got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must have shape [V, d] with d = {hidden.shape[1]}, got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight has dtype {weight.dtype} but hidden has {hidden.dtype}")
    V = weight.shape[0]
    if not 1 <= k <= V:
        raise ValueError(f"k must be in [1, V = {V}], got {k}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if bias is not None:
        if bias.shape != (V,):
            raise ValueError(f"bias must have shape [V] = [{V}], got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias has dtype {bias.dtype} but hidden has {hidden.dtype}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    tile = 0 if tile_size is None else int(tile_size)
    if tile < 0:
        raise ValueError(f"tile_size must be positive, got {tile_size}")
    with torch.no_grad():
        indices, logits, lse, entropy, covered = ops.teacher_topk(hidden, weight, bias, k, temperature, tile)
    return TopK(indices, logits, lse, entropy, covered)
