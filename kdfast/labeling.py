"""Batched teacher labeling: the fused top-k op, the labeling pipeline and its store.

:func:`teacher_topk` turns a teacher's hidden states and output layer into the
:class:`kdfast.TopK` the fused losses read, class tile by class tile, never
making the ``[B, V]`` logits.

:func:`label_dataset` runs it over a whole data set and writes a *label store*;
:class:`LabelStore` reads one back (``python -m kdfast label`` is the command line).

The store (format ``kdfast.LabelStore/1``) is a directory holding

* ``shard-00000.npy``, ``shard-00001.npy``, ...: shard ``i`` holds rows
  ``[i * shard_rows, min(N, (i + 1) * shard_rows))``, one ``.npy`` file (format 1.0) per shard
  with a structured array of one record per row::

      indices int64[k]  logits <dtype>[k]  lse <dtype>  entropy <dtype>  covered <dtype>

  (``<dtype>`` little-endian float32, or float64 for a float64 teacher), readable by
  ``numpy.load(path, mmap_mode="r")`` — ``a["indices"]`` is the ``[rows, k]`` index array;
* ``manifest.json`` (sorted keys, 2-space indent): ``format``, ``kdfast_version``, ``complete``,
  ``rows``, ``k``, ``temperature``, ``dtype``, ``index_dtype``, ``num_classes``, ``hidden_dim``,
  ``shard_rows``, ``batch_size``, ``num_shards``, ``teacher_fingerprint`` (see
  :func:`teacher_fingerprint`), ``feature_fingerprint`` (shape, dtype and a sampled sha256,
  see ``_Features.fingerprint``), ``shards`` (``file``, ``start``, ``rows``, ``sha256`` of the
  whole file), ``summary`` (``mean_covered``, ``p5_covered``, ``mean_entropy`` over the rows whose
  ``covered`` and ``entropy`` are finite, ``null`` when none are, and ``nonfinite_rows``, the number
  of the others) and ``shard_format``. It is strict JSON (no ``NaN``/``Infinity``) and holds no time
  stamp, host or path: equal inputs give equal bytes.

While labeling runs, ``manifest.json`` says ``"complete": false`` and each finished shard has a
``shard-XXXXX.npy.sha256`` record beside it (``sha256sum`` format); rank 0 writes the final
manifest at the end and removes the records.

Atomicity: every file is written to a temporary name in the store (``.NAME.tmp-PID``), flushed,
fsynced, renamed over its final name with ``os.replace`` and the directory fsynced, so a file is
only ever absent, old or complete; a shard's checksum record is written after the shard, and
the final manifest after every record. A run killed at any moment leaves complete shards (with
or without their record), temporary files and an in-progress manifest; the next run removes
the temporary files, keeps exactly the shards whose sha256 matches their record (or the
manifest) and relabels the others.

Determinism: :func:`teacher_topk` is deterministic for a fixed number of torch threads (the
class tiles are split among threads and their partial sums folded in tile order, so the thread
count changes the last bits of ``lse``/``entropy``/``covered``), a fixed batch size (the tile size
and the GEMM depend on it), the same device and the same BLAS (for a bf16 teacher on the CPU,
the same GEMM path too: :func:`kdfast.ops.cpu_bf16_gemm_status`). Rows are labelled in batches of
``batch_size`` starting at each shard's first row, whatever the rank count and whichever shards a
resumed run redoes; ``batch_size`` is part of the manifest and a store is resumed with its own
(``batch_size=None``, the default, takes it from the manifest; another value is refused).
So a store is byte-identical across interruptions and rank counts when every process uses the
same torch thread count (``torchrun`` sets ``OMP_NUM_THREADS=1`` in its workers unless it is set:
set it yourself to compare against a single-process run).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import __version__, ops
from ._checks import check_int, check_real, check_tile_size, is_integral
from .losses import as_tensor
from .models import _hash_tensor, model_fingerprint, tensor_bytes
from .targets import TOPK_TENSOR_FIELDS, TopK

__all__ = [
    "LabelStore",
    "LabelStoreError",
    "ShardVerificationError",
    "label_dataset",
    "load_features",
    "teacher_fingerprint",
    "teacher_topk",
]


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
        k: entries kept per row, an int (numpy integers too) with ``1 <= k <= V`` (and ``k <= 2048``
            on CUDA).
        temperature: the temperature of ``lse``, ``entropy`` and ``covered`` (any real number > 0,
            numpy scalars included).
        tile_size: classes per tile, an int ``>= 0``; ``None`` or 0: the default, from ``B`` and a
            per-thread memory budget. (CUDA's fused kernel, for bf16 / fp16 inputs and for float32
            ones where torch allows TF32: tiles of 128 classes.)

    Returns:
        A :class:`kdfast.TopK` with ``indices`` ``[B, k]`` int64 (descending logit; ties to the
        lower class index, deterministic — ``indices[:, 0]`` is the hard label), ``logits``
        ``[B, k]`` (raw, not divided by the temperature), ``lse`` ``[B]`` = LSE(logits / T) over
        all classes, ``entropy`` ``[B]`` of softmax(logits / T) and ``covered`` ``[B]``, its mass
        inside the top-k. Values are float32 (float64 for float64 inputs). No gradient flows.

    bf16 inputs on a CPU with AMX take MKL's bf16 x bf16 -> float32 GEMM (same logits as float32
    GEMMs of the upcast inputs; :func:`kdfast.ops.cpu_bf16_gemm_status`): label a large set with
    the teacher in bf16 there.
    """
    hidden = as_tensor(hidden, "hidden").detach()
    weight = as_tensor(weight, "weight").detach()
    bias = None if bias is None else as_tensor(bias, "bias").detach()
    k = check_int("k", k)
    temperature = check_real("temperature", temperature)
    tile = check_tile_size(tile_size)
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
    with torch.no_grad():
        indices, logits, lse, entropy, covered = ops.teacher_topk(hidden, weight, bias, k, temperature, tile)
    return TopK(indices, logits, lse, entropy, covered, temperature)


