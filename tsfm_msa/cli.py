"""`tsfm-msa` console script: one subcommand per job, each a Hydra app over the packaged configs.

    tsfm-msa train model=msa_small data=vic_elec trainer.max_steps=200
    tsfm-msa train -m model=dense_small,msa_small seed=0,1,2      # Hydra multirun

This module is the only reader of Hydra configs: it turns them into objects and hands those on.
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import NoReturn

import hydra
from omegaconf import DictConfig, OmegaConf

from tsfm_msa.config_checks import ConfigError, check_settings
from tsfm_msa.run_setup import build_module, build_trainer
from tsfm_msa.run_setup import run_dir as _run_dir

CONFIGS = "pkg://tsfm_msa.configs"
_ORIGINAL_ARGV: list[str] = []  # the command line main() was given, for Lightning's DDP launcher


def experiment_tag(choice: str | None = None) -> str:
    """'+<experiment>' when a `+experiment=` is chosen, else '': the run folder's name then tells an
    experiment's runs from plain `<model>-<data>` runs (configs/train.yaml, hydra.run.dir)."""
    return f"+{choice}" if choice else ""


# Module level: Hydra resolves hydra.run.dir before the app runs.
if not OmegaConf.has_resolver("experiment_tag"):
    OmegaConf.register_new_resolver("experiment_tag", experiment_tag)


def _run_name() -> str:
    choices = hydra.core.hydra_config.HydraConfig.get().runtime.choices
    return f"{choices.get('model')}-{choices.get('data')}{experiment_tag(choices.get('experiment'))}"


def init_checkpoint(init_from: str) -> Path:
    """`init_from=`: a checkpoint file, or a `tsfm-msa train` run folder (its best checkpoint, else its last
    one, as `evaluate checkpoint=` reads a folder)."""
    from tsfm_msa.evaluate.predictor import checkpoint_file

    try:
        return checkpoint_file(init_from)
    except FileNotFoundError:
        raise ConfigError(f"init_from={init_from}: no such checkpoint file, nor a run folder with "
                          f"checkpoints/best-*.ckpt or checkpoints/last.ckpt; pass a dense run's .ckpt file or its "
                          f"run folder (outputs/train/<model>-<data>/<time>)") from None


def load_backbone(module, checkpoint_path: str) -> None:
    """Dense-to-sparse adaptation: start from a (dense) checkpoint's weights (a file or a run folder); only
    parameters the checkpoint lacks (the MSA index projections) keep their fresh initialization."""
    import torch

    path = init_checkpoint(checkpoint_path)
    saved = torch.load(path, map_location="cpu", weights_only=False)
    check_same_data(module, saved.get("hyper_parameters") or {}, path, f"init_from={checkpoint_path}")
    state = saved["state_dict"]
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ConfigError(f"init_from={checkpoint_path} does not fit this model ({str(err).splitlines()[-1].strip()}); "
                          f"use the same architecture (model.*) as the checkpoint's run") from None
    bad_missing = [k for k in missing if ".index_q." not in k and ".index_k." not in k]
    if bad_missing or unexpected:
        raise ConfigError(
            f"init_from={checkpoint_path} does not fit this model: missing {bad_missing[:5]}, unexpected "
            f"{list(unexpected)[:5]}; use the same architecture (model.*) as the checkpoint's run")


def run_data_overrides(checkpoint: Path) -> str:
    """' (its run used data=csv data.loader.path=... per <run>/.hydra/overrides.yaml)' for a checkpoint in a
    run folder, '' when the folder has no Hydra record."""
    overrides_file = checkpoint.parent.parent / ".hydra" / "overrides.yaml"
    if not overrides_file.is_file():
        return ""
    data = [str(o) for o in OmegaConf.load(overrides_file) if str(o).lstrip("+~").startswith("data")]
    used = " ".join(data) if data else "no data overrides (the default data)"
    return f" (its run used {used}, per {overrides_file})"


