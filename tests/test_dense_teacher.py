"""`dense_teacher_kl`: the sparse phase's index loss against each MSA layer's dense attention
(ForecastModule option, `tsfm-msa train|evaluate|convert dense_teacher_kl=...`)."""
from __future__ import annotations

import csv
import math
import os

import lightning as L
import pytest
import torch
from helpers import ROLES3, random_batch
from torch.utils.data import DataLoader

from tsfm_msa.cli import main
from tsfm_msa.model.attention import MSAAttention
from tsfm_msa.model.transformer import pinball_loss
from tsfm_msa.train.lightning_module import ForecastModule, TrainConfigError, dense_teacher_weight

CONTEXT, HORIZON = 48, 8
TINY = {"attention": "msa", "patch_len": 8, "d_model": 16, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
        "head_dim": 8, "block_size": 4, "top_k": 2, "index_dim": 8}
SCHEMA = {"variates": [{"name": f"v{i}", "role": role, "group": "g"} for i, role in enumerate(ROLES3)], "freq": "h"}
# The CLI on the synthetic data, small and fast (as in test_train.py).
FAST = ["data=synthetic", "data.context_len=64", "data.horizon=16", "data.batch_size=8",
        "data.train_samples_per_epoch=32", "data.loader.length=400", "data.loader.n_items=1",
        "model.patch_len=8", "model.d_model=16", "model.n_layers=1", "model.top_k=2",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


def _first_step(weight: float | None, warmup_steps: int = 0, seed: int = 0) -> tuple[torch.Tensor, dict, ForecastModule]:
    """(loss, gradients by parameter name, module) of one training step from the same initial
    weights on the same fresh random batch."""
    batch = random_batch(4, CONTEXT, HORIZON, len(ROLES3), seed=seed + 1)
    torch.manual_seed(seed)
    module = ForecastModule(TINY, SCHEMA, CONTEXT, HORIZON, indexer_warmup={"steps": warmup_steps}, max_steps=1,
                            dense_teacher_kl=weight)
    found: dict = {}

    class Grab(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            found["grads"] = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            found["loss"] = outputs["loss"].detach().clone()

    L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
              callbacks=[Grab()]).fit(module, train_dataloaders=DataLoader([batch], batch_size=None))
    return found["loss"], found["grads"], module


def test_off_is_todays_loss_bit_for_bit_and_computes_nothing(monkeypatch):
    calls = []
    original = MSAAttention.dense_index_loss
    monkeypatch.setattr(MSAAttention, "dense_index_loss", lambda self, *a: calls.append(1) or original(self, *a))
    loss_none, grads_none, _ = _first_step(None)
    loss_zero, grads_zero, _ = _first_step(0.0)
    assert not calls  # off: the sparse phase never calls the dense teacher
    # Today's loss, written out: pinball + kl_weight * KL, from the same weights on the same batch.
    batch = random_batch(4, CONTEXT, HORIZON, len(ROLES3), seed=1)
    torch.manual_seed(0)
    fresh = ForecastModule(TINY, SCHEMA, CONTEXT, HORIZON, indexer_warmup={"steps": 0}).train()
    out = fresh.model(batch, "sparse")
    targets = fresh.model.target_index
    today = pinball_loss(out.quantiles, batch["horizon"][..., targets].transpose(1, 2),
                         batch["horizon_mask"][..., targets].transpose(1, 2), fresh.model.quantile_levels) + out.kl
    assert out.dense_kl is None
    assert torch.equal(loss_none, today.detach()) and torch.equal(loss_zero, loss_none)
    assert grads_none.keys() == grads_zero.keys() and all(torch.equal(grads_none[n], grads_zero[n]) for n in grads_none)


def test_sparse_phase_adds_weight_times_the_dense_index_loss_and_moves_only_the_indexer():
    loss_off, grads_off, _ = _first_step(0.0)
    loss_on, grads_on, _ = _first_step(5.0)
    # The added term: 5 x the mean over layers of each layer's dense index loss on its own q, k, qi, ki.
    batch = random_batch(4, CONTEXT, HORIZON, len(ROLES3), seed=1)
    torch.manual_seed(0)
    fresh = ForecastModule(TINY, SCHEMA, CONTEXT, HORIZON, indexer_warmup={"steps": 0}, dense_teacher_kl=5.0).train()
    out = fresh.model(batch, "sparse")
    assert out.dense_kl is not None and float(out.dense_kl) > 0
    assert len([a for a in out.aux if a.dense_kl is not None]) == TINY["n_layers"]
    torch.testing.assert_close(loss_on, loss_off + 5.0 * out.dense_kl.detach(), rtol=1e-6, atol=1e-6)
    assert grads_off.keys() == grads_on.keys()
    index = [n for n in grads_off if ".index_q." in n or ".index_k." in n]
    assert index and len(index) < len(grads_off)
    assert all(torch.equal(grads_off[n], grads_on[n]) for n in grads_off if n not in index)
    assert all(not torch.allclose(grads_off[n], grads_on[n]) for n in index)


def test_warmup_and_inference_are_unchanged():
    # The warmup already trains on the dense teacher: the option adds nothing there.
    loss_off, grads_off, _ = _first_step(0.0, warmup_steps=1)
    loss_on, grads_on, module = _first_step(3.0, warmup_steps=1)
    assert torch.equal(loss_off, loss_on) and all(torch.equal(grads_off[n], grads_on[n]) for n in grads_off)
    batch = random_batch(2, CONTEXT, HORIZON, len(ROLES3), seed=5)
    module.eval()
    with torch.no_grad():
        assert module.model(batch, "sparse").dense_kl is None  # validation / forecasting: not computed
    module.train()
    assert module.model(batch, "predict").dense_kl is None


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), "3", True])
def test_bad_weights_are_refused_in_one_line(bad):
    with pytest.raises(TrainConfigError, match=r"^dense_teacher_kl must be a non-negative number or null") as err:
        ForecastModule(TINY, SCHEMA, CONTEXT, HORIZON, dense_teacher_kl=bad)
    assert "\n" not in str(err.value)
    with pytest.raises(TrainConfigError, match="train.dense_teacher_kl"):
        dense_teacher_weight(bad, "train.dense_teacher_kl")
    assert dense_teacher_weight(None) == 0.0 and dense_teacher_weight(3) == 3.0


