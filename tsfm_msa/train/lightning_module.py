"""LightningModule: forecast loss + lambda * KL (+ optional dense-teacher index loss), indexer warmup then
sparse, AdamW + cosine."""
from __future__ import annotations

import importlib
import math
from typing import Any

import lightning as L
import torch

from tsfm_msa.model.attention import MSAAttention
from tsfm_msa.model.transformer import ModelOutput, PatchTransformer, pinball_loss
from tsfm_msa.train.optim import build_adamw
from tsfm_msa.train.schedule import PhaseSchedule, cosine_with_warmup

# The same values as `optim` in configs/train.yaml (a test keeps them equal).
DEFAULT_OPTIM = {"lr": 2e-3, "weight_decay": 0.05, "betas": (0.9, 0.95), "warmup_steps": 30, "min_lr_ratio": 0.1}


class TrainConfigError(ValueError):
    """A training setting that cannot work; the message names the key and the fix."""


def dense_teacher_weight(weight: Any, key: str = "dense_teacher_kl") -> float:
    """The dense-teacher index loss weight (``key`` names the setting in messages) as a float; null
    or 0: off."""
    if weight is None:
        return 0.0
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise TrainConfigError(f"{key} must be a non-negative number or null (0 or null: off), got {weight!r}")
    return float(weight)


def schema_fields(schema: dict) -> tuple[list[str], list[int], list[str]]:
    """roles, group index per variate, and group names from a schema dict
    (``{"variates": [{"name", "role", "group"}, ...], "freq": ...}``)."""
    variates = schema["variates"]
    group_names: list[str] = []
    for v in variates:
        if v["group"] not in group_names:
            group_names.append(v["group"])
    return [v["role"] for v in variates], [group_names.index(v["group"]) for v in variates], group_names


def build_model(model_config: dict, schema: dict) -> PatchTransformer:
    """Instantiate the model node of the config (``_target_`` + kwargs) for the dataset's schema."""
    kwargs = {k: v for k, v in dict(model_config).items() if k not in ("_target_", "_partial_")}
    target = model_config.get("_target_", "tsfm_msa.model.transformer.PatchTransformer")
    module_name, _, cls_name = target.rpartition(".")
    cls = getattr(importlib.import_module(module_name), cls_name)
    roles, groups, group_names = schema_fields(schema)
    return cls(roles=roles, groups=groups, group_names=group_names, **kwargs)


