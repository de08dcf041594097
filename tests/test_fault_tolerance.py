"""Training survives SIGKILL: a real `tsfm-msa train` subprocess is killed mid-epoch, resumed, killed
again in the middle of writing a checkpoint, and resumed once more; the resumed loss curve, learning
rates, warmup phase and final weights equal those of an uninterrupted run with the same seed."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tsfm_msa.datasets import make_synthetic
from tsfm_msa.train.lightning_module import ForecastModule

TESTS = Path(__file__).resolve().parent
CONTEXT, HORIZON, BATCH = 64, 16, 8
TINY = {"_target_": "tsfm_msa.model.transformer.PatchTransformer", "attention": "msa", "patch_len": 8, "d_model": 32,
        "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "head_dim": 8, "block_size": 8, "top_k": 2, "index_dim": 8,
        "dropout": 0.1}  # dropout: the RNG state must resume too
MAX_STEPS, EVERY, STEPS_PER_EPOCH = 24, 4, 6


def _overrides(warmup_tokens: int) -> list[str]:
    model = [f"model.{k}={v}" for k, v in TINY.items() if k != "_target_"]
    return [
        "data=synthetic", f"data.context_len={CONTEXT}", f"data.horizon={HORIZON}", f"data.batch_size={BATCH}",
        f"data.train_samples_per_epoch={STEPS_PER_EPOCH * BATCH}", "data.loader.length=600", "data.loader.n_items=1",
        *model, "seed=3", "optim.warmup_steps=3",
        # The switch to sparse is by training tokens, in the middle of the run: the counter must resume.
        "indexer_warmup.steps=null", f"indexer_warmup.tokens={warmup_tokens}",
        f"trainer.max_steps={MAX_STEPS}", f"trainer.callbacks.last.every_n_train_steps={EVERY}",
        "trainer.val_check_interval=8", "trainer.limit_val_batches=2", "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
    ]


def _tokens_per_step() -> int:
    schema = make_synthetic(n_items=1, length=600, seed=3)[0].schema.to_dict()
    module = ForecastModule(TINY, schema, CONTEXT, HORIZON)
    return BATCH * module.model.layout(CONTEXT, HORIZON, "cpu").seq_len


def _start(run_dir: Path, args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "tsfm_msa.cli", "train", *args, f"hydra.run.dir={run_dir}"]
    return subprocess.Popen(cmd, env=env, cwd=run_dir.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _run(run_dir: Path, args: list[str]) -> None:
    proc = _start(run_dir, args)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out.decode()[-3000:]


def _kill_when_frozen(run_dir: Path, args: list[str], step: int, during_save: bool) -> None:
    marker = run_dir.parent / f"{run_dir.name}.frozen"
    proc = _start(run_dir, [*args, "+trainer.callbacks.freeze._target_=fault_injection.FreezeAt",
                            f"+trainer.callbacks.freeze.step={step}", f"+trainer.callbacks.freeze.marker={marker}",
                            f"+trainer.callbacks.freeze.during_save={during_save}"])
    deadline = time.monotonic() + 600
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"training ended before the kill point: {proc.stdout.read().decode()[-3000:]}")
        assert time.monotonic() < deadline, "training never reached the kill point"
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL


def _curve(run_dir: Path) -> dict[int, dict[str, float]]:
    """step -> the training values logged at that step (loss, lr, phase)."""
    rows: dict[int, dict[str, float]] = {}
    with open(run_dir / "logs" / "metrics.csv") as fh:
        for row in csv.DictReader(fh):
            for key in ("train/loss", "lr-AdamW", "train/sparse_phase"):
                if row.get(key):
                    rows.setdefault(int(row["step"]), {})[key] = float(row[key])
    return rows


def _step_of(ckpt: Path) -> int:
    return int(torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"])


def test_sigkill_mid_epoch_and_during_save_then_resume_matches_uninterrupted(tmp_path):
    tokens_per_step = _tokens_per_step()
    args = _overrides(warmup_tokens=11 * tokens_per_step)  # sparse from the 12th step on
    straight, first, second, final = (tmp_path / n for n in ("straight", "first", "second", "final"))
    _run(straight, args)

    # Killed mid-epoch (epoch 2 of 6-step epochs), one step after the checkpoint of step 8.
    _kill_when_frozen(first, args, step=9, during_save=False)
    assert _step_of(first / "checkpoints" / "last.ckpt") == 8

    # Resumed from that run folder, then killed while half of the step-16 checkpoint was written.
    _kill_when_frozen(second, [*args, f"resume={first}"], step=16, during_save=True)
    ckpt_dir = second / "checkpoints"
    partial = list(ckpt_dir.glob(".last.ckpt.*.tmp"))
    assert partial and partial[0].stat().st_size > 0, "the kill did not happen during the checkpoint write"
    assert _step_of(ckpt_dir / "last.ckpt") == 12  # the previous checkpoint, intact and loadable

    # Resumed again, this time from an epoch's end (12 steps = two 6-step epochs), to the end.
    _run(final, [*args, f"resume={ckpt_dir / 'last.ckpt'}"])

    reference, resumed = _curve(straight), _curve(final)
    steps = sorted(resumed)
    assert steps == list(range(12, MAX_STEPS)), steps  # logged steps 12..23: the run went on from step 12
    phases = [reference[s]["train/sparse_phase"] for s in range(MAX_STEPS)]
    assert 0.0 in phases and 1.0 in phases  # the switch happened inside the run
    for step in steps:
        for key, value in resumed[step].items():
            assert value == pytest.approx(reference[step][key], rel=1e-5, abs=1e-7), (step, key)
    ours = torch.load(final / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    theirs = torch.load(straight / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ours["global_step"] == theirs["global_step"] == MAX_STEPS
    for name, tensor in theirs["state_dict"].items():
        torch.testing.assert_close(ours["state_dict"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)
