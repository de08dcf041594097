"""One training step of the project's model at long context: dense (Flex) vs MSA sparse vs MSA warmup.

Model (issue 8): d_model 512, 2 layers, 16 query / 4 KV heads, head dim 64, index dim 64, blocks of
128 tokens, top-16 blocks, MLP ratio 4, quantile head; batch 1, bf16 autocast, AdamW. The windows
are synthetic multivariate series: 16 variates in 4 sensor groups (a target and three past
covariates each), patches of 16 steps, sized to 8K ... 512K tokens. For each length and contender:
median ms per step (forward + backward + optimizer), tokens/s and peak GPU memory. Also the
host-side layout build time and peak host memory at 128K and 1M tokens.

    python benchmarks/train_step.py                      # all lengths, writes benchmarks/results/
    python benchmarks/train_step.py --lengths 8k,32k --out /tmp/res

Needs torch (+ triton on CUDA) and the project installed; no hydra, gluonts or pandas.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from tsfm_msa.model.transformer import PatchTransformer, pinball_loss

N_GROUPS, PER_GROUP, PATCH = 4, 4, 16
ROLES = (["target"] + ["past_covariate"] * (PER_GROUP - 1)) * N_GROUPS
GROUPS = [v // PER_GROUP for v in range(N_GROUPS * PER_GROUP)]
NAMES = [f"sensors{g}" for g in range(N_GROUPS)]
HORIZON = 64
MODEL = dict(patch_len=PATCH, d_model=512, n_layers=2, n_heads=16, n_kv_heads=4, head_dim=64, mlp_ratio=4.0,
             block_size=128, top_k=16, index_dim=64, group_policy="free")
CONTENDERS = {  # name: (attention kind, phase)
    "dense_flex": ("dense", "sparse"),
    "msa_sparse": ("msa", "sparse"),
    "msa_warmup": ("msa", "indexer_warmup"),
}


def parse_length(text: str) -> int:
    text = text.strip().lower()
    scale = {"k": 1024, "m": 1024 * 1024}.get(text[-1], 1)
    return int(float(text.rstrip("km")) * scale)


def context_for(tokens: int) -> int:
    """Context steps whose window has about ``tokens`` tokens (every variate one token per patch)."""
    n_var = len(ROLES)
    horizon_tokens = N_GROUPS * -(-HORIZON // PATCH)  # only targets continue into the horizon here
    return max(PATCH, (tokens - horizon_tokens) // n_var * PATCH)


INPUTS = ("noise", "seasonal")


def seasonal_series(steps: int, n_var: int, g: torch.Generator) -> torch.Tensor:
    """``[steps, n_var]``: a daily and a weekly cycle (96 and 672 steps, 15-minute data) with a random
    amplitude and phase per variate, plus noise at a tenth of the cycles' size: sensor-like input whose
    neighbouring patches look alike, as on real series (white noise makes every token unlike its
    neighbours, so an untrained indexer's choices differ from query to query)."""
    t = torch.arange(steps, dtype=torch.float32)[:, None]  # [T, 1]
    amp = 0.5 + torch.rand(2, n_var, generator=g)  # [2, V]
    phase = 2 * torch.pi * torch.rand(2, n_var, generator=g)
    daily = amp[0] * torch.sin(2 * torch.pi * t / 96 + phase[0])
    weekly = amp[1] * torch.sin(2 * torch.pi * t / 672 + phase[1])
    return daily + weekly + 0.1 * torch.randn(steps, n_var, generator=g)


def random_batch(context: int, device: torch.device, inputs: str = "noise") -> dict[str, torch.Tensor]:
    """One window ``[1, steps, variates]``: white noise, or :func:`seasonal_series` (``inputs``)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    n_var = len(ROLES)
    if inputs == "noise":
        series = torch.randn(context + HORIZON, n_var, generator=g)
    elif inputs == "seasonal":
        series = seasonal_series(context + HORIZON, n_var, g)
    else:
        raise ValueError(f"--inputs must be one of {INPUTS}, got {inputs!r}")
    batch = {
        "context": series[None, :context],
        "context_mask": torch.ones(1, context, n_var, dtype=torch.bool),
        "horizon": series[None, context:],
        "horizon_mask": torch.ones(1, HORIZON, n_var, dtype=torch.bool),
    }
    return {k: v.to(device) for k, v in batch.items()}


def build_step(kind: str, phase: str, context: int, device: torch.device, inputs: str = "noise"):
    """``(step, layout)``: one training step (forward in ``phase``, backward, AdamW) of the benchmark
    model on a fixed random batch; ``step()`` returns the loss."""
    torch.manual_seed(0)
    model = PatchTransformer(ROLES, GROUPS, NAMES, attention=kind, **MODEL).to(device).train()
    for layer in model.layers:  # statistics are a logging concern, off in a timed step
        if hasattr(layer.attention, "collect_stats"):
            layer.attention.collect_stats = False
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    batch = random_batch(context, device, inputs)
    layout = model.layout(context, HORIZON, device)
    targets = model.target_index
    truth = batch["horizon"][..., targets].transpose(1, 2)
    observed = batch["horizon_mask"][..., targets].transpose(1, 2)

    def step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(batch, phase)
            loss = pinball_loss(out.quantiles.float(), truth, observed, model.quantile_levels) + out.kl
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step, layout


def time_steps(kind: str, phase: str, context: int, reps: int, device: torch.device, inputs: str = "noise") -> dict:
    step, layout = build_step(kind, phase, context, device, inputs)
    for _ in range(2):  # compile (Flex, Triton) and allocator warm-up
        loss = step()
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{kind}/{phase} at {layout.seq_len} tokens: non-finite loss")
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            stop.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(stop))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    ms = times[len(times) // 2]
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"tokens": layout.seq_len, "ms_per_step": ms, "ms_all": times, "tokens_per_s": layout.seq_len / ms * 1e3,
            "peak_gib": peak}


def op_breakdown(context: int, device: torch.device, reps: int = 5, inputs: str = "noise") -> dict:
    """Milliseconds of each MSA op of one layer (forward + backward where it has one) on the real
    layer inputs of a sparse step, next to the whole dense-attention call of the same layer."""
    from tsfm_msa import kernels
    from tsfm_msa.model.attention import batch_times
    from tsfm_msa.model.dense_attention import time_masked_attention

    torch.manual_seed(0)
    model = PatchTransformer(ROLES, GROUPS, NAMES, attention="msa", **MODEL).to(device).train()
    layer = model.layers[0].attention
    batch = random_batch(context, device, inputs)
    layout = model.layout(context, HORIZON, device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        from tsfm_msa.tokens import patch_tokens

        values, mask = patch_tokens(batch["context"], batch["context_mask"], batch["horizon"], batch["horizon_mask"], layout)
        x = model.input_proj(torch.cat([values, mask.to(values.dtype)], dim=-1)).detach()
        q, k, v = (t.detach().requires_grad_() for t in layer.project(x, layout))
        qi, ki = (t.detach().requires_grad_() for t in layer.index_branch(x, layout))
    q_time, k_time = batch_times(layout, 1)
    bs = layout.block_size

    def timed(fn) -> float:
        fn()
        torch.cuda.synchronize()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        out = []
        for _ in range(reps):
            start.record()
            fn()
            stop.record()
            torch.cuda.synchronize()
            out.append(start.elapsed_time(stop))
        return sorted(out)[len(out) // 2]

    block_idx = layer.select(qi, ki, layout)
    res = {"tokens": layout.seq_len, "tile_union_blocks": tile_union(block_idx, layout.seq_len // bs)}
    res["select_ms"] = timed(lambda: layer.select(qi, ki, layout))
    res["sparse_attention_fwd_ms"] = timed(lambda: kernels.sparse_attention(q, k, v, block_idx, q_time, k_time, bs))

    def attn_fwd_bwd():
        o, _ = kernels.sparse_attention(q, k, v, block_idx, q_time, k_time, bs)
        o.float().sum().backward()
    res["sparse_attention_fwd_bwd_ms"] = timed(attn_fwd_bwd)
    _, lse = kernels.sparse_attention(q, k, v, block_idx, q_time, k_time, bs)
    lse = lse.detach()
    res["indexer_kl_fwd_bwd_ms"] = timed(lambda: kernels.indexer_kl(qi, ki, block_idx, q, k, lse, q_time, k_time, bs).backward())

    def dense_fwd_bwd():
        o, _ = time_masked_attention(q, k, v, layout.q_time, layout.k_time, cache=layout.cache, cache_key="dense_mask")
        o.float().sum().backward()
    res["dense_attention_fwd_bwd_ms"] = timed(dense_fwd_bwd)
    # Floor: the selected work at the matrix-unit rate measured for this GPU (~790 TFLOP/s bf16):
    # forward 4 L K bs D Hq FLOPs (QK^T and PV), backward 2.5x that.
    flops = 4 * layout.seq_len * MODEL["top_k"] * bs * MODEL["head_dim"] * MODEL["n_heads"] * 3.5
    res["selected_work_floor_ms"] = flops / 790e12 * 1e3
    return res


def tile_union(block_idx: torch.Tensor, n_blocks: int, rows: int = 64) -> float:
    """Mean count of distinct KV blocks chosen by ``rows`` consecutive queries of one GQA group (the
    blocks a query tile of the sparse kernels loads): ``top_k`` when neighbours agree, up to
    ``rows x top_k`` when they do not. ``block_idx [B, G, L, K]``, -1 = unused slot."""
    b, g, length, k = block_idx.shape
    tiles = length // rows
    idx = block_idx[:, :, : tiles * rows].reshape(b, g, tiles, rows * k).long()  # [B, G, T, rows*K]
    hit = torch.zeros(b, g, tiles, n_blocks + 1, dtype=torch.bool, device=idx.device)
    hit.scatter_(-1, torch.where(idx < 0, n_blocks, idx), True)  # the extra column takes the unused slots
    return hit[..., :n_blocks].sum(-1).float().mean().item()


LAYOUT_PROBE = """
import resource, sys, time
from tsfm_msa.tokens import build_layout
roles, groups = {roles!r}, {groups!r}
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
layout = build_layout(roles, groups, {names!r}, context_len={context}, horizon={horizon}, patch_len={patch}, block_size=128)
elapsed = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(layout.seq_len, elapsed, (peak - base) / 1024, peak / 1024)
"""


def layout_cost(tokens: int) -> dict:
    """Layout build in a fresh process, so its peak host memory is its own."""
    code = LAYOUT_PROBE.format(roles=ROLES, groups=GROUPS, names=NAMES, context=context_for(tokens),
                               horizon=HORIZON, patch=PATCH)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return {"tokens": int(out[0]), "seconds": float(out[1]), "peak_extra_mib": float(out[2]),
            "process_peak_mib": float(out[3])}


def apply_kernel_config(pairs: list[str]) -> dict:
    """Set ``KEY=VALUE`` entries of the sparse-attention kernels' CONFIG (ints, floats, true/false);
    returns the changed entries. An unknown key is an error naming the known ones."""
    from tsfm_msa.kernels import sparse_attention_triton as sa

    changed = {}
    for pair in pairs:
        key, _, text = pair.partition("=")
        if key not in sa.CONFIG or not text:
            raise SystemExit(f"--kernel-config {pair!r}: give KEY=VALUE with KEY one of {sorted(sa.CONFIG)}")
        old = sa.CONFIG[key]
        value = text.lower() == "true" if isinstance(old, bool) else type(old)(float(text) if isinstance(old, float) else int(text))
        sa.CONFIG[key] = changed[key] = value
    return changed


def versions(device: torch.device) -> dict:
    info = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "python": platform.python_version(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def markdown(result: dict) -> str:
    v = result["versions"]
    lines = [f"# Training step at long context ({v['date']}, {v['device']}, torch {v['torch']}, triton {v['triton']})", "",
             "Model: d_model 512, 2 layers, 16 query / 4 KV heads, head dim 64, index dim 64, blocks of 128, "
             "top-16, MLP x4; batch 1, bf16 autocast, AdamW; one step = forward + backward + optimizer. "
             "Dense = FlexAttention with the time-visibility block mask. Median of the timed steps. "
             f"Window values: {result.get('inputs', 'noise')} (`--inputs`)."
             + (f" Kernel settings changed: `{result['kernel_config']}`." if result.get("kernel_config") else ""), "",
             "| tokens | dense ms | MSA sparse ms | MSA warmup ms | sparse speed-up (tokens/s vs dense) | "
             "warmup / dense | peak GiB dense / sparse / warmup |",
             "|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        def cell(name, key="ms_per_step", fmt="{:.1f}"):
            r = row.get(name)
            if r is None:
                return "—"
            if "error" in r:
                return r["error"]
            return fmt.format(r[key]) if r.get(key) is not None else "—"
        dense, sparse, warm = (row.get(n) for n in CONTENDERS)
        ok = lambda r: r is not None and "error" not in r
        speed = f"{dense['ms_per_step'] / sparse['ms_per_step']:.2f}x" if ok(dense) and ok(sparse) else "—"
        ratio = f"{warm['ms_per_step'] / dense['ms_per_step']:.2f}" if ok(dense) and ok(warm) else "—"
        mem = " / ".join(cell(n, "peak_gib", "{:.1f}") for n in CONTENDERS)
        lines.append(f"| {row['tokens']:,} | {cell('dense_flex')} | {cell('msa_sparse')} | {cell('msa_warmup')} | "
                     f"{speed} | {ratio} | {mem} |")
    if result.get("layout"):
        lines += ["", "Layout build on the host (fresh process each):", "", "| tokens | seconds | extra peak host MiB |",
                  "|---|---|---|"]
        for lay in result["layout"]:
            lines.append(f"| {lay['tokens']:,} | {lay['seconds']:.2f} | {lay['peak_extra_mib']:.0f} |")
    if result.get("breakdown"):
        keys = [k for k in result["breakdown"][0] if k.endswith("_ms")]
        lines += ["", "One MSA layer's ops at the sparse step's inputs (ms, median), next to the dense attention "
                  "(Flex) forward+backward of the same layer:", "",
                  "| tokens | blocks per 64-query tile | " + " | ".join(k.replace("_ms", "") for k in keys) + " |",
                  "|---|---|" + "---|" * len(keys)]
        for b in result["breakdown"]:
            lines.append(f"| {b['tokens']:,} | {b['tile_union_blocks']:.1f} | " + " | ".join(f"{b[k]:.2f}" for k in keys) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="8k,32k,64k,128k,256k,512k")
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--layout-lengths", default="128k,1m")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--long-reps", type=int, default=3, help="timed steps from 256K tokens on")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--tag", default="h200")
    parser.add_argument("--breakdown", default="32k,128k", help="lengths for the per-op breakdown of one MSA layer")
    parser.add_argument("--kernel-config", nargs="*", default=[], metavar="KEY=VALUE",
                        help="sparse-attention kernel settings to try (kernels/sparse_attention_triton.py CONFIG), "
                             "e.g. dkdv_dq_rows=64 dkdv_warps=4; recorded in the result")
    parser.add_argument("--inputs", default="noise", choices=INPUTS,
                        help="the window's values: white noise (the worst case for tile unions) or seasonal sensor-like series")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kernel_config = apply_kernel_config(args.kernel_config)
    result = {"versions": versions(device), "model": MODEL, "inputs": args.inputs, "kernel_config": kernel_config,
              "rows": [], "layout": []}
    for text in args.layout_lengths.split(","):
        if text:
            result["layout"].append(layout_cost(parse_length(text)))
            print("layout", result["layout"][-1], flush=True)
    result["breakdown"] = []
    for text in args.breakdown.split(","):
        if text and device.type == "cuda":
            result["breakdown"].append(op_breakdown(context_for(parse_length(text)), device, inputs=args.inputs))
            print("breakdown", result["breakdown"][-1], flush=True)
    for text in args.lengths.split(","):
        tokens = parse_length(text)
        row = {"requested": tokens}
        for name in args.contenders.split(","):
            kind, phase = CONTENDERS[name]
            reps = args.long_reps if tokens >= 256 * 1024 else args.reps
            try:
                row[name] = time_steps(kind, phase, context_for(tokens), reps, device, args.inputs)
            except torch.cuda.OutOfMemoryError:
                row[name] = {"error": "out of memory"}
            except Exception as err:  # record and go on: one failing size must not lose the others
                row[name] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
            row["tokens"] = row[name].get("tokens", row.get("tokens", tokens))
            if device.type == "cuda":
                torch.cuda.empty_cache()
            print(text, name, row[name], flush=True)
        result["rows"].append(row)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        suffix = ("" if args.inputs == "noise" else f"-{args.inputs}") + "".join(
            f"-{k}{v}" for k, v in kernel_config.items())
        stem = out / f"{result['versions']['date']}-{args.tag}-train-step{suffix}"
        # Not with_suffix: a setting like auto_waste_fwd2.5 would lose its ".5..." as a "suffix".
        Path(f"{stem}.json").write_text(json.dumps(result, indent=1))
        Path(f"{stem}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
