"""SeriesFrame: one validated multivariate series item, and its construction from a DataFrame."""

from __future__ import annotations

import bisect
import dataclasses
import datetime
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from pandas.api import types as pdt
from pandas.tseries.frequencies import to_offset

from .errors import DataValidationError, item_label, option, unnamed_series
from .schema import ROLES, SeriesSchema, Variate, normalize_freq

Names = str | Sequence[str]

_TRUE_FALSE = {"true": 1.0, "false": 0.0}

# Cells holding one of these strings (compared after stripping spaces, case-insensitive) are missing
# values (NaN). Blank and whitespace-only cells always are. Documented in configs/data/csv.yaml.
DEFAULT_MISSING_VALUES: tuple[str, ...] = (
    "", "NA", "N/A", "NaN", "null", "None", "-", "--", "?", "#N/A", "missing",
)
# fill_missing_steps refuses to invent more than this share of the grid (as empty steps) unless raised.
DEFAULT_MAX_FILL_FRACTION = 0.1

# A time of day without a date ("13:45", "1:05:30 PM"): pandas would silently date it today.
_TIME_OF_DAY = re.compile(r"\d{1,2}:\d{2}(:\d{2}(\.\d+)?)?\s*([AaPp]\.?[Mm]\.?)?")
_DECIMAL_COMMA = re.compile(r"[-+]?\d+,\d+")
# "5,034.6" or "1,234,567": commas grouping thousands (checked after _DECIMAL_COMMA, so "5,034" stays a
# decimal-comma hint; the two cannot be told apart without a point).
_THOUSANDS_COMMA = re.compile(r"[-+]?\d{1,3}(,\d{3})+(\.\d*)?")
# Options that list the variates of each role (for messages naming the option to edit).
_ROLE_OPTION = {"target": "targets", "past_covariate": "past_covariates",
                "future_covariate": "future_covariates", "action": "actions"}


