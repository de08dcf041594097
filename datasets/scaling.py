"""Per-variate mean/std scaling fitted on a context window, ignoring missing values.

Works on numpy arrays (the datasets) and torch tensors (a model scaling at inference); the two give
the same numbers. Convention: value = scaled * scale + loc.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np
import torch

Array = TypeVar("Array", np.ndarray, torch.Tensor)

# The std is floored at REL_EPS * mean(|x|): a (nearly) constant window then gets a scale proportional
# to its magnitude instead of ~0, so a later jump does not explode. All-zero windows get scale 1.
REL_EPS = 1e-3
ABS_EPS = 1e-8


def fit_scaler(
    context: Array,
    binary: Sequence[bool] | np.ndarray | torch.Tensor | None = None,
    rel_eps: float = REL_EPS,
) -> tuple[Array, Array]:
    """loc, scale [..., V] from context [..., C, V] (NaN = missing), per variate over the time axis.

    loc = mean and scale = population std of the observed steps, scale >= rel_eps * mean|x|.
    A variate with no observed step gets loc 0, scale 1; one that is all zeros gets scale 1.
    binary: bool [V]; True variates (0/1 flags) get loc 0, scale 1 (left as they are).
    Leading batch dimensions are allowed. Output dtype follows the input (float32 in -> float32 out).
    """
    if isinstance(context, torch.Tensor):
        return _fit_torch(context, binary, rel_eps)
    return _fit_numpy(np.asarray(context), binary, rel_eps)


def _fit_numpy(x: np.ndarray, binary: object, rel_eps: float) -> tuple[np.ndarray, np.ndarray]:
    # Sums over time as ones @ x: numpy's axis reductions over a short V axis are ~3x slower, and
    # this runs once per training window.
    obs = ~np.isnan(x)  # [..., C, V]
    ones = np.ones(x.shape[-2])  # [C]
    x0 = np.where(obs, x, 0.0).astype(np.float64)  # float64 sums: large levels, long contexts
    n = ones @ obs  # [..., V] float64 counts
    denom = np.maximum(n, 1.0)
    loc = (ones @ x0) / denom  # [..., V]
    dev = np.where(obs, x0 - loc[..., None, :], 0.0)  # two-pass variance: no cancellation at big levels
    std = np.sqrt((ones @ (dev * dev)) / denom)
    mean_abs = (ones @ np.abs(x0)) / denom
    scale = np.maximum(std, np.maximum(rel_eps * mean_abs, ABS_EPS))
    unit = (n == 0) | (mean_abs == 0)
    zero_loc = n == 0
    if binary is not None:
        b = np.asarray(binary, dtype=bool)
        unit = unit | b
        zero_loc = zero_loc | b
    loc = np.where(zero_loc, 0.0, loc)
    scale = np.where(unit, 1.0, scale)
    dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.float32
    return loc.astype(dtype), scale.astype(dtype)


def _fit_torch(x: torch.Tensor, binary: object, rel_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    obs = ~torch.isnan(x)  # [..., C, V]
    xd = torch.where(obs, x, torch.zeros((), dtype=x.dtype, device=x.device)).double()
    n = obs.sum(dim=-2)  # [..., V]
    denom = n.clamp(min=1).double()
    loc = xd.sum(dim=-2) / denom
    dev = torch.where(obs, xd - loc.unsqueeze(-2), torch.zeros((), dtype=xd.dtype, device=x.device))
    std = ((dev * dev).sum(dim=-2) / denom).sqrt()
    mean_abs = xd.abs().sum(dim=-2) / denom
    scale = torch.maximum(std, (rel_eps * mean_abs).clamp(min=ABS_EPS))
    unit = (n == 0) | (mean_abs == 0)
    zero_loc = n == 0
    if binary is not None:
        b = torch.as_tensor(binary, dtype=torch.bool, device=x.device)
        unit = unit | b
        zero_loc = zero_loc | b
    loc = torch.where(zero_loc, torch.zeros_like(loc), loc)
    scale = torch.where(unit, torch.ones_like(scale), scale)
    return loc.to(x.dtype), scale.to(x.dtype)


def apply_scaler(x: Array, loc: Array, scale: Array) -> Array:
    """(x - loc) / scale; x [..., T, V], loc/scale [..., V]. NaN stays NaN."""
    return (x - _over_time(loc)) / _over_time(scale)


def invert_scaler(y: Array, loc: Array, scale: Array) -> Array:
    """y * scale + loc; inverse of apply_scaler."""
    return y * _over_time(scale) + _over_time(loc)


def _over_time(s: Array) -> Array:
    """[..., V] -> [..., 1, V] so it broadcasts over the time axis of [..., T, V]."""
    return s[..., None, :]
