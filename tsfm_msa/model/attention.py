"""Attention layers over patch tokens: dense GQA and MSA (index branch + block-sparse main branch).

Both take hidden states ``x [B, L, d_model]`` and the static :class:`TokenLayout`; visibility is by
time (key j visible to query i iff ``k_time[j] <= q_time[i]``), never by flattened position.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from tsfm_msa import kernels
from tsfm_msa.model.dense_attention import own_group_attention, time_masked_attention
from tsfm_msa.model.rope import DEFAULT_ROPE_BASE, apply_rope_tables, rope_angles, rope_tables
from tsfm_msa.tokens import TokenLayout

GROUP_POLICIES = ("free", "sensor", "hybrid")
# What dense attention reads: every visible key, or only the keys the group policy selects from (under
# ``sensor``, GQA group g reads sensor group g alone; ``free`` and ``hybrid`` may read anywhere).
DENSE_SUPPORTS = ("all", "policy")


def check_dense_support(dense_support: str, group_policy: str = "sensor") -> None:
    """``dense_support`` is a known value and has an effect under ``group_policy``."""
    if dense_support not in DENSE_SUPPORTS:
        raise ModelConfigError(f"model.dense_support must be one of {DENSE_SUPPORTS} (dense attention over every visible "
                               f"key, or over the group policy's support), got {dense_support!r}")
    if dense_support == "policy" and group_policy != "sensor":
        # Only the sensor policy restricts a group's support; elsewhere `policy` would silently mean `all`.
        raise ModelConfigError(f"model.dense_support=policy only changes attention under model.group_policy=sensor "
                               f"(got {group_policy}); set model.group_policy=sensor (with n_kv_heads = number of "
                               f"sensor groups) or model.dense_support=all")
# "predict": the sparse path without the indexer loss (forecasting needs only the selection).
PHASES = ("indexer_warmup", "sparse", "predict")
# Indexer loss in training: every query row up to this many tokens; beyond, every AUTO_KL_STRIDE-th
# row (an unbiased estimate of the mean over rows). In the warmup the loss needs two extra
# attention passes (teacher with Hq heads, student with G heads): on 1/8 of the rows they add about
# 1/8 + G/(8 Hq) of a dense attention pass (H200, 32K-512K tokens: warmup step 1.14-1.20x dense);
# in the sparse phase the KL kernel's work drops with the rows it gets.
AUTO_KL_FULL_ROWS = 2048
AUTO_KL_STRIDE = 8


class ModelConfigError(ValueError):
    """Model settings that cannot work together."""


@dataclass
class AttentionAux:
    """What an attention layer reports besides its output (losses and selection statistics)."""

    kl: torch.Tensor | None = None
    # Sparse training with ``MSAAttention.dense_teacher``: the indexer against the dense attention.
    dense_kl: torch.Tensor | None = None
    block_idx: torch.Tensor | None = None  # [B, G, L, K] of the last forward, for probes
    stats: dict[str, float] = field(default_factory=dict)


class _QKV(nn.Module):
    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int,
                 rope_base: float = DEFAULT_ROPE_BASE) -> None:
        super().__init__()
        if n_kv_heads <= 0 or n_heads % n_kv_heads:
            raise ModelConfigError(f"n_heads ({n_heads}) must be a positive multiple of n_kv_heads ({n_kv_heads})")
        if isinstance(rope_base, bool) or not isinstance(rope_base, (int, float)) or not rope_base > 1:
            raise ModelConfigError(f"model.rope_base must be a number > 1 (the longest RoPE wavelength grows with it), "
                                   f"got {rope_base!r}")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.rope_base = float(rope_base)
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=False)

    def project(self, x: torch.Tensor, layout: TokenLayout):
        batch, seq_len, _ = x.shape
        q = self.q_proj(x).view(batch, seq_len, self.n_heads, self.head_dim).transpose(1, 2)  # [B, Hq, L, D]
        k = self.k_proj(x).view(batch, seq_len, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, G, L, D]
        v = self.v_proj(x).view(batch, seq_len, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos2, sin2 = layout_rope(layout, self.head_dim, q.dtype, self.rope_base)
        return apply_rope_tables(q, cos2, sin2), apply_rope_tables(k, cos2, sin2), v

    def merge(self, out: torch.Tensor) -> torch.Tensor:
        batch, _, seq_len, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq_len, self.n_heads * self.head_dim))


class DenseGQA(_QKV):
    """Dense grouped-query attention with the time-visibility mask: FlexAttention with a block mask
    from per-tile time ranges on CUDA, exact chunked attention on the CPU (no [L, L] mask).

    ``own_group``: GQA group g reads only sensor group g (the dense form of the ``sensor`` policy), so
    a dense model trained this way converts to a sensor-policy MSA model without re-routing its heads.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int,
                 rope_base: float = DEFAULT_ROPE_BASE, own_group: bool = False) -> None:
        super().__init__(d_model, n_heads, n_kv_heads, head_dim, rope_base)
        self.own_group = own_group

    def forward(self, x: torch.Tensor, layout: TokenLayout, phase: str = "sparse") -> tuple[torch.Tensor, AttentionAux]:
        q, k, v = self.project(x, layout)
        out, _ = dense_attention(q, k, v, layout, self.own_group)
        return self.merge(out), AttentionAux()


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout, own_group: bool,
                    q_time: torch.Tensor | None = None, cache_key="dense_mask", return_lse: bool = False,
                    scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dense attention of the query rows at ``q_time`` (default every row) over every visible key, or,
    with ``own_group``, over the keys of each GQA group's own sensor group."""
    if own_group:
        return own_group_attention(q, k, v, layout, q_time, scale, cache_key=cache_key, return_lse=return_lse)
    q_time = layout.q_time if q_time is None else q_time
    return time_masked_attention(q, k, v, q_time, layout.k_time, scale, cache=layout.cache, cache_key=cache_key,
                                 return_lse=return_lse)


