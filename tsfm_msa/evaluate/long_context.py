"""Does long context pay? (issue 12) Run and collect the `+experiment=long_context` study.

    # the GPU: every job of the study, several at a time, most important first, within a time budget,
    # then the collection of whatever finished
    python -m tsfm_msa.evaluate.long_context run --budget-minutes 8 --out benchmarks/results/<date>-long-context
    # collect finished runs (a multirun folder, run folders, or folders holding them)
    python -m tsfm_msa.evaluate.long_context multirun/evaluate/<time> --out benchmarks/results/<date>-long-context

The collection writes <out>.json (every per-seed row, the table, the target check), <out>.md (the table and
the target check) and <out>.png (CRPS / seasonal naive against context tokens; step time and peak memory
against context tokens).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

DATASETS = ("epf", "vic_elec", "pedestrian")  # configs/context_study/
MODELS = ("dense", "msa", "msa_sensor")
PATCHES = (16, 8, 4)
# Jobs in order of importance, so that a budget cut leaves the key comparisons done: short (the 256-step
# reference) against the longest context for every model and dataset at seed 0, then their second seed,
# then the middle rungs, then patch 8; each stage's rungs in the order listed (the longest first: the
# slowest jobs start while the most time is left). Second come three jobs at patch 4 on vic_elec's
# longest rung: 130 weeks then make 32,784 tokens, the study's only windows past 32K tokens (the step-cost
# target). A stage is (rungs, patch, seed, datasets or None for all).
STAGES: tuple[tuple[tuple[str, ...], int, int, tuple[str, ...] | None], ...] = (
    (("max", "s256"), 16, 0, None),
    (("max",), 4, 0, ("vic_elec",)),
    (("max", "s256"), 16, 1, None),
    (("w52", "w13"), 16, 0, None),
    (("max", "s256"), 8, 0, None),
    (("w4", "w1"), 16, 0, None),
    (("w52", "w13"), 16, 1, None),
    (("w4",), 16, 1, None),
    (("max", "s256"), 8, 1, None),
    (("w52", "w13", "w4", "w1"), 8, 0, None),
)
REFERENCE_CONTEXT = 256  # steps: the context of every earlier evaluation, the reference
LONG_CONTEXT = 4 * REFERENCE_CONTEXT  # steps from which a run counts as long context in the target check
TOKEN_THRESHOLD = 32_768  # "from 32K tokens on"


class LongContextError(ValueError):
    """Nothing to collect, or a bad option; the message says what to give instead."""


# ---------------------------------------------------------------------------------------------- jobs
@dataclass(frozen=True)
class Job:
    dataset: str
    rung: str
    patch: int
    model: str
    seed: int
    # A named set of extra Hydra overrides (``--variant NAME=OVERRIDES``), "" for the plain job.
    variant: str = ""
    variant_overrides: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        suffix = f"-{self.variant}" if self.variant else ""
        return f"{self.dataset}-{self.rung}-p{self.patch}-{self.model}-s{self.seed}{suffix}"

    def overrides(self) -> list[str]:
        return ["+experiment=long_context", f"context_study={self.dataset}", f"study.context={self.rung}",
                f"study.patch={self.patch}", f"study.model={self.model}", f"eval.seeds=[{self.seed}]",
                *([f"study.variant={self.variant}"] if self.variant else []), *self.variant_overrides]


def parse_variants(texts: list[str]) -> dict[str, tuple[str, ...]]:
    """``--variant`` values ``NAME=OVERRIDE [OVERRIDE ...]`` as {name: overrides}; ``plain`` is the job as
    configured (name "", no overrides). A bad name is a one-line error."""
    variants: dict[str, tuple[str, ...]] = {}
    for text in texts:
        name, _, rest = text.partition("=")
        name = name.strip()
        if not name or not name.replace("_", "").isalnum():
            raise LongContextError(f"--variant {text!r}: give NAME=OVERRIDES with a NAME of letters, digits and _, "
                                   "e.g. --variant 'cur256=eval.context_curriculum=[{context_len:256,steps:200}]'")
        key = "" if name == "plain" else name
        if key in variants:
            raise LongContextError(f"--variant {name!r} is given twice; give each variant one name")
        variants[key] = () if name == "plain" else tuple(shlex.split(rest))
    return variants


def plan(datasets=DATASETS, models=MODELS, patches=PATCHES, seeds=(0, 1), stages=STAGES, rungs=None,
         variants: dict[str, tuple[str, ...]] | None = None) -> list[Job]:
    """Every job of the study once, in the order of ``stages`` (filtered to the given datasets, models,
    patch lengths, seeds and context rungs), datasets, models and ``variants`` (:func:`parse_variants`;
    default: the plain jobs only) interleaved inside each rung."""
    variants = variants or {"": ()}
    jobs: list[Job] = []
    for stage_rungs, patch, seed, only in stages:
        if patch not in patches or seed not in seeds:
            continue
        for rung in stage_rungs:
            if rungs is not None and rung not in rungs:
                continue
            for dataset in (d for d in datasets if only is None or d in only):
                for model in models:
                    for name, extra in variants.items():
                        job = Job(dataset, rung, patch, model, seed, name, extra)
                        if job not in jobs:
                            jobs.append(job)
    return jobs


def run_pool(commands: dict[str, list[str]], log_dir: Path, workers: int, budget_s: float,
             min_start_s: float = 45.0, env: dict[str, str] | None = None) -> dict[str, str]:
    """Run the commands (name -> argv) in order, ``workers`` at a time, each with its output in
    ``log_dir/<name>.log``. None starts once less than ``min_start_s`` of the budget is left; those still
    running at the end of the budget are stopped (their process group: SIGTERM, then SIGKILL).
    Returns name -> "ok" | "failed (rc N)" | "stopped at the budget" | "not started"."""
    log_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + budget_s
    pending = list(commands)
    running: dict[str, tuple[subprocess.Popen, Any]] = {}
    status = {name: "not started" for name in commands}
    while pending or running:
        now = time.monotonic()
        while pending and len(running) < workers and deadline - now > min_start_s:
            name = pending.pop(0)
            log = open(log_dir / f"{name}.log", "w")
            # Own session: stopping a job stops its children (compile workers) too, nothing else.
            running[name] = (subprocess.Popen(commands[name], stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True, env=env), log)
            print(f"[{budget_s - (deadline - now):6.0f} s] start {name}", flush=True)
        for name, (proc, log) in list(running.items()):
            rc = proc.poll()
            if rc is not None:
                log.close()
                del running[name]
                status[name] = "ok" if rc == 0 else f"failed (rc {rc})"
                print(f"[{budget_s - (deadline - time.monotonic()):6.0f} s] {status[name]:<14} {name}", flush=True)
        if time.monotonic() >= deadline:
            for name, (proc, log) in running.items():
                _stop(proc)
                log.close()
                status[name] = "stopped at the budget"
                print(f"stopped at the budget: {name}", flush=True)
            running.clear()
        if pending and deadline - time.monotonic() <= min_start_s and not running:
            break
        time.sleep(0.2)
    return status


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


# ---------------------------------------------------------------------------------------- collection
ROW_COLUMNS = ("dataset", "model", "seed", "attention", "context_len", "patch_len", "context_tokens",
               "layout_tokens", "batch_size", "top_k", "steps", "CRPS", "CRPS_rel", "MASE", "MASE_rel",
               "step_seconds", "peak_mb", "train_seconds")


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Evaluation run folders (holding evaluation.json) at or below the given paths."""
    runs = []
    for path in map(Path, paths):
        if (path / "evaluation.json").is_file():
            runs.append(path)
        elif path.is_dir():
            runs += sorted(p.parent for p in path.rglob("evaluation.json"))
    return runs