@dataclass(frozen=True, eq=False, repr=False)
class SeriesFrame:
    """One multivariate series on a regular time grid.

    values: float32 [T, V], columns in schema order; NaN marks a missing value (+/-inf is turned
    into NaN with a warning). Construction validates everything; a SeriesFrame that exists is valid.
    """

    item_id: str
    timestamps: pd.DatetimeIndex  # [T]
    values: np.ndarray  # float32 [T, V]
    schema: SeriesSchema

    def __post_init__(self) -> None:
        item = str(self.item_id)
        object.__setattr__(self, "item_id", item)
        ts = _as_naive_index(self.timestamps, f"timestamps of {item_label(item)}")
        object.__setattr__(self, "timestamps", ts)

        values = np.array(self.values, dtype=np.float32, copy=True)  # [T, V]; own copy, frame is immutable
        if values.ndim == 1:
            values = values[:, None]
        if values.ndim != 2:
            raise DataValidationError(f"{item_label(item)}: values must be 2-D [time, variate], got shape {values.shape}")
        if values.shape[1] != self.schema.n_variates:
            raise DataValidationError(
                f"{item_label(item)}: values have {values.shape[1]} columns but the schema has "
                f"{self.schema.n_variates} variates {list(self.schema.names)}"
            )
        if values.shape[0] != len(ts):
            raise DataValidationError(
                f"{item_label(item)}: {values.shape[0]} rows of values but {len(ts)} timestamps"
            )
        inf = np.isinf(values)
        if inf.any():
            cols = [self.schema.names[j] for j in np.flatnonzero(inf.any(axis=0))]
            warnings.warn(
                f"{item_label(item)}: {int(inf.sum())} infinite values in {cols} were replaced by NaN (missing)",
                stacklevel=3,
            )
            values[inf] = np.nan
        values.setflags(write=False)
        object.__setattr__(self, "values", values)

        check_timestamps(ts, item)
        check_grid(ts, self.schema.freq, item, freq_source="the schema")
        _check_values(values, self.schema, item)

    # ------------------------------------------------------------------------------------------
    @property
    def length(self) -> int:
        return int(self.values.shape[0])

    @property
    def freq(self) -> str:
        return self.schema.freq

    @property
    def mask(self) -> np.ndarray:
        """bool [T, V], True where observed."""
        return ~np.isnan(self.values)

    def column(self, name: str) -> np.ndarray:
        """float32 [T] values of one variate."""
        return self.values[:, self.schema.index(name)]

    def with_schema(self, schema: SeriesSchema) -> "SeriesFrame":
        return dataclasses.replace(self, schema=schema)

    def to_dataframe(self, timestamp: str = "timestamp", item_col: str | None = None) -> pd.DataFrame:
        """Wide DataFrame: a timestamp column, then one column per variate (optionally an item column)."""
        df = pd.DataFrame(self.values, columns=list(self.schema.names))
        df.insert(0, timestamp, self.timestamps)
        if item_col is not None:
            df.insert(0, item_col, self.item_id)
        return df

    def __repr__(self) -> str:
        return (
            f"SeriesFrame(item_id={self.item_id!r}, length={self.length}, freq={self.freq!r}, "
            f"start={self.timestamps[0]}, variates={list(self.schema.names)}, roles={list(self.schema.roles)})"
        )

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_dataframe(
        cls,
        df: pd.DataFrame,
        *,
        timestamp: str | None,
        targets: Names,
        past_covariates: Names = (),
        future_covariates: Names = (),
        actions: Names = (),
        groups: Mapping[str, str] | None = None,
        freq: str | None = None,
        item_id: str = "0",
        fill_missing_steps: bool = False,
        max_fill_fraction: float = DEFAULT_MAX_FILL_FRACTION,
        sort_by_time: bool = True,
        missing_values: Sequence[str | float] = DEFAULT_MISSING_VALUES,
    ) -> "SeriesFrame":
        """Build a validated frame from a wide DataFrame (one row per time step, one column per variate).

        timestamp: name of the time column (None: use the DataFrame's DatetimeIndex). Timezone-aware
            times are converted to UTC and the zone dropped, so DST does not break the grid.
        groups: variate name -> sensor group; variates not listed get the group named after their role.
        freq: pandas frequency string; inferred from the timestamps when None.
        fill_missing_steps: insert NaN rows for time steps absent from the grid instead of raising
            (with a warning that counts them), but never more than max_fill_fraction of the grid.
        sort_by_time: rows out of time order are sorted, with a warning that counts the moved rows;
            False rejects them.
        missing_values: cell strings that mean "missing" (matched after stripping spaces, ignoring
            case; blank cells always are) and numbers that do (sentinels such as -999).
        Boolean columns (bool dtype or TRUE/FALSE strings) become 0/1; non-target 0/1 columns are
        flagged binary (left unscaled).
        """
        if not isinstance(df, pd.DataFrame):
            raise DataValidationError(f"expected a pandas DataFrame, got {type(df).__name__}")
        roles = resolve_roles(targets, past_covariates, future_covariates, actions)
        names = [n for n, _ in roles]
        given_as = {n: _ROLE_OPTION[r] for n, r in roles}
        if timestamp is not None:
            given_as[timestamp] = "timestamp"
        check_columns_exist(df, list(given_as), given_as)
        group_of = resolve_groups(roles, groups)
        markers = missing_markers(missing_values)

        if timestamp is None:
            if not isinstance(df.index, pd.DatetimeIndex):
                raise DataValidationError(
                    f"{item_label(item_id)}: timestamp=None needs a DatetimeIndex, but the index is "
                    f"{type(df.index).__name__}; pass timestamp='<time column>'"
                )
            ts = _as_naive_index(df.index, "the DataFrame index")
        else:
            ts = parse_timestamps(df[timestamp], timestamp, item_id)
        if len(ts) and sort_by_time and not ts.is_monotonic_increasing:
            order = time_order(ts, item_label(item_id))  # [T]
            ts, df = ts[order], df.iloc[order]
        check_timestamps(ts, str(item_id))

        values = np.empty((len(df), len(names)), dtype=np.float32)  # [T, V]
        for j, (name, role) in enumerate(roles):
            values[:, j] = column_to_float(df[name], name, role, markers)

        freq_source = f"given as {option('freq')}={freq}"
        if freq is None:
            freq, freq_source = infer_freq(ts, str(item_id))
        freq = normalize_freq(freq)
        if fill_missing_steps:
            ts, values = reindex_to_grid(ts, values, freq, str(item_id), max_fill_fraction)
        else:
            check_grid(ts, freq, str(item_id), freq_source=freq_source)

        binary = detect_binary(values, [r for _, r in roles])
        schema = SeriesSchema(
            variates=tuple(Variate(n, r, group_of[n], b) for (n, r), b in zip(roles, binary)), freq=freq
        )
        return cls(item_id=str(item_id), timestamps=ts, values=values, schema=schema)


