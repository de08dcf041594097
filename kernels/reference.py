"""Plain-PyTorch references of the three MSA ops (DESIGN.md section 5).

They are exact (fp32 accumulation, fp64 for fp64 inputs), differentiable through autograd, and are
what CPU training runs. The Triton kernels beside them must match them on every valid input.

Cost: ``sparse_attention_reference`` and ``indexer_kl_reference`` gather the keys of the selected
blocks (``[.., Lc, K * bs, D]`` per query chunk), so their work and memory are O(L * K * bs) per
head, never O(L^2). Their backward passes recompute the gathered tiles chunk by chunk (as the
kernels do) instead of keeping them for autograd, so a step holds only O(L) per head between forward
and backward. ``select_blocks_reference`` scores every visible key (O(L^2) work) but in chunks.
Every chunk covers whole (batch row, query) pairs and its largest tensor holds at most
``CHUNK_ELEMENTS`` elements, whatever the batch, heads, K and block size.

Conventions shared by all ops:
- ``B`` batch, ``L`` tokens, ``Hq`` query heads, ``G`` KV heads (= GQA groups), ``D`` head dim,
  ``Di`` index dim, ``K`` block slots, ``bs`` block size, ``NB = ceil(L / bs)`` KV blocks.
- Block ``b`` holds tokens ``[b * bs, (b + 1) * bs)``; a last partial block is allowed.
- Key ``j`` is visible to query ``i`` iff ``k_time[j] <= q_time[i]``. Padding keys carry
  ``k_time = INT32_MAX`` (seen by no query); padding queries carry ``q_time = -1`` (see no key).
- ``block_idx [B, G, L, K]`` int32 lists the selected blocks of each (group, query); ``-1`` marks an
  empty slot; valid entries of one row are distinct (a repeated block would be counted twice).
- A query with no visible key in its selected blocks gets ``out = 0`` and ``lse = -inf``.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.nn import functional as F

from .validation import check_attention_inputs, check_kl_inputs, check_select_inputs

INT32_MAX = torch.iinfo(torch.int32).max
# Time of the tokens that pad the last block and of the spare block behind empty slots: later than
# any int32 query time, so no query sees them.
_NEVER = 1 << 62

# Elements of the largest tensor of one chunk (16 MiB in fp32): bounds the references' CPU memory
# while keeping the op count (Python and thread-pool overhead per op) low. Measured on 2 shared
# cores: 1 << 22 and 1 << 19 cost about the same on one thread; 1 << 22 did better on two.
CHUNK_ELEMENTS = 1 << 22


def num_blocks(seq_len: int, block_size: int) -> int:
    return (seq_len + block_size - 1) // block_size


def _chunks(batch: int, seq_len: int, per_row: int) -> Iterator[tuple[slice, slice]]:
    """(batch slice, query slice) pairs covering ``[B, L]``, each with at most
    ``CHUNK_ELEMENTS // per_row`` (batch row, query) pairs; ``per_row`` is the element count of the
    largest tensor per pair."""
    rows = max(1, CHUNK_ELEMENTS // max(1, per_row))
    if rows >= seq_len:  # whole sequences, several batch rows at once
        step = min(batch, rows // seq_len)
        for b in range(0, batch, step):
            yield slice(b, min(batch, b + step)), slice(0, seq_len)
        return
    for b in range(batch):
        for start in range(0, seq_len, rows):
            yield slice(b, b + 1), slice(start, min(seq_len, start + rows))


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: fp32, or fp64 for fp64 inputs."""
    return torch.promote_types(t.dtype, torch.float32)


def _token_blocks(x: torch.Tensor, block_size: int, fill: float | int) -> torch.Tensor:
    """``[..., L, D] -> [..., NB + 1, bs * D]``: tokens cut into blocks (the last partial one padded
    with ``fill``) and one spare all-``fill`` block at index ``NB`` for the empty slots."""
    seq_len = x.shape[-2]
    pad = (num_blocks(seq_len, block_size) + 1) * block_size - seq_len
    x = F.pad(x, (0, 0, 0, pad), value=fill)
    return x.unflatten(-2, (-1, block_size)).flatten(-2).contiguous()


