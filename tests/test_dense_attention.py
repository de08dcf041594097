"""Dense attention under time visibility and the indexer-warmup loss, checked against brute force
([L, L] matrices are fine here: the layouts are tiny)."""
from __future__ import annotations

import math

import pytest
import torch

from tsfm_msa import kernels
from tsfm_msa.model.attention import MSAAttention
from tsfm_msa.model.dense_attention import time_masked_attention, time_block_mask
from tsfm_msa.tokens import build_layout

ROLES = ["target", "past_covariate", "future_covariate", "target"]
GROUPS = [0, 1, 1, 0]


def _layout(block_size: int = 4):
    return build_layout(ROLES, GROUPS, ["a", "b"], context_len=37, horizon=9, patch_len=4, block_size=block_size)


def _brute_attention(q, k, v, q_time, k_time, scale):
    rep = q.shape[1] // k.shape[1]
    logits = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double().repeat_interleave(rep, 1)) * scale
    visible = k_time[None, :] <= q_time[:, None]
    logits = logits.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(logits, -1)
    probs = torch.exp(logits - torch.where(torch.isinf(lse), 0.0, lse)[..., None]).nan_to_num(0.0)
    return probs @ v.double().repeat_interleave(rep, 1), lse


def test_chunked_attention_matches_brute_force_including_padding_rows():
    layout = _layout()
    g = torch.Generator().manual_seed(1)
    L = layout.seq_len
    q, k, v = (torch.randn(2, 6, L, 8, generator=g), torch.randn(2, 3, L, 8, generator=g),
               torch.randn(2, 3, L, 5, generator=g))
    out, lse = time_masked_attention(q, k, v, layout.q_time, layout.k_time, scale=0.3)
    ref_out, ref_lse = _brute_attention(q, k, v, layout.q_time, layout.k_time, 0.3)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite) and (~finite).any()  # padding rows see nothing
    torch.testing.assert_close(lse.double()[finite], ref_lse[finite], atol=1e-5, rtol=1e-5)
    assert (out[~finite.expand_as(lse)] == 0).all()


def test_block_mask_tiles_agree_with_time_ranges():
    pytest.importorskip("torch.nn.attention.flex_attention")
    g = torch.Generator().manual_seed(2)
    q_time = torch.sort(torch.randint(-1, 40, (300,), generator=g)).values.int()
    k_time = torch.randint(0, 40, (260,), generator=g).int()
    k_time[::7] = kernels.INT32_MAX
    mask = time_block_mask(q_time, k_time)
    dense = mask.to_dense()[0, 0].bool()  # [NQB, NKB] tiles Flex will visit
    visible = k_time[None, :].long() <= q_time[:, None].long()
    for qb in range(dense.shape[0]):
        for kb in range(dense.shape[1]):
            tile = visible[qb * 128:(qb + 1) * 128, kb * 128:(kb + 1) * 128]
            if tile.any():  # a tile with a visible key is never skipped
                assert dense[qb, kb]


def _brute_kl_parts(q, k, qi, ki, q_time, k_time):
    """Per-row teacher p, student log-probabilities and validity on the dense support."""
    b, hq, L, d = q.shape
    groups, di = qi.shape[1], qi.shape[-1]
    rep = hq // groups
    visible = k_time[None, :] <= q_time[:, None]
    logits = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double().repeat_interleave(rep, 1)) / math.sqrt(d)
    logits = logits.masked_fill(~visible, float("-inf"))
    p = torch.softmax(logits, -1).nan_to_num(0.0).view(b, groups, rep, L, L).mean(2)
    s = torch.einsum("bgqd,bkd->bgqk", qi.double(), ki.double()) / math.sqrt(di)
    log_s = torch.log_softmax(s.masked_fill(~visible, float("-inf")), -1)
    return p, log_s, visible.any(-1)


