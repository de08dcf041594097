"""Probe selectors and metrics at long context: no [L, L] tensor, chunking changes no result."""
from __future__ import annotations

import json
import math
import os
import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tsfm_msa.model.transformer import PatchTransformer
from tsfm_msa.probes import metrics, selectors
from tsfm_msa.probes.command import run_probe_in
from tsfm_msa.probes.scenarios import ProbeConfigError
from tsfm_msa.tokens import INT32_MAX, ROLES, TokenLayout, build_layout


def one_variate_per_group_layout(n_ctx: int, n_hor: int, n_groups: int, block_size: int) -> TokenLayout:
    """The layout ``build_layout`` gives for one target (group 0) and ``n_groups - 1`` past covariates
    (one per group), written in closed form so a 32K-token layout is cheap to build whatever
    ``build_layout`` costs. Checked against ``build_layout`` on a small size below."""
    variate, patch, group, role, hidden, q_time, k_time, block_group, data_end = [], [], [], [], [], [], [], [], []
    starts, offset = [], 0
    for g in range(n_groups):
        n_tok = n_ctx + (n_hor if g == 0 else 0)
        t = torch.arange(n_tok)
        pad = -n_tok % block_size
        starts.append(offset)
        offset += n_tok + pad
        variate.append(torch.cat([torch.full((n_tok,), g), torch.full((pad,), -1)]))
        patch.append(torch.cat([t, torch.full((pad,), -1)]))
        group.append(torch.cat([torch.full((n_tok,), g), torch.full((pad,), -1)]))
        role.append(torch.cat([torch.full((n_tok,), ROLES.index("target" if g == 0 else "past_covariate")),
                               torch.full((pad,), -1)]))
        hidden.append(torch.cat([(t >= n_ctx) & (g == 0), torch.zeros(pad, dtype=torch.bool)]))
        q_time.append(torch.cat([t, torch.full((pad,), -1)]))
        k_time.append(torch.cat([t, torch.full((pad,), INT32_MAX)]))
        block_group.append(torch.full(((n_tok + pad) // block_size,), g))
        data_end.append(n_ctx - 1)  # the latest data-carrying patch (hidden targets carry none)
    cat = torch.cat
    token_variate, token_patch, token_group = cat(variate), cat(patch), cat(group)
    q = cat(q_time).int()
    seq_len = token_variate.numel()
    positions = torch.arange(seq_len)
    group_local = torch.full((n_groups, seq_len), -1)
    for g in range(n_groups):
        latest = torch.minimum(q.long(), torch.tensor(data_end[g]))
        group_local[g] = torch.where(q >= 0, (starts[g] + latest) // block_size, -1)
    is_hidden = cat(hidden)
    own = torch.where(token_variate < 0, -1, positions // block_size)
    own = torch.where(is_hidden, group_local[0], own)
    k = cat(k_time).int()
    return TokenLayout(
        n_context_patches=n_ctx, n_horizon_patches=n_hor, patch_len=1, block_size=block_size,
        group_names=tuple(f"g{g}" for g in range(n_groups)), token_variate=token_variate, token_patch=token_patch,
        token_group=token_group, token_role=cat(role), is_hidden=is_hidden, q_time=q, k_time=k,
        block_group=cat(block_group), forecast_index=(n_ctx + torch.arange(n_hor))[None],
        visible_count=torch.searchsorted(torch.sort(k).values, q, right=True),
        own_local_block=own, group_local_block=group_local)


def test_closed_form_layout_equals_build_layout():
    ours = one_variate_per_group_layout(40, 3, 3, 4)
    ref = build_layout(["target", "past_covariate", "past_covariate"], [0, 1, 2], ["g0", "g1", "g2"], 40, 3, 1, 4)
    for name in TokenLayout.__dataclass_fields__:
        a, b = getattr(ours, name), getattr(ref, name)
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b.to(a.dtype)), name
        elif name != "group_names":
            assert a == b, name


class AllocationLimit(TorchDispatchMode):
    """Fails on any op whose output owns a storage above ``max_bytes`` (views of small storages pass),
    and records the largest one."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__()
        self.max_bytes, self.peak = max_bytes, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                size = t.untyped_storage().nbytes()
                self.peak = max(self.peak, size)
                if size > self.max_bytes:
                    raise MemoryError(f"{func} allocated {size / 2**20:.0f} MiB for shape {tuple(t.shape)}")
        return out


def _layer(policy: str, n_groups: int, top_k: int = 8):
    model = PatchTransformer(["target"] + ["past_covariate"] * (n_groups - 1), list(range(n_groups)),
                             [f"g{g}" for g in range(n_groups)], patch_len=1, d_model=8, n_layers=1,
                             n_heads=n_groups, n_kv_heads=n_groups, head_dim=4, block_size=16, top_k=top_k,
                             index_dim=4, group_policy=policy)
    return selectors.msa_layers(model)[0]


def _qk(layout: TokenLayout, heads: int, groups: int, seed: int, batch: int = 1):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, layout.seq_len, 4, generator=g)
    k = torch.randn(batch, groups, layout.seq_len, 4, generator=g)
    return q, k


LONG_LIMIT = 1 << 27  # 128 MiB: far below one [L, L] bool (1 GiB at 32K tokens)


@pytest.mark.slow
def test_allocation_limit_catches_a_quadratic_tensor():
    """The guard of the long test can fail: a full [L, L] visibility matrix at 32K tokens trips it."""
    layout = one_variate_per_group_layout(16384, 1, 2, 16)
    assert layout.seq_len >= 32768
    with pytest.raises(MemoryError, match="allocated"), AllocationLimit(LONG_LIMIT):
        selectors.key_visibility(layout)


@pytest.mark.slow
def test_selectors_and_metrics_at_32k_tokens_stay_within_memory():
    """Every training-free selector hook and every metric at 32K+ tokens, with no tensor above 128 MiB
    (an [L, L] tensor would need 1 GiB as bool, 4 GiB as float)."""
    groups = 2
    layout = one_variate_per_group_layout(16384, 1, groups, 16)
    seq_len = layout.seq_len
    assert seq_len >= 32768
    layer = _layer("sensor", groups)
    q, k = _qk(layout, groups, groups, seed=7)
    queries = metrics.forecast_queries(layout)
    needed = torch.zeros(1, groups, layout.n_patches, dtype=torch.bool)
    needed[0, 1, 100] = True  # a covariate patch far back
    guard = AllocationLimit(LONG_LIMIT)
    with guard:
        picks = {name: selectors.get_selector(name, seed=1)(layer, q, k, None, None, layout)
                 for name in ("local", "random", "oracle", "moba")}
        need_blocks = metrics.needed_blocks(needed, layout)
        need_tok = metrics.needed_tokens(needed, layout)
        for name, idx in picks.items():
            assert idx.shape == (1, groups, seq_len, layer.top_k)
            sel = metrics.query_selection(idx, layout, queries, 1, groups)
            metrics.selection_recall([sel], need_blocks)
            metrics.support_size(sel, layout, queries)
            metrics.path_recall([idx], layout, need_tok, queries)
        dense = metrics.query_selection(None, layout, queries, 1, groups)
        assert metrics.selection_recall([dense], need_blocks)["recall"] == 1.0
        assert metrics.path_recall([None], layout, need_tok, queries) == 1.0
    assert guard.peak > 1 << 20, "the guard saw the work"
    # The local window ends at the forecast origin: the far patch is not in it.
    local = metrics.query_selection(picks["local"], layout, queries, 1, groups)
    assert metrics.selection_recall([local], need_blocks)["recall"] == 0.0


# ---------------------------------------------------------------------------------------------
# chunking changes nothing

def _brute_path_recall(block_idx_per_layer, layout, needed_tok, queries) -> float:
    """The [L, L] definition: reach through read matrices, layer by layer from the last."""
    visible = layout.k_time[None, :] <= layout.q_time[:, None]
    reach = torch.zeros(needed_tok.shape[0], len(queries), layout.seq_len, dtype=torch.bool)
    reach[:, torch.arange(len(queries)), queries] = True
    for idx in reversed(block_idx_per_layer):
        chosen = metrics.selected_blocks(idx, layout.n_blocks).any(1)
        reads = chosen.repeat_interleave(layout.block_size, -1)[..., :layout.seq_len] & visible
        reach = reach | (torch.bmm(reach.float(), reads.float()) > 0)
    need = needed_tok[:, None]
    n = need.sum(-1).float()
    has = n[:, 0] > 0
    return float(((reach & need).sum(-1).float()[has] / n[has]).mean())


@pytest.mark.parametrize("policy", ["free", "sensor", "hybrid"])
def test_chunked_selectors_equal_one_chunk(policy, monkeypatch):
    layout = build_layout(["target", "past_covariate", "past_covariate"], [0, 1, 2], ["t", "a", "b"], 96, 8, 4, 2)
    layer = _layer(policy, 3, top_k=4)
    q, k = _qk(layout, 3, 3, seed=3, batch=2)
    whole = {n: selectors.get_selector(n, 2)(layer, q, k, None, None, layout) for n in ("local", "oracle", "moba")}
    monkeypatch.setattr(selectors, "CHUNK_ELEMENTS", 500)  # a few queries per chunk
    for name, ref in whole.items():
        got = selectors.get_selector(name, 2)(layer, q, k, None, None, layout)
        assert torch.equal(torch.sort(got, -1).values, torch.sort(ref, -1).values), name
    rand = selectors.get_selector("random", 2)(layer, q, k, None, None, layout)
    assert torch.equal(rand, selectors.get_selector("random", 2)(layer, q, k, None, None, layout)), "seeded"


def test_oracle_scores_equal_the_full_attention_mass():
    layout = build_layout(["target", "past_covariate"], [0, 1], ["t", "a"], 64, 8, 4, 2)
    q, k = _qk(layout, 4, 2, seed=4, batch=2)
    full = selectors.dense_attention_mass(q, k, layout)
    rows = slice(5, 19)
    torch.testing.assert_close(selectors.dense_attention_mass(q, k, layout, rows), full[:, :, rows])
    assert torch.allclose(full[:, :, layout.q_time >= 0].sum(-1), torch.ones(1))


def test_chunked_path_recall_equals_the_quadratic_definition(monkeypatch):
    layout = build_layout(["target", "past_covariate"], [0, 1], ["t", "a"], 64, 8, 4, 2)
    g = torch.Generator().manual_seed(9)
    layers = [torch.randint(-1, layout.n_blocks, (3, 2, layout.seq_len, 3), generator=g).int() for _ in range(3)]
    needed = torch.rand(3, 2, layout.n_patches, generator=g) < 0.1
    needed[:, :, layout.n_context_patches:] = False
    needed[:, 1, 2] = True
    tok = metrics.needed_tokens(needed, layout)
    queries = metrics.forecast_queries(layout)
    ref = _brute_path_recall(layers, layout, tok, queries)
    monkeypatch.setattr(metrics, "CHUNK_ELEMENTS", 200)
    assert metrics.path_recall(layers, layout, tok, queries) == pytest.approx(ref)
    assert 0.0 < ref < 1.0 or math.isclose(ref, 1.0)


# ---------------------------------------------------------------------------------------------
# the long-context configs

def _compose_probe(overrides: list[str]) -> dict:
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    with initialize_config_module("tsfm_msa.configs", version_base=None):
        return OmegaConf.to_container(compose("probe", overrides=overrides), resolve=True)


@pytest.mark.parametrize("length,tokens", [("16k", 16_384), ("64k", 65_536), ("128k", 131_072)])
def test_long_context_configs_reach_their_length_with_kernel_block_sizes(length, tokens):
    cfg = _compose_probe([f"probe=long_{length}"])
    bs = cfg["model"]["block_size"]
    assert bs >= 16 and bs & (bs - 1) == 0, "the Triton kernels take power-of-two blocks >= 16"
    assert cfg["device"] == "auto" and cfg["train"]["msa_init"] == "dense"
    assert cfg["selectors"] == list(selectors.SELECTORS)
    extra = {"rare_event": 1, "exogenous_delay": 2, "action_history": 2}  # target (+ covariate / action)
    for name, spec in cfg["probe"]["scenarios"].items():
        knobs = spec["knobs"]
        n_var = extra[name] + knobs["n_distractors"]
        n_tokens = n_var * knobs["context_len"] // knobs["patch_len"]
        assert n_tokens >= tokens, (name, n_tokens)
        assert knobs["distance"] >= knobs["context_len"] // 2, "the cause lies far back"
        assert knobs["distance"] > cfg["model"]["top_k"] * bs * knobs["patch_len"] // n_var, \
            "beyond any local window of the budget"


@pytest.mark.parametrize("length", ["16k", "64k", "128k"])
def test_long_context_configs_grow_the_window_by_at_most_4x_per_curriculum_stage(length):
    """From scratch at the long window the dense model learned nothing in 300 steps (and rare_event's cause
    needed the curriculum), and one 8x jump lost the far
    cause at CPU scale (benchmarks/results/2026-12-02-probes-long-learning.md): every long config
    starts short and grows by at most 4x per stage, the cause 3/4 back at every stage."""
    cfg = _compose_probe([f"probe=long_{length}"])
    stages = cfg["train"]["curriculum"]
    assert stages and stages[0]["context_len"] <= 1024
    for spec in cfg["probe"]["scenarios"].values():
        lengths = [s["context_len"] for s in stages] + [spec["knobs"]["context_len"]]
        assert all(b <= 4 * a for a, b in zip(lengths, lengths[1:])), lengths
    for stage in stages:
        assert stage["distance"] * 4 == stage["context_len"] * 3 and stage["steps"] >= 300


def test_long_context_ci_setting_runs_end_to_end_on_the_cpu(tmp_path):
    """probe=long_ci: the long-context scenarios, block size and all six selectors at small L."""
    cfg = _compose_probe(["probe=long_ci", "device=cpu"])
    summary = run_probe_in(cfg, tmp_path)
    assert set(summary["scenarios"]) == {"rare_event", "exogenous_delay", "action_history"}
    for res in summary["scenarios"].values():
        [run] = res["runs"]  # the default: one seed
        pol = run["policies"]["sensor"]
        assert pol["block_size"] == 16
        msa_rows = {r["selector"] for r in pol["rows"] if r["backbone"] == "msa"}
        assert msa_rows == set(selectors.SELECTORS)
        local = next(r for r in pol["rows"] if r["backbone"] == "msa" and r["selector"] == "local")
        assert local["recall"] == 0.0  # the cause is 60 patches back, the local window two blocks of 16
        # Long-context probes run only the dense selector on the dense model's weights.
        assert [r["selector"] for r in pol["rows"] if r["backbone"] == "dense"] == ["dense"]
        assert run["data_seconds"] >= 0 and all(r["seconds"] > 0 for r in pol["rows"])
    assert [r["scenario"] for r in summary["target_check"]] == ["rare_event", "exogenous_delay", "action_history"]
    md = (tmp_path / "probe_report.md").read_text()
    assert "## Target: learned recall >= 0.9" in md and "## Timing" in md
    _check_merge_of_per_scenario_runs(tmp_path)


def test_long_ci_probe_runs_with_dense_support_policy(tmp_path):
    """`tsfm-msa probe probe=long_ci model.dense_support=policy`: its sensor-policy models take it."""
    cfg = _compose_probe(["probe=long_ci", "device=cpu", "model.dense_support=policy"])
    summary = run_probe_in(cfg, tmp_path)
    assert summary["settings"]["model"]["dense_support"] == "policy"
    assert all("sensor" in res["runs"][0]["policies"] for res in summary["scenarios"].values())


def _check_merge_of_per_scenario_runs(run_dir):
    """The GPU script runs one process per scenario and merges their reports: split this run into one
    summary per scenario, merge them back, and get the same rows and target check."""
    import json

    from tsfm_msa.probes import merge

    whole = json.loads((run_dir / "probe_summary.json").read_text())
    parts = []
    for name in whole["scenarios"]:
        part = run_dir / f"part_{name}"
        part.mkdir()
        (part / "probe_summary.json").write_text(json.dumps({**whole, "scenarios": {name: whole["scenarios"][name]}}))
        parts.append(part)
    merged = merge.main([str(run_dir / "merged"), *map(str, parts)])
    assert merged["aggregate"] == whole["aggregate"] and merged["target_check"] == whole["target_check"]
    assert "merged:" in (run_dir / "merged" / "probe_report.md").read_text()
    with pytest.raises(merge.ProbeMergeError, match="repeats rare_event at seed 0"):
        merge.merge_summaries([whole, whole], ["a", "b"])
    other = {**whole, "settings": {**whole["settings"], "train": {**whole["settings"]["train"], "steps": 1}}}
    with pytest.raises(merge.ProbeMergeError, match="has other `train` settings"):
        merge.merge_summaries([whole, other], ["a", "b"])
    with pytest.raises(merge.ProbeMergeError, match="does not exist"):
        merge.load_summary(run_dir / "nowhere")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs a CUDA GPU with compiled Triton kernels")
def test_long_context_probe_runs_on_cuda_through_the_triton_kernels(tmp_path, monkeypatch):
    """probe=long_ci with device=cuda: training and every selector go through the Triton ops."""
    from tsfm_msa.kernels import dispatch

    used: list[str] = []
    real = dispatch._triton_op

    def spy(module: str, name: str):
        used.append(name)
        return real(module, name)

    monkeypatch.setattr(dispatch, "_triton_op", spy)
    summary = run_probe_in(_compose_probe(["probe=long_ci", "device=cuda"]), tmp_path)
    assert {"select_blocks_triton", "sparse_attention_triton", "indexer_kl_triton"} <= set(used)
    assert "cuda" in summary["device"]


def test_dense_twin_equals_the_all_blocks_selector():
    """The probes run the dense selector as the same weights with dense attention: identical to the
    MSA model given every block, without the O(L^2 / block_size) block list."""
    from tsfm_msa.probes.command import dense_twin

    torch.manual_seed(2)
    msa = PatchTransformer(["target", "past_covariate", "past_covariate"], [0, 1, 1], ["t", "s"], patch_len=4,
                           d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=4, block_size=2, top_k=3,
                           index_dim=4, group_policy="sensor").eval()
    g = torch.Generator().manual_seed(12)
    batch = {"context": torch.randn(2, 32, 3, generator=g), "context_mask": torch.ones(2, 32, 3, dtype=torch.bool),
             "horizon": torch.randn(2, 4, 3, generator=g), "horizon_mask": torch.ones(2, 4, 3, dtype=torch.bool)}
    twin = dense_twin(msa)
    assert not selectors.msa_layers(twin)
    with torch.no_grad(), selectors.use_selector(msa, "dense"):
        torch.testing.assert_close(twin(batch).quantiles, msa(batch).quantiles, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# the fast selectors equal their definitions

def _captured_scores(name: str, layer, q, k, layout, monkeypatch) -> torch.Tensor:
    """The block scores ``[B, G, L, NB]`` a chunked selector ranks (all chunks, concatenated)."""
    seen = []
    real = selectors.chunked_policy_topk

    def capture(scores, layer_, layout_, chunk):
        seen.append(torch.cat([scores(s, min(s + chunk, layout_.seq_len)) for s in range(0, layout_.seq_len, chunk)], 2))
        return real(scores, layer_, layout_, chunk)

    monkeypatch.setattr(selectors, "chunked_policy_topk", capture)
    selectors.get_selector(name)(layer, q, k, None, None, layout)
    return seen[0]


# Padding in every group segment, several variates per group, and a visible future plan (key times not
# monotone within a block): the cases where a block is only partly visible to a query.
_MIXED = (["target", "past_covariate", "past_covariate", "future_covariate"], [0, 1, 1, 2], ["t", "a", "p"])


@pytest.mark.parametrize("plan_visible", [False, True])
def test_oracle_scores_equal_the_pooled_dense_attention_mass(plan_visible, monkeypatch):
    layout = build_layout(*_MIXED, 96, 8, 4, 4, future_covariates_visible=plan_visible)
    g = torch.Generator().manual_seed(21)
    q = 2 * torch.randn(2, 6, layout.seq_len, 8, generator=g)
    k = torch.randn(2, 3, layout.seq_len, 8, generator=g)
    layer = _layer("sensor", 3, top_k=4)
    got = _captured_scores("oracle", layer, q, k, layout, monkeypatch)
    ref = selectors.block_pool(selectors.dense_attention_mass(q, k, layout), layout, "sum")
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    torch.testing.assert_close(got[torch.isfinite(ref)], ref[torch.isfinite(ref)], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("plan_visible", [False, True])
def test_moba_scores_equal_the_mean_logit_over_visible_keys(plan_visible, monkeypatch):
    layout = build_layout(*_MIXED, 96, 8, 4, 4, future_covariates_visible=plan_visible)
    g = torch.Generator().manual_seed(22)
    q = torch.randn(2, 6, layout.seq_len, 8, generator=g)
    k = torch.randn(2, 3, layout.seq_len, 8, generator=g)
    layer = _layer("free", 3, top_k=4)
    got = _captured_scores("moba", layer, q, k, layout, monkeypatch)
    ref = selectors.moba_token_scores(q, k, layout)
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    torch.testing.assert_close(got[torch.isfinite(ref)], ref[torch.isfinite(ref)], rtol=1e-5, atol=1e-5)
    partial = (selectors.block_min_key_time(layout)[None] <= layout.q_time[:, None]) & torch.isfinite(ref[0, 0])
    assert bool(partial.any()), "some blocks are partly visible: the exact path ran"


def test_moba_reads_no_quadratic_tensor_at_32k_tokens():
    """The block-mean gate needs O(L * NB) memory: well under the 128 MiB guard at 32K tokens, with a
    budget that would allow [chunk, L] logits."""
    layout = one_variate_per_group_layout(16384, 1, 2, 16)
    layer = _layer("sensor", 2)
    q, k = _qk(layout, 2, 2, seed=5)
    guard = AllocationLimit(LONG_LIMIT)
    with guard:
        idx = selectors.moba_selector(layer, q, k, None, None, layout)
    assert idx.shape == (1, 2, layout.seq_len, layer.top_k)


def test_random_selector_draws_on_the_tensors_device(monkeypatch):
    """The random scores are drawn where the keys live (on CUDA: no 10^9 CPU numbers copied over)."""
    layout = build_layout(*_MIXED, 64, 8, 4, 4)
    q, k = torch.randn(1, 6, layout.seq_len, 8), torch.randn(1, 3, layout.seq_len, 8)
    devices = []
    real = torch.Generator

    def spy(device="cpu"):
        devices.append(torch.device(device))
        return real(device=device)

    monkeypatch.setattr(torch, "Generator", spy)
    selectors.get_selector("random", 3)(_layer("free", 3, top_k=4), q, k, None, None, layout)
    assert devices == [k.device]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs a CUDA GPU")
def test_oracle_on_cuda_takes_the_flex_normaliser_and_matches_the_definition(monkeypatch):
    """At 4K tokens (past the chunked path's size) the oracle's normaliser comes from Flex on bf16
    inputs, as in a bf16-autocast probe forward; its block masses match the fp32 definition."""
    from tsfm_msa.kernels.dispatch import CALLS

    layout = one_variate_per_group_layout(2048, 1, 2, 16).to("cuda")
    g = torch.Generator(device="cuda").manual_seed(23)
    q = torch.randn(1, 4, layout.seq_len, 16, generator=g, device="cuda").bfloat16()
    k = torch.randn(1, 2, layout.seq_len, 16, generator=g, device="cuda").bfloat16()
    layer = _layer("sensor", 2, top_k=8).cuda()
    before = CALLS[("dense_attention", "flex")]
    got = _captured_scores("oracle", layer, q, k, layout, monkeypatch)
    assert CALLS[("dense_attention", "flex")] == before + 1
    ref = selectors.block_pool(selectors.dense_attention_mass(q.float(), k.float(), layout), layout, "sum")
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    torch.testing.assert_close(got[torch.isfinite(ref)], ref[torch.isfinite(ref)], rtol=2e-2, atol=1e-5)


def test_a_run_stopped_after_a_scenario_keeps_its_report(tmp_path, monkeypatch):
    """Long probes take minutes per scenario: the report is written after each one, so a run killed
    by a time limit keeps the scenarios it finished."""
    from tsfm_msa.probes import command

    real, calls = command.probe_scenario, []

    def stop_at_the_second(name, *args):
        calls.append(name)
        if len(calls) == 2:
            raise KeyboardInterrupt("stopped by a time limit")
        return real(name, *args)

    monkeypatch.setattr(command, "probe_scenario", stop_at_the_second)
    cfg = _compose_probe(["probe=long_ci", "device=cpu"])
    cfg["probe"]["scenarios"] = {k: cfg["probe"]["scenarios"][k] for k in ("rare_event", "exogenous_delay")}
    with pytest.raises(KeyboardInterrupt):
        run_probe_in(cfg, tmp_path)
    summary = json.loads((tmp_path / "probe_summary.json").read_text())
    assert list(summary["scenarios"]) == ["rare_event"]
    assert "rare_event" in (tmp_path / "probe_report.md").read_text()


# ---------------------------------------------------------------------------------------------
# the context curriculum (train.curriculum)

def test_curriculum_trains_dense_at_short_windows_then_continues_at_the_long_one(tmp_path, monkeypatch):
    """train.curriculum: the dense model first trains on the same scenario at short windows (each stage
    from the weights of the one before), and the long-window training starts from exactly the last
    stage's weights; the MSA model continues from the long-window dense model as before."""
    from tsfm_msa.probes import command

    real, calls = command.train_model, []

    def spy(model_config, scenario, train_cfg, seed, init_state=None, **kw):
        model, secs = real(model_config, scenario, train_cfg, seed, init_state=init_state, **kw)
        calls.append({"context_len": scenario.context_len, "distance": scenario.knobs["distance"],
                      "n_train": len(scenario.train), "steps": train_cfg["steps"],
                      "batch_size": train_cfg["batch_size"], "init": init_state,
                      "state": {k: v.detach().clone() for k, v in model.state_dict().items()}})
        return model, secs

    monkeypatch.setattr(command, "train_model", spy)
    cfg = _compose_probe(["probe=long_ci", "device=cpu", "selectors=[dense,local]",
                          "train.curriculum=[{context_len:64,distance:48,steps:3},"
                          "{context_len:128,distance:96,steps:5,n_train:12,batch_size:6}]"])
    cfg["probe"]["scenarios"] = {"rare_event": cfg["probe"]["scenarios"]["rare_event"]}
    summary = run_probe_in(cfg, tmp_path)
    long_c = cfg["probe"]["scenarios"]["rare_event"]["knobs"]["context_len"]
    # two curriculum stages, dense, dense continued, MSA
    assert [c["context_len"] for c in calls] == [64, 128, long_c, long_c, long_c]
    first, second = calls[0], calls[1]
    assert (first["distance"], first["n_train"], first["steps"], first["batch_size"]) == \
        (48, 8, 3, cfg["train"]["batch_size"])
    assert (second["distance"], second["n_train"], second["steps"], second["batch_size"]) == (96, 12, 5, 6)
    assert first["init"] is None
    for before, after in ((first, second), (second, calls[2])):  # each phase starts from the one before
        for key, value in before["state"].items():
            assert torch.equal(after["init"][key].cpu(), value.cpu()), key
        assert not torch.equal(after["state"]["head.weight"], before["state"]["head.weight"])  # and trains on
    assert calls[2]["steps"] == cfg["train"]["steps"]
    [run] = summary["scenarios"]["rare_event"]["runs"]
    assert set(run["train_seconds"]) == {"dense_curriculum_0", "dense_curriculum_1", "dense", "dense_continued",
                                         "msa_sensor"}


@pytest.mark.parametrize("curriculum,msa_init,message", [
    ({"context_len": 128, "distance": 96}, "dense", "missing keys ['steps']"),
    ({"context_len": 128, "distance": 96, "steps": 5, "lr": 1.0}, "dense", "unknown keys ['lr']"),
    ({"context_len": 128, "distance": 96, "steps": 5}, "scratch", "needs train.msa_init=dense"),
    ({"context_len": 4096, "distance": 96, "steps": 5}, "dense", "must be shorter than the scenario's context_len"),
    ([{"context_len": 128, "distance": 96, "steps": 5}, {"context_len": 64, "distance": 48, "steps": 5}], "dense",
     "train.curriculum[1].context_len (64) must be shorter than the scenario's context_len (512) and longer than "
     "the stage before (128)"),
    ({"context_len": 128, "distance": 200, "steps": 5}, "dense", "distance (200) must lie in"),
])
def test_curriculum_refuses_bad_settings_with_a_clear_message(tmp_path, curriculum, msa_init, message):
    cfg = _compose_probe(["probe=long_ci", "device=cpu", f"train.msa_init={msa_init}"])
    cfg["train"]["curriculum"] = curriculum
    cfg["probe"]["scenarios"] = {"rare_event": cfg["probe"]["scenarios"]["rare_event"]}
    with pytest.raises(ProbeConfigError, match=re.escape(message)):
        run_probe_in(cfg, tmp_path)
