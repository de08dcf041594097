"""Routes each MSA op to its Triton kernel on CUDA and to the PyTorch reference elsewhere.

The backend is ``auto`` by default; ``set_backend("reference" | "triton" | "auto")`` or the
environment variable ``TSFM_MSA_BACKEND`` forces one. Forcing ``triton`` on CPU tensors is what the
tests do under ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import os
from collections import Counter
from typing import Literal

import torch

from . import reference

Backend = Literal["auto", "triton", "reference"]
_BACKENDS = ("auto", "triton", "reference")
_backend: str | None = None
# How often each (op, backend) ran in this process: lets a run (and the GPU tests) check that CUDA
# work went through the Triton kernels, never silently through the O(L^2) references.
CALLS: Counter = Counter()


def set_backend(name: Backend) -> None:
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"unknown MSA kernel backend {name!r}; choose one of {_BACKENDS}")
    _backend = name


def get_backend() -> str:
    name = _backend or os.environ.get("TSFM_MSA_BACKEND", "auto")
    if name not in _BACKENDS:
        raise ValueError(backend_problem(cuda=False))
    return name


def backend_problem(cuda: bool) -> str | None:
    """Why the chosen backend cannot run MSA ops on CUDA (``cuda=True``) or CPU tensors; None when it can.
    The ops raise with this text; the CLI asks before a run starts, to say it in one line."""
    name = _backend or os.environ.get("TSFM_MSA_BACKEND", "auto")
    if name not in _BACKENDS:
        return f"TSFM_MSA_BACKEND={name!r} is not one of {_BACKENDS}"
    if name == "triton":
        if not triton_available():
            return "TSFM_MSA_BACKEND=triton but triton is not installed; pip install triton"
        if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
            return "the triton backend needs CUDA tensors, or TRITON_INTERPRET=1 on CPU"
    if name == "auto" and cuda and not triton_available():
        return ("MSA ops on CUDA tensors need triton (pip install triton); set TSFM_MSA_BACKEND=reference "
                "to run the slow plain-PyTorch references instead")
    return None


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _use_triton(t: torch.Tensor) -> bool:
    name = get_backend()
    problem = backend_problem(t.is_cuda)
    if problem:
        raise RuntimeError(problem)
    return name == "triton" or (name == "auto" and t.is_cuda)


def _triton_op(module: str, name: str):
    """The Triton implementation ``name`` from ``kernels/<module>.py`` (imported lazily so that the
    references work where triton is missing)."""
    import importlib

    return getattr(importlib.import_module(f"{__package__}.{module}"), name)


def select_blocks(qi, ki, q_time, k_time, block_size, k, allowed=None, forced=None, return_scores=False):
    """See :func:`reference.select_blocks_reference`."""
    use_triton = _use_triton(qi)
    CALLS[("select_blocks", "triton" if use_triton else "reference")] += 1
    if use_triton:
        return _triton_op("select_blocks_triton", "select_blocks_triton")(qi, ki, q_time, k_time, block_size, k, allowed, forced, return_scores)
    return reference.select_blocks_reference(qi, ki, q_time, k_time, block_size, k, allowed, forced, return_scores)


def sparse_attention(q, k, v, block_idx, q_time, k_time, block_size, scale=None):
    """See :func:`reference.sparse_attention_reference`; returns ``(out, lse)``."""
    use_triton = _use_triton(q)
    CALLS[("sparse_attention", "triton" if use_triton else "reference")] += 1
    if use_triton:
        return _triton_op("sparse_attention_triton", "sparse_attention_triton")(q, k, v, block_idx, q_time, k_time, block_size, scale)
    return reference.sparse_attention_reference(q, k, v, block_idx, q_time, k_time, block_size, scale)


def indexer_kl(qi, ki, block_idx, q, k, lse, q_time, k_time, block_size, scale=None, index_scale=None):
    """See :func:`reference.indexer_kl_reference`; gradients reach ``qi`` and ``ki`` only."""
    use_triton = _use_triton(qi)
    CALLS[("indexer_kl", "triton" if use_triton else "reference")] += 1
    if use_triton:
        return _triton_op("indexer_kl_triton", "indexer_kl_triton")(qi, ki, block_idx, q, k, lse, q_time, k_time, block_size, scale, index_scale)
    return reference.indexer_kl_reference(qi, ki, block_idx, q, k, lse, q_time, k_time, block_size, scale, index_scale)


def decode_select(qi, ki, q_time, k_time, block_size, k, allowed=None, forced=None, return_scores=False):
    """Top-k cache blocks for a few new queries (``Lq != Lk``); see
    :func:`decode_reference.decode_select_reference`."""
    if _use_triton(qi):
        return _triton_op("decode_select_triton", "decode_select_triton")(qi, ki, q_time, k_time, block_size, k, allowed, forced, return_scores)
    from .decode_reference import decode_select_reference

    return decode_select_reference(qi, ki, q_time, k_time, block_size, k, allowed, forced, return_scores)


def decode_attention(q, k, v, block_idx, q_time, k_time, block_size, scale=None):
    """Sparse attention of a few new queries over their selected cache blocks; see
    :func:`decode_reference.decode_attention_reference`; returns ``(out, lse)``."""
    if _use_triton(q):
        return _triton_op("decode_attention_triton", "decode_attention_triton")(q, k, v, block_idx, q_time, k_time, block_size, scale)
    from .decode_reference import decode_attention_reference

    return decode_attention_reference(q, k, v, block_idx, q_time, k_time, block_size, scale)
