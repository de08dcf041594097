"""Torch ops (= CUDA launches on the GPU) of one MSA sparse training step, per kernel wrapper.

The step of train_step.py (forward with the KL loss, pinball loss, backward, AdamW) on a SMALL model
of the same structure (16 variates in 4 sensor groups, 2 layers, GQA, free policy, KL on every 8th
row as at >= 8K tokens) on the CPU, with the Triton kernels run by the interpreter
(``TRITON_INTERPRET=1``, set here). The host side of the wrappers issues the same torch ops as on
CUDA, so their count is the launch count less the Triton launches, counted apart. Ops are the
outermost ``aten::`` calls of a torch.profiler (CPU) trace, grouped by the enclosing ``tsfm_msa::``
op (``model`` for everything outside the wrappers); the ``aten::`` work done by the interpreter
inside a Triton launch is left out.

    python benchmarks/count_step_ops.py [--skip-kernels] [--detail] [--json out.json]

(as a script it sets TRITON_INTERPRET=1; imported, e.g. by tests/test_step_op_count.py, it needs the
interpreter already on.)
"""
from __future__ import annotations

import argparse
import collections
import json
import os

if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

N_GROUPS, PER_GROUP, PATCH, HORIZON = 2, 2, 16, 32
ROLES = (["target"] + ["past_covariate"] * (PER_GROUP - 1)) * N_GROUPS
GROUPS = [v // PER_GROUP for v in range(N_GROUPS * PER_GROUP)]
NAMES = [f"sensors{g}" for g in range(N_GROUPS)]
# train_step.py's model shrunk (the interpreter is slow): same heads ratio (4 query heads per KV
# head), free policy, top-k below the block count, KL on every 8th row as from 8K tokens on.
SMALL_MODEL = dict(patch_len=PATCH, d_model=32, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=16, mlp_ratio=2.0,
                   block_size=16, top_k=4, index_dim=16, group_policy="free", kl_row_stride=8)
CONTEXT = 16 * PATCH  # 16 patches per variate: 4 * 16 + 2 * 2 horizon = 68 tokens, 5 blocks
# The attention loop order: the H200 step ran kv_outer forward and backward at 8K and 32K (the
# untrained indexer's tile unions are wide); "auto" lets the measured waste pick, as in training.
PATHS = {"kv_outer": float("-inf"), "query_outer": float("inf")}


class _TaggedLaunches:
    """Wraps every interpreted Triton launch in a ``triton::<kernel>`` profiler range, so its own
    numpy/aten work is left out of the wrappers' counts and the launches are counted. With
    ``run_kernels=False`` the launches are skipped (outputs stay as allocated): the wrappers' torch
    ops do not depend on the kernels' results once the attention's loop order is forced, so the
    count is the same in a fraction of the time (the tests use this)."""

    def __init__(self, run_kernels: bool) -> None:
        self.run_kernels = run_kernels

    def __enter__(self):
        from triton.runtime.interpreter import InterpretedFunction

        self.plain = plain = InterpretedFunction.run
        run_kernels = self.run_kernels

        def run(fn, *args, **kwargs):
            with record_function(f"triton::{fn.fn.__name__}"):
                return plain(fn, *args, **kwargs) if run_kernels else None

        InterpretedFunction.run = run
        return self

    def __exit__(self, *exc):
        from triton.runtime.interpreter import InterpretedFunction

        InterpretedFunction.run = self.plain


def make_step(seed: int = 0):
    """A closure running one training step of the small MSA model (sparse phase)."""
    from tsfm_msa.model.transformer import PatchTransformer, pinball_loss

    torch.manual_seed(seed)
    model = PatchTransformer(ROLES, GROUPS, NAMES, attention="msa", **SMALL_MODEL).train()
    for layer in model.layers:  # statistics are a logging concern, off in train_step.py's timed step
        layer.attention.collect_stats = False
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as train_step.py on CUDA
    gen = torch.Generator().manual_seed(seed)
    n_var = len(ROLES)
    batch = {
        "context": torch.randn(1, CONTEXT, n_var, generator=gen),
        "context_mask": torch.ones(1, CONTEXT, n_var, dtype=torch.bool),
        "horizon": torch.randn(1, HORIZON, n_var, generator=gen),
        "horizon_mask": torch.ones(1, HORIZON, n_var, dtype=torch.bool),
    }
    targets = model.target_index
    truth = batch["horizon"][..., targets].transpose(1, 2)
    observed = batch["horizon_mask"][..., targets].transpose(1, 2)

    def step() -> torch.Tensor:
        out = model(batch, "sparse")
        loss = pinball_loss(out.quantiles.float(), truth, observed, model.quantile_levels) + out.kl
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    return step


# Leaf aten ops that launch no kernel (allocation, views, metadata, no-op casts): left out of the
# launch estimate, which counts the other leaves (the kernels' ops, copies, fills, D2H reads).
NO_KERNEL = {
    "aten::" + name for name in (
        "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "view", "reshape", "_reshape_alias",
        "_unsafe_view", "as_strided", "transpose", "t", "permute", "unsqueeze", "squeeze", "expand", "expand_as",
        "slice", "select", "narrow", "detach", "alias", "unbind", "split", "chunk", "resolve_conj", "resolve_neg",
        "lift_fresh", "to", "contiguous", "view_as", "set_", "result_type", "flatten", "unflatten", "lift_fresh_copy")
}


def _owner(event) -> tuple[str | None, bool]:
    """The innermost enclosing ``tsfm_msa::`` op of an event, and whether it runs inside a Triton
    launch or inside another aten op (then it is not one of the ops the Python code issued)."""
    owner, nested = None, False
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("triton::") or parent.name.startswith("aten::"):
            nested = True
        if owner is None and parent.name.startswith("tsfm_msa::"):
            owner = parent.name
        parent = parent.cpu_parent
    return owner, nested


def count_ops(path: str = "kv_outer", run_kernels: bool = True) -> dict:
    """``{"ops": {wrapper: n}, "triton": {wrapper: n}, "top": {wrapper: {op: n}}}`` for one step
    (after a warm-up step that builds the layout caches, as every step after the first) with the
    attention's loop order forced to ``path`` (``kv_outer``, ``query_outer`` or ``auto``)."""
    from tsfm_msa import kernels
    from tsfm_msa.kernels import dispatch
    from tsfm_msa.kernels import sparse_attention_triton as sa

    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("count_ops runs the Triton wrappers on the CPU: set TRITON_INTERPRET=1 before importing triton")
    if path == "auto" and not run_kernels:
        raise ValueError("path='auto' decides on the kernels' results: run the kernels")
    saved, backend = dict(sa.CONFIG), dispatch._backend
    if path != "auto":
        sa.CONFIG["auto_waste_fwd"] = sa.CONFIG["auto_waste_bwd"] = PATHS[path]
    kernels.set_backend("triton")
    try:
        with _TaggedLaunches(run_kernels):
            step = make_step()
            step()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step()
    finally:
        sa.CONFIG.update(saved)
        dispatch._backend = backend
    ops: collections.Counter = collections.Counter()
    leaves: collections.Counter = collections.Counter()
    launches: collections.Counter = collections.Counter()
    names: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for event in prof.events():
        owner, nested = _owner(event)
        owner = owner or "model"
        if event.name.startswith("triton::") and not nested:
            launches[owner] += 1
        elif event.name.startswith("aten::"):
            if not nested:
                ops[owner] += 1
                names[owner][event.name] += 1
            inside_triton = any(p.name.startswith("triton::") for p in _parents(event))
            is_leaf = not any(child.name.startswith("aten::") for child in event.cpu_children)
            if is_leaf and not inside_triton and event.name not in NO_KERNEL:
                leaves[owner] += 1
    return {"ops": dict(ops), "launches": dict(leaves), "triton": dict(launches),
            "top": {k: dict(v.most_common()) for k, v in names.items()}}


def _parents(event):
    parent = event.cpu_parent
    while parent is not None:
        yield parent
        parent = parent.cpu_parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="also write the counts here")
    parser.add_argument("--detail", action="store_true", help="list the ops of each wrapper")
    parser.add_argument("--path", default="kv_outer", choices=("kv_outer", "query_outer", "auto"),
                        help="the sparse attention's loop order (default: the one the H200 step ran)")
    parser.add_argument("--skip-kernels", action="store_true",
                        help="count without running the Triton kernels (same counts, seconds instead of a minute)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = count_ops(args.path, run_kernels=not args.skip_kernels)
    owners = sorted(set(result["ops"]) | set(result["triton"]), key=lambda k: (k == "model", k))
    # torch ops: outermost aten calls; torch launches: leaf aten ops that run a kernel (an estimate of
    # the CUDA launches besides Triton's); triton: Triton kernel launches.
    print(f"{'wrapper':32s} {'torch ops':>9s} {'torch launches':>14s} {'triton':>7s}")
    for name in owners:
        print(f"{name:32s} {result['ops'].get(name, 0):9d} {result['launches'].get(name, 0):14d} "
              f"{result['triton'].get(name, 0):7d}")
    def total(key, wrappers_only):
        return sum(v for k, v in result[key].items() if k != "model" or not wrappers_only)
    print(f"{'all wrappers':32s} {total('ops', True):9d} {total('launches', True):14d} {total('triton', True):7d}")
    print(f"{'whole step':32s} {total('ops', False):9d} {total('launches', False):14d} {total('triton', False):7d}")
    if args.detail:
        for name in owners:
            print(f"\n{name}: " + ", ".join(f"{op[6:]} {n}" for op, n in result["top"].get(name, {}).items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
