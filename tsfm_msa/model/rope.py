"""Rotary position embedding on the patch time axis: tokens of one patch share a position, so the
attention score depends on the time distance between patches, not on the flattened position."""
from __future__ import annotations

import torch

# The usual base; the longest wavelength is about 2 pi * base ** (1 - 2 / dim) patches (model.rope_base).
DEFAULT_ROPE_BASE = 10000.0


def rope_angles(time_id: torch.Tensor, dim: int, base: float = DEFAULT_ROPE_BASE) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``[L, dim/2]`` for integer positions ``time_id [L]``."""
    if dim % 2:
        raise ValueError(f"rotary embedding needs an even head dim, got {dim}")
    inv_freq = base ** (-torch.arange(0, dim, 2, device=time_id.device, dtype=torch.float32) / dim)
    angles = time_id.float()[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [..., L, dim]`` pairwise (first half with second half)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
