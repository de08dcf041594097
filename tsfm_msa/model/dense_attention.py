"""Dense attention under the time-visibility rule, linear in memory outside the attention kernel.

Key j is visible to query i iff ``k_time[j] <= q_time[i]`` (padding keys carry INT32_MAX, padding
queries -1 and see nothing). Two implementations of one function:

- CUDA: FlexAttention with a ``mask_mod`` on the time ids and a ``BlockMask`` built from the time
  range of every 128-token tile, so tiles with no visible key are skipped, tiles that are fully
  visible run unmasked, and GQA reads K/V without copying them per head. No [L, L] tensor exists;
  the block mask is [L/128, L/128] and is built once per layout (cached by the caller's key).
- CPU (and any device without Flex), and short windows on CUDA (at most ``SMALL_PAIRS`` query-key
  pairs, where a compiled kernel buys nothing): exact attention in query chunks of bounded size,
  differentiable through autograd.

Both return the output and the log-sum-exp of every query row (``-inf`` where nothing is visible,
with a zero output), which the indexer warmup needs; the log-sum-exp carries no gradient.
"""
from __future__ import annotations

import math
from typing import Hashable

import torch

from tsfm_msa.kernels import INT32_MAX
from tsfm_msa.kernels.dispatch import CALLS

FLEX_BLOCK = 128
# Up to this many (query, key) pairs (2K x 2K tokens) the chunked path is used on CUDA too.
SMALL_PAIRS = 1 << 22
# Elements of one chunk's [B, Hq, Lc, L] score tile on the CPU path.
_CHUNK_ELEMENTS = 1 << 24
# Flex's tensor-core tiles need head dims of at least 16: smaller ones are zero-padded (the dot
# products, and so the result, do not change).
_FLEX_MIN_DIM = 16

_compiled_flex = None


