"""GPU benchmark of the MSA kernels (issue 3, section Benchmark).

Runs on the device (H200): bf16, causal (time id = position), B=1, bs=128, k=16 (2,048 tokens per
query and group). Contenders per shape:
  dense SDPA (enable_gqa, is_causal) fwd / fwd+bwd; FlexAttention (compiled) with the BlockMask of
  pattern (i) fwd / fwd+bwd; our sparse_attention (query_outer, kv_outer) fwd / fwd+bwd on the patterns
  (i) tile-shared, (ii) per-token local, (iii) per-token random; our select_blocks against the torch-ops
  pipeline; the MSA layer forward (select + attend) against dense; the fused KL kernel against its
  reference; fla's NSA kernel when importable.
Before timing, each of our kernels is checked against its PyTorch reference in bf16 (L = 4K-8K).

    python benchmarks/attention.py [--shapes tsfm,paper] [--quick] [--skip-dense-above L] [--out PATH]

Prints a table and writes benchmarks/results/<date>-<gpu>-attention.json (and $OUT/<same name> when
OUT is set; --out PATH too).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import importlib.util
import json
import os
import platform
import sys
import time
import traceback
import types
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
PEAK_TFLOPS = 790.0  # bf16 matmul measured on this H200
BS, TOPK = 128, 16
SELECTED = BS * TOPK  # 2,048 tokens per query and group

SHAPES = {
    "tsfm": dict(Hq=16, G=4, D=128, Di=64, Ls=[8192, 32768, 131072], fwd_only_above=1 << 30),
    "paper": dict(Hq=64, G=4, D=128, Di=128, Ls=[32768, 131072, 1 << 20], fwd_only_above=131072),
}
QUICK_LS = {"tsfm": [8192], "paper": [4096]}
# Quoted, not measured here (DESIGN.md section 8 / issue 3): dense SDPA forward, paper shape, L = 1M.
QUOTED = {("paper", 1 << 20, "dense_fwd"): 39000.0}
FLA_QUOTED_128K = {"fwd": 90.0, "fwd_bwd": 275.0}  # fla NSA, paper shape 128K (issue 3)


def _import_kernels():
    """``tsfm_msa.kernels`` from the installed package, or straight from this checkout."""
    try:
        import tsfm_msa.kernels as kernels  # noqa: F401
        return kernels
    except ImportError:
        pass
    if "tsfm_msa" not in sys.modules:
        pkg = types.ModuleType("tsfm_msa")
        pkg.__path__ = [str(ROOT / "tsfm_msa")]
        sys.modules["tsfm_msa"] = pkg
    spec = importlib.util.spec_from_file_location(
        "tsfm_msa.kernels", ROOT / "kernels" / "__init__.py", submodule_search_locations=[str(ROOT / "kernels")])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["tsfm_msa.kernels"] = mod
    spec.loader.exec_module(mod)
    sys.modules["tsfm_msa"].kernels = mod
    return mod


K = _import_kernels()
from tsfm_msa.kernels import reference as ref  # noqa: E402

# ----------------------------------------------------------------------------------- utilities


class _Skip(Exception):
    pass


class Budget:
    def __init__(self, seconds):
        self.t0 = time.time()
        self.seconds = seconds

    def left(self):
        return self.seconds - (time.time() - self.t0)


def sync():
    torch.cuda.synchronize()


def bench(fn, slow_ms=60.0):
    """Median milliseconds. First call warms up (compiles); long calls are timed 2 more times with
    CUDA events, short ones with triton.testing.do_bench."""
    import triton.testing

    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    first = (time.perf_counter() - t0) * 1e3
    if first > slow_ms * 4:  # probably compile time: once more to see
        t0 = time.perf_counter()
        fn()
        sync()
        first = (time.perf_counter() - t0) * 1e3
    if first > slow_ms:
        times = [first]
        for _ in range(2):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            sync()
            times.append(s.elapsed_time(e))
        return float(sorted(times)[1])
    return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))


def free():
    gc.collect()
    torch.cuda.empty_cache()


def cdiv(a, b):
    return (a + b - 1) // b


# ----------------------------------------------------------------------------------- patterns


def _stratified(upper, n, gen, shape_prefix):
    """``n`` distinct blocks in [0, upper) (upper: int tensor of shape prefix), one per stratum of a
    partition of [0, upper) into n intervals; -1 where a stratum is empty (upper < n)."""
    s = torch.arange(n, device=upper.device)
    lo = (s * upper[..., None]) // n
    hi = ((s + 1) * upper[..., None]) // n
    r = torch.rand(*shape_prefix, n, device=upper.device, generator=gen)
    pick = lo + (r * (hi - lo).float()).long().clamp_max((hi - lo - 1).clamp_min(0))
    return torch.where(hi > lo, pick, torch.full_like(pick, -1))


def make_pattern(name, L, G, seed=0, device="cuda"):
    """block_idx [1, G, L, 16] int32: the local block first, then 15 earlier blocks (-1 when fewer exist)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    nb = cdiv(L, BS)
    tok_blk = torch.arange(L, device=device) // BS
    if name == "tile":  # (i) all queries of a 128-token tile share the same blocks, same for all groups
        t = torch.arange(nb, device=device)
        other = _stratified(t, TOPK - 1, gen, (nb,))  # [nb, 15]
        sel = torch.cat([t[:, None], other], 1)[tok_blk]  # [L, 16]
        sel = sel[None, None].expand(1, G, L, TOPK)
    elif name == "local":  # (ii) per token: local + 15 of a per-(group, tile) pool of 30 (one of each pair)
        t = torch.arange(nb, device=device)
        pool = _stratified(t[None].expand(G, nb), 2 * (TOPK - 1), gen, (G, nb))  # [G, nb, 30]
        pool_tok = pool[:, tok_blk].view(G, L, TOPK - 1, 2)
        bit = (torch.rand(G, L, TOPK - 1, device=device, generator=gen) < 0.5).long()
        a = pool_tok.gather(-1, bit[..., None]).squeeze(-1)
        b = pool_tok.gather(-1, (1 - bit)[..., None]).squeeze(-1)
        other = torch.where(a >= 0, a, b)
        sel = torch.cat([tok_blk[None, :, None].expand(G, L, 1), other], -1)[None]
    elif name == "random":  # (iii) per token: local + 15 random earlier blocks
        other = _stratified(tok_blk[None].expand(G, L), TOPK - 1, gen, (G, L))
        sel = torch.cat([tok_blk[None, :, None].expand(G, L, 1), other], -1)[None]
    else:
        raise ValueError(name)
    return sel.to(torch.int32).contiguous()