class MSAAttention(_QKV):
    """MiniMax-style sparse attention.

    Index branch: one index query head per GQA group and one shared index key head, fed with the
    *detached* hidden states, score ``s(i, j) = qi[g, i] . ki[j]``; blocks are max-pooled and the
    top ``top_k`` kept per (group, query), with the local block forced. The main branch runs exact
    softmax attention over the selected support. The KL loss aligns the indexer with the main
    branch's attention (teacher detached), so it trains the index projections only.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        index_dim: int = 32,
        top_k: int = 4,
        group_policy: str = "free",
        k_own: int | None = None,
        collect_stats: bool = True,
        kl_row_stride: int | None = None,
        rope_base: float = DEFAULT_ROPE_BASE,
        dense_support: str = "all",
    ) -> None:
        super().__init__(d_model, n_heads, n_kv_heads, head_dim, rope_base)
        if group_policy not in GROUP_POLICIES:
            raise ModelConfigError(f"group_policy must be one of {GROUP_POLICIES}, got {group_policy!r}")
        check_dense_support(dense_support, group_policy)
        if not isinstance(top_k, int) or top_k <= 0:
            raise ModelConfigError(f"top_k must be a positive integer, got {top_k!r}")
        if group_policy == "hybrid":
            k_own = max(1, top_k // 2) if k_own is None else k_own
            if not 1 <= k_own <= top_k:
                raise ModelConfigError(f"hybrid policy needs 1 <= k_own <= top_k ({top_k}), got k_own={k_own}")
        self.index_dim, self.top_k, self.group_policy, self.k_own = index_dim, top_k, group_policy, k_own
        # dense_support="policy" under the sensor policy: the dense phases (indexer warmup, the dense
        # teacher) read each group's own sensor group only, as the sparse phase will. It pays with a dense
        # model trained the same way: converted from a full dense model whose heads read across sensor
        # groups, a 512-token probe lost a learned far cause on 3 of 8 seeds at the switch, with the
        # cause's block selected (benchmarks/results/2026-12-02-probes-sensor-switch.md).
        self.own_group_dense = dense_support == "policy"  # check_dense_support: only under the sensor policy
        self.collect_stats = collect_stats
        if kl_row_stride is not None and (not isinstance(kl_row_stride, int) or kl_row_stride <= 0):
            raise ModelConfigError(f"model.kl_row_stride must be a positive integer or null (auto), got {kl_row_stride!r}")
        self.kl_row_stride = kl_row_stride
        # Set by the model before each training forward: picks the index loss's row subset,
        # identically in a forward and in its activation-checkpointing recompute.
        self.train_step = 0
        # Probes swap the learned indexer for a baseline selector (local window, random-k, oracle, ...):
        # called as selector(layer, q, k, qi, ki, layout) -> block_idx [B, G, L, K] in the sparse phase.
        self.selector: Callable[..., torch.Tensor] | None = None
        # Set by the training module (``dense_teacher_kl > 0``): sparse training steps also report the
        # warmup's index loss against the dense attention over every visible key (aux.dense_kl). The
        # sparse KL only sees the selected blocks, so without it a block the indexer dropped never
        # comes back, however much the dense attention wants it.
        self.dense_teacher = False
        self.index_q = nn.Linear(d_model, n_kv_heads * index_dim, bias=False)
        self.index_k = nn.Linear(d_model, index_dim, bias=False)

    def check_layout(self, layout: TokenLayout) -> None:
        if self.top_k > layout.n_blocks:
            raise ModelConfigError(
                f"top_k={self.top_k} is larger than the number of KV blocks ({layout.n_blocks}) of this layout "
                f"({layout.seq_len} tokens in blocks of {layout.block_size}); lower model.top_k, or give the window "
                f"more blocks: a longer data.context_len, a shorter model.patch_len or a smaller model.block_size")
        if self.group_policy in ("sensor", "hybrid") and layout.n_groups != self.n_kv_heads:
            groups = layout.n_groups
            fix = (f"set model.n_kv_heads={groups} model.n_heads={groups * max(1, self.n_heads // self.n_kv_heads)} "
                   f"(n_heads must be a multiple of n_kv_heads)")
            raise ModelConfigError(
                f"group_policy={self.group_policy} maps GQA groups to sensor groups, so n_kv_heads "
                f"({self.n_kv_heads}) must equal the number of sensor groups ({groups}: "
                f"{list(layout.group_names)}); {fix}, or use model.group_policy=free")

    def index_branch(self, x: torch.Tensor, layout: TokenLayout) -> tuple[torch.Tensor, torch.Tensor]:
        batch, seq_len, _ = x.shape
        xd = x.detach()  # the KL loss must not reach the backbone
        qi = self.index_q(xd).view(batch, seq_len, self.n_kv_heads, self.index_dim).transpose(1, 2)
        ki = self.index_k(xd)  # [B, L, Di]
        cos2, sin2 = layout_rope(layout, self.index_dim, qi.dtype, self.rope_base)
        return apply_rope_tables(qi, cos2, sin2), apply_rope_tables(ki, cos2, sin2)

    def select(self, qi: torch.Tensor, ki: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """Selected blocks ``[B, G, L, K]`` under the group policy."""
        batch, groups, seq_len, _ = qi.shape
        q_time, k_time = batch_times(layout, batch)
        bs = layout.block_size
        if self.group_policy == "free":
            forced = layout.cached(("forced_own", batch, groups), lambda: (
                layout.own_local_block.view(1, 1, seq_len, 1).expand(batch, groups, seq_len, 1).int().contiguous()))
            return kernels.select_blocks(qi, ki, q_time, k_time, bs, self.top_k, None, forced)
        own = layout.cached(("own_group_blocks", batch, groups), lambda: (
            (layout.block_group[None, :] == torch.arange(groups, device=qi.device)[:, None])[None]
            .expand(batch, groups, layout.n_blocks).contiguous()))  # [B, G, NB]
        local = layout.cached(("forced_group_local", batch), lambda: (
            layout.group_local_block[None, :, :, None].expand(batch, groups, seq_len, 1).int().contiguous()))
        if self.group_policy == "sensor":
            return kernels.select_blocks(qi, ki, q_time, k_time, bs, self.top_k, own, local)
        first = kernels.select_blocks(qi, ki, q_time, k_time, bs, self.k_own, own, local)
        if self.k_own == self.top_k:
            return first
        return kernels.select_blocks(qi, ki, q_time, k_time, bs, self.top_k, None, first)

    def forward(self, x: torch.Tensor, layout: TokenLayout, phase: str = "sparse") -> tuple[torch.Tensor, AttentionAux]:
        if phase not in PHASES:
            raise ModelConfigError(f"phase must be one of {PHASES}, got {phase!r}")
        batch = x.shape[0]
        q, k, v = self.project(x, layout)
        qi, ki = self.index_branch(x, layout)
        if phase == "indexer_warmup":
            # Dense main branch (the model trains as a dense model), and the indexer learns from the
            # dense teacher on the dense visible support -- no all-blocks block list, no O(L^2) buffer.
            out, _ = dense_attention(q, k, v, layout, self.own_group_dense)
            return self.merge(out), AttentionAux(kl=self.dense_index_loss(q, k, qi, ki, layout))
        q_time, k_time = batch_times(layout, batch)
        if self.selector is not None:
            block_idx = self.selector(self, q, k, qi, ki, layout)
        else:
            block_idx = self.select(qi, ki, layout)
        out, lse = kernels.sparse_attention(q, k, v, block_idx, q_time, k_time, layout.block_size)
        kl = None if phase == "predict" else self.index_loss(qi, ki, q, k, block_idx, lse, q_time, k_time, layout)
        aux = AttentionAux(kl=kl, block_idx=block_idx.detach())
        if self.dense_teacher and self.training and phase == "sparse":
            aux.dense_kl = self.dense_index_loss(q, k, qi, ki, layout)
        if self.collect_stats:
            local = layout.own_local_block[None] if self.group_policy == "free" else layout.group_local_block
            aux.stats = support_stats(block_idx, layout, local)
        return self.merge(out), aux

    def index_loss(self, qi, ki, q, k, block_idx, lse, q_time, k_time, layout: TokenLayout) -> torch.Tensor:
        """KL of the indexer against the main branch on the selected support (sparse phase)."""
        kl_idx = block_idx
        stride = self.kl_query_stride(layout)
        if self.training and stride > 1:
            # Rows left out of this step's KL get no blocks: the KL kernel skips them and averages
            # over the rest.
            skipped = layout.cached(("kl_rows_skipped", stride, self.train_step % stride), lambda: (
                torch.arange(layout.seq_len, device=q.device) % stride != self.train_step % stride))
            kl_idx = block_idx.masked_fill(skipped[None, None, :, None], -1)
        return kernels.indexer_kl(qi, ki, kl_idx, q, k, lse, q_time, k_time, layout.block_size)

    def kl_query_stride(self, layout: TokenLayout) -> int:
        """Every how many query rows the index loss is computed on in training (see dense_index_loss)."""
        if self.kl_row_stride is not None:
            return self.kl_row_stride
        return 1 if layout.seq_len <= AUTO_KL_FULL_ROWS else AUTO_KL_STRIDE

    def dense_index_loss(self, q: torch.Tensor, k: torch.Tensor, qi: torch.Tensor, ki: torch.Tensor,
                         layout: TokenLayout) -> torch.Tensor:
        """Indexer loss of the warmup phase: cross-entropy H(p, s) of the indexer's distribution
        ``s = softmax(qi . ki * index_scale)`` against the dense teacher ``p = mean over the group's
        heads of softmax(q . k / sqrt(D))``, both over every visible key. It differs from KL(p || s)
        by the teacher's entropy, a constant for the indexer, so the gradients are the KL's.

        Written through two attention calls that never form the [L, L] probabilities:
        ``u = p @ ki`` (teacher attention with the index keys as values) and ``a = s @ ki`` with
        ``lse_s`` (student attention), so ``H = lse_s - index_scale * qi . u``,
        ``dH/dqi = index_scale * (a - u)`` and ``dH/dki_j = index_scale * sum_i (s_ij - p_ij) qi_i``:
        the first two come from autograd through ``u``, the last through the student's values.

        At long L the loss is taken on every ``stride``-th query row (a fixed-size subset whose
        offset rotates with the training step): an unbiased estimate of the mean over rows that
        keeps the warmup close to a dense step's cost.
        """
        batch, groups, seq_len, index_dim = qi.shape
        rep = self.n_heads // groups
        index_scale = 1.0 / math.sqrt(index_dim)
        stride = self.kl_query_stride(layout)
        offset = self.train_step % stride
        rows = layout.cached(("kl_rows", stride, offset), lambda: (
            torch.arange(offset, offset + stride * (seq_len // stride), stride, device=qi.device)))
        q_time = layout.cached(("kl_row_times", stride, offset), lambda: layout.q_time[rows].contiguous())
        valid = layout.cached(("kl_row_valid", stride, offset), lambda: layout.visible_count[rows] > 0)
        mask_key = ("kl_mask", stride, offset)
        teacher_values = ki[:, None].expand(batch, groups, seq_len, index_dim).contiguous()
        u, _ = dense_attention(q.detach()[:, :, rows], k.detach(), teacher_values, layout, self.own_group_dense,
                               q_time, cache_key=mask_key)
        u = u.float().view(batch, groups, rep, rows.numel(), index_dim).mean(2)  # [B, G, n, Di]
        qi_rows = qi[:, :, rows]
        a, lse_s = dense_attention(qi_rows.detach(), ki.detach()[:, None], ki[:, None], layout, self.own_group_dense,
                                   q_time, cache_key=mask_key, return_lse=True, scale=index_scale)
        qi_f, a = qi_rows.float(), a.float()
        cross = -index_scale * (qi_f * u).sum(-1)  # [B, G, n]: gradients to qi and, through u, to ki
        student = index_scale * ((qi_f * a.detach()).sum(-1) + (qi_f.detach() * a).sum(-1))
        per_row = lse_s.detach() + cross + (student - student.detach())  # value: the cross-entropy
        per_row = torch.where(valid, per_row, torch.zeros_like(per_row))
        return per_row.sum() / (valid.sum() * batch * groups).clamp(min=1)


def layout_rope(layout: TokenLayout, dim: int, dtype: torch.dtype,
                base: float = DEFAULT_ROPE_BASE) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables (:func:`rope_tables`) of the layout's patch times, computed once per layout, head
    dim, dtype and base (autocast's bf16 projections would otherwise cast them on every call)."""
    return layout.cached(("rope_tables", dim, dtype, base), lambda: rope_tables(
        *rope_angles(layout.token_patch.clamp(min=0), dim, base), dtype))


