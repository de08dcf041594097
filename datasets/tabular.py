"""User tables -> list[SeriesFrame]: pandas DataFrames (wide or long), CSV and parquet files."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from .errors import DataValidationError
from .frame import Names, SeriesFrame, check_columns_exist, harmonize, parse_timestamps, resolve_roles


def from_pandas(
    df: pd.DataFrame,
    *,
    format: Literal["wide", "long"] = "wide",
    timestamp: str | None,
    targets: Names,
    past_covariates: Names = (),
    future_covariates: Names = (),
    actions: Names = (),
    item_id: str | None = None,
    variable_col: str | None = None,
    value_col: str | None = None,
    groups: Mapping[str, str] | None = None,
    freq: str | None = None,
    fill_missing_steps: bool = False,
) -> list[SeriesFrame]:
    """Validated frames from a DataFrame.

    format="wide": one row per (item, time step), one column per variate.
    format="long": one row per (item, time step, variate): `variable_col` names the variate and
        `value_col` holds its value; targets/covariates/actions name values of `variable_col`.
    item_id: column naming the item of each row (several series of one schema); None = one item "0".
    Other arguments as in SeriesFrame.from_dataframe. Items keep their order of first appearance.
    """
    if not isinstance(df, pd.DataFrame):
        raise DataValidationError(f"from_pandas expects a pandas DataFrame, got {type(df).__name__}")
    if format == "long":
        df, timestamp = _long_to_wide(
            df, timestamp=timestamp, item_id=item_id, variable_col=variable_col, value_col=value_col,
            names=[n for n, _ in resolve_roles(targets, past_covariates, future_covariates, actions)],
        )
    elif format != "wide":
        raise DataValidationError(f"format={format!r}; expected 'wide' or 'long'")

    kwargs: dict[str, Any] = dict(
        timestamp=timestamp, targets=targets, past_covariates=past_covariates,
        future_covariates=future_covariates, actions=actions, groups=groups, freq=freq,
        fill_missing_steps=fill_missing_steps,
    )
    if item_id is None:
        return [SeriesFrame.from_dataframe(df, item_id="0", **kwargs)]
    check_columns_exist(df, [item_id])
    frames = [
        SeriesFrame.from_dataframe(part, item_id=str(key), **kwargs)
        for key, part in df.groupby(item_id, sort=False, dropna=False)
    ]
    return harmonize(frames)


def _long_to_wide(
    df: pd.DataFrame,
    *,
    timestamp: str | None,
    item_id: str | None,
    variable_col: str | None,
    value_col: str | None,
    names: list[str],
) -> tuple[pd.DataFrame, str]:
    """Pivot (item, time, variable, value) rows into one column per requested variable."""
    if timestamp is None or variable_col is None or value_col is None:
        raise DataValidationError(
            "format='long' needs timestamp=, variable_col= (column naming the variate) and value_col= "
            f"(column holding its value); got timestamp={timestamp!r}, variable_col={variable_col!r}, "
            f"value_col={value_col!r}"
        )
    keys = ([item_id] if item_id is not None else []) + [timestamp]
    check_columns_exist(df, keys + [variable_col, value_col])
    available = pd.unique(df[variable_col].astype(str))
    missing = [n for n in names if n not in set(available)]
    if missing:
        raise DataValidationError(
            f"variates {missing} not found in column {variable_col!r}; available variates are {list(available)}"
        )
    sub = df.loc[df[variable_col].astype(str).isin(names), keys + [variable_col, value_col]].copy()
    sub[variable_col] = sub[variable_col].astype(str)
    sub[timestamp] = parse_timestamps(sub[timestamp], timestamp, item_id)
    dup = sub.duplicated(keys + [variable_col], keep="first")
    if dup.any():
        row = sub.loc[dup].iloc[0]
        where = ", ".join(f"{k}={row[k]}" for k in keys)
        raise DataValidationError(
            f"duplicate timestamps in long data: variate {row[variable_col]!r} has two values at {where}; "
            "aggregate duplicates first (e.g. df.groupby([...]).mean())"
        )
    # Items keep their order of first appearance (pivot would sort them).
    item_order = pd.unique(sub[item_id]) if item_id is not None else None
    wide = sub.pivot(index=keys, columns=variable_col, values=value_col).reset_index()
    wide.columns.name = None
    if item_order is not None:
        wide[item_id] = pd.Categorical(wide[item_id], categories=item_order, ordered=True)
        wide = wide.sort_values([item_id, timestamp], kind="stable")
        wide[item_id] = wide[item_id].astype(object)
    return wide.reset_index(drop=True), timestamp


def _check_file(path: str | os.PathLike[str], reader: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{reader}: no such file {str(p)!r} (resolved to {p.resolve()})")
    return p


def from_csv(
    path: str | os.PathLike[str], *, read_kwargs: Mapping[str, Any] | None = None, **kwargs: Any
) -> list[SeriesFrame]:
    """from_pandas(pd.read_csv(path, **read_kwargs), **kwargs); timestamps are parsed by from_pandas."""
    p = _check_file(path, "from_csv")
    return from_pandas(pd.read_csv(p, **(read_kwargs or {})), **kwargs)


def from_parquet(
    path: str | os.PathLike[str], *, read_kwargs: Mapping[str, Any] | None = None, **kwargs: Any
) -> list[SeriesFrame]:
    """from_pandas(pd.read_parquet(path, **read_kwargs), **kwargs)."""
    p = _check_file(path, "from_parquet")
    return from_pandas(pd.read_parquet(p, **(read_kwargs or {})), **kwargs)
