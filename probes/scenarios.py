"""Probe scenarios: windows whose forecast provably needs a known set of (variate, patch) tokens.

Every generator returns a :class:`ScenarioData`: training frames (one window each) and test
:class:`ProbeInstance`s. Each test instance carries

- ``frame``: one window of ``context_len + horizon`` steps (the forecast origin is step ``context_len``),
- ``needed``: bool ``[V, n_patches]``, the context tokens (variate, patch) the forecast needs and that
  lie *beyond the local window* (the far cause),
- ``counterfactual``: the same world with only that cause changed. By construction the two frames
  differ in the context only inside ``needed`` and the horizon target changes, so "the forecast needs
  these tokens" is a checkable fact, not an assumption (tests/test_probes.py checks it).

Difficulty knobs shared by all generators: ``context_len``, ``distance`` (steps from the cause to the
forecast origin), ``salience`` (size of the cause next to the background), ``n_distractors``
(irrelevant sensors in their own group). Contexts and distances are whole patches so a cause fills
exactly one patch token.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd

from tsfm_msa.datasets import SeriesFrame, SeriesSchema, Variate, load_vic_elec


class ProbeConfigError(ValueError):
    """Scenario or probe settings that cannot work; the message names the knob."""


@dataclass(frozen=True)
class ProbeInstance:
    frame: SeriesFrame  # [C + H steps, V]; forecast origin at step C
    needed: np.ndarray  # bool [V, n_patches]: tokens the forecast needs (context only)
    counterfactual: SeriesFrame  # the same window with the far cause changed


@dataclass
class ScenarioData:
    name: str
    description: str
    schema: SeriesSchema
    context_len: int
    horizon: int
    patch_len: int
    train: list[SeriesFrame]
    test: list[ProbeInstance]
    knobs: dict = field(default_factory=dict)

    @property
    def n_patches(self) -> int:
        return self.context_len // self.patch_len + -(-self.horizon // self.patch_len)


# ---------------------------------------------------------------------------------------------
# shared pieces

def _check_knobs(context_len: int, horizon: int, patch_len: int, distance: int, n_train: int, n_test: int,
                 min_distance: int | None = None) -> None:
    for name, value in (("context_len", context_len), ("horizon", horizon), ("patch_len", patch_len),
                        ("distance", distance), ("n_train", n_train), ("n_test", n_test)):
        if not isinstance(value, (int, np.integer)) or value <= 0:
            raise ProbeConfigError(f"{name} must be a positive integer, got {value!r}")
    if context_len % patch_len or distance % patch_len:
        raise ProbeConfigError(f"context_len ({context_len}) and distance ({distance}) must be multiples of "
                               f"patch_len ({patch_len}) so the cause fills exactly one patch")
    if not patch_len <= distance <= context_len - patch_len:
        raise ProbeConfigError(f"distance ({distance}) must lie in [patch_len, context_len - patch_len] = "
                               f"[{patch_len}, {context_len - patch_len}]")
    if min_distance is not None and distance < min_distance:
        raise ProbeConfigError(f"distance ({distance}) must be at least {min_distance} steps here")


def _bump(patch_len: int) -> np.ndarray:
    """Half-sine pulse filling one patch: [P], peak 1."""
    return np.sin(np.pi * (np.arange(patch_len) + 0.5) / patch_len)


def _wiggle(patch_len: int) -> np.ndarray:
    """One full sine period filling one patch: [P], peak 1, zero mean. Changing its sign leaves the
    window's mean (the scaler's loc) unchanged, so a counterfactual cannot leak through scaling."""
    return np.sin(2 * np.pi * (np.arange(patch_len) + 0.5) / patch_len)


def _background(rng: np.random.Generator, n: int, period: float, noise: float, level: float = 0.0) -> np.ndarray:
    """Seasonal sine (random phase, unit amplitude) + white noise: [n]."""
    t = np.arange(n)
    return level + np.sin(2 * np.pi * t / period + rng.uniform(0, 2 * np.pi)) + noise * rng.standard_normal(n)


def _linear_recursion(x: np.ndarray, a: float, span: int = 64) -> np.ndarray:
    """y[t] = a * y[t-1] + x[t] with y[-1] = 0, vectorised: within spans of ``span`` steps by a
    triangular matrix of powers of ``a``, across spans by the same recursion on the span ends (with
    coefficient a^span), so a path of 100K+ steps costs a few small matrix products."""
    n = len(x)
    if n <= span:
        y = np.array(x, dtype=np.float64)
        for t in range(1, n):
            y[t] += a * y[t - 1]
        return y
    n_spans = -(-n // span)
    e = np.pad(x, (0, n_spans * span - n)).reshape(n_spans, span)
    lag = np.arange(span)[:, None] - np.arange(span)[None, :]
    within = np.where(lag >= 0, a ** np.maximum(lag, 0), 0.0)  # [span, span]
    local = e @ within.T  # each span's response to its own inputs
    ends = _linear_recursion(local[:, -1], a ** span, span)  # y at the end of every span
    carry = np.concatenate([[0.0], ends[:-1]])  # y just before each span
    out = local + carry[:, None] * a ** np.arange(1, span + 1)[None, :]
    return out.reshape(-1)[:n]


def _ar1(rng: np.random.Generator, n: int, phi: float) -> np.ndarray:
    """Unit-variance AR(1) path [n]: x[0] ~ N(0, 1), x[t] = phi x[t-1] + eps[t]."""
    eps = rng.standard_normal(n) * np.sqrt(1 - phi ** 2)
    eps[0] = rng.standard_normal()
    return _linear_recursion(eps, float(phi))


def _distractors(rng: np.random.Generator, n: int, count: int, patch_len: int, spikes: int = 2,
                 spike_size: float = 3.0) -> np.ndarray:
    """Irrelevant but salient sensors: AR(1) with a few large one-patch bumps each: [n, count]."""
    out = np.empty((n, count))
    bump = _bump(patch_len)
    for d in range(count):
        x = _ar1(rng, n, 0.9) + 0.5 * np.sin(2 * np.pi * np.arange(n) / rng.uniform(10, 60))
        for _ in range(spikes):
            start = rng.integers(0, n - patch_len)
            x[start:start + patch_len] += spike_size * rng.uniform(0.7, 1.3) * rng.choice([-1, 1]) * bump
        out[:, d] = x
    return out


def _sign_amplitude(rng: np.random.Generator, salience: float) -> float:
    return float(salience * rng.uniform(0.5, 1.5) * rng.choice([-1.0, 1.0]))


def _schema(variates: list[tuple[str, str, str]], binary: tuple[str, ...] = ()) -> SeriesSchema:
    return SeriesSchema(tuple(Variate(n, r, g, n in binary) for n, r, g in variates), freq="h")


_STAMPS: dict[int, pd.DatetimeIndex] = {}


def _frame(values: np.ndarray, schema: SeriesSchema, item_id: str,
           timestamps: pd.DatetimeIndex | None = None) -> SeriesFrame:
    if timestamps is None:
        n = values.shape[0]
        if n not in _STAMPS:
            _STAMPS[n] = pd.date_range("2020-01-01", periods=n, freq=schema.freq)
        timestamps = _STAMPS[n]
    return SeriesFrame(item_id=item_id, timestamps=timestamps, values=values.astype(np.float32), schema=schema)


# One synthetic world: rng -> (values [C+H, V], counterfactual [C+H, V], needed [V, n_patches])
World = Callable[[np.random.Generator], tuple[np.ndarray, np.ndarray, np.ndarray]]


def _assemble(name: str, description: str, schema: SeriesSchema, world: World, context_len: int, horizon: int,
              patch_len: int, n_train: int, n_test: int, seed: int, knobs: dict) -> ScenarioData:
    """Draw train frames and test instances from independent seed streams of one world."""
    train = []
    rng = np.random.default_rng([seed, 0])
    for i in range(n_train):
        values, _, _ = world(rng)
        train.append(_frame(values, schema, f"train-{i}"))
    test = []
    rng = np.random.default_rng([seed, 1])
    for i in range(n_test):
        values, cf, needed = world(rng)
        test.append(ProbeInstance(_frame(values, schema, f"test-{i}"), needed, _frame(cf, schema, f"test-{i}-cf")))
    return ScenarioData(name, description, schema, context_len, horizon, patch_len, train, test, knobs)


def _needed(n_var: int, n_patches: int, cells: list[tuple[int, int]]) -> np.ndarray:
    mask = np.zeros((n_var, n_patches), dtype=bool)
    for v, p in cells:
        mask[v, p] = True
    return mask


# ---------------------------------------------------------------------------------------------
# 1. rare event

def rare_event(n_train: int = 512, n_test: int = 64, context_len: int = 160, horizon: int = 8,
               patch_len: int = 8, distance: int = 144, salience: float = 1.0, n_distractors: int = 2,
               noise: float = 0.1, period: float = 24.0, seed: int = 0) -> ScenarioData:
    """A rare one-patch pulse (one zero-mean sine period) ``distance`` steps before the origin repeats
    in the horizon (a pattern after a known delay). Its amplitude (``salience`` x U(0.5, 1.5), random sign) is the size of the
    seasonal background, so it does not stand out; only that pulse tells the horizon's deviation.
    Distractor sensors carry larger pulses of their own that mean nothing for the target."""
    _check_knobs(context_len, horizon, patch_len, distance, n_train, n_test)
    C, H, P = context_len, horizon, patch_len
    n_patches = C // P + -(-H // P)
    schema = _schema([("target", "target", "target")]
                     + [(f"distractor_{d}", "past_covariate", "distractors") for d in range(n_distractors)])
    bump = _wiggle(P)
    cause = C - distance

    def world(rng):
        y = _background(rng, C + H, period, noise)
        amp = _sign_amplitude(rng, salience)
        effect = np.zeros(C + H)
        effect[cause:cause + P] += bump
        effect[C:C + min(H, P)] += bump[:H]
        cols = [y + amp * effect]
        if n_distractors:
            cols.append(_distractors(rng, C + H, n_distractors, P))
        values = np.column_stack(cols)
        cf = values.copy()
        cf[:, 0] += (-2 * amp) * effect  # the pulse with the opposite sign, in both places
        return values, cf, _needed(values.shape[1], n_patches, [(0, cause // P)])

    knobs = dict(context_len=C, horizon=H, patch_len=P, distance=distance, salience=salience,
                 n_distractors=n_distractors, noise=noise, n_train=n_train, n_test=n_test)
    return _assemble("rare_event", "a low-salience pulse far back repeats in the horizon", schema, world,
                     C, H, P, n_train, n_test, seed, knobs)


# ---------------------------------------------------------------------------------------------
# 2. exogenous variable with a long delay (and its crowded variant, sensor starvation)

def _lagged_covariate_world(C: int, H: int, P: int, distance: int, salience: float, n_distractors: int,
                            noise: float, period: float, spike_size: float, quiet: float) -> tuple[World, int]:
    """target[t] = background[t] + salience * x[t - distance]; x is a smooth AR(1) sensor stored at a
    small raw scale (``quiet``). Counterfactual: add a pulse to x's patch that drives the horizon."""
    n_patches = C // P + -(-H // P)
    cause = C - distance
    bump = _bump(P)  # a smooth bump, like the AR path itself, so the changed sensor stays in distribution

    def world(rng):
        x = _ar1(rng, C + H + distance, 0.95)  # distance steps of pre-history so the lag exists at t=0
        y = _background(rng, C + H, period, noise) + salience * x[:C + H]
        x_obs = x[distance:]
        cols = [y, quiet * x_obs]
        if n_distractors:
            cols.append(_distractors(rng, C + H, n_distractors, P, spike_size=spike_size))
        values = np.column_stack(cols)
        cf = values.copy()
        delta = _sign_amplitude(rng, 1.5) * bump
        cf[cause:cause + P, 1] += quiet * delta  # change the cause ...
        cf[C:C + min(H, P), 0] += salience * delta[:H]  # ... and the world answers distance steps later
        # The horizon reads x over [cause, cause + H): one patch, or more when H > P.
        cells = [(1, p) for p in range(cause // P, (cause + H - 1) // P + 1)]
        return values, cf, _needed(values.shape[1], n_patches, cells)

    return world, n_patches


def exogenous_delay(n_train: int = 512, n_test: int = 64, context_len: int = 160, horizon: int = 8,
                    patch_len: int = 8, distance: int = 144, salience: float = 1.0, n_distractors: int = 2,
                    noise: float = 0.1, period: float = 24.0, seed: int = 0) -> ScenarioData:
    """The target follows a separate, low-variance covariate sensor with a lag of ``distance`` steps
    (>= horizon, so the horizon is predictable only from that sensor's past patch); distractor sensors
    have larger variance and pulses."""
    _check_knobs(context_len, horizon, patch_len, distance, n_train, n_test, min_distance=horizon)
    schema = _schema([("target", "target", "target"), ("covariate", "past_covariate", "covariate")]
                     + [(f"distractor_{d}", "past_covariate", "distractors") for d in range(n_distractors)])
    world, _ = _lagged_covariate_world(context_len, horizon, patch_len, distance, salience, n_distractors,
                                       noise, period, spike_size=3.0, quiet=0.1)
    knobs = dict(context_len=context_len, horizon=horizon, patch_len=patch_len, distance=distance,
                 salience=salience, n_distractors=n_distractors, noise=noise, n_train=n_train, n_test=n_test)
    return _assemble("exogenous_delay", "the target follows a quiet covariate with a long lag", schema, world,
                     context_len, horizon, patch_len, n_train, n_test, seed, knobs)


def sensor_starvation(n_train: int = 512, n_test: int = 64, context_len: int = 160, horizon: int = 8,
                      patch_len: int = 8, distance: int = 144, salience: float = 1.0, n_distractors: int = 4,
                      noise: float = 0.1, period: float = 24.0, seed: int = 0) -> ScenarioData:
    """Many salient distractor sensors (large pulses) and one quiet informative sensor that drives the
    target with a lag: under the ``free`` policy the distractors can take the whole block budget; the
    ``sensor`` and ``hybrid`` policies reserve blocks for every sensor group."""
    _check_knobs(context_len, horizon, patch_len, distance, n_train, n_test, min_distance=horizon)
    if n_distractors < 1:
        raise ProbeConfigError("sensor_starvation needs n_distractors >= 1")
    schema = _schema([("target", "target", "target"), ("informative", "past_covariate", "informative")]
                     + [(f"distractor_{d}", "past_covariate", "distractors") for d in range(n_distractors)])
    world, _ = _lagged_covariate_world(context_len, horizon, patch_len, distance, salience, n_distractors,
                                       noise, period, spike_size=6.0, quiet=0.05)
    knobs = dict(context_len=context_len, horizon=horizon, patch_len=patch_len, distance=distance,
                 salience=salience, n_distractors=n_distractors, noise=noise, n_train=n_train, n_test=n_test)
    return _assemble("sensor_starvation", "one quiet informative sensor among many salient distractors", schema,
                     world, context_len, horizon, patch_len, n_train, n_test, seed, knobs)


# ---------------------------------------------------------------------------------------------
# 3. action history

def action_history(n_train: int = 512, n_test: int = 64, context_len: int = 160, horizon: int = 8,
                   patch_len: int = 8, distance: int = 144, salience: float = 1.0, n_distractors: int = 2,
                   noise: float = 0.1, period: float = 24.0, decay: float = 32.0, n_other_actions: int = 2,
                   jitter: bool = False, seed: int = 0) -> ScenarioData:
    """Sparse on/off control actions act on the target (size ``salience``) after a dead time of
    ``distance`` steps, then decay with time constant ``decay``. In half of the windows a key action
    sits ``distance`` steps before the origin, so its effect starts inside the horizon and nothing in
    the target's past shows it; whether it is there is written only in that action patch. Other actions
    are older (effects already visible) or younger (effects start after the horizon).
    ``jitter`` moves the key action within its patch (the forecast must then also read its timing).
    Counterfactual: toggle the key action (remove it, or add it)."""
    _check_knobs(context_len, horizon, patch_len, distance, n_train, n_test, min_distance=horizon)
    C, H, P = context_len, horizon, patch_len
    n_patches = C // P + -(-H // P)
    cause = C - distance
    # On/off actions are binary, hence unscaled: removing one cannot shift the scaling of the others.
    schema = _schema([("target", "target", "target"), ("action", "action", "actions")]
                     + [(f"distractor_{d}", "past_covariate", "distractors") for d in range(n_distractors)],
                     binary=("action",))
    t = np.arange(C + H)

    def response(start: int) -> np.ndarray:
        lag = t - start - distance
        return np.where(lag >= 0, salience * np.exp(-np.maximum(lag, 0) / decay), 0.0)

    # Steps where another action may fall: older than the key patch (effect already visible in the
    # target's past) or so young that its effect starts after the horizon; no planned doses.
    young = max(cause + P, C + H - distance)
    free_steps = np.array([s for s in range(C) if s < cause or s >= young])
    if n_other_actions > len(free_steps):
        raise ProbeConfigError(f"n_other_actions ({n_other_actions}) exceeds the {len(free_steps)} free steps")

    def world(rng):
        y = _background(rng, C + H, period, noise)
        actions = np.zeros(C + H)
        # The key action opens its patch (jitter: anywhere in it), so its effect starts inside the horizon.
        key_step = cause + (int(rng.integers(0, min(P, H))) if jitter else 0)
        key_on = bool(rng.random() < 0.5)  # the key patch tells whether an effect starts: either way it is needed
        actions[key_step] = float(key_on)
        total = response(key_step) * key_on
        others = rng.choice(free_steps, size=n_other_actions, replace=False) if n_other_actions else []
        for s in others:
            actions[s] = 1.0
            total = total + response(int(s))
        cols = [y + total, actions]
        if n_distractors:
            cols.append(_distractors(rng, C + H, n_distractors, P))
        values = np.column_stack(cols)
        cf = values.copy()
        cf[key_step, 1] = 1.0 - cf[key_step, 1]  # remove the key action, or add it ...
        cf[:, 0] += (1.0 - 2.0 * key_on) * response(key_step)  # ... and its effect, which starts in the horizon
        return values, cf, _needed(values.shape[1], n_patches, [(1, cause // P)])

    knobs = dict(context_len=C, horizon=H, patch_len=P, distance=distance, salience=salience,
                 n_distractors=n_distractors, noise=noise, decay=decay, n_other_actions=n_other_actions,
                 jitter=jitter, n_train=n_train, n_test=n_test)
    return _assemble("action_history", "a past control action acts on the target after a long dead time",
                     schema, world, C, H, P, n_train, n_test, seed, knobs)


# ---------------------------------------------------------------------------------------------
# 4. real background (vic_elec)

def real_background(n_train: int = 512, n_test: int = 64, context_len: int = 160, horizon: int = 8,
                    patch_len: int = 8, distance: int = 144, salience: float = 1.0, n_distractors: int = 0,
                    train_fraction: float = 0.7, seed: int = 0, frames: list[SeriesFrame] | None = None) -> ScenarioData:
    """The rare-event pulse injected into real Victoria electricity demand (vic_elec: Demand target,
    Temperature past covariate, Holiday known-future covariate; the real covariates are the
    distractors). Pulse size: ``salience`` x U(0.5, 1.5) x the window's demand std. Training windows
    come from the first ``train_fraction`` of the series, test windows from the rest."""
    _check_knobs(context_len, horizon, patch_len, distance, n_train, n_test)
    if n_distractors:
        raise ProbeConfigError("real_background uses the real covariates as distractors; set n_distractors: 0")
    C, H, P = context_len, horizon, patch_len
    source = (frames or load_vic_elec())[0]
    schema = source.schema
    target = schema.target_indices[0]
    n_patches = C // P + -(-H // P)
    cause = C - distance
    bump = _wiggle(P)
    split = int(source.length * train_fraction)
    if split < C + H or source.length - split < C + H:
        raise ProbeConfigError(f"the series ({source.length} steps) is too short for windows of {C + H} steps")

    def window(rng: np.random.Generator, lo: int, hi: int):
        start = int(rng.integers(lo, hi - (C + H) + 1))
        raw = np.array(source.values[start:start + C + H], dtype=np.float64)
        raw = np.where(np.isnan(raw), np.nanmean(raw, axis=0), raw)  # vic_elec has no gaps; keep it safe
        std = float(np.std(raw[:C, target])) or 1.0
        amp = _sign_amplitude(rng, salience) * std
        effect = np.zeros(C + H)
        effect[cause:cause + P] += bump
        effect[C:C + min(H, P)] += bump[:H]
        values = raw.copy()
        values[:, target] += amp * effect
        cf = values.copy()
        cf[:, target] -= 2 * amp * effect
        return values, cf, _needed(values.shape[1], n_patches, [(target, cause // P)]), source.timestamps[start:start + C + H]

    train, test = [], []
    rng = np.random.default_rng([seed, 0])
    for i in range(n_train):
        values, _, _, stamps = window(rng, 0, split)
        train.append(_frame(values, schema, f"train-{i}", stamps))
    rng = np.random.default_rng([seed, 1])
    for i in range(n_test):
        values, cf, needed, stamps = window(rng, split, source.length)
        test.append(ProbeInstance(_frame(values, schema, f"test-{i}", stamps), needed,
                                  _frame(cf, schema, f"test-{i}-cf", stamps)))
    knobs = dict(context_len=C, horizon=H, patch_len=P, distance=distance, salience=salience,
                 n_distractors=0, train_fraction=train_fraction, n_train=n_train, n_test=n_test, background="vic_elec")
    return ScenarioData("real_background", "the rare-event pulse injected into real vic_elec demand", schema, C, H, P,
                        train, test, knobs)


GENERATORS: dict[str, Callable[..., ScenarioData]] = {
    "rare_event": rare_event,
    "exogenous_delay": exogenous_delay,
    "action_history": action_history,
    "sensor_starvation": sensor_starvation,
    "real_background": real_background,
}


def make_scenario(name: str, **knobs) -> ScenarioData:
    """Build a scenario by name with its knobs (unknown names and knobs raise ProbeConfigError)."""
    if name not in GENERATORS:
        raise ProbeConfigError(f"unknown probe scenario {name!r}; choose from {sorted(GENERATORS)}")
    try:
        return GENERATORS[name](**knobs)
    except TypeError as err:
        raise ProbeConfigError(f"scenario {name}: {err}") from err
