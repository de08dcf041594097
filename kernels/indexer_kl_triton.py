"""Fused indexer KL loss for MSA (Triton): KL(teacher || indexer) on the selected support.

``indexer_kl_triton`` matches :func:`tsfm_msa.kernels.reference.indexer_kl_reference` (value, and the
gradients for ``qi`` and ``ki``; ``q``, ``k`` and ``lse`` are constants).

Loop order: KV-outer over an inverted list, so every tensor-core tile is full whatever the selection
pattern (tile-shared or per-token random).
* Schedule: the work list of the attention kernels (:mod:`.worklist`; torch ops, deterministic, no
  host sync): every valid entry ``(b, g, i, slot)`` of ``block_idx`` is keyed by ``(b, block, g)``; a
  stable sort gives, per key, the list of its entries; each list is cut into work items of at most
  ``TQ * CH`` entries (a popular block is spread over many programs). The item count is bounded on
  the host; items past the real ones are empty.
* Forward: a program per work item loads the block's ``k`` (group g) and ``ki`` once, then for each
  chunk of ``TQ`` gathered queries computes the teacher ``p = mean_h exp(q_h . k * scale - lse_h)`` (all
  heads of the group, one ``[TQ, D] x [D, bs]`` dot each) and the student logits ``s = qi . ki * index_scale``
  on the visible keys, and writes five per-entry partials: ``max s``, ``sum exp(s - max)``,
  ``sum p log p``, ``sum p s``, ``sum p``.  Torch combines the slots of a row (``lse_s`` by LSE merge) and
  ``KL = sum p log p - sum p s + lse_s * sum p``: no ``L x L`` matrix, one pass.
* Blocks under 16 tokens (any power of two) run in 16-key tiles whose keys past the block are padding
  (off every support). Entry positions are int64 inside the kernels; the schedule is int64 once
  its sizes pass 2^31.
* Backward: the same items recompute ``p`` and ``s``; ``dS = (softmax(s) * sum p - p) * index_scale *
  grad / n_rows``.  ``dqi`` partials go to the entry's own slot (``[B, G, L, KS, Di]``, summed over KS
  by torch); ``dki`` accumulates in registers over the item's chunks and is written per item, then a
  second kernel sums the items of each KV block in a fixed order.  No atomics: deterministic.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .reference import num_blocks
from .validation import check_kernel_block_size, check_kl_inputs
from .worklist import block_csr, cached_on, chunks

CONFIG_OVERRIDE: dict = {}
_CHUNKS_PER_ITEM = 8


@triton.jit
def _kl_chunk(
    c0, end, b, g, blk, pos_base, rows_ptr, qi_ptr, q_ptr, lse_ptr, qt_ptr, kv, kiv, ktime,
    L, KS, G, R, scale, iscale,
    s_qib, s_qig, s_qil, s_qb, s_qh, s_ql, s_lb, s_lh,
    BSP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, DI: tl.constexpr, DIP: tl.constexpr,
    TQ: tl.constexpr, IEEE: tl.constexpr,
):
    """Teacher probabilities p [TQ, BSP], student logits s [TQ, BSP] (-inf off support), positions,
    support mask, qi rows of one chunk of gathered queries."""
    t = tl.arange(0, TQ)
    valid = c0 + t < end
    pos = pos_base + tl.load(rows_ptr + c0 + t, mask=valid, other=0).to(tl.int64)  # flat block_idx entry
    qidx = (pos // KS) % L
    qtime = tl.load(qt_ptr + b.to(tl.int64) * L + qidx, mask=valid, other=-1)
    offs_di = tl.arange(0, DIP)
    qiv = tl.load(qi_ptr + b.to(tl.int64) * s_qib + g.to(tl.int64) * s_qig + qidx[:, None] * s_qil + offs_di[None, :],
                  mask=valid[:, None] & (offs_di < DI)[None, :], other=0.0)
    if IEEE:
        s = tl.dot(qiv, tl.trans(kiv), input_precision="ieee")
    else:
        s = tl.dot(qiv, tl.trans(kiv))
    # teacher: mean over the group's R heads, one [TQ, D] x [D, BSP] dot per head
    offs_d = tl.arange(0, DP)
    q_rows = q_ptr + b.to(tl.int64) * s_qb + qidx[:, None] * s_ql + offs_d[None, :]
    qmask = valid[:, None] & (offs_d < D)[None, :]
    lse_rows = lse_ptr + b.to(tl.int64) * s_lb + qidx
    p = tl.zeros([TQ, BSP], dtype=tl.float32)
    LOG2E: tl.constexpr = 1.4426950408889634
    for r in range(0, R):
        head = (g * R + r).to(tl.int64)
        qv = tl.load(q_rows + head * s_qh, mask=qmask, other=0.0)
        lse_h = tl.load(lse_rows + head * s_lh, mask=valid, other=0.0)
        lse_h = tl.where(lse_h == float("-inf"), 0.0, lse_h) * LOG2E
        if IEEE:
            logit = tl.dot(qv, tl.trans(kv), input_precision="ieee")
        else:
            logit = tl.dot(qv, tl.trans(kv))
        p += tl.exp2(logit * (scale * LOG2E) - lse_h[:, None])
    p = p / R
    sup = valid[:, None] & (ktime[None, :] <= qtime[:, None])
    p = tl.where(sup, p, 0.0)
    s = tl.where(sup, s * iscale, float("-inf"))
    return p, s, pos, valid, sup, qiv


@triton.jit
def _work_block(w, key_ptr, start_ptr, len_ptr, ki_ptr, k_ptr, kt_ptr, L, KS, G, NB, s_kib, s_kil, s_kb, s_kh, s_kl,
                BS: tl.constexpr, BSP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, DI: tl.constexpr,
                DIP: tl.constexpr):
    """Work item ``w`` of the list (one KV block of one group and its chunk of query rows): its
    indices, the row range and the block's keys, index keys and key times, loaded once."""
    key = tl.load(key_ptr + w)  # (b * NB + blk) * G + g; chunks past the real ones have length 0
    start = tl.load(start_ptr + w)  # int64 once the entries pass 2^31
    end = start + tl.load(len_ptr + w)
    g = key % G
    blk = (key // G) % NB
    b = key // G // NB
    pos_base = (b * G + g).to(tl.int64) * L * KS
    # Blocks under 16 tokens run in a 16-key tile (tl.dot needs 16): the keys past the block load as
    # padding (time INT32_MAX), so they are off every row's support.
    jn = tl.arange(0, BSP)
    offs_n = blk * BS + jn
    nmask = offs_n < L
    if BSP != BS:
        nmask = nmask & (jn < BS)
    offs_d = tl.arange(0, DP)
    offs_di = tl.arange(0, DIP)
    kv = tl.load(k_ptr + b.to(tl.int64) * s_kb + g.to(tl.int64) * s_kh + offs_n.to(tl.int64)[:, None] * s_kl + offs_d[None, :],
                 mask=nmask[:, None] & (offs_d < D)[None, :], other=0.0)
    kiv = tl.load(ki_ptr + b.to(tl.int64) * s_kib + offs_n.to(tl.int64)[:, None] * s_kil + offs_di[None, :],
                  mask=nmask[:, None] & (offs_di < DI)[None, :], other=0.0)
    ktime = tl.load(kt_ptr + b.to(tl.int64) * L + offs_n, mask=nmask, other=2147483647)
    return b, g, blk, start, end, pos_base, jn, kv, kiv, ktime


@triton.jit
def _kl_fwd_kernel(
    key_ptr, start_ptr, len_ptr, rows_ptr, qi_ptr, ki_ptr, q_ptr, k_ptr, lse_ptr, qt_ptr, kt_ptr, part_ptr,
    L, KS, G, R, NB, NTOT, scale, iscale,
    s_qib, s_qig, s_qil, s_kib, s_kil, s_qb, s_qh, s_ql, s_kb, s_kh, s_kl, s_lb, s_lh,
    BS: tl.constexpr, BSP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, DI: tl.constexpr,
    DIP: tl.constexpr, TQ: tl.constexpr, IEEE: tl.constexpr,
):
    w = tl.program_id(0)
    b, g, blk, start, end, pos_base, jn, kv, kiv, ktime = _work_block(
        w, key_ptr, start_ptr, len_ptr, ki_ptr, k_ptr, kt_ptr, L, KS, G, NB, s_kib, s_kil, s_kb, s_kh, s_kl,
        BS, BSP, D, DP, DI, DIP)
    for c0 in range(start, end, TQ):
        p, s, pos, valid, sup, qiv = _kl_chunk(
            c0, end, b, g, blk, pos_base, rows_ptr, qi_ptr, q_ptr, lse_ptr, qt_ptr, kv, kiv, ktime,
            L, KS, G, R, scale, iscale, s_qib, s_qig, s_qil, s_qb, s_qh, s_ql, s_lb, s_lh,
            BSP, D, DP, DI, DIP, TQ, IEEE)
        m = tl.max(s, axis=1)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        lsum = tl.sum(tl.exp(s - m_safe[:, None]), axis=1)
        plogp = tl.sum(p * tl.log(tl.maximum(p, 1e-30)), axis=1)
        ps = tl.sum(p * tl.where(sup, s, 0.0), axis=1)
        psum = tl.sum(p, axis=1)
        # 64-bit: 4 * NTOT passes 2^31 once B * G * L * KS >= 2^29.
        ntot = NTOT.to(tl.int64)
        tl.store(part_ptr + pos, m, mask=valid)
        tl.store(part_ptr + ntot + pos, lsum, mask=valid)
        tl.store(part_ptr + 2 * ntot + pos, plogp, mask=valid)
        tl.store(part_ptr + 3 * ntot + pos, ps, mask=valid)
        tl.store(part_ptr + 4 * ntot + pos, psum, mask=valid)


@triton.jit
def _kl_bwd_kernel(
    key_ptr, start_ptr, len_ptr, rows_ptr, qi_ptr, ki_ptr, q_ptr, k_ptr, lse_ptr, qt_ptr, kt_ptr, lses_ptr, psum_ptr,
    coef_ptr, dqi_part_ptr, dki_part_ptr,
    L, KS, G, R, NB, scale, iscale,
    s_qib, s_qig, s_qil, s_kib, s_kil, s_qb, s_qh, s_ql, s_kb, s_kh, s_kl, s_lb, s_lh,
    BS: tl.constexpr, BSP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, DI: tl.constexpr,
    DIP: tl.constexpr, TQ: tl.constexpr, IEEE: tl.constexpr,
):
    w = tl.program_id(0)
    b, g, blk, start, end, pos_base, jn, kv, kiv, ktime = _work_block(
        w, key_ptr, start_ptr, len_ptr, ki_ptr, k_ptr, kt_ptr, L, KS, G, NB, s_kib, s_kil, s_kb, s_kh, s_kl,
        BS, BSP, D, DP, DI, DIP)
    offs_di = tl.arange(0, DIP)
    coef = tl.load(coef_ptr)
    acc = tl.zeros([BSP, DIP], dtype=tl.float32)
    for c0 in range(start, end, TQ):
        p, s, pos, valid, sup, qiv = _kl_chunk(
            c0, end, b, g, blk, pos_base, rows_ptr, qi_ptr, q_ptr, lse_ptr, qt_ptr, kv, kiv, ktime,
            L, KS, G, R, scale, iscale, s_qib, s_qig, s_qil, s_qb, s_qh, s_ql, s_lb, s_lh,
            BSP, D, DP, DI, DIP, TQ, IEEE)
        row = pos // KS  # (b, g, i) flat row
        lse_s = tl.load(lses_ptr + row, mask=valid, other=0.0)
        lse_s = tl.where(lse_s == float("-inf"), 0.0, lse_s)
        ps = tl.load(psum_ptr + row, mask=valid, other=0.0)
        ds = tl.exp(s - lse_s[:, None]) * ps[:, None] - p
        ds = tl.where(sup, ds * coef, 0.0)
        dsc = ds.to(kiv.dtype)
        if IEEE:
            dq = tl.dot(dsc, kiv, input_precision="ieee")
            acc += tl.dot(tl.trans(dsc), qiv, input_precision="ieee")
        else:
            dq = tl.dot(dsc, kiv)
            acc += tl.dot(tl.trans(dsc), qiv)
        tl.store(dqi_part_ptr + pos[:, None] * DI + offs_di[None, :], dq,
                 mask=valid[:, None] & (offs_di < DI)[None, :])
    smask = (offs_di < DI)[None, :]
    if BSP != BS:
        smask = smask & (jn < BS)[:, None]
    tl.store(dki_part_ptr + w.to(tl.int64) * (BS * DI) + jn[:, None] * DI + offs_di[None, :], acc, mask=smask)


@triton.jit
def _dki_reduce_kernel(
    dki_part_ptr, item_off_ptr, dki_ptr, L, NB,
    BS: tl.constexpr, DI: tl.constexpr, DIP: tl.constexpr,
):
    pid = tl.program_id(0)  # b * NB + blk
    b = pid // NB
    blk = pid % NB
    lo = tl.load(item_off_ptr + pid)
    hi = tl.load(item_off_ptr + pid + 1)
    offs_n = tl.arange(0, BS)
    offs_di = tl.arange(0, DIP)
    dmask = (offs_di < DI)[None, :]
    acc = tl.zeros([BS, DIP], dtype=tl.float32)
    src = dki_part_ptr + lo.to(tl.int64) * (BS * DI) + offs_n[:, None] * DI + offs_di[None, :]
    for _ in range(lo, hi):
        acc += tl.load(src, mask=dmask, other=0.0)
        src += BS * DI
    tok = blk * BS + offs_n
    tl.store(dki_ptr + (b.to(tl.int64) * L + tok[:, None]) * DI + offs_di[None, :], acc,
             mask=(tok < L)[:, None] & dmask)


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


def _config(rep: int):
    """Gathered queries per chunk (rows of every dot)."""
    default = 16 if os.environ.get("TRITON_INTERPRET") == "1" else 64
    return int(CONFIG_OVERRIDE.get("tq", default))


def _schedule_of(block_idx: torch.Tensor, seq_len: int, block_size: int, tq: int):
    """:func:`_schedule` built once per selection: the forward's serves the backward."""
    return cached_on(block_idx, ("kl_schedule", seq_len, block_size, tq), (),
                     lambda: _schedule(block_idx, seq_len, block_size, tq))


def _schedule(block_idx: torch.Tensor, seq_len: int, block_size: int, tq: int):
    """Work list of the KL kernels (shared with the attention kernels, :mod:`.worklist`): keys
    ``(b * NB + blk) * G + g`` so that the chunks of one KV block are adjacent for the dki reduction.
    Returns ``(key, start, length)`` per chunk, the entries ``rows`` (``q * K + slot`` inside their
    (b, g)) and ``chunk_off [B * NB + 1]``, the chunks of each (b, block)."""
    batch, groups, _, _ = block_idx.shape
    nb = num_blocks(seq_len, block_size)
    rows, offsets = block_csr(block_idx, nb, groups_inner=True)
    key, start, length, n_chunks, first = chunks(offsets, tq * _CHUNKS_PER_ITEM, rows.numel())
    chunk_off = torch.cat([first.view(batch * nb, groups)[:, 0], n_chunks])
    return (key, start, length), rows, chunk_off


def _common(qi, ki, q, k, lse, q_time, k_time, scale, index_scale):
    rep = q.shape[1] // qi.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    index_scale = 1.0 / math.sqrt(qi.shape[-1]) if index_scale is None else index_scale
    tensors = [t.contiguous() for t in (qi, ki, q, k, lse, q_time, k_time)]
    return rep, float(scale), float(index_scale), tensors


def _strides(qi, ki, q, k, lse):
    return (qi.stride(0), qi.stride(1), qi.stride(2), ki.stride(0), ki.stride(1),
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            lse.stride(0), lse.stride(1))


def _launch_kwargs(tq):
    if os.environ.get("TRITON_INTERPRET") == "1":
        return {}
    return {"num_warps": int(CONFIG_OVERRIDE.get("num_warps", 4)),
            "num_stages": int(CONFIG_OVERRIDE.get("num_stages", 2))}


def _consts(qi, q):
    head_dim, index_dim = q.shape[-1], qi.shape[-1]
    return dict(D=head_dim, DP=max(16, _next_pow2(head_dim)), DI=index_dim, DIP=max(16, _next_pow2(index_dim)),
                IEEE=qi.dtype == torch.float32)


def _kl_forward(qi, ki, block_idx, q, k, lse, q_time, k_time, block_size, scale, index_scale):
    batch, groups, seq_len, kslots = block_idx.shape
    rep, scale, index_scale, (qi, ki, q, k, lse, q_time, k_time) = _common(qi, ki, q, k, lse, q_time, k_time, scale, index_scale)
    tq = _config(rep)
    work, rows, _ = _schedule_of(block_idx, seq_len, block_size, tq)
    ntot = block_idx.numel()
    part = torch.zeros(5, ntot, dtype=torch.float32, device=qi.device)
    part[0].fill_(float("-inf"))
    _kl_fwd_kernel[(work[0].numel(),)](
        *work, rows, qi, ki, q, k, lse, q_time, k_time, part,
        seq_len, kslots, groups, rep, num_blocks(seq_len, block_size), ntot, scale, index_scale,
        *_strides(qi, ki, q, k, lse),
        BS=block_size, BSP=max(16, block_size), TQ=tq, **_consts(qi, q), **_launch_kwargs(tq))
    m, lsum, plogp, ps, psum = (x.view(batch, groups, seq_len, kslots) for x in part)
    mmax = m.amax(-1)
    row_valid = mmax > float("-inf")
    # (scalar fill values: no zeros_like / full_like launches)
    mref = torch.where(row_valid, mmax, 0.0)
    lse_s = mref + torch.log((lsum * torch.exp(m - mref[..., None])).sum(-1))
    lse_s = torch.where(row_valid, lse_s, float("-inf"))
    psum_r = psum.sum(-1)
    kl = plogp.sum(-1) - ps.sum(-1) + torch.where(row_valid, lse_s, 0.0) * psum_r
    n_rows = row_valid.sum().to(torch.float32)
    loss = torch.where(row_valid, kl, 0.0).sum() / n_rows.clamp_min(1.0)
    return loss, lse_s.contiguous(), psum_r.contiguous(), n_rows


def _kl_backward(grad, qi, ki, block_idx, q, k, lse, q_time, k_time, lse_s, psum, n_rows, block_size, scale, index_scale):
    batch, groups, seq_len, kslots = block_idx.shape
    index_dim = qi.shape[-1]
    rep, scale, index_scale, (qi, ki, q, k, lse, q_time, k_time) = _common(qi, ki, q, k, lse, q_time, k_time, scale, index_scale)
    tq = _config(rep)
    work, rows, chunk_off = _schedule_of(block_idx, seq_len, block_size, tq)
    nb = num_blocks(seq_len, block_size)
    coef = (grad.float() * index_scale / n_rows.clamp_min(1.0)).reshape(1).contiguous()
    dqi_part = torch.zeros(batch, groups, seq_len, kslots, index_dim, dtype=torch.float32, device=qi.device)
    nw = work[0].numel()
    dki_part = torch.empty(nw, block_size, index_dim, dtype=torch.float32, device=qi.device)
    dki = torch.empty(batch, seq_len, index_dim, dtype=torch.float32, device=qi.device)
    consts = _consts(qi, q)
    _kl_bwd_kernel[(nw,)](
        *work, rows, qi, ki, q, k, lse, q_time, k_time, lse_s, psum, coef, dqi_part, dki_part,
        seq_len, kslots, groups, rep, nb, scale, index_scale, *_strides(qi, ki, q, k, lse),
        BS=block_size, BSP=max(16, block_size), TQ=tq, **consts, **_launch_kwargs(tq))
    _dki_reduce_kernel[(batch * nb,)](dki_part, chunk_off, dki, seq_len, nb, BS=block_size, DI=index_dim,
                                      DIP=consts["DIP"])
    dqi = dqi_part.sum(3)
    return dqi.to(qi.dtype), dki.to(ki.dtype)


@torch.library.custom_op("tsfm_msa::indexer_kl_fwd", mutates_args=())
def _kl_fwd_op(
    qi: torch.Tensor, ki: torch.Tensor, block_idx: torch.Tensor, q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor,
    q_time: torch.Tensor, k_time: torch.Tensor, block_size: int, scale: Optional[float], index_scale: Optional[float],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kl_forward(qi, ki, block_idx, q, k, lse, q_time, k_time, block_size, scale, index_scale)


@_kl_fwd_op.register_fake
def _(qi, ki, block_idx, q, k, lse, q_time, k_time, block_size, scale, index_scale):
    batch, groups, seq_len, _ = qi.shape
    f32 = torch.float32
    return (qi.new_empty((), dtype=f32), qi.new_empty((batch, groups, seq_len), dtype=f32),
            qi.new_empty((batch, groups, seq_len), dtype=f32), qi.new_empty((), dtype=f32))


@torch.library.custom_op("tsfm_msa::indexer_kl_bwd", mutates_args=())
def _kl_bwd_op(
    grad: torch.Tensor, qi: torch.Tensor, ki: torch.Tensor, block_idx: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
    lse: torch.Tensor, q_time: torch.Tensor, k_time: torch.Tensor, lse_s: torch.Tensor, psum: torch.Tensor,
    n_rows: torch.Tensor, block_size: int, scale: Optional[float], index_scale: Optional[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    return _kl_backward(grad, qi, ki, block_idx, q, k, lse, q_time, k_time, lse_s, psum, n_rows, block_size, scale,
                        index_scale)


@_kl_bwd_op.register_fake
def _(grad, qi, ki, block_idx, q, k, lse, q_time, k_time, lse_s, psum, n_rows, block_size, scale, index_scale):
    return torch.empty_like(qi), torch.empty_like(ki)


def _setup_context(ctx, inputs, output):
    qi, ki, block_idx, q, k, lse, q_time, k_time, block_size, scale, index_scale = inputs
    _, lse_s, psum, n_rows = output
    ctx.save_for_backward(qi, ki, block_idx, q, k, lse, q_time, k_time, lse_s, psum, n_rows)
    ctx.args = (block_size, scale, index_scale)


def _backward(ctx, grad_loss, grad_lse_s, grad_psum, grad_n):
    qi, ki, block_idx, q, k, lse, q_time, k_time, lse_s, psum, n_rows = ctx.saved_tensors
    block_size, scale, index_scale = ctx.args
    if grad_loss is None:
        return (None,) * 11
    dqi, dki = _kl_bwd_op(grad_loss, qi, ki, block_idx, q, k, lse, q_time, k_time, lse_s, psum, n_rows, block_size,
                          scale, index_scale)
    return dqi, dki, None, None, None, None, None, None, None, None, None


_kl_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def indexer_kl_triton(qi, ki, block_idx, q, k, lse, q_time, k_time, block_size, scale=None, index_scale=None):
    """Triton version of :func:`reference.indexer_kl_reference`: the scalar KL loss; gradients flow to
    ``qi`` and ``ki`` only."""
    check_kl_inputs(qi, ki, block_idx, q, k, lse, q_time, k_time, block_size)
    check_kernel_block_size(block_size, "block_size")
    loss, _, _, _ = _kl_fwd_op(qi, ki, block_idx, q.detach(), k.detach(), lse.detach(), q_time, k_time, block_size,
                               None if scale is None else float(scale),
                               None if index_scale is None else float(index_scale))
    return loss
