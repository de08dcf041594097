"""Dense test oracles of the three MSA ops: the former ``kernels/reference.py``, kept only to check the
gathered references against. They build ``[.., Lc, L]`` token masks and logits (O(L^2)): tests only.

Same conventions as :mod:`tsfm_msa.kernels.reference`. One change from the former code: arithmetic runs
in ``promote_types(dtype, float32)`` (fp64 inputs stay fp64, so fp64 comparisons are tight).
"""
from __future__ import annotations

import math

import torch

from tsfm_msa.kernels.reference import num_blocks

_CHUNK_ELEMENTS = 1 << 24


def _query_chunk(rows_per_query: int, seq_len: int, n_queries: int) -> int:
    return max(1, min(n_queries, _CHUNK_ELEMENTS // max(1, rows_per_query * seq_len)))


def _acc(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _padded_blocks(x: torch.Tensor, block_size: int, fill: float) -> torch.Tensor:
    """[..., L] -> [..., NB, bs], padding the last partial block with ``fill``."""
    seq_len = x.shape[-1]
    pad = num_blocks(seq_len, block_size) * block_size - seq_len
    if pad:
        x = torch.nn.functional.pad(x, (0, pad), value=fill)
    return x.unflatten(-1, (-1, block_size))


def _support_mask(
    block_idx: torch.Tensor,  # [B, G, Lc, K]
    q_time: torch.Tensor,  # [B, Lc]
    k_time: torch.Tensor,  # [B, L]
    block_size: int,
) -> torch.Tensor:
    """Token-level support [B, G, Lc, L]: key in a selected block and visible by time."""
    batch, groups, n_q, _ = block_idx.shape
    seq_len = k_time.shape[-1]
    nb = num_blocks(seq_len, block_size)
    chosen = torch.zeros(batch, groups, n_q, nb + 1, dtype=torch.bool, device=block_idx.device)
    # Empty slots (-1) land in the spare last column, which is dropped.
    slots = torch.where(block_idx < 0, nb, block_idx).long()
    chosen.scatter_(-1, slots, True)
    token_chosen = chosen[..., :nb].repeat_interleave(block_size, dim=-1)[..., :seq_len]
    visible = k_time[:, None, None, :] <= q_time[:, None, :, None]  # [B, 1, Lc, L]
    return token_chosen & visible


def dense_select_blocks(
    qi: torch.Tensor,  # [B, G, L, Di]
    ki: torch.Tensor,  # [B, L, Di]
    q_time: torch.Tensor,  # [B, L] int32
    k_time: torch.Tensor,  # [B, L] int32
    block_size: int,
    k: int,
    allowed: torch.Tensor | None = None,  # [B, G, NB] bool: blocks group g may choose
    forced: torch.Tensor | None = None,  # [B, G, L, F] int32, -1 = none: always kept
    return_scores: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` KV blocks per (group, query) by the max-pooled raw index score.

    A block's score is the max of ``qi . ki_j`` over its keys visible to the query (no softmax).
    Forced blocks come first (they count against ``k`` and bypass ``allowed`` and visibility), then
    the best allowed blocks with a visible key, by descending score, then ``-1`` for empty slots.
    Returns ``block_idx [B, G, L, K]`` int32 and, with ``return_scores``, the selected blocks'
    scores ``[B, G, L, K]`` float32 (``-inf`` for empty slots and forced blocks with no visible key).
    """
    batch, groups, seq_len, _ = qi.shape
    nb = num_blocks(seq_len, block_size)
    device = qi.device
    out_idx = torch.full((batch, groups, seq_len, k), -1, dtype=torch.int32, device=device)
    out_score = torch.full((batch, groups, seq_len, k), float("-inf"), device=device)
    width = min(k, nb)
    chunk = _query_chunk(groups, seq_len, seq_len)
    neg_inf, pos_inf = float("-inf"), float("inf")
    with torch.no_grad():
        for start in range(0, seq_len, chunk):
            stop = min(seq_len, start + chunk)
            scores = torch.einsum("bgqd,bkd->bgqk", _acc(qi[:, :, start:stop]), _acc(ki))
            visible = k_time[:, None, None, :] <= q_time[:, None, start:stop, None]
            scores = scores.masked_fill(~visible, neg_inf)
            block_scores = _padded_blocks(scores, block_size, neg_inf).amax(-1)  # [B, G, Lc, NB]
            key = block_scores
            if allowed is not None:
                key = key.masked_fill(~allowed[:, :, None, :], neg_inf)
            if forced is not None:
                f = forced[:, :, start:stop].long()
                is_forced = torch.zeros_like(key, dtype=torch.bool)
                # Slot nb is a spare column for the -1 entries.
                is_forced = torch.cat([is_forced, is_forced[..., :1]], -1)
                is_forced.scatter_(-1, torch.where(f < 0, nb, f), True)
                key = key.masked_fill(is_forced[..., :nb], pos_inf)
            top_key, top_idx = torch.topk(key, width, dim=-1)
            empty = top_key == neg_inf
            out_idx[:, :, start:stop, :width] = torch.where(empty, -1, top_idx).to(torch.int32)
            picked = torch.gather(block_scores, -1, top_idx)
            out_score[:, :, start:stop, :width] = picked.masked_fill(empty, neg_inf)
    if return_scores:
        return out_idx, out_score
    return out_idx


def dense_sparse_attention(
    q: torch.Tensor,  # [B, Hq, L, D]
    k: torch.Tensor,  # [B, G, L, D]
    v: torch.Tensor,  # [B, G, L, D]
    block_idx: torch.Tensor,  # [B, G, L, K] int32
    q_time: torch.Tensor,  # [B, L] int32
    k_time: torch.Tensor,  # [B, L] int32
    block_size: int,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax attention of every head of group g over its selected, visible tokens.

    Returns ``out [B, Hq, L, D]`` (dtype of ``q``) and ``lse [B, Hq, L]`` float32 (natural log).
    Differentiable in q, k, v through autograd.
    """
    batch, n_heads, seq_len, head_dim = q.shape
    groups = k.shape[1]
    rep = n_heads // groups
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    qg = _acc(q).view(batch, groups, rep, seq_len, head_dim)
    kf, vf = _acc(k), _acc(v)
    chunk = _query_chunk(n_heads, seq_len, seq_len)
    outs, lses = [], []
    for start in range(0, seq_len, chunk):
        stop = min(seq_len, start + chunk)
        mask = _support_mask(block_idx[:, :, start:stop], q_time[:, start:stop], k_time, block_size)
        logits = torch.einsum("bgrqd,bgkd->bgrqk", qg[:, :, :, start:stop], kf) * scale
        logits = logits.masked_fill(~mask[:, :, None], float("-inf"))
        lse = torch.logsumexp(logits, dim=-1)  # [B, G, R, Lc]
        lse_safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
        probs = torch.exp(logits - lse_safe[..., None])
        outs.append(torch.einsum("bgrqk,bgkd->bgrqd", probs, vf))
        lses.append(lse)
    out = torch.cat(outs, dim=3).reshape(batch, n_heads, seq_len, head_dim).to(q.dtype)
    lse = torch.cat(lses, dim=3).reshape(batch, n_heads, seq_len)
    return out, lse


def dense_indexer_kl(
    qi: torch.Tensor,  # [B, G, L, Di]
    ki: torch.Tensor,  # [B, L, Di]
    block_idx: torch.Tensor,  # [B, G, L, K] int32
    q: torch.Tensor,  # [B, Hq, L, D]
    k: torch.Tensor,  # [B, G, L, D]
    lse: torch.Tensor,  # [B, Hq, L] main-branch LSE on the same support
    q_time: torch.Tensor,  # [B, L] int32
    k_time: torch.Tensor,  # [B, L] int32
    block_size: int,
    scale: float | None = None,
    index_scale: float | None = None,
) -> torch.Tensor:
    """KL(teacher || indexer) on the selected support, averaged over (batch, group, query) rows
    with a non-empty support.

    Teacher ``p(j) = mean_h exp(q_h . k_j * scale - lse_h)`` over the heads of the group (detached);
    student ``softmax(qi . ki_j * index_scale)`` over the same support. Gradients flow to ``qi`` and
    ``ki`` only.
    """
    batch, groups, seq_len, index_dim = qi.shape
    n_heads, head_dim = q.shape[1], q.shape[-1]
    rep = n_heads // groups
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    index_scale = 1.0 / math.sqrt(index_dim) if index_scale is None else index_scale
    qg = _acc(q.detach()).view(batch, groups, rep, seq_len, head_dim)
    kf = _acc(k.detach())
    lse_g = _acc(lse.detach()).view(batch, groups, rep, seq_len)
    chunk = _query_chunk(n_heads + groups, seq_len, seq_len)
    total = _acc(qi).new_zeros(())
    rows = 0
    for start in range(0, seq_len, chunk):
        stop = min(seq_len, start + chunk)
        mask = _support_mask(block_idx[:, :, start:stop], q_time[:, start:stop], k_time, block_size)
        with torch.no_grad():
            logits = torch.einsum("bgrqd,bgkd->bgrqk", qg[:, :, :, start:stop], kf) * scale
            lse_c = lse_g[..., start:stop]
            lse_safe = torch.where(torch.isinf(lse_c), torch.zeros_like(lse_c), lse_c)
            teacher = torch.exp(logits - lse_safe[..., None]).masked_fill(~mask[:, :, None], 0.0)
            teacher = teacher.mean(2)  # [B, G, Lc, L]
            log_teacher = torch.log(teacher.clamp_min(1e-30))
        s = torch.einsum("bgqd,bkd->bgqk", _acc(qi[:, :, start:stop]), _acc(ki)) * index_scale
        s = s.masked_fill(~mask, float("-inf"))
        row_valid = mask.any(-1)  # [B, G, Lc]
        s = torch.where(row_valid[..., None], s, torch.zeros_like(s))
        log_student = torch.log_softmax(s, dim=-1)
        log_student = log_student.masked_fill(~mask, 0.0)
        kl = (teacher * (log_teacher - log_student)).masked_fill(~mask, 0.0).sum(-1)
        total = total + (kl * row_valid).sum()
        rows += int(row_valid.sum())
    return total / max(rows, 1)