def time_masked_attention(
    q: torch.Tensor,  # [B, Hq, Lq, D]
    k: torch.Tensor,  # [B, G, L, D]
    v: torch.Tensor,  # [B, G, L, Dv]
    q_time: torch.Tensor,  # [Lq] int32 (shared by the batch)
    k_time: torch.Tensor,  # [L] int32
    scale: float | None = None,
    cache: dict | None = None,
    cache_key: Hashable | None = None,
    return_lse: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Exact softmax attention of every query head over the keys visible to it by time.

    ``Hq`` must be a multiple of ``G`` (GQA). ``cache``/``cache_key`` keep the Flex block mask of a
    fixed (q_time, k_time) pair, so it is built once per layout. Returns ``out [B, Hq, Lq, Dv]`` in
    the dtype of ``v`` and ``lse [B, Hq, Lq]`` float32 (``None`` with ``return_lse=False``, which
    saves the CPU path a pass).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if q.is_cuda and q.shape[2] * k.shape[2] > SMALL_PAIRS and _flex_usable():
        CALLS[("dense_attention", "flex")] += 1
        mask = None
        if cache is not None and cache_key is not None:
            mask = cache.get(cache_key)
        if mask is None:
            mask = time_block_mask(q_time, k_time)
            if cache is not None and cache_key is not None:
                cache[cache_key] = mask
        return _flex(q, k, v, mask, scale)
    CALLS[("dense_attention", "chunked")] += 1
    return _chunked_reference(q, k, v, q_time, k_time, scale, return_lse)


def group_key_ranges(layout) -> tuple[tuple[int, int], ...]:
    """Token range ``[start, end)`` of every sensor group's segment of the layout (tokens are
    group-major, each segment padded to whole blocks), built once per layout."""
    def build() -> tuple[tuple[int, int], ...]:
        counts = torch.bincount(layout.block_group.cpu(), minlength=layout.n_groups).tolist()
        ranges, start = [], 0
        for count in counts:
            end = min(start + count * layout.block_size, layout.seq_len)
            ranges.append((start, end))
            start = end
        return tuple(ranges)

    return layout.cached(("group_key_ranges",), build)


def own_group_attention(
    q: torch.Tensor,  # [B, Hq, Lq, D]: Hq / n_groups query heads per sensor group, group-major
    k: torch.Tensor,  # [B, n_groups or 1, L, D]
    v: torch.Tensor,  # [B, n_groups or 1, L, Dv]
    layout,
    q_time: torch.Tensor | None = None,  # [Lq] int32; default the layout's (every row)
    scale: float | None = None,
    cache_key: Hashable | None = "dense_mask",
    return_lse: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`time_masked_attention` where the query heads of GQA group g read only the keys of sensor
    group g: dense attention over the support the ``sensor`` group policy selects from. A shared key
    head (``k.shape[1] == 1``) is sliced per group the same way. One call per group on its contiguous
    key segment, so the work is that of dense attention divided by the number of groups and nothing
    larger than the dense path's tensors is built."""
    groups = layout.n_groups
    if q.shape[1] % groups or k.shape[1] not in (1, groups):
        raise ValueError(f"own-group attention needs query heads ({q.shape[1]}) divisible by the sensor groups "
                         f"({groups}) and key heads equal to them or 1, got {k.shape[1]}")
    rep = q.shape[1] // groups
    q_time = layout.q_time if q_time is None else q_time
    outs, lses = [], []
    for g, (start, end) in enumerate(group_key_ranges(layout)):
        head = g if k.shape[1] > 1 else 0
        # Contiguous slices: the compiled Flex kernel guards on strides (a strided view would compile anew).
        out, lse = time_masked_attention(
            q[:, g * rep:(g + 1) * rep].contiguous(), k[:, head:head + 1, start:end].contiguous(),
            v[:, head:head + 1, start:end].contiguous(),
            q_time, layout.k_time[start:end], scale, cache=layout.cache,
            cache_key=None if cache_key is None else (cache_key, "own_group", g), return_lse=return_lse)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, 1), (torch.cat(lses, 1) if return_lse else None)


def _flex_usable() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def time_block_mask(q_time: torch.Tensor, k_time: torch.Tensor):
    """Flex ``BlockMask`` for the time-visibility rule, from per-tile time ranges.

    A (query tile, key tile) pair is skipped when its earliest key is later than its latest query,
    runs unmasked when its latest key is visible to its earliest query (no padding on either side),
    and is masked token by token otherwise. O(L) to read the times, O((L/128)^2) for the tile table.
    """
    from torch.nn.attention.flex_attention import BlockMask

    n_q, n_k = q_time.numel(), k_time.numel()
    q_pad = _pad_to(q_time.to(torch.int32), FLEX_BLOCK, -1)
    k_pad = _pad_to(k_time.to(torch.int32), FLEX_BLOCK, INT32_MAX)
    q_tiles, k_tiles = q_pad.view(-1, FLEX_BLOCK), k_pad.view(-1, FLEX_BLOCK)
    q_min, q_max = q_tiles.amin(-1), q_tiles.amax(-1)  # padding queries (-1) pull q_min down: never "full"
    k_min, k_max = k_tiles.amin(-1), k_tiles.amax(-1)  # padding keys (INT32_MAX) push k_max up: never "full"
    any_visible = k_min[None, :] <= q_max[:, None]  # [NQB, NKB]
    full = k_max[None, :] <= q_min[:, None]
    partial = any_visible & ~full

    def listed(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        count = table.sum(-1, dtype=torch.int32)
        order = torch.argsort((~table).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return count[None, None].contiguous(), order[None, None].contiguous()

    kv_num, kv_idx = listed(partial)
    full_num, full_idx = listed(full)

    def visible_by_time(b, h, q_idx, kv_idx):
        return k_pad[kv_idx] <= q_pad[q_idx]

    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=FLEX_BLOCK,
                                    mask_mod=visible_by_time, seq_lengths=(n_q, n_k))


def _pad_to(x: torch.Tensor, multiple: int, value: int) -> torch.Tensor:
    pad = -x.numel() % multiple
    return torch.nn.functional.pad(x, (0, pad), value=value) if pad else x


def _flex(q, k, v, block_mask, scale):
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if _compiled_flex is None:
        import torch._dynamo as dynamo

        # One compiled kernel per (shape, dtype); a run meets a few layouts and mask variants.
        dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 64)
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    dv = v.shape[-1]
    if q.shape[-1] < _FLEX_MIN_DIM:
        q = torch.nn.functional.pad(q, (0, _FLEX_MIN_DIM - q.shape[-1]))
        k = torch.nn.functional.pad(k, (0, _FLEX_MIN_DIM - k.shape[-1]))
    if dv < _FLEX_MIN_DIM:
        v = torch.nn.functional.pad(v, (0, _FLEX_MIN_DIM - dv))
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    out, lse = _compiled_flex(q.to(dtype), k.to(dtype), v.to(dtype), block_mask=block_mask, scale=scale,
                              enable_gqa=q.shape[1] != k.shape[1], return_lse=True)
    return out[..., :dv], lse.float()


def _chunked_reference(q, k, v, q_time, k_time, scale, return_lse: bool = True):
    """Exact attention in query chunks: SDPA (the fused CPU kernel, GQA without K/V copies) for the
    output and its gradients, and the log-sum-exp from a separate no-grad pass (every caller uses it
    detached). Measured on one CPU thread, 2K tokens x batch 8, a dense_small training step: 22.5 s
    with einsum/logsumexp through autograd, 2.9 s like this."""
    import torch.nn.functional as F

    batch, n_heads, n_q, _ = q.shape
    groups, n_k = k.shape[1], k.shape[2]
    rep = n_heads // groups
    chunk = max(1, min(n_q, _CHUNK_ELEMENTS // max(1, batch * n_heads * n_k)))
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    outs, lses = [], []
    for start in range(0, n_q, chunk):
        stop = min(n_q, start + chunk)
        visible = k_time[None, :] <= q_time[start:stop, None]  # [Lc, L]
        seen = visible.any(-1)  # rows with no visible key (padding) get a zero output, not NaN
        mask = visible | ~seen[:, None]
        out = F.scaled_dot_product_attention(q[:, :, start:stop], k, v, attn_mask=mask, scale=scale,
                                             enable_gqa=rep > 1)
        outs.append(out * seen[:, None].to(out.dtype))
        if not return_lse:
            continue
        with torch.no_grad():
            qg = q[:, :, start:stop].float().view(batch, groups, rep, stop - start, -1)
            logits = torch.einsum("bgrqd,bgkd->bgrqk", qg, k.float()) * scale
            lse = torch.logsumexp(logits.masked_fill_(~visible, float("-inf")), dim=-1)  # [B, G, R, Lc]
        lses.append(lse.reshape(batch, n_heads, stop - start))
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2) if return_lse else None
