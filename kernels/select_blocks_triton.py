"""Streaming top-k block selection for MSA (Triton).

``select_blocks_triton`` has exactly the semantics of
:func:`tsfm_msa.kernels.reference.select_blocks_reference`; the ``[G, L, NB]`` score matrix never
reaches memory.

Algorithm
---------
* Work lists (torch, no host sync): per (batch, group set, tile of ``LIST_Q`` queries) the KV blocks
  with a key visible to some query of the tile (``min k_time <= max q_time``), split into *full* blocks
  (every key visible to every query: no per-element mask) and *partial* ones; blocks no group of the
  set may choose are dropped (unless forced).  One sorted int32 row per tile, ``[full..., partial...]``.
* A program per (batch, group set, query tile) holds ``M = GP * TILE_Q`` rows: all ``GP`` GQA groups of
  ``TILE_Q`` queries share every ``ki`` load and run as one ``tl.dot`` per KV block (fp32 accumulate).
  It walks its list: one ``[M, bs]`` score tile per block, time mask only on partial blocks, max-pool
  to one value per row, policy (``allowed``) and forced-block exclusion, then the value is written into
  column ``c`` of a ``[M, KPAD]`` candidate buffer.  Every ``KPAD`` blocks the candidates are merged
  into the running top-k: (score, block) pairs are packed into one int64 whose order is the float
  order of the score (sign-magnitude flip of the fp32 bits in the high word, the block id in the low
  word), so one ``tl.topk`` over ``[M, 2*KPAD]`` keys is exact and exp-free, and the score comes back
  bit-exact from the key.
* Blocks under 16 tokens (any power of two): a list step covers ``16 / bs`` consecutive blocks in one
  16-key tile (``tl.dot`` needs 16 columns), max-pooled per block (reshape ``[M, 16/bs, bs]``), so
  8-token blocks cost as many steps as 16-token ones.
* Forced blocks keep their own score buffer; they are written first (in their order, skipping ``-1``),
  then the best non-forced blocks, then ``-1``.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .reference import INT32_MAX, num_blocks
from .worklist import cached_on
from .validation import check_kernel_block_size, check_select_inputs

# Benchmarks may override the launch configuration: {"rows": M, "num_warps": w, "num_stages": s}.
CONFIG_OVERRIDE: dict = {}


@triton.jit
def _pack(score, ids):
    """fp32 score [M, C] + int32 block ids (broadcastable) -> int64 keys ordered like the scores."""
    bits = score.to(tl.int32, bitcast=True)
    skey = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (skey.to(tl.int64) << 32) | ids.to(tl.int64)


@triton.jit
def _unpack(key):
    skey = (key >> 32).to(tl.int32)
    bits = skey ^ ((skey >> 31) & 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True), (key & 0xFFFFFFFF).to(tl.int32)


@triton.jit
def _topk_by_rank(x, N: tl.constexpr, KOUT: tl.constexpr):
    """Top ``KOUT`` of the rows of ``x [M, N]`` (descending) by counting ranks: plain element-wise
    ops, used under the interpreter where the bitonic network of ``tl.topk`` runs slowly."""
    i = tl.arange(0, N)
    xi = x[:, :, None]
    xj = x[:, None, :]
    before = (xj > xi) | ((xj == xi) & (i[None, None, :] < i[None, :, None]))
    rank = tl.sum(before.to(tl.int32), axis=2)  # [M, N]
    r = tl.arange(0, KOUT)
    hit = rank[:, :, None] == r[None, None, :]  # [M, N, KOUT]
    return tl.sum(tl.where(hit, x[:, :, None], 0), axis=1)


@triton.jit
def _merge(top, cand, cids, M: tl.constexpr, KPAD: tl.constexpr, INTERP: tl.constexpr):
    packed = _pack(cand, cids[None, :])
    both = tl.reshape(tl.join(top, packed), [M, 2 * KPAD])
    if INTERP:
        return _topk_by_rank(both, 2 * KPAD, KPAD)
    else:
        return tl.topk(both, KPAD)


@triton.jit
def _take(bm, blk, slot, fidx, fsc, cand, cids, allowed_row_ptr, NB,
          KPAD: tl.constexpr, HAS_ALLOWED: tl.constexpr, HAS_FORCED: tl.constexpr):
    """Block ``blk``'s pooled scores ``bm [M]``: into the forced buffer if forced, else (when allowed)
    into candidate column ``slot``."""
    if HAS_FORCED:
        hit = fidx == blk
        fsc = tl.where(hit, bm[:, None], fsc)
        bm = tl.where(tl.max(hit.to(tl.int32), axis=1) > 0, float("-inf"), bm)
    if HAS_ALLOWED:
        ok = tl.load(allowed_row_ptr + tl.minimum(blk, NB - 1))  # blocks past NB score -inf anyway
        bm = tl.where(ok != 0, bm, float("-inf"))
    col = tl.arange(0, KPAD)
    cand = tl.where(col[None, :] == slot, bm[:, None], cand)
    cids = tl.where(col == slot, blk, cids)
    return fsc, cand, cids


@triton.jit
def _block_step(
    qv, qtime, t, lrow_ptr, ki_base, kt_base, allowed_row_ptr, fidx, fsc, cand, cids, c, L, NB, s_kl,
    MASKED: tl.constexpr, M: tl.constexpr, BS: tl.constexpr, SUB: tl.constexpr, DI: tl.constexpr,
    DIP: tl.constexpr, KPAD: tl.constexpr, HAS_ALLOWED: tl.constexpr, HAS_FORCED: tl.constexpr,
    IEEE: tl.constexpr,
):
    """One list step: ``SUB`` consecutive blocks (one tile of ``SUB * BS`` keys, >= 16 for tl.dot),
    scored with one dot, max-pooled per block, written to candidate columns ``c .. c + SUB - 1``."""
    TW: tl.constexpr = SUB * BS
    step = tl.load(lrow_ptr + t)
    offs_n = step * TW + tl.arange(0, TW)
    offs_d = tl.arange(0, DIP)
    kmask = (offs_n < L)[:, None] & (offs_d < DI)[None, :]
    kv = tl.load(ki_base + offs_n.to(tl.int64)[:, None] * s_kl + offs_d[None, :], mask=kmask, other=0.0)
    if IEEE:
        s = tl.dot(qv, tl.trans(kv), input_precision="ieee")
    else:
        s = tl.dot(qv, tl.trans(kv))
    if MASKED:  # (keys past L only occur in partial steps: their padding time is INT32_MAX)
        ktime = tl.load(kt_base + offs_n, mask=offs_n < L, other=2147483647)
        s = tl.where(ktime[None, :] <= qtime[:, None], s, float("-inf"))
    if SUB == 1:
        fsc, cand, cids = _take(tl.max(s, axis=1), step, c, fidx, fsc, cand, cids, allowed_row_ptr, NB,
                                KPAD, HAS_ALLOWED, HAS_FORCED)
    else:
        pooled = tl.max(tl.reshape(s, [M, SUB, BS]), axis=2)  # [M, SUB] one max per block
        sub = tl.arange(0, SUB)
        for u in tl.static_range(SUB):
            bm = tl.max(tl.where(sub[None, :] == u, pooled, float("-inf")), axis=1)
            # a block past the last one (tail of the last step) scores -inf and is never kept
            fsc, cand, cids = _take(bm, step * SUB + u, c + u, fidx, fsc, cand, cids, allowed_row_ptr, NB,
                                    KPAD, HAS_ALLOWED, HAS_FORCED)
    return fsc, cand, cids


@triton.jit
def _select_kernel(
    qi_ptr, ki_ptr, qt_ptr, kt_ptr, allowed_ptr, forced_ptr, list_ptr, cnt_ptr, out_idx_ptr, out_sc_ptr,
    L, NB, NL, G, K, F, NQL, NSETS,
    s_qb, s_qg, s_ql, s_kb, s_kl,
    BS: tl.constexpr, SUB: tl.constexpr, DI: tl.constexpr, DIP: tl.constexpr, TILE_Q: tl.constexpr, GP: tl.constexpr,
    KPAD: tl.constexpr, FPAD: tl.constexpr, LIST_RATIO: tl.constexpr,
    HAS_ALLOWED: tl.constexpr, HAS_FORCED: tl.constexpr, WRITE_SCORES: tl.constexpr, IEEE: tl.constexpr,
    INTERP: tl.constexpr,
):
    M: tl.constexpr = GP * TILE_Q
    pid_q = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = tl.program_id(2)

    r = tl.arange(0, M)
    g = pid_s * GP + r // TILE_Q
    qq = pid_q * TILE_Q + r % TILE_Q
    row_ok = (g < G) & (qq < L)
    qtime = tl.load(qt_ptr + b.to(tl.int64) * L + qq, mask=row_ok, other=-1)
    offs_d = tl.arange(0, DIP)
    q_off = b.to(tl.int64) * s_qb + g.to(tl.int64) * s_qg + qq.to(tl.int64) * s_ql
    qv = tl.load(qi_ptr + q_off[:, None] + offs_d[None, :], mask=row_ok[:, None] & (offs_d < DI)[None, :], other=0.0)

    lt = pid_q // LIST_RATIO
    lbase = (b * NSETS + pid_s) * NQL + lt
    lrow_ptr = list_ptr + lbase.to(tl.int64) * NL
    n_full = tl.load(cnt_ptr + lbase.to(tl.int64) * 2)
    n_part = tl.load(cnt_ptr + lbase.to(tl.int64) * 2 + 1)
    ki_base = ki_ptr + b.to(tl.int64) * s_kb
    kt_base = kt_ptr + b.to(tl.int64) * L
    allowed_row_ptr = allowed_ptr + (b * G + tl.minimum(g, G - 1)).to(tl.int64) * NB  # [M] pointers (unused without HAS_ALLOWED)

    col = tl.arange(0, KPAD)
    neg = tl.full([M, KPAD], float("-inf"), tl.float32)
    cand = neg
    cids = tl.zeros([KPAD], dtype=tl.int32)
    top = _pack(neg, col[None, :])  # distinct keys
    fcol = tl.arange(0, FPAD)
    if HAS_FORCED:
        fmask = row_ok[:, None] & (fcol < F)[None, :]
        f_off = ((b * G + g).to(tl.int64) * L + qq) * F
        fidx = tl.load(forced_ptr + f_off[:, None] + fcol[None, :], mask=fmask, other=-1)
    else:
        fidx = tl.full([M, FPAD], -1, tl.int32)
    fsc = tl.full([M, FPAD], float("-inf"), tl.float32)

    c = 0
    for t in range(0, n_full):
        fsc, cand, cids = _block_step(
            qv, qtime, t, lrow_ptr, ki_base, kt_base, allowed_row_ptr, fidx, fsc, cand, cids, c, L, NB, s_kl,
            False, M, BS, SUB, DI, DIP, KPAD, HAS_ALLOWED, HAS_FORCED, IEEE)
        c += SUB
        if c == KPAD:  # (KPAD is a multiple of SUB)
            top = _merge(top, cand, cids, M, KPAD, INTERP)
            cand = neg
            c = 0
    for t in range(n_full, n_full + n_part):
        fsc, cand, cids = _block_step(
            qv, qtime, t, lrow_ptr, ki_base, kt_base, allowed_row_ptr, fidx, fsc, cand, cids, c, L, NB, s_kl,
            True, M, BS, SUB, DI, DIP, KPAD, HAS_ALLOWED, HAS_FORCED, IEEE)
        c += SUB
        if c == KPAD:  # (KPAD is a multiple of SUB)
            top = _merge(top, cand, cids, M, KPAD, INTERP)
            cand = neg
            c = 0
    top = _merge(top, cand, cids, M, KPAD, INTERP)
    if INTERP:
        top = _topk_by_rank(top, KPAD, KPAD)
    else:
        top = tl.sort(top, descending=True)
    score, idx = _unpack(top)
    picked = score != float("-inf")
    idx = tl.where(picked, idx, -1)

    out_row = ((b * G + g).to(tl.int64) * L + qq) * K
    fvalid = fidx >= 0
    fv = fvalid.to(tl.int32)
    rank = tl.cumsum(fv, axis=1) - fv
    nf = tl.sum(fv, axis=1)
    if HAS_FORCED:
        fm = row_ok[:, None] & fvalid
        tl.store(out_idx_ptr + out_row[:, None] + rank, fidx, mask=fm)
        if WRITE_SCORES:
            tl.store(out_sc_ptr + out_row[:, None] + rank, fsc, mask=fm)
    slot = nf[:, None] + col[None, :]
    tm = row_ok[:, None] & (col[None, :] < (K - nf)[:, None])
    tl.store(out_idx_ptr + out_row[:, None] + slot, idx, mask=tm)
    if WRITE_SCORES:
        tl.store(out_sc_ptr + out_row[:, None] + slot, score, mask=tm)


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


def _build_lists(q_time, k_time, block_size, list_q, nsets, gp, groups, allowed, forced):
    """Sorted per-(batch, set, query tile) lists of KV steps (blocks of ``block_size`` tokens) [B, S, NQL, NB] int32 and counts
    [B, S, NQL, 2] (full, partial)."""
    batch, seq_len = q_time.shape
    nb = num_blocks(seq_len, block_size)
    nql = (seq_len + list_q - 1) // list_q
    kt = torch.nn.functional.pad(k_time, (0, nb * block_size - seq_len), value=INT32_MAX).view(batch, nb, block_size)
    kmin, kmax = kt.amin(-1), kt.amax(-1)
    qt = torch.nn.functional.pad(q_time, (0, nql * list_q - seq_len), value=-1).view(batch, nql, list_q)
    qmin, qmax = qt.amin(-1), qt.amax(-1)
    vis = kmin[:, None, :] <= qmax[:, :, None]  # [B, NQL, NB]
    full = (kmax[:, None, :] <= qmin[:, :, None]) & vis
    vis = vis[:, None].expand(batch, nsets, nql, nb)
    full = full[:, None].expand(batch, nsets, nql, nb)
    if allowed is not None:
        if nsets == 1:
            keep = allowed.any(1)[:, None, None, :]
        else:
            keep = allowed[:, :, None, :]
        if forced is not None:
            fa = torch.zeros(batch, nsets, nql, nb + 1, dtype=torch.bool, device=q_time.device)
            f = forced.long()
            bi = torch.arange(batch, device=f.device).view(batch, 1, 1, 1).expand_as(f)
            si = (torch.arange(groups, device=f.device) // gp if nsets > 1 else
                  torch.zeros(groups, dtype=torch.long, device=f.device)).view(1, groups, 1, 1).expand_as(f)
            li = (torch.arange(seq_len, device=f.device) // list_q).view(1, 1, seq_len, 1).expand_as(f)
            fi = torch.where(f < 0, nb, f)
            fa.index_put_((bi.reshape(-1), si.reshape(-1), li.reshape(-1), fi.reshape(-1)),
                          torch.ones((), dtype=torch.bool, device=f.device).expand(bi.numel()))
            keep = keep | fa[..., :nb]
        vis = vis & keep
        full = full & keep
    cls = 2 - vis.to(torch.int32) - full.to(torch.int32)
    key = cls * nb + torch.arange(nb, dtype=torch.int32, device=q_time.device)
    key = torch.sort(key, dim=-1).values
    lists = (key % nb).to(torch.int32).contiguous()
    n_full = full.sum(-1, dtype=torch.int32)
    n_part = vis.sum(-1, dtype=torch.int32) - n_full
    counts = torch.stack([n_full, n_part], -1).contiguous()
    return lists, counts, nql


def _launch(qi, ki, q_time, k_time, block_size, k, allowed, forced, write_scores):
    batch, groups, seq_len, index_dim = qi.shape
    nb = num_blocks(seq_len, block_size)
    check_kernel_block_size(block_size, "block_size")
    device = qi.device
    qi = qi.contiguous()
    ki = ki.contiguous()
    q_time = q_time.contiguous()
    k_time = k_time.contiguous()
    gpad = _next_pow2(groups)
    rows = int(CONFIG_OVERRIDE.get("rows", 128))
    # Group sets: all groups in one program (shared ki loads) unless the policy mask makes most of
    # that work useless (e.g. sensor policy: each block belongs to one group).
    per_group = False
    if allowed is not None and groups > 1:
        per_g = allowed.sum(dtype=torch.int64).item()
        union = allowed.any(1).sum(dtype=torch.int64).item()
        per_group = per_g < 0.75 * gpad * union
    if per_group:
        gp, nsets, tile_q = 1, groups, rows
    else:
        gp, nsets = gpad, 1
        tile_q = max(16, rows // gpad)
    list_q = max(tile_q, 128)
    # Blocks under 16 tokens: a list step covers ``sub`` consecutive blocks in one 16-key tile (the
    # lists, their full / partial split and the policy filter work on those 16-token steps).
    sub = max(1, 16 // block_size)
    n_steps = num_blocks(seq_len, sub * block_size)
    kpad = max(2, sub, _next_pow2(k))  # a multiple of sub: merges fall on step boundaries
    n_forced = 0 if forced is None else forced.shape[-1]
    fpad = max(2, _next_pow2(max(1, n_forced)))
    step_allowed, step_forced = allowed, forced
    if sub > 1:
        if allowed is not None:
            step_allowed = torch.nn.functional.pad(allowed, (0, n_steps * sub - nb)).view(batch, groups, n_steps, sub).any(-1)
        if forced is not None:
            step_forced = torch.where(forced < 0, -1, torch.div(forced, sub, rounding_mode="floor"))
    if allowed is None:  # the lists then depend on the times and sizes only (forced is not read)
        lists, counts, nql = cached_on(q_time, ("select_lists", sub * block_size, list_q, nsets, groups), (k_time,),
                                       lambda: _build_lists(q_time, k_time, sub * block_size, list_q, nsets, gp,
                                                            groups, None, None))
    else:
        lists, counts, nql = _build_lists(q_time, k_time, sub * block_size, list_q, nsets, gp, groups, step_allowed,
                                          step_forced)

    out_idx = torch.empty((batch, groups, seq_len, k), dtype=torch.int32, device=device)
    out_sc = torch.empty((batch, groups, seq_len, k), dtype=torch.float32, device=device)
    allowed_u8 = allowed.to(torch.uint8).contiguous() if allowed is not None else out_idx
    forced_i32 = forced.to(torch.int32).contiguous() if forced is not None else out_idx
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    # measured on the H200 at L=128K (tsfm shape): 4 warps / 2 stages 11.0 ms, 8 warps 16.0 ms
    num_warps = int(CONFIG_OVERRIDE.get("num_warps", 4))
    num_stages = int(CONFIG_OVERRIDE.get("num_stages", 2))
    grid = (triton.cdiv(seq_len, tile_q), nsets, batch)
    kwargs = {} if interp else {"num_warps": num_warps, "num_stages": num_stages}
    _select_kernel[grid](
        qi, ki, q_time, k_time, allowed_u8, forced_i32, lists, counts, out_idx, out_sc,
        seq_len, nb, n_steps, groups, k, max(1, n_forced), nql, nsets,
        qi.stride(0), qi.stride(1), qi.stride(2), ki.stride(0), ki.stride(1),
        BS=block_size, SUB=sub, DI=index_dim, DIP=max(16, _next_pow2(index_dim)), TILE_Q=tile_q, GP=gp,
        KPAD=kpad, FPAD=fpad, LIST_RATIO=list_q // tile_q,
        HAS_ALLOWED=allowed is not None, HAS_FORCED=forced is not None, WRITE_SCORES=write_scores,
        IEEE=qi.dtype == torch.float32, INTERP=interp, **kwargs,
    )
    return out_idx, out_sc


@torch.library.custom_op("tsfm_msa::select_blocks", mutates_args=())
def _select_blocks_op(
    qi: torch.Tensor, ki: torch.Tensor, q_time: torch.Tensor, k_time: torch.Tensor, block_size: int, k: int,
    allowed: Optional[torch.Tensor], forced: Optional[torch.Tensor], return_scores: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(qi, ki, q_time, k_time, block_size, k, allowed, forced, return_scores)


@_select_blocks_op.register_fake
def _(qi, ki, q_time, k_time, block_size, k, allowed, forced, return_scores):
    batch, groups, seq_len, _ = qi.shape
    shape = (batch, groups, seq_len, k)
    return qi.new_empty(shape, dtype=torch.int32), qi.new_empty(shape, dtype=torch.float32)


def select_blocks_triton(qi, ki, q_time, k_time, block_size, k, allowed=None, forced=None, return_scores=False):
    """Triton version of :func:`reference.select_blocks_reference` (same arguments and outputs)."""
    check_select_inputs(qi, ki, q_time, k_time, block_size, k, allowed, forced)
    if forced is not None and forced.shape[-1] == 0:
        forced = None
    idx, scores = _select_blocks_op(qi.detach(), ki.detach(), q_time, k_time, block_size, k, allowed, forced,
                                    bool(return_scores))
    if return_scores:
        return idx, scores
    return idx
