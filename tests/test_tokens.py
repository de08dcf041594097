"""Token layout: group-major order, block alignment, time visibility, patching."""
from __future__ import annotations

import pytest
import torch

from tsfm_msa.kernels import INT32_MAX
from tsfm_msa.tokens import LayoutError, build_layout, patch_tokens

ROLES = ["target", "past_covariate", "future_covariate", "target"]
GROUPS = [0, 1, 2, 0]
NAMES = ["grid", "weather", "calendar"]
ROLES_ALL = ["target", "past_covariate", "future_covariate", "action"]


@pytest.fixture(scope="module")
def layout():
    return build_layout(ROLES, GROUPS, NAMES, context_len=30, horizon=10, patch_len=4, block_size=8)


def test_group_major_then_time_then_variate(layout):
    real = layout.token_variate >= 0
    g, t, v = layout.token_group[real], layout.token_patch[real], layout.token_variate[real]
    key = g * 10_000 + t * 100 + v
    assert torch.all(key[1:] > key[:-1])


def test_blocks_never_mix_groups_and_padding_is_invisible(layout):
    assert layout.seq_len % layout.block_size == 0
    groups = layout.token_group.view(layout.n_blocks, layout.block_size)
    for b in range(layout.n_blocks):
        real = groups[b][groups[b] >= 0]
        assert (real == layout.block_group[b]).all()
    pad = layout.token_variate < 0
    assert (layout.k_time[pad] == INT32_MAX).all() and (layout.q_time[pad] == -1).all()


def test_token_counts_by_role(layout):
    n_ctx, n_hor = 8, 3  # ceil(30/4), ceil(10/4)
    for v, role in enumerate(ROLES):
        count = int((layout.token_variate == v).sum())
        assert count == (n_ctx if role == "past_covariate" else n_ctx + n_hor)
    hidden_vars = layout.token_variate[layout.is_hidden].unique().tolist()
    assert sorted(hidden_vars) == [0, 3]
    assert (layout.token_patch[layout.forecast_index] >= n_ctx).all()
    assert layout.forecast_index.shape == (2, n_hor)


def test_local_blocks_hold_the_latest_visible_data(layout):
    data = (layout.token_variate >= 0) & ~layout.is_hidden
    for i in torch.nonzero(layout.q_time >= 0).flatten().tolist():
        for g in range(layout.n_groups):
            visible = ((layout.k_time <= layout.q_time[i]) & (layout.token_group == g) & data
                       & (layout.token_patch <= layout.q_time[i]))
            expected = int(torch.nonzero(visible).max()) // layout.block_size
            assert int(layout.group_local_block[g, i]) == expected
        own = int(layout.own_local_block[i])
        if layout.is_hidden[i]:  # a hidden horizon target is sent to its group's latest data
            assert own == int(layout.group_local_block[layout.token_group[i], i])
            assert data.view(-1, layout.block_size)[own].any()
        else:
            assert own == i // layout.block_size


def test_future_covariates_visible_flag():
    plain = build_layout(ROLES, GROUPS, NAMES, 30, 10, 4, 8)
    plan = build_layout(ROLES, GROUPS, NAMES, 30, 10, 4, 8, future_covariates_visible=True)
    future = (plan.token_variate == 2) & (plan.token_patch >= 8)
    assert (plan.k_time[future] == 8).all() and (plain.k_time[future] == plain.token_patch[future].int()).all()


def test_patch_tokens_hide_future_targets_and_mask_non_finite(layout):
    g = torch.Generator().manual_seed(0)
    ctx, hor = torch.randn(2, 30, 4, generator=g), torch.randn(2, 10, 4, generator=g)
    ctx[0, 5, 1] = float("inf")
    cmask, hmask = torch.ones(2, 30, 4, dtype=torch.bool), torch.ones(2, 10, 4, dtype=torch.bool)
    values, mask = patch_tokens(ctx, cmask, hor, hmask, layout)
    assert torch.isfinite(values).all()
    assert (values[:, layout.is_hidden] == 0).all() and not mask[:, layout.is_hidden].any()
    # First context patch is left-padded by 2 steps (30 -> 32): those steps are unobserved.
    first = (layout.token_variate == 0) & (layout.token_patch == 0)
    assert mask[:, first, :2].sum() == 0 and mask[:, first, 2:].all()
    torch.testing.assert_close(values[1, first, 2:].flatten(), ctx[1, :2, 0])
    # A known-future covariate's horizon patch carries its values.
    fut = torch.nonzero((layout.token_variate == 2) & (layout.token_patch == 8)).item()
    torch.testing.assert_close(values[1, fut], hor[1, :4, 2])


