"""Where a training step's time goes at long context: host (launch) time against GPU busy time.

The model and step of train_step.py (d_model 512, 2 layers, 16 / 4 heads, blocks of 128, top-16,
batch 1, bf16 autocast, AdamW). For each length and attention (MSA sparse phase, dense Flex): the
host time of one step without a sync, its wall time with one, and from a torch.profiler trace of
three steps the GPU busy time per step, kernel launches per step and the kernels that take the most
time. A step whose host time is close to its wall time is bound by the Python/launch side.

    python benchmarks/profile_step.py --lengths 8k,32k --out /tmp/prof    # CUDA only

Writes profile_step.json (and the chrome traces with --traces).
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_step as ts  # noqa: E402  (the same model, batch and step)


def gpu_kernels(prof, steps: int) -> dict:
    """GPU busy ms per step, launches per step and the top kernels (ms per step) from the trace."""
    busy: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            busy[event.name[:80]] += event.device_time_total
            count[event.name[:80]] += 1
    return {"gpu_busy_ms": sum(busy.values()) / steps / 1e3,
            "kernels_per_step": sum(count.values()) / steps,
            "top": [{"kernel": name, "ms": us / steps / 1e3, "per_step": count[name] / steps}
                    for name, us in busy.most_common(15)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="8k,32k")
    parser.add_argument("--out", default="/tmp/profile_step")
    parser.add_argument("--traces", action="store_true", help="also write the chrome traces")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_step.py needs a CUDA GPU")
    device, out, steps = torch.device("cuda"), Path(args.out), 3
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for tokens in map(ts.parse_length, args.lengths.split(",")):
        for kind in ("msa", "dense"):
            step, _ = ts.build_step(kind, "sparse", ts.context_for(tokens), device)
            for _ in range(3):  # compile and allocator warm-up
                step()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            host = time.perf_counter() - t0
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(steps):
                    step()
                torch.cuda.synchronize()
            name = f"{kind}_{tokens}"
            results[name] = {"tokens": tokens, "host_ms": host * 1e3, "wall_ms": wall * 1e3, **gpu_kernels(prof, steps)}
            r = results[name]
            print(f"{name}: host {r['host_ms']:.1f} ms, wall {r['wall_ms']:.1f} ms, GPU busy {r['gpu_busy_ms']:.1f} ms, "
                  f"{r['kernels_per_step']:.0f} kernels per step", flush=True)
            if args.traces:
                prof.export_chrome_trace(str(out / f"trace_{name}.json"))
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    (out / "profile_step.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))


if __name__ == "__main__":
    main()
