"""Block-sparse attention for MSA in Triton: forward and backward, two loop orders.

Semantics are exactly :func:`reference.sparse_attention_reference`: every query head of group ``g``
attends over the tokens of the blocks that ``block_idx[b, g, i]`` lists, token-level time mask
``k_time[j] <= q_time[i]``, natural-log ``lse``, ``out = 0`` and ``lse = -inf`` on an empty support.

Both variants pack the ``R = Hq / G`` query heads of a group into the rows of one tensor-core tile
(row ``r`` = head ``r // TQ`` of query ``r % TQ``), so one K/V block load serves all of them.

- ``query_outer``: a program per (batch, group, tile of ``TQ`` queries) walks the union of the
  blocks its queries chose, with a per-row membership mask. No partials; wasteful when the tile's
  queries disagree (the union grows while each query still uses only its own ``K`` blocks). The
  union comes from ``_tile_union_kernel`` (one sort per tile), which also flags the blocks that need
  no mask (chosen by every query of the tile, every key visible to all) and writes per union entry a
  bitmask of the tile's queries that chose it (membership = one load); K/V steps of 128 keys come
  through tensor descriptors (TMA) on sm_90+, pointer loads elsewhere (the interpreter).
- ``kv_outer``: ``block_idx`` is inverted into a CSR "KV block -> (query, slot) pairs that chose it";
  each block's list is cut into chunks of ``TQ`` queries (the chunk list is the schedule, so a
  popular block is spread over many programs); a program per chunk loads its K/V block once and
  writes a partial ``(out, lse)`` per (query, head, slot); a combine kernel merges the ``K``
  partials of each (query, head) through their LSEs. No atomics: deterministic.
- Backward: ``dk, dv`` by one owner program per KV block looping over the CSR list of its pairs
  (programs launched heaviest first); ``dq`` by a query-outer walk over the tile union (split), by
  fp32 atomic adds from the owners themselves (fused: S, P and dS computed once; ``CONFIG["bwd_fused"]``),
  or (kv_outer) as per-slot partials written by the owners and summed per query afterwards.

Long sequences run the kv_outer order in query segments so the partial buffers stay bounded.

Any block size runs: blocks are stepped in tiles of a power of two >= 16 keys with the keys past the
block masked (so 8-, 4-, 2- and 1-token blocks run in 16-key steps, always through the mask). Element
offsets are int64 wherever heads, slots or dims multiply; the CSR schedules turn int64 past 2^31 pairs.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from .triton_common import dot as _dot

from .validation import check_attention_inputs
from .worklist import block_csr, cached_on, chunks

INT32_MAX = 2**31 - 1
_I32_MAX = tl.constexpr(INT32_MAX)  # jit code may only read constexpr globals
_LOG2E = 1.4426950408889634

# Bytes one kv_outer segment may spend on its partial buffer ([B, Hq, Ls, K, D] in the input dtype).
_PARTIAL_BYTES = 4 << 30

# Launch configuration (H200 measurements in benchmarks/NOTES-attention.md; the benchmark overrides
# entries to compare them). ``*_rows`` is the number of tile rows (queries x padded heads) per program.
CONFIG = {
    # query-outer forward: 128 keys a step, 3 stages, K/V by TMA: 4.97 ms against 5.68 for 2 stages
    # and 6.12 for 64-key steps (tsfm tile-shared 128K)
    "qo_rows": 128, "qo_keys": 128, "qo_warps": 8, "qo_stages": 3, "qo_tma": True,
    "kv_rows": 128, "kv_warps": 8, "kv_stages": 2, "kv_cpp": 4,  # kv-outer forward (chunks/program)
    "dq_rows": 128, "dq_keys": 64, "dq_warps": 8, "dq_stages": 2,  # query-outer dq
    "dkdv_rows": 32, "dkdv_keys": 128, "dkdv_warps": 8, "dkdv_stages": 2,  # dk/dv owners (keys each)
    "dkdv_dq_rows": 32,  # rows of the dk/dv owners that also write dq partials (kv_outer)
    # Fused backward on shared selections (dq added atomically by the dk/dv owners, S/P/dS computed
    # once instead of again in the dq kernel). Off until measured against the split path on the H200
    # (benchmarks/attention.py times both); rows/keys of its owners as the split dk/dv owners'.
    "bwd_fused": False, "fused_rows": 32, "fused_keys": 128,
    "cb_rows": 32, "cb_warps": 4,                       # slot combine / sum
    # auto: query_outer while it computes fewer than this many blocks per needed (query, block) pair.
    # query_outer's forward costs ~5.5 ms (tsfm) / ~22 ms (paper) per unit of waste at 128K,
    # kv_outer's a flat ~17.5 / ~67 ms: break-even ~3.0-3.2. Backward: query_outer
    # 29.8 / 34.6 ms at waste 1 / 1.56 against kv_outer's 34.2-34.5 (tsfm; paper 111 / 128 vs 129).
    "auto_waste_fwd": 3.0, "auto_waste_bwd": 1.5,
}


def _pow2(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(n))


@triton.jit
def _load_rows(X, row, row_ok, d, D: tl.constexpr, DP: tl.constexpr):
    """Rows ``X[row, :D]`` -> [N, DP] (zeros where masked); ``row`` [N] int64 row numbers."""
    mask = row_ok[:, None]
    if D != DP:
        mask = mask & (d < D)[None, :]
    return tl.load(X + row[:, None] * D + d[None, :], mask=mask, other=0.0)


@triton.jit
def _store_rows(X, row, row_ok, d, val, D: tl.constexpr, DP: tl.constexpr):
    mask = row_ok[:, None]
    if D != DP:
        mask = mask & (d < D)[None, :]
    tl.store(X + row[:, None] * D + d[None, :], val.to(X.dtype.element_ty), mask=mask)


@triton.jit
def _key_block(KTime, t_base, L, blk, j, BS: tl.constexpr, BSP: tl.constexpr):
    """Positions ``[BSP]`` of the keys ``j`` of block ``blk``, their validity and time ids (padding
    and out-of-range keys get INT32_MAX, so no query sees them)."""
    kpos = blk * BS + j
    k_ok = kpos < L
    if BSP != BS:
        k_ok = k_ok & (j < BS)
    kt = tl.load(KTime + t_base + kpos, mask=k_ok, other=_I32_MAX)
    return kpos, k_ok, kt


@triton.jit
def _needs_mask(kt, k_ok, qt_min):
    # The token mask is skipped when every key of the block exists and is visible to every row (the
    # common case off the diagonal); it costs ALU work per score.
    return (tl.max(kt, axis=0) > qt_min) | (tl.min(k_ok.to(tl.int32), axis=0) == 0)


# --------------------------------------------------------------------------------------------
# Forward, query-outer
# --------------------------------------------------------------------------------------------
@triton.jit
def _qo_update(s, vb, e, wptr, qsh, j0, m_i, l_i, acc, qt, row_ok, KTime, t_base, L, qk_scale2,
               BS: tl.constexpr, BSP: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr):
    """Online-softmax step on raw scores ``s [ROWS, BN]`` of keys ``j0 + [0, BN)`` of the block of
    union entry ``e`` (block * 2 + needs_mask); the mask runs only where the union kernel flagged it."""
    blk = e >> 1
    if (e & 1) != 0:
        j = j0 + tl.arange(0, BN)
        kpos, k_ok, kt = _key_block(KTime, t_base, L, blk, j, BS, BSP)
        # Membership as 1D row vectors: a 2D [ROWS, KP] selection tile here made the compiler run the
        # whole softmax in its layout (a shared-memory round trip of the score tile every step).
        # One word per entry from the union kernel, bit q = query q of the tile chose it. Loaded
        # here, inside the masked branch: a load at the loop top gets software-pipelined (cp.async +
        # waits every step) and ran 20-40% slower. Against per-slot loads of the rows' selections it
        # measured 8.99 ms vs 11.46 (unrolled loads) and 12.34 (a loop of loads) on tsfm pool 128K,
        # 34.9 vs 44.4 and 39.4 on paper pool.
        member = (tl.load(wptr, mask=row_ok, other=0) >> qsh) & 1
        # One compare per score: membership folded into the row's time (-1 sees nothing), missing keys
        # already read as INT32_MAX (against three 2D ANDs: 13.4 -> 12.3 ms, tsfm pool 128K).
        qt_eff = tl.where(member > 0, tl.minimum(qt, 2147483646), -1)
        s = tl.where(kt[None, :] <= qt_eff[:, None], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale2)  # log2 units
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s * qk_scale2 - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + _dot(p.to(vb.dtype), vb, IEEE)
    return m_new, l_i, acc


@triton.jit
def _fwd_query_outer_kernel(
    Q, K, V, Out, Lse,  # q/out [B, Hq, L, D], k/v [B, G, L, D], lse [B, Hq, L] fp32
    Union, UnionCount,  # [B*G, NT, UW] int32 union entries (block * 2 + needs_mask), [B*G, NT] int32
    Bits,  # [B*G, NT, UW, NW] int32: bit q % 32 of word q // 32 = query q of the tile chose the entry
    QTime, KTime,  # [B, L] int32
    L, G, Hq, R, NT, UW, qk_scale2, NKV,  # NKV = B * G * L rows of k/v
    D: tl.constexpr, BS: tl.constexpr, BSP: tl.constexpr, BN: tl.constexpr, DP: tl.constexpr,
    TQ: tl.constexpr, RP: tl.constexpr, IEEE: tl.constexpr, TMA: tl.constexpr, NW: tl.constexpr,
):
    ROWS: tl.constexpr = TQ * RP
    tile = tl.program_id(0)
    bg = tl.program_id(1)
    b = bg // G
    g = bg % G

    r = tl.arange(0, ROWS)
    h = r // TQ
    qpos = tile * TQ + r % TQ  # [ROWS]
    row_ok = (h < R) & (qpos < L)
    d = tl.arange(0, DP)
    bh_row = (b * Hq + g * R + h).to(tl.int64) * L + qpos  # [ROWS] row of q/out/lse
    q = _load_rows(Q, bh_row, row_ok, d, D, DP)  # [ROWS, DP]
    qt = tl.load(QTime + b * L + qpos, mask=row_ok, other=-1)  # padding rows see no key
    qsh = (r % TQ) % 32  # bit of the row's query in its membership word
    qword = (r % TQ) // 32

    kv_row0 = bg.to(tl.int64) * L
    if TMA:
        k_desc = tl.make_tensor_descriptor(K, shape=[NKV, D], strides=[D, 1], block_shape=[BN, D])
        v_desc = tl.make_tensor_descriptor(V, shape=[NKV, D], strides=[D, 1], block_shape=[BN, D])
    m_i = tl.full([ROWS], float("-inf"), tl.float32)  # running max, log2 units
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, DP], tl.float32)
    n_union = tl.load(UnionCount + bg * NT + tile)
    u_base = (bg * NT + tile).to(tl.int64) * UW
    for it in range(0, n_union):
        e = tl.load(Union + u_base + it)
        blk = e >> 1
        wptr = Bits + (u_base + it) * NW + qword  # [ROWS] pointers to the rows' membership words
        # BN keys at a time: [ROWS, BN] score tiles keep the registers in bounds.
        for sub in tl.static_range(0, BSP // BN):
            if TMA:
                row = (kv_row0 + blk * BS + sub * BN).to(tl.int32)
                kb = k_desc.load([row, 0])  # rows past the tensor read as zeros, others are masked
                vb = v_desc.load([row, 0])
            else:
                j = sub * BN + tl.arange(0, BN)
                kpos = blk * BS + j
                k_ok = kpos < L
                if BSP != BS:
                    k_ok = k_ok & (j < BS)
                kb = _load_rows(K, kv_row0 + kpos, k_ok, d, D, DP)  # [BN, DP]
                vb = _load_rows(V, kv_row0 + kpos, k_ok, d, D, DP)
            s = _dot(q, tl.trans(kb), IEEE)  # [ROWS, BN], raw logits
            m_i, l_i, acc = _qo_update(s, vb, e, wptr, qsh, sub * BN, m_i, l_i, acc, qt, row_ok,
                                       KTime, b * L, L, qk_scale2, BS, BSP, BN, IEEE)

    has = l_i > 0.0
    l_safe = tl.where(has, l_i, 1.0)
    lse = tl.where(has, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    _store_rows(Out, bh_row, row_ok, d, acc / l_safe[:, None], D, DP)
    tl.store(Lse + bh_row, lse, mask=row_ok)


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _tile_union_kernel(
    BlockIdx,  # [B, G, L, KS] int32
    QTime, KtMax,  # [B, L] int32, [B, NBK] int32 latest key time of each block (unused if not FLAGS)
    Union, Count,  # [B*G, NT, UW] int32 out: sorted distinct blocks as block * 2 + needs_mask; [B*G, NT]
    Bits,  # [B*G, NT, UW, NW] int32 out: per entry, bit q % 32 of word q // 32 = query q chose it
    L, G, KS, NT, NBK, UW,
    TQ: tl.constexpr, KP: tl.constexpr, FLAGS: tl.constexpr, NW: tl.constexpr, KEY64: tl.constexpr,
):
    """Per tile of TQ queries: the sorted distinct blocks its queries chose (one sort of the keys
    ``block * TQ + query``, no pre-pass in torch). ``needs_mask`` is 0 when every query of the tile
    chose the block and every key of it is visible to every query (full block, latest key time <=
    earliest query time). The membership words are segmented sums of the queries' bits over each
    block's run (a row's entries are distinct, so a run holds each query at most once)."""
    N: tl.constexpr = TQ * KP
    tile = tl.program_id(0)
    bg = tl.program_id(1)
    b = bg // G
    n = tl.arange(0, N)
    qi = n // KP
    s = n % KP
    qpos = tile * TQ + qi
    ok = (qpos < L) & (s < KS)
    blk_in = tl.load(BlockIdx + (bg.to(tl.int64) * L + qpos) * KS + s, mask=ok, other=-1)
    if KEY64:
        key = tl.where(blk_in >= 0, blk_in.to(tl.int64) * TQ + qi, 2**62)
        key = tl.sort(key, 0)
        valid = key != 2**62
        x = tl.where(valid, key // TQ, -1).to(tl.int32)  # block
        qv = (key % TQ).to(tl.int32)  # query of the tile
    else:
        key = tl.where(blk_in >= 0, blk_in * TQ + qi, _I32_MAX)
        key = tl.sort(key, 0)
        valid = key != _I32_MAX
        x = tl.where(valid, key // TQ, -1)
        qv = key % TQ
    prev = tl.gather(x, tl.maximum(n - 1, 0), 0)
    nxt = tl.gather(x, tl.minimum(n + 1, N - 1), 0)
    first = valid & ((n == 0) | (x != prev))
    last = valid & ((n == N - 1) | (x != nxt))
    first_i = first.to(tl.int32)
    u = tl.cumsum(first_i, 0) - 1  # rank of the element's block among the distinct ones
    entry = x * 2 + 1
    gstart = tl.associative_scan(tl.where(first, n, 0), 0, _max_combine)  # start of the block's run
    tile_row = bg * NT + tile
    bit_base = (tile_row.to(tl.int64) * UW + u) * NW
    one = tl.full([N], 1, tl.int64)
    for w in tl.static_range(NW):
        # Segmented sum (= OR, the bits are distinct) over the run, read at its last element.
        bit = tl.where(valid & ((qv // 32) == w), one << (qv % 32).to(tl.int64), 0)
        cs = tl.cumsum(bit, 0)
        word = cs - tl.gather(cs - bit, gstart, 0)
        tl.store(Bits + bit_base + w, word.to(tl.int32), mask=last)
    if FLAGS:
        # Entries of one row are distinct, so a block's run length is the number of queries choosing it.
        run = n - gstart + 1
        tq_i = tl.arange(0, TQ)
        qp = tile * TQ + tq_i
        qt = tl.load(QTime + b * L + qp, mask=qp < L, other=_I32_MAX)
        qt_min = tl.min(qt, axis=0)
        n_q = tl.sum((qp < L).to(tl.int32), axis=0)
        ktm = tl.load(KtMax + b * NBK + x, mask=last, other=_I32_MAX)
        full = (run == n_q) & (ktm <= qt_min)
        entry = x * 2 + tl.where(full, 0, 1)
    tl.store(Union + tile_row.to(tl.int64) * UW + u, entry, mask=last)
    tl.store(Count + tile_row + tl.zeros([1], tl.int32), tl.sum(first_i, axis=0) + tl.zeros([1], tl.int32))


# --------------------------------------------------------------------------------------------
# Forward, KV-outer: a program per chunk (one block, <= TQ queries) writes partials
# --------------------------------------------------------------------------------------------
@triton.jit
def _fwd_kv_outer_kernel(
    Q, K, V, PartO, PartLse,  # q [B,Hq,L,D], k/v [B,G,L,D], part_o [B,Hq,LS,KS,D], part_lse [B,Hq,LS,KS]
    QTime, KTime,  # [B, L] int32
    ChunkKey, ChunkStart, ChunkLen, NChunks,  # [C] int32: bg * NB + block, first pair, pairs; [1] int32
    PairEntry,  # [P] int32: q_local * KS + slot, grouped by block
    L, L0, LS, G, Hq, R, KS, NB, qk_scale2,
    D: tl.constexpr, BS: tl.constexpr, BSP: tl.constexpr, DP: tl.constexpr, TQ: tl.constexpr,
    RP: tl.constexpr, CPP: tl.constexpr, IEEE: tl.constexpr,
):
    ROWS: tl.constexpr = TQ * RP
    r = tl.arange(0, ROWS)
    h = r // TQ
    i = r % TQ
    d = tl.arange(0, DP)
    j = tl.arange(0, BSP)
    n_chunks = tl.load(NChunks)
    c_begin = tl.program_id(0) * CPP
    c_end = tl.minimum(c_begin + CPP, n_chunks)
    for c in range(c_begin, c_end):
        key = tl.load(ChunkKey + c)
        start = tl.load(ChunkStart + c)
        n = tl.load(ChunkLen + c)
        bg = key // NB
        blk = key % NB
        b = bg // G
        g = bg % G
        in_chunk = i < n
        row_ok = in_chunk & (h < R)
        entry = tl.load(PairEntry + start + i, mask=in_chunk, other=0)  # [ROWS]
        ql = entry // KS
        qpos = L0 + ql
        bh = (b * Hq + g * R + h).to(tl.int64)
        q = _load_rows(Q, bh * L + qpos, row_ok, d, D, DP)
        qt = tl.load(QTime + b * L + qpos, mask=row_ok, other=-1)
        qt_min = tl.min(tl.where(row_ok, qt, _I32_MAX), axis=0)

        kpos, k_ok, kt = _key_block(KTime, b * L, L, blk, j, BS, BSP)
        kb = _load_rows(K, bg.to(tl.int64) * L + kpos, k_ok, d, D, DP)
        vb = _load_rows(V, bg.to(tl.int64) * L + kpos, k_ok, d, D, DP)
        s = _dot(q, tl.trans(kb), IEEE) * qk_scale2
        if _needs_mask(kt, k_ok, qt_min):
            s = tl.where((kt[None, :] <= qt[:, None]) & k_ok[None, :], s, float("-inf"))
        m = tl.max(s, axis=1)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        p = tl.exp2(s - m_safe[:, None])
        l_i = tl.sum(p, axis=1)
        has = l_i > 0.0
        l_safe = tl.where(has, l_i, 1.0)
        o = _dot(p.to(vb.dtype), vb, IEEE) / l_safe[:, None]
        lse = tl.where(has, (m_safe + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        part = (bh * LS + ql) * KS + entry % KS  # [ROWS] row of the partials
        _store_rows(PartO, part, row_ok, d, o, D, DP)
        tl.store(PartLse + part, lse, mask=row_ok)


# --------------------------------------------------------------------------------------------
# Per-(query, head) reduction over the K slots: LSE merge (forward) or plain sum (dq)
# --------------------------------------------------------------------------------------------
@triton.jit
def _slot_reduce_kernel(
    Part, PartLse,  # [B, Hq, LS, KS, D], [B, Hq, LS, KS] fp32 (unused when not LSE_MERGE)
    BlockIdx,  # [B, G, L, KS] int32: only slots with a block were written
    Out, Lse,  # [B, Hq, L, D], [B, Hq, L] fp32 (unused when not LSE_MERGE)
    L, L0, LS, NQ, G, Hq, R, KS,  # segment [L0, L0 + NQ) of a buffer with room for LS queries
    D: tl.constexpr, BQ: tl.constexpr, DP: tl.constexpr, LSE_MERGE: tl.constexpr,
):
    bh = tl.program_id(1)
    b = bh // Hq
    g = (bh % Hq) // R
    ql = tl.program_id(0) * BQ + tl.arange(0, BQ)
    q_ok = ql < NQ
    qpos = L0 + ql
    d = tl.arange(0, DP)
    sel_row = ((b * G + g).to(tl.int64) * L + qpos) * KS
    part_row = (bh.to(tl.int64) * LS + ql) * KS
    m = tl.full([BQ], float("-inf"), tl.float32)
    w_sum = tl.zeros([BQ], tl.float32)
    acc = tl.zeros([BQ, DP], tl.float32)
    for s in range(0, KS):
        blk = tl.load(BlockIdx + sel_row + s, mask=q_ok, other=-1)
        ok = q_ok & (blk >= 0)
        o = _load_rows(Part, part_row + s, ok, d, D, DP).to(tl.float32)
        if LSE_MERGE:
            ls = tl.load(PartLse + part_row + s, mask=ok, other=float("-inf"))
            m_new = tl.maximum(m, ls)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - m_safe)
            w = tl.exp(ls - m_safe)
            w_sum = w_sum * alpha + w
            acc = acc * alpha[:, None] + w[:, None] * o
            m = m_new
        else:
            acc += o
    out_row = bh.to(tl.int64) * L + qpos
    if LSE_MERGE:
        has = w_sum > 0.0
        w_safe = tl.where(has, w_sum, 1.0)
        acc = acc / w_safe[:, None]
        tl.store(Lse + out_row, tl.where(has, m + tl.log(w_safe), float("-inf")), mask=q_ok)
    _store_rows(Out, out_row, q_ok, d, acc, D, DP)


# --------------------------------------------------------------------------------------------
# Backward: dq over the tile union (query-outer)
# --------------------------------------------------------------------------------------------
@triton.jit
def _bwd_dq_query_outer_kernel(
    Q, K, V, DO, Lse, Delta, DQ,  # q/do/dq [B, Hq, L, D], k/v [B, G, L, D], lse/delta [B, Hq, L] fp32
    Union, UnionCount, Bits, QTime, KTime,
    L, G, Hq, R, NT, UW, qk_scale2, scale,
    D: tl.constexpr, BS: tl.constexpr, BSP: tl.constexpr, BN: tl.constexpr, DP: tl.constexpr,
    TQ: tl.constexpr, RP: tl.constexpr, IEEE: tl.constexpr, NW: tl.constexpr,
):
    ROWS: tl.constexpr = TQ * RP
    tile = tl.program_id(0)
    bg = tl.program_id(1)
    b = bg // G
    g = bg % G
    r = tl.arange(0, ROWS)
    h = r // TQ
    qpos = tile * TQ + r % TQ
    row_ok = (h < R) & (qpos < L)
    d = tl.arange(0, DP)
    bh_row = (b * Hq + g * R + h).to(tl.int64) * L + qpos  # [ROWS]
    q = _load_rows(Q, bh_row, row_ok, d, D, DP)
    do = _load_rows(DO, bh_row, row_ok, d, D, DP)
    lse2 = tl.load(Lse + bh_row, mask=row_ok, other=0.0) * 1.4426950408889634
    lse2 = tl.where(lse2 == float("-inf"), 0.0, lse2)  # empty rows: every p is masked to 0 anyway
    delta = tl.load(Delta + bh_row, mask=row_ok, other=0.0)
    qt = tl.load(QTime + b * L + qpos, mask=row_ok, other=-1)
    qsh = (r % TQ) % 32
    qword = (r % TQ) // 32

    kv_row0 = bg.to(tl.int64) * L
    dq = tl.zeros([ROWS, DP], tl.float32)
    n_union = tl.load(UnionCount + bg * NT + tile)
    u_base = (bg * NT + tile).to(tl.int64) * UW
    for it in range(0, n_union):
        e = tl.load(Union + u_base + it)  # union entries are block * 2 + needs_mask
        blk = e >> 1
        # Membership from the union's query bitmask; the mask runs only on flagged entries (the flag
        # covers membership, partial blocks and time; padded heads have zero dO, so ds = 0). Against a
        # [ROWS, KP] slot tile with per-step reductions: 29.71 vs 30.85 ms backward, tsfm tile-shared 128K.
        if NW == 1:
            wb = tl.load(Bits + u_base + it) + tl.zeros([ROWS], tl.int32)
        else:
            wb = tl.load(Bits + (u_base + it) * NW + qword)
        member = (wb >> qsh) & 1
        flagged = (e & 1) != 0
        for sub in tl.static_range(0, BSP // BN):
            j = sub * BN + tl.arange(0, BN)
            kpos, k_ok, kt = _key_block(KTime, b * L, L, blk, j, BS, BSP)
            kb = _load_rows(K, kv_row0 + kpos, k_ok, d, D, DP)
            vb = _load_rows(V, kv_row0 + kpos, k_ok, d, D, DP)
            s = _dot(q, tl.trans(kb), IEEE) * qk_scale2
            p = tl.exp2(s - lse2[:, None])
            # Keys past L have zero K rows, so they add nothing to dq even where unmasked.
            if flagged:
                p = tl.where((member[:, None] > 0) & (kt[None, :] <= qt[:, None]), p, 0.0)
            dp = _dot(do, tl.trans(vb), IEEE)
            ds = p * (dp - delta[:, None])
            dq += _dot(ds.to(kb.dtype), kb, IEEE)
    _store_rows(DQ, bh_row, row_ok, d, dq * scale, D, DP)


# --------------------------------------------------------------------------------------------
# Backward: dk, dv by one owner per (KV block, BN keys of it) over the CSR of its (query, slot) pairs
# --------------------------------------------------------------------------------------------
@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta,  # as in the dq kernel
    DK, DV,  # [B, G, L, D] fp32 accumulators
    DQOut,  # DQ_MODE 1: [B, Hq, LS, KS, D] per-slot dq partials; 2: [B, Hq, L, D] fp32, atomic adds
    QTime, KTime,
    Order,  # [B*G*NB] int32: block keys, heaviest first (the launch order is the schedule)
    Offsets,  # [B*G*NB + 1] int32: CSR offsets into PairEntry
    PairEntry,  # [P] int32: q_local * KS + slot
    L, L0, LS, G, Hq, R, KS, NB, qk_scale2, scale,
    D: tl.constexpr, BS: tl.constexpr, BN: tl.constexpr, DP: tl.constexpr, TQ: tl.constexpr,
    RP: tl.constexpr, DQ_MODE: tl.constexpr, ACCUM: tl.constexpr, IEEE: tl.constexpr,
):
    """DQ_MODE 0: dk/dv only (dq by the query-outer kernel); 1: also per-slot dq partials (one
    program per whole block); 2: also dq, added atomically in fp32 (the fused backward: S, P and dS
    computed once for dq, dk and dv)."""
    ROWS: tl.constexpr = TQ * RP
    SPLIT: tl.constexpr = (BS + BN - 1) // BN  # programs per block, BN keys each
    pid = tl.program_id(0)
    key = tl.load(Order + pid // SPLIT)
    bg = key // NB
    blk = key % NB
    b = bg // G
    g = bg % G
    start = tl.load(Offsets + key)
    end = tl.load(Offsets + key + 1)

    d = tl.arange(0, DP)
    jj = (pid % SPLIT) * BN + tl.arange(0, BN)  # keys of the block this program owns
    kpos = blk * BS + jj
    k_ok = (kpos < L) & (jj < BS)
    kt = tl.load(KTime + b * L + kpos, mask=k_ok, other=_I32_MAX)
    kv_row = bg.to(tl.int64) * L + kpos
    kb = _load_rows(K, kv_row, k_ok, d, D, DP)  # [BN, DP]
    vb = _load_rows(V, kv_row, k_ok, d, D, DP)
    kt_max = tl.max(kt, axis=0)

    r = tl.arange(0, ROWS)
    h = r // TQ
    i = r % TQ
    bh = (b * Hq + g * R + h).to(tl.int64)
    dk = tl.zeros([BN, DP], tl.float32)
    dv = tl.zeros([BN, DP], tl.float32)
    for c in range(start, end, TQ):
        in_chunk = c + i < end
        row_ok = in_chunk & (h < R)
        entry = tl.load(PairEntry + c + i, mask=in_chunk, other=0)
        ql = entry // KS
        qpos = L0 + ql
        bh_row = bh * L + qpos
        q = _load_rows(Q, bh_row, row_ok, d, D, DP)  # [ROWS, DP]
        do = _load_rows(DO, bh_row, row_ok, d, D, DP)
        lse2 = tl.load(Lse + bh_row, mask=row_ok, other=0.0) * 1.4426950408889634
        lse2 = tl.where(lse2 == float("-inf"), 0.0, lse2)
        delta = tl.load(Delta + bh_row, mask=row_ok, other=0.0)
        qt = tl.load(QTime + b * L + qpos, mask=row_ok, other=-1)

        st = _dot(kb, tl.trans(q), IEEE) * qk_scale2  # [BN, ROWS]
        pt = tl.exp2(st - lse2[None, :])
        # Padded rows (zero q, zero do) contribute nothing to dk/dv, so only time decides the mask.
        if kt_max > tl.min(tl.where(row_ok, qt, _I32_MAX), axis=0):
            pt = tl.where(kt[:, None] <= qt[None, :], pt, 0.0)
        dv += _dot(pt.to(do.dtype), do, IEEE)
        dpt = _dot(vb, tl.trans(do), IEEE)  # [BN, ROWS]
        dst = pt * (dpt - delta[None, :])
        dk += _dot(dst.to(q.dtype), q, IEEE)
        if DQ_MODE == 1:
            dq = _dot(tl.trans(dst).to(kb.dtype), kb, IEEE) * scale  # [ROWS, DP]
            _store_rows(DQOut, (bh * LS + ql) * KS + entry % KS, row_ok, d, dq, D, DP)
        elif DQ_MODE == 2:
            dq = _dot(tl.trans(dst).to(kb.dtype), kb, IEEE) * scale  # [ROWS, DP]
            dq_mask = row_ok[:, None]
            if D != DP:
                dq_mask = dq_mask & (d < D)[None, :]
            tl.atomic_add(DQOut + bh_row[:, None] * D + d[None, :], dq, mask=dq_mask, sem="relaxed")

    dk = dk * scale
    out_ok = k_ok
    if ACCUM:
        # Later query segments add onto the earlier ones; blocks this segment never chose are left alone.
        out_ok = out_ok & ((tl.zeros([BN], tl.int32) + end) > start)
        dk += _load_rows(DK, kv_row, out_ok, d, D, DP)
        dv += _load_rows(DV, kv_row, out_ok, d, D, DP)
    _store_rows(DK, kv_row, out_ok, d, dk, D, DP)
    _store_rows(DV, kv_row, out_ok, d, dv, D, DP)


# --------------------------------------------------------------------------------------------
# Schedules (torch ops, no host sync)
# --------------------------------------------------------------------------------------------
def _tile_union(block_idx: torch.Tensor, tq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct blocks chosen by each tile of ``tq`` queries: ``union [B*G, NT, tq*K]`` int32 sorted
    ascending (only the first ``count`` entries are meaningful) and ``count [B*G, NT]`` int32."""
    batch, groups, seq_len, slots = block_idx.shape
    n_tiles = triton.cdiv(seq_len, tq)
    x = block_idx.reshape(batch * groups, seq_len, slots)
    if n_tiles * tq != seq_len:
        x = torch.nn.functional.pad(x, (0, 0, 0, n_tiles * tq - seq_len), value=-1)
    x = x.reshape(batch * groups, n_tiles, tq * slots)
    x = torch.where(x < 0, INT32_MAX, x).sort(dim=-1).values
    dup = torch.zeros_like(x, dtype=torch.bool)
    dup[..., 1:] = x[..., 1:] == x[..., :-1]
    x = torch.where(dup, INT32_MAX, x).sort(dim=-1).values
    count = (x != INT32_MAX).sum(-1, dtype=torch.int32)
    return x.contiguous(), count.contiguous()


