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

from dataclasses import dataclass, field

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
    # Static work derived from the layout (RoPE angles, attention block masks, expanded selection
    # inputs) is computed once and kept here, so no training step rebuilds it.
    cache: dict = field(default_factory=dict, compare=False, repr=False)

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

    def cached(self, key, build):
        """``build()`` once per layout and ``key``; later calls return the stored value."""
        if key not in self.cache:
            # Normal tensors even when first met under inference mode (a validation or predict
            # pass), so training may later save them for backward.
            with torch.inference_mode(False), torch.no_grad():
                self.cache[key] = build()
        return self.cache[key]

    def to(self, device: torch.device | str) -> "TokenLayout":
        moved = {f: getattr(self, f) for f in self.__dataclass_fields__ if f != "cache"}
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
    n_patches = n_ctx + n_hor
    role_of = torch.tensor([ROLES.index(r) for r in roles], dtype=torch.long)  # [V]
    has_future = torch.tensor([r in ROLES_WITH_FUTURE for r in roles])  # [V]
    is_plan_role = torch.tensor([r in ("future_covariate", "action") for r in roles])  # [V]
    group_of = torch.tensor(list(groups), dtype=torch.long)  # [V]
    target_role = ROLES.index("target")

    # Every group's segment, built with tensor ops (no per-token Python loop): the (time, variate)
    # grid of the group's members, minus the horizon patches of past-only covariates, then padding.
    segments: list[dict[str, torch.Tensor]] = []
    block_group_parts = []
    for g in range(len(group_names)):
        members = torch.nonzero(group_of == g).flatten()  # [M] variate ids, ascending
        if members.numel() == 0:
            raise LayoutError(f"sensor group {group_names[g]!r} has no variates; drop it from the group list")
        t_grid = torch.arange(n_patches).repeat_interleave(members.numel())  # [T*M] time-major
        v_grid = members.repeat(n_patches)
        keep = (t_grid < n_ctx) | has_future[v_grid]
        t_seg, v_seg = t_grid[keep], v_grid[keep]
        role_seg = role_of[v_seg]
        hidden_seg = (role_seg == target_role) & (t_seg >= n_ctx)
        sees_plan = future_covariates_visible & is_plan_role[v_seg] & (t_seg >= n_ctx)
        k_time_seg = torch.where(sees_plan, torch.full_like(t_seg, n_ctx), t_seg)
        pad = -t_seg.numel() % block_size
        segments.append({
            "variate": _pad(v_seg, pad, -1), "patch": _pad(t_seg, pad, -1), "role": _pad(role_seg, pad, -1),
            "hidden": _pad(hidden_seg, pad, False), "q_time": _pad(t_seg, pad, -1),
            "k_time": _pad(k_time_seg, pad, INT32_MAX),
            # Padding keeps its segment's group here so block_group is well defined; reset to -1 below.
            "group": torch.full((t_seg.numel() + pad,), g, dtype=torch.long),
        })
        block_group_parts.append(torch.full(((t_seg.numel() + pad) // block_size,), g, dtype=torch.long))

    def cat(name: str) -> torch.Tensor:
        return torch.cat([s[name] for s in segments])

    token_variate = cat("variate")
    token_patch = cat("patch")
    q_time_t = cat("q_time").to(torch.int32)
    k_time_t = cat("k_time").to(torch.int32)
    is_hidden = cat("hidden")
    is_pad = token_variate < 0
    token_group = torch.where(is_pad, -1, cat("group"))
    seq_len = token_variate.numel()
    positions = torch.arange(seq_len)

    # Position of every (variate, patch) token through an O(V * P) lookup table, not a search per patch.
    where = torch.full((len(roles), n_patches), -1, dtype=torch.long)
    where[token_variate[~is_pad], token_patch[~is_pad]] = positions[~is_pad]
    targets = [v for v, r in enumerate(roles) if r == "target"]
    forecast_index = where[targets][:, n_ctx:]  # [n_targets, n_hor]

    carries_data = ~is_pad & ~is_hidden
    group_local = _group_local_blocks(token_group, token_patch, q_time_t, k_time_t, carries_data, block_size,
                                     len(group_names))
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
        token_role=cat("role"),
        is_hidden=is_hidden,
        q_time=q_time_t,
        k_time=k_time_t,
        block_group=torch.cat(block_group_parts),
        forecast_index=forecast_index,
        visible_count=visible_count,
        own_local_block=own_local,
        group_local_block=group_local,
    )


def _pad(x: torch.Tensor, count: int, value) -> torch.Tensor:
    return torch.cat([x, torch.full((count,), value, dtype=x.dtype)])


def _latest_position_at_or_before(key: torch.Tensor, position: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """For every query value ``query [L]``: the largest ``position`` among entries with
    ``key <= query`` (-1 if none). Sort by key, running max of positions, one sorted search per
    query: O(L log L) time and O(L) memory."""
    if key.numel() == 0:
        return torch.full_like(query, -1, dtype=torch.long)
    order = torch.sort(key, stable=True).indices
    running_max = torch.cummax(position[order], dim=0).values
    count = torch.searchsorted(key[order].contiguous(), query.to(key.dtype).contiguous(), right=True)
    return torch.where(count > 0, running_max[(count - 1).clamp(min=0)], -1)


def _group_local_blocks(token_group, token_patch, q_time, k_time, carries_data, block_size, n_groups) -> torch.Tensor:
    """For each group g and query i: the block of group g holding g's latest data-carrying key that
    is visible to i and not later than i's own time (-1 if none). This is group g's block "covering
    the query's time" for the sensor policy. Hidden horizon targets carry no data, so they never make
    a block local; a visible future plan (``future_covariates_visible``) is skipped when choosing the
    local block, and only used as a fallback when nothing of the group is at or before the query.

    Per group: one sorted search of the query times among the group's data-carrying keys, keyed by
    the time from which the key counts (``max(k_time, patch)`` for the current data, ``k_time`` for
    the fallback) -- O(L log L), never an [L, L] matrix."""
    positions = torch.arange(token_group.numel())
    query = q_time.long()
    out = torch.full((n_groups, token_group.numel()), -1, dtype=torch.long)
    for g in range(n_groups):
        member = carries_data & (token_group == g)
        pos = positions[member]
        k_g = k_time[member].long()
        current = _latest_position_at_or_before(torch.maximum(k_g, token_patch[member]), pos, query)
        fallback = _latest_position_at_or_before(k_g, pos, query)
        last = torch.where(current >= 0, current, fallback)
        # Padding queries (q_time = -1) see nothing.
        out[g] = torch.where((last >= 0) & (query >= 0), last // block_size, -1)
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
