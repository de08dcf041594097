"""Probe report: verdicts, aggregates over seeds, probe_summary.json, probe_report.md, a self-contained
probe_report.html and PNG plots (selection heat maps, recall / error-ratio bars, counterfactual scatter).

probe_summary.json: ``scenarios.<name>.runs`` holds one result per seed (``seed``, ``policies.<policy>.rows``:
the per-seed rows); ``aggregate`` one row per (scenario, policy, backbone, selector) over the seeds."""
from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

import numpy as np

from tsfm_msa.probes.metrics import error_ratio

DEFAULT_THRESHOLDS = {"preserved_recall": 0.9, "preserved_ratio": 1.1, "lost_recall": 0.5, "lost_ratio": 1.5}
# The rows of the headline table: the dense model (the reference), then every selector on the MSA model
# trained for the scenario (same weights, same budget, only the block choice differs), or everything
# on a probed checkpoint. Training-free selectors on the dense model are in the per-scenario tables.
HEADLINE = (("dense", "dense"), ("msa", "dense"), ("msa", "local"), ("msa", "random"), ("msa", "oracle"),
            ("msa", "moba"), ("msa", "learned"), ("checkpoint", "dense"), ("checkpoint", "local"), ("checkpoint", "random"),
            ("checkpoint", "oracle"), ("checkpoint", "moba"), ("checkpoint", "learned"))


def judge(recall: float, error_ratio: float, thresholds: dict | None = None) -> str:
    """``recall`` is the direct selection recall at the forecast queries.
    preserved: recall >= preserved_recall and error ratio <= preserved_ratio; lost: recall <
    lost_recall or error ratio > lost_ratio; degraded: in between. A NaN recall (no needed block)
    is judged on the error ratio alone."""
    t = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
    r_ok = math.isnan(recall) or recall >= t["preserved_recall"]
    r_lost = not math.isnan(recall) and recall < t["lost_recall"]
    if math.isnan(error_ratio):
        return "n/a"
    if r_lost or error_ratio > t["lost_ratio"]:
        return "lost"
    if r_ok and error_ratio <= t["preserved_ratio"]:
        return "preserved"
    return "degraded"


def seed_runs(summary: dict):
    """(scenario, one seed's result) pairs, scenarios in order, seeds in order."""
    for scenario, res in summary["scenarios"].items():
        for run in res["runs"]:
            yield scenario, run


# Per-seed metrics averaged over seeds (a NaN left out: no needed block, or no counterfactual change),
# errors averaged with NaN kept (a failed seed must show), and the min-max over seeds kept for some.
MEANS = ("recall", "path_recall", "cf_corr", "support_tokens", "support_frac")
ERRORS = ("mae", "crps", "reference_mae", "reference_crps")
SPREADS = ("recall", "path_recall", "error_ratio", "crps_ratio")


def _defined(values) -> list[float]:
    """The values that are neither None nor NaN."""
    return [float(v) for v in values if v is not None and not math.isnan(v)]


def _mean(values: list) -> float:
    """Mean of the defined values; NaN if none."""
    vals = _defined(values)
    return float(np.mean(vals)) if vals else float("nan")


def aggregate_row(rows: list[dict], thresholds: dict | None = None) -> dict:
    """One (scenario, policy, backbone, selector) over its per-seed ``rows``: means, the min-max over
    seeds of recall and ratios (``<metric>_range``; min-max, not std: two or three seeds give no
    usable std), n_seeds, each seed's verdict, and the verdict judged on the means."""
    out = {k: rows[0][k] for k in ("scenario", "policy", "backbone", "selector")}
    out.update({"n_seeds": len(rows), "seeds": [r["seed"] for r in rows]})
    out.update({k: _mean([r[k] for r in rows]) for k in MEANS})
    out.update({k: float(np.mean([np.nan if r[k] is None else r[k] for r in rows])) for k in ERRORS})
    # Ratio of mean errors, not mean of per-seed ratios: the dense reference's MAE differs between seeds
    # (0.113 vs 0.140 on action_history), and a seed with a small reference error would otherwise weigh
    # most; it is the per-seed ratios' mean weighted by the reference error, so it lies in their range.
    out["error_ratio"] = error_ratio(out["mae"], out["reference_mae"])
    out["crps_ratio"] = error_ratio(out["crps"], out["reference_crps"])
    for k in SPREADS:
        vals = _defined(r[k] for r in rows)
        out[f"{k}_range"] = [min(vals), max(vals)] if vals else [float("nan")] * 2
    out["seed_verdicts"] = [r["verdict"] for r in rows]
    out["verdict"] = judge(out["recall"], out["error_ratio"], thresholds)
    return out


