"""Block selectors compared by the probes, all plugged into ``MSAAttention.selector``.

Every selector scores the KV blocks of each (GQA group, query) and keeps the top ``layer.top_k`` under
the layer's group policy, with the same forced local block as the learned indexer — so all of them run
at the same block budget and differ only in *which* blocks they pick:

- ``dense``: every block (upper bound; identical to dense attention). The probes run it as the same
  weights in a dense-attention model (``command.dense_twin``), so no all-blocks list is built;
  the hook below is for short layouts and tests,
- ``local``: the most recent visible blocks (a sliding window),
- ``random``: uniformly random visible blocks (seeded),
- ``oracle``: the blocks with the most dense attention mass of this layer (mean over the group's heads),
- ``moba``: MoBA-like gating, the group's mean query dotted with each block's mean visible key
  (training-free),
- ``learned``: the layer's own index branch (``layer.select``), i.e. the hook left empty.

Nothing here builds an [L, L] tensor: block scores are computed for a chunk of queries at a time
(memory O(chunk * L)), reduced to the chunk's top-k, and only ``[B, G, L, K]`` is kept.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator

import torch

from tsfm_msa.kernels.reference import topk_blocks
from tsfm_msa.model.attention import MSAAttention
from tsfm_msa.model.dense_attention import time_masked_attention
from tsfm_msa.probes.scenarios import ProbeConfigError
from tsfm_msa.tokens import TokenLayout

SELECTORS = ("dense", "local", "random", "oracle", "moba", "learned")
TRAINING_FREE = ("dense", "local", "random", "oracle", "moba")

# Elements of the largest per-chunk float tensor ([B, H, chunk, L] logits): 2^24 floats = 64 MiB on
# the CPU; on CUDA 2^28 (1 GiB of fp32) so a 64K-token layout needs a few hundred chunks, not 10K.
CHUNK_ELEMENTS = 1 << 24
CUDA_CHUNK_ELEMENTS = 1 << 28

Selector = Callable[[MSAAttention, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, TokenLayout], torch.Tensor]
# scores(start, stop) -> [B, G, stop - start, NB] block scores of the queries start..stop-1 (-inf: invisible)
ChunkScores = Callable[[int, int], torch.Tensor]


def query_chunk(seq_len: int, per_query: int, budget: int | None = None,
                device: torch.device | None = None) -> int:
    """Queries per chunk so that a ``[chunk, per_query]`` tensor stays within ``budget`` elements
    (default ``CHUNK_ELEMENTS``, or ``CUDA_CHUNK_ELEMENTS`` on a CUDA ``device``)."""
    if budget is None:
        budget = CUDA_CHUNK_ELEMENTS if device is not None and device.type == "cuda" else CHUNK_ELEMENTS
    return max(1, min(seq_len, budget // max(1, per_query)))


def key_visibility(layout: TokenLayout, rows: slice | None = None) -> torch.Tensor:
    """bool [Lq, L(key)]: key j visible to query i by time, for the query rows ``rows`` (default all;
    only call it with all rows on short layouts)."""
    q_time = layout.q_time if rows is None else layout.q_time[rows]
    return layout.k_time[None, :] <= q_time[:, None]


def block_pool(scores: torch.Tensor, layout: TokenLayout, how: str, rows: slice | None = None) -> torch.Tensor:
    """Pool token scores ``[..., Lq, L]`` over each KV block's *visible* keys -> ``[..., Lq, NB]``;
    ``rows`` says which query rows the ``Lq`` scores belong to (default: all).

    how: ``max``, ``sum`` or ``mean``. Blocks without a visible key get -inf.
    """
    visible = key_visibility(layout, rows)  # [Lq, L]
    nb, bs = layout.n_blocks, layout.block_size
    pad = nb * bs - scores.shape[-1]
    vis = torch.nn.functional.pad(visible, (0, pad), value=False).view(visible.shape[0], nb, bs)  # [Lq, NB, bs]
    s = torch.nn.functional.pad(scores, (0, pad), value=0.0).unflatten(-1, (nb, bs))  # [..., Lq, NB, bs]
    any_visible = vis.any(-1)  # [Lq, NB]
    if how == "max":
        pooled = s.masked_fill(~vis, float("-inf")).amax(-1)
    elif how == "sum":
        pooled = s.masked_fill(~vis, 0.0).sum(-1)
    elif how == "mean":
        pooled = s.masked_fill(~vis, 0.0).sum(-1) / vis.sum(-1).clamp(min=1)
    else:
        raise ProbeConfigError(f"block_pool: how must be max, sum or mean, got {how!r}")
    return pooled.masked_fill(~any_visible, float("-inf"))


def block_min_key_time(layout: TokenLayout) -> torch.Tensor:
    """Earliest key time of every KV block ``[NB]`` (INT32 max for all-padding blocks): block b has a
    visible key for query i iff ``block_min_key_time[b] <= q_time[i]``."""
    nb, bs = layout.n_blocks, layout.block_size
    big = torch.iinfo(torch.int32).max
    k_time = torch.nn.functional.pad(layout.k_time, (0, nb * bs - layout.seq_len), value=big)
    return k_time.view(nb, bs).amin(-1)


def policy_topk(scores: torch.Tensor, layer: MSAAttention, layout: TokenLayout, rows: slice | None = None) -> torch.Tensor:
    """Keep the best ``layer.top_k`` blocks of ``scores [B, G, Lq, NB]`` (query rows ``rows``, default
    all) under the layer's group policy, mirroring ``MSAAttention.select``: free = any visible block
    plus the query's own block; sensor = group g's blocks only plus g's local block; hybrid = ``k_own``
    of g's blocks, the rest anywhere."""
    rows = rows if rows is not None else slice(0, layout.seq_len)
    batch, groups, n_rows, nb = scores.shape
    k = layer.top_k
    if layer.group_policy == "free":
        forced = layout.own_local_block[rows].view(1, 1, n_rows, 1).expand(batch, groups, n_rows, 1)
        return topk_blocks(scores, k, None, forced, return_scores=False)
    own = layout.block_group[None, :] == torch.arange(groups, device=scores.device)[:, None]  # [G, NB]
    own_scores = scores.masked_fill(~own[None, :, None, :], float("-inf"))
    local = layout.group_local_block[None, :, rows, None].expand(batch, groups, n_rows, 1)
    if layer.group_policy == "sensor":
        return topk_blocks(own_scores, k, None, local, return_scores=False)
    first = topk_blocks(own_scores, layer.k_own, None, local, return_scores=False)
    if layer.k_own == k:
        return first
    return topk_blocks(scores, k, None, first, return_scores=False)


