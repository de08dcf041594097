"""Preservation probes: ground truth of the scenarios, selectors, metrics, report (CPU, tiny sizes)."""
from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import torch

from tsfm_msa.datasets import SeriesFrame, SeriesSchema, Variate
from tsfm_msa.model.transformer import PatchTransformer
from tsfm_msa.probes import metrics, report, scenarios, selectors
from tsfm_msa.probes.command import as_msa, run_probe_in
from tsfm_msa.probes.scenarios import ProbeConfigError
from tsfm_msa.tokens import build_layout

TINY = dict(n_train=2, n_test=4, context_len=32, horizon=4, patch_len=4, distance=24, seed=3)
RUN_KNOBS = {k: v for k, v in TINY.items() if k != "seed"}  # in a probe run the run's seeds set the data seed


def _vic_like_frames(seed: int = 0) -> list[SeriesFrame]:
    """A hand-built stand-in for vic_elec: same schema, random values (fast, no file read)."""
    rng = np.random.default_rng(seed)
    n = 400
    schema = SeriesSchema((Variate("Demand", "target", "target"), Variate("Temperature", "past_covariate", "past_covariate"),
                           Variate("Holiday", "future_covariate", "future_covariate", True)), freq="30min")
    values = np.column_stack([4000 + 500 * rng.standard_normal(n), 20 + 3 * rng.standard_normal(n),
                              (rng.random(n) < 0.1).astype(float)])
    return [SeriesFrame("vic", pd.date_range("2014-01-01", periods=n, freq="30min"), values, schema)]


def _make(name: str, **extra) -> scenarios.ScenarioData:
    knobs = {**TINY, **extra}
    if name == "real_background":
        knobs["frames"] = _vic_like_frames()
        knobs.pop("n_distractors", None)
    return scenarios.make_scenario(name, **knobs)


# ---------------------------------------------------------------------------------------------
# scenarios: the ground truth is right

EXPECTED_CELL = {  # (variate, patch) of the far cause: patch (32 - 24) / 4 = 2
    "rare_event": (0, 2), "exogenous_delay": (1, 2), "action_history": (1, 2), "sensor_starvation": (1, 2),
    "real_background": (0, 2),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_CELL))
def test_needed_mask_marks_exactly_the_far_cause(name):
    data = _make(name)
    n_patches = 32 // 4 + 1
    for inst in data.test:
        expected = np.zeros((data.schema.n_variates, n_patches), dtype=bool)
        expected[EXPECTED_CELL[name]] = True
        np.testing.assert_array_equal(inst.needed, expected)
        assert inst.frame.length == 32 + 4 and inst.counterfactual.length == 32 + 4


@pytest.mark.parametrize("name", sorted(EXPECTED_CELL))
def test_counterfactual_changes_only_the_needed_tokens_and_the_future(name):
    """The cause lives in the needed tokens: the counterfactual world differs in the context only
    inside them, and its horizon target differs - so the forecast provably needs them."""
    data = _make(name)
    target = data.schema.target_indices[0]
    for inst in data.test:
        diff = np.abs(inst.counterfactual.values - inst.frame.values) > 1e-6  # [T, V]
        ctx = diff[:32].reshape(8, 4, -1).any(1).T  # [V, n_context_patches]
        assert ctx.any(), "the counterfactual must change the cause"
        assert not (ctx & ~inst.needed[:, :8]).any(), "context changed outside the needed tokens"
        assert diff[32:, target].any(), "changing the cause must change the future"


def test_rare_event_pulse_sits_in_the_needed_patch_and_repeats():
    data = _make("rare_event", noise=0.0, n_distractors=0)
    for inst in data.test:
        y = inst.frame.values[:, 0].astype(np.float64)
        cf = inst.counterfactual.values[:, 0].astype(np.float64)
        pulse = (y - cf) / 2  # the pulse with its sign (the counterfactual flips it)
        np.testing.assert_allclose(pulse[:8], 0, atol=1e-5)
        np.testing.assert_allclose(pulse[12:32], 0, atol=1e-5)
        assert np.abs(pulse[8:12]).max() > 0.3
        np.testing.assert_allclose(pulse[32:36], pulse[8:12], atol=1e-5)  # the same pattern after the delay


def test_scenario_knobs_are_checked():
    with pytest.raises(ProbeConfigError, match="multiples of"):
        scenarios.rare_event(**{**TINY, "distance": 23})
    with pytest.raises(ProbeConfigError, match="distance"):
        scenarios.rare_event(**{**TINY, "distance": 32})
    with pytest.raises(ProbeConfigError, match="unknown probe scenario"):
        scenarios.make_scenario("nope")
    with pytest.raises(ProbeConfigError, match="unexpected keyword"):
        scenarios.make_scenario("rare_event", bogus=1)


# ---------------------------------------------------------------------------------------------
# selectors

def _probe_model(policy: str, top_k: int = 3, seed: int = 0) -> PatchTransformer:
    torch.manual_seed(seed)
    return PatchTransformer(["target", "past_covariate", "past_covariate"], [0, 1, 1], ["target", "sensors"],
                            patch_len=4, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=4,
                            block_size=2, top_k=top_k, index_dim=4, group_policy=policy, attention="msa").eval()


def _batch(model_seed: int = 0, b: int = 3, c: int = 32, h: int = 4, v: int = 3) -> dict:
    g = torch.Generator().manual_seed(model_seed + 11)
    return {"context": torch.randn(b, c, v, generator=g), "context_mask": torch.ones(b, c, v, dtype=torch.bool),
            "horizon": torch.randn(b, h, v, generator=g), "horizon_mask": torch.ones(b, h, v, dtype=torch.bool)}


