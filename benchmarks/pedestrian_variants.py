"""One model of `tsfm-msa evaluate` on pedestrian under given overrides, scored overall and per sensor.

Used for the one-change-at-a-time diagnosis in benchmarks/results/2026-12-01-evaluation-pedestrian-diagnosis.md:
the same training (`train_ours` / `_train_baseline`), windows and GluonTS metrics as the evaluate command,
plus each sensor's MASE (mean over its windows of GluonTS's per-window MASE). Appends one JSON line to
--out. Example:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pedestrian_variants.py --model dense --label base \
        --out /tmp/ped.jsonl -- eval.max_steps=1000 indexer_warmup.steps=300
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from gluonts.model import evaluate_forecasts
from hydra import compose, initialize_config_module

from tsfm_msa.evaluate import command
from tsfm_msa.evaluate.gluonts_data import make_eval_split, split_targets, standardize_covariates
from tsfm_msa.evaluate.metrics import gluonts_kwargs, score_forecasts
from tsfm_msa.evaluate.predictor import predictor_from_module


def per_window_mase(forecasts: list, test, freq: str) -> dict[str, list[float]]:
    """sensor -> GluonTS MASE of each of its windows, in time order."""
    kwargs = {**gluonts_kwargs(freq), "axis": 1}  # one row per window
    df = evaluate_forecasts(forecasts, test_data=test, **kwargs)  # index: (item_id, forecast_start)
    sensor = df.index.get_level_values(0).astype(str).str.split("/").str[-1]
    return {str(k): [round(float(x), 3) for x in v] for k, v in df.groupby(sensor, sort=False)["MASE[0.5]"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, choices=["dense", "msa", "deepar", "seasonal_naive"])
    parser.add_argument("--label", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    overrides = ["data=pedestrian", "eval=pedestrian", "eval.cpu_threads=1", *args.overrides]
    with initialize_config_module("tsfm_msa.configs", version_base=None):
        cfg = compose("evaluate", overrides=overrides)
    command._quiet()
    torch.set_num_threads(1)
    import hydra

    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    datamodule.setup("fit")
    frames, schema = datamodule.frames, datamodule.schema
    H = int(cfg.data.horizon)
    windows = command.default_windows(cfg, min(f.length for f in frames), H, H)
    split = make_eval_split(frames, H, windows, H, min_train=H + 1)
    targets = [schema.names[i] for i in schema.target_indices]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if args.model in ("dense", "msa"):
            module, _ = command.train_ours(cfg, args.model, args.seed, split, Path(tmp))
            forecasts = list(predictor_from_module(module, H).predict(split.test.input))
        elif args.model == "deepar":
            zsplit = make_eval_split(standardize_covariates(frames, split.train_stops), H, windows, H, min_train=H + 1)
            n_future = len(schema.indices_of("future_covariate", "action"))
            n_past = len(schema.indices_of("past_covariate"))
            predictor = command._train_baseline(cfg, "deepar", args.seed, zsplit, n_future, n_past, Path(tmp))
            forecasts = list(predictor.predict(zsplit.uni_test.input))
        else:
            from tsfm_msa.evaluate import baselines

            forecasts = list(baselines.seasonal_naive(H, split.season).predict(split.uni_test.input))
    seconds = time.perf_counter() - start
    forecasts = split_targets(forecasts, len(frames), split.windows, targets)
    row = {"label": args.label, "model": args.model, "seed": args.seed, "overrides": args.overrides,
           **score_forecasts(forecasts, split.uni_test, split.freq),
           "seconds": round(seconds)}
    windows = per_window_mase(forecasts, split.uni_test, split.freq)
    row["per_sensor_MASE"] = {k: float(np.mean(v)) for k, v in windows.items()}
    row["per_window_MASE"] = windows
    print(json.dumps(row))
    with args.out.open("a") as fh:
        fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