# ---------------------------------------------------------------------------------------------
# The labeling pipeline: label_dataset -> a sharded, checksummed label store -> LabelStore
# ---------------------------------------------------------------------------------------------

STORE_FORMAT = "kdfast.LabelStore/1"
MANIFEST = "manifest.json"
_SHARD_RE = re.compile(r"^shard-(\d{5,})\.npy$")
_SIDECAR_RE = re.compile(r"^shard-(\d{5,})\.npy\.sha256$")
_TMP_RE = re.compile(r"^\.(manifest\.json|shard-\d{5,}\.npy(\.sha256)?)\.tmp-\d+$")
_FINGERPRINT_SAMPLE_ROWS = 1024
DEFAULT_BATCH_SIZE = 4096  # label_dataset's batch size for a store it does not resume
_RELABEL_HINT = (
    "rerun kdfast.label_dataset(...) or `python -m kdfast label ... --out {out_dir}` with the same arguments: "
    "it relabels only the shards that are missing or fail verification"
)


class LabelStoreError(ValueError):
    """A label store directory that cannot be used as asked (incomplete, foreign, mismatched)."""


class ShardVerificationError(LabelStoreError):
    """A shard of a label store is missing, or its sha256 differs from the manifest's."""


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.npy"


def _shard_dtype(k: int, value_dtype: str) -> np.dtype:
    v = np.dtype(value_dtype).newbyteorder("<")
    return np.dtype(
        [("indices", "<i8", (k,)), ("logits", v, (k,)), ("lse", v), ("entropy", v), ("covered", v)]
    )


# ---- features ---------------------------------------------------------------------------------


