"""GPU benchmark of the MSA attention ops (issue 10): every contender measured in one run.

Shapes (bf16, batch 1, blocks of 128, top-16 = 2,048 selected tokens per query and group, time =
position): ``tsfm`` 16 query / 4 KV heads, head dim 128, index dim 64, at 128K tokens; ``paper`` 64 / 4
heads, head dim 128, index dim 128, at 128K and 1M tokens (1M: forward only).

Contenders, per shape and length:
- dense: SDPA causal with GQA, forward (and forward+backward at tsfm 128K). At 1M the forward runs as
  8 slices of 8 query heads (one KV head each: every tensor stays under 2^31 elements), one rep each;
  when the time budget is short, one slice is timed and multiplied by 8 (the row says which).
- FlexAttention (compiled) with the tile-shared BlockMask of pattern (i), forward and forward+backward
  (tsfm 128K).
- fla's NSA kernel (``fla.ops.nsa.parallel_nsa`` with per-token block indices) on patterns (ii) and
  (iii), forward and forward+backward (paper 128K; fla requires >= 16 query heads per KV head).
- ours, ``sparse_attention``: patterns (i) tile-shared, (ii) per-token local-overlap, (iii) per-token
  random, both loop orders (query_outer, kv_outer); on (i) the backward both split (dk/dv owners + a
  query-outer dq kernel) and fused (dq added atomically by the owners), also timed alone.
- ``select_blocks`` against the torch-ops pipeline (tsfm 128K), the indexer-KL kernel (forward and
  forward+backward, TFLOP/s on its FLOPs) and the whole MSA layer forward (select + attention + KL)
  against the dense forward of the same run.

Every path of ours and fla's kernel is checked against the fp32 PyTorch reference in bf16 at 4K tokens
before anything is timed (``checks`` in the JSON; a timed row names its check). Times are medians of
CUDA-event reps after a warm-up (1-10 reps by duration). ``--budget-seconds`` skips what no longer fits
(recorded as skipped), so the run always ends and writes its files.

    source benchmarks/gpu_setup.sh && python benchmarks/attention.py            # on the H200
    TRITON_INTERPRET=1 python benchmarks/attention.py --smoke --out /tmp/smoke  # CPU dry run, tiny shapes

Writes ``<date>-<gpu>-attention.json`` and ``.md`` to ``$OUT/benchmarks/results/`` (when OUT is set)
and to ``benchmarks/results/`` of the checkout (``--out DIR`` replaces both).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import importlib
import json
import math
import os
import platform
import statistics
import time
import traceback
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from tsfm_msa.kernels import indexer_kl_reference, select_blocks_reference, sparse_attention_reference

sa = importlib.import_module("tsfm_msa.kernels.sparse_attention_triton")
sel_mod = importlib.import_module("tsfm_msa.kernels.select_blocks_triton")
kl_mod = importlib.import_module("tsfm_msa.kernels.indexer_kl_triton")

ROOT = Path(__file__).resolve().parents[1]
PEAK_TFLOPS = 790.0  # bf16 dense matmul measured on the H200
K128, M1 = 131072, 1 << 20

# name -> query heads, KV heads, head dim, index dim
SHAPES = {"tsfm": (16, 4, 128, 64), "paper": (64, 4, 128, 128)}
# (shape, L, forward only) in run order: the targets first, the 1M forward last.
RUNS = [("tsfm", K128, False), ("paper", K128, False), ("paper", M1, True)]
PATTERNS = {"tile": "(i) tile-shared", "local": "(ii) local-overlap", "random": "(iii) random"}
# backward launch configurations timed on (i): (rows, keys) of the dk/dv owners, the default first;
# 64 rows a step is the item 1b (more rows per dk += dS^T Q step)
SPLIT_CONFIGS = [(32, 128), (64, 64)]
FUSED_CONFIGS = [(32, 128), (64, 64)]


class Setting:
    """Sizes of one run: the GPU one, or a tiny CPU dry run (interpreter, fp32)."""

    def __init__(self, smoke: bool):
        self.smoke = smoke
        self.device = "cpu" if smoke else "cuda"
        self.dtype = torch.float32 if smoke else torch.bfloat16
        self.bs, self.topk = (16, 4) if smoke else (128, 16)
        self.check_len = 64 if smoke else 4096
        self.shapes = {"tsfm": (4, 2, 16, 16), "paper": (16, 1, 16, 16)} if smoke else SHAPES
        self.runs = [("tsfm", 64, False), ("paper", 64, False), ("paper", 96, True)] if smoke else RUNS

    @property
    def selected(self) -> int:
        return self.bs * self.topk


# ----------------------------------------------------------------------------------- timing
class Clock:
    def __init__(self, budget_s: float, device: str):
        self.t0 = time.time()
        self.budget_s = budget_s
        self.cuda = device == "cuda"

    def left(self) -> float:
        return self.budget_s - (time.time() - self.t0)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def once(self, fn) -> float:
        """Milliseconds of one call (CUDA events on the GPU)."""
        if not self.cuda:
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)

    def wall(self, fn) -> float:
        self.sync()
        t = time.perf_counter()
        fn()
        self.sync()
        return (time.perf_counter() - t) * 1e3

    def bench(self, fn, need_s: float) -> tuple[float, int]:
        """(median ms, reps): a warm-up call (compiles), a second one when the first was slow (the
        first may have been mostly compilation), then 1-10 timed reps that fit the budget."""
        est = self.wall(fn)
        if not self.cuda:  # the interpreter dry run: one rep shows the code path works
            return self.once(fn), 1
        if est > 50:
            est = self.wall(fn)
        reps = 10 if est < 20 else 5 if est < 100 else 3 if est < 1000 else 1
        reps = max(1, min(reps, int((self.left() - need_s) * 1e3 / max(est, 1e-3))))
        times = [self.once(fn) for _ in range(reps)]
        return statistics.median(times), reps


def free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def kernel_config(**changes):
    """Temporarily change ``sparse_attention_triton.CONFIG`` entries."""
    old = {key: sa.CONFIG[key] for key in changes}
    sa.CONFIG.update(changes)
    try:
        yield
    finally:
        sa.CONFIG.update(old)


# ----------------------------------------------------------------------------------- inputs
def _stratified(upper: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` distinct blocks in ``[0, upper)`` (``upper`` int tensor), one per stratum of ``[0, upper)``
    cut into ``n`` intervals; -1 where a stratum is empty (``upper < n``)."""
    s = torch.arange(n, device=upper.device)
    lo = (s * upper[..., None]) // n
    hi = ((s + 1) * upper[..., None]) // n
    r = torch.rand(*upper.shape, n, device=upper.device, generator=gen)
    pick = lo + (r * (hi - lo).float()).long().clamp_max((hi - lo - 1).clamp_min(0))
    return torch.where(hi > lo, pick, -1)


