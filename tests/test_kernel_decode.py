"""Decode kernels (a few new queries against a long cache) against their references.

CPU: the Triton kernels under TRITON_INTERPRET=1 in fp32/fp16 on tiny shapes; the references against
the full-length references of ``reference.py`` (decode = the last rows of a full forward). GPU
(@pytest.mark.gpu): bf16 at cache lengths of thousands (``TRITON_INTERPRET=0 pytest -m gpu``).
"""
import os

import pytest
import torch

from tsfm_msa.kernels import dispatch
from tsfm_msa.kernels.decode_reference import decode_attention_reference, decode_select_reference
from tsfm_msa.kernels.reference import INT32_MAX, num_blocks, select_blocks_reference, sparse_attention_reference
from tsfm_msa.kernels.validation import KernelInputError

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
needs_interp = pytest.mark.skipif(not INTERP, reason="CPU kernel tests run under TRITON_INTERPRET=1")


def _cache(seed, batch, groups, n_q, n_k, block_size, per_step=3, dtype=torch.float32, device="cpu", index_dim=16,
           heads_per_group=2, head_dim=16):
    """A paged cache: keys with times ``j // per_step``, some unused slots (INT32_MAX), queries at the
    last time steps; blocks owned by random sensor groups."""
    g = torch.Generator().manual_seed(seed)
    k_time = (torch.arange(n_k) // per_step).to(torch.int32).repeat(batch, 1)
    unused = torch.rand(batch, n_k, generator=g) < 0.1
    k_time = torch.where(unused, torch.tensor(INT32_MAX, dtype=torch.int32), k_time)
    last = int(n_k // per_step)
    q_time = (last - 2 + torch.randint(0, 3, (batch, n_q), generator=g)).to(torch.int32)
    nb = num_blocks(n_k, block_size)
    block_group = torch.randint(0, groups, (nb,), generator=g)
    allowed = (block_group[None] == torch.arange(groups)[:, None])[None].expand(batch, groups, nb).contiguous()

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype).to(device)

    return dict(
        qi=rnd(batch, groups, n_q, index_dim), ki=rnd(batch, n_k, index_dim),
        q=rnd(batch, groups * heads_per_group, n_q, head_dim), k=rnd(batch, groups, n_k, head_dim),
        v=rnd(batch, groups, n_k, head_dim), q_time=q_time.to(device), k_time=k_time.to(device),
        allowed=allowed.to(device), nb=nb,
    )


def _same_sets(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(torch.sort(a, dim=-1).values, torch.sort(b, dim=-1).values)


@pytest.mark.parametrize("seed", [0, 1])
def test_decode_select_reference_is_the_last_rows_of_full_select(seed):
    """Decode selection of the last queries of a sequence equals the full-length reference's rows."""
    g = torch.Generator().manual_seed(seed)
    batch, groups, seq_len, n_q, bs, k = 2, 2, 61, 5, 8, 3
    qi = torch.randn(batch, groups, seq_len, 8, generator=g)
    ki = torch.randn(batch, seq_len, 8, generator=g)
    t = (torch.arange(seq_len) // 2).to(torch.int32).repeat(batch, 1)
    forced = (torch.arange(seq_len) // bs).int().view(1, 1, seq_len, 1).expand(batch, groups, seq_len, 1).contiguous()
    full = select_blocks_reference(qi, ki, t, t, bs, k, None, forced)
    dec = decode_select_reference(qi[:, :, -n_q:], ki, t[:, -n_q:], t, bs, k, None, forced[:, :, -n_q:].contiguous())
    assert _same_sets(full[:, :, -n_q:], dec)


@pytest.mark.parametrize("seed", [0, 1])
def test_decode_attention_reference_is_the_last_rows_of_full_attention(seed):
    c = _cache(seed, 2, 2, 4, 53, 8)
    bs, seq_len = 8, 53
    sel = decode_select_reference(c["qi"], c["ki"], c["q_time"], c["k_time"], bs, 3, c["allowed"])
    out, lse = decode_attention_reference(c["q"], c["k"], c["v"], sel, c["q_time"], c["k_time"], bs)
    # Full reference: the 4 queries appended as the last 4 rows of a length-L problem.
    q_full = torch.cat([torch.zeros(2, 4, seq_len - 4, 16), c["q"]], dim=2)
    qt_full = torch.cat([torch.full((2, seq_len - 4), -1, dtype=torch.int32), c["q_time"]], dim=1)
    idx_full = torch.cat([torch.full((2, 2, seq_len - 4, 3), -1, dtype=torch.int32), sel], dim=2)
    ref_out, ref_lse = sparse_attention_reference(q_full, c["k"], c["v"], idx_full, qt_full, c["k_time"], bs)
    torch.testing.assert_close(out, ref_out[:, :, -4:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse[:, :, -4:], atol=1e-5, rtol=1e-5)


def test_decode_reference_bad_input_is_named():
    c = _cache(0, 1, 2, 3, 40, 8)
    with pytest.raises(KernelInputError, match="ki must be"):
        decode_select_reference(c["qi"], c["ki"][..., :5], c["q_time"], c["k_time"], 8, 2)
    with pytest.raises(KernelInputError, match="k_time must be"):
        decode_attention_reference(c["q"], c["k"], c["v"], torch.zeros(1, 2, 3, 2, dtype=torch.int32), c["q_time"],
                                   c["k_time"][:, :7], 8)


@needs_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("block_size,policy", [(8, "free"), (16, "sensor"), (32, "free")])
def test_decode_select_triton_matches_reference(dtype, block_size, policy):
    from tsfm_msa.kernels.decode_select_triton import decode_select_triton

    c = _cache(3, 2, 2, 5, 150, block_size, dtype=dtype, index_dim=12)
    allowed = c["allowed"] if policy == "sensor" else None
    forced = torch.randint(-1, c["nb"], (2, 2, 5, 1), generator=torch.Generator().manual_seed(4)).int()
    ref_idx, ref_s = decode_select_reference(c["qi"], c["ki"], c["q_time"], c["k_time"], block_size, 4, allowed,
                                             forced, return_scores=True)
    idx, s = decode_select_triton(c["qi"], c["ki"], c["q_time"], c["k_time"], block_size, 4, allowed, forced,
                                  return_scores=True)
    assert _same_sets(ref_idx, idx)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(torch.sort(s, -1).values, torch.sort(ref_s, -1).values, atol=tol, rtol=tol)


@needs_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("block_size,rep,head_dim", [(8, 2, 16), (16, 4, 32), (8, 3, 24)])
def test_decode_attention_triton_matches_reference(dtype, block_size, rep, head_dim):
    from tsfm_msa.kernels.decode_attention_triton import decode_attention_triton

    c = _cache(5, 2, 2, 3, 130, block_size, dtype=dtype, heads_per_group=rep, head_dim=head_dim)
    sel = decode_select_reference(c["qi"].float(), c["ki"].float(), c["q_time"], c["k_time"], block_size, 5)
    sel[0, 0, 0, 1:] = -1  # a row with one slot only
    out, lse = decode_attention_triton(c["q"], c["k"], c["v"], sel, c["q_time"], c["k_time"], block_size)
    ref_out, ref_lse = decode_attention_reference(c["q"], c["k"], c["v"], sel, c["q_time"], c["k_time"], block_size)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.float(), ref_out.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(lse, ref_lse, atol=tol, rtol=tol)


@needs_interp
def test_decode_attention_triton_empty_rows_give_zero_and_minus_inf():
    from tsfm_msa.kernels.decode_attention_triton import decode_attention_triton

    c = _cache(6, 1, 2, 2, 64, 8)
    sel = torch.full((1, 2, 2, 3), -1, dtype=torch.int32)
    sel[0, 1, 1, 0] = 2
    out, lse = decode_attention_triton(c["q"], c["k"], c["v"], sel, c["q_time"], c["k_time"], 8)
    ref_out, ref_lse = decode_attention_reference(c["q"], c["k"], c["v"], sel, c["q_time"], c["k_time"], 8)
    torch.testing.assert_close(out, ref_out)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)) and torch.isinf(lse[0, 0]).all()


@needs_interp
def test_dispatch_routes_decode_ops_to_triton_when_forced():
    c = _cache(7, 1, 2, 2, 48, 8)
    dispatch.set_backend("triton")
    try:
        sel = dispatch.decode_select(c["qi"], c["ki"], c["q_time"], c["k_time"], 8, 2)
        out, _ = dispatch.decode_attention(c["q"], c["k"], c["v"], sel, c["q_time"], c["k_time"], 8)
    finally:
        dispatch.set_backend("auto")
    ref, _ = decode_attention_reference(c["q"], c["k"], c["v"], sel, c["q_time"], c["k_time"], 8)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


gpu = pytest.mark.skipif(not torch.cuda.is_available() or INTERP, reason="needs CUDA (and no interpreter)")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("block_size", [8, 64])
def test_decode_kernels_bf16_on_gpu(block_size):
    from tsfm_msa.kernels.decode_attention_triton import decode_attention_triton
    from tsfm_msa.kernels.decode_select_triton import decode_select_triton

    c = _cache(8, 1, 4, 32, 20000, block_size, per_step=16, dtype=torch.bfloat16, device="cuda", index_dim=64,
               heads_per_group=4, head_dim=128)
    forced = torch.full((1, 4, 32, 1), 3, dtype=torch.int32, device="cuda")
    ref_idx, ref_s = decode_select_reference(c["qi"], c["ki"], c["q_time"], c["k_time"], block_size, 16, c["allowed"],
                                             forced, return_scores=True)
    idx, s = decode_select_triton(c["qi"], c["ki"], c["q_time"], c["k_time"], block_size, 16, c["allowed"], forced,
                                  return_scores=True)
    # bf16 products accumulate in a different order: compare scores; blocks agree except near-ties.
    torch.testing.assert_close(torch.sort(s, -1).values, torch.sort(ref_s, -1).values, atol=0.05, rtol=0.02)
    agree = (torch.sort(idx, -1).values == torch.sort(ref_idx, -1).values).float().mean()
    assert agree > 0.95
    out, lse = decode_attention_triton(c["q"], c["k"], c["v"], ref_idx, c["q_time"], c["k_time"], block_size)
    ref_out, ref_lse = decode_attention_reference(c["q"], c["k"], c["v"], ref_idx, c["q_time"], c["k_time"], block_size)
    torch.testing.assert_close(out.float(), ref_out.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, ref_lse, atol=2e-2, rtol=2e-2)


@needs_interp
def test_decode_select_triton_many_rows_span_several_tiles():
    """3 groups x 30 queries = 90 (group, query) rows: two row tiles of 64, and several key chunks."""
    from tsfm_msa.kernels.decode_select_triton import decode_select_triton

    c = _cache(9, 1, 3, 30, 200, 8, per_step=5, index_dim=16)
    ref_idx, ref_s = decode_select_reference(c["qi"], c["ki"], c["q_time"], c["k_time"], 8, 3, c["allowed"],
                                             return_scores=True)
    idx, s = decode_select_triton(c["qi"], c["ki"], c["q_time"], c["k_time"], 8, 3, c["allowed"], return_scores=True)
    assert _same_sets(ref_idx, idx)
    torch.testing.assert_close(s, ref_s, atol=1e-5, rtol=1e-5)
