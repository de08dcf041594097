"""User tables -> list[SeriesFrame]: pandas DataFrames (wide, item-stacked or long), CSV and parquet files."""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from .errors import DataValidationError, loading_file, option, reading_with, unnamed_series
from .frame import (
    DEFAULT_MAX_FILL_FRACTION,
    DEFAULT_MISSING_VALUES,
    Names,
    SeriesFrame,
    check_columns_exist,
    harmonize,
    parse_timestamps,
    resolve_roles,
    rows_out_of_order,
)


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
    max_fill_fraction: float = DEFAULT_MAX_FILL_FRACTION,
    sort_by_time: bool = True,
    missing_values: Sequence[str | float] = DEFAULT_MISSING_VALUES,
) -> list[SeriesFrame]:
    """Validated frames from a DataFrame.

    format="wide": one row per (item, time step), one column per variate. With item_id naming an
        id column, the rows of several series are stacked in one table ("item-stacked").
    format="long": one row per (item, time step, variate): `variable_col` names the variate and
        `value_col` holds its value; targets/covariates/actions name values of `variable_col`.
        Rows may come in any order (sort_by_time does not apply).
    item_id: column naming the item of each row (several series of one schema); None = one item "0".
    Other arguments as in SeriesFrame.from_dataframe. Items keep their order of first appearance.
    """
    if not isinstance(df, pd.DataFrame):
        raise DataValidationError(f"from_pandas expects a pandas DataFrame, got {type(df).__name__}")
    if len(df) == 0:
        raise DataValidationError(
            f"the data has no rows (columns {[str(c) for c in df.columns]}); give a table with at least one row "
            "per time step"
        )
    if format == "long":
        df, timestamp = _long_to_wide(
            df, timestamp=timestamp, item_id=item_id, variable_col=variable_col, value_col=value_col,
            names=[n for n, _ in resolve_roles(targets, past_covariates, future_covariates, actions)],
        )
    elif format != "wide":
        raise DataValidationError(
            f"{option('format')}={format!r}; expected wide (one column per variate) or long "
            f"(variable/value columns: {option('format', 'long')})"
        )

    kwargs: dict[str, Any] = dict(
        timestamp=timestamp, targets=targets, past_covariates=past_covariates,
        future_covariates=future_covariates, actions=actions, groups=groups, freq=freq,
        fill_missing_steps=fill_missing_steps, max_fill_fraction=max_fill_fraction,
        sort_by_time=sort_by_time, missing_values=missing_values,
    )
    if item_id is None:
        # The id "0" is only a placeholder (the user named none): messages say "the series" instead.
        with unnamed_series():
            return [SeriesFrame.from_dataframe(df, item_id="0", **kwargs)]
    check_columns_exist(df, [item_id], {item_id: "item_id"})
    check_item_column(df[item_id], item_id)
    if timestamp is not None and format == "wide":
        # Sort the stacked items here (one warning for the file, not one per item).
        check_columns_exist(df, [timestamp], {timestamp: "timestamp"})
        df = df.copy(deep=False)
        df[timestamp] = parse_timestamps(df[timestamp], timestamp, item_id)
        df = _in_time_order(df, [item_id], timestamp, sort_by_time, "item-stacked data")
    frames = [
        SeriesFrame.from_dataframe(part, item_id=str(key), **kwargs)
        for key, part in df.groupby(item_id, sort=False, dropna=False)
    ]
    return harmonize(frames)


def check_item_column(ids: pd.Series, item_id: str) -> None:
    """Refuse an item column that gives most series a single row: it holds values (e.g. a temperature),
    not series ids, and every later message would be about one-step items instead of that column."""
    sizes = ids.value_counts(dropna=False)  # rows per item
    single = int((sizes == 1).sum())
    if len(sizes) >= 3 and single > len(sizes) / 2:
        example = ", ".join(repr(str(v)) for v in sizes.index[:3])
        raise DataValidationError(
            f"{option('item_id')}={item_id!r} looks like a value column, not a series id: {single} of its "
            f"{len(sizes)} distinct values ({example}, ...) occur on a single row, so most series would have "
            f"one time step; name the column that tells series apart in {option('item_id')} (a name or code "
            f"repeated on every row of a series), or set it to null for a single series"
        )