def _build_union(block_idx, tq, q_time=None, k_time=None, block_size=None):
    """Tile unions by ``_tile_union_kernel`` (one launch, no torch sorts): ``union [B*G, NT, tq*K]``
    int32 entries ``block * 2 + needs_mask`` sorted by block (first ``count`` meaningful),
    ``count [B*G, NT]`` int32 and ``bits [B*G, NT, tq*K, ceil(tq / 32)]`` int32 (per entry, bit
    ``q % 32`` of word ``q // 32`` set when query ``q`` of the tile chose the block). Without times
    every entry is flagged as needing the mask."""
    batch, groups, seq_len, slots = block_idx.shape
    nt = triton.cdiv(seq_len, tq)
    union = torch.empty(batch * groups, nt, tq * slots, device=block_idx.device, dtype=torch.int32)
    count = torch.empty(batch * groups, nt, device=block_idx.device, dtype=torch.int32)
    nw = triton.cdiv(tq, 32)
    bits = torch.empty(batch * groups, nt, tq * slots, nw, device=block_idx.device, dtype=torch.int32)
    # Mask-free entries need whole 16-key steps: a smaller block leaves padding keys in its step, which
    # only the mask removes (their zero K rows would score 0 and enter the softmax).
    flags = q_time is not None and block_size is not None and block_size == _pow2(block_size)
    if flags:
        nbk = triton.cdiv(seq_len, block_size)
        kt_max = cached_on(k_time, ("block_kt_max", block_size), (), lambda: _block_kt_max(k_time, block_size))
    else:
        nbk, q_time, kt_max = 1, count, count  # placeholders, never read
    _tile_union_kernel[(nt, batch * groups)](
        block_idx, q_time, kt_max, union, count, bits, seq_len, groups, slots, nt, nbk, union.shape[-1],
        TQ=tq, KP=triton.next_power_of_2(slots), FLAGS=flags, NW=nw,
        KEY64=seq_len * tq >= INT32_MAX, num_warps=4)  # block ids are < L
    return union, count, bits


