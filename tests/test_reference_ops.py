"""The gathered CPU references against the dense oracles of ``naive_msa.py``: outputs, lse, KL and every
gradient, on fresh seeded random inputs with odd lengths, partial last blocks, padding keys and
queries, empty slots, block sizes 1-16, batch > 1 and GQA; chunk boundaries forced through a tiny
element budget; and no tensor of the references grows past the budget (never O(L^2))."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from naive_msa import dense_indexer_kl, dense_select_blocks, dense_sparse_attention
from tsfm_msa.kernels import INT32_MAX, KernelInputError, reference
from tsfm_msa.kernels.reference import (
    indexer_kl_reference,
    num_blocks,
    select_blocks_reference,
    sparse_attention_reference,
)


def _problem(batch, heads, groups, seq_len, dim, index_dim, bs, k, dtype, seed, empty=0.2, pad=True,
             series=False):
    """Random q/k/v/qi/ki, times with padding keys (INT32_MAX) and padding queries (-1) in batch row 1,
    and a duplicate-free random ``block_idx`` (visible or future blocks, ``empty`` share of -1 slots)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    t = torch.arange(seq_len, dtype=torch.int32)
    if series:  # several series one after another: time restarts, so visibility is not positional
        t = t % max(1, seq_len // 3)
    q_time, k_time = t.repeat(batch, 1), t.repeat(batch, 1)
    if pad and batch > 1:
        tail = torch.randperm(seq_len, generator=gen)[: max(1, seq_len // 5)]
        k_time[1, tail] = INT32_MAX
        q_time[1, tail] = -1
    nb = num_blocks(seq_len, bs)
    block_idx = torch.rand(batch, groups, seq_len, nb, generator=gen).topk(k, -1).indices.to(torch.int32)
    holes = torch.rand(batch, groups, seq_len, k, generator=gen) < empty
    block_idx = torch.where(holes, -1, block_idx).contiguous()
    return dict(q=rnd(batch, heads, seq_len, dim), k=rnd(batch, groups, seq_len, dim), v=rnd(batch, groups, seq_len, dim),
                qi=rnd(batch, groups, seq_len, index_dim), ki=rnd(batch, seq_len, index_dim),
                dout=rnd(batch, heads, seq_len, dim), dlse=rnd(batch, heads, seq_len),
                block_idx=block_idx, q_time=q_time, k_time=k_time)


def _attention(fn, p, bs):
    """out, lse and the gradients of a loss on out and on the finite lse."""
    q, k, v = (p[n].clone().requires_grad_() for n in ("q", "k", "v"))
    out, lse = fn(q, k, v, p["block_idx"], p["q_time"], p["k_time"], bs)
    finite = torch.where(torch.isinf(lse), 0.0, lse.to(p["dlse"].dtype))
    ((out * p["dout"]).sum() + (finite * p["dlse"]).sum()).backward()
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


def _kl(fn, p, bs, lse, scale=None, index_scale=None):
    qi, ki, q = p["qi"].clone().requires_grad_(), p["ki"].clone().requires_grad_(), p["q"].clone().requires_grad_()
    loss = fn(qi, ki, p["block_idx"], q, p["k"], lse, p["q_time"], p["k_time"], bs, scale, index_scale)
    loss.backward()
    assert q.grad is None, "the teacher must be detached"
    return loss.detach(), qi.grad, ki.grad


def _close(got, ref, tol, what):
    assert got.shape == ref.shape and got.dtype == ref.dtype, what
    assert torch.isfinite(got).all() or torch.equal(torch.isinf(got), torch.isinf(ref)), what
    err = (got.double() - ref.double()).nan_to_num(0.0).abs().max() / ref.double().nan_to_num(0.0).abs().max().clamp_min(1e-12)
    assert err < tol, f"{what}: relative error {err:.3g}"


# (batch, Hq, G, L, D, Di, bs, k, series): odd L, partial last blocks, bs 1/2/8/16, GQA 1/2/3
CASES = [
    (2, 4, 2, 37, 8, 8, 1, 5, False),
    (2, 6, 2, 45, 8, 4, 2, 4, True),
    (3, 3, 3, 61, 16, 8, 8, 3, False),
    (2, 4, 1, 77, 4, 8, 16, 2, True),
    (1, 2, 2, 32, 8, 8, 8, 4, False),  # k = NB: every block, no partial block
]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("budget", [None, 300])
def test_attention_and_kl_match_dense_oracle(case, dtype, tol, budget, monkeypatch):
    batch, heads, groups, seq_len, dim, index_dim, bs, k, series = CASES[case]
    if budget:  # many chunks: single batch rows, query slices not aligned to blocks
        monkeypatch.setattr(reference, "CHUNK_ELEMENTS", budget)
    p = _problem(batch, heads, groups, seq_len, dim, index_dim, bs, k, dtype, seed=10 + case, series=series)
    got, ref = _attention(sparse_attention_reference, p, bs), _attention(dense_sparse_attention, p, bs)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, ref):
        _close(a, b, tol, name)
    empty = torch.isinf(ref[1])
    assert empty.any() and not empty.all(), "the case must hold rows with empty support and rows without"
    assert torch.equal(torch.isinf(got[1]), empty) and (got[0][empty] == 0).all()

    lse = ref[1]
    kl_got, kl_ref = _kl(indexer_kl_reference, p, bs, lse), _kl(dense_indexer_kl, p, bs, lse)
    for name, a, b in zip(("kl", "dqi", "dki"), kl_got, kl_ref):
        _close(a, b, tol, name)
    assert kl_got[0] > 0


def test_kl_custom_scales_and_low_precision_inputs():
    """Explicit scale / index_scale, fp16 inputs (fp32 accumulation in both)."""
    p = _problem(2, 4, 2, 50, 16, 8, 8, 3, torch.float16, seed=3)
    _, lse, *_ = _attention(dense_sparse_attention, p, 8)
    got = _kl(indexer_kl_reference, p, 8, lse, scale=0.3, index_scale=0.7)
    ref = _kl(dense_indexer_kl, p, 8, lse, scale=0.3, index_scale=0.7)
    for name, a, b in zip(("kl", "dqi", "dki"), got, ref):
        _close(a, b, 2e-3, name)
    out_got = _attention(sparse_attention_reference, p, 8)
    out_ref = _attention(dense_sparse_attention, p, 8)
    assert out_got[0].dtype == torch.float16 and out_got[1].dtype == torch.float32
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), out_got, out_ref):
        _close(a, b, 2e-3, name)


