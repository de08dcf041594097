"""Input checks shared by the references and the Triton kernels: one clear message per mistake,
raised before any kernel or einsum can fail deep inside torch."""
from __future__ import annotations

import torch


class KernelInputError(ValueError):
    """An MSA op was called with inputs that break its contract (DESIGN.md section 5)."""


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise KernelInputError(message)


def _check_dims(name: str, t: torch.Tensor, ndim: int, layout: str) -> None:
    _need(isinstance(t, torch.Tensor), f"{name} must be a torch.Tensor {layout}, got {type(t).__name__}")
    _need(t.dim() == ndim, f"{name} must have shape {layout}, got {tuple(t.shape)}")


def _check_times(q_time: torch.Tensor, k_time: torch.Tensor, batch: int, seq_len: int) -> None:
    for name, t in (("q_time", q_time), ("k_time", k_time)):
        _check_dims(name, t, 2, "[B, L]")
        _need(tuple(t.shape) == (batch, seq_len), f"{name} must be [B={batch}, L={seq_len}], got {tuple(t.shape)}")
        _need(t.dtype == torch.int32, f"{name} must be int32 (padding keys carry INT32_MAX), got {t.dtype}")
    # Block ids, token positions and [B, L] time offsets are 32-bit inside the kernels (products with
    # heads, slots or dims are 64-bit).
    _need(batch * seq_len < 2**31, f"B * L = {batch} * {seq_len} tokens must stay below 2^31; lower batch_size or context_len")


# Limits of the Triton kernels (the references take any size).
# top_k: select_blocks merges candidates in a [rows, 2 * next_pow2(top_k)] tile and the query-outer
# union sorts [tile queries * next_pow2(top_k)] entries; Triton tensors hold at most 2^20 elements
# (1M), which 128 rows reach at 4096. Large top_k also costs registers (slower, still exact).
MAX_TOP_K = 4096
# head_dim / index_dim: rows of q, k, v, qi, ki are padded to a power of two >= 16 and masked, so any
# width up to this runs. The bound is what the GPU tests cover (64, 128): the query-outer forward
# stages 128-key K and V tiles in shared memory (3 stages: 192 KB at 128 in bf16, 384 KB at 256,
# past the H200's 228 KB), so wider heads need smaller key steps first (CONFIG qo_keys / qo_stages).
MAX_HEAD_DIM = 128


def check_kernel_block_size(block_size: int, key: str = "block_size") -> None:
    """Block sizes the Triton kernels take: a power of two (blocks under 16 tokens run in 16-key
    tiles with the rest masked)."""
    is_int = isinstance(block_size, int) and not isinstance(block_size, bool)
    if is_int and block_size > 0 and block_size & (block_size - 1) == 0:
        return
    below = 1 << (block_size.bit_length() - 1) if is_int and block_size > 0 else 16
    raise KernelInputError(f"{key}={block_size!r}: the Triton kernels need a power of two (1, 2, 4, 8, 16, ...); "
                           f"e.g. {key}={below}")


def check_kernel_config(block_size: int, top_k: int, head_dim: int, index_dim: int, prefix: str = "model.") -> None:
    """Model-build check that the Triton kernels can take these sizes; the message names the config
    key (``prefix`` + name) and the fix. Per-layout limits (top_k <= number of blocks) are checked
    where the layout is known."""
    check_kernel_block_size(block_size, f"{prefix}block_size")
    _need(isinstance(top_k, int) and not isinstance(top_k, bool) and top_k > 0,
          f"{prefix}top_k must be a positive integer, got {top_k!r}")
    # Only a top_k above the bound gets the kernels' reason and the block_size advice.
    _need(top_k <= MAX_TOP_K, f"{prefix}top_k={top_k!r}: the Triton kernels need 1 <= top_k <= {MAX_TOP_K} "
          f"(a Triton tile holds at most 2^20 elements); lower {prefix}top_k or raise {prefix}block_size")
    for name, value in (("head_dim", head_dim), ("index_dim", index_dim)):
        _need(isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_HEAD_DIM,
              f"{prefix}{name}={value!r}: the Triton kernels need 1 <= {name} <= {MAX_HEAD_DIM} "
              f"(the kernels' K/V tiles must fit in shared memory); lower {prefix}{name}")


def _check_block_size(block_size: int) -> None:
    _need(isinstance(block_size, int) and block_size > 0, f"block_size must be a positive int, got {block_size!r}")


