"""Types and ranges of the ordinary settings, checked once before any data, model or Trainer is built: a
wrong value ends as one line naming the key, the value given and what the key takes, not as a traceback
from deep inside torch or Lightning (int('abc'), torch.empty(..., 'abc'), 'Invalid learning rate')."""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A config value that cannot work; the message says which key and how to fix it."""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # true/false are ints to Python, not to a user


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# (test, what the key takes), each named in the message.
_POSITIVE_INT = (lambda v: _is_int(v) and v > 0, "a positive integer")
_INT = (_is_int, "an integer")
_POSITIVE_NUMBER = (lambda v: _is_number(v) and v > 0, "a positive number")
_NON_NEGATIVE_NUMBER = (lambda v: _is_number(v) and v >= 0, "a number >= 0")
_THREADS = (lambda v: v is None or (_is_int(v) and v > 0), "a positive integer, or null for torch's default (one per core)")

# Model sizes, under `model` (train, convert, probe) and each `models.<name>` (evaluate).
_MODEL_SIZES = ("d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "patch_len", "block_size", "top_k",
                "index_dim", "heads_per_group")
_SETTINGS = {
    "data.batch_size": _POSITIVE_INT,
    "trainer.max_steps": _INT,  # the sign is the command's business (train needs > 0; Lightning reads -1 as no limit)
    "optim.lr": _POSITIVE_NUMBER,
    "optim.weight_decay": _NON_NEGATIVE_NUMBER,
    "cpu_threads": _THREADS,
    "eval.cpu_threads": _THREADS,
    "train.batch_size": _POSITIVE_INT,  # probe
    "train.optim.lr": _POSITIVE_NUMBER,
    "train.optim.weight_decay": _NON_NEGATIVE_NUMBER,
}
_ABSENT = object()


def check_settings(cfg: DictConfig) -> None:
    """Raise ConfigError for the first ordinary setting of the wrong type or out of range; keys a command's
    config does not have are skipped."""
    checks = dict(_SETTINGS)
    # The probe runs `seeds` unless seed= is given (null: not given); the other commands need one integer seed.
    checks["seed"] = (lambda v: v is None or _is_int(v), "an integer or null") if "seeds" in cfg else _INT
    for node in ["model"] + [f"models.{name}" for name in (cfg.get("models") or {})]:
        for size in _MODEL_SIZES:
            checks[f"{node}.{size}"] = _POSITIVE_INT
    for key, (ok, expected) in checks.items():
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is not _ABSENT and not ok(value):
            raise ConfigError(f"{key} must be {expected}, got {value!r}")
