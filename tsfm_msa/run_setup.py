"""Builders shared by the commands (train, evaluate, probe): the run folder, the Lightning Trainer and the
ForecastModule of a run, each from a Hydra config."""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf


def run_dir() -> Path:
    """The Hydra run's output folder."""
    return Path(hydra.core.hydra_config.HydraConfig.get().runtime.output_dir)


def build_trainer(cfg: DictConfig, run_dir: Path):
    """The Lightning Trainer of the `trainer` node (``_target_`` + arguments, callbacks as named
    nodes), logging to ``run_dir/logs``; ``enable_progress_bar: null`` shows the bar only in a terminal.
    Callback nodes with ``dirpath: null`` (the checkpoints)
    write to ``run_dir/checkpoints``; a node set to null is dropped."""
    from lightning.pytorch.loggers import CSVLogger

    node = OmegaConf.to_container(cfg.trainer, resolve=True)
    node.setdefault("_target_", "lightning.Trainer")
    if node.get("enable_progress_bar", None) is None:
        node["enable_progress_bar"] = sys.stdout.isatty()
    callbacks = []
    for callback in (node.pop("callbacks", None) or {}).values():
        if callback is None:
            continue
        if "dirpath" in callback and callback["dirpath"] is None:
            callback = {**callback, "dirpath": str(run_dir / "checkpoints")}
        callbacks.append(hydra.utils.instantiate(callback))
    logger = CSVLogger(save_dir=str(run_dir), name="logs", version="")
    return hydra.utils.instantiate(node, default_root_dir=str(run_dir), logger=logger, callbacks=callbacks)


def build_module(cfg: DictConfig, model_cfg: DictConfig, datamodule, max_steps: int):
    """The ForecastModule of a run: the model node for the data's schema, with the run's optimizer,
    KL weights (selected blocks, dense teacher) and indexer-warmup schedule."""
    from tsfm_msa.train.lightning_module import ForecastModule

    return ForecastModule(
        model_config=OmegaConf.to_container(model_cfg, resolve=True),
        schema=datamodule.schema.to_dict(),
        context_len=int(cfg.data.context_len),
        horizon=int(cfg.data.horizon),
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        kl_weight=float(cfg.kl_weight),
        indexer_warmup=OmegaConf.to_container(cfg.indexer_warmup, resolve=True),
        max_steps=max_steps,
        stats_every_n_steps=cfg.get("stats_every_n_steps"),
        dense_teacher_kl=cfg.get("dense_teacher_kl"),
    )
