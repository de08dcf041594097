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
    naive, naive_note = seasonal_naive_reference(datamodule)
    targets = per_target_comparison(module.target_names(), metrics, naive)
    headline = mean_ratio(targets)
    single = len(targets) == 1
    freq = datamodule.schema.freq
    summary = {
        "run": run_name,
        "run_dir": str(run_dir),
        "resumed_from": str(ckpt_path) if ckpt_path else None,
        "best_checkpoint": best,
        "last_checkpoint": last,
        "steps": int(trainer.global_step),
        "train_seconds": round(train_seconds, 1),
        "val_loss": finite_or_none(metrics.get("val_loss")),
        # Pooled over targets these would mix units (the largest target alone): per target only then.
        "val_mae": targets[0]["val_mae"] if single else None,
        "seasonal_naive_val_mae": targets[0]["seasonal_naive_val_mae"] if single else None,
        "seasonal_naive_note": naive_note,
        "seasonal_naive_season": seasonality(freq),
        "freq": freq,
        # One target: its ratio; several: the mean of the per-target ratios (scale-free).
        "mae_ratio_vs_seasonal_naive": headline,
        "per_target": targets,
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


def seasonal_naive_reference(datamodule: L.LightningDataModule) -> tuple[dict[str, float | None], str | None]:
    """({target: seasonal-naive validation MAE, None where it has no entry}, None), or (that, why no target
    has one). One pass over the validation windows serves every target."""
    try:
        per_target = {k: finite_or_none(v) for k, v in datamodule.seasonal_naive_mae_per_target("val").items()}
    except DataValidationError as err:  # no validation split
        return {}, f"not computed: {err}"
    if any(v is not None for v in per_target.values()):
        return per_target, None
    freq = datamodule.schema.freq
    return per_target, (
        f"not computed: seasonal naive copies the target one season ({seasonality(freq)} steps at freq "
        f"{freq!r}) earlier, and no validation step has an observed value that far back (the series is "
        "shorter than a season plus the validation start, or those values are missing)"
    )


def per_target_comparison(names: list[str], metrics: dict[str, float], naive: dict[str, float | None]) -> list[dict]:
    """[{target, val_mae, seasonal_naive_val_mae, mae_ratio_vs_seasonal_naive}] on the validation windows
    (``metrics``: trainer.validate's, with the module's ``val_mae/<target>``; ``naive``: per target, from
    :func:`seasonal_naive_reference`)."""
    rows = []
    for name in names:
        model = finite_or_none(metrics.get(f"val_mae/{name}"))
        ref = naive.get(name)
        ratio = model / ref if model is not None and ref is not None and ref > 0 else None
        rows.append({"target": name, "val_mae": model, "seasonal_naive_val_mae": ref,
                     "mae_ratio_vs_seasonal_naive": ratio})
    return rows


def mean_ratio(rows: list[dict]) -> float | None:
    """Mean of the per-target ratios; None unless every target has one (a partial mean would hide a target)."""
    ratios = [r["mae_ratio_vs_seasonal_naive"] for r in rows]
    return sum(ratios) / len(ratios) if ratios and all(r is not None for r in ratios) else None


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


def season_text(s: dict) -> str:
    """" (season 24 steps of 1h)" for the seasonal-naive label; "" when the summary has no season."""
    season, freq = s.get("seasonal_naive_season"), s.get("freq")
    if season is None or not freq:
        return ""
    step = freq if freq[0].isdigit() else f"1{freq}"
    return f" (season {season} step{'s' if season != 1 else ''} of {step})"


def summary_markdown(s: dict) -> str:
    rows = s.get("per_target") or []
    if len(rows) > 1:
        comparison = _per_target_rows(s, rows)
    else:
        comparison = _single_target_rows(s)
    support = f"{s['val_support_frac']:.2f}" if s.get("val_support_frac") is not None else "n/a (dense)"
    table = [
        f"# Training run `{s['run']}`",
        "",
        "| | value |",
        "|---|---|",
        f"| steps | {s['steps']} ({s['train_seconds']} s) |",
        *comparison[0],
        f"| validation pinball loss (scaled) | {_fmt(s['val_loss'], '.4g')} |",
        f"| attended share of the visible tokens | {support} |",
        (f"| best checkpoint | `{s['best_checkpoint']}` |" if s.get("best_checkpoint") else
         "| best checkpoint | none: no validation during training (trainer.max_steps < trainer.val_check_interval) |"),
        f"| last checkpoint | `{s.get('last_checkpoint')}` |",
        f"| metrics CSV | `{s['metrics_csv']}` |",
        "",
    ]
    return "\n".join(table + comparison[1])


def _single_target_rows(s: dict) -> tuple[list[str], list[str]]:
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
    return [
        f"| validation MAE, model | {_fmt(s['val_mae'], '.4g')} |",
        f"| validation MAE, seasonal naive{season_text(s)} | {naive_text} |",
        f"| ratio (model / seasonal naive) | {ratio_text} |",
    ], []


def _per_target_rows(s: dict, rows: list[dict]) -> tuple[list[str], list[str]]:
    """The headline row (mean of the per-target ratios) and a table with one row per target: MAEs in
    each target's own units, which pooled together would be the largest-valued target's alone."""
    ratio = s["mae_ratio_vs_seasonal_naive"]
    n = len(rows)
    losing = [r["target"] for r in rows if r["mae_ratio_vs_seasonal_naive"] is not None
              and r["mae_ratio_vs_seasonal_naive"] >= 1]
    if ratio is not None:
        verdict = "beats" if ratio < 1 else "does NOT beat"
        detail = (f"better on all {n} targets" if not losing else
                  f"NOT better on {len(losing)} of {n} targets: {', '.join(map(repr, losing))}")
        ratio_text = f"{ratio:.3f} — on average the model {verdict} seasonal naive; {detail}"
    elif s.get("seasonal_naive_note"):
        ratio_text = f"n/a — no seasonal-naive reference to compare with ({s['seasonal_naive_note']})"
    else:
        missing = [r["target"] for r in rows if r["mae_ratio_vs_seasonal_naive"] is None]
        ratio_text = f"n/a — no ratio for {', '.join(map(repr, missing))} (see the table per target)"
    head = [f"| ratio (model / seasonal naive), mean of the {n} targets' ratios | {ratio_text} |"]
    table = [
        "| target | validation MAE, model | validation MAE, seasonal naive" + season_text(s) + " | ratio |",
        "|---|---|---|---|",
    ]
    for r in rows:
        model, naive, rr = r["val_mae"], r["seasonal_naive_val_mae"], r["mae_ratio_vs_seasonal_naive"]
        if rr is not None:
            rtext = f"{rr:.3f}"
        elif naive == 0 and model is not None:
            rtext = "n/a (seasonal naive is exact here, MAE 0)"
        else:
            rtext = "n/a"
        table.append(f"| {r['target']} | {_fmt(model, '.4g')} | {_fmt(naive, '.4g')} | {rtext} |")
    return head, table + [""]
