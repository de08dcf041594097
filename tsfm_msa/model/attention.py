"""Attention layers over patch tokens: dense GQA and MSA (index branch + block-sparse main branch).

Both take hidden states ``x [B, L, d_model]`` and the static :class:`TokenLayout`; visibility is by
time (key j visible to query i iff ``k_time[j] <= q_time[i]``), never by flattened position.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from tsfm_msa import kernels
from tsfm_msa.model.rope import apply_rope, rope_angles
from tsfm_msa.tokens import TokenLayout

GROUP_POLICIES = ("free", "sensor", "hybrid")
PHASES = ("indexer_warmup", "sparse")


class ModelConfigError(ValueError):
    """Model settings that cannot work together."""


@dataclass
class AttentionAux:
    """What an attention layer reports besides its output (losses and selection statistics)."""

    kl: torch.Tensor | None = None
    block_idx: torch.Tensor | None = None  # [B, G, L, K] of the last forward, for probes
    stats: dict[str, float] = field(default_factory=dict)


class _QKV(nn.Module):
    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        if n_kv_heads <= 0 or n_heads % n_kv_heads:
            raise ModelConfigError(f"n_heads ({n_heads}) must be a positive multiple of n_kv_heads ({n_kv_heads})")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=False)

    def project(self, x: torch.Tensor, layout: TokenLayout):
        batch, seq_len, _ = x.shape
        q = self.q_proj(x).view(batch, seq_len, self.n_heads, self.head_dim).transpose(1, 2)  # [B, Hq, L, D]
        k = self.k_proj(x).view(batch, seq_len, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, G, L, D]
        v = self.v_proj(x).view(batch, seq_len, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope_angles(layout.token_patch.clamp(min=0), self.head_dim)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def merge(self, out: torch.Tensor) -> torch.Tensor:
        batch, _, seq_len, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq_len, self.n_heads * self.head_dim))


class DenseGQA(_QKV):
    """Dense grouped-query attention with the time-visibility mask (PyTorch SDPA)."""

    def forward(self, x: torch.Tensor, layout: TokenLayout, phase: str = "sparse") -> tuple[torch.Tensor, AttentionAux]:
        q, k, v = self.project(x, layout)
        visible = layout.k_time[None, :] <= layout.q_time[:, None]  # [L, L]
        # Padding queries see nothing; give them their own key so softmax stays finite, then zero them.
        empty = ~visible.any(-1)
        mask = visible | (torch.eye(visible.shape[0], dtype=torch.bool, device=x.device) & empty[:, None])
        rep = self.n_heads // self.n_kv_heads
        out = nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=mask
        )
        out = out.masked_fill(empty[None, None, :, None], 0.0)
        return self.merge(out), AttentionAux()


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
    ) -> None:
        super().__init__(d_model, n_heads, n_kv_heads, head_dim)
        if group_policy not in GROUP_POLICIES:
            raise ModelConfigError(f"group_policy must be one of {GROUP_POLICIES}, got {group_policy!r}")
        if not isinstance(top_k, int) or top_k <= 0:
            raise ModelConfigError(f"top_k must be a positive integer, got {top_k!r}")
        if group_policy == "hybrid":
            k_own = max(1, top_k // 2) if k_own is None else k_own
            if not 1 <= k_own <= top_k:
                raise ModelConfigError(f"hybrid policy needs 1 <= k_own <= top_k ({top_k}), got k_own={k_own}")
        self.index_dim, self.top_k, self.group_policy, self.k_own = index_dim, top_k, group_policy, k_own
        self.collect_stats = collect_stats
        # Probes swap the learned indexer for a baseline selector (local window, random-k, oracle, ...):
        # called as selector(layer, q, k, qi, ki, layout) -> block_idx [B, G, L, K] in the sparse phase.
        self.selector: Callable[..., torch.Tensor] | None = None
        self.index_q = nn.Linear(d_model, n_kv_heads * index_dim, bias=False)
        self.index_k = nn.Linear(d_model, index_dim, bias=False)

    def check_layout(self, layout: TokenLayout) -> None:
        if self.top_k > layout.n_blocks:
            raise ModelConfigError(
                f"top_k={self.top_k} is larger than the number of KV blocks ({layout.n_blocks}) of this layout; "
                f"lower model.top_k or model.block_size")
        if self.group_policy in ("sensor", "hybrid") and layout.n_groups != self.n_kv_heads:
            raise ModelConfigError(
                f"group_policy={self.group_policy} maps GQA groups to sensor groups, so n_kv_heads "
                f"({self.n_kv_heads}) must equal the number of sensor groups ({layout.n_groups}: "
                f"{list(layout.group_names)}); set model.n_kv_heads={layout.n_groups} or use group_policy=free")

    def index_branch(self, x: torch.Tensor, layout: TokenLayout) -> tuple[torch.Tensor, torch.Tensor]:
        batch, seq_len, _ = x.shape
        xd = x.detach()  # the KL loss must not reach the backbone
        qi = self.index_q(xd).view(batch, seq_len, self.n_kv_heads, self.index_dim).transpose(1, 2)
        ki = self.index_k(xd)  # [B, L, Di]
        cos, sin = rope_angles(layout.token_patch.clamp(min=0), self.index_dim)
        return apply_rope(qi, cos, sin), apply_rope(ki, cos, sin)

    def select(self, qi: torch.Tensor, ki: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """Selected blocks ``[B, G, L, K]`` under the group policy."""
        batch, groups, seq_len, _ = qi.shape
        q_time = layout.q_time.expand(batch, seq_len)
        k_time = layout.k_time.expand(batch, seq_len)
        bs = layout.block_size
        if self.group_policy == "free":
            forced = layout.own_local_block.view(1, 1, seq_len, 1).expand(batch, groups, seq_len, 1)
            return kernels.select_blocks(qi, ki, q_time, k_time, bs, self.top_k, None, forced.int().contiguous())
        own = layout.block_group[None, :] == torch.arange(groups, device=qi.device)[:, None]  # [G, NB]
        own = own[None].expand(batch, groups, layout.n_blocks).contiguous()
        local = layout.group_local_block[None, :, :, None].expand(batch, groups, seq_len, 1).int().contiguous()
        if self.group_policy == "sensor":
            return kernels.select_blocks(qi, ki, q_time, k_time, bs, self.top_k, own, local)
        first = kernels.select_blocks(qi, ki, q_time, k_time, bs, self.k_own, own, local)
        if self.k_own == self.top_k:
            return first
        return kernels.select_blocks(qi, ki, q_time, k_time, bs, self.top_k, None, first)

    def forward(self, x: torch.Tensor, layout: TokenLayout, phase: str = "sparse") -> tuple[torch.Tensor, AttentionAux]:
        if phase not in PHASES:
            raise ModelConfigError(f"phase must be one of {PHASES}, got {phase!r}")
        batch, seq_len, _ = x.shape
        q, k, v = self.project(x, layout)
        qi, ki = self.index_branch(x, layout)
        q_time = layout.q_time.expand(batch, seq_len).contiguous()
        k_time = layout.k_time.expand(batch, seq_len).contiguous()
        if phase == "indexer_warmup":
            # Dense support: every block, so the main branch is dense attention and the indexer
            # learns from the dense teacher.
            all_blocks = torch.arange(layout.n_blocks, dtype=torch.int32, device=x.device)
            block_idx = all_blocks.expand(batch, self.n_kv_heads, seq_len, layout.n_blocks).contiguous()
        elif self.selector is not None:
            block_idx = self.selector(self, q, k, qi, ki, layout)
        else:
            block_idx = self.select(qi, ki, layout)
        out, lse = kernels.sparse_attention(q, k, v, block_idx, q_time, k_time, layout.block_size)
        kl = kernels.indexer_kl(qi, ki, block_idx, q, k, lse, q_time, k_time, layout.block_size)
        aux = AttentionAux(kl=kl, block_idx=block_idx.detach())
        if self.collect_stats and phase == "sparse":
            local = layout.own_local_block[None] if self.group_policy == "free" else layout.group_local_block
            aux.stats = support_stats(block_idx, layout, local)
        return self.merge(out), aux


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
