"""Token layout: flattened (variate, patch) tokens, group-major, block-aligned (DESIGN.md section 3).

A window of ``context_len`` past steps and ``horizon`` future steps is cut into patches of
``patch_len`` steps; every variate contributes one token per patch it has:

- targets: context patches (observed) and horizon patches (hidden: the model predicts them),
- past covariates: context patches only,
- known-future covariates and actions: context and horizon patches (observed).

Tokens are ordered by sensor group, then time (patch index), then variate; every group's segment is
padded to a multiple of ``block_size``, so a KV block never mixes sensor groups. The layout depends
only on the schema and the lengths, so it is built once and shared by every sample of a batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tsfm_msa.kernels import INT32_MAX

ROLES = ("target", "past_covariate", "future_covariate", "action")
ROLES_WITH_FUTURE = ("target", "future_covariate", "action")


class LayoutError(ValueError):
    """The token layout cannot be built from the given settings."""


@dataclass(frozen=True)
class TokenLayout:
    """Static description of one window's tokens. All tensors are on the CPU until ``.to(device)``."""

    n_context_patches: int
    n_horizon_patches: int
    patch_len: int
    block_size: int
    group_names: tuple[str, ...]
    token_variate: torch.Tensor  # [L] long, -1 on padding
    token_patch: torch.Tensor  # [L] long, patch index on the common time axis, -1 on padding
    token_group: torch.Tensor  # [L] long, sensor group, -1 on padding (the segment's group in block_group)
    token_role: torch.Tensor  # [L] long, index into ROLES, -1 on padding
    is_hidden: torch.Tensor  # [L] bool, target tokens of the horizon (values not shown to the model)
    q_time: torch.Tensor  # [L] int32, query time, -1 on padding
    k_time: torch.Tensor  # [L] int32, earliest query time that may see the key, INT32_MAX on padding
    block_group: torch.Tensor  # [NB] long, sensor group of every KV block
    forecast_index: torch.Tensor  # [n_targets, n_horizon_patches] long, token position of each predicted patch
    visible_count: torch.Tensor  # [L] long, keys visible to each query (the dense support size)
    own_local_block: torch.Tensor  # [L] long, the "local" block forced under the free policy (-1 on padding)
    group_local_block: torch.Tensor  # [n_groups, L] long, block of group g with the query's latest visible data

    @property
    def seq_len(self) -> int:
        return int(self.token_variate.numel())

    @property
    def n_blocks(self) -> int:
        return int(self.block_group.numel())

    @property
    def n_groups(self) -> int:
        return len(self.group_names)

    @property
    def n_patches(self) -> int:
        return self.n_context_patches + self.n_horizon_patches

    def to(self, device: torch.device | str) -> "TokenLayout":
        moved = {f: getattr(self, f) for f in self.__dataclass_fields__}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device)
        return TokenLayout(**moved)


