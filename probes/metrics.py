"""Probe metrics: selection recall of the needed blocks, forecast errors, counterfactual sensitivity,
support size. Pure functions of tensors / arrays, so they can be checked on crafted inputs."""
from __future__ import annotations

import math

import numpy as np
import torch

from tsfm_msa.tokens import TokenLayout


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
    """``block_idx [B, G, L, K]`` (-1 = empty) -> bool ``[B, G, L, NB]``."""
    out = torch.zeros(*block_idx.shape[:-1], n_blocks + 1, dtype=torch.bool, device=block_idx.device)
    out.scatter_(-1, torch.where(block_idx < 0, n_blocks, block_idx).long(), True)
    return out[..., :n_blocks]


def selection_recall(block_idx_per_layer: list[torch.Tensor], needed: torch.Tensor,
                     queries: torch.Tensor) -> dict:
    """Recall of the needed blocks ``needed [B, NB]`` by the forecast queries ``queries [Q]``.

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
    for block_idx in block_idx_per_layer:
        sel = selected_blocks(block_idx[has][:, :, queries], needed.shape[-1])  # [b, G, Q, NB]
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


def path_recall(block_idx_per_layer: list[torch.Tensor], layout: TokenLayout, needed_tok: torch.Tensor,
                queries: torch.Tensor) -> float:
    """Share of the needed tokens ``needed_tok [B, L]`` whose information can reach a forecast query
    through the selections of the layer stack: a token reaches query i if i reads it directly in some
    layer, or reads (in a later layer) a token that read it. Direct recall misses the second route,
    which a trained sparse model can use (an early layer copies the far event into a recent token)."""
    visible = layout.k_time[None, :] <= layout.q_time[:, None]  # [L, L]
    bs, seq_len = layout.block_size, layout.seq_len
    batch = needed_tok.shape[0]
    reach = torch.zeros(batch, len(queries), seq_len, dtype=torch.bool)  # [B, Q, L]
    reach[:, torch.arange(len(queries)), queries] = True
    for block_idx in reversed(block_idx_per_layer):  # the last layer feeds the forecast head
        chosen = selected_blocks(block_idx, layout.n_blocks).any(1)  # [B, L, NB] by any group
        reads = chosen.repeat_interleave(bs, dim=-1)[..., :seq_len] & visible  # [B, L(query), L(key)]
        reach = reach | (torch.bmm(reach.float(), reads.float()) > 0)
    need = needed_tok[:, None, :]  # [B, 1, L]
    n_need = need.sum(-1).float()  # [B, 1]
    has = n_need[:, 0] > 0
    if not bool(has.any()):
        return float("nan")
    return float(((reach & need).sum(-1).float()[has] / n_need[has]).mean())


def support_size(block_idx: torch.Tensor, layout: TokenLayout, queries: torch.Tensor) -> dict:
    """Visible tokens in the selected blocks of the forecast queries: mean per (query, group), and its
    share of the dense visible set."""
    sel = selected_blocks(block_idx[:, :, queries], layout.n_blocks)  # [B, G, Q, NB]
    pad = layout.n_blocks * layout.block_size - layout.seq_len
    vis = (layout.k_time[None, :] <= layout.q_time[queries][:, None])  # [Q, L]
    vis = torch.nn.functional.pad(vis, (0, pad), value=False).view(len(queries), layout.n_blocks, -1).sum(-1)
    tokens = (sel * vis[None, None]).sum(-1).float()  # [B, G, Q]
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
