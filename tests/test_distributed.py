"""Several processes at an equal global batch: data sharding, the token-based warmup switch, losses and
statistics averaged over processes (a real two-process DDP run over gloo), and the DDP/FSDP configs."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from tsfm_msa.datasets import SeriesDataModule, make_synthetic
from tsfm_msa.datasets.datamodule import ResumableDataLoader, WindowSampler

TESTS = Path(__file__).resolve().parent


def _datamodule(batch_size: int, seed: int = 5) -> SeriesDataModule:
    frames = make_synthetic(n_items=2, length=500, seed=seed)
    return SeriesDataModule(frames=frames, context_len=48, horizon=12, train_samples_per_epoch=40,
                            batch_size=batch_size, seed=seed)


def _loader(dm: SeriesDataModule, replicas: int, rank: int, batch_size: int) -> ResumableDataLoader:
    ds = dm.dataset("train")
    return ResumableDataLoader(ds, WindowSampler(ds, seed=dm.seed, num_replicas=replicas, rank=rank),
                               batch_size=batch_size)


def _keys(batch: dict[str, torch.Tensor]) -> list[tuple[int, int]]:
    return list(zip(batch["item_index"].tolist(), batch["origin"].tolist()))


@pytest.mark.parametrize("mode_samples", [40, None])  # random draws; every rolling window, shuffled
def test_shards_differ_and_together_equal_one_process_batches(mode_samples):
    frames = make_synthetic(n_items=2, length=300, seed=11)
    dm = SeriesDataModule(frames=frames, context_len=48, horizon=12, train_samples_per_epoch=mode_samples,
                          train_stride=4, batch_size=8, seed=11)
    one = _loader(dm, 1, 0, 8)
    shards = [_loader(dm, 2, r, 4) for r in range(2)]
    for epoch in (0, 1):
        for loader in (one, *shards):
            loader.sampler.set_epoch(epoch)
        positions = [list(iter(s.sampler)) for s in shards]
        assert not set(positions[0]) & set(positions[1])  # every process its own windows
        assert sorted(positions[0] + positions[1]) == sorted(iter(one.sampler))  # together: the one-process set
        for loader in (one, *shards):
            loader.sampler.set_epoch(epoch)
        for full, part0, part1 in zip(one, *shards):  # step by step: the same global batch
            assert sorted(_keys(full)) == sorted(_keys(part0) + _keys(part1))


def test_data_position_resumes_on_another_process_count():
    dm = _datamodule(batch_size=4)
    two = [_loader(dm, 2, r, 4) for r in range(2)]
    iterators = [iter(loader) for loader in two]
    for _ in range(3):  # three global batches of 8 on two processes
        for it in iterators:
            next(it)
    state = two[0].state_dict()
    assert state["position"] == 24 and state == two[1].state_dict()
    expected = [next(it) for it in iterators]  # what the two processes would train on next
    one = _loader(dm, 1, 0, 8)
    one.load_state_dict(state)
    one.sampler.set_epoch(state["epoch"])  # Lightning calls set_epoch before iterating
    resumed = next(iter(one))
    assert sorted(_keys(resumed)) == sorted(_keys(expected[0]) + _keys(expected[1]))
    assert one.state_dict()["position"] == 32


def test_fsdp_config_wraps_per_block_with_index_projections_inside():
    from lightning.pytorch.plugins.precision import FSDPPrecision
    from lightning.pytorch.strategies import FSDPStrategy
    from hydra.utils import instantiate

    from tsfm_msa.model.transformer import Block
    from helpers import small_model

    with initialize_config_module("tsfm_msa.configs", version_base=None):
        cfg = compose("train", overrides=["trainer=fsdp", "trainer.devices=2", "trainer.num_nodes=3"])
    assert cfg.trainer.devices == 2 and cfg.trainer.num_nodes == 3 and cfg.trainer._target_ == "lightning.Trainer"
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy) and strategy._state_dict_type == "full"  # consolidated: any device count
    assert FSDPPrecision(cfg.trainer.precision).mixed_precision_config.param_dtype == torch.bfloat16
    model = small_model(attention="msa")
    wrapped = strategy.kwargs["auto_wrap_policy"]._run_policy(model, set(), {})
    units = [m for m in wrapped if m is not model]
    assert units and all(isinstance(m, Block) for m in units) and len(units) == len(model.layers)
    for unit in units:  # each layer's index projections live inside its FSDP unit
        names = {n for n, _ in unit.named_parameters()}
        assert any("index_q" in n for n in names) and any("index_k" in n for n in names)


def _cli(run_dir: Path, args: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "tsfm_msa.cli", "train", *args, f"hydra.run.dir={run_dir}"],
                          env=env, cwd=run_dir.parent, capture_output=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr).decode()[-4000:]


def _logged(run_dir: Path, key: str) -> dict[int, float]:
    with open(run_dir / "logs" / "metrics.csv") as fh:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(fh) if r.get(key)}


def test_two_process_ddp_on_gloo_matches_one_process_at_equal_global_batch(tmp_path):
    from tsfm_msa.train.lightning_module import ForecastModule

    steps, batch = 10, 8
    model = ["model.patch_len=8", "model.d_model=32", "model.n_layers=1", "model.top_k=2", "model.n_heads=2",
             "model.n_kv_heads=1", "model.head_dim=8", "model.index_dim=8"]
    schema = make_synthetic(n_items=1, length=600, seed=0)[0].schema.to_dict()
    tiny = ForecastModule({"attention": "msa", "patch_len": 8, "d_model": 32, "n_layers": 1, "top_k": 2, "n_heads": 2,
                           "n_kv_heads": 1, "head_dim": 8, "index_dim": 8, "block_size": 8}, schema, 64, 16)
    tokens_per_step = batch * tiny.model.layout(64, 16, "cpu").seq_len
    common = ["data=synthetic", "data.context_len=64", "data.horizon=16", "data.train_samples_per_epoch=64",
              "data.loader.length=600", "data.loader.n_items=1", *model, "optim.warmup_steps=2",
              # Token-based switch after 5 global steps: each process must count all processes' tokens.
              "indexer_warmup.steps=null", f"indexer_warmup.tokens={5 * tokens_per_step}",
              f"trainer.max_steps={steps}", "trainer.val_check_interval=5", "trainer.limit_val_batches=2",
              "trainer.log_every_n_steps=1", "stats_every_n_steps=2", "trainer.enable_progress_bar=false",
              "trainer.enable_model_summary=false"]
    one, two = tmp_path / "one", tmp_path / "two"
    _cli(one, [*common, f"data.batch_size={batch}"])
    _cli(two, [*common, f"data.batch_size={batch // 2}", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
               "trainer.precision=32-true"])
    for key, rel in (("train/loss", 1e-4), ("train/kl", 1e-3), ("train/sparse_phase", 0)):
        ref, got = _logged(one, key), _logged(two, key)
        assert sorted(got) == list(range(steps)), (key, sorted(got))
        for step in range(steps):
            assert got[step] == pytest.approx(ref[step], rel=rel, abs=1e-6), (key, step, got[step], ref[step])
    assert [_logged(two, "train/sparse_phase")[s] for s in range(steps)] == [0.0] * 5 + [1.0] * 5
    # Selection statistics: only on logging steps (every 2nd), averaged over both processes.
    ref, got = _logged(one, "train/support_frac"), _logged(two, "train/support_frac")
    assert sorted(ref) == sorted(got) == [s for s in range(5, steps) if (s + 1) % 2 == 0]
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fsdp_trains_in_bf16_and_resumes_with_another_strategy(tmp_path):
    """FSDP (one unit per block, bf16) takes steps and writes a consolidated checkpoint that a plain
    one-GPU run resumes from."""
    from tsfm_msa.cli import main

    common = ["data=synthetic", "data.context_len=256", "data.horizon=32", "data.batch_size=4",
              "data.train_samples_per_epoch=64", "trainer.val_check_interval=4", "trainer.limit_val_batches=1",
              "trainer.callbacks.last.every_n_train_steps=4", "trainer.enable_progress_bar=false", "indexer_warmup.steps=2"]
    main(["train", *common, "trainer=fsdp", "trainer.devices=1", "trainer.max_steps=4", f"hydra.run.dir={tmp_path / 'fsdp'}"])
    ckpt = tmp_path / "fsdp" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file() and torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == 4
    main(["train", *common, "trainer=gpu", "trainer.max_steps=6", f"resume={ckpt}", f"hydra.run.dir={tmp_path / 'gpu'}"])
    resumed = torch.load(tmp_path / "gpu" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert resumed["global_step"] == 6