def build_layout(
    roles: tuple[str, ...] | list[str],
    groups: tuple[int, ...] | list[int],
    group_names: tuple[str, ...] | list[str],
    context_len: int,
    horizon: int,
    patch_len: int,
    block_size: int,
    future_covariates_visible: bool = False,
) -> TokenLayout:
    """Build the group-major token layout.

    ``roles[v]`` and ``groups[v]`` give each variate's role (one of ``ROLES``) and sensor-group index
    into ``group_names``. With ``future_covariates_visible`` every horizon query sees all horizon
    patches of known-future covariates and actions (a plan known in full), not only those up to its
    own time.
    """
    for name, value in (("patch_len", patch_len), ("block_size", block_size), ("context_len", context_len),
                        ("horizon", horizon)):
        if not isinstance(value, int) or value <= 0:
            raise LayoutError(f"{name} must be a positive integer, got {value!r}")
    if len(roles) != len(groups):
        raise LayoutError(f"roles ({len(roles)}) and groups ({len(groups)}) must list the same variates")
    for v, role in enumerate(roles):
        if role not in ROLES:
            raise LayoutError(f"variate {v} has role {role!r}; expected one of {ROLES}")
        if not 0 <= groups[v] < len(group_names):
            raise LayoutError(f"variate {v} has sensor group index {groups[v]}, but only {len(group_names)} "
                              f"groups are named: {list(group_names)}")
    if "target" not in roles:
        raise LayoutError("the layout needs at least one target variate")
    n_ctx = -(-context_len // patch_len)
    n_hor = -(-horizon // patch_len)

    variate, patch, group, role_idx, hidden, q_time, k_time, block_group = [], [], [], [], [], [], [], []
    for g in range(len(group_names)):
        members = [v for v in range(len(roles)) if groups[v] == g]
        if not members:
            raise LayoutError(f"sensor group {group_names[g]!r} has no variates; drop it from the group list")
        start = len(variate)
        for t in range(n_ctx + n_hor):
            for v in members:
                role = roles[v]
                if t >= n_ctx and role not in ROLES_WITH_FUTURE:
                    continue
                variate.append(v)
                patch.append(t)
                group.append(g)
                role_idx.append(ROLES.index(role))
                hidden.append(role == "target" and t >= n_ctx)
                q_time.append(t)
                sees_plan = future_covariates_visible and role in ("future_covariate", "action") and t >= n_ctx
                k_time.append(n_ctx if sees_plan else t)
        pad = -(len(variate) - start) % block_size
        variate += [-1] * pad
        patch += [-1] * pad
        group += [g] * pad  # padding keeps its segment's group so block_group below is well defined
        role_idx += [-1] * pad
        hidden += [False] * pad
        q_time += [-1] * pad
        k_time += [INT32_MAX] * pad
        block_group += [g] * ((len(variate) - start) // block_size)

    token_variate = torch.tensor(variate, dtype=torch.long)
    token_patch = torch.tensor(patch, dtype=torch.long)
    token_group = torch.tensor(group, dtype=torch.long)
    q_time_t = torch.tensor(q_time, dtype=torch.int32)
    k_time_t = torch.tensor(k_time, dtype=torch.int32)
    is_pad = token_variate < 0
    token_group = torch.where(is_pad, -1, token_group)
    seq_len = token_variate.numel()
    positions = torch.arange(seq_len)

    targets = [v for v, r in enumerate(roles) if r == "target"]
    forecast_index = torch.empty(len(targets), n_hor, dtype=torch.long)
    for row, v in enumerate(targets):
        for t in range(n_hor):
            hit = positions[(token_variate == v) & (token_patch == n_ctx + t)]
            forecast_index[row, t] = hit[0]

    is_hidden = torch.tensor(hidden, dtype=torch.bool)
    carries_data = ~is_pad & ~is_hidden
    group_local = _group_local_blocks(token_group, token_patch, q_time_t, k_time_t, carries_data, block_size,
                                     len(group_names), seq_len)
    # A token's own block is its local block, except for the hidden horizon targets: their own block
    # holds only other hidden tokens (no data), so they are given their group's block with the
    # latest observed data instead of spending a slot on nothing.
    own_local = torch.where(is_pad, -1, positions // block_size)
    hidden_local = group_local[token_group.clamp(min=0), positions]
    own_local = torch.where(is_hidden & (hidden_local >= 0), hidden_local, own_local)
    # Keys visible to each query: count of k_time <= q_time, from the sorted key times.
    visible_count = torch.searchsorted(torch.sort(k_time_t).values, q_time_t, right=True)
    return TokenLayout(
        n_context_patches=n_ctx,
        n_horizon_patches=n_hor,
        patch_len=patch_len,
        block_size=block_size,
        group_names=tuple(group_names),
        token_variate=token_variate,
        token_patch=token_patch,
        token_group=token_group,
        token_role=torch.tensor(role_idx, dtype=torch.long),
        is_hidden=is_hidden,
        q_time=q_time_t,
        k_time=k_time_t,
        block_group=torch.tensor(block_group, dtype=torch.long),
        forecast_index=forecast_index,
        visible_count=visible_count,
        own_local_block=own_local,
        group_local_block=group_local,
    )


def _group_local_blocks(token_group, token_patch, q_time, k_time, carries_data, block_size, n_groups,
                        seq_len) -> torch.Tensor:
    """For each group g and query i: the block of group g holding g's latest data-carrying key that
    is visible to i and not later than i's own time (-1 if none). This is group g's block "covering
    the query's time" for the sensor policy. Hidden horizon targets carry no data, so they never make
    a block local; a visible future plan (``future_covariates_visible``) is skipped when choosing the
    local block, and only used as a fallback when nothing of the group is at or before the query."""
    positions = torch.arange(seq_len)
    out = torch.full((n_groups, seq_len), -1, dtype=torch.long)
    visible = (k_time[None, :] <= q_time[:, None]) & carries_data[None, :]  # [L(query), L(key)]
    current = visible & (token_patch[None, :] <= q_time[:, None].long())
    for g in range(n_groups):
        in_group = (token_group == g)[None, :]
        last = torch.where(current & in_group, positions[None, :], -1).amax(-1)
        fallback = torch.where(visible & in_group, positions[None, :], -1).amax(-1)
        last = torch.where(last >= 0, last, fallback)
        out[g] = torch.where(last >= 0, last // block_size, -1)
    return out


def patch_tokens(
    context: torch.Tensor,  # [B, C, V] scaled values, 0 where missing
    context_mask: torch.Tensor,  # [B, C, V] bool, True where observed
    horizon: torch.Tensor,  # [B, H, V] scaled values (targets are hidden below)
    horizon_mask: torch.Tensor,  # [B, H, V] bool
    layout: TokenLayout,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut the window into patches and gather them in layout order.

    Returns token values ``[B, L, P]`` and their observed mask ``[B, L, P]``; padding tokens and the
    hidden horizon targets carry zeros and a False mask, so no future target value reaches the model.
    """
    batch, ctx_len, n_var = context.shape
    patch = layout.patch_len
    front = layout.n_context_patches * patch - ctx_len
    back = layout.n_horizon_patches * patch - horizon.shape[1]
    values = torch.cat([context.new_zeros(batch, front, n_var), context, horizon,
                        horizon.new_zeros(batch, back, n_var)], dim=1)
    mask = torch.cat([context_mask.new_zeros(batch, front, n_var), context_mask, horizon_mask,
                      horizon_mask.new_zeros(batch, back, n_var)], dim=1)
    # [B, T, V] -> [B, V, n_patches, P]
    values = values.view(batch, layout.n_patches, patch, n_var).permute(0, 3, 1, 2)
    mask = mask.view(batch, layout.n_patches, patch, n_var).permute(0, 3, 1, 2)
    var_idx = layout.token_variate.clamp(min=0)
    patch_idx = layout.token_patch.clamp(min=0)
    shown = ~(layout.is_hidden | (layout.token_variate < 0))  # [L]
    token_mask = mask[:, var_idx, patch_idx] & shown[None, :, None]
    token_values = values[:, var_idx, patch_idx]
    # NaN/inf never enter the model: unobserved or non-finite values become 0 with mask False.
    token_mask = token_mask & torch.isfinite(token_values)
    token_values = torch.where(token_mask, token_values, torch.zeros_like(token_values))
    return token_values, token_mask
