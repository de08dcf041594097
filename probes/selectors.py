"""Block selectors compared by the probes, all plugged into ``MSAAttention.selector``.

Every selector scores the KV blocks of each (GQA group, query) and keeps the top ``layer.top_k`` under
the layer's group policy, with the same forced local block as the learned indexer — so all of them run
at the same block budget and differ only in *which* blocks they pick:

- ``dense``: every block (upper bound; identical to dense attention),
- ``local``: the most recent visible blocks (a sliding window),
- ``random``: uniformly random visible blocks (seeded),
- ``oracle``: the blocks with the most dense attention mass of this layer (mean over the group's heads),
- ``moba``: MoBA-like gating, the group's mean query dotted with each block's mean visible key
  (training-free),
- ``learned``: the layer's own index branch (``layer.select``), i.e. the hook left empty.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator

import torch

from tsfm_msa.model.attention import MSAAttention
from tsfm_msa.probes.scenarios import ProbeConfigError
from tsfm_msa.tokens import TokenLayout

SELECTORS = ("dense", "local", "random", "oracle", "moba", "learned")
TRAINING_FREE = ("dense", "local", "random", "oracle", "moba")

Selector = Callable[[MSAAttention, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, TokenLayout], torch.Tensor]


def key_visibility(layout: TokenLayout) -> torch.Tensor:
    """bool [L(query), L(key)]: key j visible to query i by time."""
    return layout.k_time[None, :] <= layout.q_time[:, None]


def block_pool(scores: torch.Tensor, layout: TokenLayout, how: str) -> torch.Tensor:
    """Pool token scores ``[B, G, L, L]`` over each KV block's *visible* keys -> ``[B, G, L, NB]``.

    how: ``max``, ``sum`` or ``mean``. Blocks without a visible key get -inf.
    """
    visible = key_visibility(layout)  # [L, L]
    nb, bs = layout.n_blocks, layout.block_size
    pad = nb * bs - scores.shape[-1]
    vis = torch.nn.functional.pad(visible, (0, pad), value=False).view(visible.shape[0], nb, bs)  # [L, NB, bs]
    s = torch.nn.functional.pad(scores, (0, pad), value=0.0).unflatten(-1, (nb, bs))  # [B, G, L, NB, bs]
    any_visible = vis.any(-1)  # [L, NB]
    if how == "max":
        pooled = s.masked_fill(~vis, float("-inf")).amax(-1)
    elif how == "sum":
        pooled = s.masked_fill(~vis, 0.0).sum(-1)
    elif how == "mean":
        pooled = s.masked_fill(~vis, 0.0).sum(-1) / vis.sum(-1).clamp(min=1)
    else:
        raise ProbeConfigError(f"block_pool: how must be max, sum or mean, got {how!r}")
    return pooled.masked_fill(~any_visible, float("-inf"))


def _topk_forced(key: torch.Tensor, forced: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k blocks of ``key [B, G, L, NB]`` (-inf = not selectable) with ``forced [B, G, L, F]`` (-1 =
    none) always kept first -> int32 ``[B, G, L, k]``, -1 for empty slots."""
    nb = key.shape[-1]
    is_forced = torch.zeros(*key.shape[:-1], nb + 1, dtype=torch.bool, device=key.device)
    is_forced.scatter_(-1, torch.where(forced < 0, nb, forced).long(), True)  # column nb absorbs the -1s
    key = key.masked_fill(is_forced[..., :nb], float("inf"))
    width = min(k, nb)
    top_val, top_idx = torch.topk(key, width, dim=-1)
    idx = torch.where(top_val == float("-inf"), -1, top_idx).to(torch.int32)
    if width < k:
        idx = torch.nn.functional.pad(idx, (0, k - width), value=-1)
    return idx.contiguous()


