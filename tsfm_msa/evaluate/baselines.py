"""GluonTS's own baselines: seasonal naive, PatchTST and DeepAR, trained on our training split and budget.

PatchTST and DeepAR read only ``feat_dynamic_real`` (known-future covariates); past-only covariates
have no GluonTS field in them. Their inputs should be the z-scored datasets of
``gluonts_data.standardize_covariates`` (they do not scale covariates themselves).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
from gluonts.dataset.common import Dataset
from gluonts.model import Predictor
from gluonts.model.seasonal_naive import SeasonalNaivePredictor
from gluonts.torch.model.deepar import DeepAREstimator
from gluonts.torch.model.patch_tst import PatchTSTEstimator


def seasonal_naive(prediction_length: int, season: int) -> Predictor:
    """y_hat[t + h] = y[t + h - season] (repeated for h >= season): the reference of the relative columns."""
    return SeasonalNaivePredictor(prediction_length=prediction_length, season_length=season)


def trainer_kwargs(max_steps: int, num_batches_per_epoch: int, root_dir: Path | str) -> dict[str, Any]:
    """A step budget for GluonTS's Lightning trainer: max_steps decides, epochs only group the batches."""
    return {
        "max_steps": int(max_steps),
        "max_epochs": math.ceil(max_steps / num_batches_per_epoch) + 1,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(root_dir),
    }


def train_patchtst(train: Dataset, prediction_length: int, num_feat_dynamic_real: int, *, max_steps: int,
                   batch_size: int, seed: int, root_dir: Path | str, num_batches_per_epoch: int = 50,
                   **model_kwargs: Any) -> Predictor:
    """GluonTS PatchTSTEstimator, given the known-future covariates too (the strong variant)."""
    L.seed_everything(seed, workers=True)
    estimator = PatchTSTEstimator(
        prediction_length=prediction_length, num_feat_dynamic_real=num_feat_dynamic_real, batch_size=batch_size,
        num_batches_per_epoch=num_batches_per_epoch,
        trainer_kwargs=trainer_kwargs(max_steps, num_batches_per_epoch, root_dir), **model_kwargs)
    return estimator.train(train, cache_data=True)


def train_deepar(train: Dataset, freq: str, prediction_length: int, num_feat_dynamic_real: int, *, max_steps: int,
                 batch_size: int, seed: int, root_dir: Path | str, num_batches_per_epoch: int = 50,
                 **model_kwargs: Any) -> Predictor:
    """GluonTS DeepAREstimator; cache_data=True, else it recomputes time features for every window (~13x slower)."""
    L.seed_everything(seed, workers=True)
    estimator = DeepAREstimator(
        freq=freq, prediction_length=prediction_length, num_feat_dynamic_real=num_feat_dynamic_real,
        batch_size=batch_size, num_batches_per_epoch=num_batches_per_epoch,
        trainer_kwargs=trainer_kwargs(max_steps, num_batches_per_epoch, root_dir), **model_kwargs)
    return estimator.train(train, cache_data=True)
