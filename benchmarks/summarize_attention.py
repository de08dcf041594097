"""Markdown view of a ``benchmarks/attention.py`` result (``<date>-<gpu>-attention.json``).

    python benchmarks/summarize_attention.py benchmarks/results/2026-12-02-h200-attention.json

``attention.py`` writes the same Markdown next to its JSON; this script re-renders a JSON by hand.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def render(doc: dict) -> str:
    s = doc["settings"]
    out = [f"# Attention ops on {doc['gpu']} ({doc['date'][:10]}, torch {doc['torch']}, triton {doc['triton']})", "",
           f"fla: {doc['fla']}. {s['dtype']}, batch {s['batch']}, blocks of {s['block_size']}, top-{s['topk']} "
           f"({s['selected_tokens']} selected tokens per query and group), time = position. Shapes: "
           + ", ".join(f"{k} {v}" for k, v in s["shapes"].items()) + f". Wall {doc['wall_s']} s"
           + ("" if doc.get("complete") else " (run did not finish)") + ".", "",
           "FLOP counts: " + "; ".join(f"{k} = {v}" for k, v in s["flops"].items()) + f"; % of {s['peak_tflops']:g} TFLOP/s.",
           "", "## Targets (issue 10)", ""]
    for t in doc["targets"]:
        extra = f"{_num(t['tflops'], '.0f')} TFLOP/s" if "tflops" in t else (
            f"ours {_num(t.get('ours_ms'), '.2f')} ms ({t.get('ours') or '-'}) vs {t.get('other')} {_num(t.get('other_ms'), '.2f')} ms")
        out.append(f"- {t['target']}: **{t['verdict']}**, ratio {_num(t.get('ratio'), '.2f')} (need {t['need']:g}); {extra}")
    out += ["", "## Correctness before timing (bf16 vs the fp32 reference, ||err|| / ||ref||)", "",
            "| check | L | ok | errors |", "|---|---:|---|---|"]
    for name, c in doc["checks"].items():
        errs = ", ".join(f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}" for k, v in c.items()
                         if k not in ("L", "ok"))
        out.append(f"| {name} | {c.get('L', '-')} | {c.get('ok')} | {errs} |")
    out += ["", "## Times", "", "| shape | L | contender | ms | TFLOP/s | % of peak | reps | note |",
            "|---|---:|---|---:|---:|---:|---:|---|"]
    for r in doc["results"]:
        notes = [r["status"]] if r.get("status") else []
        if r.get("check") is not None and r.get("check_ok") is not True:
            notes.append(f"check {r['check']}: {r.get('check_ok')}")
        for key in ("method", "waste", "selection_waste", "attention_variant"):
            if key in r:
                notes.append(f"{key} {r[key]}")
        for key in ("speedup_vs_dense_fwd", "speedup_of_ours"):
            if key in r:
                notes.append(f"{key} {r[key]:.1f}x")
        out.append(f"| {r['shape']} | {r['L']} | {r['contender']} | {_num(r.get('ms'), '.3f')} | "
                   f"{_num(r.get('tflops'), '.0f')} | {_num(r.get('pct_of_peak'), '.0f')} | {r.get('reps', '-')} | "
                   f"{'; '.join(notes)} |")
    if doc.get("kernel_resources"):
        out += ["", "## Kernel resources (what bounds occupancy: 65,536 registers, 228 KB shared memory per SM)", "",
                "| kernel | warps | stages | registers / thread | spills | shared bytes |", "|---|---:|---:|---:|---:|---:|"]
        for k in doc["kernel_resources"]:
            out.append(f"| {k['kernel']} | {k.get('num_warps', '-')} | {k.get('num_stages', '-')} | "
                       f"{k.get('registers', '-')} | {k.get('spills', '-')} | {k.get('shared_bytes', '-')} |")
    if doc["errors"]:
        out += ["", "## Errors", ""] + [f"- {e.get('shape', '')} {e.get('L', '')} {e.get('contender', '')}: {e['error']}"
                                        for e in doc["errors"]]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(render(json.loads(Path(sys.argv[1]).read_text())), end="")
