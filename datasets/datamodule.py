"""LightningDataModule: frames -> time splits -> window datasets -> DataLoaders."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from .bundled import load_bundled
from .errors import DataValidationError
from .frame import SeriesFrame, harmonize, last_observed
from .naive import seasonal_naive_mae, seasonal_naive_mae_per_target
from .schema import SeriesSchema
from .windows import SPLIT_NAMES, Splits, WindowDataset, _positive_int, split_by_time


class WindowSampler(DistributedSampler):
    """This process's share of the epoch's training windows, resumable mid-epoch.

    Random mode: positions into the windows a random-mode WindowDataset drew for the epoch (seeded
    by its seed and the epoch); rolling mode: a permutation of the windows seeded by (seed, epoch).
    Sharding is strided: process r of W takes positions r, r+W, r+2W, ... of the epoch's order
    (padded by wrap-around to a multiple of W), so with a per-process batch of B/W the W processes
    together train on exactly the global batches of one process with batch B, and the union of all
    shards is the one-process set. It subclasses DistributedSampler so Lightning keeps it instead of
    wrapping it in its own.

    `set_epoch` (Lightning calls it each epoch) redraws the windows; a plain PyTorch loop that never
    calls it gets the next epoch on every new iterator. `resume(epoch, position)` starts the next
    iterator of that epoch after `position` windows (global, all processes together).
    """

    def __init__(self, dataset: WindowDataset, seed: int = 0, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, seed=seed, drop_last=False)
        self._epoch_was_set = False
        self._next_auto_epoch = 0
        self._resume_at: tuple[int, int] | None = None  # (epoch, global position) from a checkpoint
        self.start = 0  # global position the current iterator started from

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self._epoch_was_set = True
        # Draw now, in the main process, so that workers forked later copy the epoch's windows.
        self.dataset.set_epoch(self.epoch)

    def resume(self, epoch: int, position: int) -> None:
        self.set_epoch(epoch)
        self._resume_at = (int(epoch), int(position))

    def epoch_order(self) -> np.ndarray:
        """All positions of the epoch in training order, padded to a multiple of the replicas. [total]"""
        n = len(self.dataset)
        if self.dataset.mode == "random":
            order = np.arange(n)  # the dataset's draws are random already
        else:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(n)
        return np.resize(order, self.total_size)  # wrap-around padding, as DistributedSampler pads

    def __iter__(self) -> Iterator[int]:
        if not self._epoch_was_set:  # nobody called set_epoch (plain PyTorch loop): advance ourselves
            self.set_epoch(self._next_auto_epoch)
        self._epoch_was_set = False
        self._next_auto_epoch = self.epoch + 1
        self.start = 0
        if self._resume_at is not None:
            epoch, position = self._resume_at
            self._resume_at = None
            if epoch == self.epoch:  # a checkpoint at an epoch's end resumes at the next epoch's start
                self.start = min(position, self.total_size)
        order = self.epoch_order()
        return iter(order[self.start + self.rank::self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples


class ResumableDataLoader(DataLoader):
    """A DataLoader over a WindowSampler whose position within the epoch goes into Lightning
    checkpoints: Lightning saves ``state_dict()`` of stateful loaders with the fit loop and calls
    ``load_state_dict`` on resume, so a resumed run trains on the batches the interrupted one would
    have. The position counts the batches handed out (not those prefetched by workers)."""

    def __init__(self, dataset: WindowDataset, sampler: WindowSampler, **kwargs: object) -> None:
        super().__init__(dataset, sampler=sampler, **kwargs)
        self._position = 0  # global windows consumed in the current epoch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        sampler: WindowSampler = self.sampler
        per_step = self.batch_size * sampler.num_replicas
        first = True
        for batch in super().__iter__():
            if first:  # the sampler picked its start when the iterator began
                self._position, first = sampler.start, False
            self._position = min(self._position + per_step, sampler.total_size)
            yield batch

    def state_dict(self) -> dict[str, int]:
        sampler: WindowSampler = self.sampler
        return {"epoch": int(sampler.epoch), "position": int(self._position), "num_replicas": sampler.num_replicas}

    def load_state_dict(self, state: dict[str, int]) -> None:
        # The position is global, so a run may resume on another number of processes; keep the
        # global batch (per-process batch x processes) the same for the same batches.
        self._position = int(state["position"])
        self.sampler.resume(int(state["epoch"]), self._position)


_SPLIT_OPTIONS = {"val": "data.val_fraction / data.val_length", "test": "data.test_fraction / data.test_length"}


def require_observed_targets(ds: WindowDataset, split: str) -> None:
    """Refuse a val/test split in which a target has no observed horizon value: its loss and MAE would
    come out as a fake 0 (or NaN) that looks like a result."""
    observed = ds.horizon_observed()  # [V]
    schema = ds.schema
    for j in schema.target_indices:
        if observed[j] > 0:
            continue
        name = schema.names[j]
        last = last_observed(ds.frames, j)
        raise DataValidationError(
            f"target {name!r} has no observed value in the {split!r} split (0 of {ds.n_windows * ds.horizon} "
            f"horizon values in its {ds.n_windows} window(s)), so its {split} loss and MAE would be meaningless; "
            f"{name!r} is last observed at {last}: drop the rows after that (they hold no {name!r}), or size the "
            f"split ({_SPLIT_OPTIONS[split]}) so that it holds observed values"
        )


def _check_data_keys(**values: object) -> None:
    """Settings checked here, where they are the config's `data.<key>`, so messages name the key to set
    (WindowDataset / split_by_time check them too, under their Python argument names)."""
    for name in ("context_len", "horizon", "train_stride", "batch_size"):
        _positive_int(f"data.{name}", values[name])
    for name in ("val_stride", "test_stride", "min_context"):  # null: a default
        if values[name] is not None:
            _positive_int(f"data.{name}", values[name], "a positive integer or null")
    if values["min_context"] is not None and values["min_context"] > values["context_len"]:
        raise DataValidationError(
            f"data.min_context ({values['min_context']}) cannot exceed data.context_len ({values['context_len']}); "
            "lower data.min_context or set it to null (the whole context)")
    for name in ("val_fraction", "test_fraction"):
        f = values[name]
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f < 1.0:
            raise DataValidationError(f"data.{name} must be a number in [0, 1) (a share of each series), got {f!r}")
    for name in ("val_length", "test_length"):
        n = values[name]
        if n is not None and (isinstance(n, bool) or not isinstance(n, (int, float, np.integer))
                              or not float(n).is_integer() or n < 0):
            raise DataValidationError(f"data.{name} must be a non-negative number of steps or null, got {n!r}")


class SeriesDataModule(L.LightningDataModule):
    """Windows of a series collection for training (random), validation and test (rolling).

    Data source: `frames` (a list of SeriesFrame) or `loader` (a zero-argument callable returning
    one, e.g. a functools.partial / Hydra `_partial_: true` target, or a bundled dataset name).
    Splits are by time per item (see split_by_time); val/test windows have their horizon inside
    their split and roll at val_stride / test_stride (default: horizon, i.e. non-overlapping).
    train_samples_per_epoch: windows drawn at random per epoch (seeded by seed and epoch); None rolls
    over every training origin at train_stride, shuffled.
    train_min_observed: training windows leave a target out of the loss when it is observed on fewer
    than this fraction of its context steps (see WindowDataset's min_observed); 0 keeps all.
    """

    def __init__(
        self,
        frames: Sequence[SeriesFrame] | None = None,
        loader: Callable[[], Sequence[SeriesFrame]] | str | None = None,
        *,
        context_len: int,
        horizon: int,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        val_length: int | None = None,
        test_length: int | None = None,
        train_samples_per_epoch: int | None = 10_000,
        train_stride: int = 1,
        val_stride: int | None = None,
        test_stride: int | None = None,
        min_context: int | None = None,
        train_min_observed: float = 0.0,
        batch_size: int = 32,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if (frames is None) == (loader is None):
            raise DataValidationError("give exactly one of frames= (a list of SeriesFrame) or loader= (a callable)")
        if loader is not None and not (callable(loader) or isinstance(loader, str)):
            raise DataValidationError(f"loader must be callable or a bundled dataset name, got {type(loader).__name__}")
        self.save_hyperparameters(ignore=["frames", "loader"])
        self._source = frames if frames is not None else loader
        self.context_len = context_len
        self.horizon = horizon
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.val_length, self.test_length = val_length, test_length
        self.train_samples_per_epoch = train_samples_per_epoch
        self.train_stride = train_stride
        self._given_strides = (val_stride, test_stride)  # checked in setup: 0 must not become the default
        self.val_stride = val_stride or horizon
        self.test_stride = test_stride or horizon
        self.min_context = min_context
        self.train_min_observed = train_min_observed
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.seed = seed
        self._frames: list[SeriesFrame] | None = None
        self._splits: Splits | None = None
        self._datasets: dict[str, WindowDataset | None] = {}

    # ------------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Load, split and window the data once; later calls do nothing."""
        if self._frames is not None:
            return
        # Here, not in __init__: Hydra would wrap an error raised while it instantiates the module.
        _check_data_keys(
            context_len=self.context_len, horizon=self.horizon, train_stride=self.train_stride,
            batch_size=self.batch_size, val_stride=self._given_strides[0], test_stride=self._given_strides[1],
            min_context=self.min_context, val_fraction=self.val_fraction, test_fraction=self.test_fraction,
            val_length=self.val_length, test_length=self.test_length)
        src = self._source
        raw = load_bundled(src) if isinstance(src, str) else (src() if callable(src) else src)
        frames = harmonize(list(raw))
        splits = split_by_time(
            frames, self.val_fraction, self.test_fraction, val_length=self.val_length, test_length=self.test_length
        )
        common = dict(frames=frames, context_len=self.context_len, horizon=self.horizon, min_context=self.min_context)
        datasets: dict[str, WindowDataset | None] = {
            "train": WindowDataset(
                **common, time_ranges=splits.train, stride=self.train_stride, split="train", seed=self.seed,
                mode="random" if self.train_samples_per_epoch else "rolling",
                samples_per_epoch=self.train_samples_per_epoch, min_observed=self.train_min_observed,
            )
        }
        for name, stride in (("val", self.val_stride), ("test", self.test_stride)):
            # An empty split (fraction 0) is allowed: no loader; a non-empty one must hold a window.
            has_steps = any(len(r) for r in splits[name])
            datasets[name] = (
                WindowDataset(**common, time_ranges=splits[name], stride=stride, split=name) if has_steps else None
            )
        for name in ("val", "test"):
            if datasets[name] is not None:
                require_observed_targets(datasets[name], name)
        self._frames, self._splits, self._datasets = frames, splits, datasets

    @property
    def frames(self) -> list[SeriesFrame]:
        self.setup()
        return self._frames

    @property
    def schema(self) -> SeriesSchema:
        """Common schema (variates, roles, groups, freq, binary flags); store schema.to_dict() with a model."""
        self.setup()
        return self._datasets["train"].schema

    @property
    def splits(self) -> Splits:
        self.setup()
        return self._splits

    def dataset(self, split: str) -> WindowDataset | None:
        """The WindowDataset of 'train', 'val' or 'test' (None for an empty split)."""
        if split not in SPLIT_NAMES:
            raise KeyError(f"unknown split {split!r}; expected one of {SPLIT_NAMES}")
        self.setup()
        return self._datasets[split]

    # ------------------------------------------------------------------------------------------
    def _loader(self, ds: WindowDataset | None, **kw: object) -> DataLoader | list:
        if ds is None:
            return []  # Lightning skips an empty list of loaders
        # Own generator: creating an iterator must not draw from the global torch RNG, or a resumed
        # run's dropout masks would differ from those of an uninterrupted one.
        return DataLoader(
            ds, batch_size=self.batch_size, num_workers=self.num_workers, pin_memory=self.pin_memory,
            persistent_workers=False, generator=torch.Generator().manual_seed(self.seed), **kw,
        )

    def train_dataloader(self) -> ResumableDataLoader:
        """This process's shard of the training windows (see WindowSampler), resumable mid-epoch."""
        trainer = getattr(self, "trainer", None)
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        ds = self.dataset("train")
        sampler = WindowSampler(ds, seed=self.seed, num_replicas=replicas, rank=rank)
        return ResumableDataLoader(
            ds, sampler, batch_size=self.batch_size, num_workers=self.num_workers, pin_memory=self.pin_memory,
            persistent_workers=False, generator=torch.Generator().manual_seed(self.seed),
        )

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.dataset("val"))

    def test_dataloader(self) -> DataLoader | list:
        return self._loader(self.dataset("test"))

    def predict_dataloader(self) -> DataLoader | list:
        """The test windows (rolling), in order: item_index / origin locate each forecast."""
        return self._loader(self.dataset("test"))

    # ------------------------------------------------------------------------------------------
    def seasonal_naive_mae(self, split: str = "val", season: int | None = None) -> float:
        """Seasonal-naive MAE on the unscaled targets of the split's windows (same windows as its loader)."""
        return seasonal_naive_mae(self._nonempty(split), season)

    def seasonal_naive_mae_per_target(self, split: str = "val", season: int | None = None) -> dict[str, float]:
        """{target: seasonal-naive MAE} on the unscaled values of the split's windows (NaN where none)."""
        return seasonal_naive_mae_per_target(self._nonempty(split), season)

    def _nonempty(self, split: str) -> WindowDataset:
        ds = self.dataset(split)
        if ds is None:
            raise DataValidationError(
                f"split {split!r} is empty; set a positive data.{split}_fraction or {split}_length")
        return ds