def make_pattern(name: str, seq_len: int, groups: int, st: Setting, seed: int) -> torch.Tensor:
    """``block_idx [1, G, L, topk]`` int32: the query's own block first, then ``topk - 1`` earlier blocks
    (-1 where fewer exist). tile: shared by the queries of a block-sized tile (and the groups); local:
    per token, one of each of ``topk - 1`` pairs of a per-(group, tile) pool (queries of a tile overlap
    by about half); random: per token, stratified over all earlier blocks."""
    gen = torch.Generator(device=st.device).manual_seed(seed)
    dev, nb, rest = st.device, -(-seq_len // st.bs), st.topk - 1
    own = torch.arange(seq_len, device=dev) // st.bs  # [L]
    tiles = torch.arange(nb, device=dev)
    if name == "tile":
        sel = torch.cat([tiles[:, None], _stratified(tiles, rest, gen)], 1)[own]  # [L, topk]
        sel = sel[None].expand(groups, seq_len, st.topk)
    elif name == "local":
        pool = _stratified(tiles[None].expand(groups, nb), 2 * rest, gen)[:, own].view(groups, seq_len, rest, 2)
        bit = (torch.rand(groups, seq_len, rest, device=dev, generator=gen) < 0.5).long()[..., None]
        a, b = pool.gather(-1, bit).squeeze(-1), pool.gather(-1, 1 - bit).squeeze(-1)
        sel = torch.cat([own[None, :, None].expand(groups, seq_len, 1), torch.where(a >= 0, a, b)], -1)
    elif name == "random":
        sel = torch.cat([own[None, :, None].expand(groups, seq_len, 1),
                         _stratified(own[None].expand(groups, seq_len), rest, gen)], -1)
    else:
        raise ValueError(name)
    return sel[None].to(torch.int32).contiguous()


def flex_block_mask(tile_sel: torch.Tensor, seq_len: int, st: Setting):
    """FlexAttention BlockMask of the tile-shared selection: per query tile, its own block (causal
    partial block) plus the earlier chosen blocks as full blocks."""
    from torch.nn.attention.flex_attention import BlockMask

    nb = -(-seq_len // st.bs)
    sel = tile_sel[0, 0, ::st.bs]  # [nb, topk]
    others = sel[:, 1:]
    full_num = (others >= 0).sum(-1).to(torch.int32)
    full_idx = torch.zeros(nb, nb, dtype=torch.int32, device=sel.device)
    full_idx[:, :st.topk - 1] = torch.where(others >= 0, others, nb).sort(-1).values.clamp_max(nb - 1)
    kv_idx = torch.zeros(nb, nb, dtype=torch.int32, device=sel.device)
    kv_idx[:, 0] = sel[:, 0]
    kv_num = torch.ones(nb, dtype=torch.int32, device=sel.device)
    return BlockMask.from_kv_blocks(kv_num[None, None], kv_idx[None, None], full_num[None, None],
                                    full_idx[None, None], BLOCK_SIZE=st.bs,
                                    mask_mod=lambda b, h, q_idx, kv_idx_: q_idx >= kv_idx_)


def torch_select_pipeline(qi, ki, q_time, k_time, bs, topk, forced, chunk_bytes=2 << 30):
    """Index selection in torch ops: matmul, time mask, block max-pool, torch.topk, in query chunks
    (keys past a chunk's last query are cut: right for the increasing times of this benchmark)."""
    batch, groups, seq_len, _ = qi.shape
    out = torch.empty(batch, groups, seq_len, topk, dtype=torch.int32, device=qi.device)
    chunk = max(bs, (chunk_bytes // (4 * groups * seq_len)) // bs * bs)
    for start in range(0, seq_len, chunk):
        stop = min(seq_len, start + chunk)
        kend = min(seq_len, -(-stop // bs) * bs)
        s = torch.matmul(qi[:, :, start:stop], ki[:, None, :kend].transpose(-1, -2)).float()
        s = s.masked_fill(k_time[:, None, None, :kend] > q_time[:, None, start:stop, None], float("-inf"))
        nbc = -(-kend // bs)
        s = F.pad(s, (0, nbc * bs - kend), value=float("-inf")).view(batch, groups, stop - start, nbc, bs).amax(-1)
        s.scatter_(-1, forced[:, :, start:stop].long(), float("inf"))
        kk = min(topk, nbc)
        val, idx = torch.topk(s, kk, dim=-1)
        out[:, :, start:stop, :kk] = torch.where(val == float("-inf"), -1, idx).to(torch.int32)
        out[:, :, start:stop, kk:] = -1
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def leaves(*xs: torch.Tensor) -> list[torch.Tensor]:
    return [x.detach().clone().requires_grad_() for x in xs]


def selection_waste(q: torch.Tensor, k: torch.Tensor, block_idx: torch.Tensor, bs: int) -> float:
    """The kernels' own measure: blocks query_outer computes per needed (query, block) pair."""
    sh = sa._Shape(q, k, block_idx, bs)
    tq = sh.tq(sa.CONFIG["qo_rows"])
    return sa._union_waste(block_idx, sa._build_union(block_idx, tq)[1], tq)


class Case(types.SimpleNamespace):
    """Inputs and sizes of one (shape, length)."""

    patterns: dict | None = None
    dense_ms: float | None = None


# ----------------------------------------------------------------------------------- runner
class Bench:
    def __init__(self, args, st: Setting):
        self.args, self.st = args, st
        self.clock = Clock(args.budget_seconds, st.device)
        self.rows: list[dict] = []
        self.checks: dict[str, dict] = {}
        self.errors: list[dict] = []
        self.fla, self.fla_note = None, "not importable"
        try:
            from fla.ops.nsa import parallel_nsa

            import fla

            self.fla, self.fla_note = parallel_nsa, f"fla-core {getattr(fla, '__version__', '?')}"
        except Exception as e:  # noqa: BLE001 - a missing or broken fla is a recorded fact, not a crash
            self.fla_note = f"not importable ({type(e).__name__}: {str(e)[:120]})"
        self._flex = None

    # -- recording
    def save(self, final: bool = False):
        self.doc = document(self, final)
        for directory in output_dirs(self.args):
            directory.mkdir(parents=True, exist_ok=True)
            (directory / f"{self.doc['name']}.json").write_text(json.dumps(self.doc, indent=1, default=str))
            if final:
                (directory / f"{self.doc['name']}.md").write_text(render_markdown(self.doc))

    def record(self, shape, seq_len, contender, ms=None, flops=None, **extra) -> dict:
        row = {"shape": shape, "L": seq_len, "contender": contender, "ms": ms, **extra}
        if ms is not None and flops:
            row["tflops"] = flops / (ms * 1e-3) / 1e12
            row["pct_of_peak"] = 100.0 * row["tflops"] / PEAK_TFLOPS
        self.rows.append(row)
        shown = f"{ms:10.3f} ms" + (f" {row['tflops']:6.0f} TF/s" if "tflops" in row else "") if ms is not None \
            else row.get("status", "")
        print(f"  [{shape} L={seq_len}] {contender:52s} {shown}", flush=True)
        self.save()
        return row

    def time(self, shape, seq_len, contender, fn, flops=None, need_s=5.0, check=None, **extra) -> dict:
        """Times ``fn`` unless the budget is spent (``need_s``: seconds it may take, compile included)."""
        if check is not None:
            c = self.checks.get(check, {})
            extra["check"] = check
            extra["check_ok"] = c.get("ok")
        if self.clock.left() < need_s:
            return self.record(shape, seq_len, contender, status="skipped: time budget", **extra)
        try:
            ms, reps = self.clock.bench(fn, need_s=0.0)
            return self.record(shape, seq_len, contender, ms, flops, reps=reps, **extra)
        except Exception as e:  # noqa: BLE001 - one failing contender must not end the run
            msg = f"{type(e).__name__}: {str(e)[:300]}"
            self.errors.append({"shape": shape, "L": seq_len, "contender": contender, "error": msg,
                                "trace": traceback.format_exc()[-1500:]})
            return self.record(shape, seq_len, contender, status="failed: " + msg.splitlines()[0][:160], **extra)
        finally:
            free()

    def flex(self):
        if self._flex is None:
            import torch._dynamo
            from torch.nn.attention.flex_attention import flex_attention

            # Without a higher limit dynamo falls back to eager flex after a few recompiles, which
            # materializes the whole score matrix.
            for knob in ("cache_size_limit", "recompile_limit"):
                if hasattr(torch._dynamo.config, knob):
                    setattr(torch._dynamo.config, knob, 256)
            self._flex = torch.compile(flex_attention, dynamic=False)
        return self._flex

    # -- our attention, by path
    def sparse(self, path: str, q, k, v, block_idx, t):
        """``path``: query_outer (split backward), fused (query_outer, fused backward), kv_outer, auto."""
        variant = "query_outer" if path == "fused" else path
        with kernel_config(bwd_fused=path == "fused"):
            return sa.sparse_attention_triton(q, k, v, block_idx, t, t, self.st.bs, variant=variant)

    def sparse_fwd_bwd(self, path, q, k, v, block_idx, t, dout):
        variant = "query_outer" if path == "fused" else path
        with kernel_config(bwd_fused=path == "fused"):
            out, _ = sa.sparse_attention_triton(q, k, v, block_idx, t, t, self.st.bs, variant=variant)
            return torch.autograd.grad(out, (q, k, v), dout)

    def nsa(self, q_t, k_t, v_t, block_idx_long):
        """fla's NSA selected-block attention; q [B, L, Hq, D], k/v [B, L, G, D], indices [B, L, G, S]."""
        return self.fla(q_t, k_t, v_t, block_indices=block_idx_long, block_counts=self.st.topk,
                        block_size=self.st.bs)

    # -- correctness, bf16 against the fp32 references, before any timing
    def run_checks(self):
        st = self.st
        dev, dt_, L = st.device, st.dtype, st.check_len
        t = torch.arange(L, device=dev, dtype=torch.int32)[None]
        tol = 2e-2 if dt_ == torch.bfloat16 else 1e-4
        for shape, (hq, g, d, di) in st.shapes.items():
            gen = torch.Generator(device=dev).manual_seed(7)
            q, k, v, dout = (torch.randn(1, h, L, d, device=dev, generator=gen, dtype=dt_) for h in (hq, g, g, hq))
            for pname in PATTERNS:
                bidx = make_pattern(pname, L, g, st, seed=11)
                refs = [x.float().requires_grad_() for x in (q, k, v)]
                r_out, r_lse = sparse_attention_reference(*refs, bidx, t, t, st.bs)
                r_grads = torch.autograd.grad(r_out, refs, dout.float())
                for path in ("query_outer", "fused", "kv_outer"):
                    name = f"sparse {shape} {pname} {path}"
                    try:
                        ins = [x.clone().requires_grad_() for x in (q, k, v)]
                        with kernel_config(bwd_fused=path == "fused"):
                            out, lse = sa.sparse_attention_triton(*ins, bidx, t, t, st.bs,
                                                                  variant="kv_outer" if path == "kv_outer" else "query_outer")
                            grads = torch.autograd.grad(out, ins, dout)
                        fin = torch.isfinite(r_lse)
                        errs = {"out": rel_err(out, r_out), "dq": rel_err(grads[0], r_grads[0]),
                                "dk": rel_err(grads[1], r_grads[1]), "dv": rel_err(grads[2], r_grads[2]),
                                "lse_max_abs": float((lse.detach() - r_lse.detach())[fin].abs().max())}
                        ok = (max(errs["out"], errs["dq"], errs["dk"], errs["dv"]) < tol
                              and torch.equal(torch.isinf(lse), ~fin))
                        self.checks[name] = {"L": L, **errs, "ok": bool(ok)}
                    except Exception as e:  # noqa: BLE001
                        self.checks[name] = {"error": repr(e)[:400], "ok": False}
                if self.fla is not None and shape == "paper" and pname != "tile":
                    name = f"fla_nsa {shape} {pname}"
                    try:
                        ins = [x.transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v)]
                        out = self.nsa(*ins, bidx.transpose(1, 2).long().contiguous())
                        grads = torch.autograd.grad(out, ins, dout.transpose(1, 2).contiguous())
                        errs = {"out": rel_err(out.transpose(1, 2), r_out)}
                        errs.update({n: rel_err(gr.transpose(1, 2), rg) for n, gr, rg in zip(("dq", "dk", "dv"), grads, r_grads)})
                        self.checks[name] = {"L": L, **errs, "ok": max(errs.values()) < tol}
                    except Exception as e:  # noqa: BLE001
                        self.checks[name] = {"error": repr(e)[:400], "ok": False}
                free()
            # select_blocks and indexer-KL on a per-token selection of this shape
            qi = torch.randn(1, g, L, di, device=dev, generator=gen, dtype=dt_)
            ki = torch.randn(1, L, di, device=dev, generator=gen, dtype=dt_)
            forced = (t[0] // st.bs).view(1, 1, L, 1).expand(1, g, L, 1).contiguous()
            try:
                gi, gs = sel_mod.select_blocks_triton(qi, ki, t, t, st.bs, st.topk, None, forced, True)
                ri, rs = select_blocks_reference(qi, ki, t, t, st.bs, st.topk, None, forced, True)
                same = float((gi.sort(-1).values == ri.sort(-1).values).all(-1).float().mean())
                fin = torch.isfinite(rs)
                err = float((gs - rs)[fin].abs().max()) if bool(fin.any()) else 0.0
                # bf16 scores can tie: a tiny fraction of rows may swap near-equal blocks.
                self.checks[f"select_blocks {shape}"] = {"L": L, "rows_same_set": same, "max_abs_score_err": err,
                                                         "ok": same > 0.99}
            except Exception as e:  # noqa: BLE001
                self.checks[f"select_blocks {shape}"] = {"error": repr(e)[:400], "ok": False}
            try:
                bidx = make_pattern("local", L, g, st, seed=13)
                _, lse = sparse_attention_reference(q.float(), k.float(), v.float(), bidx, t, t, st.bs)
                res = {}
                for name, fn in (("ref", indexer_kl_reference), ("triton", kl_mod.indexer_kl_triton)):
                    a, b = qi.clone().requires_grad_(), ki.clone().requires_grad_()
                    loss = fn(a, b, bidx, q, k, lse, t, t, st.bs)
                    res[name] = (float(loss.detach()), *torch.autograd.grad(loss, (a, b)))
                errs = {"loss": abs(res["triton"][0] - res["ref"][0]) / abs(res["ref"][0]),
                        "dqi": rel_err(res["triton"][1], res["ref"][1]), "dki": rel_err(res["triton"][2], res["ref"][2])}
                self.checks[f"indexer_kl {shape}"] = {"L": L, **errs, "ok": max(errs.values()) < tol}
            except Exception as e:  # noqa: BLE001
                self.checks[f"indexer_kl {shape}"] = {"error": repr(e)[:400], "ok": False}
            del q, k, v, dout, qi, ki
            free()
        for name, c in self.checks.items():
            print(f"  check {name}: {c}", flush=True)
        self.save()

    # -- one (shape, length)
    def run(self, shape: str, seq_len: int, fwd_only: bool):
        """All contenders at one (shape, length); at 1M (forward only) the MSA layer and its parts
        come right after dense, before the per-pattern rows, so the layer target gets the budget."""
        st, L = self.st, seq_len
        hq, g, d, di = st.shapes[shape]
        if self.clock.left() < 10:
            self.record(shape, L, "everything at this length", status="skipped: time budget")
            return
        print(f"== {shape}: Hq={hq} G={g} D={d} Di={di} L={L}{' (forward only)' if fwd_only else ''}", flush=True)
        gen = torch.Generator(device=st.device).manual_seed(L)
        c = Case(shape=shape, L=L, fwd_only=fwd_only, hq=hq, g=g, d=d, di=di, gen=gen,
                 q=torch.randn(1, hq, L, d, device=st.device, generator=gen, dtype=st.dtype),
                 k=torch.randn(1, g, L, d, device=st.device, generator=gen, dtype=st.dtype),
                 v=torch.randn(1, g, L, d, device=st.device, generator=gen, dtype=st.dtype),
                 t=torch.arange(L, device=st.device, dtype=torch.int32)[None],
                 sel_flops=4.0 * L * hq * d * st.selected,  # the selected work, forward (backward 2.5x)
                 dense_flops=2.0 * L * L * hq * d)  # causal half of 4 * L^2 * Hq * D
        c.dense_ms = self.run_dense(c)
        free()
        sections = [self.run_index, self.run_ours] if fwd_only else [self.run_flex, self.run_ours, self.run_fla,
                                                                      self.run_index]
        for section in sections:
            try:
                section(c)
            except Exception as e:  # noqa: BLE001 - e.g. out of memory in a preparation step
                self.errors.append({"shape": shape, "L": L, "section": section.__name__, "error": repr(e)[:400],
                                    "trace": traceback.format_exc()[-1500:]})
                self.record(shape, L, section.__name__, status=f"failed: {repr(e)[:160]}")
            free()

    def patterns(self, c: "Case") -> dict[str, torch.Tensor]:
        if c.patterns is None:
            c.patterns = {p: make_pattern(p, c.L, c.g, self.st, seed=c.L + i) for i, p in enumerate(PATTERNS)}
            waste = {PATTERNS[p]: round(selection_waste(c.q, c.k, bidx, self.st.bs), 3) for p, bidx in c.patterns.items()}
            self.record(c.shape, c.L, "union waste of the patterns", status="info", waste=waste)
        return c.patterns

    def run_dense(self, c: "Case") -> float | None:
        q, k, v = c.q, c.k, c.v
        if c.fwd_only:
            return self.dense_sliced(c.shape, c.L, q, k, v, c.dense_flops)
        row = self.time(c.shape, c.L, "dense SDPA fwd",
                        lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                        c.dense_flops, need_s=10)
        if c.shape == "tsfm":
            qg, kg, vg = leaves(q, k, v)
            dout = torch.randn_like(q)
            self.time(c.shape, c.L, "dense SDPA fwd+bwd", lambda: torch.autograd.grad(
                F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, enable_gqa=True), (qg, kg, vg), dout),
                3.5 * c.dense_flops, need_s=15)
        return row.get("ms")

    def run_flex(self, c: "Case"):
        """FlexAttention with the BlockMask of (i), tsfm shape (the issue's comparison)."""
        if c.shape != "tsfm":
            return
        if self.st.smoke:
            self.record(c.shape, c.L, "flex (i) fwd", status="skipped: smoke run (no compiled flex on CPU)")
            return
        q, k, v = c.q, c.k, c.v
        bm = flex_block_mask(self.patterns(c)["tile"], c.L, self.st)
        flex = self.flex()
        self.time(c.shape, c.L, "flex (i) fwd", lambda: flex(q, k, v, block_mask=bm, enable_gqa=True),
                  c.sel_flops, need_s=60)
        qg, kg, vg = leaves(q, k, v)
        dout = torch.randn_like(q)
        self.time(c.shape, c.L, "flex (i) fwd+bwd", lambda: torch.autograd.grad(
            flex(qg, kg, vg, block_mask=bm, enable_gqa=True), (qg, kg, vg), dout), 3.5 * c.sel_flops, need_s=90)

    def run_ours(self, c: "Case"):
        """Our attention on every pattern: both loop orders forward; split, fused and kv_outer
        backward (query_outer's split backward is skipped on (iii), where its union waste is ~17);
        on (i) the backward alone, split against the fused configurations. 1M: auto, forward only."""
        st, shape, L, q, k, v, t = self.st, c.shape, c.L, c.q, c.k, c.v, c.t
        scale = 1.0 / math.sqrt(c.d)
        for p, bidx in self.patterns(c).items():
            label = PATTERNS[p].split()[0]
            for path in ["auto"] if c.fwd_only else ["query_outer", "kv_outer"]:
                self.time(shape, L, f"ours {label} {path} fwd", lambda: self.sparse(path, q, k, v, bidx, t),
                          c.sel_flops, need_s=20 if c.fwd_only else 8,
                          check=None if path == "auto" else f"sparse {shape} {p} {path}", pattern=p, path=path)
            if c.fwd_only:
                continue
            qg, kg, vg = leaves(q, k, v)
            dout = torch.randn_like(q)
            for path in ["query_outer", "fused", "kv_outer"] if p != "random" else ["fused", "kv_outer"]:
                self.time(shape, L, f"ours {label} {path} fwd+bwd",
                          lambda: self.sparse_fwd_bwd(path, qg, kg, vg, bidx, t, dout), 3.5 * c.sel_flops,
                          need_s=10, check=f"sparse {shape} {p} {path}", pattern=p, path=path)
            if p != "tile":
                continue
            out, lse = self.sparse("query_outer", q, k, v, bidx, t)

            def bwd(fused):
                with kernel_config(bwd_fused=fused):
                    return sa._backward(q, k, v, bidx, t, t, out, lse, dout, None, st.bs, scale, "query_outer")

            for rows, keys in SPLIT_CONFIGS:
                with kernel_config(dkdv_rows=rows, dkdv_keys=keys):
                    self.time(shape, L, f"ours (i) bwd split rows={rows} keys={keys}", lambda: bwd(False),
                              2.5 * c.sel_flops, need_s=8, check=f"sparse {shape} tile query_outer", pattern=p,
                              path="query_outer", dkdv_rows=rows, dkdv_keys=keys)
            for rows, keys in FUSED_CONFIGS:
                with kernel_config(fused_rows=rows, fused_keys=keys):
                    self.time(shape, L, f"ours (i) bwd fused rows={rows} keys={keys}", lambda: bwd(True),
                              2.5 * c.sel_flops, need_s=8, check=f"sparse {shape} tile fused", pattern=p,
                              path="fused", fused_rows=rows, fused_keys=keys)

    def run_fla(self, c: "Case"):
        """fla's NSA kernel on the per-token patterns, paper shape (fla needs >= 16 query heads per KV head)."""
        if c.shape != "paper":
            return
        for p in ("local", "random"):
            label = PATTERNS[p].split()[0]
            if self.fla is None:
                self.record(c.shape, c.L, f"fla NSA {label}", status=self.fla_note)
                continue
            qt, kt_, vt = (x.transpose(1, 2).contiguous() for x in (c.q, c.k, c.v))  # [1, L, heads, D]
            idx = self.patterns(c)[p].transpose(1, 2).long().contiguous()  # [1, L, G, topk]
            chk = f"fla_nsa {c.shape} {p}"
            self.time(c.shape, c.L, f"fla NSA {label} fwd", lambda: self.nsa(qt, kt_, vt, idx), c.sel_flops,
                      need_s=30, check=chk, pattern=p)
            qg, kg, vg = leaves(qt, kt_, vt)
            dout = torch.randn_like(qt)
            self.time(c.shape, c.L, f"fla NSA {label} fwd+bwd",
                      lambda: torch.autograd.grad(self.nsa(qg, kg, vg, idx), (qg, kg, vg), dout),
                      3.5 * c.sel_flops, need_s=40, check=chk, pattern=p)
            free()

    def run_index(self, c: "Case"):
        """select_blocks (and the torch-ops pipeline at tsfm), indexer-KL, the MSA layer forward."""
        st, shape, L, q, k, v, t = self.st, c.shape, c.L, c.q, c.k, c.v, c.t
        big = c.fwd_only
        qi = torch.randn(1, c.g, L, c.di, device=st.device, generator=c.gen, dtype=st.dtype)
        ki = torch.randn(1, L, c.di, device=st.device, generator=c.gen, dtype=st.dtype)
        forced = (t[0] // st.bs).view(1, 1, L, 1).expand(1, c.g, L, 1).contiguous()
        score_flops = float(L) * L * c.g * c.di  # causal half of 2 * L^2 * G * Di

        def select():
            return sel_mod.select_blocks_triton(qi, ki, t, t, st.bs, st.topk, None, forced)

        sel_row = self.time(shape, L, "select_blocks (ours)", select, score_flops, need_s=20 if big else 10,
                            check=f"select_blocks {shape}")
        if shape == "tsfm":
            row = self.time(shape, L, "select torch-ops pipeline",
                            lambda: torch_select_pipeline(qi, ki, t, t, st.bs, st.topk, forced), score_flops, need_s=15)
            if row.get("ms") and sel_row.get("ms"):
                row["speedup_of_ours"] = row["ms"] / sel_row["ms"]
        if self.clock.left() < 10:
            self.record(shape, L, "indexer_kl and MSA layer", status="skipped: time budget")
            return
        block_idx = select()
        _, lse = self.sparse("auto", q, k, v, block_idx, t)
        teacher = 2.0 * L * c.hq * c.d * st.selected
        student = 2.0 * L * c.g * c.di * st.selected
        kl_chk = f"indexer_kl {shape}"
        self.time(shape, L, "indexer_kl fwd", lambda: kl_mod.indexer_kl_triton(qi, ki, block_idx, q, k, lse, t, t, st.bs),
                  teacher + student, need_s=20 if big else 10, check=kl_chk)
        if not big:
            qa, kb = leaves(qi, ki)
            # the backward recomputes teacher and student and adds the dqi and dki dots
            self.time(shape, L, "indexer_kl fwd+bwd", lambda: torch.autograd.grad(
                kl_mod.indexer_kl_triton(qa, kb, block_idx, q, k, lse, t, t, st.bs), (qa, kb)),
                2 * teacher + 4 * student, need_s=10, check=kl_chk)
        waste = selection_waste(q, k, block_idx, st.bs)

        def layer():
            bi = select()
            out, lse_ = self.sparse("auto", q, k, v, bi, t)
            return out, kl_mod.indexer_kl_triton(qi, ki, bi, q, k, lse_, t, t, st.bs)

        row = self.time(shape, L, "MSA layer fwd (select + attention + KL)", layer, None,
                        need_s=30 if big else 15, selection_waste=round(waste, 3),
                        attention_variant="query_outer" if waste <= sa.CONFIG["auto_waste_fwd"] else "kv_outer")
        if row.get("ms") and c.dense_ms:
            row["speedup_vs_dense_fwd"] = c.dense_ms / row["ms"]

    def dense_sliced(self, shape, L, q, k, v, dense_flops) -> float | None:
        """Dense causal forward at 1M: 8 slices of Hq/8 query heads (one KV head each), one rep each;
        one slice x 8 when the budget cannot hold all eight."""
        hq, g = q.shape[1], k.shape[1]
        n_slices, per = 8, q.shape[1] // 8

        def run_slice(s):
            kv = s * per // (hq // g)
            return F.scaled_dot_product_attention(q[:, s * per:(s + 1) * per], k[:, kv:kv + 1], v[:, kv:kv + 1],
                                                  is_causal=True, enable_gqa=True)

        if self.clock.left() < 20:
            self.record(shape, L, "dense SDPA fwd", status="skipped: time budget")
            return None
        try:
            first = self.clock.once(lambda: run_slice(0))
            free()
            # all eight if they fit with 90 s to spare for the rest of this length
            if self.clock.left() > 7 * first * 1e-3 + 90:
                total = first + sum(self.clock.once(lambda: run_slice(s)) for s in range(1, n_slices))
                how = f"8 slices of {per} query heads (1 KV head), one rep each, summed"
            else:
                total = first * n_slices
                how = f"1 of 8 slices of {per} query heads timed once, x8 (budget short)"
            free()
            return self.record(shape, L, "dense SDPA fwd", total, dense_flops, reps=1, method=how)["ms"]
        except Exception as e:  # noqa: BLE001
            self.errors.append({"shape": shape, "L": L, "contender": "dense", "error": repr(e)[:300]})
            self.record(shape, L, "dense SDPA fwd", status=f"failed: {repr(e)[:160]}")
            return None


# ----------------------------------------------------------------------------------- targets
def targets(rows: list[dict], k128: int = K128, m1: int = M1) -> list[dict]:
    """One entry per target of issue 10: met / missed with the measured ratio (``k128``, ``m1``: the
    lengths of the runs, other than 128K / 1M only in the CPU dry run)."""
    K128, M1 = k128, m1  # noqa: N806 - the issue's names for the two lengths
    def ms(shape, seq_len, contender):
        for r in rows:
            if (r["shape"], r["L"], r["contender"]) == (shape, seq_len, contender) and r.get("ms") is not None:
                return r["ms"]
        return None

    def best(shape, seq_len, names):
        found = [(ms(shape, seq_len, n), n) for n in names]
        found = [x for x in found if x[0] is not None]
        return min(found) if found else (None, None)

    out = []

    def add(name, need, ours, other, other_name, ours_name=None):
        ratio = other / ours if ours and other else None
        out.append({"target": name, "ours_ms": ours, "ours": ours_name, "other_ms": other, "other": other_name,
                    "ratio": ratio, "need": need,
                    "verdict": "not measured" if ratio is None else "met" if ratio >= need else "missed"})

    # 1. backward / 2. forward on tile-shared selections, tsfm 128K, against Flex
    o, n = best("tsfm", K128, ["ours (i) query_outer fwd+bwd", "ours (i) fused fwd+bwd", "ours (i) kv_outer fwd+bwd"])
    add("tsfm 128K tile-shared fwd+bwd >= 1.5x Flex", 1.5, o, ms("tsfm", K128, "flex (i) fwd+bwd"), "flex (i) fwd+bwd", n)
    o, n = best("tsfm", K128, ["ours (i) query_outer fwd", "ours (i) kv_outer fwd"])
    add("tsfm 128K tile-shared fwd >= 1.5x Flex", 1.5, o, ms("tsfm", K128, "flex (i) fwd"), "flex (i) fwd", n)
    # 3. per-token selections, paper 128K, against fla NSA
    for label in ("(ii)", "(iii)"):
        for what in ("fwd", "fwd+bwd"):
            o, n = best("paper", K128, [f"ours {label} {p} {what}" for p in ("query_outer", "fused", "kv_outer")])
            add(f"paper 128K {label} {what} >= 3x fla NSA", 3.0, o, ms("paper", K128, f"fla NSA {label} {what}"),
                f"fla NSA {label} {what}", n)
    # 4. indexer-KL forward+backward >= 300 TFLOP/s
    for shape in ("tsfm", "paper"):
        r = next((r for r in rows if (r["shape"], r["L"], r["contender"]) == (shape, K128, "indexer_kl fwd+bwd")
                  and r.get("tflops")), None)
        tf = r["tflops"] if r else None
        out.append({"target": f"{shape} 128K indexer-KL fwd+bwd >= 300 TFLOP/s", "ours_ms": r["ms"] if r else None,
                    "tflops": tf, "ratio": tf / 300.0 if tf else None, "need": 1.0,
                    "verdict": "not measured" if tf is None else "met" if tf >= 300 else "missed"})
    # 5. the MSA layer forward against dense
    for shape, seq_len, need in (("tsfm", K128, 8.0), ("paper", M1, 20.0)):
        add(f"{shape} L={seq_len} MSA layer fwd >= {need:g}x dense", need,
            ms(shape, seq_len, "MSA layer fwd (select + attention + KL)"), ms(shape, seq_len, "dense SDPA fwd"),
            "dense SDPA fwd")
    return out


# ----------------------------------------------------------------------------------- output
def output_dirs(args) -> list[Path]:
    if args.out:
        return [Path(args.out)]
    dirs = [ROOT / "benchmarks" / "results"]
    if os.environ.get("OUT"):
        dirs.append(Path(os.environ["OUT"]) / "benchmarks" / "results")
    return dirs


def document(bench: Bench, final: bool) -> dict:
    import triton

    st = bench.st
    gpu = torch.cuda.get_device_name() if st.device == "cuda" else "cpu (interpreter dry run)"
    tag = gpu.replace("NVIDIA ", "").replace(" ", "-").lower() if st.device == "cuda" else "cpu-smoke"
    return {
        "name": f"{dt.date.today().isoformat()}-{tag}-attention", "date": dt.datetime.now().isoformat(timespec="seconds"),
        "gpu": gpu, "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
        "fla": bench.fla_note, "complete": final, "args": vars(bench.args),
        "settings": {"dtype": str(st.dtype), "batch": 1, "block_size": st.bs, "topk": st.topk,
                     "selected_tokens": st.selected, "time": "position (causal)", "peak_tflops": PEAK_TFLOPS,
                     "shapes": {k: dict(zip(("Hq", "G", "D", "Di"), v)) for k, v in st.shapes.items()},
                     "flops": {"selected fwd": "4*L*Hq*D*selected", "selected bwd": "2.5x fwd",
                               "selected fwd+bwd": "3.5x fwd", "dense fwd": "2*L^2*Hq*D (causal)",
                               "select": "L^2*G*Di (causal)", "indexer_kl fwd": "2*L*selected*(Hq*D + G*Di)",
                               "indexer_kl fwd+bwd": "2*L*selected*(2*Hq*D + 4*G*Di)"},
                     "kernel_config": dict(sa.CONFIG)},
        "checks": bench.checks, "results": bench.rows, "targets": targets(bench.rows, st.runs[0][1], st.runs[-1][1]),
        "errors": bench.errors, "kernel_resources": getattr(bench, "resources", []),
        "wall_s": round(time.time() - bench.clock.t0, 1),
    }


def kernel_resources() -> list[dict]:
    """Registers, spills, shared memory and warps of every Triton kernel of ours compiled in this run
    (what limits occupancy: 65,536 registers and 228 KB of shared memory per H200 SM). Read from the
    JIT caches; a Triton without them gives an empty list."""
    import triton

    rows = []
    for module in (sa, sel_mod, kl_mod):
        for name, fn in vars(module).items():
            if not isinstance(fn, triton.runtime.jit.JITFunction):
                continue
            for caches in getattr(fn, "device_caches", {}).values():
                kernels = caches[0] if isinstance(caches, tuple) else caches
                for kernel in getattr(kernels, "values", lambda: [])():
                    meta = getattr(kernel, "metadata", None)
                    rows.append({"kernel": f"{module.__name__.rsplit('.', 1)[-1]}.{name}",
                                 "num_warps": getattr(meta, "num_warps", None), "num_stages": getattr(meta, "num_stages", None),
                                 "registers": getattr(kernel, "n_regs", None), "spills": getattr(kernel, "n_spills", None),
                                 "shared_bytes": getattr(meta, "shared", None)})
    return rows


def render_markdown(doc: dict) -> str:
    from summarize_attention import render  # benchmarks/ is the script's directory, on sys.path

    return render(doc)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-seconds", type=float, default=390.0,
                   help="wall seconds for the whole run; what no longer fits is recorded as skipped")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (TRITON_INTERPRET=1)")
    p.add_argument("--no-checks", action="store_true")
    p.add_argument("--only", default=None, help="comma list of shape:L to run, e.g. tsfm:131072")
    p.add_argument("--out", default=None, help="write the JSON and Markdown here only")
    args = p.parse_args(argv)
    st = Setting(args.smoke)
    if not st.smoke and not torch.cuda.is_available():
        print("needs a CUDA GPU (or --smoke with TRITON_INTERPRET=1)")
        return 2
    if st.smoke and os.environ.get("TRITON_INTERPRET") != "1":
        print("--smoke runs the kernels in the Triton interpreter: set TRITON_INTERPRET=1")
        return 2
    bench = Bench(args, st)
    print(f"{'GPU ' + torch.cuda.get_device_name() if st.device == 'cuda' else 'CPU dry run'}, torch {torch.__version__}; "
          f"fla: {bench.fla_note}; budget {args.budget_seconds:.0f} s", flush=True)
    if not args.no_checks:
        bench.run_checks()
    wanted = set(args.only.split(",")) if args.only else None
    for shape, seq_len, fwd_only in st.runs:
        if wanted and f"{shape}:{seq_len}" not in wanted:
            continue
        try:
            bench.run(shape, seq_len, fwd_only)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: keep the rows so far, go on
            bench.errors.append({"shape": shape, "L": seq_len, "error": repr(e)[:400], "trace": traceback.format_exc()[-1500:]})
            print(f"  {shape} L={seq_len} failed: {e!r}", flush=True)
        free()
    try:
        bench.resources = kernel_resources()
    except Exception as e:  # noqa: BLE001 - the Triton internals it reads are not a stable API
        bench.resources = [{"kernel": f"not read: {e!r}"[:200]}]
    bench.save(final=True)
    print(render_markdown(bench.doc))
    for directory in output_dirs(args):
        print(f"wrote {directory / bench.doc['name']}.json / .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
