"""`tsfm-msa evaluate`: our dense and MSA models next to GluonTS baselines on the same rolling test windows.

Protocol (GIFT-Eval's layout): the test windows are the last W non-overlapping windows of H steps of every
series, ending at its last step (W: `eval.windows`, else the data config's `test_length` / H, else
GIFT-Eval's rule, at most 20). Every learned model fits on everything before the first test window (no
validation period, no early stopping) with the same step and batch budget and the same context, and is
scored with its final weights. Ours train through the `tsfm-msa train` builders (ForecastModule + the
Lightning Trainer of `run_setup`) and are wrapped as GluonTS predictors; PatchTST, DeepAR and TFT read
covariates z-scored on the fitting part; everything is scored by GluonTS on the same windows.
"""
from __future__ import annotations

import logging
import threading
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from tsfm_msa.evaluate import baselines, report
from tsfm_msa.evaluate.gluonts_data import (EvalSplit, gift_eval_windows, make_eval_split, split_targets,
                                            standardize_covariates)
from tsfm_msa.evaluate.metrics import relative_to, score_forecasts, score_per_target
from tsfm_msa.evaluate.predictor import TSFMPredictor, check_schema, load_predictor, predictor_from_module
from tsfm_msa.evaluate.run_measures import (StepTimer, batch_for_tokens, cap_top_k, top_k_at_most, window_facts,
                                             window_layout)

GLUONTS_LEARNED = ("patchtst", "deepar", "tft")


def our_models(cfg: DictConfig) -> list[str]:
    """Our models: every node under `models.*` (dense, msa, msa_sensor, ...), each a model config."""
    return list(cfg.get("models") or {})


def learned_models(cfg: DictConfig) -> tuple[str, ...]:
    return tuple(our_models(cfg)) + GLUONTS_LEARNED


class EvaluateConfigError(ValueError):
    """An `eval.*` setting that cannot work; the message names the key."""


@contextmanager
def peak_memory(device: str = "cpu"):
    """Yields a dict that receives `peak_mb` and `delta_mb` after the block: peak CUDA allocation on a GPU,
    else the process's peak resident memory sampled every 20 ms and its rise over the block's start
    (ru_maxrss never goes down, so it cannot tell one model from the next)."""
    out: dict[str, float] = {}
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        yield out
        out["peak_mb"] = out["delta_mb"] = torch.cuda.max_memory_allocated() / 2**20
        return
    page = 4096
    peak = [0]
    start_rss = [0]
    stop = threading.Event()

    def rss() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * page

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            stop.wait(0.02)

    start_rss[0] = rss()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join()
        out["peak_mb"] = max(peak[0], rss()) / 2**20
        out["delta_mb"] = out["peak_mb"] - start_rss[0] / 2**20


def _quiet() -> None:
    # Lightning and GluonTS log a lot per fit; keep the run's console to the progress bar and results.
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "gluonts", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*json-module.*")
    warnings.filterwarnings("ignore", message=".*`max_epochs` was not set.*")
    warnings.filterwarnings("ignore", message=".*non-tuple sequence for multidimensional indexing.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*have no `val_dataloader`.*")
    warnings.filterwarnings("ignore", message=".*could not find the monitored key.*")


def show_progress(cfg: DictConfig) -> bool:
    """The evaluation's bars follow the training's rule: trainer.enable_progress_bar when set, else only in
    a terminal (a bar redrawn into a file or pipe is thousands of lines of noise)."""
    chosen = (cfg.get("trainer") or {}).get("enable_progress_bar")
    return sys.stdout.isatty() if chosen is None else bool(chosen)


def _models(cfg: DictConfig) -> list[str]:
    if cfg.get("checkpoint"):
        return ["seasonal_naive", "checkpoint"]
    models = list(cfg.eval.models)
    known = ("seasonal_naive",) + learned_models(cfg)
    unknown = [m for m in models if m not in known]
    if unknown:
        raise EvaluateConfigError(f"eval.models has unknown entries {unknown}; choose from {list(known)} "
                                  "(ours are the nodes under models.*, e.g. +model@models.mine=msa_small)")
    if "seasonal_naive" not in models:
        models.insert(0, "seasonal_naive")  # the reference of the relative columns
    return models


