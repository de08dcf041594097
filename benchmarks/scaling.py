"""Multi-GPU scaling of training: tokens/s and loss curves on 1 against N devices (Lightning DDP).

    python benchmarks/scaling.py --devices 2                  # on a machine with 2 GPUs (H200 x2)
    python benchmarks/scaling.py --smoke                      # CPU check: tiny model, gloo, seconds

For MSA and dense, at 32K- and 128K-token windows (synthetic multivariate series, the issue-8 model:
d_model 512, 2 layers, 16 query / 4 KV heads, head dim 64, blocks of 128, top-16, sparse phase),
it trains the same global batch on 1 device and on N devices (`trainer=ddp`) and records the median
step time after warm-up, global tokens/s, the speed-up N-vs-1, peak GPU memory and the loss curve
of each run. Results: benchmarks/results/<date>-h200x<N>-scaling.{json,md} (cpu-... in smoke mode).

Each configuration runs in its own process (`--one`), which Lightning's launcher re-runs once per
device; the main process only collects the JSON each run writes.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PATCH = 16


def _overrides(args: argparse.Namespace, attention: str, tokens: int, devices: int) -> list[str]:
    """Hydra overrides of `tsfm-msa train` for one configuration."""
    variates = args.variates
    per_device = max(1, args.global_batch // devices)
    model = ([f"model.{k}={v}" for k, v in dict(patch_len=4, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1,
                                                      head_dim=8, block_size=8, top_k=2, index_dim=8).items()]
             if args.smoke else
             [f"model.{k}={v}" for k, v in dict(patch_len=PATCH, d_model=512, n_layers=2, n_heads=16, n_kv_heads=4,
                                                      head_dim=64, block_size=128, top_k=16, index_dim=64).items()])
    patch = 4 if args.smoke else PATCH
    steps_per_window = tokens * patch // variates  # context + horizon, in time steps
    horizon = 4 * patch
    trainer = ["trainer=ddp", f"trainer.devices={devices}", f"trainer.max_steps={args.steps}",
               f"trainer.val_check_interval={args.steps}", "trainer.limit_val_batches=0", "trainer.log_every_n_steps=1",
               "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "trainer.callbacks.last=null",
               "trainer.callbacks.best=null", "+trainer.num_sanity_val_steps=0"]
    if args.smoke:
        trainer += ["trainer.accelerator=cpu", "trainer.precision=32-true"]
    return [
        f"model={'msa_small' if attention == 'msa' else 'dense_small'}", *model, f"model.max_variates={variates + 2}",
        "data=synthetic", f"data.context_len={steps_per_window - horizon}", f"data.horizon={horizon}",
        f"data.batch_size={per_device}", f"data.train_samples_per_epoch={args.steps * args.global_batch}",
        f"data.loader.length={2 * steps_per_window + 1000}", "data.loader.n_items=1",
        f"data.loader.n_past_covariates={variates - 2}", "data.loader.covariate_lag=0",
        "indexer_warmup.steps=0", "optim.warmup_steps=2", f"stats_every_n_steps={10 ** 9}", *trainer,
    ]


def run_one(args: argparse.Namespace) -> None:
    """One configuration, in every process of its DDP group; rank 0 writes the JSON."""
    import lightning as L
    import torch
    from hydra import compose, initialize_config_module

    from tsfm_msa.run_setup import build_module, build_trainer

    with initialize_config_module("tsfm_msa.configs", version_base=None):
        cfg = compose("train", overrides=_overrides(args, args.attention, args.tokens, args.devices) + ["seed=0"])
    L.seed_everything(0, workers=True)
    datamodule = __import__("hydra").utils.instantiate(cfg.data, _convert_="all")
    datamodule.setup("fit")
    module = build_module(cfg, cfg.model, datamodule, int(cfg.trainer.max_steps))
    timer = StepTimer(warmup=args.warmup)
    trainer = build_trainer(cfg, Path(args.run_dir))
    trainer.callbacks.append(timer)
    trainer.fit(module, datamodule=datamodule)
    if trainer.is_global_zero:
        seq_len = module.model.layout(int(cfg.data.context_len), int(cfg.data.horizon), "cpu").seq_len
        step_s = statistics.median(timer.step_seconds) if timer.step_seconds else float("nan")
        global_batch = int(cfg.data.batch_size) * trainer.world_size
        Path(args.out).write_text(json.dumps({
            "attention": args.attention, "tokens_per_window": seq_len, "devices": trainer.world_size,
            "global_batch": global_batch, "median_step_ms": 1e3 * step_s,
            "tokens_per_s": global_batch * seq_len / step_s,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
            "losses": timer.losses,
        }))


def _timer_class():
    import lightning as L
    import torch

    class StepTimer(L.Callback):
        """Wall time of each optimizer step after `warmup` steps (device synchronised), and the loss
        averaged over processes at every step."""

        def __init__(self, warmup: int) -> None:
            self.warmup, self.step_seconds, self.losses, self._start = warmup, [], [], 0.0

        def _sync(self) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self._sync()
            self._start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self._sync()
            if trainer.global_step > self.warmup:
                self.step_seconds.append(time.perf_counter() - self._start)
            loss = trainer.callback_metrics.get("train/loss")
            self.losses.append(float(loss) if loss is not None else float("nan"))

    return StepTimer


def StepTimer(warmup: int):  # noqa: N802 - built lazily so `--help` needs no torch
    return _timer_class()(warmup)


def _markdown(results: list[dict], meta: dict) -> str:
    lines = [f"# Training scaling, 1 vs {meta['devices']} devices ({meta['device_name']}, {meta['date']})", "",
             f"Global batch {meta['global_batch']} windows at every device count (DDP, bf16 on GPU); "
             f"{meta['steps']} steps, median step after {meta['warmup']} warm-up steps.", "",
             "| attention | tokens/window | devices | step ms | tokens/s | speed-up | peak GiB | last loss |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['attention']} | {r['tokens']} | {r['devices']} | failed: {r['error'][:80]} | | | | |")
            continue
        mem = f"{r['peak_memory_gib']:.1f}" if r.get("peak_memory_gib") is not None else "n/a"
        speed = f"{r['speedup']:.2f}x" if r.get("speedup") else ""
        lines.append(f"| {r['attention']} | {r['tokens_per_window']} | {r['devices']} | {r['median_step_ms']:.1f} | "
                     f"{r['tokens_per_s']:.0f} | {speed} | {mem} | {r['losses'][-1]:.4f} |")
    lines += ["", "Loss curves (loss per step, averaged over processes) are in the JSON file.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=2, help="N: compared with 1 device")
    parser.add_argument("--tokens", type=int, nargs="+", default=[32768, 131072], help="tokens per window")
    parser.add_argument("--attention", nargs="+", default=["msa", "dense"])
    parser.add_argument("--variates", type=int, default=32)
    parser.add_argument("--global-batch", type=int, default=None, help="windows per step (default: N)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="CPU check: tiny model and windows, gloo")
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.global_batch = args.global_batch or args.devices
    if args.one:
        args.attention, args.tokens = args.attention[0], args.tokens[0]
        return run_one(args)
    if args.smoke:
        args.tokens, args.variates, args.steps, args.warmup = [512], 4, 6, 2

    import torch

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for attention in args.attention:
            for tokens in args.tokens:
                base = None
                for devices in sorted({1, args.devices}):
                    out = Path(tmp) / f"{attention}-{tokens}-{devices}.json"
                    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", "--attention", attention, "--tokens",
                           str(tokens), "--devices", str(devices), "--variates", str(args.variates), "--global-batch",
                           str(args.global_batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
                           "--run-dir", str(Path(tmp) / out.stem), "--out", str(out)] + (["--smoke"] if args.smoke else [])
                    print("running", attention, tokens, "tokens,", devices, "device(s)", flush=True)
                    proc = subprocess.run(cmd, capture_output=True, text=True)
                    if proc.returncode != 0 or not out.exists():
                        results.append({"attention": attention, "tokens": tokens, "devices": devices,
                                        "error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] and
                                        (proc.stderr or proc.stdout).strip().splitlines()[-1]})
                        continue
                    result = json.loads(out.read_text())
                    base = result["tokens_per_s"] if devices == 1 else base
                    result["speedup"] = result["tokens_per_s"] / base if base and devices > 1 else None
                    results.append(result)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    date = _dt.date.today().isoformat()
    meta = {"date": date, "devices": args.devices, "device_name": gpu, "global_batch": args.global_batch,
            "steps": args.steps, "warmup": args.warmup, "smoke": args.smoke, "torch": torch.__version__,
            "command": " ".join(sys.argv)}
    stem = f"{date}-{'cpu-smoke' if args.smoke else 'h200'}x{args.devices}-scaling"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    (args.out_dir / f"{stem}.md").write_text(_markdown(results, meta))
    print(_markdown(results, meta))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
