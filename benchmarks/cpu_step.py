"""CPU training step of msa_small (sparse phase, reference ops) against dense_small (issue 9).

One step = forward, pinball loss (+ the KL loss for MSA), backward, AdamW update. The token count is
set by the number of variates (context 512 + horizon 24 = 34 patches per variate, like the default
data configs), so ~2K tokens = 60 variates and ~8K tokens = 240. Prints a table of median step times
per (tokens, threads) and the MSA / dense ratio.

    python benchmarks/cpu_step.py [--variates 60 240] [--threads 1 2] [--batch 8 2] [--steps 3]
"""
from __future__ import annotations

import argparse
import statistics
import time
from importlib import resources

import torch
from omegaconf import OmegaConf

from tsfm_msa import kernels
from tsfm_msa.kernels import reference
from tsfm_msa.model.transformer import PatchTransformer, pinball_loss
from tsfm_msa.train.optim import build_adamw

CONTEXT, HORIZON = 512, 24


def build_model(name: str, n_variates: int) -> PatchTransformer:
    """The ``configs/model/<name>.yaml`` model for ``n_variates`` target variates, one sensor group."""
    cfg = OmegaConf.to_container(OmegaConf.load(resources.files("tsfm_msa.configs") / "model" / f"{name}.yaml"))
    cfg.pop("_target_")
    cfg["max_variates"] = max(cfg["max_variates"], n_variates)
    return PatchTransformer(["target"] * n_variates, [0] * n_variates, ["all"], **cfg)


def random_batch(batch: int, n_variates: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "context": torch.randn(batch, CONTEXT, n_variates, generator=gen),
        "context_mask": torch.rand(batch, CONTEXT, n_variates, generator=gen) > 0.05,
        "horizon": torch.randn(batch, HORIZON, n_variates, generator=gen),
        "horizon_mask": torch.ones(batch, HORIZON, n_variates, dtype=torch.bool),
    }


def step_seconds(name: str, n_variates: int, batch_size: int, steps: int, seed: int = 0) -> tuple[float, float, int]:
    """Median wall and CPU (process) seconds of one training step, after one warm-up step, and the
    token count L. CPU time is the steadier figure on a machine shared with other jobs."""
    torch.manual_seed(seed)
    model = build_model(name, n_variates).train()
    optim = build_adamw(model, lr=1e-3, weight_decay=0.05, betas=(0.9, 0.95))
    batch = random_batch(batch_size, n_variates, torch.Generator().manual_seed(seed))
    seq_len = model.layout(CONTEXT, HORIZON, torch.device("cpu")).seq_len
    wall, cpu = [], []
    for _ in range(steps + 1):
        start, start_cpu = time.perf_counter(), time.process_time()
        out = model(batch, "sparse")
        truth = batch["horizon"].transpose(1, 2)
        loss = pinball_loss(out.quantiles, truth, batch["horizon_mask"].transpose(1, 2), model.quantile_levels)
        (loss + out.kl).backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall[1:]), statistics.median(cpu[1:]), seq_len


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variates", type=int, nargs="+", default=[60, 240])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 2],
                        help="batch size per --variates entry (the last one repeats)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=["dense_small", "msa_small"])
    parser.add_argument("--chunk-elements", type=int, default=None,
                        help="override kernels.reference.CHUNK_ELEMENTS (the references' per-chunk element budget)")
    args = parser.parse_args()
    kernels.set_backend("reference")
    if args.chunk_elements:
        reference.CHUNK_ELEMENTS = args.chunk_elements
    print(f"torch {torch.__version__}, context {CONTEXT}, horizon {HORIZON}, chunk budget {reference.CHUNK_ELEMENTS}, "
          f"median of {args.steps} steps after one warm-up")
    print(f"{'model':>12} {'variates':>8} {'tokens':>7} {'batch':>5} {'threads':>7} {'wall s':>8} {'cpu s':>8} "
          f"{'wall / dense':>12} {'cpu / dense':>11}")
    for i, n_variates in enumerate(args.variates):
        batch = args.batch[min(i, len(args.batch) - 1)]
        for threads in args.threads:
            torch.set_num_threads(threads)
            dense = None
            for name in args.models:
                wall, cpu, seq_len = step_seconds(name, n_variates, batch, args.steps)
                dense = (wall, cpu) if name == "dense_small" else dense
                ratios = f"{wall / dense[0]:>12.2f} {cpu / dense[1]:>11.2f}" if dense else f"{'':>12} {'':>11}"
                print(f"{name:>12} {n_variates:>8} {seq_len:>7} {batch:>5} {threads:>7} {wall:>8.2f} {cpu:>8.2f} {ratios}",
                      flush=True)


if __name__ == "__main__":
    main()
