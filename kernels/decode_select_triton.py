"""Block selection for a few new queries against a long index-key cache (Triton).

Same semantics as :func:`decode_reference.decode_select_reference`. With ``Lq`` small the block score
matrix ``[B, G, Lq, NB]`` is small too (``NB = Lk / bs``), so the kernel writes it and a torch
``topk`` picks the blocks (policy mask and forced blocks applied there, shared with the reference).

A program per (batch, tile of ``BLOCK_M`` rows, chunk of keys) streams its chunk of the cache in
tiles of ``BLOCK_N`` keys. Rows are (group, query) pairs, so all GQA groups share each load of the
single index-key head: one ``tl.dot`` ``[BLOCK_M, Di] x [Di, BLOCK_N]`` in fp32, the time mask, and a
max-pool of every ``bs`` columns (``BLOCK_N`` is a multiple of ``bs``: a tile of 64 covers eight
blocks of 8). Splitting the key axis over programs fills the GPU although only a few queries arrive
per update. Cost: O(G * Lq * Lk * Di) flops, and the index keys are read once (``Lk * Di``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import dot as _dot

from .decode_reference import check_decode_select_inputs, topk_blocks
from .reference import num_blocks
from .validation import KernelInputError


@triton.jit
def _decode_block_scores_kernel(
    qi_ptr, ki_ptr, qt_ptr, kt_ptr, out_ptr,
    G, Lq, Lk, NB, DI, KEYS_PER_PROG,
    s_qb, s_qg, s_qq, s_qd,
    s_kb, s_kn, s_kd,
    s_qtb, s_ktb,
    s_ob, s_og, s_oq,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BS: tl.constexpr, DP: tl.constexpr, IEEE: tl.constexpr,
):
    b = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_k = tl.program_id(2)
    # Rows are (group, query) pairs: every group's queries share each loaded tile of index keys.
    rows = pid_r * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = rows < G * Lq
    g = rows // Lq
    qpos = rows % Lq
    offs_d = tl.arange(0, DP)
    d_ok = offs_d < DI
    q_ptrs = (qi_ptr + b.to(tl.int64) * s_qb + g[:, None].to(tl.int64) * s_qg + qpos[:, None].to(tl.int64) * s_qq
              + offs_d[None, :] * s_qd)
    qi = tl.load(q_ptrs, mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    q_time = tl.load(qt_ptr + b * s_qtb + qpos, mask=r_ok, other=-1)
    o_rows = out_ptr + b.to(tl.int64) * s_ob + g.to(tl.int64) * s_og + qpos.to(tl.int64) * s_oq  # [BLOCK_M]
    NBT: tl.constexpr = BLOCK_N // BS
    key_start = pid_k * KEYS_PER_PROG
    key_stop = tl.minimum(key_start + KEYS_PER_PROG, Lk)
    for start in range(key_start, key_stop, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < Lk
        k_ptrs = ki_ptr + b.to(tl.int64) * s_kb + offs_n[:, None].to(tl.int64) * s_kn + offs_d[None, :] * s_kd
        ki = tl.load(k_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        k_time = tl.load(kt_ptr + b * s_ktb + offs_n, mask=n_ok, other=2147483647)
        s = _dot(qi, tl.trans(ki), IEEE)  # [BLOCK_M, BLOCK_N] fp32
        visible = k_time[None, :] <= q_time[:, None]
        s = tl.where(visible, s, float("-inf"))
        pooled = tl.max(tl.reshape(s, (BLOCK_M, NBT, BS)), axis=2)  # [BLOCK_M, NBT]
        offs_blk = start // BS + tl.arange(0, NBT)
        tl.store(o_rows[:, None] + offs_blk[None, :], pooled, mask=r_ok[:, None] & (offs_blk[None, :] < NB))


def decode_block_scores_triton(qi: torch.Tensor, ki: torch.Tensor, q_time: torch.Tensor, k_time: torch.Tensor,
                               block_size: int) -> torch.Tensor:
    """Max-pooled index scores ``[B, G, Lq, NB]`` float32 (``-inf`` = no visible key)."""
    if block_size < 8 or block_size & (block_size - 1):
        raise KernelInputError(f"the Triton decode select needs a power-of-two block_size >= 8, got {block_size}")
    batch, groups, n_q, index_dim = qi.shape
    n_k = ki.shape[1]
    nb = num_blocks(n_k, block_size)
    out = torch.empty(batch, groups, n_q, nb, dtype=torch.float32, device=qi.device)
    n_rows = groups * n_q
    block_m = min(64, max(16, triton.next_power_of_2(n_rows)))
    block_n = max(64, block_size)
    dp = max(16, triton.next_power_of_2(index_dim))
    # Split the key axis so that every SM gets work although only a few queries arrive.
    programs = batch * triton.cdiv(n_rows, block_m)
    target = 4 * (torch.cuda.get_device_properties(qi.device).multi_processor_count if qi.is_cuda else 1)
    chunks = max(1, min(triton.cdiv(n_k, block_n), triton.cdiv(target, programs)))
    keys_per_prog = triton.cdiv(triton.cdiv(n_k, chunks), block_n) * block_n
    chunks = triton.cdiv(n_k, keys_per_prog)
    grid = (batch, triton.cdiv(n_rows, block_m), chunks)
    _decode_block_scores_kernel[grid](
        qi, ki, q_time, k_time, out,
        groups, n_q, n_k, nb, index_dim, keys_per_prog,
        *qi.stride(), *ki.stride(), q_time.stride(0), k_time.stride(0),
        out.stride(0), out.stride(1), out.stride(2),
        BLOCK_M=block_m, BLOCK_N=block_n, BS=block_size, DP=dp, IEEE=qi.dtype == torch.float32,
    )
    return out


@torch.no_grad()
def decode_select_triton(
    qi: torch.Tensor,  # [B, G, Lq, Di]
    ki: torch.Tensor,  # [B, Lk, Di]
    q_time: torch.Tensor,  # [B, Lq] int32
    k_time: torch.Tensor,  # [B, Lk] int32
    block_size: int,
    k: int,
    allowed: torch.Tensor | None = None,
    forced: torch.Tensor | None = None,
    return_scores: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`decode_reference.decode_select_reference`."""
    check_decode_select_inputs(qi, ki, q_time, k_time, block_size, k, allowed, forced)
    scores = decode_block_scores_triton(qi, ki, q_time, k_time, block_size)
    return topk_blocks(scores, k, allowed, forced, return_scores)
