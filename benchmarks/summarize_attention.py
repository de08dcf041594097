"""Render a benchmarks/results/*-attention.json file as a Markdown table people can scan.

    python benchmarks/summarize_attention.py benchmarks/results/2026-11-28-h200-attention.json [extra.json ...]

Later files override earlier ones for the same (shape, L, contender), e.g. a re-run of one contender.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def load(paths: list[str]) -> tuple[dict, dict]:
    head, rows = {}, {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        head = head or data
        for row in data["results"]:
            rows[(row["shape"], row["L"], row["contender"])] = row
    return head, rows


def render(head: dict, rows: dict) -> str:
    out = [f"# Attention kernels on {head['gpu']} ({head['date'][:10]}, torch {head['torch']}, triton {head['triton']})",
           "", f"Settings: {json.dumps(head['settings'])}", "",
           "| shape | L | contender | ms | TFLOP/s | % of 790 | note |", "|---|---:|---|---:|---:|---:|---|"]
    for (shape, length, name), row in rows.items():
        ms = f"{row['ms']:.3f}" if row.get("ms") is not None else "-"
        tf = f"{row['tflops']:.0f}" if row.get("tflops") is not None else "-"
        pct = f"{row['pct_of_790']:.0f}" if row.get("pct_of_790") is not None else "-"
        note = row.get("status") or " ".join(f"{k}={v:.1f}x" for k, v in row.items() if k.startswith("speedup"))
        out.append(f"| {shape} | {length} | {name} | {ms} | {tf} | {pct} | {note} |")
    out += ["", "## Targets (as recorded by the run)", ""]
    for name, target in head.get("targets", {}).items():
        out.append(f"- **{name}**: {'MET' if target.get('met') else 'not met'} — "
                   + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in target.items() if k != "met"))
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print(render(*load(sys.argv[1:])))