# ---------------------------------------------------------------------------------------------
# collections


def validate_collection(frames: Sequence[SeriesFrame]) -> SeriesSchema:
    """Check that frames share one schema and have unique item ids; return the common schema.

    Binary flags are agreed across items: a variate is binary only if it is binary in every item.
    """
    if isinstance(frames, SeriesFrame):
        frames = [frames]
    if len(frames) == 0:
        raise DataValidationError("the collection of series is empty; load at least one SeriesFrame")
    for i, f in enumerate(frames):
        if not isinstance(f, SeriesFrame):
            raise DataValidationError(
                f"element {i} of the collection is a {type(f).__name__}, not a SeriesFrame; build frames "
                "with SeriesFrame.from_dataframe / from_pandas / from_gluonts"
            )
    ref = frames[0]
    for f in frames[1:]:
        diffs = ref.schema.differences(f.schema)
        if diffs:
            raise DataValidationError(
                f"item {f.item_id!r} does not match item {ref.item_id!r}: " + "; ".join(diffs)
            )
    seen: set[str] = set()
    for f in frames:
        if f.item_id in seen:
            raise DataValidationError(f"item id {f.item_id!r} appears more than once; item ids must be unique")
        seen.add(f.item_id)
    binary = tuple(all(f.schema.binary[j] for f in frames) for j in range(ref.schema.n_variates))
    return ref.schema.with_binary(binary)


def last_observed(frames: Sequence[SeriesFrame], variate: int) -> pd.Timestamp | None:
    """The latest time at which ``variate`` is observed in any of ``frames`` (None if it never is): where
    messages about a split without observed values tell the user to cut the data."""
    times = [f.timestamps[idx[-1]] for f in frames if len(idx := np.flatnonzero(f.mask[:, variate]))]
    return max(times, default=None)


def harmonize(frames: Sequence[SeriesFrame]) -> list[SeriesFrame]:
    """Validate a collection and give every frame the agreed common schema."""
    schema = validate_collection(frames)
    return [f if f.schema.binary == schema.binary else f.with_schema(schema) for f in frames]


# ---------------------------------------------------------------------------------------------
# argument checks (shared with the tabular / GluonTS loaders)


def _as_tuple(names: Names, arg: str) -> tuple[str, ...]:
    if names is None:
        return ()
    if isinstance(names, str):
        return (names,)
    out = tuple(names)
    for n in out:
        if not isinstance(n, str):
            raise DataValidationError(
                f"{option(arg)} must list column names (str), got {n!r} of type {type(n).__name__}; on the "
                f"command line quote names that look like numbers, booleans or null: '{option(arg)}=[\"{n}\"]'"
            )
    return out


def resolve_roles(targets: Names, past: Names, future: Names, actions: Names) -> list[tuple[str, str]]:
    """[(name, role)] in layout order: targets, past covariates, future covariates, actions."""
    lists = {
        "target": _as_tuple(targets, "targets"),
        "past_covariate": _as_tuple(past, "past_covariates"),
        "future_covariate": _as_tuple(future, "future_covariates"),
        "action": _as_tuple(actions, "actions"),
    }
    if not lists["target"]:
        raise DataValidationError(
            f"no target variates given ({option('targets')} is empty); set "
            f"{option('targets', ['<column>'])} naming at least one column to forecast"
        )
    role_of: dict[str, str] = {}
    out: list[tuple[str, str]] = []
    for role in ROLES:
        for n in lists[role]:
            if n in role_of:
                if role_of[n] == role:
                    raise DataValidationError(
                        f"variate {n!r} is listed twice in {option(_ROLE_OPTION[role])}; list it once")
                raise DataValidationError(
                    f"variate {n!r} is listed both in {option(_ROLE_OPTION[role_of[n]])} and in "
                    f"{option(_ROLE_OPTION[role])}; a variate has exactly one role"
                )
            role_of[n] = role
            out.append((n, role))
    return out