def aggregate_rows(summary: dict) -> list[dict]:
    """Every per-seed row of the summary grouped by (scenario, policy, backbone, selector), one
    aggregate row each (order of first appearance)."""
    groups: dict[tuple, list[dict]] = {}
    for scenario, run in seed_runs(summary):
        for policy, pol in run.get("policies", {}).items():
            for r in pol["rows"]:
                key = (scenario, policy, r["backbone"], r["selector"])
                groups.setdefault(key, []).append({**r, "scenario": scenario, "policy": policy, "seed": run["seed"]})
    thresholds = summary["settings"].get("verdict")
    return [aggregate_row(rows, thresholds) for rows in groups.values()]


def headline_rows(summary: dict) -> list[dict]:
    """The aggregate rows of the headline table, in HEADLINE order per (scenario, policy)."""
    rows = summary["aggregate"]
    out = []
    for scenario, policy in dict.fromkeys((r["scenario"], r["policy"]) for r in rows):
        by_key = {(r["backbone"], r["selector"]): r for r in rows if (r["scenario"], r["policy"]) == (scenario, policy)}
        out += [by_key[key] for key in HEADLINE if key in by_key]
    return out


def _label(row: dict) -> str:
    return "dense model" if row["backbone"] == "dense" and row["selector"] == "dense" else row["selector"]


def _fmt(x, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def _spread(row: dict, key: str) -> str:
    """The mean, then its min-max over seeds when there are several."""
    if row["n_seeds"] < 2:
        return _fmt(row[key])
    lo, hi = row[f"{key}_range"]
    return f"{_fmt(row[key])} ({_fmt(lo)}-{_fmt(hi)})"


def _verdict_cell(row: dict) -> str:
    if row["n_seeds"] < 2:
        return row["verdict"]
    counts = {v: row["seed_verdicts"].count(v) for v in dict.fromkeys(row["seed_verdicts"])}
    return f"{row['verdict']} (seeds: {', '.join(f'{n} {v}' for v, n in counts.items())})"


TABLE_HEAD = ["scenario", "policy", "selector", "model", "seeds", "recall", "path recall", "MAE ratio", "CRPS ratio",
              "cf corr", "support (tok, frac)", "verdict"]


def table_cells(row: dict) -> list[str]:
    return [row["scenario"], row["policy"], row["selector"], row["backbone"], str(row["n_seeds"]),
            _spread(row, "recall"), _spread(row, "path_recall"), _spread(row, "error_ratio"),
            _spread(row, "crps_ratio"), _fmt(row["cf_corr"]), f"{_fmt(row['support_tokens'], 1)}, "
            f"{_fmt(row['support_frac'])}", _verdict_cell(row)]


# A dense reference whose counterfactual correlation stays below this does not use the scenario's cause
# (the long target's ``reference_cf_corr`` replaces it where set).
REFERENCE_USES_CAUSE = 0.5


def summary_table(summary: dict) -> str:
    """Markdown table of the headline rows (aggregates over the seeds). Where the dense reference does not
    use the cause, an error ratio near 1 says nothing about preservation: the verdicts of that scenario
    and policy say so."""
    min_cf = float((summary.get("target") or {}).get("reference_cf_corr", REFERENCE_USES_CAUSE))
    reference_cf = {(r["scenario"], r["policy"]): r.get("cf_corr") for r in summary["aggregate"]
                    if (r["backbone"], r["selector"]) == ("dense", "dense")}
    lines = ["| " + " | ".join(TABLE_HEAD) + " |", "|" + "---|" * len(TABLE_HEAD)]
    for row in headline_rows(summary):
        cells = table_cells(row)
        key = (row["scenario"], row["policy"])
        # None or NaN (no counterfactual measured) counts as not using the cause: nothing shows that it does.
        if key in reference_cf and not (reference_cf[key] is not None and reference_cf[key] >= min_cf):
            cells[-1] += f" (untested: the dense reference does not use the cause, cf corr {_fmt(reference_cf[key])})"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _json_safe(x):
    """Drop private keys (leading underscore: plot material) and turn NaN/inf into null."""
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items() if not str(k).startswith("_")}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


# ---------------------------------------------------------------------------------------------
# plots