def test_layout_errors():
    with pytest.raises(LayoutError, match="block_size must be a positive integer"):
        build_layout(ROLES, GROUPS, NAMES, 30, 10, 4, 0)
    with pytest.raises(LayoutError, match="sensor group index 5"):
        build_layout(["target"], [5], ["a"], 30, 10, 4, 8)
    with pytest.raises(LayoutError, match="role 'control'"):
        build_layout(["control"], [0], ["a"], 30, 10, 4, 8)
    with pytest.raises(LayoutError, match="at least one target"):
        build_layout(["past_covariate"], [0], ["a"], 30, 10, 4, 8)


def test_visible_future_plan_does_not_move_the_local_block():
    plain = build_layout(["target", "future_covariate"], [0, 1], ["t", "f"], 32, 32, 4, 2)
    plan = build_layout(["target", "future_covariate"], [0, 1], ["t", "f"], 32, 32, 4, 2,
                        future_covariates_visible=True)
    torch.testing.assert_close(plan.group_local_block, plain.group_local_block)
    shared = build_layout(["target", "future_covariate"], [0, 0], ["g"], 16, 16, 4, 4, future_covariates_visible=True)
    first_hidden = int(torch.nonzero(shared.is_hidden)[0])
    # The latest observed data at or before the first horizon patch (the plan's first patch), not the
    # plan's last patch.
    data = (shared.token_variate >= 0) & ~shared.is_hidden & (shared.token_patch <= 4)
    assert int(shared.own_local_block[first_hidden]) == int(torch.nonzero(data).max()) // 4


@pytest.mark.parametrize("plan", [False, True])
def test_visible_count_is_the_dense_support(plan):
    layout = build_layout(ROLES, GROUPS, NAMES, 30, 10, 4, 8, future_covariates_visible=plan)
    brute = (layout.k_time[None, :] <= layout.q_time[:, None]).sum(-1)
    torch.testing.assert_close(layout.visible_count, brute)


@pytest.mark.parametrize("seed", range(12))
def test_layout_matches_brute_force_on_random_schemas(seed):
    from layout_bruteforce import brute_force_layout

    g = torch.Generator().manual_seed(seed)
    n_var = int(torch.randint(1, 7, (1,), generator=g))
    n_groups = int(torch.randint(1, n_var + 1, (1,), generator=g))
    roles = [ROLES_ALL[int(i)] for i in torch.randint(0, 4, (n_var,), generator=g)]
    roles[int(torch.randint(0, n_var, (1,), generator=g))] = "target"
    groups = [v % n_groups for v in range(n_var)]  # every group has a member
    groups = [groups[int(i)] for i in torch.randperm(n_var, generator=g)]
    patch_len = int(torch.randint(1, 5, (1,), generator=g))
    block_size = [1, 2, 4, 8][int(torch.randint(0, 4, (1,), generator=g))]
    ctx, hor = int(torch.randint(1, 40, (1,), generator=g)), int(torch.randint(1, 12, (1,), generator=g))
    plan = bool(seed % 2)
    names = [f"g{i}" for i in range(n_groups)]
    fast = build_layout(roles, groups, names, ctx, hor, patch_len, block_size, future_covariates_visible=plan)
    slow = brute_force_layout(roles, groups, n_groups, ctx, hor, patch_len, block_size, plan)
    for name, expected in slow.items():
        got = getattr(fast, name)
        assert torch.equal(got.long(), expected.long()), name


def test_million_token_layout_is_fast_and_linear():
    import time

    roles = ["target"] * 8 + ["past_covariate"] * 8
    groups = [v // 4 for v in range(16)]
    start = time.perf_counter()
    layout = build_layout(roles, groups, ["a", "b", "c", "d"], context_len=65_536 * 16, horizon=64,
                          patch_len=16, block_size=128)
    elapsed = time.perf_counter() - start
    assert layout.seq_len >= 1_000_000
    # The quadratic build needed ~45 GB at 64K; a linear one takes seconds even on a busy CPU.
    assert elapsed < 60, f"1M-token layout took {elapsed:.1f} s"
