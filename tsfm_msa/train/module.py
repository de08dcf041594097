"""LightningModule: forecast loss + lambda * KL, indexer warmup then sparse, AdamW + cosine."""
from __future__ import annotations

import importlib
from typing import Any

import lightning as L
import torch

from tsfm_msa.model.transformer import ModelOutput, PatchTransformer, pinball_loss
from tsfm_msa.train.optim import build_adamw
from tsfm_msa.train.schedule import PhaseSchedule, cosine_with_warmup

DEFAULT_OPTIM = {"lr": 1e-3, "weight_decay": 0.05, "betas": (0.9, 0.95), "warmup_steps": 20, "min_lr_ratio": 0.1}


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
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = build_model(model_config, schema)
        self.optim_cfg = {**DEFAULT_OPTIM, **(optim or {})}
        self.kl_weight = float(kl_weight)
        self.phases = PhaseSchedule(**(indexer_warmup or {}))
        self.tokens_seen = 0

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

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        phase = self.current_phase()
        forecast_loss, out, _ = self._losses(batch, phase)
        loss = forecast_loss + self.kl_weight * out.kl
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss at step {self.global_step} (forecast {forecast_loss.item()}, "
                f"kl {out.kl.item()}): check the data for extreme values or lower optim.lr")
        bsz = batch["context"].shape[0]
        # Every process sees its own batch: count the tokens of all of them (DDP).
        self.tokens_seen += self.trainer.world_size * bsz * self.model.layout(batch["context"].shape[1], batch["horizon"].shape[1],
                                                     batch["context"].device).seq_len
        self.log_dict({"train/loss": loss, "train/forecast_loss": forecast_loss, "train/kl": out.kl,
                       "train/sparse_phase": float(phase == "sparse")}, prog_bar=True, batch_size=bsz)
        self._log_selection(out, "train", bsz)
        return loss

    def _log_selection(self, out: ModelOutput, stage: str, bsz: int) -> None:
        stats = [a.stats for a in out.aux if a.stats]
        if stats:
            for key in stats[0]:
                self.log(f"{stage}/{key}", sum(s[key] for s in stats) / len(stats), batch_size=bsz)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        # Validate the model as it will be used: routing through the indexer.
        forecast_loss, out, observed = self._losses(batch, "sparse")
        targets = self.model.target_index
        median = out.quantiles[..., self._median_index()]  # [B, T, H] scaled
        scale = batch["scale"][:, targets, None]
        truth = batch["horizon"][..., targets].transpose(1, 2)
        abs_err = ((median - truth).abs() * scale).masked_fill(~observed, 0.0)
        bsz = batch["context"].shape[0]
        self.log("val_loss", forecast_loss, prog_bar=True, batch_size=bsz)
        self.log("val/kl", out.kl, batch_size=bsz)
        self.log("val_mae", abs_err.sum() / observed.sum().clamp(min=1), prog_bar=True, batch_size=bsz,
                 reduce_fx="mean")
        self._log_selection(out, "val", bsz)

    def _median_index(self) -> int:
        levels = self.model.quantile_levels
        return int((levels - 0.5).abs().argmin())

    def configure_optimizers(self) -> dict[str, Any]:
        cfg = self.optim_cfg
        optimizer = build_adamw(self.model, cfg["lr"], cfg["weight_decay"], cfg["betas"])
        total = int(self.hparams.max_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: cosine_with_warmup(step, int(cfg["warmup_steps"]), total, float(cfg["min_lr_ratio"])))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["tokens_seen"] = self.tokens_seen

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.tokens_seen = int(checkpoint.get("tokens_seen", 0))
