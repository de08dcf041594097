"""What one training run of ours costs: tokens per window (from the model's own layout), the batch
size a token budget allows, and the wall time of every training step."""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from tsfm_msa.model.attention import MSAAttention
from tsfm_msa.tokens import TokenLayout, build_layout

# A phase's first steps compile kernels (Triton, FlexAttention) and warm caches: not the step cost.
SKIP_FIRST_STEPS = 5


def window_layout(schema, model_cfg: Any, context_len: int, horizon: int) -> TokenLayout:
    """The token layout of one window for this model config: the same builder the model uses
    (group-major, every sensor group padded to the block size)."""
    return build_layout(schema.roles, schema.group_index, schema.group_names, int(context_len), int(horizon),
                        int(model_cfg["patch_len"]), int(model_cfg["block_size"]),
                        bool(model_cfg.get("future_covariates_visible", False)))


def window_facts(layout: TokenLayout) -> dict[str, int]:
    """context_tokens: the window's real tokens (variates x context patches + horizon tokens); layout_tokens:
    the length L attention runs over (with each sensor group's padding to the block size); kv_blocks."""
    return {"context_tokens": int((layout.token_variate >= 0).sum()), "layout_tokens": layout.seq_len,
            "kv_blocks": layout.n_blocks}


def cap_top_k(model_cfg: dict[str, Any], layout: TokenLayout) -> dict[str, Any]:
    """An MSA config whose top_k (and hybrid k_own) is at most the window's KV blocks: at short contexts
    MSA then keeps every block, i.e. attends densely. Dense configs come back unchanged."""
    if model_cfg.get("attention") != "msa" or int(model_cfg["top_k"]) <= layout.n_blocks:
        return model_cfg
    capped = {**model_cfg, "top_k": layout.n_blocks}
    if capped.get("k_own") is not None:
        capped["k_own"] = min(int(capped["k_own"]), layout.n_blocks)
    return capped


@contextmanager
def top_k_at_most(model: torch.nn.Module, n_blocks: int):
    """Within the block, every MSA layer of ``model`` keeps at most ``n_blocks`` blocks (the rule of
    :func:`cap_top_k` for a shorter window of a context curriculum: MSA then attends densely there);
    the layers' top_k and k_own come back afterwards."""
    layers = [m for m in model.modules() if isinstance(m, MSAAttention)]
    saved = [(m.top_k, m.k_own) for m in layers]
    for m in layers:
        m.top_k = min(m.top_k, n_blocks)
        m.k_own = None if m.k_own is None else min(m.k_own, n_blocks)
    try:
        yield
    finally:
        for m, (top_k, k_own) in zip(layers, saved):
            m.top_k, m.k_own = top_k, k_own


def batch_for_tokens(tokens_per_window: int, tokens_per_batch: int | None, max_batch: int) -> int:
    """The largest batch of at most ``tokens_per_batch`` tokens, capped at ``max_batch`` and at least 1
    window; ``tokens_per_batch`` None keeps ``max_batch``."""
    if tokens_per_batch is None:
        return int(max_batch)
    return max(1, min(int(max_batch), int(tokens_per_batch) // int(tokens_per_window)))


class StepTimer(Callback):
    """Wall time of every optimizer step (forward, backward, update), with the CUDA queue drained at both
    ends so the time is the GPU's, and the phase (indexer_warmup or sparse) the step ran in."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, float]] = []  # (phase, seconds)
        self._start = 0.0
        self._phase = ""

    @staticmethod
    def _sync(pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._sync(pl_module)
        self._phase = pl_module.current_phase()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync(pl_module)
        self.steps.append((self._phase, time.perf_counter() - self._start))

    def median_seconds(self, phase: str | None = None) -> float:
        """Median step time of the last phase reached (the sparse phase once the indexer warmup is over;
        dense models run the same schedule and ignore it), or of ``phase``; each phase's first
        ``SKIP_FIRST_STEPS`` steps are left out where the phase has more. NaN without steps."""
        if not self.steps:
            return float("nan")
        phase = phase or self.steps[-1][0]
        times = [t for p, t in self.steps if p == phase]
        if len(times) > SKIP_FIRST_STEPS:
            times = times[SKIP_FIRST_STEPS:]
        return statistics.median(times) if times else float("nan")