def _long_to_wide(
    df: pd.DataFrame,
    *,
    timestamp: str | None,
    item_id: str | None,
    variable_col: str | None,
    value_col: str | None,
    names: list[str],
) -> tuple[pd.DataFrame, str]:
    """Pivot (item, time, variable, value) rows into one column per requested variable.

    Row order carries no meaning in long data: the pivot puts every series in time order.
    """
    if timestamp is None or variable_col is None or value_col is None:
        raise DataValidationError(
            f"{option('format', 'long')} needs {option('timestamp')}, {option('variable_col')} (column naming "
            f"the variate) and {option('value_col')} (column holding its value); got timestamp={timestamp!r}, "
            f"variable_col={variable_col!r}, value_col={value_col!r}"
        )
    keys = ([item_id] if item_id is not None else []) + [timestamp]
    given_as = {timestamp: "timestamp", variable_col: "variable_col", value_col: "value_col"}
    if item_id is not None:
        given_as[item_id] = "item_id"
    check_columns_exist(df, keys + [variable_col, value_col], given_as)
    available = pd.unique(df[variable_col].astype(str))
    missing = [n for n in names if n not in set(available)]
    if missing:
        raise DataValidationError(
            f"variates {missing} (named in {option('targets')} / the covariate lists) not found in column "
            f"{variable_col!r} ({option('variable_col')}); available variates are {list(available)}"
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
            + ("" if item_id is not None else f", or name the column that tells series apart in {option('item_id')}")
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


def _in_time_order(
    df: pd.DataFrame, series_keys: list[str], timestamp: str, sort_by_time: bool, what: str
) -> pd.DataFrame:
    """Rows of each series (one per value of series_keys) in time order: as they are, or sorted (stable,
    series in order of first appearance) with a warning that counts the moved rows, or an error."""
    series = df.groupby(series_keys, sort=False, dropna=False)[timestamp]
    in_order = series.is_monotonic_increasing
    if in_order.all():
        return df
    first = in_order.index[int(np.flatnonzero(~in_order.to_numpy())[0])]
    if not sort_by_time:
        raise DataValidationError(
            f"{what}: the rows of series {first} ({', '.join(series_keys)}) are not in increasing time order; "
            f"sort the data by time first, or let the loader do it with {option('sort_by_time', True)}"
        )
    moved = sum(  # groups iterate in the same first-appearance order as in_order
        rows_out_of_order(t.to_numpy(dtype="datetime64[ns]").view(np.int64))
        for ok, (_, t) in zip(in_order.to_numpy(), series)
        if not ok
    )
    warnings.warn(
        f"{what}: {moved} of {len(df)} rows were out of time order within their series and have been sorted "
        f"by time (set {option('sort_by_time', False)} to reject unsorted data instead)",
        stacklevel=4,
    )
    code = df.groupby(series_keys, sort=False, dropna=False).ngroup().to_numpy()  # [N] series, first-seen order
    order = np.lexsort((df[timestamp].to_numpy(dtype="datetime64[ns]").view(np.int64), code))  # stable
    return df.iloc[order]


def _check_file(path: str | os.PathLike[str], reader: str) -> Path:
    p = Path(path)
    if p.is_dir():
        raise DataValidationError(
            f"{reader}: {str(p)!r} is a directory, not a file; set {option('path')} to the path of a CSV or "
            "Parquet file (e.g. data.loader.path=data/my_series.csv)"
        )
    if not p.is_file():
        raise FileNotFoundError(
            f"{reader}: no such file {str(p)!r} (resolved to {p.resolve()}); set {option('path')} to an existing file"
        )
    return p


def _check_options(kwargs: Mapping[str, Any]) -> None:
    """Unknown loader options (e.g. a typo added with `+data.loader.<name>=`) name the valid ones."""
    valid = [n for n in inspect.signature(from_pandas).parameters if n != "df"]
    unknown = [k for k in kwargs if k not in valid]
    if unknown:
        raise DataValidationError(
            f"unknown loader option(s) {[option(k) for k in unknown]}; valid options are "
            f"{['path', 'read_kwargs', *valid]} (see configs/data/csv.yaml)"
        )


def _read_kwargs(read_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    if read_kwargs is None:
        return {}
    if not isinstance(read_kwargs, Mapping):
        raise DataValidationError(
            f"{option('read_kwargs')} must be a dict of reader keyword arguments (e.g. "
            f"{option('read_kwargs', {'sep': ';'})}), got {read_kwargs!r}"
        )
    return dict(read_kwargs)


def from_csv(
    path: str | os.PathLike[str], *, read_kwargs: Mapping[str, Any] | None = None, **kwargs: Any
) -> list[SeriesFrame]:
    """from_pandas(pd.read_csv(path, **read_kwargs), **kwargs); timestamps are parsed by from_pandas."""
    p = _check_file(path, "from_csv")
    _check_options(kwargs)
    with reading_with(read_kwargs), loading_file(p):
        return from_pandas(_read_csv(p, read_kwargs), **kwargs)


def _read_csv(p: Path, read_kwargs: Mapping[str, Any] | None) -> pd.DataFrame:
    try:
        return pd.read_csv(p, **_read_kwargs(read_kwargs))
    except pd.errors.EmptyDataError:
        raise DataValidationError(
            f"CSV file {str(p)!r} is empty (no header row, no data); give a file with a header line naming the "
            "columns and one row per time step"
        ) from None
    except pd.errors.ParserError as err:
        raise DataValidationError(
            f"CSV file {str(p)!r} cannot be parsed ({str(err).strip()}); check the separator and quoting, e.g. "
            f"{option('read_kwargs', {'sep': ';'})}"
        ) from None
    except UnicodeDecodeError as err:  # pandas reads UTF-8 unless told otherwise; Excel often writes latin-1
        raise DataValidationError(
            f"CSV file {str(p)!r} is not UTF-8 text (byte {err.object[err.start:err.start + 1]!r} at position "
            f"{err.start} cannot be decoded as {err.encoding}); name its encoding (often latin-1 or cp1252 for "
            f"Excel exports): {option('read_kwargs', {'encoding': 'latin-1'})}, or save the file as UTF-8"
        ) from None
    except TypeError as err:  # an unknown keyword for pd.read_csv
        raise DataValidationError(
            f"{option('read_kwargs')}={read_kwargs!r} is not accepted by pandas.read_csv ({err})"
        ) from None


def from_parquet(
    path: str | os.PathLike[str], *, read_kwargs: Mapping[str, Any] | None = None, **kwargs: Any
) -> list[SeriesFrame]:
    """from_pandas(pd.read_parquet(path, **read_kwargs), **kwargs)."""
    p = _check_file(path, "from_parquet")
    _check_options(kwargs)
    with reading_with(read_kwargs), loading_file(p):
        return from_pandas(pd.read_parquet(p, **_read_kwargs(read_kwargs)), **kwargs)
