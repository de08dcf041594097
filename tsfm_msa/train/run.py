"""Fit a model and write the run's summary (checkpoint paths, metrics, seasonal-naive comparison)."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from tsfm_msa.datasets import DataValidationError, seasonality
from tsfm_msa.train.lightning_module import ForecastModule


def fit_and_summarize(
    module: ForecastModule,
    datamodule: L.LightningDataModule,
    trainer: L.Trainer,
    run_dir: Path,
    run_name: str,
    ckpt_path: str | Path | None = None,
) -> dict:
    """Train (continuing from ``ckpt_path`` when given: Lightning restores the step, optimizer,
    LR scheduler, callbacks, loops and data position), validate the best checkpoint, compare with
    seasonal naive; write summary.{json,md} (on the main process)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None)
    train_seconds = time.perf_counter() - start
    last = _save_final_last(trainer)
    ckpt = trainer.checkpoint_callback
    best = ckpt.best_model_path if ckpt is not None and ckpt.best_model_path else None
    results = trainer.validate(module, datamodule=datamodule, ckpt_path=best or None, verbose=False)
    metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
    naive_mae, naive_note = seasonal_naive_reference(datamodule)
    model_mae = finite_or_none(metrics.get("val_mae"))
    summary = {
        "run": run_name,
        "run_dir": str(run_dir),
        "resumed_from": str(ckpt_path) if ckpt_path else None,
        "best_checkpoint": best,
        "last_checkpoint": last,
        "steps": int(trainer.global_step),
        "train_seconds": round(train_seconds, 1),
        "val_loss": finite_or_none(metrics.get("val_loss")),
        "val_mae": model_mae,
        "seasonal_naive_val_mae": naive_mae,
        "seasonal_naive_note": naive_note,
        "mae_ratio_vs_seasonal_naive": (
            model_mae / naive_mae if model_mae is not None and naive_mae is not None and naive_mae > 0 else None
        ),
        "val_support_frac": finite_or_none(metrics.get("val/support_frac")),
        "metrics_csv": str(Path(trainer.logger.log_dir) / "metrics.csv") if trainer.logger is not None else None,
    }
    if trainer.is_global_zero:
        write_summary(summary, run_dir)
        print(summary_markdown(summary))
    return summary


def finite_or_none(x: float | None) -> float | None:
    """A metric for JSON: NaN / inf become None (null), since JSON has no NaN."""
    return float(x) if x is not None and math.isfinite(float(x)) else None


def seasonal_naive_reference(datamodule: L.LightningDataModule) -> tuple[float | None, str | None]:
    """(seasonal-naive validation MAE, None), or (None, why it cannot be computed)."""
    try:
        mae = finite_or_none(datamodule.seasonal_naive_mae("val"))
    except DataValidationError as err:  # no validation split
        return None, f"not computed: {err}"
    if mae is not None:
        return mae, None
    freq = datamodule.schema.freq
    return None, (
        f"not computed: seasonal naive copies the target one season ({seasonality(freq)} steps at freq "
        f"{freq!r}) earlier, and no validation step has an observed value that far back (the series is "
        "shorter than a season plus the validation start, or those values are missing)"
    )


def write_summary(summary: dict, run_dir: Path) -> None:
    """summary.json (strict JSON: missing metrics are null) and summary.md."""
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False))
    (run_dir / "summary.md").write_text(summary_markdown(summary))


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def _save_final_last(trainer: L.Trainer) -> str | None:
    """last.ckpt at the final step: the periodic checkpoint saves only every N steps."""
    periodic = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.save_last and cb.dirpath]
    if not periodic:
        return None
    path = Path(periodic[0].dirpath) / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"
    trainer.save_checkpoint(path)  # every process takes part (sharded strategies); the main one writes
    return str(path)


def summary_markdown(s: dict) -> str:
    ratio = s["mae_ratio_vs_seasonal_naive"]
    if ratio is not None:
        ratio_text = f"{ratio:.3f} — the model {'beats' if ratio < 1 else 'does NOT beat'} seasonal naive"
    elif s["seasonal_naive_val_mae"] is None:
        ratio_text = "n/a — no seasonal-naive reference to compare with"
    elif s["val_mae"] is not None and s["seasonal_naive_val_mae"] == 0:
        # Seasonal naive is exact on the validation part (e.g. a target flat there): no ratio to take.
        ratio_text = ("n/a — seasonal naive is exact on the validation part (MAE 0), so no ratio; the model's "
                      f"validation MAE is {s['val_mae']:.4g}")
    else:
        ratio_text = "n/a — the model has no validation MAE"
    naive_text = _fmt(s["seasonal_naive_val_mae"], ".4g")
    if s.get("seasonal_naive_note"):
        naive_text += f" ({s['seasonal_naive_note']})"
    support = f"{s['val_support_frac']:.2f}" if s.get("val_support_frac") is not None else "n/a (dense)"
    return "\n".join([
        f"# Training run `{s['run']}`",
        "",
        "| | value |",
        "|---|---|",
        f"| steps | {s['steps']} ({s['train_seconds']} s) |",
        f"| validation MAE, model | {_fmt(s['val_mae'], '.4g')} |",
        f"| validation MAE, seasonal naive | {naive_text} |",
        f"| ratio (model / seasonal naive) | {ratio_text} |",
        f"| validation pinball loss (scaled) | {_fmt(s['val_loss'], '.4g')} |",
        f"| attended share of the visible tokens | {support} |",
        (f"| best checkpoint | `{s['best_checkpoint']}` |" if s.get("best_checkpoint") else
         "| best checkpoint | none: no validation ran (trainer.max_steps < trainer.val_check_interval) |"),
        f"| last checkpoint | `{s.get('last_checkpoint')}` |",
        f"| metrics CSV | `{s['metrics_csv']}` |",
        "",
    ])
