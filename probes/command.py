"""`tsfm-msa probe`: build scenarios, train (or load) models, run every selector, write the report.

For each scenario of ``cfg.probe.scenarios``, each seed of ``cfg.seeds`` (the scenario's data and the
models' training) and each group policy it lists:

1. train a dense model and an MSA model (indexer warmup, then sparse) on the scenario's training
   windows with the same step budget (ForecastModule + Lightning; CUDA when available): from scratch
   (``train.msa_init=scratch``), or by dense -> sparse adaptation (``dense``: both continue from one
   dense model for ``msa_steps``, the MSA one with warmup then sparse); or, with ``cfg.checkpoint``,
   load one model and probe it zero-shot;
2. on the test instances and their counterfactuals, run every selector on every backbone (a dense
   model is converted into an MSA model of the same shape so the selector hook exists; with all
   blocks selected it computes exactly dense attention);
3. measure recall of the needed blocks at the forecast queries, error ratio against the dense model,
   counterfactual sensitivity and support size; judge each (scenario, seed, policy, selector), and
   each (scenario, policy, selector) on its means over the seeds (report.py).
"""
from __future__ import annotations

import contextlib
import copy
import datetime as dt
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, default_collate

from tsfm_msa.datasets import SeriesSchema, WindowDataset
from tsfm_msa.probes import metrics
from tsfm_msa.probes.report import judge, write_report
from tsfm_msa.probes.scenarios import ProbeConfigError, ScenarioData, make_scenario
from tsfm_msa.probes.selectors import SELECTORS, TRAINING_FREE, msa_layers, use_selector
from tsfm_msa.model.attention import DenseGQA, MSAAttention
from tsfm_msa.tokens import TokenLayout
from tsfm_msa.train.lightning_module import build_model, dense_teacher_weight

MODEL_TARGET = "tsfm_msa.model.transformer.PatchTransformer"


# ---------------------------------------------------------------------------------------------
# models

def probe_model_config(model_cfg: dict, scenario: ScenarioData, attention: str, policy: str) -> dict:
    """Model node for a scenario: one GQA group per sensor group (so every policy runs on the same
    architecture and ``sensor`` is allowed), ``heads_per_group`` query heads per group."""
    groups = len(scenario.schema.group_names)
    cfg = _dense_support_for(dict(model_cfg), policy)
    heads_per_group = int(cfg.pop("heads_per_group", 2))
    return {"_target_": MODEL_TARGET, **cfg, "attention": attention, "group_policy": policy,
            "patch_len": scenario.patch_len, "n_kv_heads": groups, "n_heads": heads_per_group * groups}


def _dense_support_for(model_cfg: dict, policy: str) -> dict:
    """``dense_support=policy`` applies to the sensor-policy models of a scenario only: one probe config
    runs several policies (e.g. [sensor, hybrid]), and the model refuses ``policy`` elsewhere (it would
    mean ``all`` there anyway)."""
    if policy != "sensor" and model_cfg.get("dense_support") == "policy":
        model_cfg = {**model_cfg, "dense_support": "all"}
    return model_cfg


def window_dataset(frames, scenario: ScenarioData) -> WindowDataset:
    """One window per frame, its origin at ``context_len`` (frames hold exactly context + horizon)."""
    c, h = scenario.context_len, scenario.horizon
    return WindowDataset(frames, c, h, stride=c + h, split="probe")