def _seeds(cfg: DictConfig, model: str) -> list[int]:
    if model in ("seasonal_naive", "checkpoint"):
        return [0]  # deterministic
    key = "baseline_seeds" if model in GLUONTS_LEARNED and cfg.eval.get("baseline_seeds") else "seeds"
    seeds = [int(s) for s in cfg.eval[key]]
    if not seeds:
        raise EvaluateConfigError(f"eval.{key} is empty; give at least one seed (3 or more to see the spread)")
    return seeds


def _trainer_cfg(cfg: DictConfig, steps: int, bare: bool = False) -> DictConfig:
    """The `train` command's trainer config with the evaluation's budget, no validation and a quiet console;
    ``bare``: no callbacks and no checkpoints either (a context-curriculum stage)."""
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    if bare:
        trainer.pop("callbacks", None)
        trainer["enable_checkpointing"] = False
    for key in ("val_check_interval", "check_val_every_n_epoch"):
        trainer.pop(key, None)
    trainer.update(max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0, enable_progress_bar=False,
                   enable_model_summary=False)
    return OmegaConf.create({"trainer": trainer})


def fitting_datamodule(cfg: DictConfig, split: EvalSplit, seed: int, batch_size: int | None = None):
    """The data config's SeriesDataModule cut so that training covers [0, T - test_length) of every series:
    everything before the first test window, no validation split (as for the GluonTS baselines)."""
    datamodule = hydra.utils.instantiate(cfg.data, seed=seed, val_fraction=0.0, val_length=0,
                                         test_length=split.test_length, batch_size=batch_size or cfg.data.batch_size,
                                         _convert_="all")
    datamodule.setup("fit")
    return datamodule


def context_stages(curriculum: Any, context_len: int, max_steps: int) -> list[tuple[int, int]]:
    """``(context_len, steps)`` of each training stage: ``eval.context_curriculum``'s stages, then the full
    context with the rest of ``max_steps``; one stage without a curriculum."""
    if not curriculum:
        return [(context_len, max_steps)]
    if isinstance(curriculum, (dict, DictConfig)):
        curriculum = [curriculum]
    stages = []
    for i, stage in enumerate(curriculum):
        stage = OmegaConf.to_container(stage, resolve=True) if isinstance(stage, DictConfig) else stage
        if not isinstance(stage, dict) or set(stage) != {"context_len", "steps"}:
            raise EvaluateConfigError(f"eval.context_curriculum[{i}] = {stage!r}: give each stage as "
                                      "{context_len: <steps of history>, steps: <optimizer steps>}")
        length, steps = stage["context_len"], stage["steps"]
        if not (isinstance(length, int) and isinstance(steps, int) and length > 0 and steps > 0):
            raise EvaluateConfigError(f"eval.context_curriculum[{i}]: context_len and steps must be positive "
                                      f"integers, got {stage!r}")
        if length >= context_len or (stages and length <= stages[-1][0]):
            raise EvaluateConfigError(f"eval.context_curriculum[{i}]: context_len {length} must grow from stage to "
                                      f"stage and stay below data.context_len ({context_len})")
        stages.append((length, steps))
    rest = max_steps - sum(steps for _, steps in stages)
    if rest <= 0:
        raise EvaluateConfigError(f"eval.context_curriculum's stages take {max_steps - rest} steps of eval.max_steps "
                                  f"({max_steps}); leave steps for the full context (data.context_len={context_len})")
    return stages + [(context_len, rest)]


@contextmanager
def _stage_hparams(module, **values):
    """The module's hyper-parameters during one curriculum stage (max_steps: its LR schedule's span);
    the run's own values come back afterwards."""
    saved = {key: module.hparams[key] for key in values}
    module.hparams.update(values)
    try:
        yield
    finally:
        module.hparams.update(saved)


