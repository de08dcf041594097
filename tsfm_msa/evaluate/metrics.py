"""GluonTS metrics with GIFT-Eval's conventions; a thin wrapper on ``gluonts.model.evaluate_forecasts``.

Everything is aggregated over all series, windows and steps (``axis=None``); NaN labels are masked;
NaN forecasts are an error; MASE's seasonal error uses the season of the data's frequency.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable, Iterator

import gluonts.model.evaluation
from gluonts.dataset.split import TestData
from gluonts.ev.metrics import MAE, MASE, RMSE, MeanWeightedSumQuantileLoss
from gluonts.model import Forecast, Predictor, evaluate_forecasts, evaluate_model
from tqdm import tqdm

from tsfm_msa.datasets import seasonality

QUANTILE_LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
# Our column names for GluonTS's metric names.
COLUMNS = {
    "MASE[0.5]": "MASE",
    "mean_weighted_sum_quantile_loss": "CRPS",
    "MAE[0.5]": "MAE",
    "RMSE[mean]": "RMSE",
}


def metric_definitions() -> list:
    return [MASE(), MeanWeightedSumQuantileLoss(quantile_levels=QUANTILE_LEVELS), MAE(), RMSE()]


def gluonts_kwargs(freq: str) -> dict:
    """Keyword arguments shared by every evaluate_* call (so a direct GluonTS call can reproduce ours)."""
    return dict(metrics=metric_definitions(), axis=None, mask_invalid_label=True, allow_nan_forecast=False,
                seasonality=seasonality(freq))


@contextlib.contextmanager
def _no_gluonts_bar() -> Iterator[None]:
    """GluonTS draws an unlabeled counter bar ("4it [00:00, ...]") for every scoring, terminal or not; the
    evaluation has its own bars (shown only in a terminal), so this one is switched off."""
    with contextlib.ExitStack() as stack:
        if hasattr(gluonts.model.evaluation, "tqdm"):
            stack.enter_context(_patched(gluonts.model.evaluation, "tqdm", functools.partial(tqdm, disable=True)))
        yield


@contextlib.contextmanager
def _patched(module: object, name: str, value: object) -> Iterator[None]:
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)


def _row(df) -> dict[str, float]:
    return {COLUMNS[k]: float(df[k].iloc[0]) for k in COLUMNS}


def score_forecasts(forecasts: Iterable[Forecast], test_data: TestData, freq: str) -> dict[str, float]:
    """{MASE, CRPS, MAE, RMSE} of forecasts aligned with test_data's instances."""
    with _no_gluonts_bar():
        return _row(evaluate_forecasts(forecasts, test_data=test_data, **gluonts_kwargs(freq)))


def score_per_target(forecasts: list[Forecast], uni_test: TestData, freq: str, target_names: list[str],
                     windows: int) -> dict[str, dict[str, float]]:
    """{target: {MASE, CRPS, MAE, RMSE}}: GluonTS's metrics on each target's series only (forecasts and
    uni_test in the order (item, target, window)). The pooled CRPS divides by the sum of |target| over
    every series, so the largest-scale target dominates it; these do not mix scales."""
    from tsfm_msa.evaluate.gluonts_data import target_forecasts, target_test_data

    n = len(target_names)
    return {name: score_forecasts(target_forecasts(forecasts, n, windows, d), target_test_data(uni_test, n, d), freq)
            for d, name in enumerate(target_names)}


def score_predictor(predictor: Predictor, test_data: TestData, freq: str) -> dict[str, float]:
    """{MASE, CRPS, MAE, RMSE} of a GluonTS predictor on test_data."""
    with _no_gluonts_bar():
        return _row(evaluate_model(predictor, test_data=test_data, **gluonts_kwargs(freq)))


def relative_to(scores: dict[str, float], reference: dict[str, float]) -> dict[str, float]:
    """MASE and CRPS divided by the reference's (seasonal naive): < 1 beats it."""
    return {f"{k}_rel": scores[k] / reference[k] if reference[k] else float("nan") for k in ("MASE", "CRPS")}