def load_features(path: str | os.PathLike) -> np.ndarray | Any:
    """Read a feature matrix ``[N, D]`` from a file, by extension.

    * ``.npy``: a dense 2-D array saved with ``numpy.save`` (memory-mapped, read lazily);
    * ``.npz``: a ``scipy.sparse`` matrix saved with ``scipy.sparse.save_npz`` (returned as CSR);
    * ``.txt``: an Extreme Classification Repository bag-of-words file (``train.txt``), read by
      :func:`kdfast.data.read_xmlrepo`; its rows are L2-normalized, as the experiment scripts
      train on them (the labels in the file are not used).

    This is the one place that maps a file to features.
    """
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".npy", ".npz", ".txt"):
        raise ValueError(
            f"cannot read features from {path!r}: unknown extension {ext or '(none)'!r}; supported: "
            ".npy (a dense array saved with numpy.save), .npz (a scipy.sparse matrix saved with scipy.sparse.save_npz), "
            ".txt (an XMLRepo bag-of-words file)"
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(f"features file {path!r} does not exist")
    if ext == ".txt":
        from .data import l2_normalize, read_xmlrepo

        return l2_normalize(read_xmlrepo(path)[0])
    if ext == ".npy":
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as exc:
            raise ValueError(f"cannot read features from {path!r}: {exc}") from None
        if array.ndim != 2:
            raise ValueError(f"features in {path!r} must be a 2-D array [N, D], got shape {array.shape}")
        return array
    import scipy.sparse as sp

    try:
        matrix = sp.load_npz(path)
    except (ValueError, KeyError, OSError) as exc:
        raise ValueError(
            f"cannot read features from {path!r}: not a scipy.sparse matrix saved with scipy.sparse.save_npz ({exc})"
        ) from None
    return matrix.tocsr()


class _Features:
    """Row batches of a dense array/tensor or a CSR matrix, as torch tensors on a device."""

    def __init__(self, features: Any) -> None:
        import scipy.sparse as sp

        self.source = None
        if isinstance(features, (str, os.PathLike)):
            self.source = os.fspath(features)
            features = load_features(features)
        if isinstance(features, Tensor) and features.layout in (torch.sparse_csr, torch.sparse_coo):
            t = features.detach().cpu()
            t = t.coalesce().to_sparse_csr() if t.layout == torch.sparse_coo else t
            features = sp.csr_matrix(
                (t.values().numpy(), t.col_indices().numpy(), t.crow_indices().numpy()), shape=tuple(t.shape)
            )
        if sp.issparse(features):
            self.kind = "csr"
            self.data = features.tocsr()
        elif isinstance(features, Tensor):
            if features.layout != torch.strided:
                raise TypeError(f"features: unsupported tensor layout {features.layout}")
            self.kind = "dense"
            self.data = features.detach()
        elif isinstance(features, np.ndarray):
            self.kind = "dense"
            self.data = features
        else:
            raise TypeError(
                "features must be a dense torch.Tensor or numpy array, a scipy.sparse CSR matrix, or a path "
                f"(.npy / .npz), got {type(features).__name__}"
            )
        if len(self.data.shape) != 2:
            raise ValueError(f"features must be 2-D [N, D], got shape {tuple(self.data.shape)}")
        self.rows, self.cols = (int(s) for s in self.data.shape)
        if self.kind == "dense" and isinstance(self.data, np.ndarray) and self.data.dtype.kind not in "fiub":
            raise TypeError(f"features must be numeric, got dtype {self.data.dtype}")

    def batch(self, start: int, stop: int, device: torch.device, dense: bool = False) -> Tensor:
        """Rows ``[start, stop)``: a strided tensor for dense features, a sparse CSR tensor for
        CSR features (dense when ``dense``)."""
        if self.kind == "dense":
            if isinstance(self.data, Tensor):
                x = self.data[start:stop]
            else:  # in native byte order: torch reads no other (a big-endian .npy, say)
                native = self.data.dtype.newbyteorder("=")
                x = torch.from_numpy(np.array(self.data[start:stop], dtype=native, copy=True))
            if not x.is_floating_point():
                x = x.float()
            return x.to(device)
        m = self.data
        lo, hi = int(m.indptr[start]), int(m.indptr[stop])
        crow = torch.from_numpy(np.asarray(m.indptr[start : stop + 1], dtype=np.int64) - lo)
        col = torch.from_numpy(np.asarray(m.indices[lo:hi], dtype=np.int64))
        val = torch.from_numpy(np.array(m.data[lo:hi], dtype=m.data.dtype.newbyteorder("="), copy=True))
        if not val.is_floating_point():
            val = val.float()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            # torch 2.11 warns of the skipped checks even when check_invariants=False asks for it
            warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
            x = torch.sparse_csr_tensor(crow, col, val, size=(stop - start, self.cols), check_invariants=False)
            if dense:
                x = x.to_dense()
        return x.to(device)

    def fingerprint(self) -> dict[str, Any]:
        """``{"kind", "shape", "dtype", ["nnz",] "sample_sha256"}``: the sha256 covers, for CSR,
        all of ``indptr`` (as int64) and then, for up to 1024 evenly spaced rows, their column
        indices (int64) and values (raw bytes); for dense features the raw bytes of those rows.
        The same data given in memory or as a file have the same fingerprint."""
        n = self.rows
        sample = np.unique(np.linspace(0, n - 1, min(n, _FINGERPRINT_SAMPLE_ROWS)).round().astype(np.int64))
        h = hashlib.sha256(b"kdfast.feature_fingerprint/1\0")
        out: dict[str, Any] = {"kind": self.kind, "shape": [self.rows, self.cols]}
        if self.kind == "csr":
            m = self.data
            out["dtype"] = str(m.data.dtype)
            out["nnz"] = int(m.nnz)
            h.update(np.ascontiguousarray(m.indptr, dtype="<i8").tobytes())
            for r in sample.tolist():
                lo, hi = int(m.indptr[r]), int(m.indptr[r + 1])
                h.update(np.ascontiguousarray(m.indices[lo:hi], dtype="<i8").tobytes())
                h.update(np.ascontiguousarray(m.data[lo:hi]).tobytes())
        elif isinstance(self.data, Tensor):
            out["dtype"] = str(self.data.dtype).removeprefix("torch.")
            h.update(tensor_bytes(self.data[torch.from_numpy(sample).to(self.data.device)]))
        else:
            out["dtype"] = str(self.data.dtype)
            h.update(np.ascontiguousarray(self.data[sample]).tobytes())
        out["sample_sha256"] = h.hexdigest()
        return out


def _encoder_module(encoder: Any) -> nn.Module | None:
    """The ``nn.Module`` behind an encoder: itself, or the owner of a bound method."""
    if isinstance(encoder, nn.Module):
        return encoder
    owner = getattr(encoder, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


def teacher_fingerprint(encoder: Any, weight: Tensor, bias: Tensor | None) -> str:
    """sha256 (hex) identifying a teacher: its encoder and its output layer.

    Hashes ``b"kdfast.teacher_fingerprint/1\\0"``, then the encoder's identity followed by
    ``\\0`` — ``"none"`` for ``encoder=None``; ``"module:{model_fingerprint}:{method}"`` for an
    ``nn.Module`` (method ``__call__``) or a bound method of one (e.g. ``model.encode``), where
    :func:`kdfast.models.model_fingerprint` covers every parameter and buffer; for any other
    callable ``"callable:{__module__}.{__qualname__}"`` (its name only: state hidden in a plain
    callable is not seen) — and then ``weight`` and ``bias`` as in ``model_fingerprint``
    (name, dtype, shape, raw bytes; ``"bias\\0none\\0"`` without a bias).
    """
    h = hashlib.sha256(b"kdfast.teacher_fingerprint/1\0")
    module = _encoder_module(encoder)
    if encoder is None:
        ident = "none"
    elif module is not None:
        method = "__call__" if encoder is module else getattr(encoder, "__name__", "__call__")
        ident = f"module:{model_fingerprint(module)}:{method}"
    else:
        ident = f"callable:{getattr(encoder, '__module__', '?')}.{getattr(encoder, '__qualname__', type(encoder).__qualname__)}"
    h.update(ident.encode() + b"\0")
    _hash_tensor(h, "weight", weight)
    if bias is None:
        h.update(b"bias\0none\0")
    else:
        _hash_tensor(h, "bias", bias)
    return h.hexdigest()


# ---- files --------------------------------------------------------------------------------------


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is only ever absent, old or complete:
    a temporary file in the same directory, flushed and fsynced, renamed over ``path``,
    then the directory fsynced."""
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def _finite_json(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, +-inf) replaced by ``None``."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: _finite_json(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_json(value) for value in obj]
    return obj


def _json_bytes(obj: Any) -> bytes:
    """Strict JSON (no ``NaN``/``Infinity``: non-finite floats are written as ``null``), sorted keys,
    2-space indent, a final newline."""
    return (json.dumps(_finite_json(obj), indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _read_sidecar(path: str) -> str | None:
    try:
        with open(path) as f:
            digest = f.read().split()[0]
    except (OSError, IndexError):
        return None
    return digest if re.fullmatch(r"[0-9a-f]{64}", digest) else None


def _read_manifest(out_dir: str) -> dict[str, Any]:
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{out_dir!r} is not a kdfast label store: it has no {MANIFEST}")
    try:
        with open(path, "rb") as f:
            manifest = json.loads(f.read())
    except (OSError, ValueError) as exc:
        raise LabelStoreError(f"{path!r} is not a kdfast label store manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != STORE_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise LabelStoreError(f"{path!r} is not a kdfast label store manifest (format {found!r}, not {STORE_FORMAT!r})")
    return manifest


# ---- distributed ------------------------------------------------------------------------------


def _distributed() -> tuple[int, int, bool]:
    """(rank, world size, whether this call initialized the process group)."""
    if not dist.is_available():
        return 0, 1, False
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    world = int(os.environ.get("WORLD_SIZE", "1") or "1")
    if world > 1 and "RANK" in os.environ:
        try:
            dist.init_process_group("gloo", timeout=timedelta(hours=24))
        except Exception as exc:
            raise RuntimeError(
                f"WORLD_SIZE={world} and RANK are set but torch.distributed could not be initialized with gloo "
                f"(run under torchrun, or set MASTER_ADDR/MASTER_PORT): {exc}"
            ) from exc
        return dist.get_rank(), dist.get_world_size(), True
    return 0, 1, False


def _broadcast(obj: Any, world: int) -> Any:
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_gather(obj: Any, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


_ERROR_TYPES = {
    cls.__name__: cls
    for cls in (ValueError, TypeError, FileNotFoundError, NotImplementedError, LabelStoreError, ShardVerificationError)
}


def _describe(exc: BaseException | None) -> tuple[str, str] | None:
    return None if exc is None else (type(exc).__name__, str(exc))


def _rebuild(desc: tuple[str, str], where: str) -> BaseException:
    name, msg = desc
    return _ERROR_TYPES.get(name, RuntimeError)(f"{where}: {msg}" if name not in _ERROR_TYPES else msg)


# ---- label_dataset ----------------------------------------------------------------------------


def _resolve_device(device: torch.device) -> torch.device:
    """``device`` with the index a tensor moved there gets: ``cuda`` without an index is the current
    CUDA device (``cuda:0`` unless ``torch.cuda.set_device`` said otherwise), as ``module.to("cuda")``
    puts a module there. Without CUDA it stays as it is (and fails the kernel check)."""
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Whether tensors on ``a`` and on ``b`` are on the same device (``cuda`` is the current one)."""
    return _resolve_device(a) == _resolve_device(b)


def _check_positive_int(name: str, value: Any) -> int:
    if not is_integral(value) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _compare_config(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    diffs = []
    for key in _CONFIG_KEYS:
        was, now = old.get(key), new[key]
        if was == now:
            continue
        if key == "teacher_fingerprint":
            diffs.append(f"a different teacher (teacher_fingerprint {str(was)[:12]}..., now {now[:12]}...)")
        elif key == "feature_fingerprint":
            was = was if isinstance(was, dict) else {}
            changed = ", ".join(f"{f} {was.get(f)!r} -> {now[f]!r}" for f in now if was.get(f) != now[f])
            diffs.append(f"different features (feature_fingerprint: {changed})")
        elif key == "batch_size":
            diffs.append(
                f"batch_size = {was!r}, not {now!r} (rows are labelled in batches of the store's size, "
                "which keeps the results bit-identical)"
            )
        else:
            diffs.append(f"{key} = {was!r}, not {now!r}")
    return diffs


_CONFIG_KEYS = (
    "teacher_fingerprint",
    "feature_fingerprint",
    "k",
    "temperature",
    "rows",
    "num_classes",
    "hidden_dim",
    "dtype",
    "shard_rows",
    "batch_size",
    "kdfast_version",
)


def _our_file(name: str) -> bool:
    return name == MANIFEST or bool(_SHARD_RE.match(name) or _SIDECAR_RE.match(name) or _TMP_RE.match(name))


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _prepare(out_dir: str, config: dict[str, Any], overwrite: bool, shards: list[dict[str, Any]]) -> tuple[
    list[int], dict[int, str], bool, int
]:
    """Rank 0, before any shard is written: check ``out_dir``, clean up after a killed run,
    write the in-progress manifest. ``config["batch_size"]`` ``None`` is the batch size of the store
    in ``out_dir`` when it is resumed, else ``DEFAULT_BATCH_SIZE``. Returns (pending shard ids, sha256
    of verified shards, whether the manifest on disk is already final and unchanged, the batch size)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise LabelStoreError(f"out_dir {out_dir!r} exists and is not a directory")
    os.makedirs(out_dir, exist_ok=True)
    _fsync_dir(os.path.dirname(os.path.abspath(out_dir)))
    names = sorted(os.listdir(out_dir))
    foreign = [n for n in names if not _our_file(n)]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f", ... ({len(foreign)} in all)" if len(foreign) > 5 else "")
        raise LabelStoreError(
            f"out_dir {out_dir!r} holds files that are not part of a kdfast label store ({shown}); "
            "choose an empty or new directory"
        )
    old = None
    own_batch_size = config["batch_size"] is None
    if MANIFEST in names:
        old = _read_manifest(out_dir)
        if own_batch_size:  # resumed with the store's batch size
            stored = old.get("batch_size")
            stored = int(stored) if is_integral(stored) and stored >= 1 else DEFAULT_BATCH_SIZE
            config = dict(config, batch_size=stored)
        diffs = _compare_config(old, config)
        if diffs:
            if not overwrite:
                raise LabelStoreError(
                    f"out_dir {out_dir!r} holds a label store made with " + "; ".join(diffs)
                    + ": pass overwrite=True (CLI: --overwrite) to replace it, or choose another out_dir"
                )
            old = None
    elif any(_SHARD_RE.match(n) for n in names) and not overwrite:
        raise LabelStoreError(
            f"out_dir {out_dir!r} holds label-store shards but no {MANIFEST}: pass overwrite=True "
            "(CLI: --overwrite) to relabel from scratch, or choose another out_dir"
        )
    if own_batch_size and old is None:  # a fresh store
        config = dict(config, batch_size=DEFAULT_BATCH_SIZE)
    for n in names:  # temporary files of a killed run (one labeling job per directory at a time)
        if _TMP_RE.match(n):
            _remove(os.path.join(out_dir, n))
    if old is None:  # a fresh store: remove what is left of another one, manifest last
        for n in sorted(os.listdir(out_dir), key=lambda n: n == MANIFEST):
            if _our_file(n):
                _remove(os.path.join(out_dir, n))
        _fsync_dir(out_dir)

    known = {}
    if old is not None:
        for entry in old.get("shards", []):
            if entry.get("sha256"):
                known[entry["file"]] = entry["sha256"]
    pending, verified = [], {}
    for i, shard in enumerate(shards):
        path = os.path.join(out_dir, shard["file"])
        expected = known.get(shard["file"]) or _read_sidecar(path + ".sha256")
        if expected and os.path.isfile(path) and _sha256_file(path) == expected:
            verified[i] = expected
        else:
            pending.append(i)
            _remove(path + ".sha256")
            _remove(path)
    in_progress = dict(config, format=STORE_FORMAT, complete=False, summary=None, shard_format=_SHARD_FORMAT_DOC)
    in_progress["shards"] = [dict(s, sha256=verified.get(i)) for i, s in enumerate(shards)]
    final_unchanged = old is not None and bool(old.get("complete")) and not pending
    if not final_unchanged:
        _atomic_write(os.path.join(out_dir, MANIFEST), _json_bytes(in_progress))
    return pending, verified, final_unchanged, config["batch_size"]


_SHARD_FORMAT_DOC = (
    "numpy .npy (format 1.0), one structured array per shard, one record per row: "
    "indices int64[k], logits <dtype>[k], lse <dtype>, entropy <dtype>, covered <dtype> (little-endian)"
)


def _shard_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, array, version=(1, 0), allow_pickle=False)
    return buf.getvalue()


def _summary_stats(out_dir: str, shards: list[dict[str, Any]]) -> dict[str, float | int | None]:
    """The manifest's ``summary``: ``mean_covered``, ``p5_covered`` and ``mean_entropy`` over the rows
    whose ``covered`` and ``entropy`` are finite (``None`` when no row's are), and ``nonfinite_rows``,
    the number of the others (NaN features or teacher outputs, say)."""
    covered, entropy = [], []
    for s in shards:
        a = np.load(os.path.join(out_dir, s["file"]), mmap_mode="r", allow_pickle=False)
        covered.append(np.asarray(a["covered"], dtype=np.float64))
        entropy.append(np.asarray(a["entropy"], dtype=np.float64))
    c, e = np.concatenate(covered), np.concatenate(entropy)
    finite = np.isfinite(c) & np.isfinite(e)
    c, e = c[finite], e[finite]
    return {
        "mean_covered": float(np.mean(c)) if len(c) else None,
        "p5_covered": float(np.percentile(c, 5)) if len(c) else None,
        "mean_entropy": float(np.mean(e)) if len(e) else None,
        "nonfinite_rows": int(len(finite) - len(c)),
    }


def label_dataset(
    encoder: Callable[[Tensor], Tensor] | nn.Module | None,
    weight: Tensor,
    features: Any,
    out_dir: str | os.PathLike,
    *,
    bias: Tensor | None = None,
    k: int = 32,
    temperature: float = 1.0,
    batch_size: int | None = None,
    shard_rows: int = 65536,
    device: torch.device | str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> LabelStore:
    """Label every row of ``features`` with a teacher and store the result in ``out_dir``.

    Per row, :func:`teacher_topk` of the teacher's hidden states ``encoder(x)`` and output layer
    ``weight`` ``[V, d]`` / ``bias`` ``[V]``: the ``k`` largest logits and their classes, ``lse``,
    ``entropy`` and ``covered`` at ``temperature`` (see the module docstring for the store).

    Args:
        encoder: maps a batch of feature rows to hidden states ``[b, d]`` — an ``nn.Module`` or any
            callable (for a :class:`kdfast.models.SparseLinearClassifier` pass ``model.encode``);
            ``None`` when ``features`` already are hidden states. It receives a torch tensor on
            ``device``: strided for dense features, sparse CSR for sparse ones. An encoder module must
            already live on ``device``. Its output is cast to ``weight``'s dtype.
        weight, bias: the teacher's output layer (moved to ``device``).
        features: ``[N, D]``: a dense tensor or numpy array, a ``scipy.sparse`` matrix (CSR), or a
            path read by :func:`load_features` (``.npy`` dense, ``.npz`` from ``scipy.sparse.save_npz``).
        out_dir: the store directory: created if missing; must be empty, or hold a store of this run.
        k, temperature: as in :func:`teacher_topk` (``1 <= k <= V``, ``temperature`` finite and > 0).
        batch_size: rows per :func:`teacher_topk` call. Part of the store's configuration: results are
            bit-identical only for equal batches, so a store is resumed with its own ``batch_size``.
            ``None`` (the default): the batch size of the store in ``out_dir`` when it is resumed,
            else 4096 (a new store, or one replaced with ``overwrite``); a value that differs from the
            resumed store's is refused like any other change.
        shard_rows: rows per shard file (the last shard holds the rest).
        device: where labeling runs (default: ``weight``'s device).
        overwrite: replace a store in ``out_dir`` made with another teacher, features, ``k``,
            ``temperature``, ``shard_rows`` or ``batch_size`` (without it: a ``ValueError``). A directory
            holding files that are no label store's is refused even so.
        progress: a tqdm progress bar (when tqdm is installed) and the summary printed at the end.

    Resumable: running it again skips the shards that are complete and pass their sha256 check
    and labels the rest; killed at any moment (SIGKILL included) and run again, it leaves a store
    byte-identical to an uninterrupted run. Under ``torchrun`` (``torch.distributed`` initialized,
    or ``RANK``/``WORLD_SIZE`` set, in which case a gloo group is initialized and torn down here)
    rank ``r`` of ``W`` labels every ``W``-th pending shard from the ``r``-th (on a fresh store: shards
    ``r, r + W, ...``), rank 0 writes the manifest once all are done, and every rank returns the store;
    the bar shows rank 0's share.

    Returns:
        The :class:`LabelStore`; its :meth:`LabelStore.summary` includes this run's time.
    """
    t0 = time.perf_counter()
    out_dir = os.fspath(out_dir)
    k = check_int("k", k)
    temperature = check_real("temperature", temperature)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    if batch_size is not None:
        batch_size = _check_positive_int("batch_size", batch_size)
    shard_rows = _check_positive_int("shard_rows", shard_rows)
    if encoder is not None and not callable(encoder):
        raise TypeError(f"encoder must be callable (an nn.Module or a function) or None, got {type(encoder).__name__}")

    weight = as_tensor(weight, "weight").detach()
    bias = None if bias is None else as_tensor(bias, "bias").detach()
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape [V, d], got {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got dtype {weight.dtype}")
    V, d = (int(s) for s in weight.shape)
    if not 1 <= k <= V:
        raise ValueError(f"k must be in [1, V = {V}] (V = the teacher's number of classes), got {k}")
    if bias is not None and tuple(bias.shape) != (V,):
        raise ValueError(f"bias must have shape [V] = [{V}], got {tuple(bias.shape)}")
    device = _resolve_device(weight.device if device is None else torch.device(device))
    if device.type not in ("cpu", "meta") and not torch._C._dispatch_has_kernel_for_dispatch_key(
        "kdfast::teacher_topk", device.type.upper()
    ):
        raise NotImplementedError(
            f"this kdfast build has no {device.type} kernel of teacher_topk: label with device='cpu'"
        )
    module = _encoder_module(encoder)
    if module is not None:
        for p in itertools.chain(module.parameters(), module.buffers()):
            if not _same_device(p.device, device):
                raise ValueError(
                    f"the encoder's parameters are on {p.device} but labeling runs on {device}: "
                    f"move it with encoder.to({str(device)!r}) or pass device={str(p.device)!r}"
                )
            break

    feats = _Features(features)
    if feats.rows == 0:
        raise ValueError("features have no rows: nothing to label")
    if encoder is None:
        if feats.cols != d:
            raise ValueError(
                f"features have {feats.cols} columns, but with encoder=None they must be the teacher's hidden "
                f"states, of width d = {d} (weight is [V, d] = {list(weight.shape)})"
            )
    else:
        num_features = getattr(module, "num_features", None) if module is not None else None
        if isinstance(num_features, int) and feats.cols != num_features:
            raise ValueError(
                f"features have {feats.cols} columns but the teacher's encoder ({type(module).__name__}) "
                f"takes num_features = {num_features}"
            )
    weight_dev = weight.to(device)
    bias_dev = None if bias is None else bias.to(device)

    def hidden_of(start: int, stop: int) -> Tensor:
        with torch.no_grad():
            if encoder is None:
                h = feats.batch(start, stop, device, dense=True)
            else:
                h = encoder(feats.batch(start, stop, device))
        if not isinstance(h, Tensor):
            raise TypeError(f"the encoder must return a torch.Tensor of hidden states, got {type(h).__name__}")
        if h.dim() != 2 or h.shape[0] != stop - start or h.shape[1] != d:
            hint = ""
            if module is encoder and hasattr(module, "encode"):
                hint = f" (pass {type(module).__name__}.encode, not the model: calling the model gives logits)"
            raise ValueError(
                f"the encoder returned hidden states of shape {tuple(h.shape)} for {stop - start} rows, but weight "
                f"is [V, d] = {list(weight.shape)}: the hidden width must be d = {d}{hint}"
            )
        if h.layout != torch.strided:
            h = h.to_dense()
        return h.to(weight_dev.dtype)

    # probe one row before touching out_dir: shapes, dtypes, the op's own checks
    probe = teacher_topk(hidden_of(0, 1), weight_dev, bias_dev, k=k, temperature=temperature)
    value_dtype = str(probe.logits.dtype).removeprefix("torch.")

    num_shards = (feats.rows + shard_rows - 1) // shard_rows
    shards = [
        {"file": _shard_name(i), "start": i * shard_rows, "rows": min(shard_rows, feats.rows - i * shard_rows)}
        for i in range(num_shards)
    ]
    config = {
        "kdfast_version": __version__,
        "rows": feats.rows,
        "k": k,
        "temperature": temperature,
        "dtype": value_dtype,
        "index_dtype": "int64",
        "num_classes": V,
        "hidden_dim": d,
        "shard_rows": shard_rows,
        "batch_size": batch_size,
        "num_shards": num_shards,
        "teacher_fingerprint": teacher_fingerprint(encoder, weight, bias),
        "feature_fingerprint": feats.fingerprint(),
    }
    dtype = _shard_dtype(k, np.dtype(value_dtype).str)

    rank, world, owned = _distributed()
    try:
        # 1. rank 0 checks and prepares the directory; everyone learns the pending shards
        err: BaseException | None = None
        plan = None
        if rank == 0:
            try:
                plan = _prepare(out_dir, config, overwrite, shards)
            except Exception as exc:  # noqa: BLE001 - sent to every rank, then raised
                err = exc
        status, plan = _broadcast((_describe(err), plan), world)
        if err is not None:
            raise err
        if status is not None:
            raise _rebuild(status, "rank 0")
        pending, verified, final_unchanged, batch_size = plan
        config["batch_size"] = batch_size
        mine = pending[rank::world]
        show = progress and rank == 0
        if show and verified:
            print(f"kdfast label: resuming {out_dir}: {len(verified)} of {num_shards} shards complete", file=sys.stderr)

        # 2. every rank labels its shards
        def label_shard(i: int, bar: Any) -> None:
            shard = shards[i]
            s0, n = shard["start"], shard["rows"]
            array = np.zeros(n, dtype=dtype)
            for a in range(s0, s0 + n, batch_size):
                b = min(s0 + n, a + batch_size)
                top = teacher_topk(hidden_of(a, b), weight_dev, bias_dev, k=k, temperature=temperature)
                rows = slice(a - s0, b - s0)
                for field in TOPK_TENSOR_FIELDS:
                    array[field][rows] = getattr(top, field).cpu().numpy()
                if bar is not None:
                    bar.update(b - a)
            data = _shard_bytes(array)
            path = os.path.join(out_dir, shard["file"])
            _atomic_write(path, data)
            _atomic_write(path + ".sha256", f"{hashlib.sha256(data).hexdigest()}  {shard['file']}\n".encode())

        err = None
        bar = _progress_bar(sum(shards[i]["rows"] for i in mine), show, "labelling" if world == 1 else
                            f"labelling (rank 0 of {world})")
        try:
            for i in mine:
                label_shard(i, bar)
        except BaseException as exc:  # noqa: BLE001 - every rank must reach the gather below
            err = exc
        finally:
            if bar is not None:
                bar.close()
        statuses = _all_gather(_describe(err), world)
        if err is not None:
            raise err
        for r, s in enumerate(statuses):
            if s is not None:
                raise _rebuild(s, f"rank {r}")

        # 3. rank 0 verifies the new shards and writes the final manifest
        manifest = None
        if rank == 0:
            try:
                manifest = _finish(out_dir, config, shards, verified, pending, final_unchanged)
            except Exception as exc:  # noqa: BLE001
                err = exc
        status = _broadcast(_describe(err), world)
        if err is not None:
            raise err
        if status is not None:
            raise _rebuild(status, "rank 0")
    finally:
        if owned:
            dist.destroy_process_group()

    if manifest is None:
        store = LabelStore(out_dir, verify="lazy")
    else:
        store = LabelStore._trusted(out_dir, manifest)
    seconds = time.perf_counter() - t0
    labelled = sum(shards[i]["rows"] for i in pending)
    store._run = {"seconds": seconds, "rows_labelled": labelled, "rows_per_second": labelled / seconds}
    if progress and rank == 0:
        s = store.summary()
        rate = f", {labelled / seconds:,.0f} rows/s" if labelled else ""

        def fmt(key: str) -> str:
            value = s.get(key)
            return "n/a" if value is None else f"{value:.4f}"

        bad = s.get("nonfinite_rows") or 0
        nonfinite = f"; {bad:,} row{'' if bad == 1 else 's'} with non-finite covered/entropy left out" if bad else ""
        print(
            f"kdfast label: {s['rows']:,} rows ({labelled:,} labelled now) in {seconds:.2f} s{rate}; "
            f"covered mass: mean {fmt('mean_covered')}, 5th percentile {fmt('p5_covered')}; "
            f"mean entropy {fmt('mean_entropy')} nats{nonfinite} -> {out_dir}"
        )
    return store


def _progress_bar(total: int, show: bool, desc: str) -> Any:
    if not show or total == 0:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is an `experiments` extra
        return None
    return tqdm(total=total, unit="rows", unit_scale=True, desc=desc, dynamic_ncols=True)


def _finish(
    out_dir: str,
    config: dict[str, Any],
    shards: list[dict[str, Any]],
    verified: dict[int, str],
    pending: list[int],
    final_unchanged: bool,
) -> dict[str, Any]:
    """Rank 0, after every rank is done: check the new shards against their sidecar checksums,
    write the final manifest, remove the sidecars."""
    digests = dict(verified)
    for i in pending:
        path = os.path.join(out_dir, shards[i]["file"])
        expected = _read_sidecar(path + ".sha256")
        actual = _sha256_file(path) if os.path.isfile(path) else None
        if expected is None or actual != expected:
            raise ShardVerificationError(
                f"shard {path!r} was just written but fails its sha256 check (a failing disk or another process "
                f"writing to {out_dir!r}?): " + _RELABEL_HINT.format(out_dir=out_dir)
            )
        digests[i] = expected
    manifest_path = os.path.join(out_dir, MANIFEST)
    if final_unchanged:
        manifest = _read_manifest(out_dir)
    else:
        manifest = dict(config, format=STORE_FORMAT, complete=True, shard_format=_SHARD_FORMAT_DOC)
        manifest["shards"] = [dict(s, sha256=digests[i]) for i, s in enumerate(shards)]
        manifest["summary"] = _summary_stats(out_dir, shards)
        _atomic_write(manifest_path, _json_bytes(manifest))
    removed = False
    for n in os.listdir(out_dir):
        if _SIDECAR_RE.match(n):
            _remove(os.path.join(out_dir, n))
            removed = True
    if removed:
        _fsync_dir(out_dir)
    return manifest


# ---- LabelStore -------------------------------------------------------------------------------


class LabelStore:
    """Read a label store written by :func:`label_dataset`.

    ``len(store)`` rows; ``store[rows]`` with an int (or a 0-d integer tensor / array), a slice, a
    1-D array / list / tensor of row indices (negative ones count from the end) or a boolean mask
    gives a :class:`kdfast.TopK` of CPU tensors (``[n, k]`` / ``[n]``; an int drops the row
    dimension); :meth:`batches` iterates ``(row_indices, TopK)``; ``store.manifest`` is the
    manifest (a copy).

    ``verify="open"`` checks every shard's sha256 against the manifest now; ``verify="lazy"``
    checks a shard when it is first read. A shard that is missing or fails the check raises
    :class:`ShardVerificationError` naming the file; rerunning :func:`label_dataset` (or
    ``python -m kdfast label``) with the same arguments relabels exactly the failing shards.
    """

    def __init__(self, out_dir: str | os.PathLike, verify: str = "open") -> None:
        if verify not in ("open", "lazy"):
            raise ValueError(f"verify must be 'open' or 'lazy', got {verify!r}")
        self.out_dir = os.fspath(out_dir)
        manifest = _read_manifest(self.out_dir)
        if not manifest.get("complete"):
            missing = sum(1 for s in manifest.get("shards", []) if not s.get("sha256"))
            raise LabelStoreError(
                f"label store {self.out_dir!r} is incomplete ({missing} of {manifest.get('num_shards')} shards not "
                "recorded: labeling was interrupted or is still running): " + _RELABEL_HINT.format(out_dir=self.out_dir)
            )
        self._init(manifest)
        if verify == "open":
            self.verify()

    @classmethod
    def _trusted(cls, out_dir: str, manifest: dict[str, Any]) -> LabelStore:
        """A store whose shards were just verified (by :func:`label_dataset`)."""
        self = cls.__new__(cls)
        self.out_dir = out_dir
        self._init(manifest)
        self._verified = [True] * len(self._shards)
        return self

    def _init(self, manifest: dict[str, Any]) -> None:
        self._manifest = manifest
        self._shards = manifest["shards"]
        self._rows = int(manifest["rows"])
        self._shard_rows = int(manifest["shard_rows"])
        self._dtype = _shard_dtype(int(manifest["k"]), np.dtype(manifest["dtype"]).str)
        self._arrays: list[np.ndarray | None] = [None] * len(self._shards)
        self._verified = [False] * len(self._shards)
        self._run: dict[str, Any] | None = None

    # -- metadata
    @property
    def manifest(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._manifest))

    @property
    def k(self) -> int:
        return int(self._manifest["k"])

    @property
    def temperature(self) -> float:
        return float(self._manifest["temperature"])

    @property
    def num_classes(self) -> int:
        return int(self._manifest["num_classes"])

    def __len__(self) -> int:
        return self._rows

    def __repr__(self) -> str:
        return (
            f"LabelStore({self.out_dir!r}, rows={self._rows}, k={self.k}, temperature={self.temperature}, "
            f"shards={len(self._shards)})"
        )

    def summary(self) -> dict[str, Any]:
        """Rows, k, temperature, mean and 5th-percentile covered mass, mean entropy (over the rows
        whose covered mass and entropy are finite; ``None`` when none are) and ``nonfinite_rows``,
        the number of the others (absent in stores of older versions); and, for the store returned
        by :func:`label_dataset`, that run's ``seconds``, ``rows_labelled`` and ``rows_per_second``
        (``None`` for a store opened later)."""
        out = {"rows": self._rows, "k": self.k, "temperature": self.temperature}
        out.update(self._manifest.get("summary") or {})
        run = self._run or {}
        for key in ("seconds", "rows_labelled", "rows_per_second"):
            out[key] = run.get(key)
        return out

    # -- shards
    def verify(self) -> None:
        """Check every shard's sha256 now (raises :class:`ShardVerificationError`)."""
        for i in range(len(self._shards)):
            self._shard(i)

    def _shard(self, i: int) -> np.ndarray:
        array = self._arrays[i]
        if array is not None:
            return array
        entry = self._shards[i]
        path = os.path.join(self.out_dir, entry["file"])
        hint = _RELABEL_HINT.format(out_dir=self.out_dir)
        if not os.path.isfile(path):
            raise ShardVerificationError(f"label store shard {path!r} is missing: {hint}")
        if not self._verified[i]:
            digest = _sha256_file(path)
            if digest != entry["sha256"]:
                raise ShardVerificationError(
                    f"label store shard {path!r} fails its sha256 check (expected {entry['sha256']}, got {digest}): "
                    f"the file is corrupted or was changed; {hint}"
                )
            self._verified[i] = True
        array = np.load(path, mmap_mode="r", allow_pickle=False)
        if array.dtype != self._dtype or array.shape != (entry["rows"],):
            raise ShardVerificationError(
                f"label store shard {path!r} holds {array.shape} records of {array.dtype}, not the manifest's "
                f"({entry['rows']},) of {self._dtype}: {hint}"
            )
        self._arrays[i] = array
        return array

    # -- rows
    def _row_indices(self, rows: Any) -> tuple[np.ndarray, bool]:
        n = self._rows
        if isinstance(rows, Tensor):
            rows = rows.detach().cpu().numpy()
        if isinstance(rows, np.ndarray) and rows.ndim == 0 and rows.dtype.kind in "iu":
            rows = rows.item()  # a 0-d integer tensor / array is one row, like an int
        if is_integral(rows):
            r = int(rows)
            if not -n <= r < n:
                raise IndexError(f"row {r} out of range for a label store of {n} rows")
            return np.array([r % n], dtype=np.int64), True
        if isinstance(rows, slice):
            return np.arange(*rows.indices(n), dtype=np.int64), False
        idx = np.asarray(rows)
        if idx.dtype == np.bool_:
            if idx.shape != (n,):
                raise IndexError(f"a boolean mask must have shape ({n},), got {idx.shape}")
            return np.flatnonzero(idx).astype(np.int64), False
        if idx.size == 0:
            idx = idx.astype(np.int64)
        if idx.ndim != 1 or idx.dtype.kind not in "iu":
            raise IndexError(f"rows must be an int, a slice, a 1-D integer array or a boolean mask, got {rows!r:.80}")
        idx = idx.astype(np.int64)
        bad = (idx < -n) | (idx >= n)
        if bad.any():
            raise IndexError(f"row {int(idx[bad][0])} out of range for a label store of {n} rows")
        return np.where(idx < 0, idx + n, idx), False

    def _gather(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        k = self.k
        out = {
            "indices": np.empty((len(idx), k), dtype=np.int64),
            "logits": np.empty((len(idx), k), dtype=self._dtype["logits"].base),
        }
        for f in ("lse", "entropy", "covered"):
            out[f] = np.empty(len(idx), dtype=self._dtype[f])
        shard_of = idx // self._shard_rows
        for s in np.unique(shard_of).tolist():
            sel = np.flatnonzero(shard_of == s)
            local = idx[sel] - s * self._shard_rows
            array = self._shard(s)
            if len(local) and local[-1] - local[0] + 1 == len(local) and (np.diff(local) == 1).all():
                records = array[local[0] : local[-1] + 1]
            else:
                records = array[local]
            whole = len(sel) == len(idx)
            for f, dest in out.items():
                if whole:
                    dest[...] = records[f]
                else:
                    dest[sel] = records[f]
        return out

    def _topk(self, parts: dict[str, np.ndarray], device: torch.device | str | None = None) -> TopK:
        top = TopK(**{f: torch.from_numpy(a) for f, a in parts.items()}, temperature=self.temperature)
        return top if device is None else top.to(device)

    def __getitem__(self, rows: Any) -> TopK:
        idx, single = self._row_indices(rows)
        parts = self._gather(idx)
        if single:
            parts = {f: np.array(a[0]) for f, a in parts.items()}
        return self._topk(parts)

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        device: torch.device | str | None = None,
    ) -> Iterator[tuple[Tensor, TopK]]:
        """Yield ``(row_indices, TopK)`` over all rows, ``batch_size`` rows at a time (in row order,
        or in the order of ``numpy.random.default_rng(seed).permutation`` with ``shuffle``).
        ``row_indices`` (int64) says which feature rows the batch belongs to; the ``TopK`` goes
        straight into ``fused_linear_distillation_loss(teacher_topk=...)`` (moved to ``device``
        when given)."""
        batch_size = _check_positive_int("batch_size", batch_size)
        n = self._rows
        order = np.random.default_rng(seed).permutation(n) if shuffle else None
        for a in range(0, n, batch_size):
            b = min(n, a + batch_size)
            if drop_last and b - a < batch_size:
                break
            idx = order[a:b].astype(np.int64) if order is not None else np.arange(a, b, dtype=np.int64)
            rows = torch.from_numpy(idx)
            yield (rows if device is None else rows.to(device)), self._topk(self._gather(idx), device)
