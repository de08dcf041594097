"""Our SeriesFrames as GluonTS datasets, and the GIFT-Eval style rolling test split built on GluonTS's own splitter.

Field mapping (one entry per item): targets -> ``target`` ([T] for one target, [D, T] for several),
past covariates -> ``past_feat_dynamic_real`` [P, T], future covariates and actions (known ahead) ->
``feat_dynamic_real`` [F, T], in schema order.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from gluonts.dataset.common import Dataset, ListDataset
from gluonts.dataset.field_names import FieldName
from gluonts.dataset.split import TestData, split

from tsfm_msa.datasets import SeriesFrame, SeriesSchema, Splits, fit_scaler, seasonality


class EvaluationSplitError(ValueError):
    """The test split cannot hold the requested rolling windows."""


def field_indices(schema: SeriesSchema) -> dict[str, list[int]]:
    """Schema positions of the variates that go into each GluonTS field."""
    return {
        FieldName.TARGET: list(schema.indices_of("target")),
        FieldName.PAST_FEAT_DYNAMIC_REAL: list(schema.indices_of("past_covariate")),
        FieldName.FEAT_DYNAMIC_REAL: list(schema.indices_of("future_covariate", "action")),
    }


def frame_to_entry(frame: SeriesFrame, stop: int | None = None) -> dict:
    """One GluonTS data entry from a frame, truncated to steps [0, stop)."""
    values = frame.values[:stop]  # [T, V]
    idx = field_indices(frame.schema)
    target = values[:, idx[FieldName.TARGET]].T  # [D, T]
    entry = {
        FieldName.ITEM_ID: frame.item_id,
        FieldName.START: pd.Period(frame.timestamps[0], freq=frame.freq),
        # A single target is 1-D: GluonTS's univariate models and metrics expect that shape.
        FieldName.TARGET: target[0] if target.shape[0] == 1 else target,
    }
    for field in (FieldName.PAST_FEAT_DYNAMIC_REAL, FieldName.FEAT_DYNAMIC_REAL):
        if idx[field]:
            entry[field] = np.ascontiguousarray(values[:, idx[field]].T)  # [n, T]
    return entry


def univariate_entries(entry: dict, target_names: list[str]) -> list[dict]:
    """One entry per target of a multi-target entry ("item/target"), covariates shared (GIFT-Eval style)."""
    if entry[FieldName.TARGET].ndim == 1:
        return [entry]
    return [{**entry, FieldName.ITEM_ID: f"{entry[FieldName.ITEM_ID]}/{name}", FieldName.TARGET: row}
            for name, row in zip(target_names, entry[FieldName.TARGET])]


def frames_to_gluonts(frames: list[SeriesFrame], stops: list[int] | None = None, univariate: bool = False) -> Dataset:
    """A GluonTS ListDataset of the frames (each truncated to stops[i] steps when given).

    univariate=True splits multi-target items into one series per target (what GluonTS's univariate
    models and the univariate metrics need)."""
    stops = stops or [None] * len(frames)
    entries = [frame_to_entry(f, s) for f, s in zip(frames, stops)]
    if univariate:
        names = [frames[0].schema.names[i] for i in frames[0].schema.target_indices]
        entries = [u for e in entries for u in univariate_entries(e, names)]
    one_dim = entries[0][FieldName.TARGET].ndim == 1
    # ListDataset(one_dim_target=...) keeps the arrays as they are; freq from the schema.
    return ListDataset(entries, freq=frames[0].freq, one_dim_target=one_dim)


def standardize_covariates(frames: list[SeriesFrame], splits: Splits) -> list[SeriesFrame]:
    """Z-score the non-binary covariates of every item with statistics of its training part only.

    GluonTS's PatchTST and DeepAR feed feat_dynamic_real unscaled; EPF's gen_forecast (~58,000)
    would swamp their inputs. Targets are left as they are (metrics are on the original scale).
    """
    out = []
    for frame, train in zip(frames, splits.train):
        schema = frame.schema
        covariate = np.array([r != "target" for r in schema.roles])  # [V]
        keep = ~covariate | np.asarray(schema.binary, dtype=bool)
        loc, scale = fit_scaler(frame.values[train.start:train.stop], keep)  # [V]; keep -> loc 0, scale 1
        values = (frame.values - loc) / scale  # [T, V]
        out.append(SeriesFrame(frame.item_id, frame.timestamps, values, schema))
    return out


@dataclass
class EvalSplit:
    """The rolling test windows of one dataset, in GluonTS form.

    train: entries cut at the end of the training split (what the GluonTS baselines train on), one
    series per target; test: GluonTS TestData (input = history incl. known-future covariates, label =
    truth) of the joint series (what our multi-target models read); uni_test: the same windows with
    one series per target, in the order (item, target, window) - what every model is scored on.
    """

    train: Dataset
    test: TestData
    uni_test: TestData
    n_targets: int
    prediction_length: int
    windows: int
    distance: int
    offset: int
    season: int
    freq: str


def make_eval_split(
    frames: list[SeriesFrame],
    splits: Splits,
    prediction_length: int,
    distance: int | None = None,
    windows: int | None = None,
) -> EvalSplit:
    """GIFT-Eval style test windows: ``split(offset=-test_len)`` + ``generate_instances``.

    The test part is the last test_len steps of every item (the shortest item's test split), so
    every window's horizon lies inside each item's test split; windows defaults to all that fit.
    """
    H = int(prediction_length)
    distance = int(distance or H)
    test_len = min(len(r) for r in splits.test)
    if test_len < H:
        raise EvaluationSplitError(
            f"the test split has {test_len} steps, fewer than the horizon {H}: no full test window; "
            "raise data.test_fraction (or data.test_length) or use a shorter horizon")
    fit = (test_len - H) // distance + 1
    if windows is None:
        windows = fit
    elif windows > fit:
        raise EvaluationSplitError(
            f"{windows} test windows of {H} steps every {distance} steps need {(windows - 1) * distance + H} "
            f"steps, but the test split has {test_len}; use eval.windows <= {fit} or a longer test split")
    if windows < 1:
        raise EvaluationSplitError(f"eval.windows must be >= 1, got {windows}")
    def windows_of(dataset: Dataset) -> TestData:
        _, template = split(dataset, offset=-test_len)
        return template.generate_instances(prediction_length=H, windows=int(windows), distance=distance)

    n_targets = len(frames[0].schema.target_indices)
    test = windows_of(frames_to_gluonts(frames))
    uni_test = test if n_targets == 1 else windows_of(frames_to_gluonts(frames, univariate=True))
    train = frames_to_gluonts(frames, [r.stop for r in splits.train], univariate=True)
    return EvalSplit(train=train, test=test, uni_test=uni_test, n_targets=n_targets, prediction_length=H,
                     windows=int(windows), distance=distance, offset=-test_len, season=seasonality(frames[0].freq),
                     freq=frames[0].freq)


def split_targets(forecasts: list, n_items: int, windows: int, target_names: list[str]) -> list:
    """Joint forecasts (item-major, window inner; arrays [K, H, D]) -> univariate QuantileForecasts in
    uni_test's order (item, target, window). Univariate input is returned as it is."""
    # GluonTS models' SampleForecasts are univariate already; only our joint QuantileForecasts are 3-D.
    if not forecasts or np.ndim(getattr(forecasts[0], "forecast_array", None)) != 3:
        return forecasts
    from gluonts.model.forecast import QuantileForecast

    out = []
    for i in range(n_items):
        for d, name in enumerate(target_names):
            for w in range(windows):
                f = forecasts[i * windows + w]
                out.append(QuantileForecast(np.asarray(f.forecast_array)[:, :, d], start_date=f.start_date,
                                            item_id=f"{f.item_id}/{name}", forecast_keys=f.forecast_keys))
    return out
