"""The one error type raised for bad user data, and how messages name a loader option."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from pathlib import Path

# Where the loader options live in the Hydra config (configs/data/csv.yaml): `data.loader.<option>`.
LOADER_KEY = "data.loader"


class DataValidationError(ValueError):
    """Input data do not satisfy the SeriesFrame contract.

    Messages name the column / key / item at fault, say what was expected and how to fix it.
    Subclasses ValueError so callers that already catch ValueError keep working.
    """


# The reader options of the file being loaded: a read_kwargs hint adds its key to them instead of
# suggesting an override that would drop what the user already set (each hint replaces the whole dict).
_CURRENT_READ_KWARGS: ContextVar[Mapping[str, object]] = ContextVar("current_read_kwargs", default={})


@contextlib.contextmanager
def reading_with(read_kwargs: Mapping[str, object] | None) -> Iterator[None]:
    """While loading a file read with ``read_kwargs``, hints for ``read_kwargs`` keep those keys."""
    # Not a mapping: the reader's own check says so; hints then start from nothing.
    token = _CURRENT_READ_KWARGS.set(dict(read_kwargs) if isinstance(read_kwargs, Mapping) else {})
    try:
        yield
    finally:
        _CURRENT_READ_KWARGS.reset(token)


# While a table without an item column loads, its one series gets the id "0", which the user never named:
# messages call it "the series" (in the file being read) instead of "item '0'".
_UNNAMED_SERIES: ContextVar[str | None] = ContextVar("unnamed_series", default=None)
_SOURCE_FILE: ContextVar[str | None] = ContextVar("source_file", default=None)


@contextlib.contextmanager
def loading_file(path: str | os.PathLike[str]) -> Iterator[None]:
    """While loading ``path``, messages about its unnamed series name the file."""
    token = _SOURCE_FILE.set(Path(path).name)
    try:
        yield
    finally:
        _SOURCE_FILE.reset(token)


@contextlib.contextmanager
def unnamed_series() -> Iterator[None]:
    """While building the one series of a table without item ids, messages call it "the series"."""
    source = _SOURCE_FILE.get()
    token = _UNNAMED_SERIES.set("the series" + (f" in {source!r}" if source else ""))
    try:
        yield
    finally:
        _UNNAMED_SERIES.reset(token)


def item_label(item_id: object, n_series: int | None = None) -> str:
    """How messages name a series: "item 'a'", or "the series (in 'file.csv')" when it has no id of its own:
    while a table without item column loads, or later as the only series (``n_series`` 1) with the
    placeholder id "0" such a table gets."""
    label = _UNNAMED_SERIES.get()
    if label is None and n_series == 1 and str(item_id) == "0":
        label = "the series"
    return label if label is not None else f"item {str(item_id)!r}"


def option(name: str, example: object = ...) -> str:
    """How a user sets a loader option, on the command line and in Python.

    option("freq", "h") -> "data.loader.freq=h (Python: freq='h')"; option("freq") -> "data.loader.freq".
    Messages name the full override key because `freq=h` alone is not a valid override.
    """
    if example is ...:
        return f"{LOADER_KEY}.{name}"
    if name == "read_kwargs" and isinstance(example, Mapping):
        example = {**_CURRENT_READ_KWARGS.get(), **example}
    override = f"{LOADER_KEY}.{name}={_as_override(example)}"
    if any(c in override for c in SHELL_SPECIAL):  # e.g. {sep:";"}: the shell would eat the quotes
        override = f"'{override}'"
    return f"{override} (Python: {name}={example!r})"


# Characters that a shell would interpret in an unquoted command-line word.
SHELL_SPECIAL = set("\"'; $*?()<>|&!`")
# Strings that Hydra's override grammar reads as themselves without quotes.
_PLAIN = re.compile(r"^[A-Za-z0-9_./+%-]+$")


def _as_override(value: object) -> str:
    """A value as Hydra's override grammar writes it (True -> true, ['a'] -> [a], {'a': 'b'} -> {a:b})."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{_as_override(v)}" for k, v in value.items()) + "}"
    if isinstance(value, Sequence) and not isinstance(value, str):
        return "[" + ",".join(_as_override(v) for v in value) + "]"
    if isinstance(value, str) and not _PLAIN.match(value):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'  # ';' or ',' must be quoted
    return str(value)
