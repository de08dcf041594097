"""GluonTS evaluation: predictor round-trip, metrics vs GluonTS and numpy, bad input, estimator, end-to-end."""
from __future__ import annotations

import json
import re
import warnings

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from gluonts.ev.metrics import MAE, MASE, RMSE, MeanWeightedSumQuantileLoss
from gluonts.model import evaluate_forecasts

from tsfm_msa.datasets import SeriesFrame, WindowDataset, make_synthetic, split_by_time
from tsfm_msa.evaluate import baselines
from tsfm_msa.evaluate.gluonts_data import (EvaluationSplitError, frames_to_gluonts, gift_eval_windows,
                                            make_eval_split, standardize_covariates)
from tsfm_msa.evaluate.metrics import score_forecasts
from tsfm_msa.evaluate.predictor import CheckpointMismatchError, check_schema, load_predictor, predictor_from_module
from tsfm_msa.train.lightning_module import ForecastModule

warnings.filterwarnings("ignore", message=".*json-module.*")

C, H = 64, 24
W = 5  # test windows of the fixture data (600 steps per item)
TINY = {
    "_target_": "tsfm_msa.model.transformer.PatchTransformer", "patch_len": 8, "d_model": 32, "n_layers": 1,
    "n_heads": 2, "n_kv_heads": 1, "head_dim": 16, "mlp_ratio": 2.0, "dropout": 0.0, "block_size": 8, "top_k": 3,
    "index_dim": 8, "group_policy": "free", "quantiles": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9],
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _frames(seed: int, n_items: int = 2, length: int = 600):
    # Hourly target = level + daily season + past covariate + known-future covariate + noise.
    return make_synthetic(n_items=n_items, length=length, freq="h", noise=0.05, covariate_effect=2.0, seed=seed)


