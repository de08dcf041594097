"""Triton sparse_attention (forward and backward) against the PyTorch reference.

Without CUDA the kernels run in the Triton interpreter: this module sets ``TRITON_INTERPRET=1``
before anything imports triton (the CI script ``.ci/run`` exports it as well), and tests fp32/fp16
on small shapes (the interpreter computes bf16 dots wrongly). The ``gpu`` tests (bf16 at realistic
sizes, compiled) need CUDA and the interpreter off; ``tests/conftest.py`` defaults it on, so run them
with ``TRITON_INTERPRET=0 python -m pytest -m gpu tests/test_kernel_sparse_attention.py``.
"""
import importlib
import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tsfm_msa.kernels import INT32_MAX, KernelInputError, sparse_attention_reference  # noqa: E402
# The package re-exports the dispatcher function under the module's name: fetch the module itself.
sa = importlib.import_module("tsfm_msa.kernels.sparse_attention_triton")
worklist = importlib.import_module("tsfm_msa.kernels.worklist")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
cpu_only = pytest.mark.skipif(not INTERPRET, reason="interpreter tests (CPU, TRITON_INTERPRET=1)")
gpu = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET,
                         reason=f"needs a CUDA GPU, compiled (cuda={torch.cuda.is_available()}, interpret={INTERPRET})")


def make_block_idx(batch, groups, seq_len, bs, k, pattern, gen, device="cpu", causal=True, empty=0.0):
    """Random duplicate-free ``block_idx [B, G, L, K]`` int32 with the query's local block first.

    tile_shared: all queries of a bs-token tile share their blocks; pool: each query takes k - 1
    blocks from a per-tile pool of k + 8; random: per-query random blocks. ``causal`` restricts
    choices to blocks at or before the local one (else future blocks are chosen too, which the time
    mask must hide); ``empty`` is the chance of blanking a slot (-1).
    """
    nb = (seq_len + bs - 1) // bs
    local = torch.arange(seq_len, device=device) // bs  # [L]
    blocks = torch.arange(nb, device=device)

    def top(scores, own, width):  # scores [..., N]; own [..., 1] column forced to the top
        scores = scores.scatter(-1, own, float("inf"))
        val, idx = scores.topk(width, dim=-1)
        return torch.where(val == float("-inf"), -1, idx)

    def rand(*shape):
        return torch.rand(*shape, generator=gen, device=device)

    tiles = torch.arange(nb, device=device)
    hidden = blocks[None, :] > tiles[:, None]  # [NT, NB] future blocks of each tile
    if pattern == "tile_shared" or pattern == "pool":
        width = k if pattern == "tile_shared" else min(nb, k + 8)
        scores = rand(batch, groups, nb, nb)
        if causal:
            scores = scores.masked_fill(hidden, float("-inf"))
        chosen = top(scores, tiles.view(1, 1, nb, 1).expand(batch, groups, nb, 1), width)
        chosen = chosen[:, :, local]  # [B, G, L, width]
        if pattern == "pool":
            pick = rand(batch, groups, seq_len, width).masked_fill(chosen < 0, float("-inf"))
            slot = top(pick, torch.zeros(batch, groups, seq_len, 1, dtype=torch.long, device=device), k)
            chosen = torch.where(slot < 0, -1, chosen.gather(-1, slot.clamp_min(0)))
    elif pattern == "random":
        scores = rand(batch, groups, seq_len, nb)
        if causal:
            scores = scores.masked_fill(hidden[local], float("-inf"))
        chosen = top(scores, local.view(1, 1, seq_len, 1).expand(batch, groups, seq_len, 1), k)
    else:
        raise ValueError(pattern)
    if empty:
        chosen = torch.where(rand(*chosen.shape) < empty, -1, chosen)
    return chosen.to(torch.int32).contiguous()


