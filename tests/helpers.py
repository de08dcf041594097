"""Shared builders for the tests: small random models and batches (never zeros)."""
from __future__ import annotations

import torch

from tsfm_msa.model.transformer import PatchTransformer

ROLES3 = ["target", "past_covariate", "future_covariate"]


def random_batch(batch: int, context: int, horizon: int, n_var: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "context": torch.randn(batch, context, n_var, generator=g),
        "context_mask": torch.rand(batch, context, n_var, generator=g) > 0.05,
        "horizon": torch.randn(batch, horizon, n_var, generator=g),
        "horizon_mask": torch.ones(batch, horizon, n_var, dtype=torch.bool),
        "loc": torch.randn(batch, n_var, generator=g),
        "scale": torch.rand(batch, n_var, generator=g) + 0.5,
    }


def small_model(attention: str = "msa", policy: str = "free", top_k: int = 3, n_kv_heads: int = 3,
                seed: int = 0, **kwargs) -> PatchTransformer:
    torch.manual_seed(seed)
    params = dict(patch_len=8, d_model=32, n_layers=2, n_heads=2 * n_kv_heads, n_kv_heads=n_kv_heads,
                  head_dim=8, block_size=8, top_k=top_k, index_dim=8, group_policy=policy, attention=attention)
    params.update(kwargs)
    return PatchTransformer(ROLES3, [0, 1, 2], ["target", "past", "future"], **params).eval()