def train_ours(cfg: DictConfig, kind: str, seed: int, split: EvalSplit, run_dir: Path, schema):
    """Train one of ours (`models.<kind>`) with the `tsfm-msa train` builders on every step before the first
    test window; return (module at its final weights, facts: steps, batch_size, context_tokens,
    step_seconds, ...). With `eval.tokens_per_batch` the batch shrinks as the window grows (at most
    data.batch_size windows, at least one); with `eval.cap_top_k` an MSA top_k above the window's KV
    blocks is lowered to them (MSA attends densely there) instead of refused."""
    from tsfm_msa.run_setup import build_module, build_trainer

    L.seed_everything(seed, workers=True)
    model_cfg = OmegaConf.to_container(cfg.models[kind], resolve=True)
    layout = window_layout(schema, model_cfg, cfg.data.context_len, cfg.data.horizon)
    if cfg.eval.get("cap_top_k"):
        model_cfg = cap_top_k(model_cfg, layout)
    batch_size = batch_for_tokens(layout.seq_len, cfg.eval.get("tokens_per_batch"), int(cfg.data.batch_size))
    datamodule = fitting_datamodule(cfg, split, seed, batch_size)
    steps = int(cfg.eval.max_steps)
    stages = context_stages(cfg.eval.get("context_curriculum"), int(cfg.data.context_len), steps)
    module = build_module(cfg, OmegaConf.create(model_cfg), datamodule, steps)
    run_dir.mkdir(parents=True, exist_ok=True)
    done = 0
    # Curriculum stages first: the same module on shorter windows (the model is not tied to a window
    # length); each stage is its own fit, so its LR warmup and cosine span its steps.
    for i, (stage_len, stage_steps) in enumerate(stages[:-1]):
        stage_cfg = OmegaConf.merge(cfg, {"data": {"context_len": stage_len}})
        stage_layout = window_layout(schema, model_cfg, stage_len, cfg.data.horizon)
        stage_batch = batch_for_tokens(stage_layout.seq_len, cfg.eval.get("tokens_per_batch"), int(cfg.data.batch_size))
        stage_trainer = build_trainer(_trainer_cfg(cfg, stage_steps, bare=True), run_dir / f"context_stage_{i}")
        # No logger: Lightning would refuse the module's and the stage data's differing context_len
        # hyper-parameters, and the evaluation reads only the last stage's measurements.
        stage_trainer.loggers = []
        with top_k_at_most(module.model, stage_layout.n_blocks), _stage_hparams(module, max_steps=stage_steps):
            stage_trainer.fit(module, datamodule=fitting_datamodule(stage_cfg, split, seed, stage_batch))
        done += int(stage_trainer.global_step)
    trainer = build_trainer(_trainer_cfg(cfg, stages[-1][1]), run_dir)
    timer = StepTimer()
    trainer.callbacks.append(timer)
    with _stage_hparams(module, max_steps=stages[-1][1]):
        trainer.fit(module, datamodule=datamodule)
    facts = {"steps": done + int(trainer.global_step), "batch_size": batch_size, **window_facts(layout),
             "attention": model_cfg.get("attention"), "top_k": model_cfg.get("top_k"),
             "step_seconds": timer.median_seconds()}
    if len(stages) > 1:
        facts["context_curriculum"] = [{"context_len": n, "steps": s} for n, s in stages]
    return module.eval(), facts


def _train_baseline(cfg: DictConfig, kind: str, seed: int, zsplit: EvalSplit, n_future: int, n_past: int,
                    run_dir: Path):
    # Same budget and the same context as ours (DeepAR and TFT would otherwise fall back to the horizon).
    common = dict(max_steps=int(cfg.eval.max_steps), batch_size=int(cfg.data.batch_size), seed=seed,
                  root_dir=run_dir, num_batches_per_epoch=int(cfg.eval.num_batches_per_epoch),
                  context_length=int(cfg.data.context_len), accelerator=_accelerator(cfg))
    kwargs = OmegaConf.to_container(cfg.eval[kind], resolve=True) or {}
    H = zsplit.prediction_length
    if kind == "patchtst":
        return baselines.train_patchtst(zsplit.train, H, n_future, **common, **kwargs)
    if kind == "deepar":
        return baselines.train_deepar(zsplit.train, zsplit.freq, H, n_future, **common, **kwargs)
    return baselines.train_tft(zsplit.train, zsplit.freq, H, n_future, n_past, **common, **kwargs)


def default_windows(cfg: DictConfig, min_length: int, prediction_length: int, distance: int) -> int:
    """eval.windows, else as many as the data config's test_length holds, else GIFT-Eval's rule (<= 20)."""
    if cfg.eval.get("windows") is not None:
        return int(cfg.eval.windows)
    test_length = cfg.data.get("test_length")
    if test_length:
        if int(test_length) < prediction_length:
            raise EvaluateConfigError(f"data.test_length {test_length} is shorter than the horizon {prediction_length}; "
                                      "raise it or set eval.windows")
        return (int(test_length) - prediction_length) // distance + 1
    return gift_eval_windows(min_length, prediction_length)


