"""Calendar flags as known-future covariates: a data loader wrapper for data configs.

GluonTS's DeepAR and TFT add calendar features of their own (hour, day of week, ...); our models read
only the data's variates. A binary weekend flag (in the series' local time zone) gives them the day
type that per-window scaling cannot destroy (binary variates stay unscaled). Use it in a data config:

    loader:
      _target_: tsfm_msa.evaluate.calendar.with_calendar
      _partial_: true
      source: pedestrian            # a bundled dataset name
      timezone: Australia/Melbourne # the timestamps are UTC; weekends are local
"""
from __future__ import annotations

import numpy as np

from tsfm_msa.datasets import SeriesFrame, load_bundled
from tsfm_msa.datasets.schema import SeriesSchema, Variate

WEEKEND = "weekend"


class CalendarError(ValueError):
    """A calendar option that cannot work; the message names the key."""


def add_weekend_flag(frames: list[SeriesFrame], timezone: str | None = None) -> list[SeriesFrame]:
    """Each frame plus a known-future binary variate `weekend` (1 on Saturdays and Sundays, local time)."""
    out = []
    for frame in frames:
        if WEEKEND in frame.schema.names:
            raise CalendarError(f"item {frame.item_id!r} already has a variate named {WEEKEND!r}")
        ts = frame.timestamps  # naive, UTC when the loader converted a zone
        if timezone:
            try:
                ts = ts.tz_localize("UTC").tz_convert(timezone)
            except Exception as err:  # unknown zone name
                raise CalendarError(f"data.loader.timezone={timezone!r} is not a time zone ({err})") from None
        flag = (np.asarray(ts.dayofweek) >= 5).astype(np.float32)  # [T]
        schema = SeriesSchema(frame.schema.variates + (Variate(WEEKEND, "future_covariate", "calendar", binary=True),),
                              frame.schema.freq)
        out.append(SeriesFrame(frame.item_id, frame.timestamps, np.column_stack([frame.values, flag]), schema))
    return out


def with_calendar(source: str, timezone: str | None = None) -> list[SeriesFrame]:
    """The bundled dataset `source` with a weekend flag (see add_weekend_flag)."""
    return add_weekend_flag(load_bundled(source), timezone)