@pytest.fixture(scope="module")
def data():
    seed = int(np.random.default_rng().integers(1_000_000))
    frames = _frames(seed)
    splits = split_by_time(frames, 0.1, 0.2)
    return frames, splits, make_eval_split(frames, H, W)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, data):
    """A `tsfm-msa train`-style checkpoint of a tiny MSA model (a couple of optimizer steps)."""
    from tsfm_msa.datasets import SeriesDataModule

    frames, _, _ = data
    torch.manual_seed(int(np.random.default_rng().integers(1000)))
    dm = SeriesDataModule(frames=frames, context_len=C, horizon=H, batch_size=8, train_samples_per_epoch=16)
    module = ForecastModule({**TINY, "attention": "msa"}, dm.schema.to_dict(), C, H, indexer_warmup={"steps": 1},
                            max_steps=2)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    path = tmp_path_factory.mktemp("ckpt") / "model.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_predictor_round_trip(data, checkpoint):
    frames, _, split = data
    predictor = load_predictor(checkpoint)
    forecasts = list(predictor.predict(split.test.input))
    labels = list(split.test.label)
    assert len(forecasts) == len(labels) == split.windows * len(frames)
    for f, lab in zip(forecasts, labels):
        assert f.forecast_array.shape == (9, H)  # 9 quantiles, no mean: .mean is the median (GluonTS)
        assert f.forecast_keys[4] == "0.5" and "mean" not in f.forecast_keys
        q = f.forecast_array
        assert np.all(np.diff(q, axis=0) >= 0), "quantiles must not cross"
        assert np.isfinite(f.forecast_array).all()
        assert f.start_date == lab["start"] and f.item_id == lab["item_id"]
        np.testing.assert_array_equal(f.mean, q[4])

    # Same numbers as the model on our own window of the last test instance (same scaling, same covariates).
    module = ForecastModule.load_from_checkpoint(checkpoint)
    k = len(forecasts) - 1
    item = [fr.item_id for fr in frames].index(forecasts[k].item_id)
    origin = frames[item].timestamps.get_loc(forecasts[k].start_date.to_timestamp())
    ds = WindowDataset([frames[item]], C, H, time_ranges=[range(origin, origin + H)])
    assert len(ds) == 1
    window = {key: v[None] for key, v in ds[0].items()}  # batch of one
    with torch.no_grad():
        direct = module.model(window, "sparse").quantiles[0, 0]  # [H, Q] scaled
    direct = direct * window["scale"][0, 0] + window["loc"][0, 0]
    np.testing.assert_allclose(forecasts[k].forecast_array[:9].T, direct.numpy(), rtol=1e-4, atol=1e-3)

    # A shorter horizon works and keeps the dates.
    short = list(load_predictor(checkpoint, prediction_length=H // 2).predict(split.test.input))
    assert short[0].forecast_array.shape == (9, H // 2) and short[0].start_date == forecasts[0].start_date


def test_metrics_agree_with_gluonts_and_numpy(data, checkpoint):
    _, _, split = data
    forecasts = list(load_predictor(checkpoint).predict(split.test.input))
    ours = score_forecasts(forecasts, split.test, "h")
    direct = evaluate_forecasts(
        forecasts, test_data=split.test,
        metrics=[MASE(), MeanWeightedSumQuantileLoss(quantile_levels=[0.1 * i for i in range(1, 10)]), MAE(), RMSE()],
        axis=None, mask_invalid_label=True, allow_nan_forecast=False, seasonality=24)
    assert ours["MASE"] == pytest.approx(direct["MASE[0.5]"].iloc[0], rel=1e-9)
    assert ours["CRPS"] == pytest.approx(direct["mean_weighted_sum_quantile_loss"].iloc[0], rel=1e-9)

    # Independent numpy check of MAE, RMSE, CRPS and MASE on the same forecasts.
    y = np.stack([lab["target"] for lab in split.test.label])  # [N, H]
    qs = np.stack([f.forecast_array[:9] for f in forecasts])  # [N, 9, H]
    med = qs[:, 4]
    assert ours["MAE"] == pytest.approx(np.abs(y - med).mean(), rel=1e-5)
    # RMSE[mean] of a quantile forecast scores its median, not the mean of the quantile levels.
    assert ours["RMSE"] == pytest.approx(np.sqrt(((y - med) ** 2).mean()), rel=1e-5)
    assert ours["RMSE"] != pytest.approx(np.sqrt(((y - qs.mean(1)) ** 2).mean()), rel=1e-7)
    levels = np.arange(1, 10)[None, :, None] / 10
    ql = 2 * np.abs((y[:, None] - qs) * ((y[:, None] <= qs) - levels))  # [N, 9, H]
    assert ours["CRPS"] == pytest.approx((ql.sum(axis=(0, 2)) / np.abs(y).sum()).mean(), rel=1e-5)
    # GluonTS's seasonal error: mean |y[t] - y[t - 24]| over each window's history.
    hist = [np.asarray(e["target"]) for e in split.test.input]
    scale = np.array([np.abs(t[24:] - t[:-24]).mean() for t in hist])  # [N]
    assert ours["MASE"] == pytest.approx((np.abs(y - med).mean(1) / scale).mean(), rel=1e-5)


def test_bad_input_messages(data, checkpoint, tmp_path):
    frames, splits, split = data
    errors = []
    with pytest.raises(CheckpointMismatchError, match="longer than the checkpoint's horizon") as e:
        load_predictor(checkpoint, prediction_length=H + 1)
    errors.append(e.value)

    predictor = load_predictor(checkpoint)
    entry = dict(next(iter(split.test.input)))
    no_past = {k: v for k, v in entry.items() if k != "past_feat_dynamic_real"}
    with pytest.raises(CheckpointMismatchError, match="0 past covariates") as e:
        list(predictor.predict([no_past]))
    errors.append(e.value)
    daily = {**entry, "start": entry["start"].asfreq("D")}
    with pytest.raises(CheckpointMismatchError, match="frequency 'D'") as e:
        list(predictor.predict([daily]))
    errors.append(e.value)

    other = make_synthetic(n_items=1, length=300, freq="h", n_past_covariates=2, seed=3)
    with pytest.raises(CheckpointMismatchError, match="past_cov_1") as e:
        check_schema(predictor, other[0].schema)
    errors.append(e.value)

    with pytest.raises(EvaluationSplitError, match="eval.windows <= 24") as e:
        make_eval_split(frames, H, 25)  # 25 x 24 = all 600 steps, nothing left to fit on
    errors.append(e.value)
    with pytest.raises(EvaluationSplitError, match="eval.windows must be >= 1") as e:
        make_eval_split(frames, H, 0)
    errors.append(e.value)
    # The CLI prints these as one line (no traceback): ValueErrors defined in tsfm_msa modules.
    assert all(isinstance(err, ValueError) and type(err).__module__.startswith("tsfm_msa") for err in errors)


def test_estimator_trains_in_gluonts(data, tmp_path):
    from tsfm_msa.evaluate.estimator import TSFMEstimator

    frames, splits, split = data
    estimator = TSFMEstimator(freq="h", prediction_length=H, context_length=C, model={**TINY, "attention": "dense"},
                              batch_size=8, num_batches_per_epoch=3,
                              trainer_kwargs={"max_steps": 3, "default_root_dir": str(tmp_path)})
    predictor = estimator.train(frames_to_gluonts(frames, [r.stop for r in splits.train]))
    forecasts = list(predictor.predict(split.test.input))
    assert len(forecasts) == len(split.test) and forecasts[0].forecast_array.shape == (9, H)
    assert np.isfinite(np.stack([f.forecast_array for f in forecasts])).all()


def test_evaluate_beats_seasonal_naive_on_known_function(tmp_path):
    """Target = season + 2 x a known-future AR(1) covariate: seasonal naive cannot know the covariate, a
    model that reads it must beat it. Runs the command's body end to end (dense only, tiny budget)."""
    from omegaconf import OmegaConf

    from tsfm_msa.evaluate.command import evaluate

    seed = int(np.random.default_rng().integers(1000))
    cfg = _compose([
        "data=synthetic", "eval=quick", "eval.models=[dense]", "eval.seeds=[0]", "eval.max_steps=100",
        "eval.plot_series=1", "eval.plot_windows=1", f"seed={seed}", f"data.context_len={C}", f"data.horizon={H}",
        "data.loader.n_items=1", "data.loader.length=1500", "data.loader.n_past_covariates=0",
        "data.loader.covariate_lag=0", "+data.loader.covariate_effect=2.0", "+data.loader.noise=0.05",
        "data.batch_size=16", "data.test_fraction=0.1",
    ])
    OmegaConf.update(cfg, "models.dense", {**TINY, "attention": "dense"}, merge=False)
    out = evaluate(cfg, tmp_path, "synthetic")
    table = out["table"].set_index("model")
    assert table.loc["seasonal_naive", "MASE_rel"] == pytest.approx(1.0)
    # Over 20 random data seeds at 80 steps the ratios were 0.70-0.92 (MASE) and 0.53-0.71 (CRPS).
    assert table.loc["dense", "MASE_rel"] < 1.0 and table.loc["dense", "CRPS_rel"] < 0.85
    for name in ("evaluation.csv", "evaluation.md", "evaluation_seeds.csv"):
        assert (tmp_path / name).is_file()
    assert out["plots"] and all(p.endswith(".png") for p in out["plots"])
    assert "tsfm-msa dense" in (tmp_path / "evaluation.md").read_text()


def test_evaluate_reports_each_target_of_a_two_target_csv(tmp_path):
    """Targets of very different scales (~5e3 and ~1e6): every model also gets one row per target, scored by
    GluonTS on that target's series only. The pooled CRPS (quantile loss over sum |target| of all series) is
    the |target|-weighted mean of the per-target ones, i.e. almost the large target's; the pooled MASE (scaled
    per series) is the plain mean of the per-target ones."""
    from tsfm_msa.evaluate.command import evaluate

    rng = np.random.default_rng(int(np.random.default_rng().integers(1000)))
    T, windows = 360, 2
    t = np.arange(T)
    day = np.sin(2 * np.pi * t / 24)
    df = pd.DataFrame({"ts": pd.date_range("2024-01-01", periods=T, freq="h").strftime("%Y-%m-%d %H:%M"),
                       "Leistung_kW": 5e3 + 1e3 * day + rng.normal(0, 200, T),
                       "Umsatz": 1e6 - 2e5 * day + rng.normal(0, 5e4, T)})
    path = tmp_path / "plant.csv"
    df.to_csv(path, index=False)
    cfg = _compose(["data=csv", f"data.loader.path={path}", "data.loader.timestamp=ts",
                    "data.loader.targets=[Leistung_kW,Umsatz]", "eval=quick", "eval.models=[dense]",
                    "eval.seeds=[0]", "eval.max_steps=3", f"eval.windows={windows}", "eval.plot_series=0",
                    "eval.plot_windows=0", f"data.context_len={C}", f"data.horizon={H}", "data.batch_size=8"])
    from omegaconf import OmegaConf

    OmegaConf.update(cfg, "models.dense", {**TINY, "attention": "dense"}, merge=False)
    out = evaluate(cfg, tmp_path / "run", "plant")
    names = ["Leistung_kW", "Umsatz"]
    per = {(r["model"], r["target"]): r for r in out["target_rows"]}
    assert sorted(per) == [(m, n) for m in ("dense", "seasonal_naive") for n in names]
    assert all(np.isfinite(r[k]) for r in per.values() for k in ("MASE", "CRPS", "MAE", "RMSE", "MASE_rel", "CRPS_rel"))
    assert all(per[("seasonal_naive", n)]["CRPS_rel"] == pytest.approx(1.0) for n in names)
    # Weights of the pooled CRPS: sum |target| over the test windows (the last windows x H steps).
    weight = {n: float(np.abs(df[n].to_numpy()[-windows * H:]).sum()) for n in names}
    assert weight["Umsatz"] > 100 * weight["Leistung_kW"]
    for row in out["rows"]:
        small, large = per[(row["model"], names[0])], per[(row["model"], names[1])]
        pooled = (small["CRPS"] * weight[names[0]] + large["CRPS"] * weight[names[1]]) / sum(weight.values())
        assert row["CRPS"] == pytest.approx(pooled, rel=1e-4)
        assert abs(row["CRPS"] - large["CRPS"]) <= 0.01 * abs(small["CRPS"] - large["CRPS"]) + 1e-12
        assert row["MASE"] == pytest.approx((small["MASE"] + large["MASE"]) / 2, rel=1e-4)
    run = tmp_path / "run"
    record = json.loads((run / "evaluation.json").read_text())
    assert [r["target"] for r in record["target_rows"]] == [r["target"] for r in out["target_rows"]]
    assert all("target" not in r for r in record["rows"])  # the pooled rows stay as they were
    text = (run / "evaluation.md").read_text()
    assert "## Per target" in text and "dominated by the largest-scale target" in text
    assert "These checks use the pooled metrics of all targets" in text.split("## Goals")[1]
    assert "| plant | Umsatz | tsfm-msa dense |" in text
    assert len(pd.read_csv(run / "evaluation_targets.csv")) == 4
    from tsfm_msa.evaluate.collect import collect

    collect(tmp_path / "out" / "c", [run])  # a collected report keeps the per-target table
    assert "| plant | Umsatz | tsfm-msa dense |" in (tmp_path / "out" / "c-evaluation-plant.md").read_text()


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_module

    with initialize_config_module("tsfm_msa.configs", version_base=None):
        return compose("evaluate", overrides=overrides)


def test_evaluate_existing_checkpoint_only(tmp_path, checkpoint):
    """`checkpoint=...` evaluates that model and seasonal naive only; a mismatching data config is refused."""
    from tsfm_msa.evaluate.command import evaluate

    base = ["data=synthetic", f"data.context_len={C}", f"data.horizon={H}", "data.loader.length=700",
            "eval.plot_series=1", "eval.plot_windows=1", f"checkpoint={checkpoint}"]
    out = evaluate(_compose(base), tmp_path / "ok", "synthetic")
    assert [r["model"] for r in out["rows"]] == ["seasonal_naive", "checkpoint"]
    assert np.isfinite(out["rows"][1]["CRPS"]) and out["rows"][1]["params"] > 0
    text = (tmp_path / "ok" / "evaluation.md").read_text()
    assert f"is scored as it was trained (no refit; its own context of {C} steps)" in text
    assert "Every learned model fits" not in text  # the refit protocol is not what ran
    # One target: no per-target rows, table or file (the output is as before).
    assert "target_rows" not in out and "## Per target" not in text
    assert not (tmp_path / "ok" / "evaluation_targets.csv").exists()
    assert "target_rows" not in json.loads((tmp_path / "ok" / "evaluation.json").read_text())
    with pytest.raises(CheckpointMismatchError, match="past_cov_1"):
        evaluate(_compose(base + ["data.loader.n_past_covariates=2", "data.loader.covariate_lag=0"]),
                 tmp_path / "bad", "synthetic")


def test_seasonal_naive_and_zscore(data):
    frames, splits, split = data
    z = standardize_covariates(frames, split.train_stops)
    for f, fz, stop in zip(frames, z, split.train_stops):
        np.testing.assert_array_equal(f.values[:, 0], fz.values[:, 0])  # target untouched
        cov = fz.values[:stop, 1:]
        np.testing.assert_allclose(cov.mean(0), 0, atol=1e-4)
        np.testing.assert_allclose(cov.std(0), 1, atol=1e-3)
    # Missing covariate values (the GluonTS models take none) become the fitting part's mean; targets keep theirs.
    values = frames[0].values.copy()
    values[[3, 50], 1] = np.nan
    values[7, 0] = np.nan
    holes = [SeriesFrame(frames[0].item_id, frames[0].timestamps, values, frames[0].schema)]
    zh = standardize_covariates(holes, split.train_stops[:1])[0].values
    assert not np.isnan(zh[:, 1:]).any() and zh[3, 1] == zh[50, 1] == 0.0 and np.isnan(zh[7, 0])
    forecasts = list(baselines.seasonal_naive(H, 24).predict(split.test.input))
    e = next(iter(split.test.input))
    np.testing.assert_allclose(forecasts[0].quantile(0.5), np.asarray(e["target"])[-24:])
    entry = next(iter(frames_to_gluonts(frames)))
    T = frames[0].length
    assert entry["target"].shape == (T,) and entry["past_feat_dynamic_real"].shape == (1, T)
    np.testing.assert_array_equal(entry["feat_dynamic_real"][0], frames[0].column("future_cov_0"))
    assert entry["start"].freqstr == "h" and entry["item_id"] == frames[0].item_id


def test_multi_target_forecasts_split_per_target(tmp_path):
    """Two targets: our joint forecasts ([K, H, 2]) are split into per-target series in the order of the
    univariate test windows that the GluonTS models and the metrics use."""

    from tsfm_msa.evaluate.gluonts_data import split_targets

    frames = _two_target_frames(np.random.default_rng())
    split = make_eval_split(frames, H, 4)
    module = ForecastModule({**TINY, "attention": "dense"}, frames[0].schema.to_dict(), C, H)
    joint = list(predictor_from_module(module).predict(split.test.input))
    assert joint[0].forecast_array.shape == (9, H, 2)
    uni = split_targets(joint, len(frames), split.windows, ["a", "b"])
    labels = list(split.uni_test.label)
    assert len(uni) == len(labels) == 2 * split.windows
    assert [f.item_id for f in uni] == [lab["item_id"] for lab in labels]
    assert all(f.start_date == lab["start"] for f, lab in zip(uni, labels))
    np.testing.assert_array_equal(uni[split.windows + 1].forecast_array, joint[1].forecast_array[:, :, 1])
    scores = score_forecasts(uni, split.uni_test, "h")
    assert all(np.isfinite(v) for v in scores.values())
    # Per-target item ids ("0/a") must still give plain plot file names.
    from tsfm_msa.evaluate.report import plot_forecasts

    plots = plot_forecasts(split.uni_test, {"dense": uni}, tmp_path, n_series=2, n_windows=1)
    assert len(plots) == 2 and all((tmp_path / p.split("/")[-1]).is_file() for p in plots)


def test_windows_end_at_the_series_end_and_keep_the_last_n(data):
    """GIFT-Eval layout: the last window ends at each series' last step; windows=N keeps the last N;
    everything before the first window is the fitting part."""
    frames, _, split = data
    labels, inputs = list(split.uni_test.label), list(split.uni_test.input)
    assert split.windows == W and len(labels) == W * len(frames) and split.test_length == W * H
    for i, f in enumerate(frames):
        last = labels[(i + 1) * W - 1]
        assert last["start"].to_timestamp() + (H - 1) * pd.Timedelta(hours=1) == f.timestamps[-1]
        np.testing.assert_array_equal(last["target"], f.values[-H:, 0])
        first = inputs[i * W]
        assert len(first["target"]) == f.length - W * H == split.train_stops[i]
    fewer = make_eval_split(frames, H, 2)
    kept = [lab["start"] for lab in fewer.uni_test.label]
    assert kept == [lab["start"] for k, lab in enumerate(labels) if k % W >= W - 2]
    assert [len(e["target"]) for e in split.train] == split.train_stops
    overlapping = make_eval_split(frames, H, 3, distance=H // 2)
    assert overlapping.test_length == 2 * (H // 2) + H
    assert list(overlapping.uni_test.label)[2]["target"][-1] == frames[0].values[-1, 0]


def test_default_windows_follow_the_data_config_and_gift_eval():
    from tsfm_msa.evaluate.command import default_windows

    cfg = _compose(["data=vic_elec"])
    assert default_windows(cfg, 52608, 48, 48) == 20  # data.test_length 960 = 20 x 48
    assert default_windows(_compose(["data=epf"]), 16080, 24, 24) == 14
    assert default_windows(_compose(["data=vic_elec", "eval.windows=3"]), 52608, 48, 48) == 3
    csv_like = _compose(["data=synthetic"])
    assert csv_like.data.get("test_length") is None
    assert default_windows(csv_like, 3000, 24, 24) == gift_eval_windows(3000, 24) == 13  # ceil(300 / 24)
    assert gift_eval_windows(52608, 48) == 20 and gift_eval_windows(30, 48) == 1


def test_our_models_fit_before_the_first_test_window():
    from tsfm_msa.evaluate.command import fitting_datamodule

    cfg = _compose(["data=synthetic", f"data.context_len={C}", f"data.horizon={H}", "data.loader.length=600"])
    dm = fitting_datamodule(cfg, make_eval_split(dm_frames(cfg), H, W), seed=0)
    assert [r.stop for r in dm.splits.train] == [f.length - W * H for f in dm.frames]
    assert all(len(r) == 0 for r in dm.splits.val) and dm.val_dataloader() == []


def dm_frames(cfg):
    import hydra

    dm = hydra.utils.instantiate(cfg.data, _convert_="all")
    dm.setup("fit")
    return dm.frames


def test_gluonts_baselines_keep_final_weights_and_our_context(data, tmp_path, monkeypatch):
    """Final weights, not GluonTS's reload of its best-train-loss checkpoint: that reload is made to return
    zeros here, so a predictor that kept it would hold zeros instead of the trained weights."""
    import gluonts.torch.model.estimator as gluonts_estimator

    real_load = torch.load
    reloaded = []

    def zeroed_best(path, *args, **kwargs):
        state = real_load(path, *args, **kwargs)
        state["state_dict"] = {k: torch.zeros_like(v) for k, v in state["state_dict"].items()}
        reloaded.append(path)
        return state

    monkeypatch.setattr(gluonts_estimator.torch, "load", zeroed_best)
    captured = []
    monkeypatch.setattr(baselines.FinalWeights, "on_train_end",
                        lambda self, trainer, module: (captured.append(trainer.global_step),
                                                       setattr(self, "state", {k: v.detach().clone() for k, v in
                                                                               module.state_dict().items()})))
    frames, _, split = data
    zsplit = make_eval_split(standardize_covariates(frames, split.train_stops), H, W)
    predictor = baselines.train_deepar(zsplit.train, "h", H, 1, context_length=C, max_steps=5, batch_size=8,
                                       seed=int(np.random.default_rng().integers(1000)), root_dir=tmp_path,
                                       num_batches_per_epoch=2, num_layers=1, hidden_size=8)
    assert reloaded and captured == [5]  # GluonTS did reload its checkpoint; training ran the 5 steps
    assert predictor.prediction_net.model.context_length == C
    weights = [v for v in predictor.prediction_net.state_dict().values() if v.is_floating_point()]
    assert any(v.abs().sum() > 0 for v in weights)


def test_tft_reads_past_only_covariates(data, tmp_path):
    frames, _, split = data
    zsplit = make_eval_split(standardize_covariates(frames, split.train_stops), H, W)
    predictor = baselines.train_tft(zsplit.train, "h", H, 1, 1, context_length=C, max_steps=3, batch_size=8,
                                    seed=int(np.random.default_rng().integers(1000)), root_dir=tmp_path,
                                    num_batches_per_epoch=3, hidden_dim=8, variable_dim=8, num_heads=2)
    entry = dict(next(iter(zsplit.uni_test.input)))
    rng = np.random.default_rng()
    noise = rng.normal(size=entry["past_feat_dynamic_real"].shape).astype(np.float32) * 3
    shuffled = {**entry, "past_feat_dynamic_real": noise}
    a, b = (next(iter(predictor.predict([e]))) for e in (entry, shuffled))
    assert a.forecast_array.shape == b.forecast_array.shape and not np.allclose(a.forecast_array, b.forecast_array)
    assert "past-only" in baselines.INPUTS["tft"] and "no past-only" in baselines.INPUTS["deepar"]


def test_geometric_mean_summary_and_collect(tmp_path):
    import json

    from tsfm_msa.evaluate.collect import CollectError, collect
    from tsfm_msa.evaluate.report import geometric_mean_table, write_report

    rng = np.random.default_rng()
    a, b = rng.uniform(0.3, 0.9), rng.uniform(1.1, 3.0)
    runs = []
    for dataset, ratio in (("one", a), ("two", b)):
        rows = [{"dataset": dataset, "model": m, "seed": s, "MASE": r, "CRPS": r / 2, "MAE": 1.0, "RMSE": 1.0,
                 "MASE_rel": r, "CRPS_rel": r, "train_seconds": 0.0, "steps": 1, "params": 1, "peak_mb": 1.0,
                 "delta_mb": 0.0, "predict_seconds": 0.0, "inputs": "target only"}
                for m, r, s in (("seasonal_naive", 1.0, 0), ("dense", ratio, 0), ("dense", ratio, 1))]
        run = tmp_path / dataset
        run.mkdir()
        setting = {"windows": 2, "distance": H, "test_length": 2 * H, "prediction_length": H, "season": 24,
                   "freq": "h", "max_steps": 1, "batch_size": 1, "context_len": C, "seeds": [0, 1],
                   "baseline_seeds": [0, 1]}
        write_report(rows, run, dataset, setting)
        (run / "evaluation.json").write_text(json.dumps({"setting": setting, "rows": rows}))
        runs.append(run)
    summary = collect(tmp_path / "out" / "2026-12-01", runs).set_index("model")
    assert summary.loc["dense", "MASE_rel_geomean"] == pytest.approx(np.sqrt(a * b))
    assert summary.loc["seasonal_naive", "CRPS_rel_geomean"] == pytest.approx(1.0)
    seeds = pd.read_csv(tmp_path / "out" / "2026-12-01-evaluation_seeds.csv")
    assert len(seeds) == 6 and set(seeds["dataset"]) == {"one", "two"}
    for name in ("evaluation-one.md", "evaluation-two.csv", "evaluation-summary.md"):
        assert (tmp_path / "out" / f"2026-12-01-{name}").is_file()
    assert "target only" in (tmp_path / "one" / "evaluation.md").read_text()
    assert geometric_mean_table(pd.read_csv(runs[0] / "evaluation.csv")).loc[1, "datasets"] == 1
    with pytest.raises(CollectError, match="lacks"):
        collect(tmp_path / "x", [tmp_path / "out"])


def test_collect_merges_folders_of_one_dataset(tmp_path):
    """Parallel processes (one per seed) write one folder each: collect merges them, seasonal naive once."""
    import json

    from tsfm_msa.evaluate.collect import collect
    from tsfm_msa.evaluate.report import write_report

    ratios = np.random.default_rng().uniform(0.5, 1.5, size=2)
    runs = []
    for seed, ratio in enumerate(ratios):
        rows = [{"dataset": "one", "model": m, "seed": s, "MASE": r, "CRPS": r / 2, "MAE": 1.0, "RMSE": 1.0,
                 "MASE_rel": r, "CRPS_rel": r, "train_seconds": 0.0, "steps": 1, "params": 1, "peak_mb": 1.0,
                 "delta_mb": 0.0, "predict_seconds": 0.0, "inputs": "target only"}
                for m, r, s in (("seasonal_naive", 1.0, 0), ("msa", ratio, seed))]
        setting = {"windows": 2, "distance": H, "test_length": 2 * H, "prediction_length": H, "season": 24,
                   "freq": "h", "max_steps": 1, "batch_size": 1, "context_len": C, "seeds": [seed],
                   "baseline_seeds": [seed], "accelerator": "gpu", "device_name": "NVIDIA H200"}
        run = tmp_path / f"one-seed{seed}"
        run.mkdir()
        write_report(rows, run, "one", setting)
        (run / "evaluation.json").write_text(json.dumps({"setting": setting, "rows": rows}))
        runs.append(run)
    collect(tmp_path / "out" / "d", runs)
    seeds = pd.read_csv(tmp_path / "out" / "d-evaluation_seeds.csv")
    assert sorted(seeds["model"]) == ["msa", "msa", "seasonal_naive"]
    table = pd.read_csv(tmp_path / "out" / "d-evaluation-one.csv").set_index("model")
    assert table.loc["msa", "MASE_rel"] == pytest.approx(ratios.mean())
    text = (tmp_path / "out" / "d-evaluation-one.md").read_text()
    assert "Seeds [0, 1] (ours)" in text and "trained on NVIDIA H200" in text



@pytest.mark.parametrize("attention", ["dense", "msa"])
def test_streaming_evaluation_equals_re_encoding_the_same_windows(attention):
    """eval.streaming: the test windows of every series from one StreamingForecaster pass equal a full
    re-encoding of the same (growing) windows, and come out in the predictor's order and format."""

    from tsfm_msa.evaluate.command import EvaluateConfigError, streamed_forecasts
    from tsfm_msa.evaluate.gluonts_data import split_targets
    from tsfm_msa.streaming import rolling_forecasts

    frames = _two_target_frames(np.random.default_rng(3))
    T = frames[0].length
    split = make_eval_split(frames, H, 4)
    module = ForecastModule({**TINY, "attention": attention}, frames[0].schema.to_dict(), C, H).eval()
    streamed = streamed_forecasts(module, frames, split, C)
    joint = list(predictor_from_module(module).predict(split.test.input))
    assert len(streamed) == len(joint) == split.windows
    for s, j in zip(streamed, joint):
        assert s.start_date == j.start_date and s.item_id == j.item_id
        assert s.forecast_array.shape == j.forecast_array.shape and s.forecast_keys == j.forecast_keys
    first = T + split.offset
    origins = [first + w * split.distance for w in range(split.windows)]
    windowed = rolling_forecasts(module, frames[0].values, origins, schema=frames[0].schema, horizon=H,
                                 start=first - C, mode="windowed")
    expected = windowed.quantiles.permute(0, 3, 2, 1).numpy()  # [W, Q, h, T]
    np.testing.assert_allclose(np.stack([f.forecast_array for f in streamed]), expected, rtol=1e-4, atol=1e-4)
    uni = split_targets(streamed, len(frames), split.windows, ["a", "b"])
    assert all(np.isfinite(v) for v in score_forecasts(uni, split.uni_test, "h").values())
    with pytest.raises(EvaluateConfigError, match="model.patch_len"):
        streamed_forecasts(module, frames, split, C + 1)


def _two_target_frames(rng: np.random.Generator, T: int = 400) -> list:
    """One hourly series with two daily-cycle targets (a, b) and a known-future covariate x."""
    import pandas as pd

    from tsfm_msa.datasets import from_pandas

    t = np.arange(T)
    df = pd.DataFrame({"ts": pd.date_range("2021-01-01", periods=T, freq="h"),
                       "a": np.sin(2 * np.pi * t / 24) + rng.normal(0, 0.1, T) + 5,
                       "b": np.cos(2 * np.pi * t / 24) + rng.normal(0, 0.1, T) - 3,
                       "x": rng.normal(size=T)})
    return from_pandas(df, timestamp="ts", targets=["a", "b"], future_covariates=["x"], freq="h")


def test_context_curriculum_trains_short_windows_first_within_the_budget(tmp_path):
    """eval.context_curriculum: the stages' steps count in eval.max_steps, a short stage with fewer KV
    blocks than top_k attends to all of them, and the model's top_k and LR horizon come back."""
    import hydra

    from tsfm_msa.evaluate.command import train_ours
    from tsfm_msa.evaluate.run_measures import window_layout

    context = 256
    cfg = _compose(["data=synthetic", "eval=quick", f"data.context_len={context}", f"data.horizon={H}",
                    "data.loader.length=900", "eval.max_steps=5", "indexer_warmup.steps=1", "models.msa.top_k=6",
                    "eval.context_curriculum=[{context_len:64,steps:2}]"])
    dm = hydra.utils.instantiate(cfg.data, _convert_="all")
    dm.setup("fit")
    model_cfg = dict(cfg.models.msa)
    short, full = (window_layout(dm.schema, model_cfg, n, H) for n in (64, context))
    assert short.n_blocks < 6 <= full.n_blocks  # the short stage needs the cap, the full context does not
    module, facts = train_ours(cfg, "msa", 0, make_eval_split(dm.frames, H, W), tmp_path, dm.schema)
    assert facts["steps"] == 5 and facts["context_curriculum"] == [{"context_len": 64, "steps": 2},
                                                                     {"context_len": context, "steps": 3}]
    assert all(layer.attention.top_k == 6 for layer in module.model.layers)
    assert module.hparams.max_steps == 5 and module.hparams.context_len == context


@pytest.mark.parametrize("curriculum, message", [
    ([{"context_len": 32}], "give each stage as"),
    ([{"context_len": 32, "steps": 0}], "positive integers"),
    ([{"context_len": 64, "steps": 2}], "stay below data.context_len"),
    ([{"context_len": 32, "steps": 2}, {"context_len": 16, "steps": 2}], "must grow"),
    ([{"context_len": 32, "steps": 10}], "leave steps for the full context"),
])
def test_context_curriculum_refuses_bad_stages(curriculum, message):
    from tsfm_msa.evaluate.command import EvaluateConfigError, context_stages

    assert context_stages(None, 64, 10) == [(64, 10)]
    assert context_stages({"context_len": 16, "steps": 4}, 64, 10) == [(16, 4), (64, 6)]
    with pytest.raises(EvaluateConfigError, match=message):
        context_stages(curriculum, 64, 10)


def test_an_msa_row_that_never_routes_sparsely_is_named(tmp_path, capsys):
    """eval.max_steps at or under indexer_warmup.steps: the MSA row is dense attention; the console says so."""
    from tsfm_msa.evaluate.command import evaluate

    cfg = _compose(["data=synthetic", "eval=quick", "eval.models=[msa]", "eval.seeds=[0]", "eval.max_steps=2",
                    "indexer_warmup.steps=100", "eval.plot_series=0", "eval.plot_windows=0", f"data.context_len={C}",
                    f"data.horizon={H}", "data.loader.length=600", "models.msa.top_k=2"])
    evaluate(cfg, tmp_path, "synthetic")
    assert "indexer_warmup.steps=100 >= the 2 training steps at the full context: ['msa'] never route" in \
        capsys.readouterr().out


def test_a_run_folder_is_a_checkpoint_and_a_mismatch_names_the_training_data(tmp_path, checkpoint):
    """`checkpoint=<run folder>` takes its best (else last) checkpoint; a mismatch names the data overrides
    the run was trained with (evaluate reads the data from its own overrides, not from the checkpoint)."""
    import os
    import shutil
    import time

    from tsfm_msa.evaluate.predictor import checkpoint_file

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / ".hydra").mkdir()
    shutil.copy(checkpoint, run / "checkpoints" / "last.ckpt")
    assert checkpoint_file(run) == run / "checkpoints" / "last.ckpt"
    shutil.copy(checkpoint, run / "checkpoints" / "best-step2.ckpt")
    assert checkpoint_file(run) == run / "checkpoints" / "best-step2.ckpt"
    newer = run / "checkpoints" / "best-step10.ckpt"  # sorts before best-step2 by name, written later
    shutil.copy(checkpoint, newer)
    os.utime(newer, (time.time() + 5, time.time() + 5))
    assert checkpoint_file(run) == newer
    (run / ".hydra" / "overrides.yaml").write_text("- data=csv\n- data.loader.path=plant.csv\n- trainer.max_steps=5\n")
    with pytest.raises(CheckpointMismatchError, match=r"longer than the checkpoint's horizon.*trained with data=csv "
                                                      r"data.loader.path=plant.csv \(.*overrides.yaml\): pass the same"):
        load_predictor(run, prediction_length=H + 1)
    with pytest.raises(FileNotFoundError, match="folder without checkpoints"):
        checkpoint_file(tmp_path / "run" / ".hydra")


def test_test_windows_without_observed_target_values_are_refused():
    """Every model would score NaN (MASE nan, CRPS nan) on windows where the target is never observed."""
    frames = _frames(seed=5, n_items=1)
    df = frames[0].to_dataframe().copy()  # a writable copy of the frame's read-only values
    df.loc[len(df) - 2 * H:, frames[0].schema.names[0]] = np.nan
    target = frames[0].schema.names[0]
    kept = SeriesFrame.from_dataframe(df, timestamp="timestamp", targets=[target],
                                      past_covariates=list(frames[0].schema.names[1:2]),
                                      future_covariates=list(frames[0].schema.names[2:]))
    with pytest.raises(EvaluationSplitError) as err:
        make_eval_split([kept], H, 2)
    message = str(err.value)
    assert "\n" not in message and f"target {target!r} has no observed value in the test windows" in message
    assert "eval.windows" in message
    assert make_eval_split([kept], H, 3).windows == 3  # a window with observed values: scored as usual


def test_evaluate_progress_bars_follow_the_terminal(tmp_path, checkpoint, monkeypatch, capsys):
    """Like training: bars in a terminal, none when the output goes to a file (trainer.enable_progress_bar null)."""
    from tsfm_msa.evaluate.command import evaluate

    base = ["data=synthetic", f"data.context_len={C}", f"data.horizon={H}", "data.loader.length=700",
            "eval.plot_series=0", f"checkpoint={checkpoint}"]
    assert _compose(base).trainer.enable_progress_bar is None
    for tty in (False, True):
        monkeypatch.setattr("sys.stdout.isatty", lambda tty=tty: tty)
        evaluate(_compose(base), tmp_path / f"tty{tty}", "synthetic")
        captured = capsys.readouterr()
        assert ("models [synthetic]" in captured.err) is tty, captured.err
        assert not re.search(r"\d+it \[", captured.err), captured.err  # GluonTS's unlabeled scoring counter
        assert "checkpoint seed 0: MASE" in captured.out  # the results are printed either way