def load_rows(paths: list[str | Path]) -> pd.DataFrame:
    """Our models' per-seed rows of every finished run (seasonal naive only serves as their reference),
    with the run's context rung (study.context) and folder."""
    rows = []
    for run in find_runs(paths):
        record = json.loads((run / "evaluation.json").read_text())
        rung = variant = None
        if (run / "config.yaml").is_file():
            config = OmegaConf.load(run / "config.yaml")
            rung, variant = OmegaConf.select(config, "study.context"), OmegaConf.select(config, "study.variant")
        # A variant (or a curriculum) is a row of its own: the same model trained another way.
        label = f"+{variant}" if variant else curriculum_label((record.get("setting") or {}).get("context_curriculum"))
        for row in record["rows"]:
            tokens = row.get("context_tokens")
            if tokens is None or (isinstance(tokens, float) and math.isnan(tokens)):
                continue  # seasonal naive and GluonTS baselines: no tokens
            rec = {**{k: row.get(k) for k in ROW_COLUMNS}, "rung": rung, "run": str(run)}
            rec["model"] = f"{rec['model']}{label}"
            rows.append(rec)
    if not rows:
        raise LongContextError(f"no finished long-context runs (evaluation.json with our models' rows) under "
                               f"{[str(p) for p in paths]}")
    return pd.DataFrame(rows)