def test_gradcheck_fp64():
    p = _problem(2, 4, 2, 19, 4, 3, 4, 2, torch.float64, seed=5, empty=0.3)
    inputs = [p[n].clone().requires_grad_() for n in ("q", "k", "v")]

    def attention(q, k, v):
        out, lse = sparse_attention_reference(q, k, v, p["block_idx"], p["q_time"], p["k_time"], 4)
        return out, torch.where(torch.isinf(lse), 0.0, lse)

    assert torch.autograd.gradcheck(attention, inputs)
    _, lse = sparse_attention_reference(p["q"], p["k"], p["v"], p["block_idx"], p["q_time"], p["k_time"], 4)

    def kl(qi, ki):
        return indexer_kl_reference(qi, ki, p["block_idx"], p["q"], p["k"], lse, p["q_time"], p["k_time"], 4)

    assert torch.autograd.gradcheck(kl, [p[n].clone().requires_grad_() for n in ("qi", "ki")])


@pytest.mark.parametrize("budget", [None, 100])
@pytest.mark.parametrize("bs,k,groups,policy", [(1, 6, 2, "free"), (2, 3, 3, "sensor"), (8, 3, 2, "hybrid"),
                                                (16, 2, 1, "free")])
def test_select_matches_dense_oracle(bs, k, groups, policy, budget, monkeypatch):
    if budget:
        monkeypatch.setattr(reference, "CHUNK_ELEMENTS", budget)
    batch, seq_len = 2, 53
    p = _problem(batch, groups, groups, seq_len, 4, 8, bs, k, torch.float32, seed=bs, series=bs % 2 == 0)
    nb = num_blocks(seq_len, bs)
    gen = torch.Generator().manual_seed(bs + 100)
    allowed = forced = None
    local = (torch.arange(seq_len) // bs).to(torch.int32).view(1, 1, seq_len, 1).expand(batch, groups, seq_len, 1)
    if policy in ("free", "hybrid"):
        forced = local.contiguous()
    if policy in ("sensor", "hybrid"):
        allowed = torch.rand(batch, groups, nb, generator=gen) < 0.6
    if policy == "hybrid":  # a second forced slot, sometimes empty
        extra = torch.randint(0, nb, (batch, groups, seq_len, 1), generator=gen, dtype=torch.int32)
        extra = torch.where(torch.rand(extra.shape, generator=gen) < 0.3, -1, extra)
        forced = torch.cat([forced, torch.where(extra == forced, -1, extra)], -1)
    args = (p["qi"], p["ki"], p["q_time"], p["k_time"], bs, k, allowed, forced, True)
    idx, score = select_blocks_reference(*args)
    ref_idx, ref_score = dense_select_blocks(*args)
    torch.testing.assert_close(score, ref_score, rtol=1e-5, atol=1e-5)
    differ = idx != ref_idx  # only allowed where two candidates score the same up to rounding
    assert differ.float().mean() < 1e-3
    assert ((score - ref_score).abs()[differ] < 1e-5).all()
    assert (idx >= 0).any(-1).all() or forced is None


def test_chunks_cover_batch_and_queries_within_budget(monkeypatch):
    for budget, batch, seq_len, per_row in [(1000, 3, 7, 10), (1000, 3, 70, 10), (5, 2, 9, 10), (1 << 24, 32, 6800, 1024)]:
        monkeypatch.setattr(reference, "CHUNK_ELEMENTS", budget)
        seen = torch.zeros(batch, seq_len, dtype=torch.int64)
        for bsl, qsl in reference._chunks(batch, seq_len, per_row):
            seen[bsl, qsl] += 1
            pairs = (bsl.stop - bsl.start) * (qsl.stop - qsl.start)
            assert pairs * per_row <= max(budget, per_row)
        assert (seen == 1).all()


class _LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any aten op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for t in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return result


def test_memory_bounded_by_budget_not_quadratic(monkeypatch):
    """Forward and backward of all three ops at L = 4001 never hold a tensor larger than the chunk
    budget or an O(L * K * bs) per-head tensor (the KL keeps its teacher on the support), far below
    L^2 = 16M."""
    budget = 1 << 16
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", budget)
    batch, heads, groups, seq_len, dim, bs, k = 2, 2, 1, 4001, 4, 8, 3
    p = _problem(batch, heads, groups, seq_len, dim, 4, bs, k, torch.float32, seed=7)
    # O(L) tensors: q, k, v, out and their block copies; the KL teacher [B, G, L, K * bs]
    linear = max(batch * heads * (seq_len + 2 * bs) * dim, batch * groups * seq_len * k * bs)
    with _LargestTensor() as probe:
        local = (torch.arange(seq_len) // bs).to(torch.int32).view(1, 1, -1, 1).expand(batch, groups, seq_len, 1)
        block_idx = select_blocks_reference(p["qi"], p["ki"], p["q_time"], p["k_time"], bs, k, None, local.contiguous())
        p["block_idx"] = block_idx
        _, lse, *_ = _attention(sparse_attention_reference, p, bs)
        _kl(indexer_kl_reference, p, bs, lse)
    assert probe.largest <= max(budget, linear), probe.largest
    assert probe.largest < seq_len ** 2 / 50


def test_rejects_bad_inputs():
    p = _problem(1, 2, 1, 16, 4, 4, 4, 2, torch.float32, seed=1)
    with pytest.raises(KernelInputError, match="block_idx must be int32"):
        sparse_attention_reference(p["q"], p["k"], p["v"], p["block_idx"].long(), p["q_time"], p["k_time"], 4)
    with pytest.raises(KernelInputError, match="lse must be"):
        indexer_kl_reference(p["qi"], p["ki"], p["block_idx"], p["q"], p["k"], p["dlse"][:, :1], p["q_time"],
                             p["k_time"], 4)
    with pytest.raises(KernelInputError, match="k=9 is larger"):
        select_blocks_reference(p["qi"], p["ki"], p["q_time"], p["k_time"], 2, 9)