def make_times(batch, seq_len, layout, gen, device="cpu"):
    """``q_time, k_time [B, L]`` int32. causal: time = position, the last tokens of batch 1 padded;
    series: several series laid out one after another (time restarts), random tokens padded."""
    pos = torch.arange(seq_len, device=device, dtype=torch.int32).repeat(batch, 1)
    if layout == "series":
        pos = pos % max(1, seq_len // 3)
    q_time, k_time = pos.clone(), pos.clone()
    if layout == "causal" and batch > 1:
        pad = seq_len // 5
        q_time[1, seq_len - pad:] = -1
        k_time[1, seq_len - pad:] = INT32_MAX
    elif layout == "series":
        padded = torch.rand(batch, seq_len, generator=gen, device=device) < 0.1
        q_time[padded] = -1
        k_time[padded] = INT32_MAX
    return q_time, k_time


def rel_err(a, b):
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def run_case(batch, heads, groups, seq_len, dim, bs, k, pattern, layout, dtype, variant, device,
             causal=True, empty=0.1, seed=0, lse_grad=False):
    """Forward and backward of the kernel and of the fp32 reference on the same inputs."""
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(batch, heads, seq_len, dim, generator=gen, device=device).to(dtype)
    kk = torch.randn(batch, groups, seq_len, dim, generator=gen, device=device).to(dtype)
    v = torch.randn(batch, groups, seq_len, dim, generator=gen, device=device).to(dtype)
    dout = torch.randn(batch, heads, seq_len, dim, generator=gen, device=device).to(dtype)
    dlse = torch.randn(batch, heads, seq_len, generator=gen, device=device)
    block_idx = make_block_idx(batch, groups, seq_len, bs, k, pattern, gen, device, causal, empty)
    q_time, k_time = make_times(batch, seq_len, layout, gen, device)

    def loss(out, lse):
        total = (out.float() * dout.float()).sum()
        if lse_grad:
            total = total + torch.where(torch.isinf(lse), 0.0, lse * dlse).sum()
        return total

    refs = [t.detach().float().requires_grad_() for t in (q, kk, v)]
    ref_out, ref_lse = sparse_attention_reference(*refs, block_idx, q_time, k_time, bs)
    loss(ref_out, ref_lse).backward()

    ins = [t.detach().clone().requires_grad_() for t in (q, kk, v)]
    out, lse = sa.sparse_attention_triton(*ins, block_idx, q_time, k_time, bs, variant=variant)
    loss(out, lse).backward()
    return (out, lse, *[t.grad for t in ins]), (ref_out, ref_lse, *[t.grad for t in refs])


def check_close(got, ref, tol):
    out, lse, dq, dk, dv = (t.detach() for t in got)
    ref_out, ref_lse, rdq, rdk, rdv = ref
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), empty), "empty-support rows differ"
    assert (out[empty] == 0).all()
    assert float((lse - ref_lse.detach())[~empty].abs().max()) < 20 * tol
    errs = {name: rel_err(a, b) for name, a, b in
            (("out", out, ref_out), ("dq", dq, rdq), ("dk", dk, rdk), ("dv", dv, rdv))}
    assert all(e < tol for e in errs.values()), errs
    return errs


# (batch, Hq, G, L, D, bs, k, pattern, layout, causal, qo/kv rows): odd lengths, padding, GQA 1/2/3/4
CASES = [
    (2, 4, 2, 77, 32, 16, 3, "random", "causal", True, 32),
    (2, 3, 3, 50, 16, 16, 2, "tile_shared", "series", False, 16),
    (1, 6, 2, 70, 16, 32, 2, "pool", "causal", True, 32),
    (2, 8, 2, 45, 16, 16, 3, "pool", "series", False, 128),
]
# Blocks under 16 tokens (16-key steps, the rest masked). Case 0: 8-query tiles on 8-token
# tile_shared selections, so every query of a tile chose the same blocks (the case the union's
# mask-free flag targets; a flag there used to let the padding keys into the softmax).
SMALL_BLOCK_CASES = [
    (2, 4, 2, 45, 8, 8, 3, "tile_shared", "causal", True, 16),
    (1, 3, 3, 30, 16, 2, 4, "pool", "series", False, 16),
    (2, 2, 1, 26, 16, 4, 3, "random", "causal", True, 32),
]


