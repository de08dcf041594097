"""Time-ordered train/val/test splits and the (context, horizon) window dataset the model consumes."""

from __future__ import annotations

import bisect
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import DataValidationError, item_label
from .frame import SeriesFrame, validate_collection
from .scaling import fit_scaler
from .schema import SeriesSchema

SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class Splits:
    """Per-item step ranges [start, stop) of each split; val follows train, test follows val.

    A split's windows have their whole horizon inside the split's range; their contexts may reach
    back into earlier splits (they are past data at forecast time).
    """

    train: tuple[range, ...]
    val: tuple[range, ...]
    test: tuple[range, ...]

    def __getitem__(self, name: str) -> tuple[range, ...]:
        if name not in SPLIT_NAMES:
            raise KeyError(f"unknown split {name!r}; expected one of {SPLIT_NAMES}")
        return getattr(self, name)

    def lengths(self, name: str) -> tuple[int, ...]:
        return tuple(len(r) for r in self[name])


def split_by_time(
    frames: Sequence[SeriesFrame],
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    *,
    val_length: int | None = None,
    test_length: int | None = None,
) -> Splits:
    """Cut every item by time: [train | val | test], the last steps being test.

    Sizes per item: val_length / test_length steps when given, else round(fraction * item length).
    """
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= f < 1.0:
            raise DataValidationError(f"{name} must lie in [0, 1), got {f}")
    for name, n in (("val_length", val_length), ("test_length", test_length)):
        if n is not None and (int(n) != n or n < 0):
            raise DataValidationError(f"{name} must be a non-negative number of steps, got {n}")
    train, val, test = [], [], []
    for f in frames:
        T = f.length
        n_test = int(test_length) if test_length is not None else int(round(T * test_fraction))
        n_val = int(val_length) if val_length is not None else int(round(T * val_fraction))
        n_train = T - n_val - n_test
        if n_train <= 0:
            raise DataValidationError(
                f"{item_label(f.item_id, len(frames))} has {T} steps, not enough for val ({n_val}) + test ({n_test}) steps "
                "plus a training part; use smaller data.val_fraction / data.test_fraction (or lengths)"
            )
        train.append(range(0, n_train))
        val.append(range(n_train, n_train + n_val))
        test.append(range(n_train + n_val, T))
    return Splits(tuple(train), tuple(val), tuple(test))


def _positive_int(name: str, x: object, expected: str = "a positive integer") -> int:
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x <= 0:
        raise DataValidationError(f"{name} must be {expected}, got {x!r}")
    return int(x)