def run_evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate every model of `eval.models` (or only the checkpoint `checkpoint`) on one dataset; write
    evaluation.csv / .md, per-seed rows and forecast plots into the Hydra run folder."""
    _quiet()
    run_dir = Path(hydra.core.hydra_config.HydraConfig.get().runtime.output_dir)
    dataset = hydra.core.hydra_config.HydraConfig.get().runtime.choices.get("data", "data")
    return evaluate(cfg, run_dir, dataset)


def evaluate(cfg: DictConfig, run_dir: Path, dataset: str) -> dict[str, Any]:
    """The command's body, callable without Hydra (tests): returns the per-seed rows and the summary table."""
    run_dir.mkdir(parents=True, exist_ok=True)
    threads = cfg.eval.get("cpu_threads")
    if threads:
        # On shared, busy CPUs one intra-op thread per process is ~10x faster than OpenMP threads
        # spinning against other jobs (measured: dense step 0.16 s with 1 thread, 2.6 s with 2).
        torch.set_num_threads(int(threads))
    if int(cfg.eval.max_steps) <= 0:
        raise EvaluateConfigError(f"eval.max_steps must be a positive integer, got {cfg.eval.max_steps}")
    models = _models(cfg)
    # A bad curriculum stops here, before any model (or the data) takes time.
    stages = context_stages(cfg.eval.get("context_curriculum"), int(cfg.data.context_len), int(cfg.eval.max_steps))
    warmup = (cfg.get("indexer_warmup") or {}).get("steps")
    never_sparse = warmup is not None and int(warmup) >= stages[-1][1]
    dense_only = [m for m in models if m in our_models(cfg) and cfg.models[m].get("attention") == "msa"]
    if never_sparse and dense_only:
        print(f"tsfm-msa: note: indexer_warmup.steps={warmup} >= the {stages[-1][1]} training steps at the full "
              f"context: {dense_only} never route sparsely in this run (their rows are dense attention); lower "
              f"indexer_warmup.steps or raise eval.max_steps", flush=True)
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    datamodule.setup("fit")
    frames, schema = datamodule.frames, datamodule.schema
    horizon = int(cfg.data.horizon)
    H = int(cfg.eval.get("prediction_length") or horizon)

    predictor_ckpt = None
    if "checkpoint" in models:
        predictor_ckpt = load_predictor(cfg.checkpoint, prediction_length=H)
        check_schema(predictor_ckpt, schema, cfg.checkpoint)
    elif H > horizon:
        raise EvaluateConfigError(f"eval.prediction_length {H} exceeds data.horizon {horizon} the models train for")

    distance = int(cfg.eval.get("distance") or H)
    windows = default_windows(cfg, min(f.length for f in frames), H, distance)
    split = make_eval_split(frames, H, windows, distance, min_train=H + 1)
    zsplit = make_eval_split(standardize_covariates(frames, split.train_stops), H, windows, distance, min_train=H + 1)
    ours = our_models(cfg)
    learned = learned_models(cfg)
    device = _device(cfg)
    n_future = len(schema.indices_of("future_covariate", "action"))
    n_past = len(schema.indices_of("past_covariate"))
    target_names = [schema.names[i] for i in schema.target_indices]
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    # Seed-major order: every model's first seed before any second seed, and the report is rewritten after
    # each job, so a run stopped early still holds a complete comparison of the seeds it finished.
    seeds = {m: _seeds(cfg, m) for m in models}
    jobs = [(m, seeds[m][i]) for i in range(max(map(len, seeds.values()))) for m in models if i < len(seeds[m])]
    fitting = (f"the checkpoint as trained (context {predictor_ckpt.prediction_net.context_len}), no refit"
               if predictor_ckpt is not None else f"budget {cfg.eval.max_steps} steps x batch {cfg.data.batch_size}")
    print(f"evaluate {dataset}: {split.windows} test windows x {len(frames)} series, horizon {H}, "
          f"{fitting}; {len(jobs)} model fits/evaluations")

    rows: list[dict[str, Any]] = []
    plot_forecasts: dict[str, list] = {}
    naive_scores: dict[str, float] | None = None
    # Several targets: each model's metrics on each target's series too (the pooled CRPS mixes their scales).
    target_rows: list[dict[str, Any]] | None = [] if len(target_names) > 1 else None
    naive_target_scores: dict[str, dict[str, float]] = {}
    progress = show_progress(cfg)
    bar = tqdm(jobs, desc=f"models [{dataset}]", unit="model", disable=not progress)
    for model, seed in bar:
        bar.set_postfix_str(f"{model} seed {seed}")
        job_dir = run_dir / "models" / f"{model}-seed{seed}"
        # GluonTS models read one series per target (covariates z-scored); ours read the joint series and
        # their forecasts are split per target; all are scored on the same windows.
        test = zsplit.uni_test if model in GLUONTS_LEARNED else split.uni_test if model == "seasonal_naive" else split.test
        info: dict[str, Any] = {"train_seconds": 0.0, "steps": 0, "params": 0}
        with peak_memory(device) as mem:
            start = time.perf_counter()
            if model == "seasonal_naive":
                predictor = baselines.seasonal_naive(H, split.season)
            elif model == "checkpoint":
                predictor = predictor_ckpt
                info["params"] = sum(p.numel() for p in predictor.prediction_net.parameters())
            elif model in ours:
                module, facts = train_ours(cfg, model, seed, split, job_dir, schema)
                info.update(facts, context_len=int(cfg.data.context_len), patch_len=int(cfg.models[model].patch_len))
                module.to(device)  # Lightning hands the module back on the CPU; forecast where it trained
                predictor = predictor_from_module(module, H, device=device)
                info["params"] = sum(p.numel() for p in module.model.parameters())
            else:
                predictor = _train_baseline(cfg, model, seed, zsplit, n_future, n_past, job_dir)
                info["steps"] = int(cfg.eval.max_steps)
                info["params"] = sum(p.numel() for p in predictor.prediction_net.parameters())
            info["train_seconds"] = time.perf_counter() - start if model in learned else 0.0
        info["peak_mb"], info["delta_mb"] = mem["peak_mb"], mem["delta_mb"]
        start = time.perf_counter()
        with _autocast(cfg, device):
            if model in ours and cfg.eval.get("streaming"):
                forecasts = streamed_forecasts(module, frames, split, int(cfg.data.context_len))
            else:
                forecasts = list(tqdm(predictor.predict(test.input), total=len(test), desc=f"{model} windows",
                                      leave=False, unit="window", disable=not progress))
        forecasts = split_targets(forecasts, len(frames), split.windows, target_names)
        info["predict_seconds"] = time.perf_counter() - start
        scores = score_forecasts(forecasts, split.uni_test, split.freq)
        if model == "seasonal_naive":
            naive_scores = scores
        inputs = baselines.INPUTS.get(model, baselines.INPUTS["dense"])  # all of ours read the same inputs
        row = {"dataset": dataset, "model": model, "seed": seed, **scores, **relative_to(scores, naive_scores), **info,
               "inputs": inputs}
        rows.append(row)
        if target_rows is not None:
            per_target = score_per_target(forecasts, split.uni_test, split.freq, target_names, split.windows)
            if model == "seasonal_naive":
                naive_target_scores = per_target
            target_rows += [{"dataset": dataset, "model": model, "seed": seed, "target": name, **sc,
                             **relative_to(sc, naive_target_scores[name])} for name, sc in per_target.items()]
        if model not in plot_forecasts:
            plot_forecasts[model] = forecasts
        tqdm.write(f"  {model} seed {seed}: MASE {scores['MASE']:.3f} CRPS {scores['CRPS']:.4f} "
                   f"(x{row['MASE_rel']:.3f} / x{row['CRPS_rel']:.3f} naive), {info['train_seconds']:.0f} s")
        report.write_report(rows, run_dir, dataset=dataset, setting=_setting(cfg, split, predictor_ckpt),
                            target_rows=target_rows)

    table = report.write_report(rows, run_dir, dataset=dataset, setting=_setting(cfg, split, predictor_ckpt),
                                target_rows=target_rows)
    plots = report.plot_forecasts(split.uni_test, plot_forecasts, run_dir / "plots",
                                  n_series=int(cfg.eval.plot_series), n_windows=int(cfg.eval.plot_windows),
                                  history=int(cfg.eval.plot_history) * H)
    print(report.markdown_table(table))
    print(f"results in {run_dir}")
    out = {"rows": rows, "table": table, "plots": plots, "run_dir": str(run_dir)}
    if target_rows is not None:
        out["target_rows"] = target_rows
        out["target_table"] = report.summarize_targets(target_rows)
    return out