def chunked_policy_topk(scores: ChunkScores, layer: MSAAttention, layout: TokenLayout, chunk: int) -> torch.Tensor:
    """``policy_topk`` over query chunks of ``chunk`` rows: only one chunk's block scores exist at a
    time; returns int32 ``[B, G, L, K]``."""
    parts = []
    for start in range(0, layout.seq_len, chunk):
        rows = slice(start, min(start + chunk, layout.seq_len))
        parts.append(policy_topk(scores(rows.start, rows.stop), layer, layout, rows))
    return torch.cat(parts, dim=2).contiguous()


def _group_mean_query(q: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hq, L, D] -> [B, G, L, D]: mean over the query heads sharing a KV head."""
    batch, heads, seq_len, dim = q.shape
    return q.view(batch, groups, heads // groups, seq_len, dim).mean(2)


def dense_selector(layer, q, k, qi, ki, layout) -> torch.Tensor:
    """Every block: ``[B, G, L, NB]``, O(L^2 / block_size) — for short layouts and tests only; the
    probes run the dense selector as a dense-attention model instead."""
    batch, groups, seq_len, _ = k.shape
    every = torch.arange(layout.n_blocks, dtype=torch.int32, device=k.device)
    return every.expand(batch, groups, seq_len, layout.n_blocks).contiguous()


def local_selector(layer, q, k, qi, ki, layout) -> torch.Tensor:
    """Most recent visible blocks: a block's score is its latest visible key time, ties broken towards
    the later block (block index / NB < 1, so it never outranks a whole time step)."""
    batch, groups, seq_len, _ = k.shape
    nb, bs = layout.n_blocks, layout.block_size
    big = torch.iinfo(torch.int32).max
    k_time = torch.nn.functional.pad(layout.k_time, (0, nb * bs - seq_len), value=big).view(nb, bs)  # [NB, bs]
    tie = torch.arange(nb, device=k.device, dtype=torch.float64) / nb  # [NB]

    def scores(start: int, stop: int) -> torch.Tensor:
        q_time = layout.q_time[start:stop]  # [c]
        seen = k_time[None] <= q_time[:, None, None]  # [c, NB, bs]
        latest = torch.where(seen, k_time[None].double(), float("-inf")).amax(-1) + tie  # [c, NB]
        return latest.expand(batch, groups, stop - start, nb)  # float64: the tie fraction needs the digits

    return chunked_policy_topk(scores, layer, layout, query_chunk(seq_len, batch * groups * nb + nb * bs,
                                                                  device=k.device))


def make_random_selector(seed: int) -> Selector:
    """Uniformly random visible blocks. The generator restarts at every call, so the same input gets
    the same selection (counterfactual pairs differ only by their inputs)."""

    def random_selector(layer, q, k, qi, ki, layout) -> torch.Tensor:
        batch, groups, seq_len, _ = k.shape
        nb = layout.n_blocks
        # Drawn on the tensors' device: at 64K tokens a layer needs B * G * L * NB (10^9) numbers.
        gen = torch.Generator(device=k.device).manual_seed(seed)
        first_time = block_min_key_time(layout)  # [NB]

        def scores(start: int, stop: int) -> torch.Tensor:
            noise = torch.rand(batch, groups, stop - start, nb, generator=gen, device=k.device)
            visible = first_time[None, :] <= layout.q_time[start:stop, None]  # [c, NB]
            return noise.masked_fill(~visible, float("-inf"))

        return chunked_policy_topk(scores, layer, layout, query_chunk(seq_len, batch * groups * nb, device=k.device))

    return random_selector


def dense_attention_mass(q: torch.Tensor, k: torch.Tensor, layout: TokenLayout, rows: slice | None = None) -> torch.Tensor:
    """Dense softmax attention of the query rows ``rows`` (default all) of every head, averaged over
    the heads of each GQA group: ``[B, G, Lq, L(key)]`` (rows of padding queries are 0)."""
    rows = rows if rows is not None else slice(0, q.shape[2])
    batch, heads, _, dim = q.shape
    groups = k.shape[1]
    qr = q[:, :, rows].float()
    qg = qr.view(batch, groups, heads // groups, qr.shape[2], dim)
    logits = torch.einsum("bgrqd,bgkd->bgrqk", qg, k.float()) / math.sqrt(dim)
    logits = logits.masked_fill(~key_visibility(layout, rows), float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # padding queries: all -inf -> 0
    return probs.mean(2)


def oracle_selector(layer, q, k, qi, ki, layout) -> torch.Tensor:
    """Blocks with the most dense attention mass of this layer (the best any selector could match).

    Each query row's log-normaliser comes from one dense attention pass (Flex on CUDA), so a chunk's
    mass is ``exp(q . k * scale - lse)`` straight from one batched matmul: no second softmax pass.
    The chunk's masses are masked by time, sum-pooled per block, averaged over the group's heads,
    reduced to the chunk's top-k and dropped. Equal to ``block_pool(dense_attention_mass(...), "sum")``
    (tests/test_probes_long.py)."""
    batch, heads, seq_len, dim = q.shape
    groups = k.shape[1]
    rep = heads // groups
    nb, bs = layout.n_blocks, layout.block_size
    scale = 1.0 / math.sqrt(dim)
    # The normaliser from the inputs as they are (bf16 under autocast: the same compiled Flex kernel
    # and block mask as the model's dense layers); the logits below in fp32, since the masses of bf16
    # logits would be off by ~10% (the logit's rounding, exponentiated).
    # (values unused: zeros, not k itself, so the compiled kernel sees no aliased inputs and is reused)
    _, lse = time_masked_attention(q, k, torch.zeros_like(k), layout.q_time, layout.k_time, cache=layout.cache,
                                   cache_key="dense_mask")  # [B, Hq, L] float32
    qf, kf = q.float(), k.float()
    q_bg = qf.reshape(batch * groups, rep, seq_len, dim)  # heads h = g * rep + r share KV head g
    k_t = kf.reshape(batch * groups, seq_len, dim).transpose(1, 2)  # [BG, D, L]
    neg_lse = (-lse).reshape(batch * groups, rep, seq_len)
    pad = nb * bs - seq_len
    first_time = block_min_key_time(layout)  # [NB], once for every chunk

    def scores(start: int, stop: int) -> torch.Tensor:
        c = stop - start
        rows = q_bg[:, :, start:stop].reshape(batch * groups, rep * c, dim)
        bias = neg_lse[:, :, start:stop].reshape(batch * groups, rep * c, 1)
        mass = torch.baddbmm(bias, rows, k_t, alpha=scale)  # [BG, R * c, L] log-probabilities
        hidden = layout.k_time[None, :] > layout.q_time[start:stop, None]  # [c, L]: not visible
        mass = mass.view(batch * groups, rep, c, seq_len).masked_fill_(hidden, float("-inf")).exp_()
        if pad:  # layouts pad every group segment to whole blocks, so normally no copy here
            mass = torch.nn.functional.pad(mass, (0, pad))
        mass = mass.view(batch * groups, rep, c, nb, bs)
        pooled = mass.sum(-1).mean(1).view(batch, groups, c, nb)  # [B, G, c, NB]
        visible = first_time[None, :] <= layout.q_time[start:stop, None]  # [c, NB]
        return pooled.masked_fill(~visible, float("-inf"))

    return chunked_policy_topk(scores, layer, layout, query_chunk(seq_len, batch * heads * seq_len, device=q.device))


def _block_key_means(k: torch.Tensor, layout: TokenLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per KV block: the mean of its keys ``[B, G, NB, D]`` (for blocks every key of which is visible),
    the keys themselves ``[B, G, NB, bs, D]`` and their times ``[NB, bs]`` (padding: INT32_MAX)."""
    batch, groups, seq_len, dim = k.shape
    nb, bs = layout.n_blocks, layout.block_size
    pad = nb * bs - seq_len
    keys = (torch.nn.functional.pad(k, (0, 0, 0, pad)) if pad else k).view(batch, groups, nb, bs, dim)
    times = torch.nn.functional.pad(layout.k_time, (0, pad), value=torch.iinfo(torch.int32).max).view(nb, bs)
    return keys.mean(3), keys, times


