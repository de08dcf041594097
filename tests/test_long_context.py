"""The long-context study (issue 12): its config composes for every dataset, the third model (MSA with
sensor groups) trains and scores, the measurements, the job order and pool, and the collector with its
target check on constructed results."""
from __future__ import annotations

import json
import math
import sys
import warnings

import numpy as np
import pytest
import torch

from tsfm_msa.evaluate import long_context as lc
from tsfm_msa.evaluate.run_measures import (SKIP_FIRST_STEPS, StepTimer, batch_for_tokens, cap_top_k, window_facts,
                                            window_layout)

warnings.filterwarnings("ignore", message=".*json-module.*")

GROUPS = {"epf": ["FR", "BE"], "vic_elec": ["target", "past_covariate", "future_covariate"],
          "pedestrian": None}  # pedestrian: the 4 sensors, named after them


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _compose(*overrides: list[str]):
    """The evaluate config with +experiment=long_context, for each list of overrides (one Hydra init)."""
    from hydra import compose, initialize_config_module

    with initialize_config_module("tsfm_msa.configs", version_base=None):
        cfgs = [compose("evaluate", overrides=["+experiment=long_context", *o]) for o in overrides]
    return cfgs[0] if len(cfgs) == 1 else cfgs


@pytest.mark.parametrize("dataset", lc.DATASETS)
def test_experiment_composes_and_fits_each_dataset(dataset):
    import hydra

    settings = [(rung, model) for rung in ("s256", "max") for model in lc.MODELS]
    cfgs = _compose(*[[f"context_study={dataset}", f"study.context={rung}", f"study.model={model}", "study.patch=8"]
                      for rung, model in settings])
    frames = hydra.utils.instantiate(cfgs[0].data.loader)()
    schema = frames[0].schema
    if GROUPS[dataset] is not None:
        assert list(schema.group_names) == GROUPS[dataset]
    assert len(schema.group_names) == (4 if dataset == "pedestrian" else len(GROUPS[dataset]))
    for (rung, model), cfg in zip(settings, cfgs):
        assert list(cfg.eval.models) == ["seasonal_naive", model]
        assert cfg.models[model].patch_len == 8
        context = int(cfg.data.context_len)
        assert context == (lc.REFERENCE_CONTEXT if rung == "s256" else cfg.study.contexts.max)
        # The longest context still leaves training windows before the test windows.
        assert context + int(cfg.data.horizon) + int(cfg.data.test_length) < min(f.length for f in frames)
        # MSA sensor: one GQA group per sensor group of this data, two query heads each.
        assert cfg.models.msa_sensor.group_policy == "sensor"
        assert cfg.models.msa_sensor.n_kv_heads == len(schema.group_names)
        assert cfg.models.msa_sensor.n_heads == 2 * len(schema.group_names)


def test_epf_countries_holds_the_item_stacked_values():
    from tsfm_msa.datasets.bundled import load_epf

    stacked = {f.item_id: f for f in load_epf()}
    (joint,) = load_epf(countries_as_groups=True)
    assert joint.length == stacked["FR"].length
    rows = np.random.default_rng(int(torch.randint(0, 2**31, ()).item())).integers(0, joint.length, 50)
    for country in ("FR", "BE"):
        for var in ("y", "system_load", "gen_forecast", "week_day"):
            got = joint.column(f"{var}_{country}")[rows]
            np.testing.assert_array_equal(got, stacked[country].column(var)[rows])
            assert joint.schema.variates[joint.schema.index(f"{var}_{country}")].role == \
                stacked[country].schema.variates[stacked[country].schema.index(var)].role


def test_msa_sensor_trains_and_scores_on_epf_countries(tmp_path):
    from tsfm_msa.evaluate.command import evaluate

    cfg = _compose(["context_study=epf", "study.context=w1", "study.model=msa_sensor", "study.patch=16",
                    "eval.max_steps=3", "indexer_warmup.steps=1", "eval.windows=2", "eval.cpu_threads=1",
                    "eval.tokens_per_batch=300"])
    out = evaluate(cfg, tmp_path, "epf_countries")
    row = next(r for r in out["rows"] if r["model"] == "msa_sensor")
    assert row["steps"] == 3 and math.isfinite(row["CRPS"]) and math.isfinite(row["CRPS_rel"])
    # 8 variates x ceil(168 / 16) context patches + 2 horizon patches x (2 targets + 4 known-future covariates).
    assert row["context_tokens"] == 8 * 11 + 2 * 6
    assert row["layout_tokens"] == 2 * 64  # each country's 50 tokens padded to one 64-token block
    assert row["batch_size"] == 300 // 128  # the token budget shrank the batch from 32
    assert row["top_k"] == 2  # capped at the window's 2 blocks (16 would be refused)
    assert row["attention"] == "msa" and row["step_seconds"] > 0 and row["context_len"] == 168