def resolve_groups(roles: list[tuple[str, str]], groups: Mapping[str, str] | None) -> dict[str, str]:
    """variate -> sensor group; default group = the variate's role."""
    group_of = {n: r for n, r in roles}
    if groups is None:
        return group_of
    if not isinstance(groups, Mapping):
        raise DataValidationError(
            f"{option('groups')} must map variate -> group name (e.g. {option('groups', {'load': 'grid'})}), "
            f"got {type(groups).__name__}"
        )
    unknown = [k for k in groups if k not in group_of]
    if unknown:
        raise DataValidationError(
            f"{option('groups')} has keys {unknown} that are not variates of this series; keys must be among "
            f"{list(group_of)} (targets, covariates and actions)"
        )
    for k, g in groups.items():
        if not isinstance(g, str) or not g:
            raise DataValidationError(f"{option('groups')}[{k!r}] must be a non-empty group name (str), got {g!r}")
        group_of[k] = g
    return group_of


def check_columns_exist(
    df: pd.DataFrame, names: Sequence[str], given_as: Mapping[str, str] | None = None
) -> None:
    """Every name is exactly one column; given_as maps a name to the loader option that named it."""
    missing = [n for n in names if n not in df.columns]
    if missing:
        where = ""
        if given_as:
            options = list(dict.fromkeys(option(given_as[n]) for n in missing if n in given_as))
            where = f" (named in {', '.join(options)})"
        raise DataValidationError(
            f"columns {missing}{where} not found in the data; available columns are "
            f"{[str(c) for c in df.columns]}{_column_hint(df, missing)}"
        )
    doubled = [n for n in names if (df.columns == n).sum() > 1]
    if doubled:
        raise DataValidationError(f"columns {doubled} appear more than once in the data; rename or drop the copies")


def _column_hint(df: pd.DataFrame, missing: Sequence[str]) -> str:
    """Why a named column may be absent: a wrong CSV separator, or spaces around header names."""
    columns = [str(c) for c in df.columns]
    if len(columns) == 1:
        for sep in (";", "\t", "|"):
            if sep in columns[0]:
                return (f". The file seems to separate columns with {sep!r}: set "
                        f"{option('read_kwargs', {'sep': sep})}")
    stripped = {c.strip(): c for c in columns}
    if any(str(n).strip() in stripped for n in missing):
        return (f". Header names have spaces around them: set {option('read_kwargs', {'skipinitialspace': True})}, "
                "or name the columns exactly as in the file")
    return ""


def parse_timestamps(col: pd.Series, name: str, item_id: object) -> pd.DatetimeIndex:
    """Dates/times of a column; numbers and dateless times of day are refused (pandas misreads them)."""
    if pdt.is_numeric_dtype(col.dtype) and not pdt.is_bool_dtype(col.dtype):
        first = col.dropna().iloc[0] if col.notna().any() else None
        raise DataValidationError(
            f"timestamp column {name!r} ({option('timestamp')}) holds numbers (e.g. {first}), not dates; pandas "
            "would read them as nanoseconds after 1970. Write dates such as 2024-01-31 13:45, read a year "
            f"column as text ({option('read_kwargs', {'dtype': {name: 'str'}})}), or convert Unix times "
            "in Python (pd.to_datetime(df[col], unit='s'))"
        )
    if pdt.is_object_dtype(col.dtype) or pdt.is_string_dtype(col.dtype):
        present = col.dropna()
        time_only = present.map(
            lambda x: isinstance(x, datetime.time)
            or (isinstance(x, str) and _TIME_OF_DAY.fullmatch(x.strip()) is not None)
        ).astype(bool)
        if time_only.any():
            row = present.index[int(np.flatnonzero(time_only.to_numpy())[0])]
            raise DataValidationError(
                f"timestamp column {name!r} ({option('timestamp')}) holds a time of day without a date "
                f"({present[row]!r} at row {row}); pandas would silently give it today's date. Combine the "
                "date and the time into one column (e.g. 2024-01-31 13:45) before loading"
            )
    try:
        ts = _to_datetime(col)
    except (ValueError, TypeError) as err:
        # pandas' own message runs over several lines and names Python arguments: keep its first line.
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        first_line = first_line.replace(" You might want to try:", "").rstrip(" .:")
        raise DataValidationError(
            f"timestamp column {name!r} ({option('timestamp')}) cannot be parsed as dates/times ({first_line}); "
            "pass ISO-8601 strings, or tell pandas the layout when reading the CSV, e.g. day-first dates: "
            f"{option('read_kwargs', {'parse_dates': [name], 'dayfirst': True})} (or date_format:'%d/%m/%Y %H:%M')"
        ) from err
    return _as_naive_index(pd.DatetimeIndex(ts), f"timestamp column {name!r}")