@cpu_only
@pytest.mark.parametrize("variant", ["query_outer", "kv_outer"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_reference(case, dtype, variant, monkeypatch):
    batch, heads, groups, seq_len, dim, bs, k, pattern, layout, causal, rows = CASES[case]
    for name in ("qo_rows", "kv_rows", "dq_rows", "dkdv_rows"):
        monkeypatch.setitem(sa.CONFIG, name, rows)
    for name in ("qo_keys", "dq_keys", "dkdv_keys"):  # 32-token blocks run as two 16-key steps
        monkeypatch.setitem(sa.CONFIG, name, 16)
    got, ref = run_case(batch, heads, groups, seq_len, dim, bs, k, pattern, layout, dtype, variant,
                        "cpu", causal=causal, seed=case)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    check_close(got, ref, 1e-5 if dtype == torch.float32 else 5e-3)


@cpu_only
@pytest.mark.parametrize("case,dtype", [(0, torch.float32), (1, torch.float32), (2, torch.float16),
                                        (3, torch.float32), (1, torch.float16)])
def test_fused_backward_matches_reference(case, dtype, monkeypatch):
    """The fused backward (dq added atomically by the dk/dv owners) on every case: batch padding,
    several series one after another (group-major times), empty slots, future blocks hidden by time."""
    batch, heads, groups, seq_len, dim, bs, k, pattern, layout, causal, rows = CASES[case]
    monkeypatch.setitem(sa.CONFIG, "bwd_fused", True)
    monkeypatch.setitem(sa.CONFIG, "qo_rows", rows)
    monkeypatch.setitem(sa.CONFIG, "fused_rows", rows)
    for name in ("qo_keys", "fused_keys"):  # 32-token blocks run as two 16-key owners
        monkeypatch.setitem(sa.CONFIG, name, 16)
    got, ref = run_case(batch, heads, groups, seq_len, dim, bs, k, pattern, layout, dtype, "query_outer",
                        "cpu", causal=causal, seed=40 + case, lse_grad=case % 2 == 1)
    check_close(got, ref, 1e-5 if dtype == torch.float32 else 5e-3)


@cpu_only
@pytest.mark.parametrize("case,dtype,variant", [
    (0, torch.float32, "query_outer"), (0, torch.float32, "kv_outer"), (0, torch.float16, "query_outer"),
    (0, torch.float16, "kv_outer"), (1, torch.float32, "query_outer"), (1, torch.float16, "kv_outer"),
    (2, torch.float32, "kv_outer"), (2, torch.float16, "query_outer"),
])
def test_small_blocks_match_reference(case, dtype, variant, monkeypatch):
    batch, heads, groups, seq_len, dim, bs, k, pattern, layout, causal, rows = SMALL_BLOCK_CASES[case]
    for name in ("qo_rows", "kv_rows", "dq_rows", "dkdv_rows"):
        monkeypatch.setitem(sa.CONFIG, name, rows)
    got, ref = run_case(batch, heads, groups, seq_len, dim, bs, k, pattern, layout, dtype, variant,
                        "cpu", causal=causal, seed=20 + case)
    check_close(got, ref, 1e-5 if dtype == torch.float32 else 5e-3)


@cpu_only
@pytest.mark.parametrize("variant", ["query_outer", "kv_outer"])
def test_lse_gradient_and_segments(variant, monkeypatch):
    """A loss on lse reaches q and k; kv_outer split into query segments (tiny partial budget)
    accumulates dk/dv across them."""
    monkeypatch.setattr(sa, "_PARTIAL_BYTES", 2 * 2 * 3 * 16 * 4 * 20)  # ~20 queries a segment
    got, ref = run_case(2, 4, 2, 61, 16, 16, 3, "random", "causal", torch.float32, variant, "cpu",
                        seed=7, lse_grad=True)
    check_close(got, ref, 1e-5)


@cpu_only
def test_int64_csr(monkeypatch):
    """CSR schedules in int64 (forced by lowering the limit; real past 2^31 pairs) invert
    block_idx exactly and run the kv_outer forward and backward unchanged."""
    gen = torch.Generator().manual_seed(9)
    block_idx = make_block_idx(2, 2, 40, 8, 3, "random", gen, empty=0.2)
    entry32, off32 = worklist.block_csr(block_idx, 5)
    monkeypatch.setattr(worklist, "INDEX32_LIMIT", 1)
    entry, off = worklist.block_csr(block_idx, 5)
    assert entry.dtype == off.dtype == torch.int64 and entry32.dtype == off32.dtype == torch.int32
    assert torch.equal(entry, entry32.long()) and torch.equal(off, off32.long())
    flat = block_idx.reshape(4, 40 * 3)
    for key in range(4 * 5):
        bg, blk = divmod(key, 5)
        got = entry[off[key]:off[key + 1]]
        assert torch.equal(got, torch.nonzero(flat[bg] == blk).squeeze(1)), key
    got, ref = run_case(2, 4, 2, 40, 16, 8, 3, "random", "causal", torch.float32, "kv_outer", "cpu", seed=9)
    check_close(got, ref, 1e-5)


@cpu_only
def test_query_outer_wide_tiles():
    """One head a group: 64-query tiles, so two membership words per union entry in the forward and
    the dq kernel."""
    cfg = {"qo_rows": 64, "dq_rows": 64, "qo_keys": 16, "dq_keys": 16, "dkdv_keys": 16}
    with pytest.MonkeyPatch.context() as mp:
        for name, value in cfg.items():
            mp.setitem(sa.CONFIG, name, value)
        got, ref = run_case(1, 2, 2, 90, 16, 16, 3, "pool", "causal", torch.float32, "query_outer", "cpu",
                            seed=11)
    check_close(got, ref, 1e-5)


@cpu_only
def test_auto_variant_and_determinism():
    gen = torch.Generator().manual_seed(3)
    shared = make_block_idx(1, 2, 128, 16, 2, "tile_shared", gen)
    scattered = make_block_idx(1, 2, 128, 16, 2, "random", gen, causal=False)
    # 8 heads a group: 16-query tiles, aligned with the 16-token selection tiles.
    sh = sa._Shape(torch.randn(1, 16, 128, 16), torch.randn(1, 2, 128, 16), shared, 16)
    assert sa._pick_variant("auto", shared, sh)[0] == "query_outer"
    assert sa._pick_variant("auto", scattered, sh)[0] == "kv_outer"
    assert sa._pick_variant("auto", shared, sh, "bwd")[0] == "query_outer"

    q_time, k_time = make_times(1, 128, "causal", gen)
    ins = [torch.randn(1, 2, 128, 16, generator=gen).requires_grad_() for _ in range(3)]
    grads = []
    for _ in range(2):
        out, _ = sa.sparse_attention_triton(*ins, scattered, q_time, k_time, 16, variant="kv_outer")
        grads.append(torch.autograd.grad(out.sum(), ins))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@cpu_only
@pytest.mark.parametrize("pattern,tq", [("tile_shared", 8), ("pool", 8), ("random", 8), ("pool", 64)])
def test_tile_union_kernel(pattern, tq):
    """The Triton union matches the torch sorts, a block is flagged mask-free exactly when every
    query of the tile chose it and sees every key of it (full block, padding queries included), and
    the membership words hold exactly the queries of the tile that chose the block."""
    gen = torch.Generator().manual_seed(5)
    batch, groups, seq_len, bs = 2, 2, 77 if tq <= 8 else 150, 16
    block_idx = make_block_idx(batch, groups, seq_len, bs, 3, pattern, gen, empty=0.1)
    q_time, k_time = make_times(batch, seq_len, "causal", gen)
    union, count, bits = sa._build_union(block_idx, tq, q_time, k_time, bs)
    assert bits.shape[-1] == (tq + 31) // 32
    ref_union, ref_count = sa._tile_union(block_idx, tq)
    assert torch.equal(count, ref_count)
    kt = torch.nn.functional.pad(k_time, (0, -seq_len % bs), value=INT32_MAX).reshape(batch, -1, bs).amax(-1)
    n_flags = 0
    for bg in range(batch * groups):
        b, g = divmod(bg, groups)
        for t in range(count.shape[1]):
            n = int(count[bg, t])
            entries = union[bg, t, :n]
            assert torch.equal(entries >> 1, ref_union[bg, t, :n])
            rows = block_idx[b, g, t * tq:(t + 1) * tq]
            for u, e in enumerate(entries.tolist()):
                blk = e >> 1
                words = [w & 0xFFFFFFFF for w in bits[bg, t, u].tolist()]
                got = [(words[i // 32] >> (i % 32)) & 1 for i in range(tq)]
                want = (rows == blk).any(-1).int().tolist()
                assert got == want + [0] * (tq - len(want))
                free = bool((rows == blk).any(-1).all()) and int(kt[b, blk]) <= int(q_time[b, t * tq:(t + 1) * tq].min())
                assert (e & 1) == (0 if free else 1)
                n_flags += free
    assert n_flags > 0 or pattern == "random" or tq > bs  # tiles wider than a block share none


@cpu_only
def test_rejects_bad_inputs():
    q = torch.randn(1, 2, 32, 16)
    block_idx = torch.zeros(1, 2, 32, 2, dtype=torch.int32)
    t = torch.arange(32, dtype=torch.int32)[None]
    with pytest.raises(KernelInputError):
        sa.sparse_attention_triton(q, q, q, block_idx.long(), t, t, 16)
    with pytest.raises(ValueError):
        sa.sparse_attention_triton(q, q, q, block_idx, t, t, 16, variant="sideways")


# ------------------------------------------------------------------ GPU (bf16, realistic sizes)
GPU_CASES = [
    # Hq, G, D, bs, k, pattern
    (16, 4, 128, 128, 16, "tile_shared"),
    (16, 4, 128, 128, 16, "random"),
    (16, 4, 64, 64, 16, "pool"),
    (64, 4, 128, 128, 16, "random"),
    (16, 4, 64, 8, 16, "tile_shared"),  # 8-token blocks (msa_small): 16-key steps, half masked
    (16, 4, 16, 8, 16, "random"),
    (8, 4, 8, 2, 8, "pool"),  # the probes' 2-token blocks and head_dim 8
]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("variant", ["query_outer", "fused", "kv_outer"])
@pytest.mark.parametrize("case", range(len(GPU_CASES)))
def test_gpu_bf16_matches_reference(case, variant, monkeypatch):
    heads, groups, dim, bs, k, pattern = GPU_CASES[case]
    monkeypatch.setitem(sa.CONFIG, "bwd_fused", variant == "fused")
    got, ref = run_case(1, heads, groups, 8192, dim, bs, k, pattern, "causal", torch.bfloat16,
                        "kv_outer" if variant == "kv_outer" else "query_outer", "cuda", seed=case, empty=0.02)
    errs = check_close(got, ref, 2e-2)
    print(case, variant, errs)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("variant", ["query_outer", "fused", "kv_outer"])
@pytest.mark.parametrize("pattern", ["tile_shared", "pool", "random"])
def test_gpu_bf16_series_layout_and_masks(pattern, variant, monkeypatch):
    """bf16 on group-major times (several series one after another, time restarting) with masked
    tokens (time -1 / INT32_MAX, as sensor masks produce), empty slots and batch 2."""
    monkeypatch.setitem(sa.CONFIG, "bwd_fused", variant == "fused")
    got, ref = run_case(2, 16, 4, 4096, 128, 128, 16, pattern, "series", torch.bfloat16,
                        "kv_outer" if variant == "kv_outer" else "query_outer", "cuda", causal=False,
                        seed=60, empty=0.05, lse_grad=True)
    errs = check_close(got, ref, 2e-2)
    print(pattern, variant, errs)


@pytest.mark.gpu
@gpu
def test_gpu_batch_padding_fp16():
    got, ref = run_case(2, 8, 2, 3000, 64, 64, 8, "pool", "causal", torch.float16, "auto", "cuda",
                        seed=11, empty=0.1)
    check_close(got, ref, 1e-2)


def _rows_reference(q, k, v, block_idx, q_time, k_time, bs, groups, rows):
    """Reference on a few (group, query) rows only: out, lse and (through autograd) dq of those rows
    and dk, dv, by gathering each row's selected tokens; nothing of size L x L."""
    g, i = rows[:, 0], rows[:, 1]  # [S]
    heads = q.shape[1]
    rep = heads // groups
    seq_len, dim = q.shape[2], q.shape[3]
    h = g[:, None] * rep + torch.arange(rep, device=q.device)  # [S, R]
    q_rows = q[0, h, i[:, None]].detach().float().requires_grad_()  # [S, R, D]
    k32 = k.detach().float().requires_grad_()
    v32 = v.detach().float().requires_grad_()
    blk = block_idx[0, g, i].long()  # [S, K]
    tok = (blk[:, :, None] * bs + torch.arange(bs, device=q.device)).reshape(len(rows), -1)  # [S, K*bs]
    ok = (blk >= 0).repeat_interleave(bs, 1) & (tok < seq_len)
    tok = tok.clamp(0, seq_len - 1)
    ok = ok & (k_time[0, tok] <= q_time[0, i][:, None])
    kk, vv = k32[0, g[:, None], tok], v32[0, g[:, None], tok]  # [S, K*bs, D]
    logits = torch.einsum("srd,snd->srn", q_rows, kk) / math.sqrt(dim)
    logits = logits.masked_fill(~ok[:, None], float("-inf"))
    lse = torch.logsumexp(logits, -1)  # [S, R]
    probs = torch.exp(logits - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    out = torch.einsum("srn,snd->srd", probs, vv)
    return out, lse, q_rows, k32, v32, h


def _check_few_rows(variant, dev, dtype, heads, groups, seq_len, dim, bs, k, n_rows, tol, seed):
    """Only a few (group, query) rows select blocks (among them the last queries of the last group);
    compares them with the per-row reference and checks that every other row is empty (out 0, lse
    -inf, no dq)."""
    gen = torch.Generator(device=dev).manual_seed(seed)
    q = torch.randn(1, heads, seq_len, dim, generator=gen, device=dev).to(dtype)
    kk = torch.randn(1, groups, seq_len, dim, generator=gen, device=dev).to(dtype)
    v = torch.randn(1, groups, seq_len, dim, generator=gen, device=dev).to(dtype)
    q_time = torch.arange(seq_len, dtype=torch.int32, device=dev)[None]
    k_time = q_time.clone()
    nb = (seq_len + bs - 1) // bs
    g = torch.randint(0, groups, (n_rows,), generator=gen, device=dev)
    i = torch.randint(0, seq_len, (n_rows,), generator=gen, device=dev)
    g[:4], i[:4] = groups - 1, torch.arange(seq_len - 4, seq_len, device=dev)
    rows = torch.unique(torch.stack([g, i], 1), dim=0)
    block_idx = torch.full((1, groups, seq_len, k), -1, dtype=torch.int32, device=dev)
    local = rows[:, 1] // bs
    picks = torch.rand(len(rows), nb - 1, generator=gen, device=dev).topk(k - 1, -1).indices  # future ones too
    picks = picks + (picks >= local[:, None]).long()  # distinct from the local block
    block_idx[0, rows[:, 0], rows[:, 1]] = torch.cat([local[:, None], picks], 1).to(torch.int32)

    ins = [t.clone().requires_grad_() for t in (q, kk, v)]
    out, lse = sa.sparse_attention_triton(*ins, block_idx, q_time, k_time, bs, variant=variant)
    dout = torch.randn(out.shape, generator=gen, device=dev).to(dtype)
    (out.float() * dout.float()).sum().backward()

    ref_out, ref_lse, q_rows, k32, v32, h = _rows_reference(q, kk, v, block_idx, q_time, k_time, bs, groups, rows)
    i_rows = rows[:, 1, None]
    (ref_out * dout[0, h, i_rows].float()).sum().backward()
    assert rel_err(out[0, h, i_rows], ref_out) < tol
    assert float((lse[0, h, i_rows] - ref_lse).abs().max()) < 5 * tol
    assert rel_err(ins[0].grad[0, h, i_rows], q_rows.grad) < tol
    assert rel_err(ins[1].grad, k32.grad) < tol and rel_err(ins[2].grad, v32.grad) < tol
    chosen = torch.zeros(groups, seq_len, dtype=torch.bool, device=dev)
    chosen[rows[:, 0], rows[:, 1]] = True
    empty = ~chosen.repeat_interleave(heads // groups, 0)[None]  # [1, Hq, L]
    assert torch.isinf(lse[empty]).all() and (lse[empty] < 0).all()
    assert not out.detach()[empty].any() and not ins[0].grad[empty].any()


@cpu_only
def test_few_rows_reference_check():
    """The per-row check of the 64-bit GPU test, on a tiny problem in the interpreter."""
    _check_few_rows("kv_outer", "cpu", torch.float32, 4, 2, 40, 16, 8, 3, 6, 1e-5, seed=61)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("variant", ["query_outer", "kv_outer"])
def test_gpu_64bit_offsets(variant):
    """1M tokens x 16 query heads x head_dim 128: q / out / dq element offsets pass 2^31 (8-token
    blocks, top-16)."""
    assert 16 * (1 << 20) * 128 >= 2**31
    _check_few_rows(variant, "cuda", torch.bfloat16, 16, 4, 1 << 20, 128, 8, 16, 48, 2e-2, seed=60)