def curriculum_label(stages: list[dict] | None) -> str:
    """``""`` without ``eval.context_curriculum``; else ``"+cur256x200"`` (context steps x training
    steps of each short stage before the full context), appended to the model's name."""
    if not stages:
        return ""
    return "+cur" + "+".join(f"{int(s['context_len'])}x{int(s['steps'])}" for s in stages)


def _has_model_row(run: Path) -> bool:
    """Whether the run folder holds a finished evaluation of one of our models."""
    try:
        return not load_rows([run]).empty
    except LongContextError:
        return False


def summarize(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, model, patch, context): mean and sample std over seeds."""
    out = []
    keys = ["dataset", "model", "patch_len", "context_len"]
    for key, g in rows.groupby(keys, sort=True):
        rec = dict(zip(keys, key))
        rec.update(attention=g["attention"].iloc[0], rung=g["rung"].iloc[0], seeds=len(g),
                   context_tokens=int(g["context_tokens"].max()), layout_tokens=int(g["layout_tokens"].max()),
                   batch_size=int(g["batch_size"].max()), top_k=g["top_k"].iloc[0], steps=int(g["steps"].max()))
        for col in ("CRPS_rel", "MASE_rel", "step_seconds", "peak_mb"):
            vals = g[col].to_numpy(dtype=float)
            rec[col] = float(np.mean(vals))
            rec[f"{col}_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
        out.append(rec)
    return pd.DataFrame(out)


def target_check(table: pd.DataFrame, reference_context: int = REFERENCE_CONTEXT,
                 long_context: int = LONG_CONTEXT, token_threshold: int = TOKEN_THRESHOLD) -> dict[str, Any]:
    """The issue's targets on the collected table (means over seeds):
    (a) per dataset, does the best MSA run (free or sensor, any patch) at a context of at least
        ``long_context`` steps beat in CRPS the best run of any model at ``reference_context`` steps?
        Met on at least two datasets.
    (b) at equal context (dataset, patch, context) from ``token_threshold`` context tokens on, does every
        MSA model's step cost at most half of dense's?"""
    per_dataset, lines = {}, []
    for dataset, g in table.groupby("dataset", sort=True):
        ref = g[g["context_len"] == reference_context]
        long = g[(g["context_len"] >= long_context) & (g["attention"] == "msa")]
        if ref.empty or long.empty:
            missing = (f"no run at the {reference_context}-step context" if ref.empty
                       else f"no MSA run at {long_context} steps or more")
            per_dataset[dataset] = None
            lines.append(f"- {dataset}: not decided: {missing}.")
            continue
        r, m = ref.loc[ref["CRPS_rel"].idxmin()], long.loc[long["CRPS_rel"].idxmin()]
        beats = bool(m["CRPS_rel"] < r["CRPS_rel"])
        per_dataset[dataset] = beats
        spread = max(r["CRPS_rel_std"], m["CRPS_rel_std"])
        resolved = "" if abs(m["CRPS_rel"] - r["CRPS_rel"]) > spread else " (within the seed spread: not resolved)"
        lines.append(
            f"- {dataset}: best MSA at long context {m['model']} patch {m['patch_len']}, {m['context_len']} steps "
            f"({m['context_tokens']} tokens): CRPS/naive {m['CRPS_rel']:.3f} ({m['seeds']} seeds) "
            f"{'beats' if beats else 'does NOT beat'} the best at {reference_context} steps, {r['model']} patch "
            f"{r['patch_len']}: {r['CRPS_rel']:.3f} ({r['seeds']} seeds){resolved}.")
    decided = [v for v in per_dataset.values() if v is not None]
    wins = sum(decided)
    a_met = wins >= 2
    a_text = (f"(a) Long context pays on {wins} of {len(decided)} datasets with both runs "
              f"(target: at least 2 of 3): {'met' if a_met else 'NOT met'}.")

    ratios = []
    keys = ["dataset", "patch_len", "context_len"]
    for key, g in table.groupby(keys, sort=True):
        dense = g[g["model"] == "dense"]
        for m in g[g["attention"] == "msa"].to_dict("records"):
            if dense.empty:
                continue
            d = dense.iloc[0]
            ratios.append({**dict(zip(keys, key)), "model": m["model"], "tokens": int(m["context_tokens"]),
                           "ratio": m["step_seconds"] / d["step_seconds"]})
    ratios_df = pd.DataFrame(ratios, columns=["dataset", "patch_len", "context_len", "model", "tokens", "ratio"])
    over = ratios_df[ratios_df["tokens"] >= token_threshold]
    if over.empty:
        longest = table.loc[table["context_tokens"].idxmax()]
        b_met = None
        b_text = (f"(b) Step cost from {token_threshold // 1024}K tokens on: no run reached {token_threshold // 1024}K "
                  f"tokens (the longest: {longest['context_tokens']} tokens, {longest['dataset']} patch "
                  f"{longest['patch_len']} at {longest['context_len']} steps), so this target is not tested here.")
    else:
        b_met = bool((over["ratio"] <= 0.5).all())
        b_text = (f"(b) Step cost from {token_threshold // 1024}K tokens on: MSA/dense step time "
                  f"{over['ratio'].min():.2f}-{over['ratio'].max():.2f} over {len(over)} equal-context pairs "
                  f"(target: at most 0.5): {'met' if b_met else 'NOT met'}.")
    if not ratios_df.empty:
        top = ratios_df.loc[ratios_df.groupby("model")["tokens"].idxmax()]
        b_text += " At the longest context with both: " + "; ".join(
            f"{r['model']}/dense {r['ratio']:.2f} at {r['tokens']} tokens ({r['dataset']}, patch {r['patch_len']})"
            for r in top.to_dict("records")) + "."
    return {"a": {"met": a_met, "wins": wins, "decided": len(decided), "per_dataset": per_dataset, "lines": lines,
                  "text": a_text},
            "b": {"met": b_met, "pairs": ratios_df.to_dict("records"), "text": b_text}}


def _pm(mean: float, std: float, n: int, digits: int = 3) -> str:
    return f"{mean:.{digits}f}" if n <= 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown(table: pd.DataFrame, check: dict[str, Any], jobs: dict[str, str] | None, note: str) -> str:
    lines = ["# Does long context pay? Forecast quality against context length", "",
             note, "",
             "| dataset | model | patch | context steps | tokens | batch | top_k | seeds | CRPS / naive | MASE / naive "
             "| s / step | peak MB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in table.sort_values(["dataset", "patch_len", "context_len", "model"]).to_dict("records"):
        top_k = "-" if r["attention"] != "msa" else str(int(r["top_k"]))
        n = r["seeds"]
        lines.append(f"| {r['dataset']} | {r['model']} | {r['patch_len']} | {r['context_len']} | {r['context_tokens']} "
                     f"| {r['batch_size']} | {top_k} | {n} | {_pm(r['CRPS_rel'], r['CRPS_rel_std'], n)} "
                     f"| {_pm(r['MASE_rel'], r['MASE_rel_std'], n)} | {r['step_seconds']:.4f} | {r['peak_mb']:.0f} |")
    lines += ["", "## Targets", "", check["a"]["text"], "", *check["a"]["lines"], "", check["b"]["text"]]
    if jobs:
        done = sum(s == "ok" for s in jobs.values())
        lines += ["", "## Jobs", "", f"{done} of {len(jobs)} planned jobs finished."]
        others = {s for s in jobs.values() if s != "ok"}
        for s in sorted(others):
            names = [n for n, v in jobs.items() if v == s]
            lines.append(f"- {s} ({len(names)}): {', '.join(names)}")
    return "\n".join(lines) + "\n"


def plot(table: pd.DataFrame, path: Path) -> None:
    """Plot 1 (top row, a panel per dataset): CRPS / seasonal naive against context tokens (log x), a line
    per model and patch length. Plot 2 (bottom row): seconds per training step and peak memory against
    context tokens. Colour = model, line style = patch length, marker = dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import NullFormatter

    datasets = sorted(table["dataset"].unique())
    models = [m for m in MODELS if m in set(table["model"])] + sorted(set(table["model"]) - set(MODELS))
    patches = sorted(table["patch_len"].unique(), reverse=True)
    colors = {m: f"C{i}" for i, m in enumerate(models)}
    styles = {p: ls for p, ls in zip(patches, ("-", "--", ":", "-."))}
    markers = {d: mk for d, mk in zip(datasets, "osD^vP*X")}
    ncols = max(len(datasets), 2)
    fig = plt.figure(figsize=(5.5 * ncols, 9))
    grid = fig.add_gridspec(2, 2 * ncols)
    quality = [fig.add_subplot(grid[0, 2 * i:2 * i + 2]) for i in range(len(datasets))]
    half = ncols  # the bottom row: two panels, each half the width
    step_ax, mem_ax = fig.add_subplot(grid[1, :half]), fig.add_subplot(grid[1, half:])
    for (dataset, model, patch), g in table.groupby(["dataset", "model", "patch_len"], sort=True):
        g = g.sort_values("context_tokens")
        kw = dict(color=colors[model], marker=markers[dataset], linestyle=styles[patch], markersize=4)
        quality[datasets.index(dataset)].errorbar(g["context_tokens"], g["CRPS_rel"], yerr=g["CRPS_rel_std"],
                                                  capsize=2, **kw)
        step_ax.plot(g["context_tokens"], g["step_seconds"] * 1e3, **kw)
        mem_ax.plot(g["context_tokens"], g["peak_mb"], **kw)
    for ax, dataset in zip(quality, datasets):
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_title(f"1. {dataset}: CRPS / seasonal naive (lower is better)")
    for ax, title in ((step_ax, "2a. training step (ms)"), (mem_ax, "2b. peak memory (MB)")):
        ax.set_title(title)
        ax.set_yscale("log")
    for ax in [*quality, step_ax, mem_ax]:
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels collide on a short decade span
        ax.set_xlabel("context tokens per window")
        ax.grid(True, which="both", alpha=0.3)
    handles = ([Line2D([], [], color=colors[m], label=m) for m in models]
               + [Line2D([], [], color="gray", linestyle=styles[p], label=f"patch {p}") for p in patches]
               + [Line2D([], [], color="gray", marker=markers[d], linestyle="", label=d) for d in datasets])
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def collect(paths: list[str | Path], out: str | Path, jobs: dict[str, str] | None = None,
            note: str = "") -> dict[str, Any]:
    """Write <out>.json, <out>.md and <out>.png from the finished runs under ``paths``; return the record."""
    rows = load_rows(paths)
    table = summarize(rows)
    check = target_check(table)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    note = note or (f"Collected {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC from {len(rows)} runs. "
                    "CRPS and MASE are ratios to seasonal naive on the same end-aligned test windows; s / step is the "
                    "median training step after the indexer warmup; peak MB is the training's peak allocation.")
    record = {"note": note, "rows": rows.to_dict("records"), "table": table.to_dict("records"),
              "targets": check, "jobs": jobs}
    Path(f"{out}.json").write_text(json.dumps(record, indent=2, default=_json_default))
    Path(f"{out}.md").write_text(markdown(table, check, jobs, note))
    plot(table, Path(f"{out}.png"))
    print(f"wrote {out}.json, {out}.md, {out}.png: {len(table)} settings; {check['a']['text']} {check['b']['text']}")
    return record


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, (np.bool_,)):
        return bool(x)
    return str(x)


