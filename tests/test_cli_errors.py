"""CLI: bad settings end as one clear line before any data or model work, and the console stays free of
dependency noise (Lightning's tips, known harmless deprecation warnings)."""
from __future__ import annotations

import logging
import warnings

import pytest
import torch

import tsfm_msa.cli as cli
from tsfm_msa.cli import main
from test_train import FAST


def _one_line_error(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def _stop_at_the_trainer(monkeypatch) -> list:
    """build_trainer records its call and stops the run there (Hydra turns that into exit code 1)."""
    built = []

    def stop(*args, **kwargs):
        built.append(True)
        raise RuntimeError("stopped at the Trainer")

    monkeypatch.setattr(cli, "build_trainer", stop)
    return built


@pytest.mark.parametrize("policy", ["free", "sensor", "hybrid"])
def test_top_k_above_the_window_blocks_fails_before_the_trainer(policy, monkeypatch, capsys, tmp_path):
    """The synthetic data has three sensor groups (target, past and future covariate); sensor/hybrid
    need one KV head per group."""
    built = _stop_at_the_trainer(monkeypatch)
    policy_args = [f"model.group_policy={policy}"]
    if policy != "free":
        policy_args += ["model.n_kv_heads=3", "model.n_heads=6"]
    err = _one_line_error(["train", *FAST, "model.top_k=999", *policy_args, f"hydra.run.dir={tmp_path}"], capsys)
    assert "top_k=999" in err and "model.top_k" in err and "data.context_len" in err and "model.block_size" in err
    blocks = int(err.split("KV blocks (")[1].split(")")[0])
    assert 0 < blocks < 999
    assert not built


def test_top_k_that_fits_still_trains_to_the_trainer(monkeypatch, capsys, tmp_path):
    built = _stop_at_the_trainer(monkeypatch)
    with pytest.raises(SystemExit):
        main(["train", *FAST, "model.top_k=2", f"hydra.run.dir={tmp_path}"])
    assert built and "stopped at the Trainer" in capsys.readouterr().err


@pytest.mark.parametrize("command, extra", [("train", ["trainer=gpu"]), ("convert", ["trainer=ddp"]),
                                            ("evaluate", ["trainer=gpu"]), ("probe", ["device=cuda"])])
def test_cuda_asked_without_a_device_is_one_line(command, extra, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config_name, _, desc = cli.COMMANDS[command]

    def must_not_run(cfg):
        raise AssertionError("the command ran although no CUDA device exists")

    monkeypatch.setitem(cli.COMMANDS, command, (config_name, must_not_run, desc))
    err = _one_line_error([command, *extra, f"hydra.run.dir={tmp_path}"], capsys)
    assert "no CUDA device was found" in err
    assert ("trainer=cpu" in err) if command != "probe" else ("device=cpu" in err)


def test_cpu_trainer_passes_the_cuda_check(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ran = []
    monkeypatch.setitem(cli.COMMANDS, "train", ("train", ran.append, "test"))
    main(["train", "trainer=cpu", f"hydra.run.dir={tmp_path}"])
    assert len(ran) == 1


@pytest.mark.parametrize("command, override, group, choices", [
    ("train", "data=nosuch", "data", ["csv", "synthetic", "vic_elec"]),
    ("train", "model=nosuch", "model", ["dense_small", "msa_small"]),
    ("train", "trainer=nosuch", "trainer", ["cpu", "gpu", "ddp", "fsdp"]),
    ("evaluate", "model@models.msa=nosuch", "model", ["dense_small", "msa_small"]),
])
def test_unknown_group_choice_is_one_line_with_the_choices(command, override, group, choices, capsys):
    err = _one_line_error([command, override], capsys)
    assert override in err and f"configs/{group}/" in err
    assert all(c in err for c in choices)
    assert "_base" not in err  # a parent config, not a choice


def test_hydra_flags_keep_their_own_handling(capsys):
    main(["train", "data=synthetic", "--cfg", "job"])
    out = capsys.readouterr().out
    assert "context_len:" in out and "top_k:" in out


def test_lightning_tips_are_dropped_and_other_lines_kept(caplog):
    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    cli._quiet_known_noise()
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        rank_zero_info("\N{ELECTRIC LIGHT BULB} Tip: For seamless cloud logging, try installing [litlogger]")
        rank_zero_info("GPU available: False, used: False")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["GPU available: False, used: False"]


def test_only_the_known_dependency_warnings_are_silenced():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli._quiet_known_noise()
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and "
                      "treespec.is_leaf()` instead.", FutureWarning)
        warnings.warn("Using `json`-module for json-handling. Consider installing one of `orjson`, `ujson`",
                      UserWarning)
        warnings.warn("some other deprecation", FutureWarning)
        warnings.warn("context_len shortened to 256", UserWarning)
    assert [str(w.message) for w in caught] == ["some other deprecation", "context_len shortened to 256"]


def test_train_run_log_has_no_tips_or_known_warnings(tmp_path):
    """End to end: Lightning's tip and the pytree FutureWarning never reach the run's log (cli.log)."""
    main(["train", *FAST, "trainer.max_steps=2", "trainer.val_check_interval=2", "indexer_warmup.steps=1",
          f"hydra.run.dir={tmp_path}"])
    log = (tmp_path / "cli.log").read_text()
    assert "Seed set to" in log  # Lightning's other lines still arrive
    assert "Tip:" not in log and "LeafSpec" not in log


def test_an_unquoted_path_with_equals_says_how_to_quote_it(capsys, tmp_path):
    err = _one_line_error(["evaluate", "checkpoint=runs/checkpoints/best-step=200.ckpt"], capsys)
    assert "cannot read the override 'checkpoint=runs/checkpoints/best-step=200.ckpt'" in err
    quoted = err.split("e.g. ")[1].split(" (with")[0]
    assert quoted == """'checkpoint="runs/checkpoints/best-step=200.ckpt"'"""
    # The suggestion, pasted through the shell, reads: the next error is about the file, not the grammar.
    import shlex

    err = _one_line_error(["evaluate", *shlex.split(quoted), f"hydra.run.dir={tmp_path}"], capsys)
    assert "cannot read the override" not in err and "best-step=200.ckpt" in err


def test_an_option_given_twice_is_one_line(capsys):
    err = _one_line_error(["train", "data=csv", 'data.loader.read_kwargs={sep:";"}',
                           "data.loader.read_kwargs={dayfirst:true}"], capsys)
    assert err.startswith("tsfm-msa: error: data.loader.read_kwargs is given twice")


def _command_must_not_run(monkeypatch, command: str) -> None:
    config_name, _, desc = cli.COMMANDS[command]

    def must_not_run(cfg):
        raise AssertionError(f"the {command} command ran despite a bad setting")

    monkeypatch.setitem(cli.COMMANDS, command, (config_name, must_not_run, desc))


@pytest.mark.parametrize("command, override, expected", [
    ("train", "data.batch_size=0", "a positive integer"), ("train", "data.batch_size=abc", "a positive integer"),
    ("train", "trainer.max_steps=abc", "an integer"), ("train", "seed=abc", "an integer"),
    ("train", "optim.lr=-1", "a positive number"), ("train", "optim.lr=abc", "a positive number"),
    ("train", "optim.weight_decay=-0.1", "a number >= 0"), ("train", "model.d_model=abc", "a positive integer"),
    ("train", "model.n_layers=0", "a positive integer"), ("train", "model.n_heads=1.5", "a positive integer"),
    ("train", "model.n_kv_heads=true", "a positive integer"), ("train", "model.head_dim=-2", "a positive integer"),
    ("train", "model.patch_len=abc", "a positive integer"), ("train", "model.block_size=0", "a positive integer"),
    ("train", "model.top_k=abc", "a positive integer"), ("train", "model.top_k=-3", "a positive integer"),
    ("train", "cpu_threads=0", "a positive integer, or null"), ("convert", "data.batch_size=abc", "a positive integer"),
    ("evaluate", "models.msa.d_model=abc", "a positive integer"), ("evaluate", "eval.cpu_threads=0", "a positive integer"),
    ("probe", "train.optim.lr=abc", "a positive number"), ("probe", "seed=abc", "an integer or null"),
])
def test_a_setting_of_the_wrong_type_or_range_is_one_line_before_the_command(command, override, expected,
                                                                           monkeypatch, capsys, tmp_path):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    _command_must_not_run(monkeypatch, command)
    err = _one_line_error([command, override, f"hydra.run.dir={tmp_path}"], capsys)
    parsed = OverridesParser.create().parse_override(override)
    assert err.startswith(f"tsfm-msa: error: {parsed.key_or_group} must be {expected}"), err
    assert err.endswith(f"got {parsed.value()!r}"), err


@pytest.mark.parametrize("command", ["train", "convert", "evaluate", "probe"])
def test_every_default_config_passes_the_settings_check(command):
    from hydra import compose, initialize_config_module

    from tsfm_msa.config_checks import check_settings

    with initialize_config_module("tsfm_msa.configs", version_base=None):
        cfg = compose(cli.COMMANDS[command][0], overrides=["cpu_threads=null"] if command == "train" else [])
    check_settings(cfg)


def test_convert_without_init_from_stops_before_any_run(capsys, tmp_path):
    err = _one_line_error(["convert", "trainer.max_steps=30", f"hydra.run.dir={tmp_path}"], capsys)
    assert "pass init_from=<dense checkpoint file or run folder>" in err
    assert not (tmp_path / "config.yaml").exists()


def test_convert_init_from_takes_a_run_folder(capsys, tmp_path):
    """A run folder resolves to its checkpoint (as resume= and evaluate checkpoint= do): this empty state dict
    then does not fit the model, which shows the folder was read."""
    run = tmp_path / "dense_run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {}}, run / "checkpoints" / "last.ckpt")
    assert cli.init_checkpoint(str(run)) == run / "checkpoints" / "last.ckpt"
    err = _one_line_error(["convert", *FAST, f"init_from={run}", f"hydra.run.dir={tmp_path / 'out'}"], capsys)
    assert "does not fit this model" in err and "no such checkpoint" not in err
    err = _one_line_error(["convert", *FAST, f"init_from={tmp_path / 'nosuch'}", f"hydra.run.dir={tmp_path}"], capsys)
    assert "no such checkpoint file, nor a run folder" in err


@pytest.mark.parametrize("backend, cuda", [("bogus", False), ("bogus", True), ("triton", False)])
def test_an_unusable_kernel_backend_is_one_line(backend, cuda, monkeypatch, capsys, tmp_path):
    from tsfm_msa.kernels import dispatch

    monkeypatch.setenv("TSFM_MSA_BACKEND", backend)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    _command_must_not_run(monkeypatch, "train")
    err = _one_line_error(["train", f"hydra.run.dir={tmp_path}"] + (["trainer=gpu"] if cuda else []), capsys)
    problem = dispatch.backend_problem(cuda=cuda)
    assert problem and err == f"tsfm-msa: error: {problem}"
    # Library users calling the ops directly still get an exception with the same text.
    qi = torch.zeros(1, 1, 8, 4)
    t = torch.arange(8, dtype=torch.int32)[None]
    with pytest.raises((ValueError, RuntimeError)) as raised:
        dispatch.select_blocks(qi, qi[:, 0], t, t, 4, 1)
    assert str(raised.value) == dispatch.backend_problem(cuda=False)


def test_an_unquoted_list_split_by_the_shell_is_quoted_whole(capsys):
    import shlex

    from hydra.core.override_parser.overrides_parser import OverridesParser

    err = _one_line_error(["train", "data=csv", "data.loader.targets=[flow,", "pressure]"], capsys)
    quoted = err.split("e.g. ")[1].split(" (with")[0]
    assert quoted == "'data.loader.targets=[flow,pressure]'"
    (override,) = shlex.split(quoted)
    assert OverridesParser.create().parse_override(override).value() == ["flow", "pressure"]


def test_an_unknown_top_level_key_names_the_top_level(capsys):
    err = _one_line_error(["train", "nosuchkey=1"], capsys)
    assert "top-level options: model, data" in err and "options of :" not in err


def test_dense_support_policy_without_the_sensor_policy_is_one_line(capsys, tmp_path):
    dense_fast = [o for o in FAST if not o.startswith("model.top_k")]  # dense_small has no top_k
    err = _one_line_error(["train", *dense_fast, "model=dense_small", "model.dense_support=policy",
                           "trainer.max_steps=5", f"hydra.run.dir={tmp_path}"], capsys)
    assert "model.dense_support=policy only changes attention under model.group_policy=sensor (got free)" in err
    assert "model.dense_support=all" in err


def test_a_model_key_in_evaluate_names_the_models_keys(capsys):
    err = _one_line_error(["evaluate", "model.patch_len=7"], capsys)
    assert err.startswith("tsfm-msa: error: unknown option model.patch_len: ")
    assert "models.dense.patch_len=7 models.msa.patch_len=7" in err
    assert "with checkpoint= the model settings come from the checkpoint" in err


def test_convert_from_a_run_on_other_data_names_its_data_overrides(capsys, tmp_path):
    """A dense run trained on a CSV, converted without its data overrides: the message names them, not model.*."""
    run = tmp_path / "dense_run"
    (run / "checkpoints").mkdir(parents=True)
    (run / ".hydra").mkdir()
    (run / ".hydra" / "overrides.yaml").write_text("- model=dense_small\n- data=csv\n- data.loader.path=my.csv\n")
    schema = {"variates": [{"name": "load", "role": "target", "group": "target"}], "freq": "h"}
    torch.save({"state_dict": {}, "hyper_parameters": {"schema": schema, "context_len": 64, "horizon": 16}},
               run / "checkpoints" / "last.ckpt")
    err = _one_line_error(["convert", *FAST, f"init_from={run}", f"hydra.run.dir={tmp_path / 'out'}"], capsys)
    assert f"init_from={run} was trained on other data than this run (the variates differ)" in err
    assert "its run used data=csv data.loader.path=my.csv" in err and "does not fit" not in err


@pytest.mark.parametrize("command", ["train", "convert", "evaluate"])
def test_a_refused_run_leaves_no_run_folder_behind(command, capsys, tmp_path):
    """A run refused before it wrote anything but Hydra's log and record would be an empty "latest run"."""
    run = tmp_path / "run"
    bad = "data.batch_size=0" if command != "convert" else "trainer.max_steps=30"  # convert: no init_from
    _one_line_error([command, bad, f"hydra.run.dir={run}"], capsys)
    assert not run.exists()
    assert tmp_path.exists()


def test_a_refused_run_keeps_a_folder_that_holds_anything_else(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    _one_line_error(["train", "data.batch_size=0", f"hydra.run.dir={run}"], capsys)
    assert (run / "notes.txt").read_text() == "mine" and (run / "cli.log").exists()
    assert not cli.discard_unused_run_dir(run)


def test_a_mistyped_probe_lists_the_probes_but_not_their_parent(capsys):
    err = _one_line_error(["probe", "probe=long-ci"], capsys)
    assert "configs/probe/ has no long-ci.yaml" in err and "long_ci" in err and "rare_event" in err
    assert "long_common" not in err  # a parent of the long_* probes, not a choice


@pytest.mark.parametrize("command", ["train", "convert"])
def test_an_experiment_run_has_its_own_run_folder_name(command, monkeypatch, tmp_path):
    """+experiment=vic_elec_sensor runs must not share outputs/<command>/msa_small-vic_elec/ with plain runs."""
    monkeypatch.chdir(tmp_path)
    seen = []
    monkeypatch.setitem(cli.COMMANDS, command, (command, lambda cfg: seen.append((cli._run_dir(), cli._run_name())),
                                                "test"))
    main([command, "+experiment=vic_elec_sensor"])
    main([command])
    (experiment_dir, experiment_name), (plain_dir, plain_name) = seen
    assert experiment_dir.parent == tmp_path / "outputs" / command / "msa_small-vic_elec+vic_elec_sensor"
    assert plain_dir.parent == tmp_path / "outputs" / command / "msa_small-vic_elec"
    assert (experiment_name, plain_name) == ("msa_small-vic_elec+vic_elec_sensor", "msa_small-vic_elec")


def test_a_refused_run_in_the_default_folder_leaves_no_empty_model_data_folder(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs" / "train" / "dense_small-vic_elec" / "old_run").mkdir(parents=True)
    _one_line_error(["train", "data.batch_size=0"], capsys)
    _one_line_error(["train", "model=dense_small", "data.batch_size=0"], capsys)
    assert [p.name for p in (tmp_path / "outputs" / "train").iterdir()] == ["dense_small-vic_elec"]
    assert (tmp_path / "outputs" / "train" / "dense_small-vic_elec" / "old_run").is_dir()
