"""Plain-PyTorch references of the two decode ops: a few new query tokens against a long KV cache.

Same conventions as :mod:`reference` (DESIGN.md section 5), except that queries and keys have their
own lengths: ``Lq`` new tokens (the patches of one update, or the horizon tokens of one forecast)
against ``Lk`` cached tokens (``Lq`` is small, ``Lk`` up to millions). Block ``b`` of the cache holds
cache slots ``[b * bs, (b + 1) * bs)``; unused slots carry ``k_time = INT32_MAX`` and are seen by no
query. The cache may be paged (blocks of different sensor groups interleaved in any order): the ops
only read block ids, the ``allowed`` mask and the key times.

- ``decode_select_reference``: O(Lq * Lk * Di) index scoring, block max-pool, top-k (chunked over
  queries so memory stays ``O(chunk * Lk)``).
- ``decode_attention_reference``: gathers the ``K * bs`` selected keys of each (group, query), so it
  costs O(Lq * K * bs * D) whatever ``Lk`` is.
"""
from __future__ import annotations

import math

import torch

from .reference import INT32_MAX, num_blocks, topk_blocks
from .validation import KernelInputError

__all__ = ["INT32_MAX", "check_decode_attention_inputs", "check_decode_select_inputs",
           "decode_attention_reference", "decode_select_reference"]

# Elements of one query chunk's [B, G, Lc, Lk] score tile.
_CHUNK_ELEMENTS = 1 << 24


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise KernelInputError(message)


def _check_times(q_time: torch.Tensor, k_time: torch.Tensor, batch: int, n_q: int, n_k: int) -> None:
    for name, t, n, dim in (("q_time", q_time, n_q, "Lq"), ("k_time", k_time, n_k, "Lk")):
        _need(isinstance(t, torch.Tensor) and tuple(t.shape) == (batch, n),
              f"{name} must be [B={batch}, {dim}={n}], got {tuple(getattr(t, 'shape', ()))}")
        _need(t.dtype == torch.int32, f"{name} must be int32 (unused cache slots carry INT32_MAX), got {t.dtype}")


def check_decode_select_inputs(qi, ki, q_time, k_time, block_size, k, allowed, forced) -> None:
    _need(isinstance(qi, torch.Tensor) and qi.dim() == 4, f"qi must be [B, G, Lq, Di], got {tuple(getattr(qi, 'shape', ()))}")
    _need(isinstance(ki, torch.Tensor) and ki.dim() == 3, f"ki must be [B, Lk, Di], got {tuple(getattr(ki, 'shape', ()))}")
    batch, groups, n_q, index_dim = qi.shape
    n_k = ki.shape[1]
    _need(ki.shape[0] == batch and ki.shape[2] == index_dim,
          f"ki must be [B={batch}, Lk, Di={index_dim}] to match qi, got {tuple(ki.shape)}")
    _check_times(q_time, k_time, batch, n_q, n_k)
    _need(isinstance(block_size, int) and block_size > 0, f"block_size must be a positive int, got {block_size!r}")
    _need(isinstance(k, int) and k > 0, f"k (blocks per query) must be a positive int, got {k!r}")
    nb = num_blocks(n_k, block_size)
    if allowed is not None:
        _need(tuple(allowed.shape) == (batch, groups, nb) and allowed.dtype == torch.bool,
              f"allowed must be a bool mask [B={batch}, G={groups}, NB={nb}], got {tuple(allowed.shape)} {allowed.dtype}")
    if forced is not None:
        _need(forced.dim() == 4 and tuple(forced.shape[:3]) == (batch, groups, n_q),
              f"forced must be [B={batch}, G={groups}, Lq={n_q}, F], got {tuple(forced.shape)}")
        _need(forced.shape[-1] <= k, f"forced has {forced.shape[-1]} slots but only k={k} blocks are kept")
        _need(forced.dtype in (torch.int32, torch.int64), f"forced must be an integer tensor, got {forced.dtype}")


