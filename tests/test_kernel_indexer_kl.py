"""indexer_kl_triton against indexer_kl_reference: loss value and gradients for qi and ki.

CPU: Triton interpreter (TRITON_INTERPRET=1) in fp32/fp16 on small shapes. GPU (@pytest.mark.gpu): bf16
at realistic sizes; run them with the interpreter off:
``TRITON_INTERPRET=0 python -m pytest -m gpu tests/test_kernel_select_blocks.py tests/test_kernel_indexer_kl.py``.
"""
import os

import pytest
import torch

triton = pytest.importorskip("triton")

from tsfm_msa.kernels.indexer_kl_triton import indexer_kl_triton  # noqa: E402
from tsfm_msa.kernels.reference import (  # noqa: E402
    INT32_MAX,
    indexer_kl_reference,
    num_blocks,
    select_blocks_reference,
    sparse_attention_reference,
)

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
needs_cpu_interp = pytest.mark.skipif(not INTERP, reason="CPU tests run under TRITON_INTERPRET=1")
gpu = pytest.mark.skipif(not torch.cuda.is_available() or INTERP, reason="needs CUDA (and no interpreter)")


def _problem(batch, groups, rep, seq_len, head_dim, index_dim, bs, k, dtype, share=1, pad_tail=0, pattern="select",
             device="cpu", seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    qi, ki = rnd(batch, groups, seq_len, index_dim), rnd(batch, seq_len, index_dim)
    q, kk, v = rnd(batch, groups * rep, seq_len, head_dim), rnd(batch, groups, seq_len, head_dim), rnd(
        batch, groups, seq_len, head_dim)
    t = (torch.arange(seq_len, dtype=torch.int32, device=device) // share).repeat(batch, 1)
    q_time, k_time = t.clone(), t.clone()
    if pad_tail and batch > 1:
        k_time[1, -pad_tail:] = INT32_MAX
        q_time[1, -pad_tail:] = -1
    nb = num_blocks(seq_len, bs)
    if pattern == "select":
        local = (torch.arange(seq_len, device=device) // bs).to(torch.int32)
        forced = local.view(1, 1, seq_len, 1).expand(batch, groups, seq_len, 1).contiguous()
        block_idx = select_blocks_reference(qi, ki, q_time, k_time, bs, k, None, forced)
    else:  # random distinct blocks per row, visible or not, with -1 holes
        scores = torch.rand(batch, groups, seq_len, nb, generator=gen).to(device)
        block_idx = scores.topk(k, -1).indices.to(torch.int32)
        holes = torch.rand(batch, groups, seq_len, k, generator=gen).to(device) < 0.2
        block_idx = torch.where(holes, -1, block_idx)
    _, lse = sparse_attention_reference(q, kk, v, block_idx, q_time, k_time, bs)
    return qi, ki, block_idx, q, kk, lse, q_time, k_time


def _both(args, bs, scale=None, index_scale=None):
    qi, ki, block_idx, q, kk, lse, q_time, k_time = args
    out = {}
    for name, fn in (("ref", indexer_kl_reference), ("tri", indexer_kl_triton)):
        a = qi.detach().clone().requires_grad_()
        b = ki.detach().clone().requires_grad_()
        qq = q.detach().clone().requires_grad_()
        loss = fn(a, b, block_idx, qq, kk, lse, q_time, k_time, bs, scale, index_scale)
        loss.backward()
        assert qq.grad is None or not qq.grad.abs().sum(), "q must get no gradient"
        out[name] = (loss.detach(), a.grad, b.grad)
    return out


def _check(out, atol, rtol, gtol):
    (lr, gqr, gkr), (lt, gqt, gkt) = out["ref"], out["tri"]
    assert torch.isfinite(lt)
    torch.testing.assert_close(lt.float(), lr.float(), atol=atol, rtol=rtol)
    for got, ref in ((gqt, gqr), (gkt, gkr)):
        assert got.shape == ref.shape and got.dtype == ref.dtype
        scale = ref.float().abs().max().clamp_min(1e-12)
        err = (got.float() - ref.float()).abs().max() / scale
        assert err < gtol, f"gradient relative error {err:.3g}"


@needs_cpu_interp
def test_kl_selected_support_fp32_padding_shared_times():
    args = _problem(2, 2, 2, 100, 16, 16, 16, 3, torch.float32, share=3, pad_tail=9)
    args[2][0, 0, 5, 1] = -1  # an empty slot inside a row
    _check(_both(args, 16), atol=1e-5, rtol=1e-5, gtol=1e-4)


@needs_cpu_interp
def test_kl_random_blocks_odd_heads_custom_scales():
    """Per-row random blocks (some invisible, some -1), GQA ratio 3 (padded to 4), Di=24, D=32, bs=32,
    explicit scale and index_scale; padding queries have empty support and lse=-inf."""
    args = _problem(2, 1, 3, 90, 32, 24, 32, 2, torch.float32, share=2, pad_tail=20, pattern="random", seed=1)
    _check(_both(args, 32, scale=0.2, index_scale=0.3), atol=1e-5, rtol=1e-5, gtol=1e-4)


@needs_cpu_interp
def test_kl_fp16():
    args = _problem(1, 2, 2, 80, 16, 16, 16, 2, torch.float16, share=2, seed=2)
    _check(_both(args, 16), atol=2e-3, rtol=2e-3, gtol=2e-2)


@needs_cpu_interp
def test_kl_deterministic_backward():
    args = _problem(1, 2, 1, 64, 16, 16, 16, 2, torch.float32, pattern="random", seed=3)
    qi, ki, block_idx, q, kk, lse, q_time, k_time = args
    grads = []
    for _ in range(2):
        a = qi.clone().requires_grad_()
        b = ki.clone().requires_grad_()
        indexer_kl_triton(a, b, block_idx, q, kk, lse, q_time, k_time, 16).backward()
        grads.append((a.grad, b.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@needs_cpu_interp
@pytest.mark.parametrize("bs,pattern,dtype", [(8, "select", torch.float32), (8, "random", torch.float16),
                                              (4, "random", torch.float32), (2, "select", torch.float32),
                                              (1, "random", torch.float32)])
def test_kl_small_blocks(bs, pattern, dtype):
    """Blocks under 16 tokens (16-key tiles, the rest masked): loss and gradients match the
    reference; time-major with shared time steps, a padded tail and empty slots."""
    seq_len = 37 if bs >= 4 else 21  # (one program per used block: keep the 1- and 2-token cases short)
    args = _problem(2, 2, 2, seq_len, 16, 8, bs, 3, dtype, share=3, pad_tail=6, pattern=pattern, seed=20 + bs)
    args[2][1, 0, 3, :] = -1  # a row with no block at all
    tol = dict(atol=1e-5, rtol=1e-5, gtol=1e-4) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3, gtol=2e-2)
    _check(_both(args, bs), **tol)


@needs_cpu_interp
def test_kl_small_blocks_group_major_sensor():
    """Group-major layout (each group's segment padded to whole 8-token blocks, padding keys INT32_MAX)
    with the sensor policy's selection: group g only picks blocks of its own segment."""
    gen = torch.Generator().manual_seed(30)
    batch, groups, rep, per_group, dim, bs, k = 1, 2, 2, 19, 16, 8, 2
    seg = num_blocks(per_group, bs) * bs
    seq_len = groups * seg
    t = torch.full((seq_len,), INT32_MAX, dtype=torch.int32)
    for g in range(groups):
        t[g * seg:g * seg + per_group] = torch.arange(per_group, dtype=torch.int32)
    k_time = t.repeat(batch, 1)
    q_time = torch.where(k_time == INT32_MAX, -1, k_time)
    nb = seq_len // bs
    allowed = torch.zeros(batch, groups, nb, dtype=torch.bool)
    for g in range(groups):
        allowed[:, g, g * seg // bs:(g + 1) * seg // bs] = True
    qi, ki = torch.randn(batch, groups, seq_len, dim, generator=gen), torch.randn(batch, seq_len, dim, generator=gen)
    q = torch.randn(batch, groups * rep, seq_len, dim, generator=gen)
    kk, v = torch.randn(batch, groups, seq_len, dim, generator=gen), torch.randn(batch, groups, seq_len, dim, generator=gen)
    block_idx = select_blocks_reference(qi, ki, q_time, k_time, bs, k, allowed)
    _, lse = sparse_attention_reference(q, kk, v, block_idx, q_time, k_time, bs)
    _check(_both((qi, ki, block_idx, q, kk, lse, q_time, k_time), bs), atol=1e-5, rtol=1e-5, gtol=1e-4)


@needs_cpu_interp
def test_kl_int64_schedule(monkeypatch):
    """The int64 work list (entries and chunk bounds past 2^31, here forced by lowering the limit)
    gives the same loss and gradients; every valid entry of block_idx sits once under its own
    (b, block, g) chunk."""
    import tsfm_msa.kernels.indexer_kl_triton as klt
    import tsfm_msa.kernels.worklist as worklist

    args = _problem(2, 2, 1, 29, 16, 16, 8, 2, torch.float32, share=2, pad_tail=5, pattern="random", seed=40)
    block_idx = args[2]  # [2, 2, 29, 2], blocks of 8: 4 blocks
    work32, rows32, off32 = klt._schedule(block_idx, 29, 8, 16)
    monkeypatch.setattr(worklist, "INDEX32_LIMIT", 1)
    work, rows, off = klt._schedule(block_idx, 29, 8, 16)
    assert rows.dtype == work[1].dtype == torch.int64 and rows32.dtype == work32[1].dtype == torch.int32
    assert torch.equal(rows, rows32.long()) and torch.equal(off, off32)
    assert all(torch.equal(a, b.to(a.dtype)) for a, b in zip(work, work32))
    flat = block_idx.reshape(4, 29 * 2)
    seen = []
    for key, start, length in zip(*(w.tolist() for w in work)):
        g, blk, b = key % 2, (key // 2) % 4, key // 2 // 4
        entries = rows[start:start + length]
        assert (flat[b * 2 + g, entries] == blk).all()
        seen += [(b * 2 + g) * 58 + e for e in entries.tolist()]
    assert sorted(seen) == torch.nonzero(block_idx.reshape(-1) >= 0).squeeze(1).tolist()
    _check(_both(args, 8), atol=1e-5, rtol=1e-5, gtol=1e-4)


@needs_cpu_interp
def test_kl_rejects_block_size_not_power_of_two():
    from tsfm_msa.kernels import KernelInputError

    args = _problem(1, 1, 1, 24, 16, 16, 12, 1, torch.float32, pattern="random")
    with pytest.raises(KernelInputError, match="power of two"):
        _both(args, 12)


# ------------------------------------------------------------------ GPU (bf16, realistic sizes)

@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("rep,head_dim,index_dim,bs", [(4, 128, 64, 128), (16, 128, 128, 64), (1, 64, 64, 64),
                                                    (4, 16, 16, 8), (4, 64, 64, 8), (2, 8, 8, 2)])
def test_kl_gpu_bf16(rep, head_dim, index_dim, bs):
    args = _problem(2, 4 if rep < 16 else 2, rep, 2048 + 21, head_dim, index_dim, bs, 8, torch.bfloat16, share=2,
                    pad_tail=50, device="cuda", seed=4)
    _check(_both(args, bs), atol=2e-3, rtol=1e-2, gtol=3e-2)


@pytest.mark.gpu
@gpu
def test_kl_gpu_64bit_offsets():
    """B * G * L * K = 2^29 block_idx entries: the partials' offsets (4 * entries) pass 2^31 and the
    dqi partials 2^33 elements. One-token blocks keep the reference affordable (L = 16K) while each
    query keeps 8192 blocks (every second block from a random start, 10% empty slots)."""
    dev = "cuda"
    batch, groups, rep, seq_len, dim, bs, k = 1, 4, 2, 16384, 16, 1, 8192
    gen = torch.Generator(device=dev).manual_seed(50)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, device=dev).to(torch.bfloat16)

    qi, ki = rnd(batch, groups, seq_len, dim), rnd(batch, seq_len, dim)
    q, kk, v = rnd(batch, groups * rep, seq_len, dim), rnd(batch, groups, seq_len, dim), rnd(batch, groups, seq_len, dim)
    t = torch.arange(seq_len, dtype=torch.int32, device=dev).repeat(batch, 1)
    q_time, k_time = t.clone(), t.clone()
    q_time[:, -100:], k_time[:, -100:] = -1, INT32_MAX
    start = torch.randint(0, seq_len, (batch, groups, seq_len, 1), generator=gen, device=dev)
    block_idx = (start + 2 * torch.arange(k, device=dev)) % seq_len
    holes = torch.rand(block_idx.shape, generator=gen, device=dev) < 0.1
    block_idx = torch.where(holes, -1, block_idx).to(torch.int32)
    assert block_idx.numel() * 4 >= 2**31
    _, lse = sparse_attention_reference(q, kk, v, block_idx, q_time, k_time, bs)
    _check(_both((qi, ki, block_idx, q, kk, lse, q_time, k_time), bs), atol=2e-3, rtol=1e-2, gtol=3e-2)
