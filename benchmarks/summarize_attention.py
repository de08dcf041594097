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
    out += ["", "## Targets of issue 3, from the merged rows above", ""]
    out += [f"- {line}" for line in targets(rows)]
    return "\n".join(out) + "\n"


def targets(rows: dict) -> list[str]:
    def ms(shape: str, length: int, name: str) -> float | None:
        row = rows.get((shape, length, name))
        return row.get("ms") if row and row.get("ms") is not None and not row.get("status") else None

    def best(shape: str, length: int, pattern: str, what: str) -> float | None:
        times = [ms(shape, length, f"sparse ({pattern}) {v} {what}") for v in ("query_outer", "kv_outer")]
        times = [t for t in times if t is not None]
        return min(times) if times else None

    def verdict(ok: bool) -> str:
        return "MET" if ok else "not met"

    lines, k128, m1 = [], 131072, 1048576
    for what, limit in (("fwd", 4.0), ("fwd+bwd", 15.0)):
        ours, flex = best("tsfm", k128, "i", what), ms("tsfm", k128, f"flex (i) {what}")
        if ours and flex:
            lines.append(f"tsfm 128K tile-shared {what}: ours {ours:.2f} ms vs Flex {flex:.2f} ms ({flex / ours:.2f}x); "
                         f"target <= {limit} ms and >= 1.5x Flex: {verdict(ours <= limit and flex / ours >= 1.5)}")
    for pattern in ("ii", "iii"):
        for what, limit, nsa in (("fwd", 30.0, 90.0), ("fwd+bwd", 90.0, 275.0)):
            ours = best("paper", k128, pattern, what)
            if ours:
                lines.append(f"paper 128K pattern ({pattern}) {what}: ours {ours:.1f} ms vs fla NSA {nsa:.0f} ms "
                             f"(quoted; {nsa / ours:.1f}x); target <= {limit} ms: {verdict(ours <= limit)}")
    for shape in ("tsfm", "paper"):
        ours, torch_ms = ms(shape, k128, "select_blocks (ours)"), ms(shape, k128, "select torch-ops pipeline")
        row = rows.get((shape, k128, "select_blocks (ours)"), {})
        if ours and torch_ms:
            lines.append(f"{shape} 128K select_blocks: {ours:.2f} ms, {torch_ms / ours:.1f}x the torch-ops pipeline, "
                         f"{row.get('tflops', 0):.0f} TFLOP/s on scoring; target >= 20x and >= 395 TFLOP/s: "
                         f"{verdict(torch_ms / ours >= 20 and row.get('tflops', 0) >= 395)}")
    for shape, length, need in (("tsfm", k128, 8.0), ("paper", m1, 20.0)):
        layer, dense = ms(shape, length, "msa layer fwd (select+kv_outer)"), rows.get((shape, length, "dense_sdpa fwd"), {}).get("ms")
        if layer and dense:
            lines.append(f"{shape} L={length} MSA layer fwd {layer:.1f} ms vs dense {dense:.1f} ms ({dense / layer:.1f}x); "
                         f"target >= {need}x: {verdict(dense / layer >= need)}")
    return lines


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print(render(*load(sys.argv[1:])))
