"""Merge the reports of several probe runs into one (the long-context probes run one process per
scenario, side by side on one GPU, because a 16K or 64K scenario trains for minutes).

    python -m tsfm_msa.probes.merge OUT_DIR RUN_DIR [RUN_DIR ...]

Each RUN_DIR holds a ``probe_summary.json`` written by ``tsfm-msa probe``. Scenarios are taken from
every run; a scenario present in several runs gets all their seeds (the same seed twice is refused).
The runs must share the model, training and target settings, so their rows are comparable.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .report import write_report

# Settings that must agree between merged runs (seeds and the scenario list may differ).
SHARED_SETTINGS = ("model", "train", "selectors", "dense_backbone_selectors", "verdict")


class ProbeMergeError(ValueError):
    """Runs that cannot be merged into one report."""


def load_summary(run_dir: Path) -> dict:
    path = Path(run_dir) / "probe_summary.json"
    if not path.is_file():
        raise ProbeMergeError(f"{path} does not exist: pass the run directories of `tsfm-msa probe` "
                              f"(each holds probe_summary.json)")
    return json.loads(path.read_text())


def merge_summaries(summaries: list[dict], names: list[str]) -> dict:
    """One summary with the scenarios (and seeds) of all ``summaries``; ``names`` label them in errors."""
    if not summaries:
        raise ProbeMergeError("nothing to merge: pass at least one run directory")
    first = summaries[0]
    merged = {k: v for k, v in first.items() if k not in ("scenarios", "aggregate", "target_check")}
    merged["settings"] = dict(first["settings"])
    merged["scenarios"] = {}
    seeds: list = []
    for summary, name in zip(summaries, names):
        for key in SHARED_SETTINGS:
            if summary["settings"].get(key) != first["settings"].get(key):
                raise ProbeMergeError(f"{name} has other `{key}` settings than {names[0]}; merge only runs of the "
                                      f"same probe config and training overrides")
        if summary.get("target") != first.get("target"):
            raise ProbeMergeError(f"{name} has another probe.target than {names[0]}")
        for scenario, result in summary["scenarios"].items():
            into = merged["scenarios"].setdefault(scenario, {"runs": [], "seconds": 0.0})
            have = {run["seed"] for run in into["runs"]}
            for run in result["runs"]:
                if run["seed"] in have:
                    raise ProbeMergeError(f"{name} repeats {scenario} at seed {run['seed']}; merge distinct seeds")
                into["runs"].append(run)
            into["seconds"] = round(into["seconds"] + result["seconds"], 1)
        seeds += [s for s in summary["settings"].get("seeds", []) if s not in seeds]
    merged["settings"]["seeds"] = seeds
    # The runs went side by side: the merged wall time is the longest one.
    merged["wall_seconds"] = max(s.get("wall_seconds", 0.0) for s in summaries)
    merged["merged_from"] = names
    return merged


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("run_dirs", type=Path, nargs="+")
    args = parser.parse_args(argv)
    try:
        merged = merge_summaries([load_summary(d) for d in args.run_dirs], [str(d) for d in args.run_dirs])
    except ProbeMergeError as err:
        parser.exit(2, f"error: {err}\n")
    summary = write_report(merged, args.out_dir)
    print(f"[probe] merged report: {args.out_dir / 'probe_report.md'}")
    return summary


if __name__ == "__main__":
    main()
