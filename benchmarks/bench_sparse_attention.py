"""Development benchmark of the Triton sparse_attention (runs on the GPU machine).

1. bf16 correctness against the fp32 reference at moderate L (the reference is O(L^2)).
2. Timings (triton.testing.do_bench, median) of both variants on the three selection patterns,
   tsfm shape (Hq=16, G=4) and paper shape (Hq=64, G=4), D=128, bs=128, k=16, B=1, causal.
   TFLOP/s counts the selected work: 4 * L * Hq * D * 2048 forward, 2.5x that backward.

    python benchmarks/bench_sparse_attention.py --out $OUT [--L 131072] [--budget 300]

Writes ``bench_attention.json`` under ``--out`` after every measurement and prints a table last.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import time

import torch
import triton

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sa = importlib.import_module("kernels.sparse_attention_triton")
ref_mod = importlib.import_module("kernels.reference")

INT32_MAX = 2**31 - 1
# A CPU dry run of this script's logic: BENCH_DEVICE=cpu TRITON_INTERPRET=1 with tiny --L.
DEV = os.environ.get("BENCH_DEVICE", "cuda")


def make_pattern(groups, seq_len, bs, k, pattern, gen, pool=24):
    """block_idx [1, G, L, k] int32, causal (time = position): slot 0 is the local block, the others
    are earlier blocks: tile_shared (the same for all queries of a bs-token tile), pool (each query
    draws k - 1 from a per-tile pool of ``pool`` blocks) or random (per query). -1 where a query has
    too few earlier blocks."""
    dev = DEV
    nb = triton.cdiv(seq_len, bs)
    local = torch.arange(seq_len, device=dev) // bs
    tiles = torch.arange(nb, device=dev)
    earlier = tiles[None, :] < tiles[:, None]  # [NT, NB] strictly earlier blocks

    def top(scores, width):
        val, idx = scores.topk(width, dim=-1)
        return torch.where(val == float("-inf"), -1, idx)

    def rand(*shape):
        return torch.rand(*shape, generator=gen, device=dev)

    if pattern == "random":
        rest = torch.empty(groups, seq_len, k - 1, dtype=torch.long, device=dev)
        step = max(1, (1 << 28) // (groups * nb))
        for s in range(0, seq_len, step):
            sl = slice(s, min(seq_len, s + step))
            scores = rand(groups, sl.stop - s, nb).masked_fill(~earlier[local[sl]], float("-inf"))
            rest[:, sl] = top(scores, min(k - 1, nb))
    else:
        width = k - 1 if pattern == "tile_shared" else pool
        per_tile = top(rand(groups, nb, nb).masked_fill(~earlier, float("-inf")), min(width, nb))
        rest = per_tile[:, local]  # [G, L, width]
        if pattern == "pool":
            pick = top(rand(groups, seq_len, rest.shape[-1]).masked_fill(rest < 0, float("-inf")), k - 1)
            rest = torch.where(pick < 0, -1, rest.gather(-1, pick.clamp_min(0)))
    idx = torch.cat([local.view(1, seq_len, 1).expand(groups, seq_len, 1), rest], -1)
    return idx[None].to(torch.int32).contiguous()


def inputs(heads, groups, seq_len, dim, seed=0):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    dt = torch.bfloat16 if DEV == "cuda" else torch.float32
    q = torch.randn(1, heads, seq_len, dim, device=DEV, generator=gen).to(dt)
    k = torch.randn(1, groups, seq_len, dim, device=DEV, generator=gen).to(dt)
    v = torch.randn(1, groups, seq_len, dim, device=DEV, generator=gen).to(dt)
    t = torch.arange(seq_len, device=DEV, dtype=torch.int32)[None]
    return q, k, v, t, gen


def rel(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def check(heads, groups, seq_len, dim, bs, k, pattern, variant):
    q, kk, v, t, gen = inputs(heads, groups, seq_len, dim, seed=seq_len + heads + dim)
    block_idx = make_pattern(groups, seq_len, bs, k, pattern, gen)
    dout = torch.randn_like(q)
    refs = [x.float().requires_grad_() for x in (q, kk, v)]
    r_out, r_lse = ref_mod.sparse_attention_reference(*refs, block_idx, t, t, bs)
    r_grads = torch.autograd.grad(r_out, refs, dout.float())
    ins = [x.clone().requires_grad_() for x in (q, kk, v)]
    out, lse = sa.sparse_attention_triton(*ins, block_idx, t, t, bs, variant=variant)
    grads = torch.autograd.grad(out, ins, dout)
    finite = torch.isfinite(r_lse)
    res = {
        "out_rel": rel(out, r_out), "out_maxabs": float((out.float() - r_out).abs().max()),
        "lse_maxabs": float((lse.detach() - r_lse.detach())[finite].abs().max()),
        "lse_rows": int(finite.sum()),
        "lse_inf_match": bool(torch.equal(torch.isinf(lse), ~finite)),
        "nan": bool(torch.isnan(out).any() or any(torch.isnan(g).any() for g in grads)),
    }
    for name, g, rg in zip(("dq", "dk", "dv"), grads, r_grads):
        res[name + "_rel"] = rel(g, rg)
        res[name + "_maxabs"] = float((g.float() - rg).abs().max())
    res["ok"] = (not res["nan"] and res["lse_inf_match"] and res["out_rel"] < 1e-2
                 and max(res["dq_rel"], res["dk_rel"], res["dv_rel"]) < 2e-2)
    return res


# (shape, pattern, variant, config change, timed part): launch configs tried beside the defaults.
SWEEP = [
    # session 3: membership bitmask against the old per-slot loads, same run
    ("tsfm", "tile_shared", "query_outer", {"dq_bits": False}, "bwd"),
    ("tsfm", "tile_shared", "query_outer", {"dq_keys": 128}, "bwd"),
    ("tsfm", "pool", "query_outer", {"qo_member": "slots"}, "fwd"),
    ("paper", "pool", "query_outer", {"qo_member": "slots"}, "fwd"),
    ("paper", "pool", "query_outer", {"qo_rows": 64, "qo_warps": 4, "qo_stages": 1}, "fwd"),
]


def bench(fn, slow=False):
    if DEV != "cuda":
        t0 = time.time()
        fn()
        return (time.time() - t0) * 1e3
    return triton.testing.do_bench(fn, warmup=25 if slow else 50, rep=50 if slow else 200, return_mode="median")


# Forward-only launch variants of the query-outer kernel (CONFIG overrides), timed by --fwd-variants.
FWD_VARIANTS = {  # session 3: membership of masked blocks (defaults otherwise: 128 keys, 3 stages, TMA)
    "bits": {"qo_member": "bits"},
    "unrolled": {"qo_member": "unrolled"},
    "slots": {"qo_member": "slots"},
    "unr_r64s1": {"qo_member": "unrolled", "qo_stages": 1, "qo_rows": 64, "qo_warps": 4},
}
FWD_PLAN = [  # (shape, pattern, variants)
    ("tsfm", "tile_shared", ["unrolled", "bits", "slots"]),
    ("tsfm", "pool", ["unrolled", "bits", "slots"]),
    ("tsfm", "random", ["unrolled", "bits"]),
    ("paper", "pool", ["unrolled", "bits", "slots", "unr_r64s1"]),
    ("paper", "tile_shared", ["unrolled"]),
]


def fwd_variants(args):
    """Quick run: bf16 checks at 8K (fwd+bwd, both variants), then forward-only times of the query-outer
    launch variants at --L, the union build (torch sorts vs the Triton kernel) and one backward."""
    t_start = time.time()
    res = {"torch": torch.__version__, "triton": triton.__version__, "gpu": torch.cuda.get_device_name() if DEV == "cuda" else "cpu",
           "checks": [], "fwd": [], "union": [], "bwd": []}
    path = os.path.join(args.out, "bench_fwd_variants.json")

    def save():
        with open(path, "w") as f:
            json.dump(res, f, indent=1)

    base = dict(sa.CONFIG)
    for heads, groups, seq_len, dim, bs, pattern, variant, cfg in [
        (16, 4, 8192, 128, 128, "tile_shared", "query_outer", "unrolled"),
        (16, 4, 8192, 128, 128, "pool", "query_outer", "unrolled"),
        (16, 4, 8192, 128, 128, "pool", "query_outer", "bits"),
        (16, 4, 8192, 128, 128, "random", "query_outer", "unrolled"),
        (16, 4, 8192, 64, 64, "pool", "query_outer", "unrolled"),
        (64, 4, 4096, 128, 128, "tile_shared", "query_outer", "unrolled"),
        (64, 4, 4096, 128, 128, "pool", "query_outer", "unrolled"),
        (64, 4, 4096, 128, 128, "pool", "query_outer", "bits"),
        (64, 4, 4096, 128, 128, "random", "query_outer", "unr_r64s1"),
    ] if not args.skip_check else []:
        sa.CONFIG.update(FWD_VARIANTS[cfg])
        try:
            r = check(heads, groups, seq_len, dim, bs, 16, pattern, variant)
        except Exception as e:
            r = {"error": repr(e)[:400], "ok": False}
        sa.CONFIG.clear()
        sa.CONFIG.update(base)
        r.update(Hq=heads, G=groups, L=seq_len, D=dim, bs=bs, pattern=pattern, variant=variant, cfg=cfg)
        res["checks"].append(r)
        print("check", r, flush=True)
        save()

    seq_len, dim, bs, k = args.L, args.dim, args.bs, args.k
    scale = 1 / math.sqrt(dim)
    for heads, groups, shape in [(16, 4, "tsfm"), (64, 4, "paper")]:
        q, kk, v, t, gen = inputs(heads, groups, seq_len, dim)
        flops = 4 * seq_len * heads * dim * 2048
        for want_shape, pattern, names in FWD_PLAN:
            if want_shape != shape:
                continue
            block_idx = make_pattern(groups, seq_len, bs, k, pattern, gen)
            sh = sa._Shape(q, kk, block_idx, bs)
            tq = sh.tq(sa.CONFIG["qo_rows"])
            u, c, _ = sa._build_union(block_idx, tq, t, t, bs)
            waste = sa._union_waste(block_idx, c, tq)
            unmasked = float(((u & 1) == 0).logical_and(
                torch.arange(u.shape[-1], device=u.device) < c[..., None]).sum()) / float(c.sum())
            row = {"shape": shape, "pattern": pattern, "waste": waste, "unmasked_frac": unmasked,
                   "torch_union_ms": bench(lambda: sa._tile_union(block_idx, tq)),
                   "triton_union_ms": bench(lambda: sa._build_union(block_idx, tq, t, t, bs))}
            res["union"].append(row)
            print("union", row, flush=True)
            for name in names:
                if time.time() - t_start > args.budget:
                    break
                sa.CONFIG.update(FWD_VARIANTS[name])
                row = {"shape": shape, "pattern": pattern, "cfg": name}
                try:
                    fn = lambda: sa._forward(q, kk, v, block_idx, t, t, bs, scale, "query_outer")
                    fn()
                    row["fwd_ms"] = bench(fn)
                    row["fwd_ms_2"] = bench(fn)  # repeat: the spread between the two is the noise
                    row["tflops"] = flops / row["fwd_ms"] * 1e-9
                    if shape == "tsfm" and pattern == "tile_shared" and name == "unrolled":
                        out, lse = fn()
                        dout = torch.randn_like(q)
                        for dq_bits in (True, False):
                            sa.CONFIG["dq_bits"] = dq_bits
                            res["bwd"].append({"shape": shape, "pattern": pattern, "dq_bits": dq_bits, "bwd_ms": bench(
                                lambda: sa._backward(q, kk, v, block_idx, t, t, out, lse, dout, None, bs, scale,
                                                     "query_outer"))})
                        del out, lse, dout
                except Exception as e:
                    row["error"] = repr(e)[:400]
                sa.CONFIG.clear()
                sa.CONFIG.update(base)
                res["fwd"].append(row)
                print("fwd", row, flush=True)
                save()
            del block_idx
        del q, kk, v
        if DEV == "cuda":
            torch.cuda.empty_cache()
    res["elapsed_s"] = round(time.time() - t_start, 1)
    save()
    print("\n== checks (bf16 vs fp32 reference)")
    for c in res["checks"]:
        print(f"{c['Hq']}x{c['G']} L={c['L']} D={c['D']} bs={c['bs']} {c['pattern']:11s} {c['variant']:11s} "
              f"{c['cfg']:9s} ok={c.get('ok')} out={c.get('out_rel', -1):.2e} lse={c.get('lse_maxabs', -1):.1e} "
              f"dq={c.get('dq_rel', -1):.2e} dk={c.get('dk_rel', -1):.2e} dv={c.get('dv_rel', -1):.2e} {c.get('error', '')}")
    for u in res["union"]:
        print(f"union {u['shape']:5s} {u['pattern']:11s} waste={u['waste']:.2f} unmasked={u['unmasked_frac']:.2f} "
              f"torch={u['torch_union_ms']:.3f} triton={u['triton_union_ms']:.3f} ms")
    for b in res["bwd"]:
        print("bwd", b)
    print("== forward (ms, two medians; TFLOP/s)")
    for r in res["fwd"]:
        print(f"{r['shape']:5s} {r['pattern']:11s} {r['cfg']:9s} " + (
            f"{r['fwd_ms']:7.2f} {r['fwd_ms_2']:7.2f} ({r['tflops']:4.0f})" if "fwd_ms" in r else "ERROR " + r["error"][:300]))
    print("elapsed", res["elapsed_s"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--L", type=int, default=131072)
    ap.add_argument("--bs", type=int, default=128)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--budget", type=float, default=300.0, help="seconds; later items are skipped")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="sweep launch configs on tile_shared")
    ap.add_argument("--fwd-variants", action="store_true", help="quick forward-variant run (see fwd_variants)")
    args = ap.parse_args()
    if args.fwd_variants:
        return fwd_variants(args)
    t_start = time.time()
    results = {"torch": torch.__version__, "triton": triton.__version__,
               "gpu": torch.cuda.get_device_name() if DEV == "cuda" else "cpu", "checks": [], "timings": [], "sweep": [], "prep": []}
    path = os.path.join(args.out, "bench_attention.json")

    def save():
        with open(path, "w") as f:
            json.dump(results, f, indent=1)

    def over():
        return time.time() - t_start > args.budget

    # 1. correctness, bf16
    if not args.skip_check:
        for heads, groups, seq_len, dim, bs, pattern in [
            (16, 4, 8192, 128, 128, "tile_shared"), (16, 4, 8192, 128, 128, "pool"),
            (16, 4, 8192, 128, 128, "random"), (16, 4, 8192, 64, 64, "pool"),
            (64, 4, 4096, 128, 128, "tile_shared"), (64, 4, 4096, 128, 128, "pool"),
            (64, 4, 4096, 128, 128, "random"),
        ]:
            for variant in ("query_outer", "kv_outer"):
                t0 = time.time()
                try:
                    res = check(heads, groups, seq_len, dim, bs, 16, pattern, variant)
                except Exception as e:  # keep going: the rest of the run is still worth having
                    res = {"error": repr(e)[:400], "ok": False}
                res.update(Hq=heads, G=groups, L=seq_len, D=dim, bs=bs, pattern=pattern, variant=variant,
                           secs=round(time.time() - t0, 1))
                results["checks"].append(res)
                print("check", res, flush=True)
                save()
        if DEV == "cuda":
            torch.cuda.empty_cache()

    # 2. timings
    seq_len, dim, bs, k = args.L, args.dim, args.bs, args.k
    for heads, groups, shape in [(16, 4, "tsfm"), (64, 4, "paper")]:
        q, kk, v, t, gen = inputs(heads, groups, seq_len, dim)
        dout = torch.randn_like(q)
        flops = 4 * seq_len * heads * dim * 2048
        for pattern in ("tile_shared", "pool", "random"):
            block_idx = make_pattern(groups, seq_len, bs, k, pattern, gen)
            sh = sa._Shape(q, kk, block_idx, bs)
            tq = sh.tq(sa.CONFIG["qo_rows"])
            union, count, _ = sa._build_union(block_idx, tq, t, t, bs)
            waste = sa._union_waste(block_idx, count, tq)
            if shape == "tsfm" or pattern != "tile_shared":
                prep = {"shape": shape, "pattern": pattern, "waste": round(waste, 3),
                        "union_ms": bench(lambda: sa._build_union(block_idx, tq, t, t, bs)),
                        "csr_ms": bench(lambda: sa._chunks(sa._block_csr(block_idx, sh.NB)[1], tq, block_idx.numel()))}
                results["prep"].append(prep)
                print("prep", prep, flush=True)
            for variant in ("query_outer", "kv_outer"):
                if over():
                    break
                slow = variant == "query_outer" and waste > 3
                row = {"shape": shape, "Hq": heads, "G": groups, "L": seq_len, "pattern": pattern,
                       "variant": variant, "waste": round(waste, 2)}
                try:
                    fwd = lambda: sa._forward(q, kk, v, block_idx, t, t, bs, 1 / math.sqrt(dim), variant)
                    out, lse = fwd()
                    row["fwd_ms"] = bench(fwd, slow)
                    bwd = lambda: sa._backward(q, kk, v, block_idx, t, t, out, lse, dout, None, bs,
                                               1 / math.sqrt(dim), variant)
                    row["bwd_ms"] = bench(bwd, slow)
                    row["fwdbwd_ms"] = row["fwd_ms"] + row["bwd_ms"]
                    row["fwd_tflops"] = flops / row["fwd_ms"] * 1e-9
                    row["bwd_tflops"] = 2.5 * flops / row["bwd_ms"] * 1e-9
                    row["fwdbwd_tflops"] = 3.5 * flops / row["fwdbwd_ms"] * 1e-9
                    del out, lse
                except Exception as e:
                    row["error"] = repr(e)[:400]
                results["timings"].append(row)
                print("time", row, flush=True)
                save()
                if DEV == "cuda":
                    torch.cuda.empty_cache()

            for want_shape, want_pattern, variant, cfg, part in SWEEP:
                if not args.sweep or (want_shape, want_pattern) != (shape, pattern) or over():
                    continue
                base = dict(sa.CONFIG)
                sa.CONFIG.update(cfg)
                row = {"shape": shape, "pattern": pattern, "variant": variant, "cfg": cfg}
                scale = 1 / math.sqrt(dim)
                try:
                    out, lse = sa._forward(q, kk, v, block_idx, t, t, bs, scale, variant)
                    if part == "fwd":
                        row["fwd_ms"] = bench(lambda: sa._forward(q, kk, v, block_idx, t, t, bs, scale, variant))
                    else:
                        row["bwd_ms"] = bench(lambda: sa._backward(q, kk, v, block_idx, t, t, out, lse, dout, None,
                                                                   bs, scale, variant))
                    del out, lse
                except Exception as e:
                    row["error"] = repr(e)[:300]
                sa.CONFIG.clear()
                sa.CONFIG.update(base)
                results["sweep"].append(row)
                print("sweep", row, flush=True)
                save()
            del block_idx
        del q, kk, v, dout
        if DEV == "cuda":
            torch.cuda.empty_cache()

    results["elapsed_s"] = round(time.time() - t_start, 1)
    save()
    print("\n== checks (bf16 vs fp32 reference; rel = ||err|| / ||ref||)")
    for c in results["checks"]:
        print(f"{c['Hq']:3d}x{c['G']} L={c['L']:5d} D={c['D']:3d} bs={c['bs']:3d} {c['pattern']:11s} "
              f"{c['variant']:11s} ok={c.get('ok')} out={c.get('out_rel', float('nan')):.2e} "
              f"dq={c.get('dq_rel', float('nan')):.2e} dk={c.get('dk_rel', float('nan')):.2e} "
              f"dv={c.get('dv_rel', float('nan')):.2e} {c.get('error', '')}")
    print("\n== timings (ms, TFLOP/s of the selected work)")
    for r in results["timings"]:
        if "error" in r:
            print(r["shape"], r["pattern"], r["variant"], "ERROR", r["error"][:200])
            continue
        print(f"{r['shape']:5s} {r['pattern']:11s} {r['variant']:11s} waste={r['waste']:5.2f} "
              f"fwd {r['fwd_ms']:8.2f} ({r['fwd_tflops']:5.0f})  bwd {r['bwd_ms']:8.2f} ({r['bwd_tflops']:5.0f})  "
              f"fwd+bwd {r['fwdbwd_ms']:8.2f} ({r['fwdbwd_tflops']:5.0f})")
    for p in results["prep"]:
        print("prep", p)
    for s in results["sweep"]:
        print("sweep", s)
    print("elapsed", results["elapsed_s"])


if __name__ == "__main__":
    main()
