"""GluonTS datasets (iterables of entry dicts) -> list[SeriesFrame]."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from gluonts.dataset.field_names import FieldName

from .errors import DataValidationError
from .frame import SeriesFrame, detect_binary, harmonize, resolve_groups
from .schema import SeriesSchema, Variate, normalize_freq


def _names(given: Sequence[str] | None, prefix: str, n: int, field: str) -> list[str]:
    if given is None:
        return [prefix] if (n == 1 and prefix == FieldName.TARGET) else [f"{prefix}_{i}" for i in range(n)]
    if len(given) != n:
        raise DataValidationError(f"{len(given)} names given for {field!r}, but entries have {n} rows in it")
    return list(given)


def _rows(entry: Mapping[str, Any], field: str, item: str) -> np.ndarray | None:
    """Field as float32 [F, *] (1-D fields become one row); None if absent."""
    if entry.get(field) is None:
        return None
    arr = np.asarray(entry[field], dtype=np.float32)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise DataValidationError(f"item {item!r}: field {field!r} must be 1-D or 2-D [rows, time], got {arr.shape}")
    return arr


def from_gluonts(
    dataset: Iterable[Mapping[str, Any]],
    freq: str | None = None,
    *,
    target_names: Sequence[str] | None = None,
    future_covariate_names: Sequence[str] | None = None,
    past_covariate_names: Sequence[str] | None = None,
    groups: Mapping[str, str] | None = None,
) -> list[SeriesFrame]:
    """Frames from GluonTS entries.

    target [T] or [V, T] -> targets ("target" or "target_i"); feat_dynamic_real [F, T(+future)] ->
    future covariates (known ahead; steps past T are dropped); past_feat_dynamic_real [P, T] -> past
    covariates. `start` (pd.Period) gives the time axis (period starts); `item_id` names items (else
    their position). freq defaults to the period's frequency. groups as in SeriesFrame.from_dataframe.
    """
    frames: list[SeriesFrame] = []
    schema: SeriesSchema | None = None
    layout: list[tuple[str, int]] = []  # (role, rows) of the first entry; all entries must match
    given_freq = normalize_freq(freq) if freq is not None else None
    for k, entry in enumerate(dataset):
        item = str(entry.get(FieldName.ITEM_ID, k))
        if FieldName.TARGET not in entry or FieldName.START not in entry:
            raise DataValidationError(
                f"GluonTS entry {k} lacks {FieldName.START!r} or {FieldName.TARGET!r}; keys are {sorted(entry)}"
            )
        target = _rows(entry, FieldName.TARGET, item)  # [V, T]
        T = target.shape[1]
        parts: list[tuple[str, np.ndarray]] = [("target", target)]
        for field, role in (
            (FieldName.PAST_FEAT_DYNAMIC_REAL, "past_covariate"),
            (FieldName.FEAT_DYNAMIC_REAL, "future_covariate"),
        ):
            arr = _rows(entry, field, item)
            if arr is None:
                continue
            if arr.shape[1] < T:
                raise DataValidationError(
                    f"item {item!r}: {field!r} covers {arr.shape[1]} steps but the target has {T}"
                )
            parts.append((role, arr[:, :T]))

        start = pd.Period(entry[FieldName.START])
        timestamps = pd.period_range(start=start, periods=T, freq=start.freq).to_timestamp()
        values = np.concatenate([a for _, a in parts], axis=0).T  # [T, V]

        if schema is None:
            layout = [(r, a.shape[0]) for r, a in parts]
            rows = dict(layout)
            names = {
                "target": _names(target_names, FieldName.TARGET, rows["target"], FieldName.TARGET),
                "past_covariate": _names(past_covariate_names, FieldName.PAST_FEAT_DYNAMIC_REAL,
                                         rows.get("past_covariate", 0), FieldName.PAST_FEAT_DYNAMIC_REAL),
                "future_covariate": _names(future_covariate_names, FieldName.FEAT_DYNAMIC_REAL,
                                           rows.get("future_covariate", 0), FieldName.FEAT_DYNAMIC_REAL),
            }
            roles = [(n, r) for r, _ in parts for n in names[r]]
            group_of = resolve_groups(roles, groups)
            # to_timestamp() gives period starts with their own freq ('M' periods -> 'MS' timestamps).
            schema = SeriesSchema(
                tuple(Variate(n, r, group_of[n]) for n, r in roles), freq=given_freq or timestamps.freqstr
            )
        elif [(r, a.shape[0]) for r, a in parts] != layout:
            raise DataValidationError(
                f"item {item!r} has fields (role, rows) {[(r, a.shape[0]) for r, a in parts]} but the first item "
                f"has {layout}; all entries must carry the same target and dynamic-feature fields"
            )
        item_schema = schema.with_binary(detect_binary(values, schema.roles))
        frames.append(SeriesFrame(item_id=item, timestamps=timestamps, values=values, schema=item_schema))
    if not frames:
        raise DataValidationError("the GluonTS dataset has no entries")
    return harmonize(frames)

