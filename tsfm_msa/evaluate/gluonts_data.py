"""Our SeriesFrames as GluonTS datasets, and the GIFT-Eval style rolling test windows at the series end,
built on GluonTS's own splitter.

Field mapping (one entry per item): targets -> ``target`` ([T] for one target, [D, T] for several),
past covariates -> ``past_feat_dynamic_real`` [P, T], future covariates and actions (known ahead) ->
``feat_dynamic_real`` [F, T], in schema order.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from gluonts.dataset.common import Dataset, ListDataset
from gluonts.dataset.field_names import FieldName
from gluonts.dataset.split import TestData, split

from tsfm_msa.datasets import SeriesFrame, SeriesSchema, fit_scaler, seasonality
from tsfm_msa.datasets.frame import last_observed


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


def standardize_covariates(frames: list[SeriesFrame], train_stops: list[int]) -> list[SeriesFrame]:
    """Z-score the non-binary covariates of every item with statistics of its steps [0, train_stop) only.

    GluonTS's PatchTST, DeepAR and TFT feed covariates unscaled; EPF's gen_forecast (~58,000)
    would swamp their inputs. Targets are left as they are (metrics are on the original scale). A
    missing covariate value becomes 0, the fitting part's mean (binary ones: off): the GluonTS models
    take no missing covariates (TFT forecasts NaN from one), while ours mask them.
    """
    out = []
    for frame, stop in zip(frames, train_stops):
        schema = frame.schema
        covariate = np.array([r != "target" for r in schema.roles])  # [V]
        keep = ~covariate | np.asarray(schema.binary, dtype=bool)
        loc, scale = fit_scaler(frame.values[:stop], keep)  # [V]; keep -> loc 0, scale 1
        values = (frame.values - loc) / scale  # [T, V]
        values[:, covariate] = np.nan_to_num(values[:, covariate], nan=0.0)
        out.append(SeriesFrame(frame.item_id, frame.timestamps, values, schema))
    return out


# GIFT-Eval: the test part is the last 10% of the shortest series, in at most 20 windows.
GIFT_EVAL_TEST_FRACTION = 0.1
GIFT_EVAL_MAX_WINDOWS = 20


def gift_eval_windows(min_length: int, prediction_length: int) -> int:
    """GIFT-Eval's default number of test windows: ceil(10% of the shortest series / H), between 1 and 20."""
    return min(max(1, math.ceil(GIFT_EVAL_TEST_FRACTION * min_length / prediction_length)), GIFT_EVAL_MAX_WINDOWS)


@dataclass
class EvalSplit:
    """The rolling test windows of one dataset, in GluonTS form, aligned to the end of every series.

    The last window ends at each series' last step; windows start every `distance` steps before it.
    Everything before the first window (steps [0, train_stops[i])) is what every learned model fits on.
    train: those fitting parts, one series per target (what the GluonTS baselines train on);
    test: GluonTS TestData (input = history incl. known-future covariates, label = truth) of the joint
    series (what our multi-target models read); uni_test: the same windows with one series per target,
    in the order (item, target, window) - what every model is scored on.
    """

    train: Dataset
    test: TestData
    uni_test: TestData
    n_targets: int
    prediction_length: int
    windows: int
    distance: int
    offset: int
    train_stops: list[int]
    season: int
    freq: str

    @property
    def test_length(self) -> int:
        """Steps from the first window's start to the series end."""
        return -self.offset


def make_eval_split(
    frames: list[SeriesFrame],
    prediction_length: int,
    windows: int,
    distance: int | None = None,
    min_train: int = 1,
) -> EvalSplit:
    """The last `windows` windows of `prediction_length` steps, every `distance` steps, ending at each
    series' end: GluonTS ``split(offset=-test_length)`` + ``generate_instances``, with
    test_length = (windows - 1) * distance + prediction_length (GIFT-Eval's layout).

    min_train: the fewest steps an item must keep before its first window (a model's context)."""
    H = int(prediction_length)
    distance = int(distance or H)
    if H < 1 or distance < 1:
        raise EvaluationSplitError(f"the horizon and eval.distance must be >= 1, got {H} and {distance}")
    if int(windows) < 1:
        raise EvaluationSplitError(f"eval.windows must be >= 1, got {windows}")
    windows = int(windows)
    test_len = (windows - 1) * distance + H
    shortest = min(f.length for f in frames)
    if shortest - test_len < min_train:
        fit = max(0, (shortest - min_train - H) // distance + 1)
        raise EvaluationSplitError(
            f"{windows} test windows of {H} steps every {distance} steps need the last {test_len} steps of every "
            f"series plus {min_train} earlier steps to fit on, but the shortest series has {shortest}; "
            f"use eval.windows <= {fit}")

    _require_observed_test_targets(frames, test_len, H, windows, distance)

    def windows_of(dataset: Dataset) -> TestData:
        _, template = split(dataset, offset=-test_len)
        return template.generate_instances(prediction_length=H, windows=windows, distance=distance)

    n_targets = len(frames[0].schema.target_indices)
    test = windows_of(frames_to_gluonts(frames))
    uni_test = test if n_targets == 1 else windows_of(frames_to_gluonts(frames, univariate=True))
    train_stops = [f.length - test_len for f in frames]
    train = frames_to_gluonts(frames, train_stops, univariate=True)
    return EvalSplit(train=train, test=test, uni_test=uni_test, n_targets=n_targets, prediction_length=H,
                     windows=windows, distance=distance, offset=-test_len, train_stops=train_stops,
                     season=seasonality(frames[0].freq), freq=frames[0].freq)


def _require_observed_test_targets(frames: list[SeriesFrame], test_len: int, H: int, windows: int,
                                   distance: int) -> None:
    """Refuse test windows in which a target has no observed value: every model would score NaN."""
    schema = frames[0].schema
    offsets = (np.arange(windows)[:, None] * distance + np.arange(H)).ravel()  # [windows * H] from window 0
    for j in schema.target_indices:
        if any(f.mask[f.length - test_len + offsets, j].any() for f in frames):
            continue
        name = schema.names[j]
        last = last_observed(frames, j)
        raise EvaluationSplitError(
            f"target {name!r} has no observed value in the test windows (0 of {windows * H * len(frames)} values "
            f"in the last {test_len} steps of every series), so every model would score NaN; {name!r} is last "
            f"observed at {last}: drop the rows after that (they hold no {name!r}), or use fewer test steps "
            "(eval.windows / data.test_length)"
        )


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


def target_test_data(uni_test: TestData, n_targets: int, target: int) -> TestData:
    """The windows of one target (position ``target`` in the schema's targets) of the univariate test data,
    whose series run (item, target): the same GluonTS TestData on that target's series only."""
    entries = list(uni_test.dataset)
    if len(entries) % n_targets:
        raise ValueError(f"{len(entries)} univariate series are not a whole number of items x {n_targets} targets")
    return dataclasses.replace(uni_test, dataset=entries[target::n_targets])


def target_forecasts(forecasts: list, n_targets: int, windows: int, target: int) -> list:
    """The forecasts of one target from forecasts in uni_test's order (item, target, window)."""
    return [f for j, f in enumerate(forecasts) if (j // windows) % n_targets == target]
