"""Brute-force token layout: per-token Python loops and [L, L] visibility matrices. Quadratic on
purpose: it is the independent oracle the O(L log L) ``build_layout`` is checked against on small
layouts, and must never be used by the package."""
from __future__ import annotations

import torch

from tsfm_msa.kernels import INT32_MAX
from tsfm_msa.tokens import ROLES, ROLES_WITH_FUTURE


def brute_force_layout(roles, groups, n_groups, context_len, horizon, patch_len, block_size,
                       future_covariates_visible=False) -> dict[str, torch.Tensor]:
    n_ctx, n_hor = -(-context_len // patch_len), -(-horizon // patch_len)
    variate, patch, group, role_idx, hidden, q_time, k_time, block_group = [], [], [], [], [], [], [], []
    for g in range(n_groups):
        members = [v for v in range(len(roles)) if groups[v] == g]
        start = len(variate)
        for t in range(n_ctx + n_hor):
            for v in members:
                if t >= n_ctx and roles[v] not in ROLES_WITH_FUTURE:
                    continue
                variate.append(v)
                patch.append(t)
                group.append(g)
                role_idx.append(ROLES.index(roles[v]))
                hidden.append(roles[v] == "target" and t >= n_ctx)
                q_time.append(t)
                plan = future_covariates_visible and roles[v] in ("future_covariate", "action") and t >= n_ctx
                k_time.append(n_ctx if plan else t)
        pad = -(len(variate) - start) % block_size
        variate += [-1] * pad
        patch += [-1] * pad
        group += [-1] * pad
        role_idx += [-1] * pad
        hidden += [False] * pad
        q_time += [-1] * pad
        k_time += [INT32_MAX] * pad
        block_group += [g] * ((len(variate) - start) // block_size)
    variate, patch, group = torch.tensor(variate), torch.tensor(patch), torch.tensor(group)
    q_t, k_t = torch.tensor(q_time, dtype=torch.int32), torch.tensor(k_time, dtype=torch.int32)
    hidden = torch.tensor(hidden)
    seq_len = variate.numel()
    positions = torch.arange(seq_len)
    data = (variate >= 0) & ~hidden
    visible = (k_t[None, :] <= q_t[:, None]) & data[None, :]  # [L, L]
    current = visible & (patch[None, :] <= q_t[:, None].long())
    group_local = torch.full((n_groups, seq_len), -1, dtype=torch.long)
    for g in range(n_groups):
        in_group = (group == g)[None, :]
        last = torch.where(current & in_group, positions[None, :], -1).amax(-1)
        fallback = torch.where(visible & in_group, positions[None, :], -1).amax(-1)
        last = torch.where(last >= 0, last, fallback)
        group_local[g] = torch.where(last >= 0, last // block_size, -1)
    own_local = torch.where(variate < 0, -1, positions // block_size)
    hidden_local = group_local[group.clamp(min=0), positions]
    own_local = torch.where(hidden & (hidden_local >= 0), hidden_local, own_local)
    targets = [v for v, r in enumerate(roles) if r == "target"]
    forecast_index = torch.tensor([[int(positions[(variate == v) & (patch == n_ctx + t)][0]) for t in range(n_hor)]
                                   for v in targets])
    return {
        "token_variate": variate, "token_patch": patch, "token_group": group,
        "token_role": torch.tensor(role_idx), "is_hidden": hidden, "q_time": q_t, "k_time": k_t,
        "block_group": torch.tensor(block_group), "forecast_index": forecast_index,
        "visible_count": (k_t[None, :] <= q_t[:, None]).sum(-1),
        "own_local_block": own_local, "group_local_block": group_local,
    }
