"""Decode benchmark: one streaming step (an update of one patch per variate, then one forecast) at
long cached contexts, at the level of one attention layer.

What is timed, per layer, for one step (the Q/K/V/index projections and the MLP of the new tokens
are the same O(new tokens) work for every cached contender and are left out):

- ``dense_recompute``: what the predictor does today — a full forward over the whole window (the
  ``L`` context tokens plus the horizon tokens), i.e. dense attention of ``L + Lh`` queries. Timed as
  SDPA with ``is_causal`` and GQA (flash kernel): the same FLOPs as visibility by time in a
  time-major order, and no ``[L, L]`` mask (time-causal differs from position-causal only inside
  one time step).
- ``dense_cached``: the update's ``Lu`` new queries against the cache (``L`` keys), then the
  forecast's ``Lh`` horizon queries against ``L + Lh`` keys; SDPA with GQA and no mask (the new
  queries see every cached key; the few same-step exclusions are ignored, in dense's favour).
- ``msa_cached``: the same two calls through ``decode_select`` (index scoring of the new queries
  over all cached index keys, max-pool, top-k with the local block forced) and ``decode_attention``
  (exact attention over the ``top_k`` selected blocks).

Shapes: ``tsfm`` 16 query / 4 KV heads, ``paper`` 64 / 4, head dim 128, bf16, batch 1. Needs only
torch + triton (+ numpy). ``--smoke`` runs tiny sizes on the CPU with the references.

    python benchmarks/decode.py            # on the H200: writes benchmarks/results/<date>-h200-decode.{json,md}
    python benchmarks/decode.py --smoke    # CPU check, writes nothing unless --out is given
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from tsfm_msa.kernels import dispatch

ROOT = Path(__file__).resolve().parent.parent

SHAPES = {"tsfm": (16, 4), "paper": (64, 4)}


def _timer(device: torch.device):
    if device.type == "cuda":
        def run(fn, reps: int, warmup: int) -> list[float]:
            for _ in range(warmup):
                fn()
            torch.cuda.synchronize()
            times = []
            for _ in range(reps):
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                stop.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(stop))
            return times
    else:
        def run(fn, reps: int, warmup: int) -> list[float]:
            for _ in range(warmup):
                fn()
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            return times
    return run


def _sdpa(q, k, v, causal: bool):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)


def _graphed(fn):
    """``fn`` captured as a CUDA graph (after warm-up on a side stream); returns its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def bench_one(L: int, shape: str, args, device, dtype, timer) -> dict:
    n_heads, groups = SHAPES[shape]
    D, Di, bs, top_k = args.head_dim, args.index_dim, args.block_size, args.top_k
    Lu, Lh = args.variates, args.horizon_tokens
    gen = torch.Generator(device=device).manual_seed(0)
    total = L + Lh

    def rnd(*s):
        return torch.randn(*s, generator=gen, device=device, dtype=dtype)

    # The cache in time-major order: `variates` tokens per time step; the update's tokens are the
    # last Lu of the first L slots, the horizon tokens the Lh after them (scratch slots).
    k_cache, v_cache, ki_cache = rnd(1, groups, total, D), rnd(1, groups, total, D), rnd(1, total, Di)
    k_time = (torch.arange(total, device=device) // Lu).to(torch.int32)[None]
    step = int(k_time[0, L - 1])
    k_time[0, L:] = torch.arange(step + 1, step + 1 + Lh, device=device, dtype=torch.int32)  # horizon: one per step
    upd_time = torch.full((1, Lu), step, dtype=torch.int32, device=device)
    hor_time = k_time[:, L:].contiguous()
    q_u, q_h = rnd(1, n_heads, Lu, D), rnd(1, n_heads, Lh, D)
    qi_u, qi_h = rnd(1, groups, Lu, Di), rnd(1, groups, Lh, Di)
    local_u = torch.full((1, groups, Lu, 1), (L - 1) // bs, dtype=torch.int32, device=device)
    local_h = torch.full((1, groups, Lh, 1), (total - 1) // bs, dtype=torch.int32, device=device)
    kt_u = k_time[:, :L].contiguous()

    def dense_cached():
        _sdpa(q_u, k_cache[:, :, :L], v_cache[:, :, :L], False)
        _sdpa(q_h, k_cache, v_cache, False)

    def msa_cached():
        idx = dispatch.decode_select(qi_u, ki_cache[:, :L], upd_time, kt_u, bs, top_k, None, local_u)
        dispatch.decode_attention(q_u, k_cache[:, :, :L], v_cache[:, :, :L], idx, upd_time, kt_u, bs)
        idx = dispatch.decode_select(qi_h, ki_cache, hor_time, k_time, bs, top_k, None, local_h)
        dispatch.decode_attention(q_h, k_cache, v_cache, idx, hor_time, k_time, bs)

    row = {"cached_tokens": L, "shape": shape, "n_heads": n_heads, "n_kv_heads": groups, "head_dim": D,
           "index_dim": Di, "block_size": bs, "top_k": top_k, "update_tokens": Lu, "horizon_tokens": Lh}
    for name, fn, reps in (("dense_cached", dense_cached, args.reps), ("msa_cached", msa_cached, args.reps)):
        times = timer(fn, reps, args.warmup)
        row[f"{name}_ms"] = statistics.median(times)
        row[f"{name}_reps"] = len(times)
        if device.type == "cuda" and args.graphs:
            # The same step replayed as one CUDA graph: what a serving loop runs, without the
            # per-op launch cost (a constant that says nothing about the attention algorithm).
            try:
                row[f"{name}_graph_ms"] = statistics.median(timer(_graphed(fn), reps, 1))
            except Exception as err:  # recorded, not fatal: the eager time stands
                row[f"{name}_graph_ms"] = None
                row[f"{name}_graph_error"] = f"{type(err).__name__}: {err}"[:300]

    # Dense recompute: one full forward over L + Lh tokens. Its cost grows as L^2; predict it from
    # the last measured size and skip it (recording why) past the time limit.
    predicted = None
    if args._recompute_ref is not None and args._recompute_ref[1] == shape:
        ref_len, _, ref_ms = args._recompute_ref
        predicted = ref_ms * (total / ref_len) ** 2
    if predicted is not None and predicted / 1e3 > args.max_recompute_s:
        row["dense_recompute_ms"] = None
        row["dense_recompute_skipped"] = (f"predicted {predicted / 1e3:.0f} s from the {args._recompute_ref[0]}-token "
                                          f"run (quadratic), over --max-recompute-s={args.max_recompute_s}")
    else:
        del k_cache, v_cache, ki_cache  # room for the full-window Q/K/V
        q_full, k_full, v_full = rnd(1, n_heads, total, D), rnd(1, groups, total, D), rnd(1, groups, total, D)
        reps = args.reps if predicted is None or predicted < 2e3 else 1
        warmup = args.warmup if predicted is None or predicted < 2e3 else 0  # smaller sizes warmed the kernel
        times = timer(lambda: _sdpa(q_full, k_full, v_full, True), reps, warmup)
        row["dense_recompute_ms"] = statistics.median(times)
        row["dense_recompute_reps"] = len(times)
        args._recompute_ref = (total, shape, row["dense_recompute_ms"])
        del q_full, k_full, v_full
    msa = row["msa_cached_ms"]
    row["speedup_vs_dense_cached"] = row["dense_cached_ms"] / msa
    if row.get("msa_cached_graph_ms") and row.get("dense_cached_graph_ms"):
        row["speedup_vs_dense_cached_graph"] = row["dense_cached_graph_ms"] / row["msa_cached_graph_ms"]
    row["speedup_vs_dense_recompute"] = None if row["dense_recompute_ms"] is None else row["dense_recompute_ms"] / msa
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def _markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"# Decode benchmark ({meta['date']}, {meta['device']})", "",
             f"torch {meta['torch']}, triton {meta['triton']}, {meta['dtype']}, batch 1. One streaming step per "
             f"attention layer: an update of {meta['update_tokens']} new tokens (one patch per variate) plus one "
             f"forecast with {meta['horizon_tokens']} horizon tokens. MSA: block {meta['block_size']}, top-{meta['top_k']}, "
             f"index dim {meta['index_dim']}. Times are medians in ms; see the docstring of benchmarks/decode.py "
             f"for what each contender runs.", "",
             "| cached tokens | shape (Hq/G) | dense recompute | dense cached | MSA cached | MSA vs cached | MSA vs recompute "
             "| dense cached (graph) | MSA cached (graph) | MSA vs cached (graph) |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        rec = "skipped" if r["dense_recompute_ms"] is None else f"{r['dense_recompute_ms']:.3f}"
        vs_rec = "-" if r["speedup_vs_dense_recompute"] is None else f"{r['speedup_vs_dense_recompute']:.1f}x"
        dg, mg, sg = r.get("dense_cached_graph_ms"), r.get("msa_cached_graph_ms"), r.get("speedup_vs_dense_cached_graph")
        graph = " | ".join("-" if x is None else f"{x:.3f}" for x in (dg, mg)) + (" | -" if sg is None else f" | {sg:.1f}x")
        lines.append(f"| {r['cached_tokens']:,} | {r['shape']} ({r['n_heads']}/{r['n_kv_heads']}) | {rec} | "
                     f"{r['dense_cached_ms']:.3f} | {r['msa_cached_ms']:.3f} | {r['speedup_vs_dense_cached']:.1f}x | {vs_rec} "
                     f"| {graph} |")
    skipped = [r for r in rows if r.get("dense_recompute_skipped")]
    if skipped:
        lines += [""] + [f"- dense recompute at {r['cached_tokens']:,} ({r['shape']}): {r['dense_recompute_skipped']}"
                         for r in skipped]
    lines += ["", "Targets (issue 11): at 1M, MSA >= 7.6x faster than dense cached and >= 100x faster than dense "
              "recompute; at 128K, >= 3x faster than dense cached. Judged below on the eager times; the graph "
              "columns replay each step as one CUDA graph (no per-op launch cost)."]
    for r in rows:
        cached, recompute = r["speedup_vs_dense_cached"], r["speedup_vs_dense_recompute"]
        if r["cached_tokens"] >= 1 << 20:
            ok = cached >= 7.6 and recompute is not None and recompute >= 100
            rec = "recompute skipped" if recompute is None else f"{recompute:.0f}x vs recompute"
            lines.append(f"- 1M {r['shape']}: {'met' if ok else 'NOT met'} ({cached:.1f}x vs cached, {rec})")
        elif r["cached_tokens"] == 1 << 17:
            lines.append(f"- 128K {r['shape']}: {'met' if cached >= 3 else 'NOT met'} ({cached:.1f}x vs cached)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[1 << 15, 1 << 17, 1 << 20])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--index-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--top-k", type=int, default=16)
    p.add_argument("--variates", type=int, default=16, help="new tokens per update (one patch per variate)")
    p.add_argument("--horizon-tokens", type=int, default=16)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--max-recompute-s", type=float, default=60.0)
    p.add_argument("--no-graphs", dest="graphs", action="store_false",
                   help="skip the CUDA-graph replays of the cached contenders")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (references), to check the script")
    p.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results on CUDA)")
    args = p.parse_args(argv)
    if args.smoke:
        args.contexts, args.head_dim, args.index_dim, args.block_size, args.top_k = [512, 2048], 16, 16, 8, 4
        args.variates, args.horizon_tokens, args.reps, args.warmup = 4, 4, 2, 1
        device, dtype = torch.device("cpu"), torch.float32
    else:
        if not torch.cuda.is_available():
            p.error("the decode benchmark needs a GPU; use --smoke on the CPU")
        device, dtype = torch.device("cuda"), torch.bfloat16
    args._recompute_ref = None
    timer = _timer(device)
    rows = []
    with torch.no_grad():
        for shape in args.shapes:
            args._recompute_ref = None
            for L in sorted(args.contexts):
                row = bench_one(L, shape, args, device, dtype, timer)
                rows.append(row)
                print(json.dumps(row), flush=True)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    meta = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "triton": triton_version, "dtype": str(dtype).replace("torch.", ""),
            "backend": dispatch.get_backend(), "block_size": args.block_size, "top_k": args.top_k,
            "index_dim": args.index_dim, "update_tokens": args.variates, "horizon_tokens": args.horizon_tokens,
            "reps": args.reps, "warmup": args.warmup, "graphs": args.graphs, "max_recompute_s": args.max_recompute_s,
            "smoke": args.smoke}
    out = args.out if args.out is not None else (None if args.smoke else ROOT / "benchmarks" / "results")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        stem = f"{meta['date']}-{'h200' if 'H200' in meta['device'] else 'gpu' if device.type == 'cuda' else 'cpu'}-decode"
        (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        (out / f"{stem}.md").write_text(_markdown(meta, rows))
        print(f"wrote {out / stem}.json and .md")
    else:
        print(_markdown(meta, rows))


if __name__ == "__main__":
    main()