def flex_block_mask(L, tile_sel, device="cuda"):
    """BlockMask of pattern (i): per query tile, the local block (causal partial) + 15 full blocks."""
    from torch.nn.attention.flex_attention import BlockMask

    nb = cdiv(L, BS)
    sel = tile_sel[0, 0, ::BS]  # [nb, 16]
    others = sel[:, 1:]
    full_num = (others >= 0).sum(-1).to(torch.int32)
    # valid first: sort so that -1 go last
    key = torch.where(others >= 0, others, torch.full_like(others, nb + 1))
    others = key.sort(-1).values
    full_idx = torch.zeros(nb, nb, dtype=torch.int32, device=device)
    full_idx[:, :TOPK - 1] = torch.where(others <= nb, others, torch.zeros_like(others)).to(torch.int32)
    kv_idx = torch.zeros(nb, nb, dtype=torch.int32, device=device)
    kv_idx[:, 0] = sel[:, 0]
    kv_num = torch.ones(nb, dtype=torch.int32, device=device)

    def causal(b, h, q_idx, kv_idx_):
        return q_idx >= kv_idx_

    return BlockMask.from_kv_blocks(kv_num[None, None], kv_idx[None, None], full_num[None, None], full_idx[None, None],
                                    BLOCK_SIZE=BS, mask_mod=causal)


# ----------------------------------------------------------------------------------- baselines


