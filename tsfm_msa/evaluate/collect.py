"""Collect finished `tsfm-msa evaluate` runs into the committed result files:

    python -m tsfm_msa.evaluate.collect benchmarks/results/2026-12-01 outputs/evaluate/*/<time> ...

writes <prefix>-evaluation-<dataset>.{md,csv} (each run's table), <prefix>-evaluation_seeds.csv (every
per-seed row of all runs) and <prefix>-evaluation-summary.{md,csv} (geometric mean across datasets of each
model's ratios to seasonal naive)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from tsfm_msa.evaluate import report


class CollectError(ValueError):
    """A run folder without the evaluation's outputs."""


def collect(prefix: str | Path, run_dirs: list[str | Path]) -> pd.DataFrame:
    """Copy each dataset's table, concatenate the per-seed rows, write the cross-dataset summary; return it.

    Several folders may hold one dataset (e.g. one process per model or seed run in parallel): their
    rows are merged, a (model, seed) pair met twice is kept once (seasonal naive is in every folder),
    and the setting's seed lists are the union of theirs."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    by_dataset: dict[str, tuple[list[dict], dict]] = {}
    target_rows: dict[str, list[dict]] = {}
    for run in map(Path, run_dirs):
        missing = [n for n in ("evaluation.md", "evaluation.csv", "evaluation_seeds.csv", "evaluation.json")
                   if not (run / n).is_file()]
        if missing:
            raise CollectError(f"{run} lacks {missing}: give folders of finished `tsfm-msa evaluate` runs")
        record = json.loads((run / "evaluation.json").read_text())
        dataset = str(record["rows"][0]["dataset"])
        rows, setting = by_dataset.setdefault(dataset, ([], dict(record["setting"])))
        seen = {(r["model"], r["seed"]) for r in rows}
        rows.extend(r for r in record["rows"] if (r["model"], r["seed"]) not in seen)
        # Several targets: the per-target rows of the same (model, seed) runs.
        target_rows.setdefault(dataset, []).extend(
            r for r in record.get("target_rows") or [] if (r["model"], r["seed"]) not in seen)
        for key in ("seeds", "baseline_seeds"):
            setting[key] = sorted(set(setting[key]) | set(record["setting"][key]))
    seeds, tables, names = [], [], []
    for dataset, (rows, setting) in by_dataset.items():
        # Re-rendered from the rows and setting, so every table follows the current report format.
        table = report.summarize(rows)
        table.to_csv(f"{prefix}-evaluation-{dataset}.csv", index=False)
        per_target = report.summarize_targets(target_rows[dataset]) if target_rows.get(dataset) else None
        Path(f"{prefix}-evaluation-{dataset}.md").write_text(report.report_markdown(table, rows, dataset, setting,
                                                                                    per_target))
        seeds.append(pd.DataFrame(rows))
        tables.append(table)
        names.append(f"`{prefix.name}-evaluation-{dataset}.md`")
    pd.concat(seeds, ignore_index=True).to_csv(f"{prefix}-evaluation_seeds.csv", index=False)
    summary = report.geometric_mean_table(pd.concat(tables, ignore_index=True))
    summary.to_csv(f"{prefix}-evaluation-summary.csv", index=False)
    setting = next(iter(by_dataset.values()))[1]
    md = ["# Evaluation summary across datasets", "",
          "Geometric mean over datasets of each model's seed-mean MASE and CRPS ratio to seasonal naive "
          "(< 1 beats it; GIFT-Eval's aggregate). Per-dataset tables: "
          + ", ".join(names) + f"; per-seed rows: `{prefix.name}-evaluation_seeds.csv`.", "",
          report.geometric_mean_markdown(summary), "", report.common_datasets_note(pd.concat(tables)), "",
          "Protocol (first run's setting): " + report.protocol_text(setting), ""]
    Path(f"{prefix}-evaluation-summary.md").write_text("\n".join(md))
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prefix", help="output prefix, e.g. benchmarks/results/2026-12-01")
    parser.add_argument("runs", nargs="+", help="folders of finished `tsfm-msa evaluate` runs")
    args = parser.parse_args(argv)
    print(report.geometric_mean_markdown(collect(args.prefix, args.runs)))


if __name__ == "__main__":
    main()