# ----------------------------------------------------------------------------------------------- CLI
def run_study(args: argparse.Namespace) -> dict[str, Any]:
    jobs = plan(args.datasets, args.models, args.patches, args.seeds, rungs=args.rungs,
                variants=parse_variants(args.variant))
    earlier = [Path(d) for d in args.skip_finished]
    missing = [str(d) for d in earlier if not d.is_dir()]
    if missing:
        raise LongContextError(f"--skip-finished: no such folder {missing}; give the runs folder of an earlier study run")
    # A job already finished in an earlier run (same name, a scored row of our model) is not run again; its
    # folder is collected with the new ones. evaluation.json alone is not enough: the evaluate command
    # writes it with the seasonal-naive row before our model has trained.
    finished = {job.name for job in jobs if any(_has_model_row(d / job.name) for d in earlier)}
    jobs = [job for job in jobs if job.name not in finished]
    runs_dir = Path(args.runs_dir or f"outputs/long_context/{datetime.now():%Y-%m-%d_%H-%M-%S}")
    threads = max(1, (os.cpu_count() or 1) // args.workers)
    commands = {job.name: [sys.executable, "-m", "tsfm_msa.cli", "evaluate", *job.overrides(),
                           f"trainer={args.trainer}", f"eval.cpu_threads={threads}",
                           f"hydra.run.dir={runs_dir / job.name}", *args.override]
                for job in jobs}
    if args.dry_run:
        for name, argv in commands.items():
            print(shlex.join(["python", *argv[1:]]))  # a line that runs as pasted
        return {"jobs": {name: "not started" for name in commands}}
    print(f"{len(jobs)} jobs, {args.workers} at a time, {args.budget_minutes} min; runs in {runs_dir}", flush=True)
    # Each job compiles its own FlexAttention / Triton kernels: its share of the cores, not a pool of all.
    env = {**os.environ, "TORCHINDUCTOR_COMPILE_THREADS": os.environ.get("TORCHINDUCTOR_COMPILE_THREADS", str(threads)),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))}
    status = run_pool(commands, runs_dir / "logs", args.workers, args.budget_minutes * 60, args.min_start_seconds,
                      env=env)
    (runs_dir / "jobs.json").write_text(json.dumps(status, indent=2))
    note = (f"{datetime.now(timezone.utc):%Y-%m-%d} UTC, trainer={args.trainer}, {args.workers} jobs at a time on one "
            f"device (step times and peak memory were measured while the other jobs ran), budget "
            f"{args.budget_minutes} min. CRPS and MASE are ratios to seasonal naive on the same end-aligned test "
            "windows; s / step is the median training step after the indexer warmup; peak MB is the training's "
            "peak allocation.")
    status.update({name: "finished in an earlier run" for name in sorted(finished)})
    return collect([runs_dir, *earlier], args.out, jobs=status, note=note)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "run":
        p = argparse.ArgumentParser(prog="python -m tsfm_msa.evaluate.long_context run",
                                    description="Run the long-context study within a time budget, then collect it.")
        p.add_argument("--out", required=True, help="output prefix, e.g. benchmarks/results/2026-12-02-long-context")
        p.add_argument("--budget-minutes", type=float, default=8.0)
        p.add_argument("--workers", type=int, default=6, help="evaluation processes at a time on the one device")
        p.add_argument("--min-start-seconds", type=float, default=60.0,
                       help="start no job once less than this is left of the budget")
        p.add_argument("--trainer", default="gpu")
        p.add_argument("--runs-dir", default=None, help="where the runs go (default outputs/long_context/<time>)")
        p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
        p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
        p.add_argument("--patches", nargs="+", type=int, default=list(PATCHES))
        p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
        p.add_argument("--rungs", nargs="+", default=None, help="context rungs to run (default: all of STAGES)")
        p.add_argument("--override", nargs="*", default=[], help="more Hydra overrides for every job")
        p.add_argument("--variant", action="append", default=[], metavar="NAME=OVERRIDES",
                       help="run every job also as this variant (its extra overrides, its own run folder "
                            "<job>-NAME); repeat for more; 'plain' = the job as configured. Without it: plain only")
        p.add_argument("--skip-finished", nargs="*", default=[], metavar="RUNS_DIR",
                       help="runs folders of earlier study runs: jobs finished there are not run again, only collected")
        p.add_argument("--dry-run", action="store_true", help="print the jobs in order and stop")
        try:
            run_study(p.parse_args(argv[1:]))
        except LongContextError as err:
            sys.exit(f"long_context: {err}")
        return
    p = argparse.ArgumentParser(prog="python -m tsfm_msa.evaluate.long_context",
                                description="Collect finished long-context runs into <out>.{json,md,png}.")
    p.add_argument("runs", nargs="+", help="multirun folders, run folders, or folders holding them")
    p.add_argument("--out", required=True, help="output prefix, e.g. benchmarks/results/2026-12-02-long-context")
    args = p.parse_args(argv)
    try:
        collect(args.runs, args.out)
    except LongContextError as err:
        sys.exit(f"long_context: {err}")


if __name__ == "__main__":
    main()