def test_window_facts_batch_and_top_k_cap():
    from tsfm_msa.datasets.schema import SeriesSchema, Variate

    rng = np.random.default_rng(int(torch.randint(0, 2**31, ()).item()))
    roles = ["target", "target", "past_covariate", "future_covariate"]
    groups = ["a", "b", "a", "b"]
    schema = SeriesSchema(tuple(Variate(f"v{i}", r, g) for i, (r, g) in enumerate(zip(roles, groups))), "h")
    context, horizon, patch = int(rng.integers(100, 400)), int(rng.integers(10, 40)), int(rng.choice([8, 16]))
    cfg = {"attention": "msa", "patch_len": patch, "block_size": 32, "top_k": 10_000, "k_own": 50}
    layout = window_layout(schema, cfg, context, horizon)
    facts = window_facts(layout)
    n_ctx, n_hor = -(-context // patch), -(-horizon // patch)
    assert facts["context_tokens"] == 4 * n_ctx + 3 * n_hor  # past-only covariates have no horizon tokens
    assert facts["layout_tokens"] % 32 == 0 and facts["layout_tokens"] >= facts["context_tokens"]
    capped = cap_top_k(cfg, layout)
    assert capped["top_k"] == layout.n_blocks == facts["kv_blocks"] and capped["k_own"] == min(50, layout.n_blocks)
    assert cap_top_k({**cfg, "top_k": 1}, layout)["top_k"] == 1
    assert cap_top_k({**cfg, "attention": "dense"}, layout)["top_k"] == 10_000
    assert batch_for_tokens(1000, 32768, 32) == 32
    assert batch_for_tokens(10_000, 32768, 32) == 3
    assert batch_for_tokens(50_000, 32768, 32) == 1
    assert batch_for_tokens(10_000, None, 32) == 32


def test_step_timer_reports_the_last_phase_without_its_first_steps():
    timer = StepTimer()
    times = np.random.default_rng(0).uniform(1, 2, size=20)
    timer.steps = [("indexer_warmup", 9.0)] * 5 + [("sparse", 50.0)] * SKIP_FIRST_STEPS + [("sparse", t) for t in times]
    assert timer.median_seconds() == pytest.approx(float(np.median(times)))
    assert timer.median_seconds("indexer_warmup") == 9.0
    assert math.isnan(StepTimer().median_seconds())


def test_plan_orders_short_against_long_first_and_never_repeats():
    jobs = lc.plan()
    assert len(jobs) == len(set(jobs))
    n_first = len(lc.DATASETS) * len(lc.MODELS) * 2
    first = jobs[:n_first]
    assert {(j.rung, j.patch, j.seed) for j in first} == {("max", 16, 0), ("s256", 16, 0)}
    assert {(j.dataset, j.model) for j in first} == {(d, m) for d in lc.DATASETS for m in lc.MODELS}
    # Then the windows past 32K tokens: vic_elec's longest rung at patch 4, every model.
    assert {(j.dataset, j.rung, j.patch, j.model) for j in jobs[n_first:n_first + 3]} == \
        {("vic_elec", "max", 4, m) for m in lc.MODELS}
    assert {(j.dataset, j.rung) for j in jobs if j.patch == 4} == {("vic_elec", "max")}
    # Every (dataset, rung, patch 16 or 8, model) runs at seed 0; seed 1 only at the rungs that matter.
    seed0 = {(j.dataset, j.rung, j.patch, j.model) for j in jobs if j.seed == 0 and j.patch != 4}
    assert len(seed0) == len(lc.DATASETS) * 6 * 2 * len(lc.MODELS)
    assert {j.rung for j in jobs if j.seed == 1} == {"max", "s256", "w52", "w13", "w4"}
    assert [j.rung for j in lc.plan(datasets=["epf"], models=["msa"], patches=[8], seeds=[0], rungs=["w1", "max"])] \
        == ["max", "w1"]


def test_run_skips_jobs_finished_in_an_earlier_run(tmp_path, capsys):
    earlier = tmp_path / "earlier"
    naive = {"model": "Seasonal naive (GluonTS)", "CRPS": 0.1}
    ours = {"dataset": "epf", "model": "dense", "seed": 0, "context_tokens": 6564, "CRPS": 0.08, "CRPS_rel": 0.8}
    for name, rows in {"epf-max-p16-dense-s0": [naive, ours], "epf-max-p16-msa-s0": [naive]}.items():
        (earlier / name).mkdir(parents=True)  # msa: stopped after the naive row was written, runs again
        (earlier / name / "evaluation.json").write_text(json.dumps({"setting": {}, "rows": rows}))
    lc.main(["run", "--dry-run", "--out", str(tmp_path / "x"), "--datasets", "epf", "--patches", "16", "--seeds", "0",
             "--rungs", "max", "--skip-finished", str(earlier)])
    printed = capsys.readouterr().out
    assert "study.model=dense" not in printed
    assert "study.model=msa " in printed and "study.model=msa_sensor" in printed
    with pytest.raises(SystemExit, match="--skip-finished: no such folder"):
        lc.main(["run", "--dry-run", "--out", str(tmp_path / "x"), "--skip-finished", str(tmp_path / "nowhere")])


def test_variants_run_beside_the_plain_jobs_in_one_pool(capsys, tmp_path):
    curriculum = "eval.context_curriculum=[{context_len:256,steps:200}]"
    lc.main(["run", "--dry-run", "--out", str(tmp_path / "x"), "--datasets", "vic_elec", "--models", "msa",
             "--patches", "16", "--seeds", "0", "--rungs", "w13", "--variant", "plain", "--variant",
             f"cur256={curriculum}", "--variant", "dtk3=dense_teacher_kl=3 kl_weight=2"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    assert "study.variant" not in lines[0] and lines[0].endswith("/vic_elec-w13-p16-msa-s0")
    assert "study.variant=cur256" in lines[1] and curriculum in lines[1] and "-s0-cur256" in lines[1]
    assert "study.variant=dtk3 dense_teacher_kl=3 kl_weight=2" in lines[2] and "-s0-dtk3" in lines[2]
    for bad, message in (("=x", "NAME=OVERRIDES"), ("a b=x", "NAME=OVERRIDES"), ("cur=x", None)):
        argv = ["run", "--dry-run", "--out", str(tmp_path / "x"), "--variant", bad]
        if message is None:
            argv += ["--variant", "cur=y"]
            message = "given twice"
        with pytest.raises(SystemExit, match=message):
            lc.main(argv)


def test_run_pool_runs_in_order_and_stops_at_the_budget(tmp_path):
    py = sys.executable
    commands = {
        "ok": [py, "-c", "import time; time.sleep(1); print('done')"],
        "fails": [py, "-c", "import sys, time; time.sleep(1); sys.exit(3)"],
        "slow": [py, "-c", "import time; time.sleep(60)"],
        "late": [py, "-c", "print('never')"],
    }
    status = lc.run_pool(commands, tmp_path / "logs", workers=3, budget_s=2.5, min_start_s=2.0)
    assert status["ok"] == "ok" and "done" in (tmp_path / "logs" / "ok.log").read_text()
    assert status["fails"] == "failed (rc 3)"
    assert status["slow"] == "stopped at the budget"
    assert status["late"] == "not started"  # workers were free after 1 s, but less than min_start_s was left


def _fake_run(root, dataset, model, attention, patch, context, tokens, seed, crps_rel, step_s, peak=100.0,
              curriculum=None):
    run = root / f"{dataset}-{context}-p{patch}-{model}-s{seed}{'-cur' if curriculum else ''}"
    run.mkdir(parents=True)
    naive = {"dataset": dataset, "model": "seasonal_naive", "seed": 0, "CRPS": 1.0, "CRPS_rel": 1.0}
    ours = {"dataset": dataset, "model": model, "seed": seed, "attention": attention, "context_len": context,
            "patch_len": patch, "context_tokens": tokens, "layout_tokens": tokens + 10, "batch_size": 4,
            "top_k": 16 if attention == "msa" else None, "steps": 5, "CRPS": crps_rel, "CRPS_rel": crps_rel,
            "MASE": 2 * crps_rel, "MASE_rel": crps_rel, "step_seconds": step_s, "peak_mb": peak,
            "train_seconds": 3.0}
    (run / "evaluation.json").write_text(json.dumps({"setting": {"context_curriculum": curriculum},
                                                     "rows": [naive, ours]}))
    return run


def test_collector_writes_json_md_png_and_checks_the_targets(tmp_path):
    rng = np.random.default_rng(int(torch.randint(0, 2**31, ()).item()))
    root = tmp_path / "multirun"
    noise = lambda: float(rng.uniform(-0.003, 0.003))  # noqa: E731 - seed spread smaller than the gaps
    for seed in (0, 1):
        # A: MSA at long context (0.80) beats the best at 256 steps (dense 0.90).
        _fake_run(root, "A", "dense", "dense", 16, 256, 100, seed, 0.90 + noise(), 0.01)
        _fake_run(root, "A", "msa", "msa", 16, 256, 100, seed, 0.95 + noise(), 0.02)
        _fake_run(root, "A", "msa", "msa", 16, 8192, 40_000, seed, 0.80 + noise(), 0.04)
        _fake_run(root, "A", "dense", "dense", 16, 8192, 40_000, seed, 0.85 + noise(), 0.10)
        # B: MSA at long context (0.85) does not beat sensor MSA at 256 steps (0.80); dense long is best
        # but dense does not count.
        _fake_run(root, "B", "msa_sensor", "msa", 8, 256, 120, seed, 0.80 + noise(), 0.01)
        _fake_run(root, "B", "msa", "msa", 8, 2048, 2000, seed, 0.85 + noise(), 0.02)
        _fake_run(root, "B", "dense", "dense", 8, 2048, 2000, seed, 0.70 + noise(), 0.02)
        # C: sensor MSA at long context wins.
        _fake_run(root, "C", "dense", "dense", 16, 256, 90, seed, 0.95 + noise(), 0.01)
        _fake_run(root, "C", "msa_sensor", "msa", 16, 4096, 35_000, seed, 0.90 + noise(), 0.06)
        _fake_run(root, "C", "dense", "dense", 16, 4096, 35_000, seed, 0.99 + noise(), 0.10)
        # A curriculum run of the same model and context is a row of its own, not a third seed; so is a
        # named variant (study.variant in the run's config).
        _fake_run(root, "C", "msa_sensor", "msa", 16, 4096, 35_000, seed, 0.97 + noise(), 0.06,
                  curriculum=[{"context_len": 256, "steps": 200}])
        variant_run = _fake_run(root / "v", "C", "msa_sensor", "msa", 16, 4096, 35_000, seed, 0.98 + noise(), 0.06)
        (variant_run / "config.yaml").write_text("study:\n  context: w13\n  variant: dtk3\n")
    out = tmp_path / "results" / "2026-12-02-long-context"
    record = lc.collect([root], out)
    check = record["targets"]
    assert check["a"]["per_dataset"] == {"A": True, "B": False, "C": True}
    assert check["a"]["met"] and "2 of 3" in check["a"]["text"]
    # From 32K tokens: A msa/dense 0.4, C msa_sensor/dense 0.6 -> not every pair at most half.
    assert check["b"]["met"] is False and "0.40-0.60" in check["b"]["text"]
    md = (tmp_path / "results" / "2026-12-02-long-context.md").read_text()
    assert "| A | msa | 16 | 8192 | 40000 |" in md and "± " in md and "NOT met" in md
    data = json.loads((tmp_path / "results" / "2026-12-02-long-context.json").read_text())
    assert len(data["rows"]) == 24 and len(data["table"]) == 12
    assert "| C | msa_sensor+cur256x200 | 16 | 4096 | 35000 |" in md and "| C | msa_sensor | 16 | 4096 | 35000 |" in md
    assert "| C | msa_sensor+dtk3 | 16 | 4096 | 35000 |" in md
    png = (tmp_path / "results" / "2026-12-02-long-context.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    # Below 32K tokens everywhere: target (b) is not tested and says so.
    short = lc.target_check(lc.summarize(lc.load_rows([root / "B-256-p8-msa_sensor-s0", root / "B-2048-p8-msa-s0",
                                                       root / "B-2048-p8-dense-s0"])))
    assert short["b"]["met"] is None and "no run reached 32K tokens" in short["b"]["text"]
    assert short["a"]["met"] is False


def test_collector_refuses_folders_without_runs(tmp_path):
    with pytest.raises(lc.LongContextError, match="no finished long-context runs"):
        lc.collect([tmp_path], tmp_path / "out")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("model", lc.MODELS)
def test_study_job_trains_and_forecasts_on_cuda(tmp_path, model):
    """One job of the study on the GPU path: bf16 training through Flex / the Triton kernels, the
    forecasts made on the GPU under the same autocast, the CUDA peak allocation."""
    from tsfm_msa.evaluate.command import evaluate

    cfg = _compose(["context_study=pedestrian", "study.context=w4", f"study.model={model}", "study.patch=8",
                    "trainer=gpu", "eval.max_steps=12", "indexer_warmup.steps=4", "eval.windows=3"])
    row = next(r for r in evaluate(cfg, tmp_path, "pedestrian")["rows"] if r["model"] == model)
    assert math.isfinite(row["CRPS_rel"]) and math.isfinite(row["MASE_rel"])
    assert row["context_tokens"] == 4 * (672 // 8) + 4 * 3 and row["step_seconds"] > 0
    assert 0 < row["peak_mb"] < 20_000
