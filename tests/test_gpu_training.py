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
        # Dense-support phase (every block kept), so the comparison does not hinge on near-tied
        # block scores: the fp32 reference against the Triton kernels under bf16 autocast.
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