def moba_selector(layer, q, k, qi, ki, layout) -> torch.Tensor:
    """MoBA-style gate: mean query of the group . mean of the block's visible keys (= mean of the
    logits over the block's visible keys), training-free.

    A block every key of which is visible scores ``qbar . mean(keys)``: one ``[L, NB]`` matmul, never
    the ``[L, L]`` logits. Only the few blocks a query sees in part (its own time step, padding) need
    their visible keys: those are gathered per query (at most ``P`` of them) and scored exactly."""
    batch, groups, seq_len, dim = k.shape
    nb = layout.n_blocks
    qbar = _group_mean_query(q.float(), groups)  # [B, G, L, D]
    key_mean, keys, times = _block_key_means(k.float(), layout)
    first, last = times.amin(-1), times.amax(-1)  # [NB]
    q_time = layout.q_time

    def scores(start: int, stop: int) -> torch.Tensor:
        t = q_time[start:stop]  # [c]
        qc = qbar[:, :, start:stop]  # [B, G, c, D]
        # .float(): under bf16 autocast einsum returns bf16; the scores stay fp32 throughout.
        out = torch.einsum("bgqd,bgnd->bgqn", qc, key_mean).float()  # [B, G, c, NB]
        full = last[None, :] <= t[:, None]  # [c, NB]
        part = (first[None, :] <= t[:, None]) & ~full
        width = int(part.sum(-1).max()) if part.numel() else 0
        if width:
            slot_val, slot = torch.topk(part.to(torch.int8), width, dim=-1)  # [c, P] the partial blocks
            slot_ok = slot_val > 0
            vis = (times[slot] <= t[:, None, None]) & slot_ok[..., None]  # [c, P, bs]
            picked = keys[:, :, slot]  # [B, G, c, P, bs, D]
            logits = torch.einsum("bgqd,bgqpsd->bgqps", qc, picked).float()
            mean = (logits * vis).sum(-1) / vis.sum(-1).clamp(min=1)  # [B, G, c, P]
            current = out.gather(-1, slot.expand(batch, groups, -1, -1))
            out = out.scatter(-1, slot.expand(batch, groups, -1, -1), torch.where(slot_ok, mean, current))
        return out.masked_fill(~(full | part), float("-inf"))

    # The gathered keys of the partial blocks ([B, G, c, P, bs, D]) bound the chunk; P is small
    # (about one block per sensor group, plus padding).
    per_query = batch * groups * max(nb, 4 * layout.n_groups * layout.block_size * dim)
    return chunked_policy_topk(scores, layer, layout, query_chunk(seq_len, per_query, device=k.device))