@pytest.mark.parametrize("stride", [1, 3])
def test_warmup_index_loss_is_the_dense_cross_entropy_with_kl_gradients(stride):
    layout = _layout()
    L = layout.seq_len
    layer = MSAAttention(d_model=16, n_heads=4, n_kv_heads=2, head_dim=8, index_dim=6, top_k=2,
                         kl_row_stride=stride)
    layer.train_step = 5
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 4, L, 8, generator=g), torch.randn(2, 2, L, 8, generator=g)
    qi = torch.randn(2, 2, L, 6, generator=g, requires_grad=True)
    ki = torch.randn(2, L, 6, generator=g, requires_grad=True)
    loss = layer.dense_index_loss(q, k, qi, ki, layout)
    loss.backward()

    qi2, ki2 = qi.detach().clone().requires_grad_(), ki.detach().clone().requires_grad_()
    p, log_s, valid = _brute_kl_parts(q, k, qi2, ki2, layout.q_time, layout.k_time)
    rows = torch.arange(5 % stride, L, stride)[: L // stride]
    keep = torch.zeros(L, dtype=torch.bool)
    keep[rows] = True
    keep &= valid
    log_p = torch.log(p.clamp_min(1e-300))
    kl = (p * (log_p - log_s.nan_to_num(0.0, neginf=0.0))).sum(-1)  # [B, G, L]
    entropy = -(p * log_p).sum(-1)
    expected_kl = kl[..., keep].mean()
    expected_xent = expected_kl + entropy[..., keep].mean()
    torch.testing.assert_close(loss.double(), expected_xent, atol=1e-5, rtol=1e-5)
    expected_kl.backward()
    torch.testing.assert_close(qi.grad, qi2.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ki.grad, ki2.grad, atol=1e-5, rtol=1e-4)


def _warmup_grads_equal_the_sparse_kl(layer: MSAAttention, blocks, seed: int):
    """The warmup index loss's gradients equal the sparse-phase KL reference's given the block lists
    ``blocks(layout) [1, G, L, K]``, on fresh inputs; returns the layout, the inputs and the sparse
    reference's output and log-sum-exp."""
    layout = _layout()
    L = layout.seq_len
    g = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(1, 4, L, 8, generator=g), torch.randn(1, 2, L, 8, generator=g), torch.randn(1, 2, L, 8, generator=g)
    qi = torch.randn(1, 2, L, 6, generator=g, requires_grad=True)
    ki = torch.randn(1, L, 6, generator=g, requires_grad=True)
    layer.dense_index_loss(q, k, qi, ki, layout).backward()
    qi2, ki2 = qi.detach().clone().requires_grad_(), ki.detach().clone().requires_grad_()
    q_time, k_time = layout.q_time[None].contiguous(), layout.k_time[None].contiguous()
    idx = blocks(layout)
    out, lse = kernels.sparse_attention_reference(q, k, v, idx, q_time, k_time, layout.block_size)
    kernels.indexer_kl_reference(qi2, ki2, idx, q, k, lse, q_time, k_time, layout.block_size).backward()
    torch.testing.assert_close(qi.grad, qi2.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ki.grad, ki2.grad, atol=1e-5, rtol=1e-4)
    return layout, (q, k, v), out, lse


def test_warmup_gradients_equal_the_kl_reference_on_all_blocks():
    """stride 1: the same gradients as the sparse-phase KL op given every block (the old warmup)."""
    layer = MSAAttention(d_model=16, n_heads=4, n_kv_heads=2, head_dim=8, index_dim=6, top_k=2, kl_row_stride=1)
    _warmup_grads_equal_the_sparse_kl(layer, lambda layout: torch.arange(layout.n_blocks, dtype=torch.int32).expand(
        1, 2, layout.seq_len, layout.n_blocks).contiguous(), seed=4)


def test_sparse_phase_kl_on_rotating_row_subsets_partitions_the_full_kl():
    """In training, the sparse-phase KL over every stride-th row: the offsets together cover every
    row once, so their row-weighted mean is the full KL."""
    layout = _layout(block_size=4)
    torch.manual_seed(6)
    layer = MSAAttention(d_model=16, n_heads=4, n_kv_heads=2, head_dim=8, index_dim=6, top_k=3, kl_row_stride=3)
    x = torch.randn(2, layout.seq_len, 16)
    layer.eval()
    full = layer(x, layout, "sparse")[1].kl
    layer.train()
    valid_rows = (layout.visible_count > 0)
    parts, weights = [], []
    for step in range(3):
        layer.train_step = step
        parts.append(layer(x, layout, "sparse")[1].kl)
        weights.append(float(valid_rows[torch.arange(layout.seq_len) % 3 == step].sum()))
    mixed = sum(p * w for p, w in zip(parts, weights)) / sum(weights)
    torch.testing.assert_close(mixed, full, atol=1e-5, rtol=1e-5)


def _own_group_blocks(layout, batch: int) -> torch.Tensor:
    """Every block of each GQA group's own sensor group, for every query: ``[B, G, L, K]`` (-1 = none)."""
    per_group = [torch.nonzero(layout.block_group == g).flatten() for g in range(layout.n_groups)]
    width = max(len(b) for b in per_group)
    rows = torch.stack([torch.nn.functional.pad(b, (0, width - len(b)), value=-1) for b in per_group])  # [G, K]
    return rows[None, :, None, :].expand(batch, -1, layout.seq_len, -1).int().contiguous()


def test_own_group_attention_matches_brute_force_within_each_sensor_group():
    """dense_support=policy under the sensor policy: GQA group g reads only the keys of sensor group g."""
    from tsfm_msa.model.dense_attention import own_group_attention

    layout = _layout()
    L = layout.seq_len
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 4, L, 8, generator=g), torch.randn(2, 2, L, 8, generator=g),
               torch.randn(2, 2, L, 5, generator=g))
    out, lse = own_group_attention(q, k, v, layout, scale=0.4)
    head_group = torch.arange(4) // 2  # query head -> GQA group (= sensor group)
    own = layout.token_group[None, None, :] == head_group[:, None, None]  # [Hq, 1, L]
    rep_k, rep_v = k.double().repeat_interleave(2, 1), v.double().repeat_interleave(2, 1)
    logits = torch.einsum("bhqd,bhkd->bhqk", q.double(), rep_k) * 0.4
    visible = (layout.k_time[None, :] <= layout.q_time[:, None])[None] & own  # [Hq, L, L]
    logits = logits.masked_fill(~visible, float("-inf"))
    ref_lse = torch.logsumexp(logits, -1)
    probs = torch.exp(logits - torch.where(torch.isinf(ref_lse), 0.0, ref_lse)[..., None]).nan_to_num(0.0)
    torch.testing.assert_close(out.double(), probs @ rep_v, atol=1e-5, rtol=1e-5)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    torch.testing.assert_close(lse.double()[finite], ref_lse[finite], atol=1e-5, rtol=1e-5)