@pytest.mark.parametrize("policy", ["free", "sensor", "hybrid"])
def test_policy_topk_reproduces_the_learned_selection(policy):
    """Our policy logic equals MSAAttention.select when fed the indexer's max-pooled scores, so every
    baseline runs under exactly the learned indexer's rules and budget."""
    model = _probe_model(policy)
    batch = _batch()
    layer = selectors.msa_layers(model)[0]
    with torch.no_grad():
        x, layout, _ = model.encode(batch)
        qi, ki = layer.index_branch(torch.randn(3, layout.seq_len, 16), layout)
        ours = selectors.policy_topk(
            selectors.block_pool(torch.einsum("bgqd,bkd->bgqk", qi, ki), layout, "max"), layer, layout)
        theirs = layer.select(qi, ki, layout)
    np.testing.assert_array_equal(np.sort(ours.numpy(), -1), np.sort(theirs.numpy(), -1))


@pytest.mark.parametrize("name", selectors.SELECTORS)
def test_every_selector_runs_under_bf16_autocast(name):
    """The GPU probes run under bf16 autocast: a selector mixing bf16 and fp32 tensors must not fail
    (a moba scatter did on the H200) and must pick the same blocks as in fp32 where scores differ."""
    model = _probe_model("sensor")
    batch = _batch()
    with torch.no_grad(), selectors.use_selector(model, name, seed=1):
        ref = model(batch, "predict")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(batch, "predict")
    for a, b in zip(ref.aux, out.aux):
        assert a.block_idx.shape == b.block_idx.shape and (b.block_idx >= -1).all()
    assert torch.isfinite(out.quantiles.float()).all()


@pytest.mark.parametrize("policy", ["free", "sensor", "hybrid"])
@pytest.mark.parametrize("name", selectors.SELECTORS)
def test_every_selector_gives_valid_blocks_with_the_forced_local_block(policy, name):
    model = _probe_model(policy)
    with torch.no_grad(), selectors.use_selector(model, name, seed=1):
        out = model(_batch())
    layout = model.layout(32, 4, torch.device("cpu"))
    valid_q = layout.q_time >= 0
    for aux in out.aux:
        idx = aux.block_idx  # [B, G, L, K]
        k_expected = layout.n_blocks if name == "dense" else 3
        assert idx.shape[-1] == k_expected
        rows = idx[..., valid_q, :]
        s = torch.sort(rows, -1).values
        assert not ((s[..., 1:] == s[..., :-1]) & (s[..., 1:] >= 0)).any(), "duplicate block in a row"
        local = layout.own_local_block if policy == "free" else layout.group_local_block
        local = local[None, None, :, None] if policy == "free" else local[None, :, :, None]
        assert (idx == local.int()).any(-1)[..., valid_q].all()
    assert all(layer.selector is None for layer in selectors.msa_layers(model)), "hook not restored"


def test_dense_selector_equals_the_dense_model():
    torch.manual_seed(0)
    cfg = dict(patch_len=4, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=4, block_size=2, top_k=3,
               index_dim=4, group_policy="sensor")
    schema = {"freq": "h", "variates": [{"name": "y", "role": "target", "group": "target"},
                                        {"name": "a", "role": "past_covariate", "group": "sensors"},
                                        {"name": "b", "role": "past_covariate", "group": "sensors"}]}
    dense = PatchTransformer(["target", "past_covariate", "past_covariate"], [0, 1, 1], ["target", "sensors"],
                             attention="dense", **cfg).eval()
    msa = as_msa({"_target_": "tsfm_msa.model.transformer.PatchTransformer", **cfg}, schema, dense.state_dict(), "sensor")
    batch = _batch()
    with torch.no_grad(), selectors.use_selector(msa, "dense"):
        torch.testing.assert_close(msa(batch).quantiles, dense(batch).quantiles, rtol=1e-4, atol=1e-5)


def _crafted_layer_inputs(far_patch: int, policy: str = "free"):
    """One target variate, 16 context patches, blocks of 2 tokens; every key is small and random except
    the far patch's key, which every query head matches strongly."""
    layout = build_layout(["target"], [0], ["target"], 64, 4, 4, 2)
    model = PatchTransformer(["target"], [0], ["target"], patch_len=4, d_model=8, n_layers=1, n_heads=2,
                             n_kv_heads=1, head_dim=4, block_size=2, top_k=3, index_dim=4, group_policy=policy)
    layer = selectors.msa_layers(model)[0]
    g = torch.Generator().manual_seed(5)
    q = torch.rand(2, 2, layout.seq_len, 4, generator=g) + 0.5  # positive: aligned with the far key
    k = 0.1 * torch.randn(2, 1, layout.seq_len, 4, generator=g)
    far = int(((layout.token_patch == far_patch) & (layout.token_variate == 0)).nonzero()[0])
    k[:, :, far] = 4.0
    needed = torch.zeros(2, 1, layout.n_patches, dtype=torch.bool)
    needed[:, 0, far_patch] = True
    return layer, layout, q, k, needed


@pytest.mark.parametrize("policy", ["free", "sensor"])
def test_oracle_keeps_the_far_block_and_local_window_loses_it(policy):
    layer, layout, q, k, needed = _crafted_layer_inputs(far_patch=1, policy=policy)
    need_blocks = metrics.needed_blocks(needed, layout)
    queries = metrics.forecast_queries(layout)
    recall = {}
    for name in ("oracle", "moba", "local", "random"):
        hook = selectors.get_selector(name, seed=0)
        idx = hook(layer, q, k, None, None, layout)
        recall[name] = metrics.selection_recall([_at(idx, queries, layout.n_blocks)], need_blocks)["recall"]
    assert recall["oracle"] == 1.0
    assert recall["moba"] == 1.0
    assert recall["local"] == 0.0  # the window (3 blocks of 2 patches) ends far after patch 1