def _to_datetime(col: pd.Series) -> pd.Series | pd.DatetimeIndex:
    """pd.to_datetime, but times with several UTC offsets (a zone across a DST change: +01:00 then
    +02:00) are read as UTC instead of left as objects that no DatetimeIndex accepts."""
    with warnings.catch_warnings():
        # pandas < 3 warns about mixed offsets and returns objects; the retry below handles them.
        warnings.filterwarnings("ignore", message=".*mixed time zones.*", category=FutureWarning)
        try:
            ts = pd.to_datetime(col)
        except ValueError as err:
            if "utc=True" not in str(err):  # mixed-offset datetime objects / pandas >= 3 strings
                raise
            return pd.to_datetime(col, utc=True)
    if isinstance(ts, pd.Series) and not pdt.is_datetime64_any_dtype(ts.dtype) and col.notna().any():
        ts = pd.to_datetime(col, utc=True)
    return ts


def _as_naive_index(ts: object, what: str) -> pd.DatetimeIndex:
    """DatetimeIndex without timezone (aware times -> UTC wall clock) and without NaT."""
    try:
        idx = pd.DatetimeIndex(ts)
    except (ValueError, TypeError) as err:
        raise DataValidationError(f"{what} are not datetimes: {err}") from err
    if idx.tz is not None:
        idx = idx.tz_convert("UTC").tz_localize(None)
    if idx.hasnans:
        row = int(np.flatnonzero(idx.isna())[0])
        raise DataValidationError(f"{what} has a missing time (NaT) at row {row}; drop or fill that row")
    return idx.as_unit("ns")


def detect_binary(values: np.ndarray, roles: Sequence[str]) -> tuple[bool, ...]:
    """Per variate of values [T, V]: a non-target whose observed values are all 0 or 1 (left unscaled)."""
    flags = []
    for j, role in enumerate(roles):
        col = values[:, j]
        col = col[~np.isnan(col)]
        flags.append(role != "target" and col.size > 0 and bool(np.isin(col, (0.0, 1.0)).all()))
    return tuple(flags)


@dataclass(frozen=True)
class MissingMarkers:
    """The missing_values option split by kind: cell strings (normalized) and numeric sentinels."""

    given: tuple[str | float, ...]
    strings: frozenset[str]
    numbers: tuple[float, ...]


def missing_markers(missing_values: Sequence[str | float] | None) -> MissingMarkers:
    """Validate the missing_values option: strings (matched stripped, case-insensitive) and numbers."""
    if missing_values is None:
        missing_values = ()
    if isinstance(missing_values, (str, bytes)) or not isinstance(missing_values, Sequence):
        raise DataValidationError(
            f"{option('missing_values')} must be a list of strings/numbers, got {missing_values!r}; e.g. "
            f"{option('missing_values', ['', 'NA', '-'])}"
        )
    strings, numbers = {""}, []
    for m in missing_values:
        if isinstance(m, str):
            strings.add(m.strip().lower())
        elif isinstance(m, (int, float)) and not isinstance(m, bool):
            numbers.append(float(m))
        elif m is not None:  # None (an unquoted null on the command line) is missing anyway
            raise DataValidationError(
                f"{option('missing_values')} holds {m!r} of type {type(m).__name__}; give strings or numbers"
            )
    return MissingMarkers(tuple(missing_values), frozenset(strings), tuple(numbers))