def _figures(summary: dict, out_dir: Path) -> list[tuple[str, str]]:
    """Write the PNGs; return (file name, caption) pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    made = []
    # Heat maps and counterfactual scatters illustrate one test instance: the first seed's run.
    first = {scenario: res["runs"][0] for scenario, res in summary["scenarios"].items() if res["runs"]}
    for scenario, run in first.items():
        for policy, pol in run.get("policies", {}).items():
            rows = [r for r in pol["rows"] if (r["backbone"], r["selector"]) in HEADLINE and r["selector"] != "dense"]
            if not rows or "_needed" not in pol:  # a merged report (probes/merge.py): no plot material saved
                continue
            needed = np.asarray(pol["_needed"], dtype=bool)
            names = pol["variate_names"]
            fig, axes = plt.subplots(len(rows), 1, figsize=(9, 1.0 + 0.45 * len(names) * len(rows) + 0.4 * len(rows)),
                                     squeeze=False)
            for ax, row in zip(axes[:, 0], rows):
                ax.imshow(row["_grid"], aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
                for v, p in zip(*np.nonzero(needed)):
                    ax.add_patch(Rectangle((p - 0.5, v - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
                ax.axvline(needed.shape[1] - 1.5, color="white", linestyle=":", linewidth=1)
                ax.set_yticks(range(len(names)), names, fontsize=7)
                if needed.shape[1] <= 64:  # one tick per patch; long windows keep matplotlib's few ticks
                    ax.set_xticks(range(needed.shape[1]), [str(p) for p in range(needed.shape[1])], fontsize=6)
                ax.set_title(f"{row['selector']} ({row['backbone']} model): recall {_fmt(row['recall'])}", fontsize=9)
            axes[-1, 0].set_xlabel("patch (time); right of the dotted line: horizon; red: needed tokens")
            fig.tight_layout()
            name = f"heatmap_{scenario}_{policy}.png"
            fig.savefig(out_dir / name, dpi=80)
            plt.close(fig)
            made.append((name, f"{scenario} / {policy}, seed {run['seed']}: share of layers in which the forecast "
                               "query's selection (any GQA group) covers each sensor x patch token, test instance 0; "
                               "needed tokens outlined in red"))

    rows = headline_rows(summary)
    if rows:
        groups = list(dict.fromkeys(f"{r['scenario']}\n{r['policy']}" for r in rows))
        selectors = list(dict.fromkeys(_label(r) for r in rows))
        for metric, label, lines, fname in (("recall", "direct recall of needed blocks", (0.9, 0.5), "recall_bars.png"),
                                            ("path_recall", "path recall of needed tokens", (0.9, 0.5),
                                             "path_recall_bars.png"),
                                            ("error_ratio", "MAE ratio vs dense", (1.1, 1.5), "error_ratio_bars.png")):
            fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(groups)), 3.8))
            width = 0.8 / max(1, len(selectors))
            for s, sel in enumerate(selectors):
                vals, lows, highs = [], [], []
                for g in groups:
                    hit = [r for r in rows if f"{r['scenario']}\n{r['policy']}" == g
                           and _label(r) == sel]
                    v, (lo, hi) = (hit[0][metric], hit[0][f"{metric}_range"]) if hit else (np.nan, (np.nan, np.nan))
                    vals.append(v)
                    lows.append(max(0.0, v - lo))  # max: rounding may put the mean a hair outside
                    highs.append(max(0.0, hi - v))
                ax.bar(np.arange(len(groups)) + s * width, vals, width, label=sel,
                       yerr=[lows, highs] if any(r["n_seeds"] > 1 for r in rows) else None, capsize=2)
            for y in lines:
                ax.axhline(y, color="grey", linestyle="--", linewidth=0.8)
            ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, groups, fontsize=8)
            ax.set_ylabel(label)
            if metric == "error_ratio":
                ax.set_yscale("log")
            ax.legend(fontsize=7, ncol=len(selectors), loc="upper left")
            fig.tight_layout()
            fig.savefig(out_dir / fname, dpi=80)
            plt.close(fig)
            made.append((fname, f"{label} per scenario and selector (selectors on the MSA model trained for the "
                                f"scenario, or on the probed checkpoint), mean over seeds (whiskers: min-max); "
                                f"dashed lines: verdict thresholds {lines}"))

    fig_rows = [(s, p) for s, run in first.items() for p in run.get("policies", {})
                if all("_cf" in row for row in run["policies"][p]["rows"])]
    if rows and fig_rows:
        fig, axes = plt.subplots(1, len(fig_rows), figsize=(3.2 * len(fig_rows), 3.2), squeeze=False)
        for ax, (scenario, policy) in zip(axes[0], fig_rows):
            for row in first[scenario]["policies"][policy]["rows"]:
                if (row["backbone"], row["selector"]) in (("dense", "dense"), ("msa", "local"), ("msa", "oracle"),
                                                          ("msa", "learned"), ("checkpoint", "dense"),
                                                          ("checkpoint", "local"), ("checkpoint", "learned")):
                    true, pred = row["_cf"]
                    ax.scatter(np.ravel(true), np.ravel(pred), s=4, alpha=0.5,
                               label=f"{_label(row)} ({_fmt(row['cf_corr'])})")
            lim = ax.get_xlim()
            ax.plot(lim, lim, color="grey", linewidth=0.8)
            ax.set_title(f"{scenario} / {policy}, seed {first[scenario]['seed']}", fontsize=8)
            ax.set_xlabel("true change", fontsize=8)
            ax.legend(fontsize=6)
        axes[0, 0].set_ylabel("forecast change (median)")
        fig.tight_layout()
        fig.savefig(out_dir / "counterfactual_scatter.png", dpi=80)
        plt.close(fig)
        made.append(("counterfactual_scatter.png", "counterfactual: forecast change vs true change when the far "
                                                   "cause is changed (legend: Pearson correlation)"))
    return made


# ---------------------------------------------------------------------------------------------
# documents

def _settings_lines(summary: dict) -> list[str]:
    s = summary["settings"]
    t = {**DEFAULT_THRESHOLDS, **(s.get("verdict") or {})}
    merged = summary.get("merged_from")
    return [
        f"- date: {summary['date']}; device: {summary['device']}; precision {summary.get('precision', '32-true')}; "
        f"wall time {summary['wall_seconds']} s" + (f" (the longest of {len(merged)} runs side by side, merged: "
                                                    f"{', '.join(merged)})" if merged else ""),
        f"- model: {json.dumps(s.get('model'))}",
        f"- training: {json.dumps(s.get('train'))}",
        f"- checkpoint: {s.get('checkpoint')}",
        f"- seeds: {s.get('seeds')} (each scenario's data and models once per seed). The summary rows are over the "
        "seeds: mean recall, MAE and CRPS ratios of the mean errors (mean MAE / mean MAE of the dense model), "
        "in brackets the min-max of the per-seed values; the verdict is judged on the means. The per-seed "
        "rows follow in the scenario sections.",
        f"- verdict thresholds: **preserved** if recall >= {t['preserved_recall']} and MAE ratio <= "
        f"{t['preserved_ratio']}; **lost** if recall < {t['lost_recall']} or MAE ratio > {t['lost_ratio']}; "
        "**degraded** otherwise.",
        "- recall (direct): share of the needed blocks (the far cause) that a forecast query's selection contains "
        "in at least one layer and GQA group, averaged over forecast queries and test instances; per-layer and "
        "per-group values are in the tables below and in probe_summary.json.",
        "- path recall: share of the needed tokens whose information can reach a forecast query through the "
        "selections of the layer stack (read directly, or read by a token that a later layer's query reads); "
        "it only says a route exists (random-k almost always has one), so the verdict uses the direct recall.",
        "- MAE / CRPS ratio: against the dense model (dense selector on the dense-trained model); cf corr: Pearson "
        "correlation of the forecast's change with the true change when the cause is changed; support: visible "
        "tokens read per forecast query and group, and their share of the dense visible set.",
    ]


def target_check(summary: dict) -> list[dict]:
    """The long-context target (``probe.target``): per listed scenario under ``policy``, the learned
    indexer on the MSA model reaches ``learned_recall`` and an error ratio <= ``learned_ratio``
    while the local window stays below ``local_recall``. One row per scenario; [] without a target."""
    target = summary.get("target")
    if not target:
        return []
    out = []
    for scenario in target["scenarios"]:
        rows = {(r["backbone"], r["selector"]): r for r in summary["aggregate"]
                if (r["scenario"], r["policy"]) == (scenario, target["policy"])}
        learned, local = rows.get(("msa", "learned")), rows.get(("msa", "local"))
        reference = rows.get(("dense", "dense"))
        if learned is None or local is None or reference is None:
            out.append({"scenario": scenario, "ok": False, "why": "not run (needs the learned and local selectors)"})
            continue
        row = {"scenario": scenario, "n_seeds": learned["n_seeds"], "learned_recall": learned["recall"],
               "learned_ratio": learned["error_ratio"], "local_recall": local["recall"],
               "reference_cf_corr": reference["cf_corr"]}
        checks = {"learned recall": learned["recall"] >= target["learned_recall"],
                  "learned ratio": learned["error_ratio"] <= target["learned_ratio"],
                  "local recall": local["recall"] < target["local_recall"]}
        misses = ", ".join(k for k, ok in checks.items() if not ok)
        # Preservation of a cause is only measurable when a model uses it: with neither the dense reference
        # nor the learned MSA model following the cause, every error ratio is ~1 (seen at 16K-64K). When
        # only the MSA model uses it (it learned the far cause and the dense reference did not, seen at
        # 16K), the checks still hold the learned indexer to the cause's blocks, and the row says so.
        min_cf = float(target.get("reference_cf_corr", REFERENCE_USES_CAUSE))
        reference_uses, learned_uses = reference["cf_corr"] >= min_cf, learned.get("cf_corr", float("nan")) >= min_cf
        row["learned_cf_corr"] = learned.get("cf_corr")
        if not reference_uses and not learned_uses:
            out.append({**row, "ok": False, "why": f"inconclusive: neither the dense reference nor the learned MSA "
                                                   f"model uses the cause (cf corr {_fmt(reference['cf_corr'])} and "
                                                   f"{_fmt(learned.get('cf_corr'))} < {min_cf})"})
            continue
        why = misses or "met"
        if not reference_uses:
            why += (f" (beyond the reference: only the MSA model uses the cause, cf corr "
                    f"{_fmt(learned.get('cf_corr'))} against the dense reference's {_fmt(reference['cf_corr'])})")
        out.append({**row, "ok": not misses, "why": why})
    return out


def _target_lines(summary: dict) -> list[str]:
    rows = target_check(summary)
    if not rows:
        return []
    t = summary["target"]
    lines = [f"## Target: learned recall >= {t['learned_recall']} and MAE ratio <= {t['learned_ratio']} under the "
             f"`{t['policy']}` policy, local-window recall < {t['local_recall']} (means over the seeds)", "",
             "| scenario | seeds | dense reference cf corr | learned cf corr | learned recall | learned MAE ratio | "
             "local recall | met | misses |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['scenario']} | {r.get('n_seeds', 0)} | {_fmt(r.get('reference_cf_corr'))} | "
                     f"{_fmt(r.get('learned_cf_corr'))} | {_fmt(r.get('learned_recall'))} | {_fmt(r.get('learned_ratio'))} | "
                     f"{_fmt(r.get('local_recall'))} | {'yes' if r['ok'] else 'no'} | {r['why']} |")
    return lines + [""]


def _means_by_key(pairs) -> dict:
    """(key, value) pairs -> {key: mean of its values}, keys in order of first appearance."""
    values: dict = {}
    for key, value in pairs:
        values.setdefault(key, []).append(value)
    return {k: _mean(v) for k, v in values.items()}


def timing_table(summary: dict) -> str:
    """Seconds per scenario: total over its seeds, then per seed (mean over seeds): data (generation,
    windows), each model's training, each selector's probe forwards (original + counterfactual
    windows, with its metrics)."""
    lines = ["| scenario | seeds | total s | data s per seed | training s per seed | probing s per seed "
             "(policy: backbone/selector) |", "|---|---|---|---|---|---|"]
    for scenario, res in summary["scenarios"].items():
        runs = res["runs"]
        train = _means_by_key(kv for run in runs for kv in run.get("train_seconds", {}).items())
        probe = _means_by_key(((policy, f"{r['backbone']}/{r['selector']}"), r.get("seconds"))
                              for run in runs for policy, pol in run.get("policies", {}).items() for r in pol["rows"])
        probe_text = "; ".join(f"{policy}: " + ", ".join(f"{name} {_fmt(v, 1)}" for (p, name), v in probe.items()
                                                         if p == policy)
                               for policy in dict.fromkeys(p for p, _ in probe))
        lines.append(f"| {scenario} | {len(runs)} | {_fmt(res.get('seconds'), 1)} | "
                     f"{_fmt(_mean([run.get('data_seconds') for run in runs]), 1)} | "
                     f"{', '.join(f'{k} {_fmt(v, 1)}' for k, v in train.items())} | {probe_text} |")
    return "\n".join(lines)


def _markdown(summary: dict, figures: list[tuple[str, str]]) -> str:
    lines = ["# Preservation probes", "", *_settings_lines(summary), "", "## Summary", "", summary_table(summary), "",
             *_target_lines(summary), "## Timing", "", timing_table(summary), ""]
    several = len(summary["settings"].get("seeds") or []) > 1
    for scenario, res in seed_runs(summary):
        lines += [f"## {scenario}" + (f", seed {res['seed']}" if several else ""), "",
                  f"{res['description']}. Knobs: `{json.dumps(res['knobs'])}`", ""]
        if res.get("model"):
            lines += [f"Model settings of this scenario (over the common ones): `{json.dumps(res['model'])}`", ""]
        if res.get("train"):
            lines += [f"Training settings of this scenario (over the common ones): `{json.dumps(res['train'])}`", ""]
        if res.get("skipped"):
            lines += [f"Skipped: {res['skipped']}", ""]
            continue
        if res.get("train_seconds"):
            lines += [f"Training seconds: {json.dumps(res['train_seconds'])}", ""]
        for policy, pol in res["policies"].items():
            lines += [f"### policy `{policy}` (top_k={pol['top_k']} blocks of {pol['block_size']} tokens, "
                      f"{pol['n_blocks']} blocks, {pol['seq_len']} tokens)", "",
                      "| model | selector | recall | recall per layer | recall per layer x group | path recall | MAE | "
                      "MAE ratio | vs own dense | cf corr | cf gain | verdict |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
            for r in pol["rows"]:
                lines.append(f"| {r['backbone']} | {r['selector']} | {_fmt(r['recall'])} | "
                             f"{', '.join(_fmt(x) for x in r['recall_per_layer'])} | "
                             f"{'; '.join(', '.join(_fmt(x) for x in g) for g in r['recall_per_layer_group'])} | "
                             f"{_fmt(r['path_recall'])} | {_fmt(r['mae'], 3)} | "
                             f"{_fmt(r['error_ratio'])} | {_fmt(r['error_ratio_vs_own_dense'])} | {_fmt(r['cf_corr'])} | "
                             f"{_fmt(r['cf_gain'])} | {r['verdict']} |")
            lines.append("")
    lines += ["## Plots", ""]
    for name, caption in figures:
        lines += [f"![{caption}]({name})", "", f"*{caption}*", ""]
    return "\n".join(lines)


def _html(summary: dict, figures: list[tuple[str, str]], out_dir: Path) -> str:
    esc = html.escape
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>Preservation probes</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse;"
             "font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}.preserved{background:#d8f5d0}"
             ".degraded{background:#fff2c0}.lost{background:#f8d0d0}img{max-width:100%}</style></head><body>",
             "<h1>Preservation probes</h1><ul>"]
    parts += [f"<li>{esc(line[2:]).replace('**', '')}</li>" for line in _settings_lines(summary)]
    parts += ["</ul><h2>Summary</h2><table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in TABLE_HEAD) + "</tr>"]
    for row in headline_rows(summary):
        cells = table_cells(row)
        parts.append(f"<tr class='{esc(row['verdict'])}'>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>")
    parts.append("</table>")
    for scenario, res in seed_runs(summary):
        if res.get("skipped"):
            parts.append(f"<h2>{esc(scenario)}, seed {res['seed']}</h2><p>Skipped: {esc(res['skipped'])}</p>")
    parts.append("<h2>Plots</h2>")
    for name, caption in figures:
        data = base64.b64encode((out_dir / name).read_bytes()).decode("ascii")
        parts.append(f"<figure><img alt='{esc(caption)}' src='data:image/png;base64,{data}'>"
                     f"<figcaption>{esc(caption)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(summary: dict, out_dir: Path) -> dict:
    """Write probe_summary.json, the PNGs, probe_report.md and probe_report.html into ``out_dir``; print
    the summary table; return the JSON-safe summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary["aggregate"] = aggregate_rows(summary)
    figures = _figures(summary, out_dir)
    if summary.get("target"):
        summary["target_check"] = target_check(summary)
    safe = _json_safe(summary)
    (out_dir / "probe_summary.json").write_text(json.dumps(safe, indent=1))
    (out_dir / "probe_report.md").write_text(_markdown(summary, figures))
    (out_dir / "probe_report.html").write_text(_html(summary, figures, out_dir))
    print(summary_table(summary))
    for line in _target_lines(summary):
        print(line)
    print(timing_table(summary))
    print(f"\n[probe] report: {out_dir / 'probe_report.md'} | {out_dir / 'probe_report.html'} | "
          f"{out_dir / 'probe_summary.json'}")
    return safe
