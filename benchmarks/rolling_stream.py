"""CPU timing of rolling-window evaluation through the streaming cache vs re-encoding every window.

Both paths give the same forecasts (checked here): every origin's context runs from a fixed start
(``--context`` steps before the first origin) to the origin, with the scale frozen on the first
window. ``windowed`` re-encodes each window with a full forward (the predictor's way of working);
``stream`` feeds the series once through a ``StreamingForecaster`` and forecasts at every origin.

    OMP_NUM_THREADS=1 python benchmarks/rolling_stream.py --out benchmarks/results
"""
from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tsfm_msa.datasets.schema import SeriesSchema, Variate
from tsfm_msa.model.transformer import PatchTransformer
from tsfm_msa.streaming import rolling_forecasts

# The shipped small model (configs/model/msa_small.yaml) on a vic_elec-like schema.
MODEL = dict(patch_len=16, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, block_size=8, top_k=4,
             index_dim=16)
SCHEMA = SeriesSchema(variates=(Variate("Demand", "target", "Demand"), Variate("Temperature", "past_covariate", "Temperature"),
                                Variate("Holiday", "future_covariate", "Holiday", binary=True)), freq="30min")


def run(context: int, horizon: int, windows: int, attention: str, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = PatchTransformer(list(SCHEMA.roles), list(SCHEMA.group_index), list(SCHEMA.group_names), attention=attention,
                             **MODEL).eval()
    rows = context + windows * horizon
    rng = np.random.default_rng(seed)
    t = np.arange(rows)
    frame = pd.DataFrame({"Demand": 5000 + 800 * np.sin(2 * np.pi * t / 48) + rng.normal(0, 100, rows),
                          "Temperature": 20 + 5 * np.sin(2 * np.pi * t / 48 + 1) + rng.normal(0, 1, rows),
                          "Holiday": (t // 48 % 7 == 6).astype(float)},
                         index=pd.date_range("2014-01-01", periods=rows, freq="30min"))
    origins = [context + i * horizon for i in range(windows)]
    common = dict(schema=SCHEMA, horizon=horizon, start=0)
    for o in origins:  # layouts are cached per window length: keep their build out of the windowed timing
        model.layout(o, horizon, torch.device("cpu"))
    with torch.no_grad():
        streamed = rolling_forecasts(model, frame, origins, mode="stream", **common)
        windowed = rolling_forecasts(model, frame, origins, mode="windowed", **common)
    err = float((streamed.quantiles - windowed.quantiles).abs().max() / windowed.quantiles.abs().max())
    tokens = (rows // MODEL["patch_len"]) * 3
    return {"attention": attention, "context_steps": context, "horizon": horizon, "windows": windows,
            "last_window_tokens": tokens, "stream_s": streamed.seconds, "windowed_s": windowed.seconds,
            "speedup": windowed.seconds / streamed.seconds, "max_rel_diff": err}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--horizon", type=int, default=48)
    p.add_argument("--windows", type=int, default=20)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    rows = []
    for attention in ("msa", "dense"):
        for context in args.contexts:
            row = run(context, args.horizon, args.windows, attention)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = {"date": datetime.date.today().isoformat(), "device": "cpu", "torch": torch.__version__,
                "threads": torch.get_num_threads(), "model": MODEL}
        path = args.out / f"{meta['date']}-cpu-rolling-stream.json"
        path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