def policy_topk(scores: torch.Tensor, layer: MSAAttention, layout: TokenLayout) -> torch.Tensor:
    """Keep the best ``layer.top_k`` blocks of ``scores [B, G, L, NB]`` under the layer's group policy,
    mirroring ``MSAAttention.select``: free = any visible block plus the query's own block; sensor =
    group g's blocks only plus g's local block; hybrid = ``k_own`` of g's blocks, the rest anywhere."""
    batch, groups, seq_len, nb = scores.shape
    k = layer.top_k
    if layer.group_policy == "free":
        forced = layout.own_local_block.view(1, 1, seq_len, 1).expand(batch, groups, seq_len, 1)
        return _topk_forced(scores, forced, k)
    own = layout.block_group[None, :] == torch.arange(groups, device=scores.device)[:, None]  # [G, NB]
    own_scores = scores.masked_fill(~own[None, :, None, :], float("-inf"))
    local = layout.group_local_block[None, :, :, None].expand(batch, groups, seq_len, 1)
    if layer.group_policy == "sensor":
        return _topk_forced(own_scores, local, k)
    first = _topk_forced(own_scores, local, layer.k_own)
    if layer.k_own == k:
        return first
    return _topk_forced(scores, first, k)


def _group_mean_query(q: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hq, L, D] -> [B, G, L, D]: mean over the query heads sharing a KV head."""
    batch, heads, seq_len, dim = q.shape
    return q.view(batch, groups, heads // groups, seq_len, dim).mean(2)


def dense_selector(layer, q, k, qi, ki, layout) -> torch.Tensor:
    batch, groups, seq_len, _ = k.shape
    every = torch.arange(layout.n_blocks, dtype=torch.int32, device=k.device)
    return every.expand(batch, groups, seq_len, layout.n_blocks).contiguous()


def local_selector(layer, q, k, qi, ki, layout) -> torch.Tensor:
    """Most recent visible blocks: a block's score is its latest visible key time (ties: later block)."""
    batch, groups, seq_len, _ = k.shape
    times = layout.k_time.to(torch.float32).masked_fill(layout.token_variate < 0, float("-inf"))  # [L]
    # Tie-break by position so equal times prefer the later block, and keep the score finite.
    times = times + torch.arange(seq_len, device=k.device) * 1e-6
    scores = block_pool(times.expand(batch, groups, seq_len, seq_len), layout, "max")
    return policy_topk(scores, layer, layout)


def make_random_selector(seed: int) -> Selector:
    """Uniformly random visible blocks. The generator restarts at every call, so the same input gets
    the same selection (counterfactual pairs differ only by their inputs)."""

    def random_selector(layer, q, k, qi, ki, layout) -> torch.Tensor:
        batch, groups, seq_len, _ = k.shape
        gen = torch.Generator(device="cpu").manual_seed(seed)
        noise = torch.rand(batch, groups, seq_len, layout.n_blocks, generator=gen).to(k.device)
        visible = block_pool(torch.zeros(1, 1, seq_len, seq_len, device=k.device), layout, "max") > float("-inf")
        return policy_topk(noise.masked_fill(~visible, float("-inf")), layer, layout)

    return random_selector


def dense_attention_mass(q: torch.Tensor, k: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Dense softmax attention of every query head, averaged over the heads of each GQA group:
    ``[B, G, L(query), L(key)]`` (rows of padding queries are 0)."""
    batch, heads, seq_len, dim = q.shape
    groups = k.shape[1]
    qg = q.float().view(batch, groups, heads // groups, seq_len, dim)
    logits = torch.einsum("bgrqd,bgkd->bgrqk", qg, k.float()) / math.sqrt(dim)
    logits = logits.masked_fill(~key_visibility(layout), float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # padding queries: all -inf -> 0
    return probs.mean(2)


def oracle_selector(layer, q, k, qi, ki, layout) -> torch.Tensor:
    """Blocks with the most dense attention mass of this layer (the best any selector could match)."""
    mass = block_pool(dense_attention_mass(q, k, layout), layout, "sum")
    return policy_topk(mass, layer, layout)


def moba_selector(layer, q, k, qi, ki, layout) -> torch.Tensor:
    """MoBA-style gate: mean query of the group . mean of the block's visible keys (= mean of the
    logits over the block's visible keys), training-free."""
    qbar = _group_mean_query(q.float(), k.shape[1])  # [B, G, L, D]
    logits = torch.einsum("bgqd,bgkd->bgqk", qbar, k.float())
    return policy_topk(block_pool(logits, layout, "mean"), layer, layout)


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
    previous = [layer.selector for layer in layers]
    try:
        for i, layer in enumerate(layers):
            layer.selector = get_selector(name, seed + 1009 * i)  # random-k: its own stream per layer
        yield
    finally:
        for layer, prev in zip(layers, previous):
            layer.selector = prev