def probe_device(name: str | None) -> torch.device:
    """``auto`` (default): CUDA when available (the MSA ops then run the Triton kernels), else CPU."""
    name = name or "auto"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise ProbeConfigError(f"device must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ProbeConfigError("device=cuda but no CUDA device is visible; use device=auto or device=cpu")
    return torch.device(name)


def probe_precision(name: str | None, device: torch.device) -> str:
    """Lightning precision: ``auto`` (default) is bf16-mixed on CUDA (the Triton kernels and Flex run
    on tensor cores; fp32 inputs take the slow IEEE path) and 32-true on the CPU."""
    name = name or "auto"
    if name == "auto":
        return "bf16-mixed" if device.type == "cuda" else "32-true"
    if name not in ("bf16-mixed", "32-true"):
        raise ProbeConfigError(f"precision must be auto, bf16-mixed or 32-true, got {name!r}")
    if name == "bf16-mixed" and device.type != "cuda":
        raise ProbeConfigError("precision=bf16-mixed needs device=cuda; use precision=auto on the CPU")
    return name


@contextlib.contextmanager
def eval_autocast(precision: str, device: torch.device, model: torch.nn.Module):
    """The training precision for the probe forwards (bf16 autocast on CUDA under bf16-mixed), except
    the forecast head: its output, the compared forecast, stays fp32 (bf16 would round every
    forecast by ~0.4%, a noise floor under the 1.1 verdict threshold)."""
    if precision != "bf16-mixed":
        yield
        return
    head = model.head
    bf16_forward = head.forward

    def fp32_forward(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=device.type, enabled=False):
            return bf16_forward(x.float())

    head.forward = fp32_forward
    try:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            yield
    finally:
        del head.forward  # back to the class's forward


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_model(model_config: dict, scenario: ScenarioData, train_cfg: dict, seed: int,
                init_state: dict | None = None, device: torch.device = torch.device("cpu"),
                precision: str = "32-true", train_items: list | None = None) -> tuple[torch.nn.Module, float]:
    """Train on the scenario's training windows with ForecastModule + Lightning on ``device``; return
    the PatchTransformer (eval mode, on ``device``) and the seconds spent. ``train_items``: the
    training windows already cut and scaled (shared by the models of a scenario)."""
    import lightning as L

    from tsfm_msa.train.lightning_module import ForecastModule

    L.seed_everything(seed, workers=False, verbose=False)
    steps = int(train_cfg["steps"])
    dense_every = dense_mix_period(train_cfg.get("dense_mix"))
    module_cls = _mixed_module_class() if dense_every else ForecastModule
    module = module_cls(
        model_config=model_config, schema=scenario.schema.to_dict(), context_len=scenario.context_len,
        horizon=scenario.horizon, optim=dict(train_cfg.get("optim") or {}), kl_weight=float(train_cfg["kl_weight"]),
        indexer_warmup={"steps": int(train_cfg["indexer_warmup_steps"])}, max_steps=steps,
        dense_teacher_kl=dense_teacher_weight(train_cfg.get("dense_teacher_kl"), "train.dense_teacher_kl"))
    if dense_every:
        module.dense_every = dense_every
    if init_state is not None:
        # Dense -> MSA adaptation: the dense weights load, only the index projections start fresh.
        module.model.load_state_dict(init_state, strict=False)
    items = train_items if train_items is not None else list(window_dataset(scenario.train, scenario))
    loader = DataLoader(items, batch_size=int(train_cfg["batch_size"]), shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    trainer = L.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, max_steps=steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, gradient_clip_val=1.0, num_sanity_val_steps=0, precision=precision)
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    _sync(device)
    seconds = time.perf_counter() - start
    # Progress of long runs (a 64K-token scenario trains for minutes): which model, how long a step took.
    print(f"[probe]   trained {'MSA' if module.model.has_msa else 'dense'} model: {steps} steps in {seconds:.1f} s",
          flush=True)
    return module.model.to(device).eval(), seconds


# The training settings of a dense model (reference, curriculum stage): none of the MSA-only options.
DENSE_TRAINING = {"indexer_warmup_steps": 0, "dense_mix": None, "dense_teacher_kl": None}


def dense_mix_period(fraction: float | None) -> int:
    """``train.dense_mix`` (share of the sparse-phase steps run with dense attention) as "every n-th
    step" (0: none)."""
    if not fraction:
        return 0
    if not 0 < float(fraction) <= 1:
        raise ProbeConfigError(f"train.dense_mix must lie in (0, 1] (share of sparse steps run dense), got {fraction!r}")
    return max(1, round(1 / float(fraction)))


def _mixed_module_class():
    """ForecastModule whose sparse phase runs every ``dense_every``-th step as a dense step (the warmup
    phase: dense main branch, indexer still learning from the dense teacher). The dense-teacher index
    loss of the sparse steps (``train.dense_teacher_kl``) is ForecastModule's own ``dense_teacher_kl``."""
    from tsfm_msa.train.lightning_module import ForecastModule

    class DenseMixedModule(ForecastModule):
        dense_every = 0

        def current_phase(self) -> str:
            phase = super().current_phase()
            if phase == "sparse" and self.dense_every and self.global_step % self.dense_every == 0:
                return "indexer_warmup"
            return phase

    return DenseMixedModule


def as_msa(model_config: dict, schema: dict, state: dict, policy: str) -> torch.nn.Module:
    """An MSA model of the same shape carrying ``state`` (dense or MSA weights), under ``policy``."""
    config = {**_dense_support_for(model_config, policy), "attention": "msa", "group_policy": policy}
    model = build_model(config, schema)
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad = [k for k in missing if "index_" not in k] + list(unexpected)
    if bad:
        raise ProbeConfigError(f"the weights do not fit the probe model: {bad[:5]}")
    return model.eval()


def dense_twin(model: torch.nn.Module) -> torch.nn.Module:
    """The same weights in a dense-attention model: the ``dense`` selector (every visible block gives
    exactly dense attention) without building an all-blocks list of O(L^2 / block_size)."""
    twin = copy.deepcopy(model)
    for layer in twin.layers:
        if isinstance(layer.attention, MSAAttention):
            old = layer.attention
            dense = DenseGQA(old.q_proj.in_features, old.n_heads, old.n_kv_heads, old.head_dim, old.rope_base)
            dense.load_state_dict({k: v for k, v in old.state_dict().items() if not k.startswith("index_")})
            layer.attention = dense.to(old.q_proj.weight.device)
    return twin.eval()


# ---------------------------------------------------------------------------------------------
# evaluation

def probe_batches(scenario: ScenarioData) -> dict:
    """All test windows and their counterfactuals as two batches, plus raw truths and needed masks."""
    orig = default_collate(list(window_dataset([i.frame for i in scenario.test], scenario)))
    cf = default_collate(list(window_dataset([i.counterfactual for i in scenario.test], scenario)))
    targets = list(scenario.schema.target_indices)
    c = scenario.context_len
    truth = np.stack([i.frame.values[c:, targets].T for i in scenario.test])  # [N, T, H]
    truth_cf = np.stack([i.counterfactual.values[c:, targets].T for i in scenario.test])
    needed = torch.from_numpy(np.stack([i.needed for i in scenario.test]))  # [N, V, n_patches]
    return {"orig": orig, "cf": cf, "truth": truth, "truth_cf": truth_cf, "needed": needed}


def _slice_batch(batch: dict, rows: slice, device: torch.device) -> dict:
    return {k: v[rows].to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def forecast(model: torch.nn.Module, batch: dict) -> tuple[np.ndarray, list[torch.Tensor | None], TokenLayout]:
    """Quantiles in raw units ``[N, T, H, Q]``, each attention layer's block_idx (None for a dense
    layer: every visible block), and the layout."""
    out = model(batch, "predict")
    targets = model.target_index
    scale = batch["scale"][:, targets, None, None]
    loc = batch["loc"][:, targets, None, None]
    raw = (out.quantiles * scale + loc).float().cpu().numpy()
    layout = model.layout(batch["context"].shape[1], batch["horizon"].shape[1], batch["context"].device)
    return raw, [a.block_idx for a in out.aux], layout


def selection_grid(query_selection_per_layer: list[torch.Tensor], layout: TokenLayout, n_var: int,
                   instance: int = 0) -> np.ndarray:
    """Share of layers in which a forecast query's selection (any GQA group) includes each (variate,
    patch) token's block, for one instance, averaged over forecast queries: float [V, n_patches]."""
    freq = torch.zeros(layout.n_blocks, device=layout.q_time.device)
    for query_sel in query_selection_per_layer:  # [B, G, Q, NB]
        freq += query_sel[instance].any(0).float().mean(0)  # any group, mean over queries
    freq /= max(1, len(query_selection_per_layer))
    valid = layout.token_variate >= 0
    positions = torch.arange(layout.seq_len, device=freq.device)[valid]
    grid = np.zeros((n_var, layout.n_patches))
    grid[layout.token_variate[valid].cpu().numpy(), layout.token_patch[valid].cpu().numpy()] = \
        freq[positions // layout.block_size].cpu().numpy()
    return grid


def run_selector(model: torch.nn.Module, data: dict, name: str, seed: int, eval_batch: int,
                 precision: str = "32-true") -> dict:
    """Forecasts of the original and counterfactual windows under selector ``name``, in mini-batches
    of ``eval_batch`` instances, with what the metrics need kept per instance: each layer's selection
    at the forecast queries ``[N, G, Q, NB]`` and the path recall ``[N]`` — never a full block list
    of all instances, never an [L, L] tensor."""
    device = next(model.parameters()).device
    runner = dense_twin(model) if name == "dense" else model
    hook = contextlib.nullcontext() if name == "dense" else use_selector(model, name, seed)
    n = data["needed"].shape[0]
    quant, quant_cf, query_sel, path = [], [], None, []
    with hook, eval_autocast(precision, device, runner):
        for start in range(0, n, eval_batch):
            rows = slice(start, min(start + eval_batch, n))
            q_orig, block_idx, layout = forecast(runner, _slice_batch(data["orig"], rows, device))
            q_cf, _, _ = forecast(runner, _slice_batch(data["cf"], rows, device))
            quant.append(q_orig)
            quant_cf.append(q_cf)
            queries = metrics.forecast_queries(layout)
            b = rows.stop - rows.start
            groups = model.layers[0].attention.n_kv_heads
            sel = [metrics.query_selection(idx, layout, queries, b, groups).cpu() for idx in block_idx]
            query_sel = sel if query_sel is None else [torch.cat([a, s]) for a, s in zip(query_sel, sel)]
            needed_tok = metrics.needed_tokens(data["needed"][rows].to(device), layout)
            path.append(metrics.path_recall_per_instance(block_idx, layout, needed_tok, queries).cpu())
            del block_idx
    return {"quant": np.concatenate(quant), "quant_cf": np.concatenate(quant_cf), "query_sel": query_sel,
            "path": torch.cat(path), "layout": layout.to("cpu"), "queries": queries.cpu()}


def evaluate_selector(model: torch.nn.Module, data: dict, name: str, seed: int, eval_batch: int = 16,
                      precision: str = "32-true") -> dict:
    """Every metric of one selector on one backbone (the error ratio is filled in by the caller)."""
    device = next(model.parameters()).device
    _sync(device)
    start = time.perf_counter()
    run = run_selector(model, data, name, seed, eval_batch, precision)
    _sync(device)
    seconds = time.perf_counter() - start
    quant, quant_cf, layout, queries = run["quant"], run["quant_cf"], run["layout"], run["queries"]
    levels = model.quantile_levels.cpu().numpy()
    mid = int(np.abs(levels - 0.5).argmin())
    needed = metrics.needed_blocks(data["needed"], layout)
    recall = metrics.selection_recall(run["query_sel"], needed)
    ok = ~torch.isnan(run["path"])
    path = float(run["path"][ok].mean()) if bool(ok.any()) else float("nan")
    support = [metrics.support_size(s, layout, queries) for s in run["query_sel"]]
    cf = metrics.counterfactual_sensitivity(quant_cf[..., mid] - quant[..., mid], data["truth_cf"] - data["truth"])
    return {
        "selector": name,
        "recall": recall["recall"],
        "path_recall": path,
        "recall_per_layer": recall["per_layer"],
        "recall_per_layer_group": recall["per_layer_group"],
        "mae": metrics.mae(quant[..., mid], data["truth"]),
        "crps": metrics.quantile_crps(quant, data["truth"], levels),
        "cf_corr": cf["corr"],
        "cf_gain": cf["gain"],
        "support_tokens": float(np.mean([s["tokens"] for s in support])),
        "support_frac": float(np.mean([s["frac"] for s in support])),
        "seconds": round(seconds, 2),
        "_grid": selection_grid(run["query_sel"], layout, data["needed"].shape[1]),
        "_cf": (data["truth_cf"] - data["truth"], quant_cf[..., mid] - quant[..., mid]),
    }


def evaluate_backbones(backbones: dict[str, tuple[torch.nn.Module, list[str]]], data: dict, reference: str,
                       seed: int, thresholds: dict, eval_batch: int = 16, precision: str = "32-true") -> list[dict]:
    """Run the listed selectors on each backbone; error ratios against ``dense`` on ``reference``."""
    rows = []
    for backbone, (model, names) in backbones.items():
        for name in names:
            row = evaluate_selector(model, data, name, seed, eval_batch, precision)
            row["backbone"] = backbone
            rows.append(row)
    ref = next(r for r in rows if r["backbone"] == reference and r["selector"] == "dense")
    own_dense = {r["backbone"]: r for r in rows if r["selector"] == "dense"}
    for row in rows:
        row["reference_mae"], row["reference_crps"] = ref["mae"], ref["crps"]  # for the ratios over seeds
        row["error_ratio"] = metrics.error_ratio(row["mae"], ref["mae"])
        row["crps_ratio"] = metrics.error_ratio(row["crps"], ref["crps"])
        own = own_dense.get(row["backbone"])
        row["error_ratio_vs_own_dense"] = metrics.error_ratio(row["mae"], own["mae"]) if own else float("nan")
        row["verdict"] = judge(row["recall"], row["error_ratio"], thresholds)
    return rows


# ---------------------------------------------------------------------------------------------
# the command

def probe_seeds(cfg: dict) -> list[int]:
    """The run's seeds: ``seeds`` (a list of integers; one integer is a list of one), or the shorthand
    ``seed=N`` for ``seeds=[N]``. Each scenario runs once per seed (data and models)."""
    seeds, seed = cfg.get("seeds", [0]), cfg.get("seed")
    if seed is not None:
        if seeds not in (None, [0], [seed]):  # [0]: the default of `seeds`, i.e. not set
            raise ProbeConfigError(f"set seed or seeds, not both (seed={seed!r}, seeds={seeds!r}); "
                                   "several seeds: seeds=[0,1,2]")
        seeds = [seed]
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if not isinstance(seeds, (list, tuple)) or not seeds:
        raise ProbeConfigError(f"seeds must be a non-empty list of integers, e.g. seeds=[0,1,2], got {seeds!r}")
    bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**31]
    if bad:
        raise ProbeConfigError(f"seeds must be non-negative integers, e.g. seeds=[0,1,2]; bad entries: {bad}")
    if len(set(seeds)) < len(seeds):
        raise ProbeConfigError(f"seeds has repeats: {list(seeds)}; list each seed once")
    return list(seeds)


def _scenario_knobs(name: str, spec: dict, checkpoint_hp: dict | None, seed: int) -> dict:
    knobs = dict(spec.get("knobs") or {})
    if "seed" in knobs:
        raise ProbeConfigError(f"probe.scenarios.{name}.knobs.seed: the data seed is the run's seed; remove it and "
                               "set seeds=[...] (or seed=N)")
    knobs["seed"] = seed
    if checkpoint_hp is not None:
        # Zero-shot: the checkpoint fixes the window and patch lengths.
        knobs["context_len"] = int(checkpoint_hp["context_len"])
        knobs["horizon"] = int(checkpoint_hp["horizon"])
        knobs["patch_len"] = int(checkpoint_hp["model_config"].get("patch_len", 16))
        knobs["n_train"] = 1
    return knobs


def _load_checkpoint(path: str) -> "ForecastModule":  # noqa: F821 (imported lazily: Lightning is slow to import)
    """A checkpoint file, or a `tsfm-msa train` run folder (its best checkpoint, else its last one), as
    `evaluate checkpoint=` and `convert init_from=` read it."""
    from tsfm_msa.evaluate.predictor import checkpoint_file
    from tsfm_msa.train.lightning_module import ForecastModule

    module = ForecastModule.load_from_checkpoint(checkpoint_file(path), map_location="cpu")
    return module


def no_scenario_matches_message(checkpoint: str, schema: dict) -> str:
    """Every scenario skipped a zero-shot checkpoint: which variates it has and which scenario takes what."""
    ck = SeriesSchema.from_dict(schema)
    return (f"checkpoint={checkpoint} matches no probe scenario (its variates: {', '.join(ck.names)}; freq "
            f"{ck.freq}), so every scenario was skipped; zero-shot probing of a trained model takes probe=real_background "
            f"with a checkpoint trained on data=vic_elec (Demand, Temperature, Holiday), the synthetic scenarios only "
            f"checkpoints of their own variates; leave out checkpoint= to train the probe models per scenario")


def probe_scenario(name: str, spec: dict, cfg: dict, checkpoint: "ForecastModule | None" = None,  # noqa: F821
                   seed: int = 0) -> dict:
    """Everything for one scenario at one seed (the data's and the models'): data, models, selector
    rows per policy, figures' raw material."""
    hp = dict(checkpoint.hparams) if checkpoint is not None else None
    start = time.perf_counter()
    knobs = _scenario_knobs(name, spec, hp, seed)
    try:
        scenario = make_scenario(name, **knobs)
    except ProbeConfigError as err:
        if hp is None:
            raise
        # The checkpoint, not the scenario config, set the window: say so, or the knob error reads as a typo.
        window = ", ".join(f"{k}={knobs[k]}" for k in ("context_len", "horizon", "patch_len"))
        raise ProbeConfigError(f"{name} at the checkpoint's window ({window}): {err}; set the scenario's knobs to "
                               f"fit it, e.g. probe.scenarios.{name}.knobs.distance=<steps back>") from None
    data = probe_batches(scenario)
    data_seconds = time.perf_counter() - start
    selectors = [s for s in cfg["selectors"] if s in SELECTORS]
    unknown = [s for s in cfg["selectors"] if s not in SELECTORS]
    if unknown:
        raise ProbeConfigError(f"unknown selectors {unknown}; choose from {SELECTORS}")
    if "dense" not in selectors:
        raise ProbeConfigError("selectors must include 'dense': it is the reference of every error ratio")
    unknown_model = sorted(set(spec.get("model") or {}) - set(cfg["model"]))
    if unknown_model:
        raise ProbeConfigError(f"probe.scenarios.{name}.model: unknown model keys {unknown_model}; "
                               f"choose from {sorted(cfg['model'])}")
    unknown_train = sorted(set(spec.get("train") or {}) - set(cfg["train"]))
    if unknown_train:
        raise ProbeConfigError(f"probe.scenarios.{name}.train: unknown train keys {unknown_train}; "
                               f"choose from {sorted(cfg['train'])}")
    result = {"seed": seed, "description": scenario.description, "knobs": scenario.knobs, "policies": {},
              "model": dict(spec.get("model") or {}), "train": dict(spec.get("train") or {}),
              "train_seconds": {}, "schema": scenario.schema.to_dict(), "data_seconds": round(data_seconds, 1)}
    thresholds = dict(cfg["verdict"])
    device = probe_device(cfg.get("device"))
    precision = probe_precision(cfg.get("precision"), device)
    eval_batch = int(cfg.get("eval_batch_size") or 16)
    # Training-free selectors also run on the dense model's weights (what a selector costs without
    # any sparse training); long-context probes keep only `dense` there to save time.
    on_dense = cfg.get("dense_backbone_selectors")
    on_dense = [s for s in selectors if s in TRAINING_FREE] if on_dense is None else list(on_dense)
    if "dense" not in on_dense or any(s not in TRAINING_FREE for s in on_dense):
        raise ProbeConfigError(f"dense_backbone_selectors must include 'dense' and list only training-free selectors "
                               f"{TRAINING_FREE}, got {on_dense}")

    if checkpoint is not None:
        ck_schema = SeriesSchema.from_dict(hp["schema"])
        diffs = ck_schema.differences(scenario.schema)
        if diffs:
            result["skipped"] = "checkpoint schema does not match the scenario: " + "; ".join(diffs)
            return result
        model_config = dict(hp["model_config"])
        state = checkpoint.model.state_dict()
        is_msa = checkpoint.model.has_msa
        policies = [model_config.get("group_policy", "free")]
        for policy in policies:
            model = as_msa(model_config, hp["schema"], state, policy)
            names = [s for s in selectors if is_msa or s != "learned"]
            rows = evaluate_backbones({"checkpoint": (model.to(device), names)}, data, "checkpoint", seed, thresholds,
                                      eval_batch, precision)
            result["policies"][policy] = _finish(rows, model, scenario)
        return result

    # A scenario may override training settings, e.g. its own step budget or no context curriculum
    # (a cause found by position relearns the lag at every stage: 2026-12-02-probes-long-positional.md).
    train_cfg = {**dict(cfg["train"]), **dict(spec.get("train") or {})}
    init_mode = train_cfg.get("msa_init", "scratch")
    if init_mode not in ("scratch", "dense"):
        raise ProbeConfigError(f"train.msa_init must be scratch or dense, got {init_mode!r}")
    msa_train = {**train_cfg, "steps": train_cfg.get("msa_steps") or train_cfg["steps"]}
    if init_mode == "dense" and train_cfg.get("continue_optim"):
        # Both continuations (dense reference and MSA) take the same optimizer settings.
        msa_train["optim"] = {**dict(train_cfg.get("optim") or {}), **dict(train_cfg["continue_optim"])}
    policies = list(spec.get("policies") or ["sensor"])
    # A scenario may override model settings (both models alike), e.g. sensor_starvation's heads.
    model_cfg = {**dict(cfg["model"]), **dict(spec.get("model") or {})}
    dense_config = probe_model_config(model_cfg, scenario, "dense", policies[0])
    start = time.perf_counter()
    items = list(window_dataset(scenario.train, scenario))  # cut and scaled once for every model
    result["data_seconds"] = round(data_seconds + time.perf_counter() - start, 1)
    print(f"[probe]   data ready in {result['data_seconds']} s", flush=True)
    fit = dict(device=device, precision=precision, train_items=items)
    dense_train = {**train_cfg, **DENSE_TRAINING}
    curriculum_state = None
    for stage, (short_knobs, short_train) in enumerate(curriculum_stages(spec, train_cfg, scenario, seed, init_mode)):
        # Each stage continues from the previous one; the long-window training from the last. Its data
        # is drawn only now, so one stage's windows are in memory at a time.
        start = time.perf_counter()
        short = make_scenario(name, **short_knobs)
        short_items = list(window_dataset(short.train, short))
        result["data_seconds"] = round(result["data_seconds"] + time.perf_counter() - start, 1)
        short_model, secs = train_model(dense_config, short, short_train, seed, init_state=curriculum_state,
                                        device=device, precision=precision, train_items=short_items)
        result["train_seconds"][f"dense_curriculum_{stage}"] = round(secs, 1)
        curriculum_state = {k: v.clone() for k, v in short_model.state_dict().items()}
        del short_model, short_items
    dense, secs = train_model(dense_config, scenario, dense_train, seed, init_state=curriculum_state, **fit)
    result["train_seconds"]["dense"] = round(secs, 1)
    init_state = {k: v.clone() for k, v in dense.state_dict().items()}
    if init_mode == "dense":
        # Dense -> sparse adaptation: the MSA model continues from this dense model for msa_steps
        # (indexer warmup, then sparse). The dense reference continues just as long with dense
        # attention, so both models end with the same number of steps on the same data.
        dense, secs = train_model(dense_config, scenario, {**msa_train, **DENSE_TRAINING},
                                  seed + 1, init_state=init_state, **fit)
        result["train_seconds"]["dense_continued"] = round(secs, 1)
    dense_state = dense.state_dict()
    for policy in policies:
        msa_config = probe_model_config(model_cfg, scenario, "msa", policy)
        msa, secs = train_model(msa_config, scenario, msa_train, seed + 1 if init_mode == "dense" else seed,
                                init_state=init_state if init_mode == "dense" else None, **fit)
        result["train_seconds"][f"msa_{policy}"] = round(secs, 1)
        dense_backbone = as_msa(msa_config, scenario.schema.to_dict(), dense_state, policy).to(device)
        backbones = {"dense": (dense_backbone, [s for s in selectors if s in on_dense]), "msa": (msa, selectors)}
        rows = evaluate_backbones(backbones, data, "dense", seed, thresholds, eval_batch, precision)
        result["policies"][policy] = _finish(rows, msa, scenario)
    return result


CURRICULUM_KEYS = ("context_len", "distance", "steps", "n_train", "batch_size")


def curriculum_stages(spec: dict, train_cfg: dict, scenario: ScenarioData, seed: int,
                      init_mode: str) -> list[tuple[dict, dict]]:
    """``train.curriculum``, checked: the dense phases that run before the dense model's long-window
    training, in order, as (scenario knobs, training settings). One stage is a mapping {context_len,
    distance, steps, n_train (optional), batch_size (optional)}; several are a list of them with
    growing windows. Each is the same generator and knobs at a shorter ``context_len`` / ``distance``,
    where a dense model learns within a few hundred steps; the weights carry to the next window
    (positions are RoPE on the patch index; nothing in the model depends on the window length), which
    then relearns the longer distance in far fewer steps than from scratch. Why: 300 steps at a long
    window from scratch learn nothing, not even the local pattern, and one 8x jump lost the far cause
    (benchmarks/results/2026-12-02-probes-long-learning.md)."""
    raw = train_cfg.get("curriculum")
    if not raw:
        return []
    if init_mode != "dense":
        raise ProbeConfigError("train.curriculum pretrains the dense model that the MSA model continues from; "
                               "it needs train.msa_init=dense (or set train.curriculum=null)")
    stages = [raw] if isinstance(raw, dict) else list(raw)
    out, previous = [], 0
    for i, cur in enumerate(stages):
        where = "train.curriculum" if isinstance(raw, dict) else f"train.curriculum[{i}]"
        if not isinstance(cur, dict):
            raise ProbeConfigError(f"{where} must be a mapping {{context_len, distance, steps}}, got {cur!r}")
        unknown = sorted(set(cur) - set(CURRICULUM_KEYS))
        missing = [k for k in ("context_len", "distance", "steps") if k not in cur]
        if unknown or missing:
            raise ProbeConfigError(f"{where}: unknown keys {unknown}, missing keys {missing}; "
                                   f"it takes {list(CURRICULUM_KEYS)} (context_len, distance and steps required)")
        context_len = int(cur["context_len"])
        if not previous < context_len < scenario.context_len:
            raise ProbeConfigError(f"{where}.context_len ({context_len}) must be shorter than the scenario's "
                                   f"context_len ({scenario.context_len}) and longer than the stage before "
                                   f"({previous})")
        previous = context_len
        knobs = {**dict(spec.get("knobs") or {}), "seed": seed, "context_len": context_len,
                 "distance": int(cur["distance"]), "n_test": 1}
        if "n_train" in cur:
            knobs["n_train"] = int(cur["n_train"])
        short_train = {**train_cfg, **DENSE_TRAINING, "steps": int(cur["steps"]),
                       "batch_size": int(cur.get("batch_size") or train_cfg["batch_size"])}
        out.append((knobs, short_train))
    return out


def _finish(rows: list[dict], model: torch.nn.Module, scenario: ScenarioData) -> dict:
    layer = msa_layers(model)[0]
    layout = model.layout(scenario.context_len, scenario.horizon, next(model.parameters()).device)
    return {"rows": rows, "top_k": int(layer.top_k), "block_size": int(layout.block_size),
            "n_blocks": int(layout.n_blocks), "seq_len": int(layout.seq_len),
            "group_names": list(layout.group_names), "variate_names": list(scenario.schema.names),
            "_needed": scenario.test[0].needed.astype(int).tolist()}


def run_probe(cfg: DictConfig) -> dict:
    """Entry point of ``tsfm-msa probe`` (Hydra config ``configs/probe.yaml``)."""
    from hydra.core.hydra_config import HydraConfig

    from tsfm_msa.run_setup import run_dir as _run_dir

    plain = OmegaConf.to_container(cfg, resolve=True)
    plain["overrides"] = list(HydraConfig.get().overrides.task)  # the command line, for the record
    return run_probe_in(plain, _run_dir())


def _device_text(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)}), torch {torch.__version__}"
    return f"cpu, torch {torch.__version__}, {torch.get_num_threads()} thread(s)"