class WindowDataset(Dataset):
    """(context, horizon) windows over a collection of frames, scaled per window.

    An origin t (index of the first horizon step within its frame) gives context = steps [t-C, t)
    and horizon = steps [t, t+H). Origins lie where the whole horizon falls in the item's
    `time_ranges` entry and at least `min_context` in-series steps precede t; contexts that would
    start before the series are left-padded with NaN (mask False).

    mode="rolling": every origin from the earliest valid one on, every `stride` steps (evaluation).
    mode="random":  `samples_per_epoch` windows drawn uniformly (with replacement) among all origins
                    on the stride grid, from a generator seeded by (seed, epoch); call set_epoch(e)
                    (SeriesDataModule does it through its sampler) for fresh windows each epoch.

    Items are dicts of tensors: context f32 [C, V], context_mask bool [C, V], horizon f32 [H, V],
    horizon_mask bool [H, V], loc f32 [V], scale f32 [V], item_index i64 [], origin i64 [].
    Values are scaled with the context's statistics (value = scaled * scale + loc) and missing values
    are 0.0 with mask False. Horizon values of past-only covariates are returned too (for evaluation);
    the model must hide them by role (schema.known_future).
    min_observed (a fraction in [0, 1]): a target observed on fewer than this share of its context
    steps gets horizon_mask False (left out of the loss): a scale fitted on a handful of steps turns
    ordinary horizon values into outliers of 1e3-1e5 that swamp a batch's loss.
    """

    def __init__(
        self,
        frames: Sequence[SeriesFrame],
        context_len: int,
        horizon: int,
        *,
        time_ranges: Sequence[range] | None = None,
        stride: int = 1,
        mode: Literal["rolling", "random"] = "rolling",
        samples_per_epoch: int | None = None,
        min_context: int | None = None,
        seed: int = 0,
        split: str = "data",
        scale: bool = True,
        min_observed: float = 0.0,
    ) -> None:
        self.frames = list(frames)
        self.schema: SeriesSchema = validate_collection(self.frames)
        self.context_len = C = _positive_int("context_len", context_len)
        self.horizon = H = _positive_int("horizon", horizon)
        self.stride = _positive_int("stride", stride)
        self.min_context = C if min_context is None else _positive_int("min_context", min_context)
        if self.min_context > C:
            raise DataValidationError(f"min_context ({self.min_context}) cannot exceed context_len ({C})")
        if mode not in ("rolling", "random"):
            raise DataValidationError(f"mode must be 'rolling' or 'random', got {mode!r}")
        self.mode = mode
        self.split = split
        self.seed = int(seed)
        self.scale = scale
        if isinstance(min_observed, bool) or not isinstance(min_observed, (int, float)) or not 0.0 <= min_observed <= 1.0:
            raise DataValidationError(
                f"min_observed must be a fraction of the context in [0, 1] (set data.train_min_observed=0.5, or 0 to "
                f"keep every window), got {min_observed!r}")
        self.min_observed = float(min_observed)
        self._binary = np.asarray(self.schema.binary, dtype=bool)  # [V]
        self._non_target = np.asarray([r != "target" for r in self.schema.roles])  # [V]

        need = self.min_context + H
        for f in self.frames:
            if f.length < need:
                raise DataValidationError(
                    f"{item_label(f.item_id, len(self.frames))} has {f.length} steps, but a window needs at least {need} "
                    f"(min_context {self.min_context} + horizon {H}; context_len {C}); use a shorter "
                    "data.context_len / data.horizon, a smaller data.min_context, or drop the item"
                )
        ranges = self._check_ranges(time_ranges)

        # First valid origin and number of origins per item (on the stride grid from the first).
        self._first = []
        counts = []
        for f, r in zip(self.frames, ranges):
            lo, hi = max(r.start, self.min_context), min(r.stop, f.length) - H  # hi: last origin
            self._first.append(lo)
            counts.append((hi - lo) // self.stride + 1 if hi >= lo else 0)
        self._cum = [0, *np.cumsum(counts).tolist()]  # window k of item i: cum[i] <= k < cum[i+1]
        self.n_windows = self._cum[-1]
        self._report_empty(ranges, counts)

        # All items in one float32 array; each preceded by NaN rows so padded contexts are plain slices.
        self._pad = C - self.min_context
        blocks, self._base = [], []
        row = 0
        for f in self.frames:
            blocks.append(np.full((self._pad, self.schema.n_variates), np.nan, dtype=np.float32))
            blocks.append(f.values)
            self._base.append(row + self._pad)  # row of step 0 of this item
            row += self._pad + f.length
        self._data = np.ascontiguousarray(np.concatenate(blocks, axis=0))  # [sum(pad + T_i), V]

        if mode == "random":
            self.samples_per_epoch = _positive_int("samples_per_epoch", samples_per_epoch)
        else:
            self.samples_per_epoch = self.n_windows
        self.set_epoch(0)

    # ------------------------------------------------------------------------------------------
    def _check_ranges(self, time_ranges: Sequence[range] | None) -> list[range]:
        if time_ranges is None:
            return [range(0, f.length) for f in self.frames]
        ranges = list(time_ranges)
        if len(ranges) != len(self.frames):
            raise DataValidationError(f"{len(ranges)} time ranges for {len(self.frames)} items; give one per item")
        for f, r in zip(self.frames, ranges):
            if r.step != 1 or r.start < 0 or r.stop > f.length:
                raise DataValidationError(
                    f"time range {r} of {item_label(f.item_id, len(self.frames))} must be a step-1 range inside [0, {f.length})"
                )
        return ranges

    def _report_empty(self, ranges: list[range], counts: list[int]) -> None:
        empty = [(f, r) for f, r, n in zip(self.frames, ranges, counts) if n == 0]
        if not empty:
            return
        detail = "; ".join(
            f"{item_label(f.item_id, len(self.frames))}: {len(r)} steps (steps {r.start}..{r.stop - 1}), needs "
            f"{self.horizon + max(0, self.min_context - r.start)}"
            for f, r in empty[:5]
        )
        if len(empty) == len(self.frames):
            raise DataValidationError(
                f"split {self.split!r} has no full window: {detail} (horizon {self.horizon} steps inside the "
                f"split, after at least min_context={self.min_context} steps of the series). Use a shorter "
                f"data.horizon / data.context_len or a larger split ("
                + (f"data.{self.split}_fraction)" if self.split in ("val", "test") else
                   "smaller data.val_fraction / data.test_fraction)")
            )
        warnings.warn(f"split {self.split!r}: {len(empty)} item(s) have no full window and are skipped: {detail}",
                      stacklevel=3)

    def set_epoch(self, epoch: int) -> None:
        """Redraw the random windows for this epoch (no-op in rolling mode)."""
        self.epoch = int(epoch)
        if self.mode == "random":
            rng = np.random.default_rng([self.seed, self.epoch])
            self._draws = rng.integers(0, self.n_windows, size=self.samples_per_epoch)  # [S] window ids

    def __len__(self) -> int:
        return self.samples_per_epoch

    def locate(self, k: int) -> tuple[int, int]:
        """(item index, origin) of window k (0 <= k < n_windows)."""
        item = bisect.bisect_right(self._cum, k) - 1
        return item, self._first[item] + (k - self._cum[item]) * self.stride

    def window_index(self) -> tuple[np.ndarray, np.ndarray]:
        """item [N] and origin [N] (int64) of every window on the stride grid, N = n_windows."""
        k = np.arange(self.n_windows)
        cum = np.asarray(self._cum)
        item = np.searchsorted(cum, k, side="right") - 1
        origin = np.asarray(self._first)[item] + (k - cum[item]) * self.stride
        return item.astype(np.int64), origin.astype(np.int64)

    def horizon_observed(self) -> np.ndarray:
        """int64 [V]: observed horizon values per variate over every window on the stride grid."""
        item, origin = self.window_index()  # [N], [N]
        rows = np.asarray(self._base, dtype=np.int64)[item][:, None] + origin[:, None] + np.arange(self.horizon)
        return (~np.isnan(self._data[rows])).sum(axis=(0, 1)).astype(np.int64)  # rows [N, H] -> [N, H, V]

    def raw_window(self, item: int, origin: int) -> np.ndarray:
        """Unscaled float32 [C + H, V] (NaN = missing) for one window; a view, do not modify."""
        start = self._base[item] + origin - self.context_len
        return self._data[start : start + self.context_len + self.horizon]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} windows")
        item, origin = self.locate(int(self._draws[i]) if self.mode == "random" else i)
        C = self.context_len
        raw = self.raw_window(item, origin)  # [C + H, V]
        mask = ~np.isnan(raw)  # [C + H, V]
        if self.min_observed > 0.0:
            sparse = mask[:C].mean(axis=0) < self.min_observed  # [V]
            sparse[self._non_target] = False
            mask[C:, sparse] = False
        if self.scale:
            loc, scale = fit_scaler(raw[:C], self._binary)  # [V], [V] float32
            x = (raw - loc) / scale  # [C + H, V] new array
        else:
            loc = np.zeros(raw.shape[1], dtype=np.float32)
            scale = np.ones(raw.shape[1], dtype=np.float32)
            x = raw.copy()
        x[~mask] = 0.0
        return {
            "context": torch.from_numpy(x[:C]),
            "context_mask": torch.from_numpy(mask[:C]),
            "horizon": torch.from_numpy(x[C:]),
            "horizon_mask": torch.from_numpy(mask[C:]),
            "loc": torch.from_numpy(loc),
            "scale": torch.from_numpy(scale),
            "item_index": torch.tensor(item, dtype=torch.int64),
            "origin": torch.tensor(origin, dtype=torch.int64),
        }