def check_same_data(module, saved: dict, checkpoint: Path, what: str) -> None:
    """A checkpoint trained on other variates or windows than this run's data: say so and name that run's
    data overrides, before the weights fail to load with a size mismatch that points at model.*."""
    current = dict(module.hparams)
    differ = [f"data.{k}" for k in ("context_len", "horizon") if k in saved and saved[k] != current[k]]
    if "schema" in saved and saved["schema"] != current["schema"]:
        differ.append("the variates")
    if differ:
        raise ConfigError(f"{what} was trained on other data than this run ({', '.join(differ)} differ)"
                          f"{run_data_overrides(checkpoint)}; pass the same data.* overrides as that run")


def resume_checkpoint(resume: str) -> Path:
    """`resume=`: a checkpoint file, or a run folder whose checkpoints/last.ckpt continues it."""
    path = Path(resume)
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise ConfigError(f"resume={resume}: no such checkpoint file or run folder with checkpoints/last.ckpt")
    return path


def check_resumable(module, checkpoint_path: Path) -> None:
    """The checkpoint must be of the same model and data as this run's config, or resuming fails deep
    inside Lightning; name the keys that differ."""
    import torch

    saved = torch.load(checkpoint_path, map_location="cpu", weights_only=False).get("hyper_parameters", {})
    current = dict(module.hparams)
    differ = [f"model.{k}" for k in sorted(set(saved.get("model_config", {})) | set(current["model_config"]))
              if saved.get("model_config", {}).get(k) != current["model_config"].get(k)]
    differ += [f"data.{k}" for k in ("context_len", "horizon") if saved.get(k) != current[k]]
    if saved.get("schema") != current["schema"]:
        differ.append("data (other variates)")
    if differ:
        raise ConfigError(f"resume={checkpoint_path} comes from a run with other settings ({', '.join(differ[:6])}); "
                          f"pass the same overrides as that run (its config.yaml is in the run folder)")


def train_command(cfg: DictConfig) -> dict:
    import lightning as L

    from tsfm_msa.train.run import fit_and_summarize

    if cfg.trainer.get("max_steps") is None or cfg.trainer.max_steps <= 0:  # its type: check_settings
        raise ConfigError(f"trainer.max_steps must be a positive integer, got {cfg.trainer.get('max_steps')}")
    if cfg.get("resume") and cfg.get("init_from"):
        raise ConfigError("give resume= (continue a run) or init_from= (new run from a checkpoint's weights), not both")
    if cfg.get("init_from"):
        init_checkpoint(str(cfg.init_from))  # a wrong path fails now, not after the data is read
    L.seed_everything(int(cfg.seed), workers=True)
    if cfg.get("cpu_threads") is not None:  # null: torch's default (check_settings refuses 0)
        # On busy shared cores one intra-op thread avoids OpenMP spin contention (often ~10x faster).
        import torch

        torch.set_num_threads(int(cfg.cpu_threads))
    run_dir = _run_dir()
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    datamodule.setup("fit")
    module = build_module(cfg, cfg.model, datamodule, int(cfg.trainer.max_steps))
    check_window_fits_model(module, cfg)
    warmup = (cfg.get("indexer_warmup") or {}).get("steps")
    if module.model.has_msa and warmup is not None and int(warmup) >= int(cfg.trainer.max_steps) and _is_global_zero():
        # Not an error (a dense-only warmup run is legitimate), but easy to miss in the summary.
        print(f"tsfm-msa: note: indexer_warmup.steps={warmup} >= trainer.max_steps={cfg.trainer.max_steps}: this "
              f"MSA model never routes sparsely in this run (dense attention throughout), but its validation "
              f"routes through the untrained indexer; lower indexer_warmup.steps or raise trainer.max_steps", flush=True)
    if cfg.get("init_from"):
        load_backbone(module, str(cfg.init_from))
    ckpt_path = resume_checkpoint(str(cfg.resume)) if cfg.get("resume") else None
    if ckpt_path is not None:
        check_resumable(module, ckpt_path)
    if _is_global_zero():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    trainer = build_trainer(cfg, run_dir)
    return fit_and_summarize(module, datamodule, trainer, run_dir, _run_name(), ckpt_path=ckpt_path)