class _Gather:
    """Gathers the tokens of the selected blocks of a chunk of (batch row, group, query) rows.

    Built once per call from ``k_time [B, L]``; the block tensors it gathers from come from
    :func:`_token_blocks`. Block ``NB`` is the spare block behind the ``-1`` slots.
    """

    def __init__(self, block_idx: torch.Tensor, k_time: torch.Tensor, block_size: int) -> None:
        self.block_idx, self.block_size = block_idx, block_size
        self.groups = block_idx.shape[1]
        self.n_blocks = num_blocks(k_time.shape[-1], block_size) + 1  # with the spare block
        self.key_times = _token_blocks(k_time.long()[..., None], block_size, _NEVER)  # [B, NB + 1, bs]

    def slots(self, bsl: slice, qsl: slice) -> torch.Tensor:
        """Block of each slot ``[Bc, G, Lc, K]`` int64, the spare block for empty slots."""
        idx = self.block_idx[bsl, :, qsl].long()
        return torch.where(idx < 0, self.n_blocks - 1, idx)

    def group_rows(self, slots: torch.Tensor) -> torch.Tensor:
        """Flat rows of ``[B * G * (NB + 1)]`` (per-group block tensors of the batch slice)."""
        batch, groups = slots.shape[:2]
        base = torch.arange(batch * groups, device=slots.device).view(batch, groups, 1, 1) * self.n_blocks
        return (slots + base).flatten()

    def shared_rows(self, slots: torch.Tensor) -> torch.Tensor:
        """Flat rows of ``[B * (NB + 1)]`` (block tensors shared by the groups)."""
        base = torch.arange(slots.shape[0], device=slots.device).view(-1, 1, 1, 1) * self.n_blocks
        return (slots + base).flatten()

    @staticmethod
    def take(blocks: torch.Tensor, rows: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """``blocks [N, bs * X]`` rows ``rows`` -> ``[*shape]`` (slots and block tokens merged)."""
        return blocks.index_select(0, rows).view(shape)

    def visible(self, slots: torch.Tensor, bsl: slice, qsl: slice, q_time: torch.Tensor) -> torch.Tensor:
        """``[Bc, G, Lc, K * bs]`` bool: the gathered key exists and its time is visible to the query."""
        bc, groups, lc, slot_count = slots.shape
        times = self.take(self.key_times[bsl].view(-1, self.block_size), self.shared_rows(slots),
                          (bc, groups, lc, slot_count * self.block_size))
        return times <= q_time[bsl, None, qsl, None]

    @staticmethod
    def scatter_add(blocks: torch.Tensor, rows: torch.Tensor, grads: torch.Tensor) -> None:
        """Adds ``grads [.., K * bs, X]`` of the gathered tokens back into ``blocks [N, bs * X]``."""
        blocks.index_add_(0, rows, grads.reshape(rows.shape[0], blocks.shape[1]))


def _safe_lse(lse: torch.Tensor) -> torch.Tensor:
    """``lse`` with ``-inf`` (empty support) replaced by 0, so ``exp(logit - lse)`` stays 0 there."""
    return torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)


