"""`tsfm-msa` console script: one subcommand per job, each a Hydra app over the packaged configs.

    tsfm-msa train model=msa_small data=vic_elec trainer.max_steps=200
    tsfm-msa train -m model=dense_small,msa_small seed=0,1,2      # Hydra multirun

This module is the only reader of Hydra configs: it turns them into objects and hands those on.
"""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from tsfm_msa.run_setup import build_module, build_trainer
from tsfm_msa.run_setup import run_dir as _run_dir

CONFIGS = "pkg://tsfm_msa.configs"


class ConfigError(ValueError):
    """A config value that cannot work; the message says which key and how to fix it."""


def _run_name() -> str:
    choices = hydra.core.hydra_config.HydraConfig.get().runtime.choices
    return f"{choices.get('model')}-{choices.get('data')}"


def load_backbone(module, checkpoint_path: str) -> None:
    """Dense-to-sparse adaptation: start from a (dense) checkpoint's weights; only parameters the
    checkpoint lacks (the MSA index projections) keep their fresh initialization."""
    import torch

    path = Path(checkpoint_path)
    if not path.is_file():
        raise ConfigError(f"init_from={checkpoint_path}: no such checkpoint file")
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
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


def train_command(cfg: DictConfig) -> dict:
    import lightning as L

    from tsfm_msa.train.run import fit_and_summarize

    if cfg.trainer.get("max_steps") is None or int(cfg.trainer.max_steps) <= 0:
        raise ConfigError(f"trainer.max_steps must be a positive integer, got {cfg.trainer.get('max_steps')}")
    L.seed_everything(int(cfg.seed), workers=True)
    if cfg.get("cpu_threads"):
        # On busy shared cores one intra-op thread avoids OpenMP spin contention (often ~10x faster).
        import torch

        torch.set_num_threads(int(cfg.cpu_threads))
    run_dir = _run_dir()
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    datamodule.setup("fit")
    module = build_module(cfg, cfg.model, datamodule, int(cfg.trainer.max_steps))
    if cfg.get("init_from"):
        load_backbone(module, str(cfg.init_from))
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    trainer = build_trainer(cfg, run_dir)
    return fit_and_summarize(module, datamodule, trainer, run_dir, _run_name())


def _hydra_app(config_name: str, command):
    @hydra.main(version_base=None, config_path=CONFIGS, config_name=config_name)
    def app(cfg: DictConfig) -> None:
        try:
            command(cfg)
        except (ValueError, FileNotFoundError) as err:
            # Our own errors on bad data or config: one clear line, no traceback.
            if not (isinstance(err, FileNotFoundError) or type(err).__module__.startswith("tsfm_msa")):
                raise
            print(f"tsfm-msa: error: {err}", file=sys.stderr)
            sys.exit(2)

    return app


def evaluate_command(cfg: DictConfig):
    from tsfm_msa.evaluate.command import run_evaluate

    return run_evaluate(cfg)


def probe_command(cfg: DictConfig):
    from tsfm_msa.probes.command import run_probe

    return run_probe(cfg)


COMMANDS = {
    "train": ("train", train_command, "train a dense or MSA forecaster (Lightning + Hydra)"),
    "convert": ("convert", train_command, "dense-to-sparse: a dense checkpoint + fresh index projections, warmup, sparse"),
    "evaluate": ("evaluate", evaluate_command, "GluonTS evaluation: our models next to seasonal naive, PatchTST, DeepAR"),
    "probe": ("probe", probe_command, "preservation probes: what does block selection drop?"),
}


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
    sys.argv = [f"tsfm-msa {name}"] + argv[1:]
    _hydra_app(config_name, command)()


if __name__ == "__main__":
    main()