def convert_command(cfg: DictConfig) -> dict:
    """`train` from a dense checkpoint. init_from is required, but convert.yaml cannot say so with '???':
    merged over train.yaml's `init_from: null`, a '???' keeps the null."""
    if not cfg.get("init_from"):
        raise ConfigError("convert needs the dense model to start from: pass init_from=<dense checkpoint file or "
                          "run folder>, e.g. init_from=outputs/train/dense_small-vic_elec/<time>")
    return train_command(cfg)


def check_window_fits_model(module, cfg: DictConfig) -> None:
    """Build the run's token layout now (on the CPU): the model's own layout check (model.top_k against
    the window's KV blocks, sensor groups against model.n_kv_heads) then refuses a bad config in seconds,
    not after Lightning has started and run its sanity check."""
    import torch

    module.model.layout(int(cfg.data.context_len), int(cfg.data.horizon), torch.device("cpu"))


def _is_global_zero() -> bool:
    """Before the Trainer exists: Lightning's launcher and torchrun/SLURM give the other processes a rank."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    return rank_zero_only.rank == 0


def _one_console_handler() -> None:
    """Lightning adds a console handler of its own when it is imported before Hydra configures
    logging, and its records also reach Hydra's root handlers: every line printed twice. Drop
    Lightning's handler so its records go through Hydra's (console and the run's log file) once."""
    import logging

    import lightning.pytorch  # noqa: F401  (its handlers exist once it is imported)

    for name in ("lightning.pytorch", "lightning.fabric", "lightning", "torchmetrics"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:
                logger.removeHandler(handler)
        logger.propagate = True


class _OncePerRun:
    """A logging filter that passes each distinct message once."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def filter(self, record) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


def _warnings_once_through_logging() -> None:
    """Warnings print once per run, as log lines (console and the run's log file) without Python's
    file:line and source echo: evaluate builds the data once per model and would repeat them, and
    libraries reset the warning filters often enough that Python's own "once" does not hold."""
    import logging
    import warnings

    logging.captureWarnings(True)
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"{category.__name__}: {message}"
    logger = logging.getLogger("py.warnings")
    if not any(isinstance(f, _OncePerRun) for f in logger.filters):
        logger.addFilter(_OncePerRun())


# Console lines from dependencies that say nothing about the run: Lightning's promotions of its cloud
# services, and deprecations inside Lightning/torch that a user cannot act on.
_LIGHTNING_TIP_PREFIX = "\N{ELECTRIC LIGHT BULB} Tip:"
_HARMLESS_WARNINGS = (
    # torch's pytree deprecation, triggered by lightning/pytorch/utilities/_pytree.py
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
    # gluonts/json.py: a speed hint about optional JSON packages (evaluate)
    (r"Using `json`-module for json-handling", UserWarning),
)


class _DropLightningTips:
    """A logging filter that drops Lightning's "💡 Tip: try litlogger / litmodels" lines (Lightning 2.6 has
    no switch for them)."""

    def filter(self, record) -> bool:
        return not str(record.msg).startswith(_LIGHTNING_TIP_PREFIX)


def _quiet_known_noise() -> None:
    """Silence only the known harmless messages above; every other warning and log line still shows."""
    import logging
    import warnings

    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")  # where rank_zero_info logs
    if not any(isinstance(f, _DropLightningTips) for f in logger.filters):
        logger.addFilter(_DropLightningTips())
    for message, category in _HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def missing_cuda_message(cfg: DictConfig) -> str | None:
    """A one-line error when the config asks for a CUDA device and none is visible (Lightning would fail
    with a traceback after the data is loaded); None otherwise. Covers `trainer.accelerator` (train,
    convert, evaluate) and the probe's `device`."""
    import torch

    if torch.cuda.is_available():
        return None
    trainer = cfg.get("trainer") or {}
    accelerator = str(trainer.get("accelerator", "cpu")).lower()
    if accelerator in ("gpu", "cuda"):
        choice = hydra.core.hydra_config.HydraConfig.get().runtime.choices.get("trainer")
        chosen = f" (trainer={choice})" if choice and choice != "cpu" else ""
        return (f"trainer.accelerator={accelerator}{chosen} but no CUDA device was found; run with trainer=cpu "
                f"(the default), or trainer.accelerator=cpu")
    if str(cfg.get("device", "")).lower() == "cuda":
        return "device=cuda but no CUDA device was found; run with device=auto (the default) or device=cpu"
    return None


def backend_message(cfg: DictConfig) -> str | None:
    """TSFM_MSA_BACKEND that cannot run this config's MSA ops (unknown, triton without triton or on the CPU),
    in one line before the run starts; None otherwise. The ops themselves raise the same text."""
    import torch

    from tsfm_msa.kernels.dispatch import backend_problem

    accelerator = str((cfg.get("trainer") or {}).get("accelerator", "cpu")).lower()
    device = str(cfg.get("device", "auto")).lower()
    on_cuda = torch.cuda.is_available() and (accelerator in ("gpu", "cuda", "auto") if "device" not in cfg
                                             else device in ("cuda", "auto"))
    return backend_problem(cuda=on_cuda)


# Hydra's record of the command (config.yaml, hydra.yaml, overrides.yaml), written with the log at the start.
_HYDRA_RECORD = {"config.yaml", "hydra.yaml", "overrides.yaml"}
# Commands whose run folders are found as "the latest run" (evaluate checkpoint=, convert init_from=).
_RUN_FOLDER_COMMANDS = ("train", "convert", "evaluate")


def discard_unused_run_dir(run_dir: Path) -> bool:
    """Remove a run folder that holds nothing but Hydra's start-up files (the *.log files and the .hydra
    record): a command refused before it wrote anything would otherwise leave an empty run that "the latest
    run" picks. Anything else in the folder keeps all of it; returns whether it was removed."""
    try:
        entries = list(run_dir.iterdir())
        record = run_dir / ".hydra"
        for entry in entries:
            if entry == record and entry.is_dir() and {p.name for p in entry.iterdir()} <= _HYDRA_RECORD:
                continue
            if not (entry.is_file() and entry.suffix == ".log"):
                return False
        for entry in entries:
            if entry.is_dir():
                for p in entry.iterdir():
                    p.unlink()
                entry.rmdir()
            else:
                entry.unlink()
        run_dir.rmdir()
    except OSError:  # gone already, or not ours to remove: leave it
        return False
    return True


def _hydra_app(config_name: str, command):
    def refuse(message: str) -> NoReturn:
        """The one-line error, exit code 2; an unused run folder of this command goes."""
        print(f"tsfm-msa: error: {message}", file=sys.stderr)
        if config_name in _RUN_FOLDER_COMMANDS and discard_unused_run_dir(_run_dir()):
            overrides = hydra.core.hydra_config.HydraConfig.get().overrides.hydra
            if not any(str(o).startswith("hydra.run.dir=") for o in overrides):
                # Our own <model>-<data> folder, now empty if this was its only run; a folder the user named stays.
                with contextlib.suppress(OSError):
                    _run_dir().parent.rmdir()
        sys.exit(2)

    @hydra.main(version_base=None, config_path=CONFIGS, config_name=config_name)
    def app(cfg: DictConfig) -> None:
        # Lightning's DDP launcher starts the other processes with sys.argv: give it the real command
        # line (Hydra has parsed the overrides already).
        hydra_argv, sys.argv = sys.argv, list(_ORIGINAL_ARGV or sys.argv)
        _one_console_handler()
        _warnings_once_through_logging()
        _quiet_known_noise()
        no_device = missing_cuda_message(cfg) or backend_message(cfg)
        if no_device:
            sys.argv = hydra_argv
            refuse(no_device)
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            # Hydra would only fail deep inside instantiate with "missing positional argument".
            sys.argv = hydra_argv
            refuse(f"missing required setting(s) {', '.join(missing)}; give each on the command line, "
                   f"e.g. {missing[0]}=<value> (configs/ describes every option)")
        try:
            check_settings(cfg)
            command(cfg)
        except _cuda_out_of_memory() as err:
            refuse(out_of_memory_message(cfg, err))
        except (ValueError, FileNotFoundError) as err:
            # Our own errors on bad data or config: one clear line, no traceback.
            if not (isinstance(err, FileNotFoundError) or type(err).__module__.startswith("tsfm_msa")):
                raise
            refuse(str(err))
        finally:
            sys.argv = hydra_argv

    return app


def _cuda_out_of_memory() -> type:
    import torch

    return torch.cuda.OutOfMemoryError


def out_of_memory_message(cfg: DictConfig, err: Exception) -> str:
    """What ran out and which settings to lower, with their current values."""
    data, model = cfg.get("data", {}), cfg.get("model", {})
    first = str(err).splitlines()[0] if str(err) else "CUDA out of memory"
    return (f"the GPU ran out of memory ({first[:160]}). Lower data.context_len (now {data.get('context_len')}) "
            f"or data.batch_size (now {data.get('batch_size')}), set model.activation_checkpointing=true (now "
            f"{model.get('activation_checkpointing', False)}), or keep the batch with fewer samples per step: "
            f"data.batch_size=<smaller> trainer.accumulate_grad_batches=<k>")


def evaluate_command(cfg: DictConfig):
    from tsfm_msa.evaluate.command import run_evaluate

    return run_evaluate(cfg)


def probe_command(cfg: DictConfig):
    from tsfm_msa.probes.command import run_probe

    return run_probe(cfg)


COMMANDS = {
    "train": ("train", train_command, "train a dense or MSA forecaster (Lightning + Hydra)"),
    "convert": ("convert", convert_command, "dense-to-sparse: a dense checkpoint + fresh index projections, warmup, sparse"),
    "evaluate": ("evaluate", evaluate_command, "GluonTS evaluation: our models next to seasonal naive, PatchTST, DeepAR"),
    "probe": ("probe", probe_command, "preservation probes: what does block selection drop?"),
}


def unknown_override_message(config_name: str, overrides: list[str]) -> str | None:
    """A one-line message for an override of a key the config does not have (a typo), with the closest
    existing keys; None when the overrides compose. Hydra's own message suggests adding the key with
    '+', which for our configs only moves the failure into the constructor."""
    import difflib

    from hydra import compose, initialize_config_module
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

    if any(o.startswith("-") for o in overrides):  # --multirun, --cfg, ...: Hydra's own handling
        return None
    try:
        with initialize_config_module("tsfm_msa.configs", version_base=None):
            compose(config_name, overrides=overrides)
    except MissingConfigException as err:
        return unknown_choice_message(err, overrides)
    except OverrideParseException:
        return unreadable_override_message(overrides)
    except ConfigCompositionException as err:
        # A repeated scalar simply takes the last value; a repeated dict fails on the second one's new keys
        # with a message about the wrong key ("did you mean" the same name).
        keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o]
        repeated = next((k for k in keys if keys.count(k) > 1), None)
        if repeated:
            return (f"{repeated} is given twice and the two values do not combine; give it once, with all "
                    f"its values in one override (e.g. one dict: '{repeated}={{a:1,b:2}}')")
        text = f"{err} {err.__cause__ or ''}"
        if "not in struct" not in text:
            return None
        bad = next((o.split("=", 1)[0] for o in overrides if f"'{o.split('=', 1)[0]}'" in text), None)
        if bad is None:
            return None
        if config_name == "evaluate" and bad.lstrip("+~").startswith("model."):
            return evaluate_model_key_message(bad, overrides)
        parent, _, leaf = bad.rpartition(".")
        try:
            with initialize_config_module("tsfm_msa.configs", version_base=None):
                node = compose(config_name, overrides=[o for o in overrides if not o.startswith(bad + "=")])
            keys = [k for k in (OmegaConf.select(node, parent) if parent else node) if not str(k).startswith("_")]
        except Exception:  # noqa: BLE001 - a suggestion is a nicety; the message stands without it
            keys = []
        close = difflib.get_close_matches(leaf, [str(k) for k in keys], n=3, cutoff=0.5)
        prefix = f"{parent}." if parent else ""
        hint = f"; did you mean {', '.join(prefix + c for c in close)}?" if close else ""
        of = f"options of {parent}" if parent else "top-level options"
        where = f" ({of}: {', '.join(map(str, keys))})" if keys and not close else ""
        return f"unknown option {bad}{hint}{where}"
    except Exception:  # noqa: BLE001 - anything else: let Hydra report it as usual
        return None
    return None


def evaluate_model_key_message(bad: str, overrides: list[str]) -> str:
    """`evaluate model.patch_len=7`: evaluate has no `model` node but one per evaluated model
    (models.dense, models.msa, ...); name the override for each of them."""
    from hydra import compose, initialize_config_module

    key = bad.lstrip("+~").split(".", 1)[1]
    try:
        with initialize_config_module("tsfm_msa.configs", version_base=None):
            node = compose("evaluate", overrides=[o for o in overrides if o.split("=", 1)[0] != bad])
        names = [str(n) for n in node.models]
    except Exception:  # noqa: BLE001 - the configs' own names stand in
        names = ["dense", "msa"]
    value = next((o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == bad), "...")
    per_model = " ".join(f"models.{name}.{key}={value}" for name in names)
    return (f"unknown option {bad}: evaluate sets each evaluated model on its own, e.g. {per_model}; with "
            f"checkpoint= the model settings come from the checkpoint")


def unreadable_override_message(overrides: list[str]) -> str | None:
    """The first override Hydra's grammar cannot read (a path with '=', a value with spaces or brackets),
    and how to quote it; None if each reads alone (then Hydra's own message stands)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    for i, override in enumerate(overrides):
        try:
            parser.parse_override(override)
        except HydraException:  # the single-override parser raises the base class
            key, _, value = override.partition("=")
            if value.count("[") > value.count("]"):
                # `key=[a, b]` unquoted: the shell split the list at its spaces; join the pieces again.
                pieces = [override]
                for piece in overrides[i + 1:]:
                    pieces.append(piece)
                    if "".join(pieces).count("[") <= "".join(pieces).count("]"):
                        break
                typed = " ".join(pieces)
                return (f"cannot read the override {typed!r}: the shell split the list at its spaces; write it "
                        f"without spaces or quote it whole, e.g. '{''.join(pieces)}' (with the single quotes)")
            return (f"cannot read the override {override!r}: a value holding '=', spaces, quotes, brackets or "
                    f"commas must be quoted, e.g. '{key}=\"{value}\"' (with the single quotes, for the shell)")
    return None


def unknown_choice_message(err, overrides: list[str]) -> str | None:
    """`data=nosuch`: Hydra's MissingConfigException names the missing `group/name` and the yaml files of
    configs/<group>/; say it in one line with the override as the user typed it."""
    group, _, name = str(err.missing_cfg_file or "").rpartition("/")
    if not group:
        return None
    typed = next((o for o in overrides if "=" in o and o.split("=", 1)[1] == name
                  and o.split("=", 1)[0].lstrip("+~").split("@")[0] == group), f"{group}={name}")
    choices = sorted(o for o in (err.options or []) if not o.startswith("_"))  # _base.yaml: a parent, not a choice
    return f"unknown {typed}: configs/{group}/ has no {name}.yaml; choose one of {', '.join(choices)}"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        lines = ["usage: tsfm-msa <command> [hydra overrides ...]", "", "commands:"]
        lines += [f"  {name:<10} {desc}" for name, (_, _, desc) in COMMANDS.items()]
        lines += ["", "Each command takes Hydra overrides (key=value, group=option, -m for multirun, --cfg job).",
                  "Example: tsfm-msa train model=msa_small data=vic_elec trainer.max_steps=200"]
        print("\n".join(lines))
        return
    name = argv[0]
    if name not in COMMANDS:
        print(f"tsfm-msa: unknown command {name!r}; choose one of {sorted(COMMANDS)}", file=sys.stderr)
        sys.exit(2)
    config_name, command, _ = COMMANDS[name]
    unknown = unknown_override_message(config_name, argv[1:])
    if unknown:
        print(f"tsfm-msa: error: {unknown}", file=sys.stderr)
        sys.exit(2)
    _ORIGINAL_ARGV[:] = [sys.argv[0], *argv]
    sys.argv = [f"tsfm-msa {name}"] + argv[1:]
    _hydra_app(config_name, command)()


if __name__ == "__main__":
    main()