def topk_blocks(
    block_scores: torch.Tensor,  # [B, G, Lq, NB] float32, -inf = no visible key
    k: int,
    allowed: torch.Tensor | None,  # [B, G, NB] bool
    forced: torch.Tensor | None,  # [B, G, Lq, F] int, -1 = none
    return_scores: bool,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` from max-pooled block scores with the policy mask and forced blocks: forced first
    (bypassing ``allowed`` and visibility), then the best allowed blocks with a visible key, then -1.
    Shared by the select references (full and decode) and the decode Triton path (whose kernel
    writes ``block_scores``)."""
    batch, groups, n_q, nb = block_scores.shape
    neg_inf = float("-inf")
    key = block_scores
    if allowed is not None:
        key = key.masked_fill(~allowed[:, :, None, :], neg_inf)
    if forced is not None:
        f = forced.long()
        is_forced = torch.zeros(batch, groups, n_q, nb + 1, dtype=torch.bool, device=key.device)
        is_forced.scatter_(-1, torch.where(f < 0, nb, f), True)  # column nb takes the -1 entries
        key = key.masked_fill(is_forced[..., :nb], float("inf"))
    width = min(k, nb)
    top_key, top_idx = torch.topk(key, width, dim=-1)
    empty = top_key == neg_inf
    block_idx = torch.full((batch, groups, n_q, k), -1, dtype=torch.int32, device=key.device)
    block_idx[..., :width] = torch.where(empty, -1, top_idx).to(torch.int32)
    if not return_scores:
        return block_idx
    scores = torch.full((batch, groups, n_q, k), neg_inf, device=key.device)
    scores[..., :width] = torch.gather(block_scores, -1, top_idx).masked_fill(empty, neg_inf)
    return block_idx, scores


def select_blocks_reference(
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
    check_select_inputs(qi, ki, q_time, k_time, block_size, k, allowed, forced)
    batch, groups, seq_len, index_dim = qi.shape
    nb = num_blocks(seq_len, block_size)
    device = qi.device
    out_idx = torch.full((batch, groups, seq_len, k), -1, dtype=torch.int32, device=device)
    out_score = torch.full((batch, groups, seq_len, k), float("-inf"), device=device)
    neg_inf = float("-inf")
    # Keys cut into blocks; the padding of the last block is never visible.
    ki_blocks = _token_blocks(ki.float(), block_size, 0.0)[:, :nb].view(batch, nb, block_size, index_dim)
    key_times = _token_blocks(k_time.long()[..., None], block_size, _NEVER)[:, :nb]  # [B, NB, bs]
    first_time, last_time = key_times.amin(-1), key_times.amax(-1)  # [B, NB]; a partial last block is never whole
    qi_f = qi.float()
    with torch.no_grad():
        for bsl, qsl in _chunks(batch, seq_len, groups * nb * block_size):
            chunk_q_time = q_time[bsl, qsl].long()  # [Bc, Lc]
            # Tokens are time-ordered inside a sensor group (DESIGN.md section 3), so a chunk of
            # queries sees most blocks entirely or not at all: score only blocks with a key visible
            # to some query of the chunk, and mask keys only in blocks not visible to all of them.
            seen = (first_time[bsl] <= chunk_q_time.amax(-1, keepdim=True)).any(0)  # [NB]
            whole = (last_time[bsl] <= chunk_q_time.amin(-1, keepdim=True)).all(0)
            block_scores = qi_f.new_full((*out_idx[bsl, :, qsl].shape[:3], nb), neg_inf)  # [Bc, G, Lc, NB]
            for blocks, masked in ((torch.nonzero(whole).flatten(), False),
                                   (torch.nonzero(seen & ~whole).flatten(), True)):
                if blocks.numel() == 0:
                    continue
                # Keys ordered token-of-block major ([bs, n]): the max-pool then reduces a non-inner
                # dim, which vectorizes (about 10x faster than reducing runs of bs on the CPU).
                keys = ki_blocks[bsl][:, blocks].transpose(1, 2).flatten(1, 2)  # [Bc, bs * n, Di]
                # .float(): under bf16 autocast matmul returns bf16; the scores stay fp32.
                scores = torch.matmul(qi_f[bsl, :, qsl], keys.transpose(1, 2)[:, None]).float()  # [Bc, G, Lc, bs * n]
                if masked:
                    times = key_times[bsl][:, blocks].transpose(1, 2).flatten(1)  # [Bc, bs * n]
                    scores.masked_fill_(times[:, None, None, :] > chunk_q_time[:, None, :, None], neg_inf)
                block_scores[..., blocks] = scores.unflatten(-1, (block_size, -1)).amax(-2)
            out_idx[bsl, :, qsl], out_score[bsl, :, qsl] = topk_blocks(
                block_scores, k, None if allowed is None else allowed[bsl],
                None if forced is None else forced[bsl, :, qsl], return_scores=True)
    if return_scores:
        return out_idx, out_score
    return out_idx


class _SparseAttention(torch.autograd.Function):
    """Gathered block-sparse attention; the backward recomputes each chunk's probabilities from the
    saved ``lse``."""

    @staticmethod
    def forward(ctx, q, k, v, block_idx, q_time, k_time, block_size, scale):
        batch, n_heads, seq_len, head_dim = q.shape
        groups = k.shape[1]
        rep = n_heads // groups
        acc = _acc_dtype(q)
        gather = _Gather(block_idx, k_time, block_size)
        slot_tokens = block_idx.shape[-1] * block_size
        q_rows = q.to(acc).reshape(batch, groups, rep, seq_len, head_dim).transpose(2, 3).contiguous()  # [B, G, L, R, D]
        k_blocks = _token_blocks(k.to(acc), block_size, 0.0).view(-1, block_size * head_dim)
        v_blocks = _token_blocks(v.to(acc), block_size, 0.0).view(-1, block_size * head_dim)
        out = q_rows.new_zeros(batch, groups, seq_len, rep, head_dim)
        lse = q_rows.new_empty(batch, groups, seq_len, rep)
        for bsl, qsl in _chunks(batch, seq_len, groups * slot_tokens * max(head_dim, rep)):
            slots = gather.slots(bsl, qsl)
            rows = gather.group_rows(slots)
            tile = (*slots.shape[:3], slot_tokens, head_dim)
            kg = gather.take(k_blocks[_rows_of(bsl, groups, gather.n_blocks)], rows, tile)  # [Bc, G, Lc, S, D]
            logits = torch.matmul(q_rows[bsl, :, qsl], kg.transpose(-1, -2)) * scale  # [Bc, G, Lc, R, S]
            del kg
            visible = gather.visible(slots, bsl, qsl, q_time)
            logits.masked_fill_(~visible[..., None, :], float("-inf"))
            chunk_lse = torch.logsumexp(logits, dim=-1)  # [Bc, G, Lc, R]
            probs = torch.exp(logits - _safe_lse(chunk_lse)[..., None])
            del logits
            vg = gather.take(v_blocks[_rows_of(bsl, groups, gather.n_blocks)], rows, tile)
            out[bsl, :, qsl] = torch.matmul(probs, vg)
            lse[bsl, :, qsl] = chunk_lse
        ctx.save_for_backward(q, k, v, block_idx, q_time, k_time, out, lse)
        ctx.block_size, ctx.scale = block_size, scale
        ctx.set_materialize_grads(False)
        out_heads = out.transpose(2, 3).reshape(batch, n_heads, seq_len, head_dim).to(q.dtype)
        lse_heads = lse.transpose(2, 3).reshape(batch, n_heads, seq_len)
        return out_heads, lse_heads

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, block_idx, q_time, k_time, out, lse = ctx.saved_tensors
        block_size, scale = ctx.block_size, ctx.scale
        batch, n_heads, seq_len, head_dim = q.shape
        groups = k.shape[1]
        rep = n_heads // groups
        acc = out.dtype
        if grad_out is None and grad_lse is None:
            return (None,) * 8
        gather = _Gather(block_idx, k_time, block_size)
        slot_tokens = block_idx.shape[-1] * block_size
        q_rows = q.to(acc).reshape(batch, groups, rep, seq_len, head_dim).transpose(2, 3).contiguous()
        if grad_out is None:
            grad_out = torch.zeros_like(q_rows)
        else:
            grad_out = grad_out.to(acc).reshape(batch, groups, rep, seq_len, head_dim).transpose(2, 3).contiguous()
        if grad_lse is not None:
            grad_lse = grad_lse.to(acc).reshape(batch, groups, rep, seq_len).transpose(2, 3)
        # softmax backward: dS = P * (dP - rowsum(dO * O) + dlse)
        delta = (grad_out * out).sum(-1)  # [B, G, L, R]
        k_blocks = _token_blocks(k.to(acc), block_size, 0.0).view(-1, block_size * head_dim)
        v_blocks = _token_blocks(v.to(acc), block_size, 0.0).view(-1, block_size * head_dim)
        dq = torch.zeros_like(q_rows)
        dk_blocks, dv_blocks = torch.zeros_like(k_blocks), torch.zeros_like(v_blocks)
        for bsl, qsl in _chunks(batch, seq_len, groups * slot_tokens * max(head_dim, rep)):
            slots = gather.slots(bsl, qsl)
            rows = gather.group_rows(slots)
            tile = (*slots.shape[:3], slot_tokens, head_dim)
            own = _rows_of(bsl, groups, gather.n_blocks)
            kg = gather.take(k_blocks[own], rows, tile)  # [Bc, G, Lc, S, D]
            vg = gather.take(v_blocks[own], rows, tile)
            q_c, dout_c = q_rows[bsl, :, qsl], grad_out[bsl, :, qsl]  # [Bc, G, Lc, R, D]
            logits = torch.matmul(q_c, kg.transpose(-1, -2)) * scale  # [Bc, G, Lc, R, S]
            logits.masked_fill_(~gather.visible(slots, bsl, qsl, q_time)[..., None, :], float("-inf"))
            probs = torch.exp(logits - _safe_lse(lse[bsl, :, qsl])[..., None])
            del logits
            shift = -delta[bsl, :, qsl]
            if grad_lse is not None:
                shift = shift + grad_lse[bsl, :, qsl]
            d_logits = probs * (torch.matmul(dout_c, vg.transpose(-1, -2)) + shift[..., None])  # dS
            dq[bsl, :, qsl] = torch.matmul(d_logits, kg) * scale
            gather.scatter_add(dk_blocks[own], rows, torch.matmul(d_logits.transpose(-1, -2), q_c) * scale)
            gather.scatter_add(dv_blocks[own], rows, torch.matmul(probs.transpose(-1, -2), dout_c))
        dq = dq.transpose(2, 3).reshape(batch, n_heads, seq_len, head_dim).to(q.dtype)
        dk = _untoken_blocks(dk_blocks, batch, groups, seq_len, head_dim).to(k.dtype)
        dv = _untoken_blocks(dv_blocks, batch, groups, seq_len, head_dim).to(v.dtype)
        return dq, dk, dv, None, None, None, None, None


def _rows_of(bsl: slice, groups: int, n_blocks: int) -> slice:
    """The rows of the flat ``[B * G * (NB + 1), ...]`` block tensor that belong to batch slice ``bsl``."""
    return slice(bsl.start * groups * n_blocks, bsl.stop * groups * n_blocks)


def _untoken_blocks(blocks: torch.Tensor, batch: int, groups: int, seq_len: int, dim: int) -> torch.Tensor:
    """Inverse of :func:`_token_blocks` for ``[B * G * (NB + 1), bs * X]`` -> ``[B, G, L, X]``."""
    return blocks.view(batch, groups, -1, dim)[:, :, :seq_len]


def sparse_attention_reference(
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

    Returns ``out [B, Hq, L, D]`` (dtype of ``q``) and ``lse [B, Hq, L]`` float32 (float64 for fp64
    inputs; natural log). Differentiable in q, k, v (through ``out`` and ``lse``).
    """
    check_attention_inputs(q, k, v, block_idx, q_time, k_time, block_size)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _SparseAttention.apply(q, k, v, block_idx, q_time, k_time, block_size, scale)


class _IndexerKL(torch.autograd.Function):
    """KL(teacher || indexer) over gathered supports; the backward recomputes the student from the
    saved teacher probabilities (gradient ``softmax * sum(teacher) - teacher`` on the logits)."""

    @staticmethod
    def forward(ctx, qi, ki, block_idx, q, k, lse, q_time, k_time, block_size, scale, index_scale):
        batch, groups, seq_len, index_dim = qi.shape
        n_heads, head_dim = q.shape[1], q.shape[-1]
        rep = n_heads // groups
        acc = _acc_dtype(qi)
        gather = _Gather(block_idx, k_time, block_size)
        slot_tokens = block_idx.shape[-1] * block_size
        q_rows = q.to(acc).reshape(batch, groups, rep, seq_len, head_dim).transpose(2, 3).contiguous()  # [B, G, L, R, D]
        lse_rows = _safe_lse(lse.to(acc).reshape(batch, groups, rep, seq_len).transpose(2, 3))  # [B, G, L, R]
        k_blocks = _token_blocks(k.to(acc), block_size, 0.0).view(-1, block_size * head_dim)
        ki_blocks = _token_blocks(ki.to(acc), block_size, 0.0).view(-1, block_size * index_dim)
        qi_acc = qi.to(acc)
        teacher = qi_acc.new_empty(batch, groups, seq_len, slot_tokens)  # kept for the backward
        total = qi_acc.new_zeros(())
        rows_valid = 0
        per_row = groups * slot_tokens * max(head_dim, index_dim, rep)
        for bsl, qsl in _chunks(batch, seq_len, per_row):
            slots = gather.slots(bsl, qsl)
            lead = slots.shape[:3]
            kg = gather.take(k_blocks[_rows_of(bsl, groups, gather.n_blocks)], gather.group_rows(slots),
                             (*lead, slot_tokens, head_dim))
            visible = gather.visible(slots, bsl, qsl, q_time)  # [Bc, G, Lc, S]
            logits = torch.matmul(q_rows[bsl, :, qsl], kg.transpose(-1, -2)) * scale  # [Bc, G, Lc, R, S]
            del kg
            t = torch.exp(logits - lse_rows[bsl, :, qsl, :, None]).mean(-2).masked_fill(~visible, 0.0)
            del logits
            teacher[bsl, :, qsl] = t
            log_student = _student_log_probs(qi_acc, ki_blocks, gather, slots, bsl, qsl, visible, index_scale)
            row_valid = visible.any(-1)  # [Bc, G, Lc]
            kl = t * (torch.log(t.clamp_min(1e-30)) - log_student)
            total = total + kl.masked_fill(~visible, 0.0).sum()
            rows_valid += int(row_valid.sum())
        ctx.save_for_backward(qi, ki, block_idx, q_time, k_time, teacher)
        ctx.block_size, ctx.index_scale, ctx.rows_valid = block_size, index_scale, max(rows_valid, 1)
        return total / ctx.rows_valid

    @staticmethod
    def backward(ctx, grad_total):
        qi, ki, block_idx, q_time, k_time, teacher = ctx.saved_tensors
        block_size, index_scale = ctx.block_size, ctx.index_scale
        batch, groups, seq_len, index_dim = qi.shape
        acc = teacher.dtype
        gather = _Gather(block_idx, k_time, block_size)
        slot_tokens = block_idx.shape[-1] * block_size
        ki_blocks = _token_blocks(ki.to(acc), block_size, 0.0).view(-1, block_size * index_dim)
        qi_acc = qi.to(acc)
        dqi = torch.zeros_like(qi_acc)
        dki_blocks = torch.zeros_like(ki_blocks)
        weight = grad_total.to(acc) / ctx.rows_valid
        for bsl, qsl in _chunks(batch, seq_len, groups * slot_tokens * index_dim):
            slots = gather.slots(bsl, qsl)
            lead = slots.shape[:3]
            rows = gather.shared_rows(slots)
            kig = gather.take(ki_blocks[_rows_of(bsl, 1, gather.n_blocks)], rows, (*lead, slot_tokens, index_dim))
            visible = gather.visible(slots, bsl, qsl, q_time)
            z = torch.matmul(kig, qi_acc[bsl, :, qsl, :, None]).squeeze(-1) * index_scale  # [Bc, G, Lc, S]
            student = torch.softmax(z.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
            t = teacher[bsl, :, qsl]
            # Rows with an empty support have t = 0, hence no gradient.
            dz = (student * t.sum(-1, keepdim=True) - t) * (weight * index_scale)  # [Bc, G, Lc, S]
            dqi[bsl, :, qsl] = torch.matmul(dz[..., None, :], kig).squeeze(-2)
            gather.scatter_add(dki_blocks[_rows_of(bsl, 1, gather.n_blocks)], rows, dz[..., None] * qi_acc[bsl, :, qsl, None, :])
        dki = _untoken_blocks(dki_blocks, batch, 1, seq_len, index_dim)[:, 0]
        return dqi.to(qi.dtype), dki.to(ki.dtype), *(None,) * 9


def _student_log_probs(qi_acc, ki_blocks, gather, slots, bsl, qsl, visible, index_scale) -> torch.Tensor:
    """Indexer log-probabilities ``[Bc, G, Lc, S]`` over the support, 0 outside it (and on rows with
    an empty support)."""
    lead, index_dim = slots.shape[:3], qi_acc.shape[-1]
    slot_tokens = visible.shape[-1]
    kig = gather.take(ki_blocks[_rows_of(bsl, 1, gather.n_blocks)], gather.shared_rows(slots),
                      (*lead, slot_tokens, index_dim))
    z = torch.matmul(kig, qi_acc[bsl, :, qsl, :, None]).squeeze(-1) * index_scale  # [Bc, G, Lc, S]
    row_valid = visible.any(-1, keepdim=True)
    z = torch.where(row_valid, z.masked_fill(~visible, float("-inf")), torch.zeros_like(z))
    return torch.log_softmax(z, dim=-1).masked_fill(~visible, 0.0)


def indexer_kl_reference(
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
    check_kl_inputs(qi, ki, block_idx, q, k, lse, q_time, k_time, block_size)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    index_scale = 1.0 / math.sqrt(qi.shape[-1]) if index_scale is None else float(index_scale)
    return _IndexerKL.apply(qi, ki, block_idx, q.detach(), k.detach(), lse.detach(), q_time, k_time, block_size,
                            scale, index_scale)