def _block_kt_max(k_time: torch.Tensor, block_size: int) -> torch.Tensor:
    """Latest key time of each KV block ``[B, NB]`` int32 (padding keys INT32_MAX)."""
    batch, seq_len = k_time.shape
    nbk = triton.cdiv(seq_len, block_size)
    kt = k_time
    if nbk * block_size != seq_len:
        kt = torch.nn.functional.pad(kt, (0, nbk * block_size - seq_len), value=INT32_MAX)
    return kt.reshape(batch, nbk, block_size).amax(-1).to(torch.int32).contiguous()


def _union_of(block_idx, tq, q_time=None, k_time=None, block_size=None):
    """:func:`_build_union` built once per selection (the forward's is reused by the backward)."""
    deps = () if q_time is None else (q_time, k_time)
    return cached_on(block_idx, ("tile_union", tq, block_size, q_time is None), deps,
                     lambda: _build_union(block_idx, tq, q_time, k_time, block_size))


def _csr_of(block_idx, l0: int, ls: int, nb: int):
    """``block_csr`` of the query segment ``[l0, l0 + ls)``; a whole-sequence one is built once per
    selection (the forward's is reused by the backward; segments of long inputs are not kept)."""
    if ls != block_idx.shape[2]:
        return block_csr(block_idx[:, :, l0:l0 + ls], nb)
    return cached_on(block_idx, ("block_csr", nb), (), lambda: block_csr(block_idx, nb))


