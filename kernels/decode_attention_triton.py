"""Sparse attention of a few new queries over their selected cache blocks (Triton).

Same semantics as :func:`decode_reference.decode_attention_reference`. A program per (batch * group,
query) holds the group's ``Hq / G`` query heads as the rows of one tensor-core tile (padded to 16)
and walks the query's ``K`` selected blocks in tiles of ``BLOCK_N`` keys (several blocks of 8 share
a tile): gathered K/V rows, the time mask, an online softmax in fp32. Work and reads are
O(K * bs * D) per (group, query), independent of the cache length.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .triton_common import dot as _dot

from .decode_reference import check_decode_attention_inputs
from .validation import KernelInputError


@triton.jit
def _decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, qt_ptr, kt_ptr, o_ptr, lse_ptr,
    G, Lq, Lk, K, D, REP, scale,
    s_qb, s_qh, s_qq, s_qd,
    s_kb, s_kg, s_kn, s_kd,
    s_vb, s_vg, s_vn, s_vd,
    s_ib, s_ig, s_iq,
    s_qtb, s_ktb,
    s_ob, s_oh, s_oq, s_od,
    s_lb, s_lh,
    HP: tl.constexpr, DP: tl.constexpr, BLOCK_N: tl.constexpr, BS: tl.constexpr, IEEE: tl.constexpr,
):
    pid_bg = tl.program_id(0)
    qpos = tl.program_id(1)
    b = pid_bg // G
    g = pid_bg % G
    offs_h = tl.arange(0, HP)
    offs_d = tl.arange(0, DP)
    h_ok = offs_h < REP
    d_ok = offs_d < D
    heads = g * REP + offs_h
    q_ptrs = q_ptr + b.to(tl.int64) * s_qb + heads[:, None].to(tl.int64) * s_qh + qpos * s_qq + offs_d[None, :] * s_qd
    q = tl.load(q_ptrs, mask=h_ok[:, None] & d_ok[None, :], other=0.0)
    q_time = tl.load(qt_ptr + b * s_qtb + qpos + tl.zeros([BLOCK_N], dtype=tl.int32))  # broadcast to a block
    m_i = tl.full([HP], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([HP], dtype=tl.float32)
    acc = tl.zeros([HP, DP], dtype=tl.float32)
    SPT: tl.constexpr = BLOCK_N // BS  # selected blocks per tile
    offs_n = tl.arange(0, BLOCK_N)
    idx_base = idx_ptr + b.to(tl.int64) * s_ib + g * s_ig + qpos.to(tl.int64) * s_iq
    k_base = k_ptr + b.to(tl.int64) * s_kb + g.to(tl.int64) * s_kg
    v_base = v_ptr + b.to(tl.int64) * s_vb + g.to(tl.int64) * s_vg
    for slot0 in range(0, K, SPT):
        slot = slot0 + offs_n // BS
        blk = tl.load(idx_base + slot, mask=slot < K, other=-1)
        tok = blk.to(tl.int64) * BS + offs_n % BS
        ok = (blk >= 0) & (tok < Lk)
        tok = tl.where(ok, tok, 0)
        k_time = tl.load(kt_ptr + b * s_ktb + tok, mask=ok, other=2147483647)
        visible = ok & (k_time <= q_time)
        kt = tl.load(k_base + tok[:, None] * s_kn + offs_d[None, :] * s_kd, mask=ok[:, None] & d_ok[None, :], other=0.0)
        s = _dot(q, tl.trans(kt), IEEE) * scale  # [HP, BLOCK_N]
        s = tl.where(visible[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vt = tl.load(v_base + tok[:, None] * s_vn + offs_d[None, :] * s_vd, mask=ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(vt.dtype), vt, IEEE)
        m_i = m_new
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    o_ptrs = o_ptr + b.to(tl.int64) * s_ob + heads[:, None].to(tl.int64) * s_oh + qpos * s_oq + offs_d[None, :] * s_od
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=h_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + b * s_lb + heads * s_lh + qpos, lse, mask=h_ok)


@torch.no_grad()
def decode_attention_triton(
    q: torch.Tensor,  # [B, Hq, Lq, D]
    k: torch.Tensor,  # [B, G, Lk, D]
    v: torch.Tensor,  # [B, G, Lk, D]
    block_idx: torch.Tensor,  # [B, G, Lq, K] int32
    q_time: torch.Tensor,  # [B, Lq] int32
    k_time: torch.Tensor,  # [B, Lk] int32
    block_size: int,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`decode_reference.decode_attention_reference` (forward only)."""
    check_decode_attention_inputs(q, k, v, block_idx, q_time, k_time, block_size)
    if block_size < 8 or block_size & (block_size - 1):
        raise KernelInputError(f"the Triton decode attention needs a power-of-two block_size >= 8, got {block_size}")
    batch, n_heads, n_q, head_dim = q.shape
    groups, n_k = k.shape[1], k.shape[2]
    rep = n_heads // groups
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    out = torch.empty_like(q)
    lse = torch.empty(batch, n_heads, n_q, dtype=torch.float32, device=q.device)
    block_n = max(16, block_size, min(64, 8192 // max(head_dim, 1)))
    block_n = max(block_n, block_size)
    block_idx = block_idx.contiguous()  # the kernel reads a row's slots as contiguous
    grid = (batch * groups, n_q)
    _decode_attention_kernel[grid](
        q, k, v, block_idx, q_time, k_time, out, lse,
        groups, n_q, n_k, block_idx.shape[-1], head_dim, rep, scale,
        *q.stride(), *k.stride(), *v.stride(),
        block_idx.stride(0), block_idx.stride(1), block_idx.stride(2),
        q_time.stride(0), k_time.stride(0),
        *out.stride(), lse.stride(0), lse.stride(1),
        HP=max(16, triton.next_power_of_2(rep)), DP=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_N=block_n, BS=block_size, IEEE=q.dtype == torch.float32,
    )
    return out, lse
