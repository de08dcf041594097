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


def rope_tables(cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos2 = [cos, cos]`` and ``sin2 = [-sin, sin]`` ``[L, dim]`` in ``dtype``, for
    :func:`apply_rope_tables` (build once, apply many times)."""
    return torch.cat([cos, cos], -1).to(dtype), torch.cat([-sin, sin], -1).to(dtype)


def apply_rope_tables(x: torch.Tensor, cos2: torch.Tensor, sin2: torch.Tensor) -> torch.Tensor:
    """:func:`apply_rope` from :func:`rope_tables`: ``[x2, x1] * sin2 + x * cos2``, the same values
    (``a - b == a + (-b)`` exactly) in 4 ops instead of 7, no per-call casts of the tables and a
    shorter backward."""
    # roll = [x2, x1] in one op whose backward is one roll too (slices + cat cost ~5 launches
    # backward). The contiguous term first: the sum takes its layout, so a transposed x (heads
    # view of a projection) still gives a contiguous result, as the kernels take it.
    return torch.roll(x, x.shape[-1] // 2, -1) * sin2 + x * cos2


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [..., L, dim]`` pairwise (first half with second half)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
