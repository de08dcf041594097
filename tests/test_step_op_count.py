"""Launch budget of one MSA sparse training step: the torch ops issued around the Triton kernels.

On the GPU the step of benchmarks/train_step.py is host-bound (every torch op is a CUDA launch; see
benchmarks/results/2026-12-02-h200-train-step.md), so the count per kernel wrapper must not creep
back up. Counted by benchmarks/count_step_ops.py on its small model under the Triton interpreter,
without running the kernels (the wrappers' ops do not depend on their results once the attention's
loop order is fixed), in both loop orders.
"""
import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="counts the wrappers' ops on the CPU under TRITON_INTERPRET=1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from count_step_ops import count_ops  # noqa: E402

# Outermost aten ops per step (2 layers) measured after the 2026-12-02 launch cuts (before them:
# kv_outer 522 in the wrappers, 1,111 in the step). Margin: 2 ops per layer for a wrapper, 5% for
# the rest of the model (not the kernels' code, but its attention glue: RoPE, index branch).
BUDGET = {
    "kv_outer": {"tsfm_msa::select_blocks": 6, "tsfm_msa::sparse_attention_fwd": 80,
                 "tsfm_msa::sparse_attention_bwd": 36, "tsfm_msa::indexer_kl_fwd": 128,
                 "tsfm_msa::indexer_kl_bwd": 22, "model": 471},
    "query_outer": {"tsfm_msa::select_blocks": 6, "tsfm_msa::sparse_attention_fwd": 22,
                    "tsfm_msa::sparse_attention_bwd": 52, "tsfm_msa::indexer_kl_fwd": 128,
                    "tsfm_msa::indexer_kl_bwd": 22, "model": 471},
}


@pytest.mark.parametrize("path", sorted(BUDGET))
def test_step_op_count_within_budget(path, one_torch_thread):
    ops = count_ops(path, run_kernels=False)["ops"]
    budget = BUDGET[path]
    over = []
    for name in sorted(set(ops) | set(budget)):
        limit = budget.get(name, 0)
        limit += round(0.05 * limit) if name == "model" else 4
        if ops.get(name, 0) > limit:
            over.append(f"{name}: {ops.get(name, 0)} torch ops per step > {limit} (budget {budget.get(name, 0)} + margin)")
    assert not over, (f"one MSA training step ({path}) launches more torch ops than budgeted -- every op is a CUDA "
                      f"launch in a host-bound step; find the new ops with `python benchmarks/count_step_ops.py "
                      f"--skip-kernels --detail --path {path}`: " + "; ".join(over))
    assert ops.get("tsfm_msa::sparse_attention_fwd", 0) > 0, "the step ran no Triton wrapper (wrong backend?)"
