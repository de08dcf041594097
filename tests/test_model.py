"""Model-level properties of dense and MSA attention over patch tokens (CPU, reference ops)."""
from __future__ import annotations

import pytest
import torch

from helpers import random_batch, small_model
from tsfm_msa import kernels
from tsfm_msa.model.attention import DenseGQA, ModelConfigError, MSAAttention
from tsfm_msa.tokens import LayoutError, build_layout

C, H = 64, 24  # 8 context patches, 3 horizon patches of 8 steps


@pytest.mark.parametrize("attention,policy", [("dense", "free"), ("msa", "free"), ("msa", "sensor"), ("msa", "hybrid")])
@pytest.mark.parametrize("phase", ["indexer_warmup", "sparse"])
def test_causality_by_time(attention, policy, phase):
    model = small_model(attention, policy)
    batch = random_batch(2, C, H, 3, seed=1)
    with torch.no_grad():
        x0, layout, _ = model.encode(batch, phase)
        cut = 5  # change every step of patches >= 5 (context) and every horizon value
        changed = {k: v.clone() for k, v in batch.items()}
        changed["context"][:, cut * 8:] = torch.randn_like(changed["context"][:, cut * 8:]) * 3
        changed["horizon"] = torch.randn_like(changed["horizon"]) * 3
        x1, _, _ = model.encode(changed, phase)
    earlier = (layout.q_time >= 0) & (layout.q_time < cut)
    assert earlier.sum() > 0
    torch.testing.assert_close(x1[:, earlier], x0[:, earlier], rtol=0, atol=1e-5)
    assert not torch.allclose(x1[:, layout.q_time >= cut], x0[:, layout.q_time >= cut])


def test_future_target_values_never_reach_the_model():
    model = small_model("msa", "free")
    batch = random_batch(2, C, H, 3, seed=2)
    changed = {k: v.clone() for k, v in batch.items()}
    changed["horizon"][..., 0] = torch.randn_like(changed["horizon"][..., 0]) * 10  # target column
    changed["horizon"][..., 1] = torch.randn_like(changed["horizon"][..., 1]) * 10  # past-only covariate
    with torch.no_grad():
        torch.testing.assert_close(model(changed).quantiles, model(batch).quantiles)


@pytest.mark.parametrize("policy", ["free", "sensor", "hybrid"])
def test_local_block_always_selected(policy):
    model = small_model("msa", policy, top_k=2)
    batch = random_batch(2, C, H, 3, seed=3)
    with torch.no_grad():
        _, layout, auxes = model.encode(batch, "sparse")
    valid = layout.q_time >= 0
    for aux in auxes:
        idx = aux.block_idx  # [B, G, L, K]
        if policy == "free":
            local = layout.own_local_block[None, None, :, None]
        else:
            local = layout.group_local_block[None, :, :, None]
        hit = (idx == local.int()).any(-1)  # [B, G, L]
        assert hit[..., valid].all()


def test_sensor_policy_stays_inside_its_group():
    model = small_model("msa", "sensor", top_k=2)
    with torch.no_grad():
        _, layout, auxes = model.encode(random_batch(2, C, H, 3, seed=4), "sparse")
    for aux in auxes:
        idx = aux.block_idx
        groups = torch.arange(idx.shape[1])[None, :, None, None]
        chosen_group = layout.block_group[idx.clamp(min=0).long()]
        assert ((chosen_group == groups) | (idx < 0)).all()


def test_hybrid_policy_keeps_own_quota():
    model = small_model("msa", "hybrid", top_k=3, k_own=2)
    with torch.no_grad():
        _, layout, auxes = model.encode(random_batch(1, C, H, 3, seed=5), "sparse")
    valid = layout.q_time >= 0
    for aux in auxes:
        idx = aux.block_idx
        groups = torch.arange(idx.shape[1])[None, :, None, None]
        own = ((layout.block_group[idx.clamp(min=0).long()] == groups) & (idx >= 0)).sum(-1)
        block_min_time = layout.k_time.view(layout.n_blocks, layout.block_size).amin(-1)  # [NB]
        visible = block_min_time[None, :] <= layout.q_time[:, None]  # [L, NB]
        own_visible = torch.stack([(visible & (layout.block_group == g)).sum(-1) for g in range(idx.shape[1])])
        assert (own[0][:, valid] >= own_visible.clamp(max=2)[:, valid]).all()


