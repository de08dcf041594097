"""GluonTS's own baselines: seasonal naive, PatchTST, DeepAR and the Temporal Fusion Transformer, trained
on everything before the first test window with our step and batch budget, keeping their final weights.

Inputs each one reads (``INPUTS``): PatchTST and DeepAR take only ``feat_dynamic_real`` (known-future
covariates; GluonTS has no past-only field in them); TFT also takes ``past_feat_dynamic_real``
(past-only covariates). Their inputs should be the z-scored datasets of
``gluonts_data.standardize_covariates`` (they do not scale covariates themselves).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from gluonts.dataset.common import Dataset
from gluonts.model import Predictor
from gluonts.model.seasonal_naive import SeasonalNaivePredictor
from gluonts.torch.model.deepar import DeepAREstimator
from gluonts.torch.model.estimator import PyTorchLightningEstimator
from gluonts.torch.model.patch_tst import PatchTSTEstimator
from gluonts.torch.model.tft import TemporalFusionTransformerEstimator

# What every model of the evaluation reads (the report prints it next to each model).
INPUTS = {
    "seasonal_naive": "target only",
    "patchtst": "target, known-future covariates (no past-only field in GluonTS PatchTST)",
    "deepar": "target + its lags, known-future covariates, calendar features (no past-only field in GluonTS DeepAR)",
    "tft": "target, past-only and known-future covariates, calendar features",
    "dense": "all targets jointly, past-only and known-future covariates",
    "msa": "all targets jointly, past-only and known-future covariates",
    "checkpoint": "as its training run",
}


def seasonal_naive(prediction_length: int, season: int) -> Predictor:
    """y_hat[t + h] = y[t + h - season] (repeated for h >= season): the reference of the relative columns."""
    return SeasonalNaivePredictor(prediction_length=prediction_length, season_length=season)


class FinalWeights(L.Callback):
    """Keeps the weights at the end of training: GluonTS estimators otherwise reload the checkpoint of the
    lowest training loss, while our models (and the evaluation's rule) use the final weights."""

    def __init__(self) -> None:
        self.state: dict[str, torch.Tensor] | None = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def trainer_kwargs(max_steps: int, num_batches_per_epoch: int, root_dir: Path | str,
                   accelerator: str = "cpu") -> dict[str, Any]:
    """A step budget for GluonTS's Lightning trainer: max_steps decides, epochs only group the batches.
    ``accelerator`` follows the run's ``trainer.accelerator``, so the baselines train where ours do."""
    return {
        "max_steps": int(max_steps),
        "max_epochs": math.ceil(max_steps / num_batches_per_epoch) + 1,
        "accelerator": accelerator,
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(root_dir),
    }


def train_final(estimator: PyTorchLightningEstimator, train: Dataset, final: FinalWeights) -> Predictor:
    """Train a GluonTS estimator (no validation data) and return its predictor at the final weights."""
    out = estimator.train_model(train, cache_data=True)  # cache_data: time features computed once
    if final.state is None:
        raise RuntimeError("GluonTS training ended without reaching on_train_end; no final weights to keep")
    out.trained_net.load_state_dict(final.state)  # the predictor wraps this same network
    return out.predictor


def _budget(max_steps: int, num_batches_per_epoch: int, root_dir: Path | str,
            accelerator: str) -> tuple[dict[str, Any], FinalWeights]:
    final = FinalWeights()
    return {**trainer_kwargs(max_steps, num_batches_per_epoch, root_dir, accelerator), "callbacks": [final]}, final


def train_patchtst(train: Dataset, prediction_length: int, num_feat_dynamic_real: int, *, context_length: int,
                   max_steps: int, batch_size: int, seed: int, root_dir: Path | str, num_batches_per_epoch: int = 50,
                   accelerator: str = "cpu", **model_kwargs: Any) -> Predictor:
    """GluonTS PatchTSTEstimator, given the known-future covariates too (the strong variant)."""
    L.seed_everything(seed, workers=True)
    kwargs, final = _budget(max_steps, num_batches_per_epoch, root_dir, accelerator)
    estimator = PatchTSTEstimator(
        prediction_length=prediction_length, context_length=context_length,
        num_feat_dynamic_real=num_feat_dynamic_real, batch_size=batch_size,
        num_batches_per_epoch=num_batches_per_epoch, trainer_kwargs=kwargs, **model_kwargs)
    return train_final(estimator, train, final)


def train_deepar(train: Dataset, freq: str, prediction_length: int, num_feat_dynamic_real: int, *,
                 context_length: int, max_steps: int, batch_size: int, seed: int, root_dir: Path | str,
                 num_batches_per_epoch: int = 50, accelerator: str = "cpu", **model_kwargs: Any) -> Predictor:
    """GluonTS DeepAREstimator with our context length (it adds its frequency's lags on top)."""
    L.seed_everything(seed, workers=True)
    kwargs, final = _budget(max_steps, num_batches_per_epoch, root_dir, accelerator)
    estimator = DeepAREstimator(
        freq=freq, prediction_length=prediction_length, context_length=context_length,
        num_feat_dynamic_real=num_feat_dynamic_real, batch_size=batch_size,
        num_batches_per_epoch=num_batches_per_epoch, trainer_kwargs=kwargs, **model_kwargs)
    return train_final(estimator, train, final)


def train_tft(train: Dataset, freq: str, prediction_length: int, num_feat_dynamic_real: int,
              num_past_feat_dynamic_real: int, *, context_length: int, max_steps: int, batch_size: int, seed: int,
              root_dir: Path | str, num_batches_per_epoch: int = 50, accelerator: str = "cpu", **model_kwargs: Any) -> Predictor:
    """GluonTS TemporalFusionTransformerEstimator reading the past-only covariates too (one input
    variable per covariate, so its variable selection sees each)."""
    L.seed_everything(seed, workers=True)
    kwargs, final = _budget(max_steps, num_batches_per_epoch, root_dir, accelerator)
    estimator = TemporalFusionTransformerEstimator(
        freq=freq, prediction_length=prediction_length, context_length=context_length,
        dynamic_dims=[1] * num_feat_dynamic_real, past_dynamic_dims=[1] * num_past_feat_dynamic_real,
        batch_size=batch_size, num_batches_per_epoch=num_batches_per_epoch, trainer_kwargs=kwargs,
        **model_kwargs)
    return train_final(estimator, train, final)
