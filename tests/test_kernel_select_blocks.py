"""select_blocks_triton against select_blocks_reference.

CPU: Triton interpreter (TRITON_INTERPRET=1) in fp32/fp16 on small shapes. GPU (@pytest.mark.gpu): bf16
at realistic sizes (run with ``TRITON_INTERPRET=0 python -m pytest -m gpu ...``). Block sets are
compared per row after sorting (slot order may differ), and the returned scores for the same blocks.
"""
import os

import pytest
import torch

triton = pytest.importorskip("triton")

from tsfm_msa.kernels.reference import INT32_MAX, num_blocks, select_blocks_reference  # noqa: E402
from tsfm_msa.kernels.select_blocks_triton import select_blocks_triton  # noqa: E402

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
needs_cpu_interp = pytest.mark.skipif(not INTERP, reason="CPU tests run under TRITON_INTERPRET=1")
gpu = pytest.mark.skipif(not torch.cuda.is_available() or INTERP, reason="needs CUDA (and no interpreter)")


def _times(batch, seq_len, share, device="cpu", pad_tail=0):
    """Time ids with ``share`` tokens per time step (variates of one patch); batch 1 padded."""
    t = (torch.arange(seq_len, dtype=torch.int32, device=device) // share).repeat(batch, 1)
    q_time, k_time = t.clone(), t.clone()
    if pad_tail and batch > 1:
        k_time[1, -pad_tail:] = INT32_MAX
        q_time[1, -pad_tail:] = -1
    return q_time, k_time


def _group_major_times(batch, groups, per_group, block_size, device="cpu"):
    """Group-major layout: each sensor group's segment (time-ordered, padded to a multiple of
    block_size) follows the previous one; returns times and the sensor ``allowed`` mask."""
    seg = num_blocks(per_group, block_size) * block_size
    seq_len = groups * seg
    t = torch.full((seq_len,), INT32_MAX, dtype=torch.int32)
    for g in range(groups):
        t[g * seg:g * seg + per_group] = torch.arange(per_group, dtype=torch.int32)
    k_time = t.repeat(batch, 1).to(device)
    q_time = torch.where(k_time == INT32_MAX, -1, k_time)
    nb = seq_len // block_size
    allowed = torch.zeros(batch, groups, nb, dtype=torch.bool)
    for g in range(groups):
        allowed[:, g, g * seg // block_size:(g + 1) * seg // block_size] = True
    return q_time, k_time, allowed.to(device), seq_len


def _local_forced(batch, groups, seq_len, block_size, device="cpu"):
    local = (torch.arange(seq_len, device=device) // block_size).to(torch.int32)
    return local.view(1, 1, seq_len, 1).expand(batch, groups, seq_len, 1).contiguous()


def _compare(got, ref, check_scores=True, exact=True, atol=1e-5):
    gi, gs = got
    ri, rs = ref
    assert gi.dtype == torch.int32 and gi.shape == ri.shape
    assert not torch.isnan(gs).any(), "an output slot was never written"
    g_sorted, g_ord = gi.sort(-1)
    r_sorted, r_ord = ri.sort(-1)
    if exact:
        mismatch = (g_sorted != r_sorted).any(-1)
        assert not mismatch.any(), f"{int(mismatch.sum())} rows select different blocks"
        if check_scores:
            torch.testing.assert_close(gs.gather(-1, g_ord), rs.gather(-1, r_ord), atol=atol, rtol=1e-5)
    else:
        # near-ties may swap blocks: the selected score values must agree, and almost all sets
        same = (g_sorted == r_sorted).all(-1).float().mean().item()
        assert same > 0.98, f"only {same:.4f} of rows agree"
        torch.testing.assert_close(gs.sort(-1).values, rs.sort(-1).values, atol=atol, rtol=1e-3)
    # empty slots come last and carry -inf
    empty = gi < 0
    assert torch.isinf(gs[empty]).all() and (gs[empty] < 0).all()


def _run(qi, ki, q_time, k_time, bs, k, allowed=None, forced=None, **kw):
    got = select_blocks_triton(qi, ki, q_time, k_time, bs, k, allowed, forced, return_scores=True)
    ref = select_blocks_reference(qi, ki, q_time, k_time, bs, k, allowed, forced, return_scores=True)
    _compare(got, ref, **kw)
    idx_only = select_blocks_triton(qi, ki, q_time, k_time, bs, k, allowed, forced)
    assert torch.equal(idx_only.sort(-1).values, got[0].sort(-1).values)
    return got, ref


@needs_cpu_interp
@pytest.mark.parametrize("case", ["free", "forced_local", "all_allowed", "random_allowed"])
def test_select_policies_fp32(case):
    torch.manual_seed(1)
    batch, groups, seq_len, index_dim, bs, k = 2, 3, 150, 24, 16, 4  # G=3 (padded to 4), odd L, Di=24
    qi = torch.randn(batch, groups, seq_len, index_dim)
    ki = torch.randn(batch, seq_len, index_dim)
    q_time, k_time = _times(batch, seq_len, share=3, pad_tail=11)
    nb = num_blocks(seq_len, bs)
    allowed = forced = None
    if case != "free":
        forced = _local_forced(batch, groups, seq_len, bs)
    if case == "all_allowed":
        allowed = torch.ones(batch, groups, nb, dtype=torch.bool)
    if case == "random_allowed":
        allowed = torch.rand(batch, groups, nb) < 0.5
    _run(qi, ki, q_time, k_time, bs, k, allowed, forced)


@needs_cpu_interp
def test_select_sensor_policy_group_major():
    """Sensor policy: group g only chooses blocks of its own segment (one program per group)."""
    torch.manual_seed(2)
    batch, groups, per_group, index_dim, bs, k = 2, 2, 45, 16, 16, 3
    q_time, k_time, allowed, seq_len = _group_major_times(batch, groups, per_group, bs)
    qi = torch.randn(batch, groups, seq_len, index_dim)
    ki = torch.randn(batch, seq_len, index_dim)
    # the local block of group g: its own block covering the query's time
    seg = num_blocks(per_group, bs) * bs
    t = q_time.clamp_min(0).long()
    forced = torch.stack([(g * seg + t) // bs for g in range(groups)], 1).unsqueeze(-1).to(torch.int32)
    got, _ = _run(qi, ki, q_time, k_time, bs, k, allowed, forced)
    idx = got[0]
    for b in range(batch):
        for g in range(groups):
            row = idx[b, g]
            assert allowed[b, g][row[row >= 0].long()].all(), "a block outside the group's sensors was chosen"


@needs_cpu_interp
def test_select_hybrid_forced_list_and_full_k():
    """Second pass of the hybrid policy: several forced blocks (with -1 holes); k = number of blocks
    so that many rows end with empty slots."""
    torch.manual_seed(3)
    batch, groups, seq_len, index_dim, bs = 1, 2, 100, 16, 16
    nb = num_blocks(seq_len, bs)
    qi = torch.randn(batch, groups, seq_len, index_dim)
    ki = torch.randn(batch, seq_len, index_dim)
    q_time, k_time = _times(batch, seq_len, share=2)
    own = torch.rand(batch, groups, nb) < 0.5
    first = select_blocks_reference(qi, ki, q_time, k_time, bs, 2, own)  # k_own = 2 (may hold -1)
    forced = torch.cat([first, torch.full_like(first[..., :1], -1)], -1)  # F = 3 with a -1 column
    forced = forced[..., [0, 2, 1]].contiguous()  # a hole in the middle
    _run(qi, ki, q_time, k_time, bs, nb, None, forced)
    _run(qi, ki, q_time, k_time, bs, nb, None, None)


@needs_cpu_interp
def test_select_fp16_single_group_block32():
    torch.manual_seed(4)
    batch, groups, seq_len, index_dim, bs, k = 2, 1, 130, 32, 32, 3
    qi = torch.randn(batch, groups, seq_len, index_dim, dtype=torch.float16)
    ki = torch.randn(batch, seq_len, index_dim, dtype=torch.float16)
    q_time, k_time = _times(batch, seq_len, share=1, pad_tail=5)
    forced = _local_forced(batch, groups, seq_len, bs)
    _run(qi, ki, q_time, k_time, bs, k, None, forced, exact=False, atol=1e-3)


@needs_cpu_interp
@pytest.mark.parametrize("bs,case", [(8, "forced_allowed"), (8, "free"), (4, "forced_allowed"), (2, "free"),
                                     (1, "forced_allowed")])
def test_select_small_blocks_time_major(bs, case):
    """Blocks under 16 tokens run in 16-key tiles: same selections and scores as the reference
    (time-major layout, 3 tokens a time step, a padded tail, forced local blocks, random policy)."""
    torch.manual_seed(10 + bs)
    batch, groups, seq_len, index_dim, k = 2, 2, 37, 8, 3
    qi = torch.randn(batch, groups, seq_len, index_dim)
    ki = torch.randn(batch, seq_len, index_dim)
    q_time, k_time = _times(batch, seq_len, share=3, pad_tail=7)
    nb = num_blocks(seq_len, bs)
    allowed = forced = None
    if case == "forced_allowed":
        forced = _local_forced(batch, groups, seq_len, bs)
        allowed = torch.rand(batch, groups, nb) < 0.6
    _run(qi, ki, q_time, k_time, bs, k, allowed, forced)


@needs_cpu_interp
def test_select_small_blocks_sensor_group_major_fp16():
    """Sensor policy on a group-major layout with 8-token blocks (fp16 inputs): each group picks
    only its own blocks; forced blocks with a -1 hole."""
    torch.manual_seed(12)
    batch, groups, per_group, index_dim, bs, k = 1, 2, 21, 16, 8, 2
    q_time, k_time, allowed, seq_len = _group_major_times(batch, groups, per_group, bs)
    qi = torch.randn(batch, groups, seq_len, index_dim, dtype=torch.float16)
    ki = torch.randn(batch, seq_len, index_dim, dtype=torch.float16)
    seg = num_blocks(per_group, bs) * bs
    t = q_time.clamp_min(0).long()
    forced = torch.stack([(g * seg + t) // bs for g in range(groups)], 1).unsqueeze(-1).to(torch.int32)
    forced[:, :, ::5] = -1  # some rows force nothing
    got, _ = _run(qi, ki, q_time, k_time, bs, k, allowed, forced, exact=False, atol=1e-3)
    idx = got[0]
    for g in range(groups):
        row = idx[0, g]
        assert allowed[0, g][row[row >= 0].long()].all(), "a block outside the group's sensors was chosen"


@needs_cpu_interp
def test_select_rejects_bad_inputs():
    from tsfm_msa.kernels import KernelInputError

    qi = torch.randn(1, 2, 40, 16)
    ki = torch.randn(1, 40, 16)
    q_time, k_time = _times(1, 40, 1)
    with pytest.raises(KernelInputError):
        select_blocks_triton(qi, ki, q_time, k_time, 16, 4)  # k > NB = 3
    with pytest.raises(KernelInputError):
        select_blocks_triton(qi, ki, q_time.long(), k_time, 16, 2)
    with pytest.raises(KernelInputError, match="power of two"):
        select_blocks_triton(qi, ki, q_time, k_time, 12, 2)


# ------------------------------------------------------------------ GPU (bf16, realistic sizes)

@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("bs,index_dim,groups", [(128, 64, 4), (64, 128, 4), (128, 64, 8), (8, 16, 4), (8, 64, 4),
                                                  (2, 8, 4)])
def test_select_gpu_bf16(bs, index_dim, groups):
    torch.manual_seed(5)
    dev = "cuda"
    batch, seq_len, k = 2, 4096 + 37, 16
    qi = torch.randn(batch, groups, seq_len, index_dim, device=dev, dtype=torch.bfloat16)
    ki = torch.randn(batch, seq_len, index_dim, device=dev, dtype=torch.bfloat16)
    q_time, k_time = _times(batch, seq_len, share=4, device=dev, pad_tail=100)
    forced = _local_forced(batch, groups, seq_len, bs, device=dev)
    got = select_blocks_triton(qi, ki, q_time, k_time, bs, k, None, forced, return_scores=True)
    ref = select_blocks_reference(qi, ki, q_time, k_time, bs, k, None, forced, return_scores=True)
    _compare(got, ref, exact=False, atol=2e-2)


@pytest.mark.gpu
@gpu
def test_select_gpu_sensor_policy():
    torch.manual_seed(6)
    dev = "cuda"
    batch, groups, per_group, index_dim, bs, k = 1, 4, 1000, 64, 64, 8
    q_time, k_time, allowed, seq_len = _group_major_times(batch, groups, per_group, bs, device=dev)
    qi = torch.randn(batch, groups, seq_len, index_dim, device=dev, dtype=torch.bfloat16)
    ki = torch.randn(batch, seq_len, index_dim, device=dev, dtype=torch.bfloat16)
    got = select_blocks_triton(qi, ki, q_time, k_time, bs, k, allowed, None, return_scores=True)
    ref = select_blocks_reference(qi, ki, q_time, k_time, bs, k, allowed, None, return_scores=True)
    _compare(got, ref, exact=False, atol=2e-2)


@pytest.mark.gpu
@gpu
def test_select_gpu_sensor_policy_8_token_blocks():
    torch.manual_seed(7)
    dev = "cuda"
    batch, groups, per_group, index_dim, bs, k = 1, 4, 500, 16, 8, 8
    q_time, k_time, allowed, seq_len = _group_major_times(batch, groups, per_group, bs, device=dev)
    qi = torch.randn(batch, groups, seq_len, index_dim, device=dev, dtype=torch.bfloat16)
    ki = torch.randn(batch, seq_len, index_dim, device=dev, dtype=torch.bfloat16)
    seg = num_blocks(per_group, bs) * bs
    t = q_time.clamp_min(0).long()
    forced = torch.stack([(g * seg + t) // bs for g in range(groups)], 1).unsqueeze(-1).to(torch.int32)
    got = select_blocks_triton(qi, ki, q_time, k_time, bs, k, allowed, forced, return_scores=True)
    ref = select_blocks_reference(qi, ki, q_time, k_time, bs, k, allowed, forced, return_scores=True)
    _compare(got, ref, exact=False, atol=2e-2)