def _metric_rows(path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_cli_train_logs_the_dense_teacher_loss_in_sparse_steps(tmp_path, capsys):
    run_dir = tmp_path / "run"
    main(["train", *FAST, "dense_teacher_kl=3", "trainer.max_steps=3", "trainer.val_check_interval=3",
          "indexer_warmup.steps=1", "trainer.log_every_n_steps=1", f"hydra.run.dir={run_dir}"])
    rows = _metric_rows(run_dir / "logs" / "metrics.csv")
    logged = {int(r["step"]): float(r["train/dense_teacher_kl"]) for r in rows if r.get("train/dense_teacher_kl")}
    assert sorted(logged) == [1, 2]  # the sparse steps only (step 0 is the warmup)
    assert all(math.isfinite(v) and v > 0 for v in logged.values())
    module = ForecastModule.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert module.dense_teacher_kl == 3.0  # kept in the checkpoint's hyper-parameters


def test_cli_names_the_key_of_a_bad_weight(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", *FAST, "dense_teacher_kl=-2", f"hydra.run.dir={tmp_path}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "dense_teacher_kl must be a non-negative number or null" in err and "Traceback" not in err


def test_evaluate_and_convert_configs_pass_the_weight_to_the_module():
    from hydra import compose, initialize_config_module

    from tsfm_msa.datasets import SeriesDataModule, make_synthetic
    from tsfm_msa.run_setup import build_module

    frames = make_synthetic(n_items=1, length=300, seed=3)
    datamodule = SeriesDataModule(frames=frames, context_len=64, horizon=16, batch_size=4)
    with initialize_config_module("tsfm_msa.configs", version_base=None):
        for name, extra in (("evaluate", []), ("convert", ["init_from=unused.ckpt"]), ("train", [])):
            default = compose(name, overrides=["data=synthetic", "data.context_len=64", "data.horizon=16", *extra])
            assert default.dense_teacher_kl is None  # off unless asked for
            cfg = compose(name, overrides=["data=synthetic", "data.context_len=64", "data.horizon=16",
                                           "dense_teacher_kl=3", *extra])
            model_cfg = cfg.models.msa if name == "evaluate" else cfg.model
            module = build_module(cfg, model_cfg, datamodule, 10)
            assert module.dense_teacher_kl == 3.0
            assert all(m.dense_teacher for m in module.model.modules() if isinstance(m, MSAAttention))


def _teacher_grads(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    """The mean dense index loss of a sparse training forward and its gradient per parameter."""
    for layer in model.modules():
        if isinstance(layer, MSAAttention):
            layer.dense_teacher = True
    out = model.train()(batch, "sparse")
    names, params = zip(*model.named_parameters())
    grads = torch.autograd.grad(out.dense_kl, params, allow_unused=True)
    return out.dense_kl.detach(), dict(zip(names, grads))


def _assert_only_index_grads(grads: dict[str, torch.Tensor | None]) -> None:
    index = [n for n in grads if ".index_q." in n or ".index_k." in n]
    assert index and all(grads[n] is not None and grads[n].abs().sum() > 0 for n in index)
    assert all(g is None or not g.any() for n, g in grads.items() if n not in index)


def test_activation_checkpointing_gives_the_same_dense_teacher_loss_and_gradients():
    from helpers import small_model

    batch = random_batch(2, 64, 16, len(ROLES3), seed=4)
    loss, grads = _teacher_grads(small_model(seed=3), batch)
    loss_ckpt, grads_ckpt = _teacher_grads(small_model(seed=3, activation_checkpointing=True), batch)
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=0)
    _assert_only_index_grads(grads)
    for name, grad in grads.items():
        if grad is not None:
            torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-6, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs CUDA (and no Triton interpreter)")
def test_dense_teacher_on_cuda_in_bf16_at_a_long_window_reaches_only_the_indexer():
    from tsfm_msa.model.transformer import PatchTransformer

    torch.manual_seed(0)
    model = PatchTransformer(ROLES3, [0, 1, 2], ["target", "past", "future"], patch_len=16, d_model=128, n_layers=2,
                             n_heads=6, n_kv_heads=3, head_dim=64, block_size=64, top_k=4, index_dim=64,
                             activation_checkpointing=True).cuda()
    # 3 x (16384 + 256) / 16 = 3120 tokens: beyond 2048, so the strided rows (Flex teacher) are taken.
    batch = {k: v.cuda() for k, v in random_batch(2, 16384, 256, len(ROLES3), seed=2).items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, grads = _teacher_grads(model, batch)
    assert torch.isfinite(loss) and float(loss) > 0
    _assert_only_index_grads(grads)
