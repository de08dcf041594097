"""Training: phase switch, loss goes down, CLI end to end, checkpoints, clear errors."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import lightning as L
import pytest
import torch

from tsfm_msa.cli import main
from tsfm_msa.datasets import SeriesDataModule, make_synthetic
from tsfm_msa.train.lightning_module import ForecastModule
from tsfm_msa.train.optim import decay_param_groups
from tsfm_msa.train.schedule import PhaseSchedule, cosine_with_warmup

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = {"_target_": "tsfm_msa.model.transformer.PatchTransformer", "attention": "msa", "patch_len": 8,
              "d_model": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "head_dim": 8, "block_size": 8,
              "top_k": 2, "index_dim": 8}
# Small, fast settings for the CLI on the synthetic data.
FAST = ["data=synthetic", "data.context_len=64", "data.horizon=16", "data.batch_size=16",
        "data.train_samples_per_epoch=320", "data.loader.length=800", "data.loader.n_items=1",
        # A strong trend: learnable within a few dozen steps, so a working loop must cut the loss.
        "+data.loader.trend=50.0", "+data.loader.seasonal_amplitude=0.5", "+data.loader.covariate_effect=0.0",
        "model.patch_len=8", "model.d_model=32", "model.n_layers=1", "model.top_k=2",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


def test_phase_schedule():
    steps = PhaseSchedule(steps=3)
    assert [steps.phase(s, 0) for s in range(5)] == ["indexer_warmup"] * 3 + ["sparse"] * 2
    tokens = PhaseSchedule(tokens=1000)
    assert tokens.phase(10, 999) == "indexer_warmup" and tokens.phase(0, 1000) == "sparse"
    assert PhaseSchedule(steps=0).phase(0, 0) == "sparse"
    with pytest.raises(ValueError, match="indexer_warmup.steps"):
        PhaseSchedule(steps=-1)


def test_cosine_schedule_shape():
    values = [cosine_with_warmup(s, 10, 100, 0.1) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[-1] == pytest.approx(0.1, abs=0.01) and all(a >= b for a, b in zip(values[10:], values[11:]))


def test_weight_decay_only_on_linear_weights():
    module = ForecastModule(TINY_MODEL, _schema(), 64, 16)
    decay, no_decay = decay_param_groups(module.model, 0.1)
    decay_ids = {id(p) for p in decay["params"]}
    for name, p in module.model.named_parameters():
        is_linear_weight = name.endswith("weight") and "norm" not in name and "embed" not in name
        assert (id(p) in decay_ids) == is_linear_weight, name


def _schema() -> dict:
    return make_synthetic(n_items=1, length=400, seed=0)[0].schema.to_dict()


class _PhaseRecorder(L.Callback):
    def __init__(self) -> None:
        self.phases: list[str] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.phases.append(pl_module.current_phase())


def test_warmup_switches_to_sparse_at_the_configured_step(tmp_path):
    frames = make_synthetic(n_items=1, length=600, seed=1)
    dm = SeriesDataModule(frames=frames, context_len=64, horizon=16, train_samples_per_epoch=64, batch_size=8)
    module = ForecastModule(TINY_MODEL, frames[0].schema.to_dict(), 64, 16, indexer_warmup={"steps": 3}, max_steps=6)
    recorder = _PhaseRecorder()
    trainer = L.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[recorder], default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    assert recorder.phases == ["indexer_warmup"] * 3 + ["sparse"] * 3


def _read_metric(path: Path, key: str) -> list[float]:
    with open(path) as fh:
        return [float(row[key]) for row in csv.DictReader(fh) if row.get(key)]


def test_cli_train_reduces_loss_and_writes_outputs(tmp_path, capsys):
    run_dir = tmp_path / "run"
    main(["train", *FAST, "trainer.max_steps=60", "trainer.val_check_interval=30", "indexer_warmup.steps=20",
          "optim.warmup_steps=5", "trainer.log_every_n_steps=1", f"hydra.run.dir={run_dir}"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert Path(summary["best_checkpoint"]).exists() and (run_dir / "checkpoints" / "last.ckpt").exists()
    # The printed path pastes as checkpoint=<path>: no "=" in it (Hydra's override grammar).
    assert "=" not in Path(summary["best_checkpoint"]).name and Path(summary["best_checkpoint"]).name.startswith("best-step")
    assert (run_dir / "summary.md").read_text().startswith("# Training run")
    losses = _read_metric(run_dir / "logs" / "metrics.csv", "train/forecast_loss")
    assert len(losses) == 60
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:3]) / 3, losses
    assert "seasonal naive" in capsys.readouterr().out
    # The checkpoint rebuilds the model on its own and reproduces its forecasts.
    last = summary["last_checkpoint"]
    module = ForecastModule.load_from_checkpoint(last).eval()
    assert module.model.has_msa and module.hparams.context_len == 64
    state = torch.load(last, map_location="cpu", weights_only=False)["state_dict"]
    again = ForecastModule(**{k: module.hparams[k] for k in module.hparams}).eval()
    assert not torch.equal(again.state_dict()["model.head.weight"], state["model.head.weight"])  # fresh init differs
    again.load_state_dict(state)
    batch = _random_window_batch(module)
    with torch.no_grad():
        expected = module(batch).quantiles
        torch.testing.assert_close(again(batch).quantiles, expected, rtol=0, atol=0)
    assert torch.isfinite(expected).all() and expected.std() > 0


def _random_window_batch(module: ForecastModule) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    n_var = len(module.hparams.schema["variates"])
    context, horizon = module.hparams.context_len, module.hparams.horizon
    return {"context": torch.randn(4, context, n_var, generator=g), "context_mask": torch.ones(4, context, n_var, dtype=torch.bool),
            "horizon": torch.randn(4, horizon, n_var, generator=g), "horizon_mask": torch.ones(4, horizon, n_var, dtype=torch.bool),
            "loc": torch.randn(4, n_var, generator=g), "scale": torch.rand(4, n_var, generator=g) + 0.5}


def test_default_optim_equals_train_config():
    from omegaconf import OmegaConf

    from tsfm_msa.train.lightning_module import DEFAULT_OPTIM

    optim = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "train.yaml").optim)
    assert {**optim, "betas": tuple(optim["betas"])} == DEFAULT_OPTIM


class _StatsRecorder(L.Callback):
    def __init__(self) -> None:
        self.collected: list[bool] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.collected.append(pl_module.model.layers[0].attention.collect_stats)


def test_selection_stats_only_on_logging_steps(tmp_path):
    frames = make_synthetic(n_items=1, length=600, seed=2)
    dm = SeriesDataModule(frames=frames, context_len=64, horizon=16, train_samples_per_epoch=64, batch_size=8, seed=2)
    recorder = _StatsRecorder()
    module = ForecastModule(TINY_MODEL, frames[0].schema.to_dict(), 64, 16, indexer_warmup={"steps": 0}, max_steps=6,
                            stats_every_n_steps=3)
    trainer = L.Trainer(max_steps=6, accelerator="cpu", logger=L.pytorch.loggers.CSVLogger(tmp_path, name="", version=""),
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=1, val_check_interval=4, check_val_every_n_epoch=None, log_every_n_steps=1,
                        callbacks=[recorder], default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    assert recorder.collected == [False, False, True, False, False, True]
    with open(tmp_path / "metrics.csv") as fh:
        steps = [int(row["step"]) for row in csv.DictReader(fh) if row.get("train/support_frac")]
    assert steps == [2, 5]  # computed and logged on those steps only, never repeated in between
    with open(tmp_path / "metrics.csv") as fh:
        assert any(row.get("val/support_frac") for row in csv.DictReader(fh))  # validation always collects
    with pytest.raises(ValueError, match="stats_every_n_steps"):
        ForecastModule(TINY_MODEL, frames[0].schema.to_dict(), 64, 16, stats_every_n_steps=0)


def _cli_error(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(["train", *args])
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_cli_names_unknown_and_missing_options(tmp_path, capsys):
    err = _cli_error(["data.context_length=168"], capsys)
    assert "unknown option data.context_length; did you mean data.context_len" in err and "+data" not in err
    err = _cli_error(["model.topk=3"], capsys)
    assert "did you mean model.top_k?" in err
    err = _cli_error(["data=csv", "data.loader.timestamp=ts", "data.loader.targets=[x]",
                      f"hydra.run.dir={tmp_path / 'm'}"], capsys)
    assert "missing required setting(s) data.loader.path" in err and "Traceback" not in err


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    err = _cli_error([*FAST, "model.top_k=500", f"hydra.run.dir={tmp_path / 'a'}"], capsys)
    assert "top_k=500 is larger than the number of KV blocks" in err and "Traceback" not in err
    err = _cli_error([*FAST, "model.group_policy=sensor", f"hydra.run.dir={tmp_path / 'b'}"], capsys)
    assert "must equal the number of sensor groups" in err and "model.n_heads" in err
    csv_path = tmp_path / "data.csv"
    csv_path.write_text("date,load\n2024-01-01,1\n2024-01-02,2\n")
    err = _cli_error(["data=csv", f"data.loader.path={csv_path}", "data.loader.timestamp=date",
                      "data.loader.targets=[demand]", f"hydra.run.dir={tmp_path / 'c'}"], capsys)
    assert "demand" in err and "load" in err
    err = _cli_error(["data=csv", f"data.loader.path={tmp_path / 'missing.csv'}", "data.loader.timestamp=date",
                      "data.loader.targets=[load]", f"hydra.run.dir={tmp_path / 'd'}"], capsys)
    assert "missing.csv" in err
    err = _cli_error([*FAST, "trainer.max_steps=0", f"hydra.run.dir={tmp_path / 'e'}"], capsys)
    assert "trainer.max_steps must be a positive integer" in err


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = re.findall(r"```bash\n(python3 -m venv .*?)\n```", readme)
    assert len(commands) == 2, "README must open with exactly two set-up commands"
    test_command = commands[1].split("&& ", 2)[2]  # after venv creation and activation
    assert test_command in ci


def test_dense_checkpoint_converts_to_msa(tmp_path, capsys):
    dense_dir, msa_dir = tmp_path / "dense", tmp_path / "msa"
    dense_fast = [o for o in FAST if not o.startswith("model.top_k")]  # dense_small has no MSA keys
    main(["train", *dense_fast, "model=dense_small", "model.patch_len=8", "trainer.max_steps=4",
          "trainer.val_check_interval=4", f"hydra.run.dir={dense_dir}"])
    dense_ckpt = dense_dir / "checkpoints" / "last.ckpt"
    main(["train", *FAST, "trainer.max_steps=4", "trainer.val_check_interval=4", f"init_from={dense_ckpt}",
          f"hydra.run.dir={msa_dir}"])
    dense = torch.load(dense_ckpt, map_location="cpu", weights_only=False)["state_dict"]
    msa = ForecastModule.load_from_checkpoint(msa_dir / "checkpoints" / "last.ckpt")
    assert msa.model.has_msa
    assert set(dense) < set(msa.state_dict())
    err = _cli_error([*FAST, "model.head_dim=4", f"init_from={dense_ckpt}", f"hydra.run.dir={tmp_path / 'x'}"], capsys)
    assert "does not fit this model" in err


def test_out_of_memory_names_the_settings_to_lower(monkeypatch, capsys, tmp_path):
    import tsfm_msa.cli as cli

    def exhausted(cfg):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setitem(cli.COMMANDS, "train", ("train", exhausted, "test"))
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *FAST, f"hydra.run.dir={tmp_path}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    for key in ("data.context_len", "data.batch_size", "model.activation_checkpointing", "accumulate_grad_batches"):
        assert key in err
    assert "Traceback" not in err


def test_lightning_records_reach_the_console_once():
    """Lightning's own console handler would print every record a second time beside Hydra's."""
    import logging

    from tsfm_msa.cli import _one_console_handler

    _one_console_handler()
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        assert logger.propagate and not [h for h in logger.handlers if type(h) is logging.StreamHandler], name


def test_cli_warnings_print_once_as_log_lines(caplog):
    """evaluate builds the data once per model: its warnings reach the log once, without file:line."""
    import logging
    import warnings

    from tsfm_msa.cli import _warnings_once_through_logging

    format_before = warnings.formatwarning
    try:
        _warnings_once_through_logging()
        with warnings.catch_warnings(), caplog.at_level(logging.WARNING, logger="py.warnings"):
            warnings.simplefilter("always")
            # Route warnings to logging afresh: an earlier CLI run in this process (or pytest's own
            # catch_warnings) may have replaced warnings.showwarning since.
            logging.captureWarnings(False)
            logging.captureWarnings(True)
            for _ in range(3):
                warnings.warn("item 'x': 3 of 30 rows were sorted", UserWarning)
        lines = [r.getMessage() for r in caplog.records if r.name == "py.warnings"]
        assert lines == ["UserWarning: item 'x': 3 of 30 rows were sorted"]
    finally:
        logging.captureWarnings(False)
        warnings.formatwarning = format_before


def test_progress_bar_follows_the_terminal_unless_set(monkeypatch, tmp_path):
    """trainer.enable_progress_bar null: a bar in a terminal, none when the output goes to a file."""
    from hydra import compose, initialize_config_module

    from tsfm_msa.run_setup import build_trainer

    with initialize_config_module("tsfm_msa.configs", version_base=None):
        cfg = compose("train")
    assert cfg.trainer.enable_progress_bar is None
    for tty in (True, False):
        monkeypatch.setattr("sys.stdout.isatty", lambda tty=tty: tty)
        assert (build_trainer(cfg, tmp_path).progress_bar_callback is not None) is tty
    cfg.trainer.enable_progress_bar = True
    assert build_trainer(cfg, tmp_path).progress_bar_callback is not None  # an explicit choice wins



def _validation_metrics(module, dm, tmp_path) -> dict:
    """One Lightning validation pass of ``module`` on ``dm``: its logged metrics."""
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    [metrics] = trainer.validate(module, datamodule=dm, verbose=False)
    return metrics


def test_validation_mae_is_the_mean_over_observed_values(tmp_path):
    """A validation batch with no observed target adds nothing to val_mae / val_loss (it was averaged in
    as a fake 0); the epoch values are the means over every observed horizon value."""
    import numpy as np
    import pandas as pd

    from tsfm_msa.datasets import from_pandas

    n = 400
    t = np.arange(n)
    flow = np.sin(2 * np.pi * t / 24) + np.random.default_rng(3).normal(0, 0.1, n)
    flow[368:384] = np.nan  # the whole horizon of the second of three validation windows
    frames = from_pandas(pd.DataFrame({"when": pd.date_range("2024-01-01", periods=n, freq="h"), "flow": flow}),
                         timestamp="when", targets=["flow"])
    dm = SeriesDataModule(frames=frames, context_len=64, horizon=16, val_fraction=0.12, test_fraction=0.0,
                          batch_size=1)
    module = ForecastModule(TINY_MODEL, frames[0].schema.to_dict(), 64, 16, max_steps=1).eval()
    metrics = _validation_metrics(module, dm, tmp_path)
    err = loss = count = 0.0
    batches = list(dm.val_dataloader())
    assert len(batches) == 3 and not batches[1]["horizon_mask"].any()
    with torch.no_grad():
        for batch in batches:
            forecast_loss, out, observed = module._losses(batch, "sparse")
            median = out.quantiles[..., module._median_index()]
            truth = batch["horizon"][..., module.model.target_index].transpose(1, 2)
            scale = batch["scale"][:, module.model.target_index, None]
            err += float(((median - truth).abs() * scale)[observed].sum())
            loss += float(forecast_loss) * int(observed.sum())
            count += int(observed.sum())
    assert metrics["val_mae"] == pytest.approx(err / count, rel=1e-5)
    assert metrics["val_loss"] == pytest.approx(loss / count, rel=1e-5)


def test_validation_logs_each_targets_mae_in_its_own_units(tmp_path):
    """val_mae/<target>: the mean absolute error over that target's observed horizon values, so a target
    ~1e6 cannot hide how the model does on one ~5e3 (val_mae pools their raw units)."""
    import numpy as np
    import pandas as pd

    from tsfm_msa.datasets import from_pandas

    n = 400
    t = np.arange(n)
    rng = np.random.default_rng(5)
    df = pd.DataFrame({"when": pd.date_range("2024-01-01", periods=n, freq="h"),
                       "kw": 5e3 + 500 * np.sin(2 * np.pi * t / 24) + rng.normal(0, 100, n),
                       "eur": 1e6 + rng.normal(0, 1e5, n)})
    df.loc[370:375, "kw"] = np.nan  # some values missing in one target only
    frames = from_pandas(df, timestamp="when", targets=["kw", "eur"])
    dm = SeriesDataModule(frames=frames, context_len=64, horizon=16, val_fraction=0.12, test_fraction=0.0,
                          batch_size=2)
    module = ForecastModule(TINY_MODEL, frames[0].schema.to_dict(), 64, 16, max_steps=1).eval()
    metrics = _validation_metrics(module, dm, tmp_path)
    err, count = torch.zeros(2, dtype=torch.float64), torch.zeros(2)
    with torch.no_grad():
        for batch in dm.val_dataloader():
            _, out, observed = module._losses(batch, "sparse")
            median = out.quantiles[..., module._median_index()]
            truth = batch["horizon"][..., module.model.target_index].transpose(1, 2)
            scale = batch["scale"][:, module.model.target_index, None]
            err += (((median - truth).abs() * scale).masked_fill(~observed, 0)).sum(dim=(0, 2)).double()
            count += observed.sum(dim=(0, 2))
    assert module.target_names() == ["kw", "eur"]
    assert metrics["val_mae/kw"] == pytest.approx(float(err[0] / count[0]), rel=1e-5)
    assert metrics["val_mae/eur"] == pytest.approx(float(err[1] / count[1]), rel=1e-5)
    assert metrics["val_mae"] == pytest.approx(float(err.sum() / count.sum()), rel=1e-5)