# ---------------------------------------------------------------------------------------------
# metrics on crafted inputs

def _at(block_idx: torch.Tensor, queries: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """A layer's selection at the forecast queries, bool [B, G, Q, NB]."""
    return metrics.selected_blocks(block_idx[:, :, queries], n_blocks)


def test_selection_recall_per_layer_group_and_union():
    needed = torch.zeros(1, 6, dtype=torch.bool)
    needed[0, [3, 5]] = True
    queries = torch.tensor([0])
    layer0 = torch.tensor([[[[3, 0]], [[5, -1]]]], dtype=torch.int32)  # [B=1, G=2, L=1, K=2]
    layer1 = torch.tensor([[[[1, 2]], [[0, -1]]]], dtype=torch.int32)
    out = metrics.selection_recall([_at(layer0, queries, 6), _at(layer1, queries, 6)], needed)
    assert out["per_layer_group"] == [[0.5, 0.5], [0.0, 0.0]]
    assert out["per_layer"] == [1.0, 0.0]
    assert out["recall"] == 1.0
    out = metrics.selection_recall([_at(layer1, queries, 6)], needed)
    assert out["recall"] == 0.0
    none = metrics.selection_recall([_at(layer0, queries, 6)], torch.zeros(1, 6, dtype=torch.bool))
    assert np.isnan(none["recall"]) and none["n_instances"] == 0


def test_path_recall_follows_information_through_the_layers():
    """Token 3 reads the needed token 0 in layer 1; the forecast query (token 4) reads token 3 in layer 2:
    the cause reaches the forecast although no forecast-query selection contains it."""
    layout = build_layout(["target"], [0], ["t"], 16, 4, 4, 1)  # 5 tokens = 5 blocks of 1
    queries = metrics.forecast_queries(layout)
    assert queries.tolist() == [4]
    needed = torch.zeros(1, 1, 5, dtype=torch.bool)
    needed[0, 0, 0] = True
    tok = metrics.needed_tokens(needed, layout)

    def layer(reads: dict[int, list[int]]) -> torch.Tensor:
        idx = torch.full((1, 1, 5, 2), -1, dtype=torch.int32)
        for i in range(5):
            row = [i] + reads.get(i, [])
            idx[0, 0, i, :len(row)] = torch.tensor(row, dtype=torch.int32)
        return idx

    copy_then_read = [layer({3: [0]}), layer({4: [3]})]
    assert metrics.path_recall(copy_then_read, layout, tok, queries) == 1.0
    direct_sel = [_at(idx, queries, layout.n_blocks) for idx in copy_then_read]
    assert metrics.selection_recall(direct_sel, metrics.needed_blocks(needed, layout))["recall"] == 0.0
    too_late = [layer({4: [3]}), layer({3: [0]})]  # token 3 learns of the cause only after it was read
    assert metrics.path_recall(too_late, layout, tok, queries) == 0.0
    direct = [layer({}), layer({4: [0]})]
    assert metrics.path_recall(direct, layout, tok, queries) == 1.0
    assert metrics.path_recall([None, layer({})], layout, tok, queries) == 1.0  # a dense layer copies it


def test_needed_blocks_and_support_size_on_a_known_layout():
    layout = build_layout(["target", "past_covariate"], [0, 1], ["t", "x"], 16, 4, 4, 2)
    # target segment: patches 0..4 (5 tokens) -> blocks 0,1,2 (last padded); covariate: patches 0..3 -> blocks 3,4
    needed = torch.zeros(1, 2, 5, dtype=torch.bool)
    needed[0, 1, 2] = True  # covariate, patch 2 -> token 5 + 2 = 7 -> block 3 ... (5 target + 1 pad = 6; 6 + 2 = 8)
    blocks = metrics.needed_blocks(needed, layout)
    pos = int(((layout.token_variate == 1) & (layout.token_patch == 2)).nonzero()[0])
    expected = torch.zeros(1, layout.n_blocks, dtype=torch.bool)
    expected[0, pos // 2] = True
    assert torch.equal(blocks, expected)
    queries = metrics.forecast_queries(layout)  # the target's horizon token, time 4: sees all 9 real tokens
    every = torch.arange(layout.n_blocks, dtype=torch.int32).expand(1, 2, layout.seq_len, layout.n_blocks)
    full = metrics.support_size(_at(every, queries, layout.n_blocks), layout, queries)
    assert full == {"tokens": 9.0, "frac": 1.0}
    dense = metrics.query_selection(None, layout, queries, 1, 2)
    assert metrics.support_size(dense, layout, queries) == full
    one = torch.full((1, 2, layout.seq_len, 1), pos // 2, dtype=torch.int32)
    assert metrics.support_size(_at(one, queries, layout.n_blocks), layout, queries)["tokens"] == 2.0


def test_error_metrics_and_counterfactual_sensitivity():
    rng = np.random.default_rng(0)
    truth = rng.standard_normal((5, 1, 4))
    pred = truth + 0.5
    assert metrics.mae(pred, truth) == pytest.approx(0.5)
    levels = np.array([0.1, 0.5, 0.9])
    quant = np.repeat(truth[..., None], 3, -1)
    assert metrics.quantile_crps(quant, truth, levels) == pytest.approx(0.0)
    quant = quant + 1.0  # every quantile 1 too high: pinball = (1 - level) * 1
    assert metrics.quantile_crps(quant, truth, levels) == pytest.approx(2 * np.mean(1 - levels))
    assert metrics.error_ratio(2.0, 1.0) == 2.0 and np.isnan(metrics.error_ratio(1.0, 0.0))
    true_change = rng.standard_normal(200)
    same = metrics.counterfactual_sensitivity(0.5 * true_change, true_change)
    assert same["corr"] == pytest.approx(1.0) and same["gain"] == pytest.approx(0.5)
    blind = metrics.counterfactual_sensitivity(rng.standard_normal(200) * 0.01, true_change)
    assert abs(blind["corr"]) < 0.25 and abs(blind["gain"]) < 0.01


def test_verdict_thresholds():
    assert report.judge(0.95, 1.05) == "preserved"
    assert report.judge(0.95, 1.3) == "degraded"
    assert report.judge(0.7, 1.0) == "degraded"
    assert report.judge(0.2, 1.0) == "lost"
    assert report.judge(1.0, 2.0) == "lost"
    assert report.judge(0.95, 1.05, {"preserved_ratio": 1.01}) == "degraded"


# ---------------------------------------------------------------------------------------------
# end to end: train tiny models, run every selector, write the report

def test_run_probe_writes_a_parsable_report(tmp_path):
    cfg = {
        "seeds": [0], "threads": 1, "checkpoint": None,
        "model": {"d_model": 16, "n_layers": 2, "heads_per_group": 1, "head_dim": 4, "block_size": 2, "top_k": 3,
                  "index_dim": 4, "k_own": None},
        "train": {"steps": 3, "msa_steps": 2, "indexer_warmup_steps": 1, "batch_size": 4, "kl_weight": 1.0, "msa_init": "dense",
                  "optim": {"lr": 1e-3, "warmup_steps": 1}},
        "selectors": list(selectors.SELECTORS),
        "verdict": dict(report.DEFAULT_THRESHOLDS),
        "probe": {"scenarios": {
            "rare_event": {"policies": ["sensor"], "knobs": {**RUN_KNOBS, "n_train": 8, "n_distractors": 1}},
            "sensor_starvation": {"policies": ["free", "hybrid"],
                                  "knobs": {**RUN_KNOBS, "n_train": 8, "n_distractors": 2}},
        }},
    }
    summary = run_probe_in(cfg, tmp_path)
    loaded = json.loads((tmp_path / "probe_summary.json").read_text())
    assert loaded == summary
    for name, policies in (("rare_event", ["sensor"]), ("sensor_starvation", ["free", "hybrid"])):
        [run] = loaded["scenarios"][name]["runs"]
        assert list(run["policies"]) == policies and run["seed"] == 0
        for policy in policies:
            rows = run["policies"][policy]["rows"]
            learned = [r for r in rows if r["selector"] == "learned"]
            assert len(learned) == 1 and learned[0]["recall"] is not None and learned[0]["error_ratio"] is not None
            local = [r for r in rows if r["selector"] == "local"]
            assert all(r["recall"] == 0.0 for r in local)  # the cause is 6 patches back, the window 3 blocks
            assert all(r["path_recall"] >= r["recall"] for r in rows)
            dense = [r for r in rows if r["selector"] == "dense" and r["backbone"] == "dense"][0]
            assert dense["recall"] == 1.0 and dense["error_ratio"] == 1.0
            assert all(r["verdict"] in ("preserved", "degraded", "lost") for r in rows)
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert {"recall_bars.png", "error_ratio_bars.png", "counterfactual_scatter.png",
            "heatmap_rare_event_sensor.png"} <= set(pngs)
    page = (tmp_path / "probe_report.html").read_text()
    assert len(re.findall(r"src='data:image/png;base64,[A-Za-z0-9+/=]{100,}'", page)) == len(pngs)
    md = (tmp_path / "probe_report.md").read_text()
    assert "| rare_event | sensor | learned | msa | 1 |" in md and "**preserved** if recall >= 0.9" in md
    assert "## rare_event\n" in md and "## rare_event, seed" not in md  # one seed: sections as before
    assert [(a["selector"], a["recall"], a["error_ratio"], a["verdict"]) for a in loaded["aggregate"]
            if a["scenario"] == "rare_event"] == [(r["selector"], r["recall"], r["error_ratio"], r["verdict"])
                                                  for r in loaded["scenarios"]["rare_event"]["runs"][0]["policies"]
                                                  ["sensor"]["rows"]]


ZERO_SHOT_MODEL = {"d_model": 16, "n_layers": 1, "heads_per_group": 1, "head_dim": 4, "block_size": 2, "top_k": 3,
                   "index_dim": 4}


def _rare_event_checkpoint(ckpt) -> None:
    """A one-step MSA ForecastModule on rare_event (1 distractor) saved at ``ckpt``."""
    import lightning as L
    from torch.utils.data import DataLoader

    from tsfm_msa.probes.command import probe_model_config, window_dataset
    from tsfm_msa.train.lightning_module import ForecastModule

    data = _make("rare_event", n_distractors=1, n_train=4)
    module = ForecastModule(probe_model_config(ZERO_SHOT_MODEL, data, "msa", "sensor"), data.schema.to_dict(), 32, 4,
                            indexer_warmup={"steps": 0}, max_steps=1)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(window_dataset(data.train, data), batch_size=2))
    trainer.save_checkpoint(ckpt)


def test_zero_shot_probe_of_a_checkpoint(tmp_path):
    """A saved ForecastModule is probed as is; scenarios whose schema differs are skipped, not failed."""
    model_cfg = ZERO_SHOT_MODEL
    ckpt = tmp_path / "model.ckpt"
    _rare_event_checkpoint(ckpt)
    cfg = {"seed": 3, "threads": 1, "checkpoint": str(ckpt), "model": model_cfg, "train": {},
           "selectors": ["dense", "local", "oracle", "learned"], "verdict": {},
           "probe": {"scenarios": {"rare_event": {"knobs": {**RUN_KNOBS, "n_distractors": 1}},
                                   "exogenous_delay": {"knobs": {**RUN_KNOBS, "n_distractors": 1}}}}}
    summary = run_probe_in(cfg, tmp_path / "out")
    assert summary["settings"]["seeds"] == [3]  # seed=3: the shorthand of seeds=[3]
    rows = summary["scenarios"]["rare_event"]["runs"][0]["policies"]["sensor"]["rows"]
    assert [r["selector"] for r in rows] == ["dense", "local", "oracle", "learned"]
    assert all(r["backbone"] == "checkpoint" for r in rows)
    assert rows[0]["error_ratio"] == 1.0 and rows[0]["recall"] == 1.0 and rows[1]["recall"] == 0.0
    assert "schema" in summary["scenarios"]["exogenous_delay"]["runs"][0]["skipped"]


def test_zero_shot_probe_takes_a_run_folder_and_says_what_it_skips(tmp_path, capsys):
    """checkpoint=<run folder> reads its checkpoint (as evaluate does); each skipped scenario gets a console
    line, and a checkpoint that fits no scenario ends as an error, not as an empty report."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    _rare_event_checkpoint(run / "checkpoints" / "last.ckpt")
    scenarios_ = {"rare_event": {"knobs": {**RUN_KNOBS, "n_distractors": 1}},
                  "exogenous_delay": {"knobs": {**RUN_KNOBS, "n_distractors": 1}}}
    cfg = {"seeds": [0, 1], "threads": 1, "checkpoint": str(run), "model": ZERO_SHOT_MODEL, "train": {},
           "selectors": ["dense", "local"], "verdict": {}, "probe": {"scenarios": scenarios_}}
    summary = run_probe_in(cfg, tmp_path / "out")
    assert summary["scenarios"]["rare_event"]["runs"][0]["policies"]["sensor"]["rows"]
    out = capsys.readouterr().out
    assert out.count("[probe] exogenous_delay: skipped: checkpoint schema does not match") == 1  # once, not per seed
    far = {"rare_event": {"knobs": {**RUN_KNOBS, "n_distractors": 1, "distance": 40}}}  # beyond the 32-step window
    with pytest.raises(ProbeConfigError, match=r"rare_event at the checkpoint's window \(context_len=32, horizon=4, "
                                               r"patch_len=4\): distance \(40\).*probe.scenarios.rare_event.knobs"):
        run_probe_in({**cfg, "probe": {"scenarios": far}}, tmp_path / "out3")
    del scenarios_["rare_event"]
    with pytest.raises(ProbeConfigError, match=r"matches no probe scenario \(its variates: target, .*probe=real_background"):
        run_probe_in(cfg, tmp_path / "out2")


# ---------------------------------------------------------------------------------------------
# training knobs, precision, report additions

def test_dense_mix_runs_every_nth_sparse_step_dense():
    from tsfm_msa.probes.command import _mixed_module_class, dense_mix_period

    assert dense_mix_period(None) == 0 and dense_mix_period(0.25) == 4 and dense_mix_period(1.0) == 1
    with pytest.raises(ProbeConfigError, match="train.dense_mix"):
        dense_mix_period(1.5)
    class Stepped(_mixed_module_class()):
        step = 0

        @property
        def global_step(self) -> int:  # no Trainer here: the step is set by hand
            return self.step

    module = Stepped(model_config={"attention": "msa", "patch_len": 4, "d_model": 8, "n_layers": 1, "n_heads": 2,
                               "n_kv_heads": 1, "head_dim": 4, "block_size": 2, "top_k": 2, "index_dim": 4},
                 schema={"variates": [{"name": "y", "role": "target", "group": "g"}], "freq": "h"},
                 context_len=16, horizon=4, indexer_warmup={"steps": 3})
    module.dense_every = 4
    phases = []
    for step in range(10):
        module.step = step
        phases.append(module.current_phase())
    assert phases == ["indexer_warmup"] * 3 + ["sparse", "indexer_warmup", "sparse", "sparse", "sparse",
                                                "indexer_warmup", "sparse"]


def test_precision_follows_the_device():
    from tsfm_msa.probes.command import probe_precision

    assert probe_precision("auto", torch.device("cpu")) == "32-true"
    assert probe_precision(None, torch.device("cuda")) == "bf16-mixed"
    with pytest.raises(ProbeConfigError, match="precision=bf16-mixed needs device=cuda"):
        probe_precision("bf16-mixed", torch.device("cpu"))
    with pytest.raises(ProbeConfigError, match="precision must be"):
        probe_precision("fp8", torch.device("cuda"))


def _target_summary(learned_recall: float, learned_ratio: float, local_recall: float,
                    reference_cf_corr: float = 0.9, learned_cf_corr: float = 0.85) -> dict:
    rows = [{"scenario": "rare_event", "policy": "sensor", "backbone": "dense", "selector": "dense", "n_seeds": 2,
             "recall": 1.0, "error_ratio": 1.0, "cf_corr": reference_cf_corr},
            {"scenario": "rare_event", "policy": "sensor", "backbone": "msa", "selector": "learned", "n_seeds": 2,
             "recall": learned_recall, "error_ratio": learned_ratio, "cf_corr": learned_cf_corr},
            {"scenario": "rare_event", "policy": "sensor", "backbone": "msa", "selector": "local", "n_seeds": 2,
             "recall": local_recall, "error_ratio": 2.0},
            {"scenario": "rare_event", "policy": "free", "backbone": "msa", "selector": "learned", "n_seeds": 2,
             "recall": 0.0, "error_ratio": 9.0}]  # another policy: not the target's
    return {"target": {"scenarios": ["rare_event", "action_history"], "policy": "sensor", "learned_recall": 0.9,
                       "learned_ratio": 1.1, "local_recall": 0.5}, "aggregate": rows}


def test_target_check_names_each_miss():
    met = report.target_check(_target_summary(0.95, 1.05, 0.1))
    assert met[0] == {"scenario": "rare_event", "n_seeds": 2, "learned_recall": 0.95, "learned_ratio": 1.05,
                      "local_recall": 0.1, "reference_cf_corr": 0.9, "learned_cf_corr": 0.85, "ok": True,
                      "why": "met"}
    assert met[1]["scenario"] == "action_history" and not met[1]["ok"] and "not run" in met[1]["why"]
    missed = report.target_check(_target_summary(0.8, 1.2, 0.6))[0]
    assert not missed["ok"] and missed["why"] == "learned recall, learned ratio, local recall"
    assert report.target_check({"scenarios": {}}) == []
    # A dense reference that ignores the cause cannot judge preservation, however good the numbers look.
    blind = report.target_check(_target_summary(0.95, 1.0, 0.1, reference_cf_corr=-0.05, learned_cf_corr=0.2))[0]
    assert not blind["ok"] and blind["why"].startswith("inconclusive: neither the dense reference nor the learned")
    # Only the MSA model learned the cause: the checks apply and the row names the situation.
    beyond = report.target_check(_target_summary(0.95, 0.4, 0.0, reference_cf_corr=0.1, learned_cf_corr=0.9))[0]
    assert beyond["ok"] and beyond["why"].startswith("met (beyond the reference: only the MSA model uses the cause")
    beyond_missed = report.target_check(_target_summary(0.6, 0.4, 0.0, reference_cf_corr=0.1, learned_cf_corr=0.9))[0]
    assert not beyond_missed["ok"] and beyond_missed["why"].startswith("learned recall (beyond the reference")


def _tiny_probe_cfg(spec: dict) -> dict:
    return {"seeds": [0], "threads": 1, "checkpoint": None, "device": "cpu",
            "model": {"d_model": 8, "n_layers": 1, "heads_per_group": 1, "head_dim": 4, "block_size": 2, "top_k": 2,
                      "index_dim": 4, "k_own": None},
            "train": {"steps": 1, "msa_steps": 1, "indexer_warmup_steps": 0, "batch_size": 2, "kl_weight": 1.0,
                      "msa_init": "dense", "optim": {"lr": 1e-3, "warmup_steps": 1}},
            "selectors": ["dense", "learned"], "verdict": dict(report.DEFAULT_THRESHOLDS),
            "probe": {"scenarios": {"sensor_starvation": spec}}}


def test_a_scenario_can_override_model_settings_for_both_models(monkeypatch):
    from tsfm_msa.probes import command

    seen = []
    real = command.train_model

    def spy(model_config, *args, **kwargs):
        seen.append((model_config["attention"], model_config["n_heads"], model_config["n_kv_heads"]))
        return real(model_config, *args, **kwargs)

    monkeypatch.setattr(command, "train_model", spy)
    spec = {"policies": ["sensor"], "model": {"heads_per_group": 3}, "knobs": {**RUN_KNOBS, "n_distractors": 1}}
    cfg = _tiny_probe_cfg(spec)
    result = command.probe_scenario("sensor_starvation", spec, cfg)
    assert seen == [("dense", 9, 3), ("dense", 9, 3), ("msa", 9, 3)]  # 3 groups x 3 heads, not x 1
    assert result["model"] == {"heads_per_group": 3}
    bad = {**spec, "model": {"heads": 3}}
    with pytest.raises(ProbeConfigError, match=r"sensor_starvation.model: unknown model keys \['heads'\]"):
        command.probe_scenario("sensor_starvation", bad, _tiny_probe_cfg(bad))


def test_dense_support_policy_reaches_only_the_sensor_policy_models(monkeypatch):
    """One probe config runs several policies: model.dense_support=policy must not make the hybrid (or
    free) models fail; they read every key, and the sensor models get `policy`."""
    from tsfm_msa.probes import command

    seen = []
    real = command.train_model

    def spy(model_config, *args, **kwargs):
        seen.append((model_config["attention"], model_config["group_policy"], model_config["dense_support"]))
        return real(model_config, *args, **kwargs)

    monkeypatch.setattr(command, "train_model", spy)
    spec = {"policies": ["hybrid", "sensor"], "knobs": {**RUN_KNOBS, "n_distractors": 1}}
    cfg = _tiny_probe_cfg(spec)
    cfg["model"]["dense_support"] = "policy"
    result = command.probe_scenario("sensor_starvation", spec, cfg)
    assert set(result["policies"]) == {"hybrid", "sensor"}
    assert seen == [("dense", "hybrid", "all"), ("dense", "hybrid", "all"), ("msa", "hybrid", "all"),
                    ("msa", "sensor", "policy")]


def test_bf16_probe_forwards_keep_the_forecast_head_in_fp32():
    """Under bf16 autocast the encoder runs in bf16 but the compared forecasts come out of an fp32 head."""
    from tsfm_msa.probes.command import eval_autocast

    torch.manual_seed(4)
    model = PatchTransformer(["target", "past_covariate"], [0, 1], ["t", "c"], patch_len=4, d_model=8, n_layers=1,
                             n_heads=2, n_kv_heads=2, head_dim=4, attention="dense").eval()
    g = torch.Generator().manual_seed(5)
    batch = {"context": torch.randn(2, 16, 2, generator=g), "context_mask": torch.ones(2, 16, 2, dtype=torch.bool),
             "horizon": torch.randn(2, 4, 2, generator=g), "horizon_mask": torch.ones(2, 4, 2, dtype=torch.bool)}
    cpu = torch.device("cpu")
    with torch.no_grad(), eval_autocast("bf16-mixed", cpu, model):
        hidden, _, _ = model.encode(batch)
        out = model(batch).quantiles
        assert hidden.dtype == torch.float32  # the final LayerNorm runs in fp32 under autocast
    assert out.dtype == torch.float32
    with torch.no_grad():
        raw = model.head(hidden[:, model.layout(16, 4, cpu).forecast_index.flatten()])  # [B, 1, P * Q]
    torch.testing.assert_close(out, torch.sort(raw.view(2, 1, 4, -1), -1).values)  # the fp32 head, exactly
    assert "forward" not in vars(model.head), "the fp32 head is removed after the block"
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(batch).quantiles.dtype == torch.bfloat16  # what the plain autocast would have compared


# ---------------------------------------------------------------------------------------------
# several seeds: per-seed rows, aggregates judged on the means, clear errors

def _seed_row(selector: str, recall: float, mae: float, reference_mae: float, backbone: str = "msa") -> dict:
    ratio = mae / reference_mae
    return {"backbone": backbone, "selector": selector, "recall": recall, "path_recall": recall, "cf_corr": 0.5,
            "support_tokens": 10.0, "support_frac": 0.5, "mae": mae, "crps": mae / 2, "reference_mae": reference_mae,
            "reference_crps": reference_mae / 2, "error_ratio": ratio, "crps_ratio": ratio,
            "verdict": report.judge(recall, ratio)}


def test_aggregate_rows_judge_the_means_and_keep_the_spread():
    """Two seeds whose dense references differ: learned MAE 0.2 vs 0.1 (ratio 2.0, lost) and 0.1 vs 0.2
    (0.5, preserved): the ratio of mean MAEs is 1.0 (preserved), where a mean of the ratios would say 1.25."""
    runs = [{"seed": seed, "policies": {"sensor": {"rows": rows}}} for seed, rows in (
        (0, [_seed_row("dense", 1.0, 0.1, 0.1, "dense"), _seed_row("learned", 1.0, 0.2, 0.1),
             _seed_row("local", 0.0, 0.3, 0.1)]),
        (1, [_seed_row("dense", 1.0, 0.2, 0.2, "dense"), _seed_row("learned", 0.9, 0.1, 0.2),
             _seed_row("local", float("nan"), 0.2, 0.2)]))]
    summary = {"settings": {"seeds": [0, 1], "verdict": dict(report.DEFAULT_THRESHOLDS)},
               "scenarios": {"rare_event": {"runs": runs}}}
    summary["aggregate"] = report.aggregate_rows(summary)
    agg = {r["selector"]: r for r in summary["aggregate"]}
    learned = agg["learned"]
    assert learned["n_seeds"] == 2 and learned["seeds"] == [0, 1]
    assert learned["recall"] == pytest.approx(0.95) and learned["recall_range"] == [0.9, 1.0]
    assert learned["error_ratio"] == pytest.approx(1.0) and learned["error_ratio_range"] == [0.5, 2.0]
    assert learned["crps_ratio"] == pytest.approx(1.0) and learned["mae"] == pytest.approx(0.15)
    assert learned["seed_verdicts"] == ["lost", "preserved"] and learned["verdict"] == "preserved"
    local = agg["local"]  # a NaN recall (no needed block) is left out of the mean, not propagated
    assert local["recall"] == 0.0 and local["recall_range"] == [0.0, 0.0] and local["verdict"] == "lost"
    assert local["error_ratio"] == pytest.approx(0.5 / 0.3)
    assert [r["selector"] for r in report.headline_rows(summary)] == ["dense", "local", "learned"]  # HEADLINE order
    table = report.summary_table(summary)
    assert ("| rare_event | sensor | learned | msa | 2 | 0.95 (0.90-1.00) | 0.95 (0.90-1.00) | 1.00 (0.50-2.00) |"
            in table)
    assert "| preserved (seeds: 1 lost, 1 preserved) |" in table
    assert "untested" not in table  # the dense reference's cf corr 0.5 reaches the bar
    # A dense reference that ignores the cause: every verdict of the scenario names it.
    for run in runs:
        for row in run["policies"]["sensor"]["rows"]:
            row["cf_corr"] = 0.1
    summary["aggregate"] = report.aggregate_rows(summary)
    blind = report.summary_table(summary).splitlines()[2:]
    assert len(blind) == 3 and all(line.endswith("(untested: the dense reference does not use the cause, cf corr 0.10) |")
                                   for line in blind)


def test_seeds_are_checked_with_clear_errors():
    from tsfm_msa.probes.command import probe_seeds

    assert probe_seeds({"seeds": [0, 1, 2]}) == [0, 1, 2]
    assert probe_seeds({"seeds": [0], "seed": 3}) == [3] and probe_seeds({"seeds": 4}) == [4]
    for bad, match in (([], "non-empty list of integers"), (["a"], r"bad entries: \['a'\]"),
                       ([0.5, 1], r"bad entries: \[0.5\]"), ([-1], "non-negative"), ([True], "bad entries"),
                       ([1, 1], "repeats"), ("0,1", "non-empty list of integers")):
        with pytest.raises(ProbeConfigError, match=match):
            probe_seeds({"seeds": bad})
    with pytest.raises(ProbeConfigError, match="set seed or seeds, not both"):
        probe_seeds({"seeds": [0, 1], "seed": 3})
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    with initialize_config_module("tsfm_msa.configs", version_base=None):
        for overrides, seeds in ((["seeds=[0,1,2]"], [0, 1, 2]), (["seed=3"], [3]), ([], [0])):
            assert probe_seeds(OmegaConf.to_container(compose("probe", overrides=overrides))) == seeds
    cfg = {"seeds": [0], "probe": {"scenarios": {"rare_event": {"knobs": TINY}}}}
    with pytest.raises(ProbeConfigError, match="probe.scenarios.rare_event.knobs.seed"):
        run_probe_in(cfg, None)


def test_two_seeds_end_to_end_keep_every_seed_and_write_after_each(tmp_path, monkeypatch):
    from tsfm_msa.probes import command

    written = []
    real = command.write_report
    monkeypatch.setattr(command, "write_report",
                        lambda summary, out: written.append(len(summary["scenarios"]["rare_event"]["runs"]))
                        or real(summary, out))
    spec = {"policies": ["sensor"], "knobs": {**RUN_KNOBS, "n_train": 4, "n_distractors": 1}}
    cfg = {**_tiny_probe_cfg(spec), "seeds": [0, 1], "selectors": ["dense", "local", "learned"],
           "probe": {"scenarios": {"rare_event": spec}}}
    summary = run_probe_in(cfg, tmp_path)
    assert written == [1, 2], "a report after each (scenario, seed)"
    loaded = json.loads((tmp_path / "probe_summary.json").read_text())
    runs = loaded["scenarios"]["rare_event"]["runs"]
    assert [r["seed"] for r in runs] == [0, 1]
    per_seed = [{(r["backbone"], r["selector"]): r for r in run["policies"]["sensor"]["rows"]} for run in runs]
    assert per_seed[0][("dense", "dense")]["mae"] != per_seed[1][("dense", "dense")]["mae"], "seeds must differ"
    agg = {(r["backbone"], r["selector"]): r for r in loaded["aggregate"]}
    assert set(agg) == set(per_seed[0]) and all(r["n_seeds"] == 2 for r in agg.values())
    learned = agg[("msa", "learned")]
    maes = [s[("msa", "learned")]["mae"] for s in per_seed]
    refs = [s[("dense", "dense")]["mae"] for s in per_seed]
    assert learned["error_ratio"] == pytest.approx(sum(maes) / sum(refs))
    assert learned["verdict"] == report.judge(learned["recall"], learned["error_ratio"])
    assert agg[("msa", "local")]["recall_range"] == [0.0, 0.0]
    md = (tmp_path / "probe_report.md").read_text()
    assert "| rare_event | sensor | learned | msa | 2 |" in md
    assert "## rare_event, seed 0" in md and "## rare_event, seed 1" in md
    assert "| rare_event | 2 |" in md.split("## Timing")[1]
    assert loaded == summary


def _first_step_grads(dense_teacher_kl: float) -> dict[str, torch.Tensor]:
    """Gradients of one sparse training step of a tiny MSA probe model (same data, same weights)."""
    import lightning as L
    from torch.utils.data import DataLoader

    from tsfm_msa.probes.command import probe_model_config, window_dataset
    from tsfm_msa.train.lightning_module import ForecastModule

    scenario = _make("rare_event", n_train=4, n_distractors=1)
    config = probe_model_config({"d_model": 8, "n_layers": 2, "heads_per_group": 2, "head_dim": 4, "block_size": 2,
                                 "top_k": 2, "index_dim": 4, "k_own": None}, scenario, "msa", "sensor")
    torch.manual_seed(0)
    module = ForecastModule(model_config=config, schema=scenario.schema.to_dict(), context_len=scenario.context_len,
                            horizon=scenario.horizon, indexer_warmup={"steps": 0}, max_steps=1,
                            dense_teacher_kl=dense_teacher_kl)
    grads = {}

    class Grab(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads.update({n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None})

    loader = DataLoader(list(window_dataset(scenario.train, scenario)), batch_size=4)
    L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
              callbacks=[Grab()]).fit(module, train_dataloaders=loader)
    return grads


def test_dense_teacher_kl_trains_only_the_indexer_in_the_sparse_phase():
    from tsfm_msa.probes.command import train_model

    # The probes' key reaches ForecastModule's own option (tests/test_dense_teacher.py), named as theirs.
    scenario = _make("rare_event", n_train=4, n_distractors=1)
    for bad in (-1.0, float("nan"), "3", True):
        with pytest.raises(ValueError, match="train.dense_teacher_kl"):
            train_model({}, scenario, {"steps": 1, "kl_weight": 1.0, "indexer_warmup_steps": 0, "batch_size": 2,
                                       "dense_teacher_kl": bad}, seed=0)
    without, with_teacher = _first_step_grads(0.0), _first_step_grads(5.0)
    assert without.keys() == with_teacher.keys()
    index = [n for n in without if ".index_" in n]
    assert index and len(index) < len(without)
    # The dense teacher's loss moves the index projections and nothing else.
    assert all(torch.equal(without[n], with_teacher[n]) for n in without if n not in index)
    assert any(not torch.allclose(without[n], with_teacher[n]) for n in index)