def _segment_len(batch, heads, seq_len, slots, head_dim, elem) -> int:
    per_query = batch * heads * slots * head_dim * elem
    return max(1, min(seq_len, _PARTIAL_BYTES // max(per_query, 1)))


class _Shape:
    """Sizes and tile constants shared by the launches."""

    def __init__(self, q, k, block_idx, block_size):
        self.B, self.Hq, self.L, self.D = q.shape
        self.G = k.shape[1]
        self.R = self.Hq // self.G
        self.KS = block_idx.shape[-1]
        self.bs = block_size
        self.NB = triton.cdiv(self.L, block_size)
        self.BSP = _pow2(block_size)
        self.DP = _pow2(self.D)
        self.RP = triton.next_power_of_2(self.R)
        self.KP = triton.next_power_of_2(self.KS)
        self.ieee = q.dtype == torch.float32

    def tq(self, rows: int) -> int:
        """Queries per tile so that queries x padded heads fill ``rows`` (at least 16 rows for tl.dot)."""
        return max(1, max(rows, 16) // self.RP)


def _tma_alloc(size: int, alignment: int, stream):
    return torch.empty(size, device="cuda", dtype=torch.int8)


def _use_tma(q, sh: _Shape, bn: int) -> bool:
    """K/V through tensor descriptors (TMA) on a compiled sm_90+ GPU; pointer loads otherwise (the
    interpreter, odd head dims, tiny key steps)."""
    if not CONFIG["qo_tma"] or not q.is_cuda or triton.runtime.driver.active.get_current_target().backend != "cuda":
        return False
    if os.environ.get("TRITON_INTERPRET", "0") == "1" or torch.cuda.get_device_capability(q.device)[0] < 9:
        return False
    if sh.D != sh.DP or q.element_size() != 2 or bn < 16 or sh.BSP != sh.bs or sh.B * sh.G * sh.L >= 2**31:
        return False  # (TMA row coordinates are 32-bit)
    triton.set_allocator(_tma_alloc)  # device-side descriptors need a small global scratch
    return True


def _union_waste(block_idx, union_count, tq) -> float:
    """Blocks computed by query_outer per valid (query, block) pair (1.0 = no waste).

    One host sync, kept on purpose: the answer decides which kernels are launched. Deciding on the
    device instead means building both schedules and launching both paths with an early exit; the
    kv_outer CSR alone costs 0.65-0.76 ms at 128K (H200), far more than the sync's launch bubble."""
    entries, valid = torch.stack((union_count.sum(dtype=torch.int64), (block_idx >= 0).sum())).tolist()
    return float(entries) * tq / max(valid, 1)


def _pick_variant(variant, block_idx, sh: _Shape, phase: str = "fwd", q_time=None, k_time=None):
    """Resolve ``auto`` for the forward or the backward (each has its own break-even waste, see
    CONFIG); returns (variant, sched) with sched = (union, count, bits) when query_outer is used."""
    if variant not in ("auto", "query_outer", "kv_outer"):
        raise ValueError(f"variant must be 'auto', 'query_outer' or 'kv_outer', got {variant!r}")
    if variant == "kv_outer":
        return variant, None
    tq = sh.tq(CONFIG["qo_rows"])
    sched = _union_of(block_idx, tq, q_time, k_time, sh.bs)
    if variant == "auto":
        # The forward's measurement (and its host sync) serves the backward too.
        deps = () if q_time is None else (q_time, k_time)
        waste = cached_on(block_idx, ("union_waste", tq, sh.bs, q_time is None), deps,
                          lambda: _union_waste(block_idx, sched[1], tq))
        if waste > CONFIG["auto_waste_" + phase]:
            return "kv_outer", None
    return "query_outer", sched


# --------------------------------------------------------------------------------------------
# Forward / backward drivers
# --------------------------------------------------------------------------------------------
def _forward(q, k, v, block_idx, q_time, k_time, block_size, scale, variant):
    sh = _Shape(q, k, block_idx, block_size)
    qk_scale2 = scale * _LOG2E
    out = torch.empty_like(q)
    lse = torch.empty(sh.B, sh.Hq, sh.L, device=q.device, dtype=torch.float32)
    variant, sched = _pick_variant(variant, block_idx, sh, "fwd", q_time, k_time)
    if variant == "query_outer":
        union, count, bits = sched
        tq = sh.tq(CONFIG["qo_rows"])
        nt = triton.cdiv(sh.L, tq)
        bn, stages = min(sh.BSP, CONFIG["qo_keys"]), CONFIG["qo_stages"]
        tma = _use_tma(q, sh, bn)
        if not tma:  # pointer loads (fp32, odd shapes, pre-Hopper): 128-key steps spill
            bn, stages = min(bn, 64), min(stages, 2)
        _fwd_query_outer_kernel[(nt, sh.B * sh.G)](
            q, k, v, out, lse, union, count, bits, q_time, k_time,
            sh.L, sh.G, sh.Hq, sh.R, nt, union.shape[-1], qk_scale2, sh.B * sh.G * sh.L,
            D=sh.D, BS=sh.bs, BSP=sh.BSP, BN=bn, DP=sh.DP, TQ=tq, RP=sh.RP,
            IEEE=sh.ieee, TMA=tma, NW=bits.shape[-1],
            num_warps=CONFIG["qo_warps"], num_stages=stages)
        return out, lse

    tq = sh.tq(CONFIG["kv_rows"])
    cpp = CONFIG["kv_cpp"]
    seg = _segment_len(sh.B, sh.Hq, sh.L, sh.KS, sh.D, q.element_size())
    part_o = torch.empty(sh.B, sh.Hq, seg, sh.KS, sh.D, device=q.device, dtype=q.dtype)
    part_lse = torch.empty(sh.B, sh.Hq, seg, sh.KS, device=q.device, dtype=torch.float32)
    bq = CONFIG["cb_rows"]
    for l0 in range(0, sh.L, seg):
        ls = min(seg, sh.L - l0)
        pair_entry, offsets = _csr_of(block_idx, l0, ls, sh.NB)
        c_key, c_start, c_len, n_chunks, _ = chunks(offsets, tq, pair_entry.numel())
        _fwd_kv_outer_kernel[(triton.cdiv(c_key.numel(), cpp),)](
            q, k, v, part_o, part_lse, q_time, k_time, c_key, c_start, c_len, n_chunks, pair_entry,
            sh.L, l0, seg, sh.G, sh.Hq, sh.R, sh.KS, sh.NB, qk_scale2,
            D=sh.D, BS=sh.bs, BSP=sh.BSP, DP=sh.DP, TQ=tq, RP=sh.RP, CPP=cpp, IEEE=sh.ieee,
            num_warps=CONFIG["kv_warps"], num_stages=CONFIG["kv_stages"])
        _slot_reduce_kernel[(triton.cdiv(ls, bq), sh.B * sh.Hq)](
            part_o, part_lse, block_idx, out, lse, sh.L, l0, seg, ls, sh.G, sh.Hq, sh.R, sh.KS,
            D=sh.D, BQ=bq, DP=sh.DP, LSE_MERGE=True, num_warps=CONFIG["cb_warps"])
    return out, lse


def _backward(q, k, v, block_idx, q_time, k_time, out, lse, dout, dlse, block_size, scale, variant):
    sh = _Shape(q, k, block_idx, block_size)
    qk_scale2 = scale * _LOG2E
    # delta = rowsum(dO * O); a gradient on lse adds p * dlse to dS, i.e. subtracts dlse from delta.
    delta = (dout.float() * out.float()).sum(-1)  # [B, Hq, L]
    if dlse is not None:
        delta = delta - dlse.float()
    delta = delta.contiguous()
    variant, sched = _pick_variant(variant, block_idx, sh, "bwd", q_time, k_time)
    # dq: per-slot partials summed afterwards (kv_outer), atomic fp32 adds from the dk/dv owners
    # (fused, on shared selections), or a separate query-outer kernel (split).
    dq_mode = 1 if variant == "kv_outer" else 2 if CONFIG["bwd_fused"] else 0

    dq = torch.empty_like(q)
    dk32 = torch.empty(k.shape, device=k.device, dtype=torch.float32)
    dv32 = torch.empty(v.shape, device=v.device, dtype=torch.float32)
    seg = sh.L
    if dq_mode == 1:
        seg = _segment_len(sh.B, sh.Hq, sh.L, sh.KS, sh.D, q.element_size())
        dq_out = torch.empty(sh.B, sh.Hq, seg, sh.KS, sh.D, device=q.device, dtype=q.dtype)
        # Per-slot dq partials need one program per whole block (a key split would write each
        # partial twice); fewer rows keep that variant's registers in bounds.
        tq, bn = sh.tq(CONFIG["dkdv_dq_rows"]), sh.BSP
    elif dq_mode == 2:
        dq_out = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
        tq, bn = sh.tq(CONFIG["fused_rows"]), min(sh.BSP, CONFIG["fused_keys"])
    else:
        dq_out = dq  # placeholder pointer, never written
        tq, bn = sh.tq(CONFIG["dkdv_rows"]), min(sh.BSP, CONFIG["dkdv_keys"])
    for l0 in range(0, sh.L, seg):
        ls = min(seg, sh.L - l0)
        pair_entry, offsets = _csr_of(block_idx, l0, ls, sh.NB)
        # Heaviest blocks first, so a popular block's long loop starts early (LPT order).
        order = torch.argsort(offsets[1:] - offsets[:-1], descending=True).to(torch.int32)
        _bwd_dkdv_kernel[(order.numel() * triton.cdiv(sh.bs, bn),)](
            q, k, v, dout, lse, delta, dk32, dv32, dq_out, q_time, k_time, order, offsets, pair_entry,
            sh.L, l0, seg, sh.G, sh.Hq, sh.R, sh.KS, sh.NB, qk_scale2, scale,
            D=sh.D, BS=sh.bs, BN=bn, DP=sh.DP, TQ=tq, RP=sh.RP, DQ_MODE=dq_mode, ACCUM=l0 > 0, IEEE=sh.ieee,
            num_warps=CONFIG["dkdv_warps"], num_stages=CONFIG["dkdv_stages"])
        if dq_mode == 1:
            bq = CONFIG["cb_rows"]
            _slot_reduce_kernel[(triton.cdiv(ls, bq), sh.B * sh.Hq)](
                dq_out, dq_out, block_idx, dq, lse, sh.L, l0, seg, ls, sh.G, sh.Hq, sh.R, sh.KS,
                D=sh.D, BQ=bq, DP=sh.DP, LSE_MERGE=False, num_warps=CONFIG["cb_warps"])
    if dq_mode == 2:
        dq = dq_out.to(q.dtype)
    if dq_mode == 0:
        tq = sh.tq(CONFIG["dq_rows"])
        if sched is None or sched[0].shape[1] != triton.cdiv(sh.L, tq):  # other tile size
            sched = _union_of(block_idx, tq, q_time, k_time, sh.bs)
        union, count, bits = sched
        nt = triton.cdiv(sh.L, tq)
        _bwd_dq_query_outer_kernel[(nt, sh.B * sh.G)](
            q, k, v, dout, lse, delta, dq, union, count, bits, q_time, k_time,
            sh.L, sh.G, sh.Hq, sh.R, nt, union.shape[-1], qk_scale2, scale,
            D=sh.D, BS=sh.bs, BSP=sh.BSP, BN=min(sh.BSP, CONFIG["dq_keys"]), DP=sh.DP, TQ=tq, RP=sh.RP,
            IEEE=sh.ieee, NW=bits.shape[-1],
            num_warps=CONFIG["dq_warps"], num_stages=CONFIG["dq_stages"])
    return dq, dk32.to(k.dtype), dv32.to(v.dtype)


# --------------------------------------------------------------------------------------------
# Registered ops
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("tsfm_msa::sparse_attention_fwd", mutates_args=())
def _sparse_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor,
    q_time: torch.Tensor, k_time: torch.Tensor, block_size: int, scale: float, variant: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    args = [t.contiguous() for t in (q, k, v, block_idx, q_time, k_time)]
    return _forward(*args, block_size, scale, variant)


@_sparse_attention_fwd.register_fake
def _(q, k, v, block_idx, q_time, k_time, block_size, scale, variant):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("tsfm_msa::sparse_attention_bwd", mutates_args=())
def _sparse_attention_bwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor,
    q_time: torch.Tensor, k_time: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    dout: torch.Tensor, dlse: torch.Tensor | None, block_size: int, scale: float, variant: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    args = [t.contiguous() for t in (q, k, v, block_idx, q_time, k_time, out, lse, dout)]
    return _backward(*args, dlse, block_size, scale, variant)


@_sparse_attention_bwd.register_fake
def _(q, k, v, block_idx, q_time, k_time, out, lse, dout, dlse, block_size, scale, variant):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, block_idx, q_time, k_time, block_size, scale, variant = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, block_idx, q_time, k_time, out, lse)
    ctx.meta = (block_size, scale, variant)


def _autograd_backward(ctx, dout, dlse):
    q, k, v, block_idx, q_time, k_time, out, lse = ctx.saved_tensors
    block_size, scale, variant = ctx.meta
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = _sparse_attention_bwd(q, k, v, block_idx, q_time, k_time, out, lse, dout, dlse,
                                       block_size, scale, variant)
    return dq, dk, dv, None, None, None, None, None, None


_sparse_attention_fwd.register_autograd(_autograd_backward, setup_context=_setup_context)


def sparse_attention_triton(
    q: torch.Tensor,  # [B, Hq, L, D]
    k: torch.Tensor,  # [B, G, L, D]
    v: torch.Tensor,  # [B, G, L, D]
    block_idx: torch.Tensor,  # [B, G, L, K] int32, -1 = empty slot
    q_time: torch.Tensor,  # [B, L] int32
    k_time: torch.Tensor,  # [B, L] int32
    block_size: int,
    scale: float | None = None,
    variant: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of :func:`reference.sparse_attention_reference`: ``(out [B, Hq, L, D], lse
    [B, Hq, L] float32)``, differentiable in q, k, v (the backward is deterministic unless
    ``CONFIG["bwd_fused"]`` adds dq atomically).

    ``variant``: ``"query_outer"``, ``"kv_outer"`` or ``"auto"`` (query_outer when the queries of a
    tile mostly share their blocks, measured on ``block_idx``; this check syncs with the host).
    """
    check_attention_inputs(q, k, v, block_idx, q_time, k_time, block_size)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    # Contiguous before the op, so that the tensors saved for the backward are the copies (a
    # transposed v would otherwise be copied again by the backward).
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return _sparse_attention_fwd(q, k, v, block_idx, q_time, k_time, block_size, scale, variant)
