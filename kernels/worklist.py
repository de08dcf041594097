"""Work lists of the KV-outer kernels (attention forward and backward, indexer-KL): a block selection
inverted into per-KV-block lists of the (query, slot) pairs that chose the block, cut into chunks.

Torch ops only and no host sync: the chunk count is bounded on the host and the real count is read
on the device, so the launches that follow stay asynchronous.
"""
from __future__ import annotations

import torch

# Entries and offsets are int32 below this size, int64 above (the tests lower it to run the int64
# path on small inputs). 2^31 pairs are reached by all-block selections at long L (e.g. B*G*L*K =
# 4 * 128K * 4096).
INDEX32_LIMIT = 2**31


def block_csr(block_idx: torch.Tensor, nb: int, groups_inner: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Invert ``block_idx [B, G, Ls, K]`` (a query segment) into per-(batch, group, block) lists.

    Keys: ``(b * G + g) * nb + block``, or with ``groups_inner`` ``(b * nb + block) * G + g`` (the
    groups of one KV block adjacent, for kernels that then reduce over the groups of a block).
    Returns ``pair_entry [B*G*Ls*K]`` (``q_local * K + slot`` inside its (b, g), grouped by key,
    queries ascending inside a key; entries past the valid ones are unused) and ``offsets [keys + 1]``
    (CSR offsets), int32 while the sizes fit.
    """
    batch, groups, seg_len, slots = block_idx.shape
    n_bg = batch * groups
    flat = block_idx.reshape(n_bg, seg_len * slots)
    bg = torch.arange(n_bg, device=flat.device, dtype=torch.int32)[:, None]
    if groups_inner:
        key = (bg // groups * nb + flat) * groups + bg % groups
    else:
        key = bg * nb + flat
    key = torch.where(flat >= 0, key, n_bg * nb).reshape(-1)  # empty slots sort last
    sorted_key, order = torch.sort(key, stable=True)
    entry_dtype = torch.int32 if seg_len * slots < INDEX32_LIMIT else torch.int64
    pair_entry = (order % (seg_len * slots)).to(entry_dtype)
    bounds = torch.arange(n_bg * nb + 1, device=flat.device, dtype=torch.int32)
    offsets = torch.searchsorted(sorted_key, bounds, out_int32=key.numel() < INDEX32_LIMIT)
    return pair_entry, offsets


def chunks(offsets: torch.Tensor, per_chunk: int, max_pairs: int):
    """Cut each key's pair list into chunks of at most ``per_chunk`` pairs (so a popular block is
    spread over many programs).

    Returns ``key, start, length [C]`` with ``C = ceil(max_pairs / per_chunk) + keys``, an upper bound
    known on the host (chunks past the real ones have length 0), ``n_chunks [1]`` int32, the real
    count, and ``first [keys]`` int32, the first chunk of each key.
    """
    counts = offsets[1:] - offsets[:-1]
    n_keys = counts.numel()
    per_key = (counts + per_chunk - 1) // per_chunk
    ends = torch.cumsum(per_key, 0, dtype=torch.int32)
    cap = -(-max_pairs // per_chunk) + n_keys
    c = torch.arange(cap, device=offsets.device, dtype=torch.int32)
    key = torch.searchsorted(ends, c, right=True, out_int32=True).clamp_(max=n_keys - 1)
    first = ends - per_key
    index = c - first[key]
    start = offsets[key] + index * per_chunk
    length = (counts[key] - index * per_chunk).clamp(0, per_chunk)
    return key, start, length, ends[-1:].contiguous(), first