def batch_times(layout: TokenLayout, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``q_time, k_time [B, L]`` int32 as the kernels take them, built once per layout and batch size."""
    return layout.cached(("batch_times", batch), lambda: (
        layout.q_time.expand(batch, layout.seq_len).contiguous(),
        layout.k_time.expand(batch, layout.seq_len).contiguous()))


@torch.no_grad()
def support_stats(block_idx: torch.Tensor, layout: TokenLayout, local_block: torch.Tensor) -> dict[str, float]:
    """Mean support size (visible tokens in the selected blocks, per query and group), its share of
    the dense visible set, and the share of the support lying in the forced local block
    (``local_block [1 or G, L]``, the policy's local block per group and query)."""
    bs, seq_len = layout.block_size, layout.seq_len
    valid_q = layout.q_time >= 0
    pad = layout.n_blocks * bs - seq_len
    k_time = nn.functional.pad(layout.k_time, (0, pad), value=kernels.INT32_MAX).view(layout.n_blocks, bs)
    batch, groups, _, slots = block_idx.shape
    # Chunk over queries: the gathered key times are [B, G, Lc, K, bs], too large at long L in one go.
    chunk = max(1, (1 << 24) // max(1, batch * groups * slots * bs))
    support_parts, local_parts = [], []
    for start in range(0, seq_len, chunk):
        idx = block_idx[:, :, start:start + chunk]
        slot_valid = idx >= 0
        times = k_time[idx.clamp(min=0).long()]  # [B, G, Lc, K, bs]
        q_time = layout.q_time[start:start + chunk]
        per_slot = ((times <= q_time[None, None, :, None, None]) & slot_valid[..., None]).sum(-1)  # [B, G, Lc, K]
        local = (idx == local_block[None, :, start:start + chunk, None].int()) & slot_valid
        support_parts.append(per_slot.sum(-1).float())
        local_parts.append((per_slot * local).sum(-1).float())
    support = torch.cat(support_parts, dim=-1)  # [B, G, L]
    local_tokens = torch.cat(local_parts, dim=-1)
    dense = layout.visible_count.float()  # [L]
    support_q = support[..., valid_q]
    return {
        "support_tokens": float(support_q.mean()),
        "support_frac": float((support_q / dense[valid_q].clamp(min=1)).mean()),
        "local_share": float((local_tokens[..., valid_q] / support_q.clamp(min=1)).mean()),
    }
