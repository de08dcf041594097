"""Builders shared by the commands (train, evaluate, probe): the run folder, the Lightning Trainer and the
ForecastModule of a run, each from a Hydra config."""
from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf


def run_dir() -> Path:
    """The Hydra run's output folder."""
    return Path(hydra.core.hydra_config.HydraConfig.get().runtime.output_dir)


def build_trainer(cfg: DictConfig, run_dir: Path):
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    # Checkpoints: last + best on validation loss. Lightning writes them atomically (temp file, then rename).
    checkpoint = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best-{step}", monitor="val_loss",
                                 mode="min", save_last=True, save_top_k=1)
    logger = CSVLogger(save_dir=str(run_dir), name="logs", version="")
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_kwargs.pop("_target_", None)
    return L.Trainer(default_root_dir=str(run_dir), logger=logger,
                     callbacks=[checkpoint, LearningRateMonitor(logging_interval="step")], **trainer_kwargs)


def build_module(cfg: DictConfig, model_cfg: DictConfig, datamodule, max_steps: int):
    """The ForecastModule of a run: the model node for the data's schema, with the run's optimizer,
    KL weight and indexer-warmup schedule."""
    from tsfm_msa.train.module import ForecastModule

    return ForecastModule(
        model_config=OmegaConf.to_container(model_cfg, resolve=True),
        schema=datamodule.schema.to_dict(),
        context_len=int(cfg.data.context_len),
        horizon=int(cfg.data.horizon),
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        kl_weight=float(cfg.kl_weight),
        indexer_warmup=OmegaConf.to_container(cfg.indexer_warmup, resolve=True),
        max_steps=max_steps,
    )