def test_msa_with_every_block_equals_dense():
    msa = small_model("msa", "free", top_k=1)
    layout = msa.layout(C, H, torch.device("cpu"))
    nb = layout.n_blocks
    msa = small_model("msa", "free", top_k=nb, seed=7)
    dense = small_model("dense", "free", seed=7)
    missing, unexpected = dense.load_state_dict(msa.state_dict(), strict=False)
    assert not missing and all("index_" in k for k in unexpected)
    batch = random_batch(2, C, H, 3, seed=6)
    with torch.no_grad():
        torch.testing.assert_close(msa(batch, "sparse").quantiles, dense(batch).quantiles, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(msa(batch, "indexer_warmup").quantiles, dense(batch).quantiles, atol=1e-5, rtol=1e-4)


def test_predict_phase_forecasts_as_sparse_without_the_indexer_loss():
    model = small_model("msa", "free").eval()
    batch = random_batch(2, C, H, 3, seed=9)
    from tsfm_msa.kernels.dispatch import CALLS

    before = dict(CALLS)
    with torch.no_grad():
        sparse, predict = model(batch, "sparse"), model(batch, "predict")
    kl_calls = sum(n - before.get(key, 0) for key, n in CALLS.items() if key[0] == "indexer_kl")
    assert kl_calls == len(model.layers)  # the sparse forward's, none from predict
    torch.testing.assert_close(predict.quantiles, sparse.quantiles)
    assert sparse.kl.item() > 0 and predict.kl.item() == 0
    for a, b in zip(sparse.aux, predict.aux):
        assert torch.equal(a.block_idx, b.block_idx)


@pytest.mark.parametrize("phase", ["indexer_warmup", "sparse"])
def test_kl_gradient_reaches_only_index_projections(phase):
    model = small_model("msa", "free").train()
    out = model(random_batch(2, C, H, 3, seed=8), phase)
    assert out.kl.item() > 0
    out.kl.backward()
    for name, param in model.named_parameters():
        grad = param.grad
        if ".index_q." in name or ".index_k." in name:
            assert grad is not None and grad.abs().sum() > 0, name
        else:
            assert grad is None or torch.count_nonzero(grad) == 0, name


def test_layer_rejects_bad_settings():
    with pytest.raises(ModelConfigError, match="group_policy"):
        MSAAttention(16, 4, 2, 8, group_policy="nearest")
    with pytest.raises(ModelConfigError, match="multiple of n_kv_heads"):
        DenseGQA(16, 3, 2, 8)
    with pytest.raises(ModelConfigError, match="top_k=.*larger than the number of KV blocks"):
        small_model("msa", top_k=50).layout(C, H, torch.device("cpu"))
    with pytest.raises(ModelConfigError, match="n_kv_heads .*must equal the number of sensor groups"):
        small_model("msa", "sensor", n_kv_heads=2).layout(C, H, torch.device("cpu"))
    with pytest.raises(ModelConfigError, match="block_size must be a positive integer"):
        small_model("msa", block_size=0)
    with pytest.raises(ModelConfigError, match="patch_len must be a positive integer"):
        small_model("msa", patch_len=-4)
    with pytest.raises(LayoutError, match="patch_len must be a positive integer"):
        build_layout(["target"], [0], ["t"], 32, 8, 0, 8)
    with pytest.raises(ModelConfigError, match="the batch has 2 variates"):
        small_model("msa")(random_batch(1, C, H, 2))


@pytest.mark.parametrize("attention,policy", [("dense", "free"), ("msa", "free"), ("msa", "hybrid")])
def test_dense_support_policy_outside_the_sensor_policy_is_refused(attention, policy):
    """dense_support=policy changes nothing outside group_policy=sensor: refused, not silently `all`."""
    with pytest.raises(ModelConfigError, match=f"only changes attention under model.group_policy=sensor "
                                               f"\\(got {policy}\\); set model.group_policy=sensor"):
        small_model(attention, policy, dense_support="policy")
    with pytest.raises(ModelConfigError, match="group_policy=sensor"):
        MSAAttention(16, 4, 2, 8, group_policy=policy, dense_support="policy")
    small_model(attention, "sensor", dense_support="policy")  # where it has an effect, it builds


def test_kernel_input_errors_are_clear():
    qi, ki = torch.randn(1, 2, 20, 4), torch.randn(1, 20, 4)
    t = torch.arange(20, dtype=torch.int32)[None]
    with pytest.raises(kernels.KernelInputError, match="k=9 is larger than the number of KV blocks"):
        kernels.select_blocks(qi, ki, t, t, 4, 9)
    with pytest.raises(kernels.KernelInputError, match="block_size must be a positive int"):
        kernels.select_blocks(qi, ki, t, t, 0, 2)
    with pytest.raises(kernels.KernelInputError, match="q_time must be int32"):
        kernels.select_blocks(qi, ki, t.long(), t, 4, 2)


def test_non_finite_inputs_give_finite_loss():
    from tsfm_msa.model.transformer import pinball_loss

    model = small_model("msa").train()
    batch = random_batch(2, C, H, 3, seed=9)
    batch["context"][0, :10, 0] = float("nan")
    batch["context"][1, 5, 1] = float("inf")
    batch["horizon"][0, :3, 0] = float("nan")
    batch["horizon_mask"][0, :3, 0] = False
    out = model(batch, "sparse")
    truth = torch.nan_to_num(batch["horizon"][..., [0]].transpose(1, 2))
    loss = pinball_loss(out.quantiles, truth, batch["horizon_mask"][..., [0]].transpose(1, 2), model.quantile_levels)
    assert torch.isfinite(loss) and torch.isfinite(out.kl)
    (loss + out.kl).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_quantiles_are_monotone():
    q = small_model("msa")(random_batch(2, C, H, 3, seed=10)).quantiles
    assert (q.diff(dim=-1) >= 0).all()


def test_kernel_functions_survive_importing_the_triton_modules():
    """The Triton modules are imported lazily; their names must not shadow the dispatcher's ops."""
    pytest.importorskip("triton")
    import importlib

    for module in ("select_blocks_triton", "sparse_attention_triton", "indexer_kl_triton"):
        importlib.import_module(f"tsfm_msa.kernels.{module}")
    for op in (kernels.select_blocks, kernels.sparse_attention, kernels.indexer_kl):
        assert callable(op) and not isinstance(op, type(kernels))


def test_support_stats_match_a_direct_count():
    from tsfm_msa.model.attention import support_stats

    model = small_model("msa", "free", top_k=2)
    with torch.no_grad():
        _, layout, auxes = model.encode(random_batch(2, C, H, 3, seed=11), "sparse")
    idx = auxes[0].block_idx
    stats = support_stats(idx, layout, layout.own_local_block[None])
    block_of = torch.arange(layout.seq_len) // layout.block_size
    visible = layout.k_time[None, :] <= layout.q_time[:, None]  # [L, L]
    chosen = (block_of[None, None, None, :, None] == idx[..., None, :].long()).any(-1)  # [B, G, L, L]
    support = (chosen & visible).sum(-1).float()
    local = (block_of[None, :] == layout.own_local_block[:, None]) & visible  # [L, L]
    valid = layout.q_time >= 0
    assert stats["support_tokens"] == pytest.approx(float(support[..., valid].mean()))
    frac = support[..., valid] / visible.sum(-1)[valid].float()
    assert stats["support_frac"] == pytest.approx(float(frac.mean()))
    share = (chosen & local).sum(-1).float()[..., valid] / support[..., valid]
    assert stats["local_share"] == pytest.approx(float(share.mean()))


@pytest.mark.parametrize("phase", ["indexer_warmup", "sparse"])
def test_activation_checkpointing_gives_the_same_gradients(phase):
    batch = random_batch(2, 48, 16, 3, seed=4)
    grads = []
    for checkpointing in (False, True):
        model = small_model("msa", seed=1, activation_checkpointing=checkpointing, kl_row_stride=2).train()
        out = model(batch, phase)
        (out.quantiles.square().mean() + out.kl).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("settings, key", [({"block_size": 12}, "model.block_size"), ({"top_k": 5000}, "model.top_k"),
                                           ({"head_dim": 512}, "model.head_dim")])
def test_sizes_the_kernels_cannot_take_fail_at_model_build(settings, key):
    with pytest.raises(ModelConfigError, match=key):
        small_model("msa", **settings)
