"""probe.scenarios.<name>.train: one scenario's training settings over the common ones (e.g. its own
step budget, no context curriculum), checked like the scenario's model settings (CPU, tiny sizes)."""
from __future__ import annotations

import pytest

from tsfm_msa.probes import command, report
from tsfm_msa.probes.scenarios import ProbeConfigError

KNOBS = dict(n_train=2, n_test=4, context_len=32, horizon=4, patch_len=4, distance=24, n_distractors=1)


def _cfg(spec: dict) -> dict:
    return {"seeds": [0], "threads": 1, "checkpoint": None, "device": "cpu",
            "model": {"d_model": 8, "n_layers": 1, "heads_per_group": 1, "head_dim": 4, "block_size": 2, "top_k": 2,
                      "index_dim": 4, "k_own": None},
            "train": {"steps": 1, "msa_steps": 1, "indexer_warmup_steps": 0, "batch_size": 2, "kl_weight": 1.0,
                      "msa_init": "dense", "optim": {"lr": 1e-3, "warmup_steps": 1},
                      "curriculum": [{"context_len": 16, "distance": 12, "steps": 2}]},
            "selectors": ["dense", "learned"], "verdict": dict(report.DEFAULT_THRESHOLDS),
            "probe": {"scenarios": {"sensor_starvation": spec}}}


def _trainings(monkeypatch, spec: dict) -> tuple[list[tuple[str, int, int]], dict]:
    """(attention, window, steps) of every training the scenario runs, and its result."""
    seen = []
    real = command.train_model

    def spy(model_config, scenario, train_cfg, *args, **kwargs):
        seen.append((model_config["attention"], scenario.context_len, int(train_cfg["steps"])))
        return real(model_config, scenario, train_cfg, *args, **kwargs)

    monkeypatch.setattr(command, "train_model", spy)
    result = command.probe_scenario("sensor_starvation", spec, _cfg(spec))
    return seen, result


def test_without_a_scenario_train_the_common_settings_hold(monkeypatch):
    seen, result = _trainings(monkeypatch, {"policies": ["sensor"], "knobs": KNOBS})
    assert seen == [("dense", 16, 2), ("dense", 32, 1), ("dense", 32, 1), ("msa", 32, 1)]
    assert result["train"] == {}


def test_a_scenario_sets_its_own_steps_and_drops_the_curriculum(monkeypatch):
    spec = {"policies": ["sensor"], "knobs": KNOBS, "train": {"steps": 3, "msa_steps": 2, "curriculum": None}}
    seen, result = _trainings(monkeypatch, spec)
    assert seen == [("dense", 32, 3), ("dense", 32, 2), ("msa", 32, 2)]
    assert result["train"] == {"steps": 3, "msa_steps": 2, "curriculum": None}


def test_an_unknown_scenario_train_key_is_a_one_line_error():
    spec = {"policies": ["sensor"], "knobs": KNOBS, "train": {"stepz": 3}}
    with pytest.raises(ProbeConfigError, match=r"sensor_starvation.train: unknown train keys \['stepz'\]"):
        command.probe_scenario("sensor_starvation", spec, _cfg(spec))


@pytest.mark.parametrize("length", ["16k", "64k"])
def test_long_configs_train_the_long_window_long_enough(length):
    """At 16K the dense reference learned rare_event's cause with 1200 long-window steps and not with 300,
    and 64K with 200 learned nothing (benchmarks/results/2026-12-02-probes-long-2.md): the long configs
    train at least 1200 steps at the long window after the curriculum, and 500 continuation steps; any
    per-scenario training override uses the common training keys."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    with initialize_config_module("tsfm_msa.configs", version_base=None):
        cfg = OmegaConf.to_container(compose("probe", overrides=[f"probe=long_{length}"]), resolve=True)
    for name, spec in cfg["probe"]["scenarios"].items():
        assert set(spec.get("train") or {}) <= set(cfg["train"]), name
        train = {**cfg["train"], **(spec.get("train") or {})}
        assert train["curriculum"] and train["steps"] >= 1200 and train["msa_steps"] >= 500, name
