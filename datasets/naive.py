"""Seasonal-naive reference error on a window dataset, on the original (unscaled) target values."""

from __future__ import annotations

import numpy as np
from gluonts.time_feature import get_seasonality

from .windows import WindowDataset


def seasonality(freq: str) -> int:
    """GluonTS's season length for a pandas frequency ('h' -> 24, '30min' -> 48); 1 if unknown."""
    try:
        return max(1, int(get_seasonality(freq)))
    except Exception:  # gluonts raises assorted errors for unusual offsets; no season is the safe answer
        return 1


def seasonal_naive_mae(dataset: WindowDataset, season: int | None = None) -> float:
    """MAE of y_hat[t + h] = y[t - season + (h mod season)] over every window of `dataset`.

    For h < season this is the value one season earlier; longer horizons repeat the last observed
    season. Averaged over all (window, horizon step, target) entries whose truth and forecast are
    both observed (NaN when there is none). Uses all windows on the dataset's stride grid.
    Several targets are pooled in their own units: see seasonal_naive_mae_per_target for a
    comparison that a large-valued target does not dominate.
    """
    total, count = _naive_abs_errors(dataset, season)
    return float(total.sum() / count.sum()) if count.sum() else float("nan")


def seasonal_naive_mae_per_target(dataset: WindowDataset, season: int | None = None) -> dict[str, float]:
    """{target name: seasonal-naive MAE} on the same entries as seasonal_naive_mae (NaN where none)."""
    total, count = _naive_abs_errors(dataset, season)
    names = [dataset.schema.names[j] for j in dataset.schema.target_indices]
    return {n: float(t / c) if c else float("nan") for n, t, c in zip(names, total, count)}


def _naive_abs_errors(dataset: WindowDataset, season: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Per target: (sum of absolute errors, number of entries). [K], [K]"""
    m = int(season) if season is not None else seasonality(dataset.schema.freq)
    if m < 1:
        raise ValueError(f"season must be >= 1, got {season}")
    targets = list(dataset.schema.target_indices)
    items, origins = dataset.window_index()  # [N], [N]
    h = np.arange(dataset.horizon)  # [H]
    total, count = np.zeros(len(targets), dtype=np.float64), np.zeros(len(targets), dtype=np.int64)
    for i in np.unique(items):
        y = dataset.frames[i].values[:, targets]  # [T, K] unscaled
        o = origins[items == i][:, None]  # [n, 1]
        src = o - m + (h % m)  # [n, H] step the forecast copies
        err = np.abs(y[o + h] - y[np.maximum(src, 0)])  # [n, H, K]
        ok = ~np.isnan(err) & (src >= 0)[..., None]  # before the series start: no forecast
        total += np.where(ok, err, 0.0).sum(axis=(0, 1), dtype=np.float64)
        count += ok.sum(axis=(0, 1))
    return total, count
