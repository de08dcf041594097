"""A GluonTS Estimator over our ForecastModule, so that ``TSFMEstimator(...).train(dataset)`` works in GluonTS.

The training data's GluonTS fields define the schema (``target``, ``past_feat_dynamic_real``,
``feat_dynamic_real`` as in ``gluonts_data``); training draws random windows with our
WindowDataset/SeriesDataModule (the same batches as `tsfm-msa train`), and the trained module is
returned as a :class:`TSFMPredictor`.
"""
from __future__ import annotations

from importlib import resources
from typing import Any, Iterable, Optional

import torch
import yaml
from gluonts.core.component import validated
from gluonts.dataset.common import Dataset
from gluonts.torch.model.estimator import PyTorchLightningEstimator, TrainOutput
from gluonts.transform import Identity, Transformation
from torch.utils.data import DataLoader

from tsfm_msa.datasets import SeriesDataModule, SeriesFrame, WindowDataset, from_gluonts
from tsfm_msa.evaluate.predictor import TSFMPredictor, predictor_from_module
from tsfm_msa.train.lightning_module import ForecastModule, dense_teacher_weight


class EstimatorDataError(ValueError):
    """The GluonTS dataset cannot train the estimator (e.g. series shorter than one window)."""


def model_config(name_or_config: str | dict) -> dict:
    """A packaged model config by name ('dense_small', 'msa_small') or the given dict."""
    if isinstance(name_or_config, dict):
        return dict(name_or_config)
    path = resources.files("tsfm_msa.configs").joinpath("model", f"{name_or_config}.yaml")
    if not path.is_file():
        raise EstimatorDataError(f"no packaged model config {name_or_config!r}; use 'dense_small', 'msa_small' or a dict")
    return yaml.safe_load(path.read_text())


class _GluonTSForecastModule(ForecastModule):
    """ForecastModule that also logs `train_loss` per epoch: GluonTS's checkpoint monitors that name
    when no validation data is given."""

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=batch["context"].shape[0])
        return loss


class TSFMEstimator(PyTorchLightningEstimator):
    """GluonTS estimator training a dense or MSA PatchTransformer (``model='dense_small'|'msa_small'|dict``).

    The step budget is ``trainer_kwargs['max_steps']`` (default: num_batches_per_epoch * max_epochs).
    """

    @validated()
    def __init__(
        self,
        freq: str,
        prediction_length: int,
        context_length: int = 512,
        model: Any = "msa_small",
        batch_size: int = 32,
        num_batches_per_epoch: int = 50,
        optim: Optional[dict] = None,
        kl_weight: float = 1.0,
        indexer_warmup: Optional[dict] = None,
        dense_teacher_kl: Optional[float] = None,
        seed: int = 0,
        trainer_kwargs: Optional[dict] = None,
    ) -> None:
        defaults = {"max_epochs": 10, "gradient_clip_val": 1.0, "accelerator": "cpu", "logger": False,
                    "enable_progress_bar": False, "enable_model_summary": False}
        super().__init__(trainer_kwargs={**defaults, **(trainer_kwargs or {})})
        self.freq = freq
        self.prediction_length = int(prediction_length)
        self.context_length = int(context_length)
        self.model_config = model_config(model)
        self.batch_size = int(batch_size)
        self.num_batches_per_epoch = int(num_batches_per_epoch)
        self.optim = optim
        self.kl_weight = float(kl_weight)
        self.indexer_warmup = indexer_warmup or {"steps": 100}
        self.dense_teacher_kl = dense_teacher_weight(dense_teacher_kl)  # refused here, before any training
        self.seed = int(seed)
        self._frames: list[SeriesFrame] | None = None
        self._val_frames: list[SeriesFrame] | None = None

    def _max_steps(self) -> int:
        steps = self.trainer_kwargs.get("max_steps", -1)
        if steps is None or steps < 0:
            return self.num_batches_per_epoch * int(self.trainer_kwargs.get("max_epochs") or 1)
        return int(steps)

    def train_model(self, training_data: Dataset, validation_data: Optional[Dataset] = None,
                    **kwargs: Any) -> TrainOutput:
        # The schema (which variates, which roles) comes from the data, as in `tsfm-msa train`.
        self._frames = from_gluonts(training_data, self.freq)
        self._val_frames = from_gluonts(validation_data, self.freq) if validation_data is not None else None
        if self._val_frames is not None:
            self._frames[0].schema.check_compatible(self._val_frames[0].schema)
        return super().train_model(training_data, validation_data, **kwargs)

    def create_transformation(self) -> Transformation:
        # Windows are cut by our WindowDataset; the predictor carries its own test-time chain.
        return Identity()

    def create_lightning_module(self) -> ForecastModule:
        if self._frames is None:
            raise EstimatorDataError("call train(dataset) first: the dataset defines the model's variates")
        torch.manual_seed(self.seed)
        return _GluonTSForecastModule(
            model_config=self.model_config, schema=self._frames[0].schema.to_dict(),
            context_len=self.context_length, horizon=self.prediction_length, optim=self.optim,
            kl_weight=self.kl_weight, indexer_warmup=self.indexer_warmup, max_steps=self._max_steps(),
            dense_teacher_kl=self.dense_teacher_kl)

    def create_training_data_loader(self, data: Dataset, module: ForecastModule, **kwargs: Any) -> Iterable:
        dm = SeriesDataModule(frames=self._frames, context_len=self.context_length, horizon=self.prediction_length,
                              val_fraction=0.0, test_fraction=0.0, min_context=min(self.context_length, 16),
                              train_samples_per_epoch=self.num_batches_per_epoch * self.batch_size,
                              batch_size=self.batch_size, seed=self.seed)
        return dm.train_dataloader()

    def create_validation_data_loader(self, data: Dataset, module: ForecastModule, **kwargs: Any) -> Iterable:
        # The last prediction_length steps of every validation series, one window each.
        frames = self._val_frames
        ranges = [range(f.length - self.prediction_length, f.length) for f in frames]
        ds = WindowDataset(frames, self.context_length, self.prediction_length, time_ranges=ranges,
                           min_context=min(self.context_length, 16), split="validation")
        return DataLoader(ds, batch_size=self.batch_size)

    def create_predictor(self, transformation: Transformation, module: ForecastModule) -> TSFMPredictor:
        return predictor_from_module(module, self.prediction_length, batch_size=self.batch_size)