def streamed_forecasts(module, frames: list, split: EvalSplit, context_len: int) -> list:
    """``eval.streaming=true``: every series' test windows from one pass of a StreamingForecaster
    (per-layer K/V and index-key caches; each patch is encoded once) instead of re-encoding each
    window. The context grows from ``context_len`` steps before the first window (each later window
    sees all history since then) and the scale is frozen on that first context: what re-encoding
    the same expanding windows would give (``rolling_forecasts(mode="windowed")``, tested equal).
    Joint QuantileForecasts, item-major and window inner, as the predictor yields them."""
    from gluonts.model.forecast import QuantileForecast

    from tsfm_msa.streaming import rolling_forecasts

    patch = module.model.patch_len
    if split.distance % patch or context_len % patch:
        raise EvaluateConfigError(
            f"eval.streaming forecasts at patch boundaries: eval.distance ({split.distance}) and data.context_len "
            f"({context_len}) must be multiples of model.patch_len ({patch}); change one, or set eval.streaming=false")
    levels = [float(q) for q in module.model.quantile_levels]
    keys = [str(round(q, 4)) for q in levels]  # the predictor's keys (QuantileForecastGenerator)
    out = []
    for frame in frames:
        first = frame.length + split.offset  # the first test window's start (offset = -test_length)
        origins = [first + w * split.distance for w in range(split.windows)]
        start = first - context_len
        if start < 0:
            raise EvaluateConfigError(f"eval.streaming: series {frame.item_id!r} has only {first} steps before its first "
                                      f"test window, fewer than data.context_len={context_len}")
        result = rolling_forecasts(module, frame.values, origins, schema=frame.schema,
                                   horizon=split.prediction_length, start=start)
        freq = split.freq
        for w, origin in enumerate(result.origins):
            q = result.quantiles[w].float()[:, :split.prediction_length]  # [T, h, Q]
            arrays = q.permute(2, 1, 0).cpu().numpy()  # [Q, h, T]
            out.append(QuantileForecast(arrays, start_date=pd.Period(frame.timestamps[origin], freq=freq),
                                        forecast_keys=keys, item_id=frame.item_id))
    return out


