"""Probe metrics: selection recall of the needed blocks, forecast errors, counterfactual sensitivity,
support size. Pure functions of tensors / arrays, so they can be checked on crafted inputs."""
from __future__ import annotations

import math

import numpy as np
import torch

from tsfm_msa.tokens import TokenLayout

# Elements of the largest per-chunk tensor of the path metric: 2^24 (16 M).
CHUNK_ELEMENTS = 1 << 24


def forecast_queries(layout: TokenLayout) -> torch.Tensor:
    """Token positions ``[Q]`` whose outputs become the forecast (the hidden horizon target patches)."""
    return layout.forecast_index.flatten()


def needed_blocks(needed: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Ground truth per token ``needed [B, V, n_patches]`` -> KV blocks holding a needed token ``[B, NB]``."""
    tok = needed_tokens(needed, layout)  # [B, L]
    pad = layout.n_blocks * layout.block_size - tok.shape[-1]
    tok = torch.nn.functional.pad(tok, (0, pad), value=False)
    return tok.view(tok.shape[0], layout.n_blocks, layout.block_size).any(-1)


def selected_blocks(block_idx: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """``block_idx [..., K]`` (-1 = empty) -> bool ``[..., NB]``."""
    out = torch.zeros(*block_idx.shape[:-1], n_blocks + 1, dtype=torch.bool, device=block_idx.device)
    out.scatter_(-1, torch.where(block_idx < 0, n_blocks, block_idx).long(), True)
    return out[..., :n_blocks]


def visible_blocks(layout: TokenLayout, rows: torch.Tensor | slice) -> torch.Tensor:
    """bool ``[Lq, NB]``: blocks holding at least one key visible to the query rows ``rows``."""
    nb, bs = layout.n_blocks, layout.block_size
    big = torch.iinfo(torch.int32).max
    first = torch.nn.functional.pad(layout.k_time, (0, nb * bs - layout.seq_len), value=big).view(nb, bs).amin(-1)
    return first[None, :] <= layout.q_time[rows][:, None]


def query_selection(block_idx: torch.Tensor | None, layout: TokenLayout, queries: torch.Tensor,
                    batch: int, groups: int) -> torch.Tensor:
    """Blocks selected by the forecast queries, bool ``[B, G, Q, NB]``, from one layer's ``block_idx
    [B, G, L, K]``; ``None`` means dense attention (every visible block)."""
    if block_idx is None:
        return visible_blocks(layout, queries)[None, None].expand(batch, groups, -1, -1)
    return selected_blocks(block_idx[:, :, queries], layout.n_blocks)


def selection_recall(query_selection_per_layer: list[torch.Tensor], needed: torch.Tensor) -> dict:
    """Recall of the needed blocks ``needed [B, NB]`` by the forecast queries, from each layer's
    selection at those queries (``query_selection [B, G, Q, NB]``).

    For a query and an instance, recall = |selected & needed| / |needed|; averaged over queries and
    instances with at least one needed block. Reported per layer and GQA group, per layer (union over
    groups: read by any group), and overall (``recall``: union over layers and groups, i.e. the needed
    block reaches the forecast query directly in some layer).
    """
    n_need = needed.sum(-1).float()  # [B]
    has = n_need > 0
    if not bool(has.any()):
        return {"recall": float("nan"), "per_layer": [], "per_layer_group": [], "n_instances": 0}
    need = needed[has][:, None, None, :]  # [b, 1, 1, NB]
    denom = n_need[has][:, None, None]
    per_layer_group, per_layer, union = [], [], None
    for query_sel in query_selection_per_layer:
        sel = query_sel[has]  # [b, G, Q, NB]
        hits = (sel & need).sum(-1).float() / denom  # [b, G, Q]
        per_layer_group.append([float(x) for x in hits.mean((0, 2))])
        any_group = sel.any(1, keepdim=True)  # [b, 1, Q, NB]
        per_layer.append(float(((any_group & need).sum(-1).float() / denom).mean()))
        union = any_group if union is None else union | any_group
    overall = float(((union & need).sum(-1).float() / denom).mean())
    return {"recall": overall, "per_layer": per_layer, "per_layer_group": per_layer_group,
            "n_instances": int(has.sum())}


def needed_tokens(needed: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Ground truth per (variate, patch) ``[B, V, n_patches]`` -> per token position ``[B, L]``."""
    valid = layout.token_variate >= 0
    return needed[:, layout.token_variate.clamp(min=0), layout.token_patch.clamp(min=0)] & valid


def path_recall_per_instance(block_idx_per_layer: list[torch.Tensor | None], layout: TokenLayout,
                             needed_tok: torch.Tensor, queries: torch.Tensor,
                             budget: int | None = None) -> torch.Tensor:
    """Per instance ``[B]`` (NaN without a needed token): share of the needed tokens ``needed_tok [B, L]``
    whose information can reach a forecast query through the selections of the layer stack
    (``block_idx [B, G, L, K]`` per layer, ``None`` = dense): a token reaches query i if i reads it
    directly in some layer, or reads (in a later layer) a token that read it. Direct recall misses the
    second route, which a trained sparse model can use (an early layer copies the far event into a
    recent token).

    No [L, L] tensor: per layer, for every (instance, forecast query, block) the latest query time
    among the reached tokens that read the block; a key of the block is then reached iff it is visible
    at that time (visibility is monotone in the query time). Readers are scanned in chunks.
    """
    bs, seq_len, nb = layout.block_size, layout.seq_len, layout.n_blocks
    batch, n_q = needed_tok.shape[0], len(queries)
    reach = torch.zeros(batch, n_q, seq_len, dtype=torch.bool, device=needed_tok.device)  # [B, Q, L]
    reach[:, torch.arange(n_q), queries] = True
    chunk = max(1, (CHUNK_ELEMENTS if budget is None else budget) // max(1, batch * n_q * nb))
    for block_idx in reversed(block_idx_per_layer):  # the last layer feeds the forecast head
        latest = torch.full((batch, n_q, nb), -1, dtype=torch.int32, device=needed_tok.device)  # [B, Q, NB]
        for start in range(0, seq_len, chunk):
            rows = slice(start, min(start + chunk, seq_len))
            if block_idx is None:
                chosen = visible_blocks(layout, rows)[None]  # [1, c, NB]
            else:
                chosen = selected_blocks(block_idx[:, :, rows], nb).any(1)  # [B, c, NB] by any group
            readers = reach[:, :, rows, None] & chosen[:, None]  # [B, Q, c, NB]
            times = torch.where(readers, layout.q_time[rows].int()[None, None, :, None], -1)
            latest = torch.maximum(latest, times.amax(2))
        per_token = latest.repeat_interleave(bs, dim=-1)[..., :seq_len]  # [B, Q, L]
        reach = reach | (layout.k_time[None, None, :] <= per_token)
    need = needed_tok[:, None, :]  # [B, 1, L]
    n_need = need.sum(-1).float()[:, 0]  # [B]
    share = (reach & need).sum(-1).float().mean(-1) / n_need.clamp(min=1)  # mean over forecast queries
    return torch.where(n_need > 0, share, float("nan"))


def path_recall(block_idx_per_layer: list[torch.Tensor | None], layout: TokenLayout, needed_tok: torch.Tensor,
                queries: torch.Tensor) -> float:
    """Mean of :func:`path_recall_per_instance` over the instances with a needed token (NaN if none)."""
    per = path_recall_per_instance(block_idx_per_layer, layout, needed_tok, queries)
    ok = ~torch.isnan(per)
    return float(per[ok].mean()) if bool(ok.any()) else float("nan")


def visible_counts(layout: TokenLayout, queries: torch.Tensor) -> torch.Tensor:
    """Visible tokens per (forecast query, block): ``[Q, NB]``."""
    pad = layout.n_blocks * layout.block_size - layout.seq_len
    vis = layout.k_time[None, :] <= layout.q_time[queries][:, None]  # [Q, L]
    return torch.nn.functional.pad(vis, (0, pad), value=False).view(len(queries), layout.n_blocks, -1).sum(-1)


def support_size(query_sel: torch.Tensor, layout: TokenLayout, queries: torch.Tensor) -> dict:
    """Visible tokens in the selected blocks ``query_sel [B, G, Q, NB]`` of the forecast queries: mean
    per (query, group), and its share of the dense visible set."""
    vis = visible_counts(layout, queries)  # [Q, NB]
    tokens = (query_sel * vis[None, None]).sum(-1).float()  # [B, G, Q]
    dense = vis.sum(-1).float().clamp(min=1)  # [Q]
    return {"tokens": float(tokens.mean()), "frac": float((tokens / dense).mean())}


def mae(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean absolute error over all entries (NaN truths ignored)."""
    ok = np.isfinite(truth)
    return float(np.abs(pred[ok] - truth[ok]).mean()) if ok.any() else float("nan")


def quantile_crps(quantiles: np.ndarray, truth: np.ndarray, levels: np.ndarray) -> float:
    """CRPS approximated on the quantile grid: mean over levels of twice the pinball loss,
    ``quantiles [..., Q]``, ``truth [...]`` (NaN ignored), in the units of the data."""
    ok = np.isfinite(truth)
    diff = truth[ok][:, None] - quantiles[ok]  # [N, Q]
    pinball = np.maximum(levels * diff, (levels - 1) * diff)
    return float(2 * pinball.mean()) if ok.any() else float("nan")


def error_ratio(error: float, dense_error: float) -> float:
    """``error / dense_error`` (NaN when the reference is 0 or not finite)."""
    if not math.isfinite(error) or not math.isfinite(dense_error) or dense_error <= 0:
        return float("nan")
    return error / dense_error


def counterfactual_sensitivity(predicted_change: np.ndarray, true_change: np.ndarray) -> dict:
    """How the forecast follows a change of the cause: Pearson correlation of predicted and true change
    (over instances x horizon steps) and the gain (least-squares slope of predicted on true; 1 = the
    forecast moves as much as the world, 0 = it ignores the cause)."""
    p = np.asarray(predicted_change, dtype=np.float64).ravel()
    t = np.asarray(true_change, dtype=np.float64).ravel()
    ok = np.isfinite(p) & np.isfinite(t)
    p, t = p[ok], t[ok]
    if p.size < 2 or t.std() == 0:
        return {"corr": float("nan"), "gain": float("nan")}
    gain = float(((p - p.mean()) * (t - t.mean())).sum() / ((t - t.mean()) ** 2).sum())
    corr = float(np.corrcoef(p, t)[0, 1]) if p.std() > 0 else 0.0
    return {"corr": corr, "gain": gain}