def column_to_float(
    col: pd.Series, name: str, role: str, markers: MissingMarkers | None = None
) -> np.ndarray:
    """float64 [T] values of one column, NaN = missing (missing-value markers included); booleans become 0/1."""
    markers = markers if markers is not None else missing_markers(DEFAULT_MISSING_VALUES)
    if pdt.is_bool_dtype(col.dtype) or (
        pdt.is_numeric_dtype(col.dtype) and not pdt.is_complex_dtype(col.dtype)
    ):
        return _mask_sentinels(col.to_numpy(dtype=np.float64, na_value=np.nan), markers)
    if pdt.is_object_dtype(col.dtype) or pdt.is_string_dtype(col.dtype):
        is_marker = col.map(lambda x: isinstance(x, str) and x.strip().lower() in markers.strings).astype(bool)
        col = col.astype(object).mask(is_marker, None)
        present = col[col.notna()]
        # Booleans that arrive as Python bools or TRUE/FALSE strings (CSV exports from R, Excel).
        as_bool = present.map(
            lambda x: float(x) if isinstance(x, (bool, np.bool_))
            else _TRUE_FALSE.get(x.strip().lower()) if isinstance(x, str) else None
        )
        if len(present) and as_bool.notna().all():
            out = np.full(len(col), np.nan)
            out[col.notna().to_numpy()] = as_bool.to_numpy(dtype=np.float64)
            return out
        num = pd.to_numeric(col, errors="coerce")
        bad = num.isna() & col.notna()
        if not bad.any():
            return _mask_sentinels(num.to_numpy(dtype=np.float64, na_value=np.nan), markers)
        row = int(np.flatnonzero(bad.to_numpy())[0])
        value = col.iloc[row]
        hint = ""
        if isinstance(value, str) and _DECIMAL_COMMA.fullmatch(value.strip()):
            hint = f"; it has a decimal comma: set {option('read_kwargs', {'decimal': ','})}"
        elif isinstance(value, str) and _THOUSANDS_COMMA.fullmatch(value.strip()):
            hint = f"; it has a thousands separator: set {option('read_kwargs', {'thousands': ','})}"
        raise DataValidationError(
            f"column {name!r} ({role}) is not numeric: value {value!r} at row {col.index[row]} is not a number, "
            f"TRUE/FALSE or a missing-value marker{hint}. If it marks a missing value, add it to "
            f"{option('missing_values')} (now {list(markers.given)}); otherwise convert the column to numbers "
            f"(e.g. one-hot encode categories into 0/1 columns) or remove it from {option(_ROLE_OPTION[role])}"
        )
    raise DataValidationError(
        f"column {name!r} ({role}) has dtype {col.dtype}, which is not numeric; targets, covariates and "
        "actions must be numbers or booleans (one-hot encode categories, convert dates to features)"
    )


def _mask_sentinels(values: np.ndarray, markers: MissingMarkers) -> np.ndarray:
    """float64 [T] with numeric missing-value sentinels (e.g. -999) set to NaN."""
    if markers.numbers:
        values = values.copy()
        values[np.isin(values, markers.numbers)] = np.nan
    return values


# ---------------------------------------------------------------------------------------------
# time-axis checks


def rows_out_of_order(t: np.ndarray) -> int:
    """Fewest rows that must move to sort int64 times t [T]: T minus the longest non-decreasing run
    (a subsequence, found in O(T log T) by patience sorting)."""
    tails: list[int] = []  # tails[k]: smallest last value of a non-decreasing subsequence of length k + 1
    for x in t.tolist():
        k = bisect.bisect_right(tails, x)
        if k == len(tails):
            tails.append(x)
        else:
            tails[k] = x
    return len(t) - len(tails)


def time_order(ts: pd.DatetimeIndex, what: str) -> np.ndarray:
    """int [T] row order that sorts unsorted times (stable); warns how many rows had to move."""
    moved = rows_out_of_order(ts.asi8)
    warnings.warn(
        f"{what}: {moved} of {len(ts)} rows were out of time order and have been sorted by time "
        f"(set {option('sort_by_time', False)} to reject unsorted data instead)",
        stacklevel=4,
    )
    return np.argsort(ts.asi8, kind="stable")


def check_timestamps(ts: pd.DatetimeIndex, item_id: str) -> None:
    """Strictly increasing timestamps; errors show the first offending row."""
    if len(ts) == 0:
        raise DataValidationError(f"{item_label(item_id)} has no rows")
    t = ts.asi8  # int64 [T] nanoseconds
    step = np.diff(t)
    back = np.flatnonzero(step < 0)
    if back.size:
        i = int(back[0]) + 1
        raise DataValidationError(
            f"timestamps of {item_label(item_id)} are not in increasing order: row {i} ({ts[i]}) comes after "
            f"row {i - 1} ({ts[i - 1]}); sort the data by time first, or let the loader do it with "
            f"{option('sort_by_time', True)}"
        )
    same = np.flatnonzero(step == 0)
    if same.size:
        i = int(same[0]) + 1
        raise DataValidationError(
            f"{item_label(item_id)} has duplicate timestamps: {ts[i]} appears at rows {i - 1} and {i} (after sorting "
            "by time); aggregate duplicates (e.g. df.groupby(<timestamp column>).mean()) or drop them. "
            f"Several series stacked in one file? Name their id column in {option('item_id')}"
        )


