"""Synthetic series with known structure: seasonality + trend + noise, lagged covariate effects, action pulses."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from .errors import DataValidationError
from .frame import SeriesFrame, detect_binary, harmonize
from .schema import SeriesSchema, Variate


def _ar1(rng: np.random.Generator, n: int, phi: float, k: int) -> np.ndarray:
    """k independent AR(1) paths with unit marginal variance: float64 [n, k]."""
    eps = rng.standard_normal((n, k)) * np.sqrt(1.0 - phi**2)
    out = np.empty((n, k))
    out[0] = rng.standard_normal(k)  # start in the stationary distribution
    for t in range(1, n):
        out[t] = phi * out[t - 1] + eps[t]
    return out


def make_synthetic(
    n_items: int = 1,
    length: int = 2000,
    freq: str = "h",
    seasonal_periods: Sequence[int] = (24,),
    trend: float = 1.0,
    noise: float = 0.1,
    n_past_covariates: int = 1,
    n_future_covariates: int = 1,
    n_actions: int = 0,
    covariate_effect: float = 1.0,
    covariate_lag: int | Sequence[int] = 0,
    seed: int = 0,
    *,
    seasonal_amplitude: float = 1.0,
    level: float = 10.0,
    covariate_ar: float = 0.5,
    action_rate: float = 0.02,
    action_effect: float = 2.0,
    action_decay: float = 0.9,
    start: str = "2020-01-01",
) -> list[SeriesFrame]:
    """Items whose target is a known function of its inputs (deterministic given `seed`).

    target[t] = level_i + slope_i * t                                 (level_i ~ level * U(0.8, 1.2),
                                                                       slope_i = trend * U(0.5, 1.5) / length)
              + seasonal_amplitude * sum_p sin(2 pi t / p + phase_ip)  (p in seasonal_periods)
              + covariate_effect * sum_c cov_c[t - lag_c]              (past then future covariates)
              + action_effect * sum_a sum_{k>=0} action_decay^k * action_a[t - k]
              + noise * N(0, 1)

    Covariates are AR(1) processes (coefficient `covariate_ar`, unit variance); `covariate_lag` is one
    lag for all covariates or one per covariate (past first, then future). A past covariate with
    lag >= horizon is useful for forecasting; a future covariate is known over the horizon. Actions are
    sparse 0/1 pulses (probability `action_rate` per step), known ahead like planned controls, whose
    effect starts at the pulse and decays geometrically. Item i is the same whatever n_items is.
    Variates: "target", "past_cov_j", "future_cov_j", "action_j"; groups: one per role.
    """
    n_cov = n_past_covariates + n_future_covariates
    lags = [int(covariate_lag)] * n_cov if np.isscalar(covariate_lag) else [int(x) for x in covariate_lag]
    _check_params(n_items, length, n_past_covariates, n_future_covariates, n_actions, lags, n_cov,
                  covariate_ar, action_rate, action_decay)
    names = (
        [("target", "target")]
        + [(f"past_cov_{j}", "past_covariate") for j in range(n_past_covariates)]
        + [(f"future_cov_{j}", "future_covariate") for j in range(n_future_covariates)]
        + [(f"action_{j}", "action") for j in range(n_actions)]
    )
    schema = SeriesSchema(tuple(Variate(n, r, r) for n, r in names), freq=freq)
    timestamps = pd.date_range(start=start, periods=length, freq=schema.freq)
    max_lag = max(lags, default=0)
    t = np.arange(length, dtype=np.float64)  # [T]

    frames = []
    for i in range(n_items):
        rng = np.random.default_rng([seed, i])
        y = level * rng.uniform(0.8, 1.2) + trend * rng.uniform(0.5, 1.5) * t / length  # [T]
        for p in seasonal_periods:
            y += seasonal_amplitude * np.sin(2 * np.pi * t / p + rng.uniform(0, 2 * np.pi))
        # Covariates are generated max_lag steps early so lagged effects exist from t = 0.
        cov_full = _ar1(rng, length + max_lag, covariate_ar, n_cov)  # [T + max_lag, n_cov]
        for c, lag in enumerate(lags):
            y += covariate_effect * cov_full[max_lag - lag : max_lag - lag + length, c]
        cov = cov_full[max_lag:]  # [T, n_cov]
        actions = (rng.random((length, n_actions)) < action_rate).astype(np.float64)  # [T, A]
        if n_actions:
            kernel = action_decay ** np.arange(_kernel_len(action_decay))  # [K] impulse response
            for a in range(n_actions):
                y += action_effect * np.convolve(actions[:, a], kernel)[:length]
        y += noise * rng.standard_normal(length)
        values = np.column_stack([y, cov, actions]).astype(np.float32)  # [T, V]
        frames.append(
            SeriesFrame(item_id=str(i), timestamps=timestamps, values=values,
                        schema=schema.with_binary(detect_binary(values, schema.roles)))
        )
    return harmonize(frames)


def _kernel_len(decay: float) -> int:
    """Steps until decay^k < 1e-6 (at least 1)."""
    return 1 if decay == 0 else int(np.ceil(np.log(1e-6) / np.log(decay))) + 1


def _check_params(n_items: int, length: int, n_past: int, n_future: int, n_actions: int, lags: list[int],
                  n_cov: int, ar: float, rate: float, decay: float) -> None:
    if n_items < 1 or length < 3:
        raise DataValidationError(f"need n_items >= 1 and length >= 3, got n_items={n_items}, length={length}")
    if min(n_past, n_future, n_actions) < 0:
        raise DataValidationError("n_past_covariates, n_future_covariates and n_actions must be >= 0")
    if len(lags) != n_cov:
        raise DataValidationError(f"covariate_lag has {len(lags)} entries for {n_cov} covariates (past + future)")
    if any(lag < 0 for lag in lags):
        raise DataValidationError(f"covariate_lag must be >= 0, got {lags}")
    if not (-1 < ar < 1):
        raise DataValidationError(f"covariate_ar must lie in (-1, 1), got {ar}")
    if not (0 <= rate <= 1) or not (0 <= decay < 1):
        raise DataValidationError(f"need 0 <= action_rate <= 1 and 0 <= action_decay < 1, got {rate}, {decay}")