def test_sensor_warmup_on_the_policy_support_is_the_sparse_phase_given_every_own_block():
    """With dense_support=policy, the sensor-policy warmup's main branch and index-loss gradients equal
    the sparse phase's (reference kernels) given every block of the group's own sensor group: the
    switch to sparse only drops blocks, it no longer takes other sensors away."""
    layer = MSAAttention(d_model=16, n_heads=4, n_kv_heads=2, head_dim=8, index_dim=6, top_k=2,
                         group_policy="sensor", kl_row_stride=1, dense_support="policy")
    layout, (q, k, v), sparse_out, lse = _warmup_grads_equal_the_sparse_kl(
        layer, lambda layout: _own_group_blocks(layout, 1), seed=8)
    from tsfm_msa.model.attention import dense_attention
    dense_out, _ = dense_attention(q, k, v, layout, own_group=True)
    seen = torch.isfinite(lse)[..., None]
    torch.testing.assert_close(dense_out * seen, sparse_out * seen, atol=1e-5, rtol=1e-5)


def test_dense_support_all_keeps_the_sensor_warmup_on_every_key():
    """The default (dense_support=all) is unchanged: the sensor-policy warmup reads every visible key."""
    layout = _layout()
    L = layout.seq_len
    g = torch.Generator().manual_seed(9)
    q, k = torch.randn(1, 4, L, 8, generator=g), torch.randn(1, 2, L, 8, generator=g)
    qi, ki = torch.randn(1, 2, L, 6, generator=g), torch.randn(1, L, 6, generator=g)
    kw = dict(d_model=16, n_heads=4, n_kv_heads=2, head_dim=8, index_dim=6, top_k=2, kl_row_stride=1)
    free = MSAAttention(**kw).dense_index_loss(q, k, qi, ki, layout)
    sensor_all = MSAAttention(**kw, group_policy="sensor").dense_index_loss(q, k, qi, ki, layout)
    sensor_own = MSAAttention(**kw, group_policy="sensor", dense_support="policy").dense_index_loss(q, k, qi, ki, layout)
    torch.testing.assert_close(free, sensor_all)
    assert not torch.allclose(free, sensor_own)
    with pytest.raises(ValueError, match="dense_support must be one of"):
        MSAAttention(**kw, dense_support="own")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_own_group_attention_on_cuda_takes_flex_and_matches_the_cpu_path():
    """Past SMALL_PAIRS per group the own-group attention runs each group through Flex; it equals the
    CPU's chunked path, forward and gradients."""
    from tsfm_msa.kernels.dispatch import CALLS
    from tsfm_msa.model.dense_attention import own_group_attention

    layout = build_layout(ROLES, GROUPS, ["a", "b"], context_len=6000, horizon=16, patch_len=4, block_size=16)
    g = torch.Generator().manual_seed(10)
    L = layout.seq_len
    q, k, v = torch.randn(1, 4, L, 16, generator=g), torch.randn(1, 2, L, 16, generator=g), torch.randn(1, 2, L, 16, generator=g)
    dout = torch.randn(1, 4, L, 16, generator=g)
    grads = []
    for device in ("cpu", "cuda"):
        lay = layout.to(device)
        qd, kd, vd = (t.to(device).requires_grad_() for t in (q, k, v))
        before = CALLS[("dense_attention", "flex")]
        out, _ = own_group_attention(qd, kd, vd, lay)
        assert (CALLS[("dense_attention", "flex")] - before) == (2 if device == "cuda" else 0)
        out.backward(dout.to(device))
        grads.append([t.detach().cpu() for t in (out, qd.grad, kd.grad, vd.grad)])
    for cpu, cuda in zip(*grads):
        torch.testing.assert_close(cuda, cpu, atol=3e-3, rtol=3e-3)