def run_probe_in(cfg: dict, out_dir: Path) -> dict:
    """The probe suite for a plain-dict config, writing the report into ``out_dir``."""
    start = time.perf_counter()
    torch.set_num_threads(int(cfg.get("threads") or 1))  # tiny models: one thread beats two busy ones
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    probe = cfg.get("probe") or {}
    scenarios = probe.get("scenarios") or {}
    if not scenarios:
        raise ProbeConfigError("no probe scenarios configured; use probe=all or probe=<scenario>")
    seeds = probe_seeds(cfg)
    checkpoint = _load_checkpoint(cfg["checkpoint"]) if cfg.get("checkpoint") else None
    results = {}  # scenario -> {"runs": [one result per seed], "seconds": all seeds}

    def report() -> dict:
        summary = {
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "settings": {"seeds": seeds, **{k: copy.deepcopy(cfg.get(k)) for k in (
                "overrides", "threads", "checkpoint", "model", "train", "selectors", "dense_backbone_selectors",
                "eval_batch_size", "verdict")}},
            "precision": probe_precision(cfg.get("precision"), probe_device(cfg.get("device"))),
            "target": copy.deepcopy(probe.get("target")),
            "device": _device_text(probe_device(cfg.get("device"))),
            "scenarios": results,
            "wall_seconds": round(time.perf_counter() - start, 1),
        }
        return write_report(summary, Path(out_dir))

    n_runs = len(scenarios) * len(seeds)
    for name, spec in scenarios.items():
        results[name] = {"runs": [], "seconds": 0.0}
        for seed in seeds:
            t0 = time.perf_counter()
            print(f"[probe] {name}, seed {seed} ...", flush=True)
            run = probe_scenario(name, dict(spec or {}), cfg, checkpoint, seed)
            run["seconds"] = round(time.perf_counter() - t0, 1)
            if "skipped" in run and len(results[name]["runs"]) == 0:  # the same reason at every seed: say it once
                print(f"[probe] {name}: skipped: {run['skipped']}", flush=True)
            results[name]["runs"].append(run)
            results[name]["seconds"] = round(results[name]["seconds"] + run["seconds"], 1)
            print(f"[probe] {name}, seed {seed} done in {run['seconds']} s", flush=True)
            if sum(len(r["runs"]) for r in results.values()) < n_runs:
                # The report after every (scenario, seed): a long run stopped early keeps what it finished.
                report()
    summary = report()
    if checkpoint is not None and all("skipped" in r for res in results.values() for r in res["runs"]):
        # An empty report with exit code 0 reads as success; the report stays for the skip reasons.
        raise ProbeConfigError(no_scenario_matches_message(cfg["checkpoint"], dict(checkpoint.hparams)["schema"]))
    return summary