def moba_token_scores(q: torch.Tensor, k: torch.Tensor, layout: TokenLayout, rows: slice | None = None) -> torch.Tensor:
    """The MoBA gate by its definition: the mean of the group-mean query's logits over each block's
    visible keys, ``[B, G, Lq, NB]`` for the query rows ``rows`` (O(Lq * L): tests and short layouts)."""
    rows = rows if rows is not None else slice(0, q.shape[2])
    qbar = _group_mean_query(q.float(), k.shape[1])
    logits = torch.einsum("bgqd,bgkd->bgqk", qbar[:, :, rows], k.float())
    return block_pool(logits, layout, "mean", rows)


def get_selector(name: str, seed: int = 0) -> Selector | None:
    """The hook for ``name``; None for ``learned`` (the layer's own indexer)."""
    if name == "learned":
        return None
    table: dict[str, Selector] = {
        "dense": dense_selector,
        "local": local_selector,
        "oracle": oracle_selector,
        "moba": moba_selector,
    }
    if name == "random":
        return make_random_selector(seed)
    if name not in table:
        raise ProbeConfigError(f"unknown selector {name!r}; choose from {SELECTORS}")
    return table[name]


def msa_layers(model: torch.nn.Module) -> list[MSAAttention]:
    return [m for m in model.modules() if isinstance(m, MSAAttention)]


@contextlib.contextmanager
def use_selector(model: torch.nn.Module, name: str, seed: int = 0) -> Iterator[None]:
    """Install selector ``name`` on every MSA layer of ``model`` for the duration of the block."""
    layers = msa_layers(model)
    if not layers:
        raise ProbeConfigError("the model has no MSA layer to put a selector on; convert it with "
                               "tsfm_msa.probes.command.as_msa first")
    # random-k: its own stream per layer
    with installed_selectors(layers, [get_selector(name, seed + 1009 * i) for i in range(len(layers))]):
        yield


@contextlib.contextmanager
def installed_selectors(layers: list[MSAAttention], selectors: list) -> Iterator[None]:
    """``layers[i].selector = selectors[i]`` for the duration of the block; the previous ones come back."""
    previous = [layer.selector for layer in layers]
    try:
        for layer, selector in zip(layers, selectors):
            layer.selector = selector
        yield
    finally:
        for layer, prev in zip(layers, previous):
            layer.selector = prev