def infer_freq(ts: pd.DatetimeIndex, item_id: str) -> tuple[str, str]:
    """(freq, how it was found). Exact pandas inference first, else the most common step."""
    if len(ts) < 3:
        raise DataValidationError(
            f"{item_label(item_id)} has only {len(ts)} time steps, too few to infer the frequency; set "
            f"{option('freq', 'h')}"
        )
    freq = pd.infer_freq(ts)
    if freq is not None:
        return normalize_freq(freq), "inferred"
    steps, counts = np.unique(np.diff(ts.asi8), return_counts=True)
    step = pd.Timedelta(int(steps[np.argmax(counts)]), unit="ns")
    return to_offset(step).freqstr, "inferred from the most common step"


def spacing_mismatch(ts: pd.DatetimeIndex, freq: str, *, coarser_only: bool = False) -> str | None:
    """A sentence and a fix when `freq`'s step is not the data's median spacing (e.g. freq D on hourly
    data), else None. coarser_only: only a freq coarser than the data (filling steps can upsample to
    a finer one, within max_fill_fraction, but never merge rows)."""
    if len(ts) < 2:
        return None
    data_step = _median_step(ts)
    grid = pd.date_range(start=ts[0], periods=min(len(ts), 60) + 1, freq=to_offset(freq))
    freq_step = pd.Timedelta(int(np.median(np.diff(grid.asi8))), unit="ns")
    ratio = data_step / freq_step
    if 2 / 3 <= ratio <= 1.5 or (coarser_only and ratio > 1):  # months of 28-31 days still match 'MS'
        return None
    data_freq = _step_text(data_step)
    return (f"the data's median spacing is {data_freq} but freq {freq!r} steps {_step_text(freq_step)}, and freq "
            f"must match the data's spacing: set {option('freq', data_freq)} or leave {option('freq')} unset (null) "
            f"to infer it, or resample the data to {freq!r} first")


def _median_step(ts: pd.DatetimeIndex) -> pd.Timedelta:
    return pd.Timedelta(int(np.median(np.diff(ts.asi8))), unit="ns")


def _step_text(step: pd.Timedelta) -> str:
    """A time step as a pandas frequency with its count: 1h, 30min, 1D."""
    text = to_offset(step).freqstr
    return text if text[0].isdigit() else f"1{text}"


def check_grid(ts: pd.DatetimeIndex, freq: str, item_id: str, *, freq_source: str) -> None:
    """Every step equals one `freq` period; error shows the first gap or misaligned time."""
    offset = to_offset(freq)
    mismatch = spacing_mismatch(ts, freq)
    if mismatch:
        raise DataValidationError(
            f"{item_label(item_id)}: timestamps are not on a regular {freq!r} grid (freq {freq_source}): {mismatch}")
    if not offset.is_on_offset(ts[0]):
        raise DataValidationError(
            f"{item_label(item_id)}: first timestamp {ts[0]} is not on the {freq!r} grid (freq {freq_source}); "
            f"set the right {option('freq')} (e.g. 'ME' vs 'MS' for month ends vs starts) or resample the data"
        )
    expected = pd.date_range(start=ts[0], periods=len(ts), freq=offset)
    bad = np.flatnonzero(expected.asi8 != ts.asi8)
    if bad.size:
        i = int(bad[0])
        grid = pd.date_range(start=ts[0], end=ts[-1], freq=offset)
        n_absent = len(grid) - len(ts)
        absent = f"{n_absent} of {len(grid)} steps are absent" if n_absent > 0 else "steps are off the grid"
        raise DataValidationError(
            f"{item_label(item_id)}: timestamps are not on a regular {freq!r} grid (freq {freq_source}; {absent}): "
            f"after {ts[i - 1]} (row {i - 1}) comes {ts[i]} but the next step should be {expected[i]}. "
            f"Set the right {option('freq')}, resample to a regular grid (df.resample(freq).mean()), or set "
            f"{option('fill_missing_steps', True)} to insert missing steps as NaN"
        )