def torch_select_pipeline(qi, ki, q_time, k_time, bs, k, forced, chunk_bytes=2 << 30):
    """Torch-ops indexer: bf16 matmul, time mask, block max-pool, torch.topk, chunked over queries.
    (Keys past the chunk's last query are cut: valid for the monotone times of this benchmark.)"""
    batch, groups, seq_len, _ = qi.shape
    nb = cdiv(seq_len, bs)
    out = torch.empty(batch, groups, seq_len, k, dtype=torch.int32, device=qi.device)
    chunk = max(bs, (chunk_bytes // (4 * groups * seq_len)) // bs * bs)
    for start in range(0, seq_len, chunk):
        stop = min(seq_len, start + chunk)
        kend = min(seq_len, cdiv(stop, bs) * bs)
        s = torch.matmul(qi[:, :, start:stop], ki[:, None, :kend].transpose(-1, -2)).float()
        vis = k_time[:, None, None, :kend] <= q_time[:, None, start:stop, None]
        s = s.masked_fill(~vis, float("-inf"))
        nbc = cdiv(kend, bs)
        if nbc * bs != kend:
            s = F.pad(s, (0, nbc * bs - kend), value=float("-inf"))
        bsc = s.view(batch, groups, stop - start, nbc, bs).amax(-1)
        bsc.scatter_(-1, forced[:, :, start:stop].long(), float("inf"))
        kk = min(k, nbc)
        top_v, top_i = torch.topk(bsc, kk, dim=-1)
        out[:, :, start:stop, :kk] = torch.where(top_v == float("-inf"), -1, top_i).to(torch.int32)
        if kk < k:
            out[:, :, start:stop, kk:] = -1
    del nb
    return out


# ----------------------------------------------------------------------------------- runner


class Runner:
    def __init__(self, args):
        self.args = args
        self.results = []
        self.checks = {}
        self.errors = []
        self.budget = Budget(args.time_budget)
        self.sparse = None
        self.sparse_note = None
        try:
            from tsfm_msa.kernels.sparse_attention_triton import sparse_attention_triton

            self.sparse = sparse_attention_triton
        except Exception as e:  # noqa: BLE001
            self.sparse_note = f"missing: {type(e).__name__}: {e}"
        try:
            from tsfm_msa.kernels.select_blocks_triton import select_blocks_triton

            self.select = select_blocks_triton
        except Exception as e:  # noqa: BLE001
            self.select = None
            self.errors.append({"what": "import select_blocks", "error": repr(e)})
        try:
            from tsfm_msa.kernels.indexer_kl_triton import indexer_kl_triton

            self.kl = indexer_kl_triton
        except Exception as e:  # noqa: BLE001
            self.kl = None
            self.errors.append({"what": "import indexer_kl", "error": repr(e)})
        try:
            from fla.ops.nsa import parallel_nsa  # noqa: F401

            self.fla = parallel_nsa
            self.fla_note = "installed"
        except Exception as e:  # noqa: BLE001
            self.fla = None
            self.fla_note = f"not installed ({type(e).__name__})"
        self._flex = None
        self.only = set(x.strip() for x in args.only.split(",")) if args.only else None

    def want(self, group):
        return self.only is None or group in self.only

    # -- recording
    def record(self, shape, L, contender, ms=None, flops=None, **extra):
        row = {"shape": shape, "L": L, "contender": contender, "ms": ms}
        if ms is not None and flops:
            row["tflops"] = flops / (ms * 1e-3) / 1e12
            row["pct_of_790"] = 100.0 * row["tflops"] / PEAK_TFLOPS
        row.update(extra)
        self.results.append(row)
        tf = f"{row['tflops']:7.1f} TF/s" if "tflops" in row else ""
        msg = f"{ms:10.3f} ms {tf}" if ms is not None else str(extra.get("status", ""))
        print(f"  [{shape:5s} L={L:>8d}] {contender:34s} {msg}", flush=True)
        return row

    def attempt(self, shape, L, contender, fn, flops=None, need_s=5.0, **extra):
        if self.budget.left() < need_s:
            return self.record(shape, L, contender, status="skipped: time budget", **extra)
        try:
            ms = bench(fn)
            return self.record(shape, L, contender, ms, flops, **extra)
        except Exception as e:  # noqa: BLE001
            msg = f"{type(e).__name__}: {str(e)[:300]}"
            self.errors.append({"shape": shape, "L": L, "contender": contender, "error": msg})
            return self.record(shape, L, contender, status="failed: " + msg.splitlines()[0][:160], **extra)
        finally:
            free()

    def flex(self):
        if self._flex is None:
            from torch.nn.attention.flex_attention import flex_attention

            # One compiled graph per shape: without a higher limit dynamo falls back to eager flex after
            # a few recompiles, which materializes the full score matrix and runs out of memory.
            import torch._dynamo

            for knob in ("cache_size_limit", "recompile_limit"):
                if hasattr(torch._dynamo.config, knob):
                    setattr(torch._dynamo.config, knob, 256)
            self._flex = torch.compile(flex_attention, dynamic=False)
        return self._flex

    def call_sparse(self, q, k, v, block_idx, qt, kt, variant):
        try:
            return self.sparse(q, k, v, block_idx, qt, kt, BS, variant=variant)
        except TypeError:
            return self.sparse(q, k, v, block_idx, qt, kt, BS)

    # -- correctness checks (bf16, moderate L)
    def run_checks(self):
        dev = "cuda"
        dt = torch.bfloat16
        L = 4096 if self.args.quick else 8192
        G, Hq, D, Di = 4, 16, 128, 64
        gen = torch.Generator(device=dev).manual_seed(123)
        qi = torch.randn(1, G, L, Di, device=dev, dtype=dt, generator=gen)
        ki = torch.randn(1, L, Di, device=dev, dtype=dt, generator=gen)
        t = torch.arange(L, device=dev, dtype=torch.int32)[None]
        forced = (torch.arange(L, device=dev) // BS).to(torch.int32).view(1, 1, L, 1).expand(1, G, L, 1).contiguous()
        if self.select is not None:
            try:
                gi, gs = self.select(qi, ki, t, t, BS, TOPK, None, forced, return_scores=True)
                ri, rs = ref.select_blocks_reference(qi, ki, t, t, BS, TOPK, None, forced, return_scores=True)
                same = (gi.sort(-1).values == ri.sort(-1).values).all(-1).float().mean().item()
                fin = torch.isfinite(rs)
                err = (gs.sort(-1).values - rs.sort(-1).values)[fin.sort(-1).values].abs().max().item()
                self.checks["select_blocks"] = {"L": L, "rows_identical_sets": same, "max_abs_score_err": err,
                                                "ok": same > 0.99 and err < 5e-2}
            except Exception as e:  # noqa: BLE001
                self.checks["select_blocks"] = {"error": repr(e)[:400]}
        Lk = 4096
        q = torch.randn(1, Hq, Lk, D, device=dev, dtype=dt, generator=gen)
        k = torch.randn(1, G, Lk, D, device=dev, dtype=dt, generator=gen)
        v = torch.randn(1, G, Lk, D, device=dev, dtype=dt, generator=gen)
        tk = t[:, :Lk].contiguous()
        bidx = make_pattern("local", Lk, G, seed=5)
        if self.sparse is not None:
            for variant in ("query_outer", "kv_outer"):
                try:
                    qq, kk2, vv = (x.clone().requires_grad_() for x in (q, k, v))
                    out, lse = self.call_sparse(qq, kk2, vv, bidx, tk, tk, variant)
                    do = torch.randn_like(out)
                    torch.autograd.backward([out], [do])
                    qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
                    o_r, l_r = ref.sparse_attention_reference(qr, kr, vr, bidx, tk, tk, BS)
                    torch.autograd.backward([o_r], [do])
                    rel = {n: ((a.grad.float() - b.grad.float()).abs().max() / b.grad.float().abs().max()).item()
                           for n, a, b in (("dq", qq, qr), ("dk", kk2, kr), ("dv", vv, vr))}
                    self.checks[f"sparse_attention_{variant}"] = {
                        "L": Lk, "pattern": "local", "out_max_abs_err": (out.float() - o_r.float()).abs().max().item(),
                        "lse_max_abs_err": (lse - l_r).abs().max().item(), "grad_rel_err": rel}
                except Exception as e:  # noqa: BLE001
                    self.checks[f"sparse_attention_{variant}"] = {"error": repr(e)[:400]}
                free()
        if self.kl is not None:
            try:
                qik = qi[:, :, :Lk].contiguous()
                kik = ki[:, :Lk].contiguous()
                _, lse = ref.sparse_attention_reference(q, k, v, bidx, tk, tk, BS)
                res = {}
                for name, fn in (("ref", ref.indexer_kl_reference), ("tri", self.kl)):
                    a = qik.clone().requires_grad_()
                    b = kik.clone().requires_grad_()
                    loss = fn(a, b, bidx, q, k, lse, tk, tk, BS)
                    loss.backward()
                    res[name] = (loss.item(), a.grad.float(), b.grad.float())
                rel = lambda x, y: ((x - y).abs().max() / y.abs().max()).item()  # noqa: E731
                self.checks["indexer_kl"] = {
                    "L": Lk, "loss_ref": res["ref"][0], "loss_triton": res["tri"][0],
                    "loss_rel_err": abs(res["ref"][0] - res["tri"][0]) / abs(res["ref"][0]),
                    "dqi_rel_err": rel(res["tri"][1], res["ref"][1]), "dki_rel_err": rel(res["tri"][2], res["ref"][2])}
            except Exception as e:  # noqa: BLE001
                self.checks["indexer_kl"] = {"error": repr(e)[:400]}
        free()
        for name, c in self.checks.items():
            print(f"  check {name}: {c}", flush=True)

    # -- one shape
    def run_shape(self, shape, L):
        cfg = SHAPES[shape]
        Hq, G, D, Di = cfg["Hq"], cfg["G"], cfg["D"], cfg["Di"]
        fwd_only = L > cfg["fwd_only_above"]
        dev, dt = "cuda", torch.bfloat16
        print(f"== {shape}: Hq={Hq} G={G} D={D} Di={Di} L={L}{' (forward only)' if fwd_only else ''}", flush=True)
        gen = torch.Generator(device=dev).manual_seed(L)
        q = torch.randn(1, Hq, L, D, device=dev, dtype=dt, generator=gen)
        k = torch.randn(1, G, L, D, device=dev, dtype=dt, generator=gen)
        v = torch.randn(1, G, L, D, device=dev, dtype=dt, generator=gen)
        t = torch.arange(L, device=dev, dtype=torch.int32)[None].contiguous()
        sel_flops = 4.0 * L * Hq * D * SELECTED
        dense_flops = 4.0 * L * L / 2 * Hq * D
        score_flops = float(L) * L * G * Di  # 2 * (L^2 / 2) * G * Di
        big = L > self.args.skip_dense_above

        def grads(*xs):
            return [x.detach().clone().requires_grad_() for x in xs]

        # dense SDPA
        dense_ms = None
        if not self.want("dense"):
            pass
        elif big:
            quoted = QUOTED.get((shape, L, "dense_fwd"))
            self.record(shape, L, "dense_sdpa fwd", quoted, dense_flops,
                        status="skipped (L > --skip-dense-above)",
                        source="quoted from DESIGN.md, not measured" if quoted else None)
            dense_ms = quoted
        else:
            r = self.attempt(shape, L, "dense_sdpa fwd",
                             lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                             dense_flops, need_s=10)
            dense_ms = r.get("ms")
            if not fwd_only:
                qg, kg, vg = grads(q, k, v)
                do = torch.randn_like(q)

                def dense_fb():
                    o = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, enable_gqa=True)
                    o.backward(do)

                self.attempt(shape, L, "dense_sdpa fwd+bwd", dense_fb, 3.5 * dense_flops, need_s=20)
                del qg, kg, vg, do
        free()

        # patterns
        patterns = {}
        for name in ("tile", "local", "random"):
            patterns[name] = make_pattern(name, L, G, seed=L + len(name))

        # FlexAttention with pattern (i)
        try:
            if not self.want("flex"):
                raise _Skip
            bm = flex_block_mask(L, patterns["tile"])
            flex = self.flex()
            self.attempt(shape, L, "flex (i) fwd", lambda: flex(q, k, v, block_mask=bm, enable_gqa=True),
                         sel_flops, need_s=40)
            if not fwd_only:
                qg, kg, vg = grads(q, k, v)
                do = torch.randn_like(q)

                def flex_fb():
                    flex(qg, kg, vg, block_mask=bm, enable_gqa=True).backward(do)

                self.attempt(shape, L, "flex (i) fwd+bwd", flex_fb, 3.5 * sel_flops, need_s=60)
                del qg, kg, vg, do
            del bm
        except _Skip:
            pass
        except Exception as e:  # noqa: BLE001
            self.errors.append({"shape": shape, "L": L, "contender": "flex", "error": repr(e)[:300]})
            self.record(shape, L, "flex (i)", status=f"failed: {repr(e)[:160]}")
        free()

        # our sparse attention
        best_fwd = {}
        if not self.want("sparse"):
            pass
        elif self.sparse is None:
            self.record(shape, L, "sparse_attention", status=self.sparse_note)
        else:
            for pname, label in (("tile", "(i)"), ("local", "(ii)"), ("random", "(iii)")):
                bidx = patterns[pname]
                for variant in ("query_outer", "kv_outer"):
                    r = self.attempt(shape, L, f"sparse {label} {variant} fwd",
                                     lambda: self.call_sparse(q, k, v, bidx, t, t, variant), sel_flops, need_s=15)
                    if r.get("ms") is not None:
                        best_fwd[pname] = min(best_fwd.get(pname, (1e30, None)), (r["ms"], variant))
                    if not fwd_only:
                        qg, kg, vg = grads(q, k, v)
                        do = torch.randn_like(q)

                        def sp_fb():
                            out, _ = self.call_sparse(qg, kg, vg, bidx, t, t, variant)
                            out.backward(do)

                        self.attempt(shape, L, f"sparse {label} {variant} fwd+bwd", sp_fb, 3.5 * sel_flops, need_s=20)
                        del qg, kg, vg, do
                        free()

        # fla NSA (pattern iii)
        if self.fla is None and self.want("sparse"):
            self.record(shape, L, "fla parallel_nsa (iii)", status=self.fla_note)
        free()

        # select_blocks vs the torch-ops pipeline
        sel_idx = None
        if self.select is not None:
            qi = torch.randn(1, G, L, Di, device=dev, dtype=dt, generator=gen)
            ki = torch.randn(1, L, Di, device=dev, dtype=dt, generator=gen)
            forced = (torch.arange(L, device=dev) // BS).to(torch.int32).view(1, 1, L, 1).expand(1, G, L, 1).contiguous()
            sel_ms = None
            if self.want("select") or self.want("layer"):
                r = self.attempt(shape, L, "select_blocks (ours)",
                                 lambda: self.select(qi, ki, t, t, BS, TOPK, None, forced), score_flops, need_s=20)
                sel_ms = r.get("ms")
            if self.args.select_sweep and self.want("select"):
                from tsfm_msa.kernels import select_blocks_triton as sbm

                for conf in self.args.select_sweep.split(","):
                    rows, warps, stages = (int(x) for x in conf.split(":"))
                    sbm.CONFIG_OVERRIDE.clear()
                    sbm.CONFIG_OVERRIDE.update(rows=rows, num_warps=warps, num_stages=stages)
                    self.attempt(shape, L, f"select sweep rows={rows} w={warps} s={stages}",
                                 lambda: self.select(qi, ki, t, t, BS, TOPK, None, forced), score_flops, need_s=20)
                sbm.CONFIG_OVERRIDE.clear()
            if not self.want("select"):
                pass
            elif L <= self.args.torch_select_max_l:
                r2 = self.attempt(shape, L, "select torch-ops pipeline",
                                  lambda: torch_select_pipeline(qi, ki, t, t, BS, TOPK, forced), score_flops, need_s=30)
                if sel_ms and r2.get("ms"):
                    r2["speedup_ours_vs_this"] = r2["ms"] / sel_ms
            else:
                self.record(shape, L, "select torch-ops pipeline", status="skipped (too slow at this L)")
            # MSA layer forward: select + attend
            if self.sparse is not None and sel_ms is not None and self.want("layer"):
                sel_idx = self.select(qi, ki, t, t, BS, TOPK, None, forced)
                variant = best_fwd.get("random", (0, "auto"))[1]

                def layer():
                    bi = self.select(qi, ki, t, t, BS, TOPK, None, forced)
                    return self.call_sparse(q, k, v, bi, t, t, variant)

                r3 = self.attempt(shape, L, f"msa layer fwd (select+{variant})", layer, None, need_s=15)
                if r3.get("ms") and dense_ms:
                    r3["speedup_vs_dense_fwd"] = dense_ms / r3["ms"]
                    if (shape, L, "dense_fwd") in QUOTED:
                        r3["dense_source"] = "quoted from DESIGN.md"
            # KL kernel vs reference
            if self.kl is not None and L <= self.args.kl_max_l and self.want("kl"):
                bidx = sel_idx if sel_idx is not None else patterns["local"]
                lse = None
                if self.sparse is not None:
                    try:
                        with torch.no_grad():
                            _, lse = self.call_sparse(q, k, v, bidx, t, t, "auto")
                    except Exception:  # noqa: BLE001
                        lse = None
                if lse is None:
                    lse = torch.full((1, Hq, L), 8.0, device=dev)
                kl_flops = 2.0 * L * Hq * D * SELECTED + 2.0 * L * G * Di * SELECTED
                self.attempt(shape, L, "indexer_kl (ours) fwd",
                             lambda: self.kl(qi, ki, bidx, q, k, lse, t, t, BS), kl_flops, need_s=15)
                if not fwd_only:
                    qa, kb = grads(qi, ki)
                    self.attempt(shape, L, "indexer_kl (ours) fwd+bwd",
                                 lambda: self.kl(qa, kb, bidx, q, k, lse, t, t, BS).backward(), 3 * kl_flops,
                                 need_s=15)
                if L <= self.args.kl_ref_max_l:
                    self.attempt(shape, L, "indexer_kl reference fwd",
                                 lambda: ref.indexer_kl_reference(qi, ki, bidx, q, k, lse, t, t, BS), kl_flops,
                                 need_s=30)
                    if not fwd_only:
                        qa, kb = grads(qi, ki)
                        self.attempt(shape, L, "indexer_kl reference fwd+bwd",
                                     lambda: ref.indexer_kl_reference(qa, kb, bidx, q, k, lse, t, t, BS).backward(),
                                     3 * kl_flops, need_s=30)
            del qi, ki, forced
        del q, k, v, patterns, sel_idx
        free()

    # -- summary
    def find(self, shape, L, contender):
        for r in self.results:
            if r["shape"] == shape and r["L"] == L and r["contender"] == contender:
                return r.get("ms")
        return None

    def targets(self):
        out = {}
        L = 131072
        f = self.find
        flex_f, flex_fb = f("tsfm", L, "flex (i) fwd"), f("tsfm", L, "flex (i) fwd+bwd")
        ours_f = min([x for x in (f("tsfm", L, "sparse (i) query_outer fwd"), f("tsfm", L, "sparse (i) kv_outer fwd")) if x],
                     default=None)
        ours_fb = min([x for x in (f("tsfm", L, "sparse (i) query_outer fwd+bwd"),
                                   f("tsfm", L, "sparse (i) kv_outer fwd+bwd")) if x], default=None)
        out["sparse_vs_flex_tsfm_128K_fwd"] = {"ours_ms": ours_f, "flex_ms": flex_f, "target": "<= 4.0 ms and >= 1.5x flex",
                                               "met": bool(ours_f and flex_f and ours_f <= 4.0 and flex_f / ours_f >= 1.5)}
        out["sparse_vs_flex_tsfm_128K_fwd_bwd"] = {"ours_ms": ours_fb, "flex_ms": flex_fb, "target": "<= 15 ms and >= 1.5x flex",
                                                   "met": bool(ours_fb and flex_fb and ours_fb <= 15 and flex_fb / ours_fb >= 1.5)}
        for p, label in (("(ii)", "local"), ("(iii)", "random")):
            fw = min([x for x in (f("paper", L, f"sparse {p} query_outer fwd"), f("paper", L, f"sparse {p} kv_outer fwd")) if x],
                     default=None)
            fb = min([x for x in (f("paper", L, f"sparse {p} query_outer fwd+bwd"),
                                  f("paper", L, f"sparse {p} kv_outer fwd+bwd")) if x], default=None)
            out[f"sparse_{label}_paper_128K"] = {
                "fwd_ms": fw, "fwd_bwd_ms": fb, "target": "fwd <= 30 ms, fwd+bwd <= 90 ms (3x fla NSA: 90 / 275 ms quoted)",
                "fla_quoted_ms": FLA_QUOTED_128K, "met": bool(fw and fb and fw <= 30 and fb <= 90)}
        for shape in ("tsfm", "paper"):
            s, tp = f(shape, L, "select_blocks (ours)"), f(shape, L, "select torch-ops pipeline")
            cfg = SHAPES[shape]
            tf = (float(L) * L * cfg["G"] * cfg["Di"] / (s * 1e-3) / 1e12) if s else None
            out[f"select_{shape}_128K"] = {"ours_ms": s, "torch_ms": tp, "speedup": (tp / s) if (s and tp) else None,
                                           "scoring_tflops": tf, "target": ">= 20x torch pipeline and >= 395 TFLOP/s",
                                           "met": bool(s and tp and tp / s >= 20 and tf >= 395)}
        for shape, L2, need in (("tsfm", 131072, 8.0), ("paper", 1 << 20, 20.0)):
            row = next((r for r in self.results if r["shape"] == shape and r["L"] == L2
                        and r["contender"].startswith("msa layer fwd")), None)
            sp = row.get("speedup_vs_dense_fwd") if row else None
            out[f"msa_layer_vs_dense_{shape}_{L2}"] = {"layer_ms": row.get("ms") if row else None, "speedup": sp,
                                                      "target": f">= {need}x", "met": bool(sp and sp >= need)}
        return out


def print_table(results):
    print("\n" + "=" * 100)
    print(f"{'shape':6s} {'L':>8s}  {'contender':40s} {'ms':>10s} {'TFLOP/s':>9s} {'% of 790':>8s}  note")
    for r in results:
        ms = f"{r['ms']:.3f}" if r.get("ms") is not None else "-"
        tf = f"{r['tflops']:.1f}" if "tflops" in r else "-"
        pc = f"{r['pct_of_790']:.1f}" if "pct_of_790" in r else "-"
        note = r.get("status") or ""
        for key in ("speedup_ours_vs_this", "speedup_vs_dense_fwd"):
            if key in r:
                note += f" {key}={r[key]:.1f}x"
        if r.get("source"):
            note += " " + r["source"]
        print(f"{r['shape']:6s} {r['L']:>8d}  {r['contender']:40s} {ms:>10s} {tf:>9s} {pc:>8s}  {note}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="tsfm,paper")
    p.add_argument("--quick", action="store_true", help="small L only (smoke run)")
    p.add_argument("--skip-dense-above", type=int, default=131072)
    p.add_argument("--torch-select-max-l", type=int, default=131072)
    p.add_argument("--kl-max-l", type=int, default=131072)
    p.add_argument("--kl-ref-max-l", type=int, default=8192)
    p.add_argument("--select-sweep", default=None,
                   help="time select_blocks launch configurations, e.g. 128:4:2,256:4:3 (rows:warps:stages)")
    p.add_argument("--time-budget", type=float, default=450.0, help="seconds; later contenders are skipped")
    p.add_argument("--no-checks", action="store_true")
    p.add_argument("--ls", default=None, help="comma list of L overriding the shapes' lengths")
    p.add_argument("--only", default=None, help="comma list of groups: dense,flex,sparse,select,layer,kl")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    import triton

    runner = Runner(args)
    gpu = torch.cuda.get_device_name()
    print(f"GPU {gpu}, torch {torch.__version__}, triton {triton.__version__}; sparse_attention: "
          f"{'present' if runner.sparse else runner.sparse_note}; fla: {runner.fla_note}", flush=True)
    if not args.no_checks:
        runner.run_checks()
    for shape in [s.strip() for s in args.shapes.split(",") if s.strip()]:
        lengths = QUICK_LS[shape] if args.quick else SHAPES[shape]["Ls"]
        if args.ls:
            lengths = [int(x) for x in args.ls.split(",")]
        for L in lengths:
            try:
                runner.run_shape(shape, L)
            except Exception as e:  # noqa: BLE001
                runner.errors.append({"shape": shape, "L": L, "error": repr(e)[:400], "trace": traceback.format_exc()[-1500:]})
                print(f"  shape {shape} L={L} failed: {e!r}", flush=True)
            free()
    date = _dt.datetime.now().strftime("%Y-%m-%d")
    gpu_tag = gpu.replace("NVIDIA ", "").replace(" ", "-").lower()
    doc = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"), "gpu": gpu, "torch": torch.__version__,
        "triton": triton.__version__, "python": platform.python_version(), "args": vars(args),
        "settings": {"dtype": "bfloat16", "causal": True, "batch": 1, "block_size": BS, "k": TOPK,
                     "selected_tokens": SELECTED, "peak_tflops": PEAK_TFLOPS,
                     "flops": {"selected_attention_fwd": "4*L*Hq*D*2048", "fwd_bwd": "3.5x fwd",
                               "dense_fwd": "4*L^2/2*Hq*D", "index_scoring": "L^2*G*Di (causal half of 2*L^2*G*Di)"}},
        "sparse_attention": "present" if runner.sparse else runner.sparse_note, "fla_nsa": runner.fla_note,
        "checks": runner.checks, "results": runner.results, "targets": runner.targets(), "errors": runner.errors,
        "quoted": {"dense_fwd_paper_1M_ms": 39000.0, "fla_nsa_paper_128K_ms": FLA_QUOTED_128K,
                   "source": "DESIGN.md section 8 / issue 3 (measured earlier on this H200)"},
        "wall_s": time.time() - runner.budget.t0,
    }
    name = f"{date}-{gpu_tag}-attention{'-quick' if args.quick else ''}.json"
    paths = [ROOT / "benchmarks" / "results" / name]
    if os.environ.get("OUT"):
        paths.append(Path(os.environ["OUT"]) / name)
    if args.out:
        paths.append(Path(args.out))
    for path in paths:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(doc, indent=1, default=str))
            print(f"wrote {path}")
        except OSError as e:
            print(f"could not write {path}: {e}")
    print_table(runner.results)
    print("\ntargets:")
    for name_, t in doc["targets"].items():
        print(f"  {name_}: {'MET' if t['met'] else 'not met'}  {t}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
