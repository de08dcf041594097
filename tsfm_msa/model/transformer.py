"""Patch-token Transformer with per-layer dense or MSA attention and a quantile forecast head."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.utils.checkpoint
from torch import nn

from tsfm_msa.kernels.validation import KernelInputError, check_kernel_config
from tsfm_msa.model.attention import (PHASES, AttentionAux, DenseGQA, ModelConfigError, MSAAttention,
                                      check_dense_support)
from tsfm_msa.model.rope import DEFAULT_ROPE_BASE
from tsfm_msa.tokens import ROLES, TokenLayout, build_layout, patch_tokens

DEFAULT_QUANTILES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass
class ModelOutput:
    quantiles: torch.Tensor  # [B, n_targets, H, Q] in scaled units, sorted along Q
    kl: torch.Tensor  # scalar: mean KL of the MSA layers (0 without MSA layers)
    aux: list[AttentionAux] = field(default_factory=list)
    # scalar: mean over the MSA layers of the index loss against the dense attention; None unless the
    # layers' dense_teacher is on and this was a sparse training forward
    dense_kl: torch.Tensor | None = None


class Block(nn.Module):
    """Pre-norm Transformer block."""

    def __init__(self, attention: nn.Module, d_model: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attention = attention
        self.norm2 = nn.LayerNorm(d_model)
        hidden = int(d_model * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, d_model))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, layout: TokenLayout, phase: str) -> tuple[torch.Tensor, AttentionAux]:
        attn_out, aux = self.attention(self.norm1(x), layout, phase)
        x = x + self.dropout(attn_out)
        return x + self.dropout(self.mlp(self.norm2(x))), aux


class PatchTransformer(nn.Module):
    """Forecaster over group-major patch tokens.

    ``attention`` is ``"dense"``, ``"msa"``, or a list with one of them per layer. The schema
    (``roles``, ``groups``, ``group_names``) fixes the variates; the window lengths fix the layout,
    which is built once per (context_len, horizon) and cached.
    """

    def __init__(
        self,
        roles: list[str],
        groups: list[int],
        group_names: list[str],
        patch_len: int = 16,
        d_model: int = 64,
        n_layers: int = 2,
        n_heads: int = 4,
        n_kv_heads: int = 2,
        head_dim: int = 16,
        mlp_ratio: float = 2.0,
        dropout: float = 0.0,
        attention: str | list[str] = "msa",
        block_size: int = 16,
        top_k: int = 4,
        index_dim: int = 16,
        group_policy: str = "free",
        k_own: int | None = None,
        future_covariates_visible: bool = False,
        quantiles: tuple[float, ...] | list[float] = DEFAULT_QUANTILES,
        max_variates: int = 64,
        activation_checkpointing: bool = False,
        kl_row_stride: int | None = None,
        rope_base: float = DEFAULT_ROPE_BASE,
        dense_support: str = "all",
    ) -> None:
        super().__init__()
        kinds = [attention] * n_layers if isinstance(attention, str) else list(attention)
        if len(kinds) != n_layers:
            raise ModelConfigError(f"attention lists {len(kinds)} layer kinds but n_layers={n_layers}")
        for kind in kinds:
            if kind not in ("dense", "msa"):
                raise ModelConfigError(f"attention kind must be 'dense' or 'msa', got {kind!r}")
        check_dense_support(dense_support, group_policy)
        own_group_dense = dense_support == "policy"  # own sensor group only (check_dense_support: sensor policy)
        if len(roles) > max_variates:
            raise ModelConfigError(f"{len(roles)} variates exceed max_variates={max_variates}; raise model.max_variates")
        for name, value in (("patch_len", patch_len), ("block_size", block_size)):
            if not isinstance(value, int) or value <= 0:
                raise ModelConfigError(f"{name} must be a positive integer, got {value!r}")
        if "msa" in kinds:
            # The same model must run on the GPU: refuse now what the Triton kernels cannot take.
            try:
                check_kernel_config(block_size, top_k, head_dim, index_dim, prefix="model.")
            except KernelInputError as err:
                raise ModelConfigError(str(err)) from None
        if sorted(quantiles) != list(quantiles) or not all(0 < q < 1 for q in quantiles):
            raise ModelConfigError(f"quantiles must be increasing levels in (0, 1), got {list(quantiles)}")
        self.roles, self.groups, self.group_names = list(roles), list(groups), list(group_names)
        self.patch_len, self.block_size = patch_len, block_size
        self.future_covariates_visible = future_covariates_visible
        self.register_buffer("quantile_levels", torch.tensor(list(quantiles), dtype=torch.float32), persistent=False)
        self.target_index = [v for v, r in enumerate(roles) if r == "target"]

        self.input_proj = nn.Linear(2 * patch_len, d_model)
        self.variate_embed = nn.Embedding(max_variates, d_model)
        self.role_embed = nn.Embedding(len(ROLES), d_model)
        self.hidden_embed = nn.Parameter(torch.zeros(d_model))  # marks the patches to forecast
        layers = []
        for kind in kinds:
            if kind == "dense":
                attn = DenseGQA(d_model, n_heads, n_kv_heads, head_dim, rope_base, own_group=own_group_dense)
            else:
                attn = MSAAttention(d_model, n_heads, n_kv_heads, head_dim, index_dim, top_k, group_policy, k_own,
                                    kl_row_stride=kl_row_stride, rope_base=rope_base, dense_support=dense_support)
            layers.append(Block(attn, d_model, mlp_ratio, dropout))
        self.layers = nn.ModuleList(layers)
        if ("msa" in kinds or own_group_dense) and group_policy in ("sensor", "hybrid") and len(group_names) != n_kv_heads:
            # Known from the schema now: say it before any data is read (the layout check repeats it).
            rep = max(1, n_heads // max(1, n_kv_heads))
            raise ModelConfigError(
                f"model.group_policy={group_policy} maps GQA groups to sensor groups, so model.n_kv_heads ({n_kv_heads}) "
                f"must equal the number of sensor groups ({len(group_names)}: {list(group_names)}); set "
                f"model.n_kv_heads={len(group_names)} model.n_heads={len(group_names) * rep}, or use model.group_policy=free")
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, patch_len * len(quantiles))
        self._layouts: dict[tuple[int, int, str], TokenLayout] = {}
        # Recompute each block's activations in the backward pass instead of keeping them: memory
        # per layer drops from the block's intermediates to its input, for about one more forward.
        self.activation_checkpointing = bool(activation_checkpointing)
        self._train_forwards = 0

    @property
    def has_msa(self) -> bool:
        return any(isinstance(layer.attention, MSAAttention) for layer in self.layers)

    def layout(self, context_len: int, horizon: int, device: torch.device) -> TokenLayout:
        key = (context_len, horizon, str(device))
        if key not in self._layouts:
            with torch.inference_mode(False):  # the layout outlives an inference-mode first call
                layout = build_layout(self.roles, self.groups, self.group_names, context_len, horizon,
                                      self.patch_len, self.block_size, self.future_covariates_visible).to(device)
            for layer in self.layers:
                if isinstance(layer.attention, MSAAttention):
                    layer.attention.check_layout(layout)
            self._layouts[key] = layout
        return self._layouts[key]

    def encode(self, batch: dict[str, torch.Tensor], phase: str = "sparse") -> tuple[torch.Tensor, TokenLayout, list[AttentionAux]]:
        """Hidden states of every token ``[B, L, d_model]`` after the final norm, the layout, and
        each layer's attention report."""
        if phase not in PHASES:
            raise ModelConfigError(f"phase must be one of {PHASES}, got {phase!r}")
        context, horizon = batch["context"], batch["horizon"]
        if context.shape[-1] != len(self.roles):
            raise ModelConfigError(f"the batch has {context.shape[-1]} variates but the model was built for "
                                   f"{len(self.roles)}; the data config does not match the checkpoint")
        layout = self.layout(context.shape[1], horizon.shape[1], context.device)
        values, mask = patch_tokens(context, batch["context_mask"], horizon, batch["horizon_mask"], layout)
        x = self.input_proj(torch.cat([values, mask.to(values.dtype)], dim=-1))  # [B, L, d_model]
        x = x + self.variate_embed(layout.token_variate.clamp(min=0)) + self.role_embed(layout.token_role.clamp(min=0))
        x = x + layout.is_hidden[:, None] * self.hidden_embed
        x = x * (layout.token_variate >= 0)[:, None]  # padding tokens carry nothing
        if self.training:
            self._train_forwards += 1
            for layer in self.layers:
                if isinstance(layer.attention, MSAAttention):
                    layer.attention.train_step = self._train_forwards
        checkpointed = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        auxes = []
        for layer in self.layers:
            if checkpointed:
                x, aux = torch.utils.checkpoint.checkpoint(layer, x, layout, phase, use_reentrant=False)
            else:
                x, aux = layer(x, layout, phase)
            auxes.append(aux)
        return self.norm(x), layout, auxes

    def forward(self, batch: dict[str, torch.Tensor], phase: str = "sparse") -> ModelOutput:
        x, layout, auxes = self.encode(batch, phase)
        n_h = batch["horizon"].shape[1]
        n_t, n_hp = layout.forecast_index.shape
        tokens = x[:, layout.forecast_index.flatten()]  # [B, n_targets * n_hp, d_model]
        raw = self.head(tokens).view(x.shape[0], n_t, n_hp * self.patch_len, -1)[:, :, :n_h]
        quantiles = torch.sort(raw, dim=-1).values  # monotone in the level
        kls = [a.kl for a in auxes if a.kl is not None]
        kl = torch.stack(kls).mean() if kls else x.new_zeros(())
        dense_kls = [a.dense_kl for a in auxes if a.dense_kl is not None]
        dense_kl = torch.stack(dense_kls).mean() if dense_kls else None
        return ModelOutput(quantiles=quantiles, kl=kl, aux=auxes, dense_kl=dense_kl)


def pinball_loss(
    quantiles: torch.Tensor,  # [B, T, H, Q]
    target: torch.Tensor,  # [B, T, H]
    observed: torch.Tensor,  # [B, T, H] bool
    levels: torch.Tensor,  # [Q]
) -> torch.Tensor:
    """Mean quantile loss over observed steps; missing targets contribute nothing."""
    diff = target[..., None] - quantiles
    loss = torch.maximum(levels * diff, (levels - 1) * diff).mean(-1)
    loss = torch.where(observed, loss, torch.zeros_like(loss))
    return loss.sum() / observed.sum().clamp(min=1)
