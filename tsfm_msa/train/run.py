"""Fit a model and write the run's summary (checkpoint paths, metrics, seasonal-naive comparison)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L

from tsfm_msa.train.module import ForecastModule


def fit_and_summarize(
    module: ForecastModule,
    datamodule: L.LightningDataModule,
    trainer: L.Trainer,
    run_dir: Path,
    run_name: str,
) -> dict:
    """Train, validate the best checkpoint, compare with seasonal naive; write summary.{json,md}."""
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    train_seconds = time.perf_counter() - start
    ckpt = trainer.checkpoint_callback
    best = ckpt.best_model_path if ckpt is not None and ckpt.best_model_path else None
    results = trainer.validate(module, datamodule=datamodule, ckpt_path=best or None, verbose=False)
    metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
    naive_mae = float(datamodule.seasonal_naive_mae("val"))
    model_mae = metrics.get("val_mae", float("nan"))
    summary = {
        "run": run_name,
        "run_dir": str(run_dir),
        "best_checkpoint": best,
        "last_checkpoint": str(Path(ckpt.dirpath) / "last.ckpt") if ckpt is not None and ckpt.dirpath else None,
        "steps": int(trainer.global_step),
        "train_seconds": round(train_seconds, 1),
        "val_loss": metrics.get("val_loss"),
        "val_mae": model_mae,
        "seasonal_naive_val_mae": naive_mae,
        "mae_ratio_vs_seasonal_naive": model_mae / naive_mae if naive_mae > 0 else None,
        "val_support_frac": metrics.get("val/support_frac"),
        "metrics_csv": str(Path(trainer.logger.log_dir) / "metrics.csv") if trainer.logger is not None else None,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    (run_dir / "summary.md").write_text(summary_markdown(summary))
    print(summary_markdown(summary))
    return summary


def summary_markdown(s: dict) -> str:
    ratio = s["mae_ratio_vs_seasonal_naive"]
    verdict = "beats" if ratio is not None and ratio < 1 else "does NOT beat"
    support = f"{s['val_support_frac']:.2f}" if s.get("val_support_frac") is not None else "n/a (dense)"
    return "\n".join([
        f"# Training run `{s['run']}`",
        "",
        "| | value |",
        "|---|---|",
        f"| steps | {s['steps']} ({s['train_seconds']} s) |",
        f"| validation MAE, model | {s['val_mae']:.4g} |",
        f"| validation MAE, seasonal naive | {s['seasonal_naive_val_mae']:.4g} |",
        f"| ratio (model / seasonal naive) | {ratio:.3f} — the model {verdict} seasonal naive |",
        f"| validation pinball loss (scaled) | {s['val_loss']:.4g} |",
        f"| attended share of the visible tokens | {support} |",
        f"| best checkpoint | `{s['best_checkpoint']}` |",
        f"| metrics CSV | `{s['metrics_csv']}` |",
        "",
    ])