def check_decode_attention_inputs(q, k, v, block_idx, q_time, k_time, block_size) -> None:
    for name, t, shape in (("q", q, "[B, Hq, Lq, D]"), ("k", k, "[B, G, Lk, D]"), ("v", v, "[B, G, Lk, D]")):
        _need(isinstance(t, torch.Tensor) and t.dim() == 4, f"{name} must be {shape}, got {tuple(getattr(t, 'shape', ()))}")
    batch, n_heads, n_q, head_dim = q.shape
    groups, n_k = k.shape[1], k.shape[2]
    _need(k.shape[0] == batch and k.shape[3] == head_dim and k.shape == v.shape,
          f"k and v must both be [B={batch}, G, Lk, D={head_dim}], got k {tuple(k.shape)} v {tuple(v.shape)}")
    _need(groups > 0 and n_heads % groups == 0, f"query heads ({n_heads}) must be a multiple of KV heads ({groups})")
    _need(q.dtype == k.dtype == v.dtype, f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    _need(isinstance(block_idx, torch.Tensor) and block_idx.dim() == 4 and tuple(block_idx.shape[:3]) == (batch, groups, n_q),
          f"block_idx must be [B={batch}, G={groups}, Lq={n_q}, K], got {tuple(getattr(block_idx, 'shape', ()))}")
    _need(block_idx.dtype == torch.int32, f"block_idx must be int32 (-1 = empty slot), got {block_idx.dtype}")
    _need(isinstance(block_size, int) and block_size > 0, f"block_size must be a positive int, got {block_size!r}")
    _check_times(q_time, k_time, batch, n_q, n_k)


def decode_block_scores_reference(
    qi: torch.Tensor,  # [B, G, Lq, Di]
    ki: torch.Tensor,  # [B, Lk, Di]
    q_time: torch.Tensor,  # [B, Lq] int32
    k_time: torch.Tensor,  # [B, Lk] int32
    block_size: int,
) -> torch.Tensor:
    """Max-pooled raw index scores ``[B, G, Lq, NB]`` float32 over each block's visible keys
    (``-inf`` where a block has none)."""
    batch, groups, n_q, _ = qi.shape
    n_k = ki.shape[1]
    nb = num_blocks(n_k, block_size)
    pad = nb * block_size - n_k
    out = torch.empty(batch, groups, n_q, nb, dtype=torch.float32, device=qi.device)
    chunk = max(1, min(n_q, _CHUNK_ELEMENTS // max(1, batch * groups * n_k)))
    kif = ki.float()
    for start in range(0, n_q, chunk):
        stop = min(n_q, start + chunk)
        scores = torch.einsum("bgqd,bkd->bgqk", qi[:, :, start:stop].float(), kif)
        visible = k_time[:, None, None, :] <= q_time[:, None, start:stop, None]
        scores = scores.masked_fill(~visible, float("-inf"))
        if pad:
            scores = torch.nn.functional.pad(scores, (0, pad), value=float("-inf"))
        out[:, :, start:stop] = scores.unflatten(-1, (nb, block_size)).amax(-1)
    return out


@torch.no_grad()
def decode_select_reference(
    qi: torch.Tensor,  # [B, G, Lq, Di]
    ki: torch.Tensor,  # [B, Lk, Di]
    q_time: torch.Tensor,  # [B, Lq] int32
    k_time: torch.Tensor,  # [B, Lk] int32
    block_size: int,
    k: int,
    allowed: torch.Tensor | None = None,  # [B, G, NB] bool
    forced: torch.Tensor | None = None,  # [B, G, Lq, F] int, -1 = none
    return_scores: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` cache blocks per (group, new query), as :func:`reference.select_blocks_reference`
    but with ``Lq`` queries against ``Lk`` cached keys. ``k`` may exceed the number of blocks with a
    visible key (early in a stream): the spare slots are ``-1``."""
    check_decode_select_inputs(qi, ki, q_time, k_time, block_size, k, allowed, forced)
    scores = decode_block_scores_reference(qi, ki, q_time, k_time, block_size)
    return topk_blocks(scores, k, allowed, forced, return_scores)


def decode_attention_reference(
    q: torch.Tensor,  # [B, Hq, Lq, D]
    k: torch.Tensor,  # [B, G, Lk, D]
    v: torch.Tensor,  # [B, G, Lk, D]
    block_idx: torch.Tensor,  # [B, G, Lq, K] int32, -1 = empty slot
    q_time: torch.Tensor,  # [B, Lq] int32
    k_time: torch.Tensor,  # [B, Lk] int32
    block_size: int,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax attention of every head of group g over the visible keys of its selected cache
    blocks. Returns ``out [B, Hq, Lq, D]`` (dtype of q) and ``lse [B, Hq, Lq]`` float32; a query with
    no visible key gets ``out = 0``, ``lse = -inf``."""
    check_decode_attention_inputs(q, k, v, block_idx, q_time, k_time, block_size)
    batch, n_heads, n_q, head_dim = q.shape
    groups, n_k = k.shape[1], k.shape[2]
    rep = n_heads // groups
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    # Token index of every (slot, offset): [B, G, Lq, K * bs]; empty slots point at token 0, masked.
    offsets = torch.arange(block_size, device=q.device)
    tokens = block_idx.long().clamp(min=0)[..., None] * block_size + offsets
    slot_ok = (block_idx >= 0)[..., None] & (tokens < n_k)
    tokens = torch.where(slot_ok, tokens, 0).flatten(-2)  # [B, G, Lq, S]
    slot_ok = slot_ok.flatten(-2)
    flat = tokens.flatten(2)  # [B, G, Lq * S]
    index = flat[..., None].expand(-1, -1, -1, head_dim)
    k_sel = torch.gather(k.float(), 2, index).view(batch, groups, n_q, -1, head_dim)  # [B, G, Lq, S, D]
    v_sel = torch.gather(v.float(), 2, index).view(batch, groups, n_q, -1, head_dim)
    t_sel = torch.gather(k_time[:, None].expand(-1, groups, -1), 2, flat).view(batch, groups, n_q, -1)
    visible = slot_ok & (t_sel <= q_time[:, None, :, None])  # [B, G, Lq, S]
    qg = q.float().view(batch, groups, rep, n_q, head_dim)
    logits = torch.einsum("bgrqd,bgqsd->bgrqs", qg, k_sel) * scale
    logits = logits.masked_fill(~visible[:, :, None], float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # [B, G, R, Lq]
    probs = torch.exp(logits - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    out = torch.einsum("bgrqs,bgqsd->bgrqd", probs, v_sel)
    return out.reshape(batch, n_heads, n_q, head_dim).to(q.dtype), lse.reshape(batch, n_heads, n_q)
