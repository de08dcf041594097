"""LightningDataModule: frames -> time splits -> window datasets -> DataLoaders."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from .bundled import load_bundled
from .errors import DataValidationError
from .frame import SeriesFrame, harmonize
from .naive import seasonal_naive_mae
from .schema import SeriesSchema
from .windows import SPLIT_NAMES, Splits, WindowDataset, split_by_time


class _EpochSampler(Sampler[int]):
    """Sequential indices into a random-mode WindowDataset; Lightning's set_epoch redraws its windows.

    Drawing happens in the main process before workers copy the dataset, so workers see the
    epoch's windows (workers must not be persistent).
    """

    def __init__(self, dataset: WindowDataset) -> None:
        self.dataset = dataset
        self._epoch: int | None = None
        self._next_auto = 0

    def set_epoch(self, epoch: int) -> None:
        self._epoch = int(epoch)
        self.dataset.set_epoch(self._epoch)

    def __iter__(self) -> Iterator[int]:
        if self._epoch is None:  # nobody called set_epoch (plain PyTorch loop): advance ourselves
            self.dataset.set_epoch(self._next_auto)
        self._next_auto = self.dataset.epoch + 1
        self._epoch = None
        return iter(range(len(self.dataset)))

    def __len__(self) -> int:
        return len(self.dataset)


class SeriesDataModule(L.LightningDataModule):
    """Windows of a series collection for training (random), validation and test (rolling).

    Data source: `frames` (a list of SeriesFrame) or `loader` (a zero-argument callable returning
    one, e.g. a functools.partial / Hydra `_partial_: true` target, or a bundled dataset name).
    Splits are by time per item (see split_by_time); val/test windows have their horizon inside
    their split and roll at val_stride / test_stride (default: horizon, i.e. non-overlapping).
    train_samples_per_epoch: windows drawn at random per epoch (seeded by seed and epoch); None rolls
    over every training origin at train_stride, shuffled.
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
        self.val_stride = val_stride or horizon
        self.test_stride = test_stride or horizon
        self.min_context = min_context
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
                samples_per_epoch=self.train_samples_per_epoch,
            )
        }
        for name, stride in (("val", self.val_stride), ("test", self.test_stride)):
            # An empty split (fraction 0) is allowed: no loader; a non-empty one must hold a window.
            has_steps = any(len(r) for r in splits[name])
            datasets[name] = (
                WindowDataset(**common, time_ranges=splits[name], stride=stride, split=name) if has_steps else None
            )
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
        return DataLoader(
            ds, batch_size=self.batch_size, num_workers=self.num_workers, pin_memory=self.pin_memory,
            persistent_workers=False, **kw,
        )

    def train_dataloader(self) -> DataLoader:
        ds = self.dataset("train")
        if ds.mode == "random":
            return self._loader(ds, sampler=_EpochSampler(ds))
        return self._loader(ds, shuffle=True, generator=torch.Generator().manual_seed(self.seed))

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
        ds = self.dataset(split)
        if ds is None:
            raise DataValidationError(
                f"split {split!r} is empty; set a positive data.{split}_fraction or {split}_length")
        return seasonal_naive_mae(ds, season)