def check_select_inputs(qi, ki, q_time, k_time, block_size, k, allowed, forced) -> None:
    _check_dims("qi", qi, 4, "[B, G, L, Di]")
    _check_dims("ki", ki, 3, "[B, L, Di]")
    batch, groups, seq_len, index_dim = qi.shape
    _need(tuple(ki.shape) == (batch, seq_len, index_dim),
          f"ki must be [B={batch}, L={seq_len}, Di={index_dim}] to match qi, got {tuple(ki.shape)}")
    _check_times(q_time, k_time, batch, seq_len)
    _check_block_size(block_size)
    nb = (seq_len + block_size - 1) // block_size
    _need(isinstance(k, int) and k > 0, f"k (blocks per query) must be a positive int, got {k!r}")
    _need(k <= nb, f"k={k} is larger than the number of KV blocks ({nb} = ceil(L={seq_len} / block_size={block_size})); "
                   f"lower k or block_size")
    if allowed is not None:
        _need(tuple(allowed.shape) == (batch, groups, nb) and allowed.dtype == torch.bool,
              f"allowed must be a bool mask [B={batch}, G={groups}, NB={nb}], got {tuple(allowed.shape)} {allowed.dtype}")
    if forced is not None:
        _need(forced.dim() == 4 and tuple(forced.shape[:3]) == (batch, groups, seq_len),
              f"forced must be [B={batch}, G={groups}, L={seq_len}, F], got {tuple(forced.shape)}")
        _need(forced.shape[-1] <= k, f"forced has {forced.shape[-1]} slots but only k={k} blocks are kept")
        _need(forced.dtype in (torch.int32, torch.int64), f"forced must be an integer tensor, got {forced.dtype}")


def _check_block_idx(block_idx, batch, groups, seq_len, block_size) -> None:
    _check_dims("block_idx", block_idx, 4, "[B, G, L, K]")
    _need(tuple(block_idx.shape[:3]) == (batch, groups, seq_len),
          f"block_idx must be [B={batch}, G={groups}, L={seq_len}, K], got {tuple(block_idx.shape)}")
    _need(block_idx.dtype == torch.int32, f"block_idx must be int32 (-1 = empty slot), got {block_idx.dtype}")
    _check_block_size(block_size)


def check_attention_inputs(q, k, v, block_idx, q_time, k_time, block_size) -> None:
    _check_dims("q", q, 4, "[B, Hq, L, D]")
    _check_dims("k", k, 4, "[B, G, L, D]")
    _check_dims("v", v, 4, "[B, G, L, D]")
    batch, n_heads, seq_len, head_dim = q.shape
    groups = k.shape[1]
    _need(tuple(k.shape) == (batch, groups, seq_len, head_dim) and k.shape == v.shape,
          f"k and v must both be [B={batch}, G, L={seq_len}, D={head_dim}], got k {tuple(k.shape)} v {tuple(v.shape)}")
    _need(groups > 0 and n_heads % groups == 0,
          f"query heads ({n_heads}) must be a multiple of KV heads / GQA groups ({groups})")
    _need(q.dtype == k.dtype == v.dtype, f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    _check_block_idx(block_idx, batch, groups, seq_len, block_size)
    _check_times(q_time, k_time, batch, seq_len)


def check_kl_inputs(qi, ki, block_idx, q, k, lse, q_time, k_time, block_size) -> None:
    _check_dims("qi", qi, 4, "[B, G, L, Di]")
    _check_dims("ki", ki, 3, "[B, L, Di]")
    _check_dims("q", q, 4, "[B, Hq, L, D]")
    _check_dims("k", k, 4, "[B, G, L, D]")
    batch, groups, seq_len, index_dim = qi.shape
    _need(tuple(ki.shape) == (batch, seq_len, index_dim), f"ki must be [B, L, Di] matching qi, got {tuple(ki.shape)}")
    _need(q.shape[0] == batch and q.shape[2] == seq_len and q.shape[1] % groups == 0,
          f"q must be [B={batch}, Hq (multiple of G={groups}), L={seq_len}, D], got {tuple(q.shape)}")
    _need(tuple(k.shape) == (batch, groups, seq_len, q.shape[-1]),
          f"k must be [B={batch}, G={groups}, L={seq_len}, D={q.shape[-1]}], got {tuple(k.shape)}")
    _need(tuple(lse.shape) == (batch, q.shape[1], seq_len), f"lse must be [B, Hq, L], got {tuple(lse.shape)}")
    _check_block_idx(block_idx, batch, groups, seq_len, block_size)
    _check_times(q_time, k_time, batch, seq_len)