class ForecastModule(L.LightningModule):
    """Trains a :class:`PatchTransformer` on window batches of ``tsfm_msa.datasets``.

    Everything needed to rebuild the model (model config, schema, window lengths) is saved in the
    checkpoint's hyper-parameters, so ``ForecastModule.load_from_checkpoint(path)`` works alone.
    Checkpoints also carry the training-token counter (the warmup switch may depend on it) and the
    torch RNG states, so ``trainer.fit(..., ckpt_path=...)`` continues a run exactly (dropout too).

    ``stats_every_n_steps``: MSA layers compute their selection statistics (a host synchronisation)
    only on the training steps that log them; ``None`` follows ``trainer.log_every_n_steps``.
    Validation always collects them. Logged losses and statistics are averaged over processes.

    ``dense_teacher_kl``: weight of an extra sparse-phase loss, the warmup's index loss (the indexer
    against each MSA layer's dense attention over every visible key, mean over layers). The sparse
    KL only sees the selected blocks, so a block the indexer drops never comes back without it.
    Gradients reach the index projections only. 0 or null: off (nothing computed).
    """

    def __init__(
        self,
        model_config: dict,
        schema: dict,
        context_len: int,
        horizon: int,
        optim: dict | None = None,
        kl_weight: float = 1.0,
        indexer_warmup: dict | None = None,
        max_steps: int = 1000,
        stats_every_n_steps: int | None = None,
        dense_teacher_kl: float | None = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = build_model(model_config, schema)
        self.optim_cfg = {**DEFAULT_OPTIM, **(optim or {})}
        self.kl_weight = float(kl_weight)
        self.phases = PhaseSchedule(**(indexer_warmup or {}))
        self.tokens_seen = 0
        if stats_every_n_steps is not None and (not isinstance(stats_every_n_steps, int) or stats_every_n_steps <= 0):
            raise ValueError(f"stats_every_n_steps must be a positive integer or null, got {stats_every_n_steps!r}")
        self.stats_every_n_steps = stats_every_n_steps
        self.dense_teacher_kl = dense_teacher_weight(dense_teacher_kl)
        for layer in self.model.modules():
            if isinstance(layer, MSAAttention):
                layer.dense_teacher = self.dense_teacher_kl > 0  # reported in sparse training forwards only
        self._rng_states_to_restore: dict[str, Any] | None = None

    def current_phase(self) -> str:
        if not self.model.has_msa:
            return "sparse"
        return self.phases.phase(self.global_step, self.tokens_seen)

    def forward(self, batch: dict[str, torch.Tensor], phase: str = "sparse") -> ModelOutput:
        return self.model(batch, phase)

    def _losses(self, batch: dict[str, torch.Tensor], phase: str) -> tuple[torch.Tensor, ModelOutput, torch.Tensor]:
        out = self.model(batch, phase)
        targets = self.model.target_index
        truth = batch["horizon"][..., targets].transpose(1, 2)  # [B, T, H]
        observed = batch["horizon_mask"][..., targets].transpose(1, 2)
        forecast_loss = pinball_loss(out.quantiles, truth, observed, self.model.quantile_levels)
        return forecast_loss, out, observed

    def _collect_stats(self, on: bool) -> None:
        for layer in self.model.modules():
            if isinstance(layer, MSAAttention):
                layer.collect_stats = on

    def _stats_this_step(self) -> bool:
        # Aligned with Lightning's logging steps: (steps done + 1) % log_every_n_steps == 0.
        every = self.stats_every_n_steps or self.trainer.log_every_n_steps
        return (self.global_step + 1) % every == 0

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        phase = self.current_phase()
        self._collect_stats(self._stats_this_step())
        forecast_loss, out, _ = self._losses(batch, phase)
        loss = forecast_loss + self.kl_weight * out.kl
        if out.dense_kl is not None:
            loss = loss + self.dense_teacher_kl * out.dense_kl
        if not torch.isfinite(loss):
            dense = "" if out.dense_kl is None else f", dense_teacher_kl {out.dense_kl.item()}"
            raise FloatingPointError(
                f"non-finite training loss at step {self.global_step} (forecast {forecast_loss.item()}, "
                f"kl {out.kl.item()}{dense}): check the data for extreme values or lower optim.lr")
        bsz = batch["context"].shape[0]
        # Every process sees its own batch of the same size (WindowSampler): count the tokens of all of them.
        self.tokens_seen += self.trainer.world_size * bsz * self.model.layout(batch["context"].shape[1], batch["horizon"].shape[1],
                                                     batch["context"].device).seq_len
        self.log_dict({"train/loss": loss, "train/forecast_loss": forecast_loss, "train/kl": out.kl,
                       "train/sparse_phase": float(phase == "sparse")}, prog_bar=True, batch_size=bsz, sync_dist=True)
        if out.dense_kl is not None:
            self.log("train/dense_teacher_kl", out.dense_kl, batch_size=bsz, sync_dist=True)
        self._log_train_selection(out)
        return loss

    def _log_train_selection(self, out: ModelOutput) -> None:
        """Selection statistics of this step, averaged over layers and processes, straight to the
        loggers: through self.log, Lightning would repeat the last values on every later logging step."""
        stats = [a.stats for a in out.aux if a.stats]
        if not stats:
            return
        keys = list(stats[0])
        means = torch.tensor([sum(s[k] for s in stats) / len(stats) for k in keys], device=self.device)  # [S]
        means = self.trainer.strategy.reduce(means, reduce_op="mean")  # every process takes this step together
        for logger in self.loggers:
            logger.log_metrics({f"train/{k}": float(v) for k, v in zip(keys, means)}, step=self.global_step)

    def _log_selection(self, out: ModelOutput, stage: str, bsz: int) -> None:
        stats = [a.stats for a in out.aux if a.stats]
        if stats:
            for key in stats[0]:
                self.log(f"{stage}/{key}", sum(s[key] for s in stats) / len(stats), batch_size=bsz, sync_dist=True)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        # Validate the model as it will be used: routing through the indexer.
        self._collect_stats(True)
        forecast_loss, out, observed = self._losses(batch, "sparse")
        targets = self.model.target_index
        median = out.quantiles[..., self._median_index()]  # [B, T, H] scaled
        scale = batch["scale"][:, targets, None]
        truth = batch["horizon"][..., targets].transpose(1, 2)
        abs_err = ((median - truth).abs() * scale).masked_fill(~observed, 0.0)
        bsz = batch["context"].shape[0]
        # Both are means over the batch's observed values: weighting each batch by that count makes the
        # epoch value the mean over all observed horizon values, and a batch with none observed adds
        # nothing (weighted by windows, its clamped 0/1 = 0 would pull the MAE toward a fake 0).
        n_observed = int(observed.sum())
        self.log("val_loss", forecast_loss, prog_bar=True, batch_size=n_observed, sync_dist=True)
        self.log("val/kl", out.kl, batch_size=bsz, sync_dist=True)
        self.log("val_mae", abs_err.sum() / max(n_observed, 1), prog_bar=True, batch_size=n_observed,
                 reduce_fx="mean", sync_dist=True)
        # val_mae pools every target in its own units (a large-valued target dominates it): the run
        # summary compares each target with seasonal naive on its own, weighted the same way.
        for k, name in enumerate(self.target_names()):
            n_k = int(observed[:, k].sum())
            self.log(f"val_mae/{name}", abs_err[:, k].sum() / max(n_k, 1), batch_size=n_k, sync_dist=True)
        self._log_selection(out, "val", bsz)

    def target_names(self) -> list[str]:
        """Names of the target variates, in the model's target order."""
        variates = self.hparams.schema["variates"]
        return [variates[int(j)]["name"] for j in self.model.target_index]

    def _median_index(self) -> int:
        levels = self.model.quantile_levels
        return int((levels - 0.5).abs().argmin())

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Norm clipping under FSDP goes through FSDP's own ``clip_grad_norm_`` (the norm of the
        whole sharded model): Lightning's FSDP precision plugin refuses norm clipping."""
        from torch.distributed.fsdp import FullyShardedDataParallel

        wrapped = self.trainer.strategy.model if self.trainer is not None else None
        if gradient_clip_val and gradient_clip_algorithm in (None, "norm") and isinstance(wrapped, FullyShardedDataParallel):
            wrapped.clip_grad_norm_(float(gradient_clip_val))
            return
        self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val, gradient_clip_algorithm=gradient_clip_algorithm)

    def configure_optimizers(self) -> dict[str, Any]:
        cfg = self.optim_cfg
        optimizer = build_adamw(self.model, cfg["lr"], cfg["weight_decay"], cfg["betas"])
        total = int(self.hparams.max_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: cosine_with_warmup(step, int(cfg["warmup_steps"]), total, float(cfg["min_lr_ratio"])))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["tokens_seen"] = self.tokens_seen
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        checkpoint["rng_states"] = rng

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.tokens_seen = int(checkpoint.get("tokens_seen", 0))
        # Applied when training resumes (on_train_start), not when a checkpoint is only loaded for use.
        self._rng_states_to_restore = checkpoint.get("rng_states")

    def on_train_start(self) -> None:
        rng, self._rng_states_to_restore = self._rng_states_to_restore, None
        if rng is None:
            return
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(rng["cuda"])
