"""The MSA model on CUDA: Triton kernels inside a real training step (bf16 autocast), checked
against the same model on the reference ops. Skipped without CUDA."""
from __future__ import annotations

import os

import pytest
import torch

from tsfm_msa import kernels
from tsfm_msa.model.transformer import PatchTransformer, pinball_loss

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                       reason="needs CUDA (and no Triton interpreter)"),
]

ROLES = ["target", "past_covariate", "future_covariate"]


def _batch(batch: int, context: int, horizon: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return {
        "context": torch.randn(batch, context, 3, device="cuda", generator=g),
        "context_mask": torch.rand(batch, context, 3, device="cuda", generator=g) > 0.02,
        "horizon": torch.randn(batch, horizon, 3, device="cuda", generator=g),
        "horizon_mask": torch.ones(batch, horizon, 3, dtype=torch.bool, device="cuda"),
    }


def _model(policy: str) -> PatchTransformer:
    torch.manual_seed(0)
    return PatchTransformer(ROLES, [0, 1, 2], ["target", "past", "future"], patch_len=16, d_model=256, n_layers=2,
                            n_heads=6, n_kv_heads=3, head_dim=64, block_size=64, top_k=4, index_dim=64,
                            group_policy=policy).cuda()


@pytest.mark.parametrize("policy", ["free", "sensor", "hybrid"])
def test_msa_training_step_on_cuda_matches_reference(policy):
    model = _model(policy)
    batch = _batch(2, 4096, 256, seed=1)  # ~800 tokens, 15 blocks of 64
    outputs = {}
    try:
        # Dense-support phase, so the comparison does not hinge on near-tied block scores: the
        # dense main branch (FlexAttention) in fp32 against bf16 autocast.
        kernels.set_backend("reference")
        with torch.no_grad():
            outputs["reference"] = model(batch, "indexer_warmup").quantiles.float()
        kernels.set_backend("triton")
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            outputs["triton"] = model(batch, "indexer_warmup").quantiles.float()
        kernels.set_backend("triton")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for phase in ("indexer_warmup", "sparse"):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(batch, phase)
                truth = batch["horizon"][..., [0]].transpose(1, 2)
                loss = pinball_loss(out.quantiles.float(), truth, batch["horizon_mask"][..., [0]].transpose(1, 2),
                                    model.quantile_levels) + out.kl
            assert torch.isfinite(loss), phase
            loss.backward()
            assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
            optimizer.step()
            optimizer.zero_grad()
    finally:
        kernels.set_backend("auto")
    ref, tri = outputs["reference"], outputs["triton"]
    # bf16 end to end through two layers: compare at bf16 tolerance, relative to the output norm.
    assert (tri - ref).norm() / ref.norm() < 3e-2


def test_kl_gradient_reaches_only_index_projections_on_cuda():
    model = _model("free")
    kernels.set_backend("triton")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(_batch(1, 2048, 128, seed=2), "sparse")
        out.kl.backward()
    finally:
        kernels.set_backend("auto")
    for name, param in model.named_parameters():
        if ".index_q." in name or ".index_k." in name:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None or torch.count_nonzero(param.grad) == 0, name


@pytest.mark.parametrize("overrides", [
    [],  # the README's GPU command on the shipped defaults (msa_small, vic_elec)
    ["model=dense_small"],
    ["+experiment=vic_elec_sensor"],
    ["+experiment=vic_elec_sensor", "model.group_policy=hybrid"],
])
def test_cli_train_on_gpu_with_shipped_configs_runs_the_triton_ops(tmp_path, overrides):
    from tsfm_msa.cli import main
    from tsfm_msa.kernels.dispatch import CALLS

    CALLS.clear()
    main(["train", "trainer=gpu", *overrides, "trainer.max_steps=6", "trainer.val_check_interval=3",
          "indexer_warmup.steps=3", "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path}"])
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    assert not any(backend == "reference" for _, backend in CALLS), dict(CALLS)
    dense_calls = CALLS[("dense_attention", "flex")] + CALLS[("dense_attention", "chunked")]
    assert dense_calls > 0  # dense layers, or the indexer warmup's dense main branch
    if overrides != ["model=dense_small"]:
        for op in ("select_blocks", "sparse_attention", "indexer_kl"):
            assert CALLS[(op, "triton")] > 0, dict(CALLS)


def test_warmup_index_loss_on_flex_matches_the_cpu_path():
    """The warmup's dense index loss through FlexAttention equals the exact chunked CPU path."""
    from tsfm_msa.model.attention import MSAAttention
    from tsfm_msa.tokens import build_layout

    from tsfm_msa.kernels.dispatch import CALLS

    # ~6K tokens and 2K KL rows: long enough for the Flex path (see dense_attention.SMALL_PAIRS).
    layout = build_layout(ROLES, [0, 1, 2], ["a", "b", "c"], context_len=16000, horizon=64, patch_len=8, block_size=16)
    layer = MSAAttention(d_model=32, n_heads=6, n_kv_heads=3, head_dim=32, index_dim=16, top_k=2, kl_row_stride=3)
    layer.train_step = 1
    L = layout.seq_len
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(2, 6, L, 32, generator=g), torch.randn(2, 3, L, 32, generator=g)
    qi, ki = torch.randn(2, 3, L, 16, generator=g), torch.randn(2, L, 16, generator=g)
    grads = []
    for device in ("cpu", "cuda"):
        lay = layout.to(device)
        qi_d = qi.detach().clone().to(device).requires_grad_()
        ki_d = ki.detach().clone().to(device).requires_grad_()
        loss = layer.dense_index_loss(q.to(device), k.to(device), qi_d, ki_d, lay)
        loss.backward()
        grads.append((loss.detach().cpu(), qi_d.grad.cpu(), ki_d.grad.cpu()))
    assert CALLS[("dense_attention", "flex")] >= 2
    for cpu, gpu in zip(*grads):
        torch.testing.assert_close(gpu, cpu, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("head_dim", [16, 64])
def test_flex_dense_attention_matches_the_chunked_path_in_bf16(head_dim):
    from tsfm_msa.model import dense_attention as da
    from tsfm_msa.tokens import build_layout

    layout = build_layout(ROLES, [0, 0, 1], ["a", "b"], context_len=24000, horizon=64, patch_len=8,
                          block_size=16).to("cuda")
    L = layout.seq_len
    g = torch.Generator(device="cuda").manual_seed(7)
    q = torch.randn(4, 4, L, head_dim, device="cuda", generator=g, dtype=torch.bfloat16)
    k, v = (torch.randn(4, 2, L, head_dim, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
    results = []
    for flex in (True, False):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        if flex:
            out, lse = da.time_masked_attention(qq, kk, vv, layout.q_time, layout.k_time)
        else:
            out, lse = da._chunked_reference(qq, kk, vv, layout.q_time, layout.k_time, 1 / head_dim ** 0.5)
        out.float().square().sum().backward()
        results.append([out.float(), torch.where(torch.isinf(lse), 0, lse), qq.grad.float(), kk.grad.float(),
                        vv.grad.float()])
    for a, b in zip(*results):
        assert (a - b).norm() / b.norm() < 2e-2


@pytest.mark.parametrize("kind", ["dense", "msa"])
def test_long_window_step_has_no_quadratic_memory(kind):
    """A 64K-token training step: an [L, L] bool mask alone would take 4 GiB, scores 16 GiB."""
    roles = ["target", "past_covariate", "past_covariate", "past_covariate"]
    model = PatchTransformer(roles, [0, 0, 1, 1], ["a", "b"], attention=kind, patch_len=16, d_model=128, n_layers=1,
                             n_heads=4, n_kv_heads=2, head_dim=64, block_size=128, top_k=8, index_dim=32).cuda()
    context = 16 * 16384
    g = torch.Generator(device="cuda").manual_seed(0)
    batch = {"context": torch.randn(1, context, 4, device="cuda", generator=g),
             "context_mask": torch.ones(1, context, 4, dtype=torch.bool, device="cuda"),
             "horizon": torch.randn(1, 64, 4, device="cuda", generator=g),
             "horizon_mask": torch.ones(1, 64, 4, dtype=torch.bool, device="cuda")}
    for phase in (["sparse"] if kind == "dense" else ["indexer_warmup", "sparse"]):
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(batch, phase)
        (out.quantiles.float().mean() + out.kl).backward()
        assert torch.isfinite(out.quantiles).all()
        assert torch.cuda.max_memory_allocated() < 3 * 2**30, (phase, torch.cuda.max_memory_allocated() / 2**30)
