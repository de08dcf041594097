"""Data options added for pedestrian: calendar covariates of local time, and training windows that leave
nearly unobserved targets out of the loss (CPU, fast)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tsfm_msa.datasets import DataValidationError, SeriesFrame, SeriesSchema, Variate, WindowDataset
from tsfm_msa.datasets.bundled import with_calendar


def _frame(rng: np.random.Generator, n: int = 200) -> SeriesFrame:
    """Two random targets, hourly, naive UTC from a random start."""
    start = pd.Timestamp("2016-01-01") + pd.Timedelta(hours=int(rng.integers(0, 24 * 365)))
    schema = SeriesSchema(variates=(Variate("a", "target", "a"), Variate("b", "target", "b")), freq="h")
    values = rng.normal(100.0, 10.0, size=(n, 2))
    return SeriesFrame(item_id="0", timestamps=pd.date_range(start, periods=n, freq="h"), values=values, schema=schema)


def test_calendar_columns_follow_local_time():
    rng = np.random.default_rng(7)
    frame = _frame(rng)
    out = with_calendar(frame, ["hour", "weekday", "weekend"], "Australia/Melbourne")
    names = out.schema.names
    assert names == ("a", "b", "hour_sin", "hour_cos", "weekday_sin", "weekday_cos", "weekend")
    assert out.schema.roles[2:] == ("future_covariate",) * 5 and set(out.schema.groups[2:]) == {"calendar"}
    np.testing.assert_array_equal(out.values[:, :2], frame.values)
    local = frame.timestamps.tz_localize("UTC").tz_convert("Australia/Melbourne")
    hour = np.arctan2(out.column("hour_sin"), out.column("hour_cos")) % (2 * np.pi) * 24 / (2 * np.pi)
    np.testing.assert_allclose(hour, local.hour, atol=1e-3)
    day = np.arctan2(out.column("weekday_sin"), out.column("weekday_cos")) % (2 * np.pi) * 7 / (2 * np.pi)
    np.testing.assert_allclose(np.round(day) % 7, local.dayofweek, atol=1e-3)
    np.testing.assert_array_equal(out.column("weekend"), local.dayofweek >= 5)
    assert out.schema.binary[names.index("weekend")] and not out.schema.binary[names.index("hour_sin")]
    assert with_calendar(frame, [], "Australia/Melbourne") is frame


def test_holiday_flag_marks_local_public_holidays():
    rng = np.random.default_rng(11)
    frame = _frame(rng, n=24 * 60)
    local = frame.timestamps.tz_localize("UTC").tz_convert("Australia/Melbourne")
    picked = local[rng.choice(len(local), size=6, replace=False)]  # holidays on some of the frame's days
    days = {y: tuple(f"{t.month:02d}-{t.day:02d}" for t in picked if t.year == y) for y in set(local.year)}
    out = with_calendar(frame, ["holiday"], "Australia/Melbourne", days)
    expected = [f"{t.month:02d}-{t.day:02d}" in days[t.year] for t in local]
    np.testing.assert_array_equal(out.column("holiday"), expected)
    assert 24 <= out.column("holiday").sum() <= 6 * 24  # whole local days
    assert out.schema.binary[-1]
    with pytest.raises(DataValidationError, match=r"public holidays of \[1999\] only.*drop 'holiday'"):
        with_calendar(frame, ["holiday"], "Australia/Melbourne", {1999: ("01-01",)})


@pytest.mark.parametrize("calendar, match", [(["month"], r"\['month'\] unknown"), (["hour", "hour"], "a name repeats")])
def test_calendar_rejects_bad_names(calendar, match):
    frame = _frame(np.random.default_rng(8))
    with pytest.raises(DataValidationError, match=r"data\.loader\.calendar=.*" + match):
        with_calendar(frame, calendar, "Australia/Melbourne")


def test_min_observed_drops_sparse_targets_from_the_loss():
    rng = np.random.default_rng(9)
    frame = _frame(rng, n=120)
    values = frame.values.copy()
    values[:100, 0] = np.nan
    values[rng.integers(0, 100, size=3), 0] = rng.normal(100.0, 10.0, size=3)  # "a": a few observed steps
    frame = SeriesFrame(item_id="0", timestamps=frame.timestamps, values=values, schema=frame.schema)
    C, H = 96, 8
    kept = WindowDataset([frame], C, H, min_observed=0.0)
    cut = WindowDataset([frame], C, H, min_observed=0.25)
    dropped = 0
    for i in range(kept.n_windows):
        full, part = kept[i], cut[i]
        sparse = full["context_mask"].float().mean(0) < 0.25  # [V]
        assert part["context_mask"].equal(full["context_mask"]) and part["context"].equal(full["context"])
        assert part["horizon_mask"].equal(full["horizon_mask"] & ~sparse)
        dropped += int(sparse[0])
        assert not sparse[1]  # "b" is always observed
    assert dropped > 0  # the windows ending near step 100 see "a" on a few steps only


@pytest.mark.parametrize("bad", [-0.1, 1.5, "half", True])
def test_min_observed_rejects_bad_values(bad):
    with pytest.raises(DataValidationError, match=r"data\.train_min_observed"):
        WindowDataset([_frame(np.random.default_rng(10))], 24, 8, min_observed=bad)


def test_eval_config_sets_our_learning_rate_and_overrides_win():
    from hydra import compose, initialize_config_module

    with initialize_config_module("tsfm_msa.configs", version_base=None):
        ped = compose("evaluate", overrides=["data=pedestrian", "eval=pedestrian"])
        given = compose("evaluate", overrides=["data=pedestrian", "eval=pedestrian", "optim.lr=1e-3"])
        quick = compose("evaluate", overrides=["data=pedestrian"])
    assert ped.optim.lr == 4e-3 and ped.data.context_len == 504 and ped.models.dense.patch_len == 24
    assert given.optim.lr == 1e-3 and quick.optim.lr == 2e-3