def _accelerator(cfg: DictConfig) -> str:
    """The run's `trainer.accelerator`: ours and the GluonTS baselines train there."""
    return str(cfg.trainer.get("accelerator", "cpu"))


def _device(cfg: DictConfig) -> str:
    """Where ours train and forecast: CUDA under a GPU trainer, else the CPU."""
    on_gpu = _accelerator(cfg) in ("gpu", "cuda") and torch.cuda.is_available()
    return "cuda" if on_gpu else "cpu"


def _autocast(cfg: DictConfig, device: str):
    """Forecasting in the training precision: bf16 autocast on a GPU trainer with bf16 mixed precision."""
    if device == "cuda" and "bf16" in str(cfg.trainer.get("precision", "")):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _setting(cfg: DictConfig, split: EvalSplit, checkpoint: TSFMPredictor | None = None) -> dict[str, Any]:
    return {
        "checkpoint_context_len": None if checkpoint is None else int(checkpoint.prediction_net.context_len),
        "windows": split.windows, "distance": split.distance, "test_length": split.test_length, "prediction_length": split.prediction_length,
        "season": split.season, "freq": split.freq, "max_steps": int(cfg.eval.max_steps),
        "batch_size": int(cfg.data.batch_size), "context_len": int(cfg.data.context_len),
        "context_curriculum": [{"context_len": n, "steps": s} for n, s in context_stages(
            cfg.eval.get("context_curriculum"), int(cfg.data.context_len), int(cfg.eval.max_steps))][:-1] or None,
        "patch_len": {k: int(cfg.models[k].patch_len) for k in our_models(cfg)},
        "tokens_per_batch": cfg.eval.get("tokens_per_batch"),
        "seeds": list(cfg.eval.seeds), "baseline_seeds": list(cfg.eval.get("baseline_seeds") or cfg.eval.seeds),
        "checkpoint": cfg.get("checkpoint"),
        "accelerator": _accelerator(cfg),
        "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