def reindex_to_grid(
    ts: pd.DatetimeIndex,
    values: np.ndarray,
    freq: str,
    item_id: str,
    max_fill_fraction: float = DEFAULT_MAX_FILL_FRACTION,
) -> tuple[pd.DatetimeIndex, np.ndarray]:
    """Place rows on the full regular grid between first and last time; absent steps become NaN rows.

    Warns how many steps were inserted; refuses to insert more than max_fill_fraction of the grid.
    """
    if isinstance(max_fill_fraction, bool) or not isinstance(max_fill_fraction, (int, float)) or not (
        0.0 <= max_fill_fraction <= 1.0
    ):
        raise DataValidationError(
            f"{option('max_fill_fraction')} must be a number in [0, 1] (the largest share of the time grid "
            f"fill_missing_steps may insert), got {max_fill_fraction!r}"
        )
    offset = to_offset(freq)
    mismatch = spacing_mismatch(ts, freq, coarser_only=True)
    if mismatch:  # inserting steps cannot merge the data's rows into a coarser grid
        raise DataValidationError(
            f"{item_label(item_id)}: timestamps are not on a regular {freq!r} grid and fill_missing_steps cannot "
            f"help: {mismatch}")
    if not offset.is_on_offset(ts[0]):
        raise DataValidationError(
            f"{item_label(item_id)}: first timestamp {ts[0]} is not on the {freq!r} grid; set the right {option('freq')}"
        )
    grid = pd.date_range(start=ts[0], end=ts[-1], freq=offset)  # [T']
    pos = grid.get_indexer(ts)  # [T] position of each row on the grid, -1 if off-grid
    if (pos < 0).any():
        i = int(np.flatnonzero(pos < 0)[0])
        raise DataValidationError(
            f"{item_label(item_id)}: timestamp {ts[i]} (row {i}) is off the regular {freq!r} grid that starts at "
            f"{ts[0]}; resample the data (df.resample(freq).mean()) or set the right {option('freq')}"
        )
    n_filled = len(grid) - len(ts)
    share = n_filled / len(grid)
    if share > max_fill_fraction:
        raise DataValidationError(
            f"{item_label(item_id)}: fill_missing_steps would insert {n_filled} empty time steps, {share:.1%} of the "
            f"{len(grid)}-step {freq!r} grid, more than {option('max_fill_fraction')}={max_fill_fraction}. "
            f"Check the frequency ({option('freq')}), or allow it with "
            f"{option('max_fill_fraction', float(np.ceil(share * 100) / 100))}"
            + f" (the data's median spacing is {_step_text(_median_step(ts))})"
        )
    if n_filled:
        warnings.warn(
            f"{item_label(item_id)}: fill_missing_steps inserted {n_filled} missing time steps as NaN "
            f"({share:.1%} of the {len(grid)}-step {freq!r} grid; limit {option('max_fill_fraction')}="
            f"{max_fill_fraction})",
            stacklevel=4,
        )
    out = np.full((len(grid), values.shape[1]), np.nan, dtype=np.float32)  # [T', V]
    out[pos] = values
    return grid, out


def _check_values(values: np.ndarray, schema: SeriesSchema, item_id: str) -> None:
    """No all-missing variate; no constant target."""
    observed = ~np.isnan(values)  # [T, V]
    n_obs = observed.sum(axis=0)
    for j, v in enumerate(schema.variates):
        if n_obs[j] == 0:
            raise DataValidationError(
                f"variate {v.name!r} ({v.role}) of {item_label(item_id)} has no observed values (every cell is "
                f"empty or a missing-value marker); remove it from {option(_ROLE_OPTION[v.role])} or drop the item"
            )
        if v.role == "target":
            col = values[observed[:, j], j]
            if col.min() == col.max():
                raise DataValidationError(
                    f"target {v.name!r} of {item_label(item_id)} is constant (every observed value is {col[0]:g}); "
                    "there is nothing to forecast and its scale is zero. Drop the item, or pass the column "
                    f"as a covariate instead ({option('past_covariates')})"
                )
