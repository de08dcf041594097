"""tsfm_msa.datasets: validation, loaders, scaling, windows, splits, DataModule (CPU, fast)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from tsfm_msa.datasets import (
    DataValidationError,
    SeriesDataModule,
    SeriesFrame,
    SeriesSchema,
    Variate,
    WindowDataset,
    apply_scaler,
    fit_scaler,
    from_csv,
    from_gluonts,
    from_pandas,
    from_parquet,
    invert_scaler,
    load_bundled,
    load_epf,
    load_pedestrian,
    load_vic_elec,
    make_synthetic,
    seasonal_naive_mae,
    split_by_time,
    validate_collection,
)

RNG = np.random.default_rng(20240611)


def _df(n: int = 200, freq: str = "h") -> pd.DataFrame:
    """Fresh random wide frame: target y, past covariate temp, future covariate promo (0/1), action u."""
    return pd.DataFrame(
        {
            "time": pd.date_range("2023-03-01", periods=n, freq=freq),
            "y": RNG.normal(10, 2, n),
            "temp": RNG.normal(0, 1, n),
            "promo": RNG.integers(0, 2, n),
            "u": RNG.normal(0, 1, n),
        }
    )


def _frame(df: pd.DataFrame | None = None, **kw) -> SeriesFrame:
    args = dict(timestamp="time", targets=["y"], past_covariates=["temp"], future_covariates=["promo"], actions=["u"])
    args.update(kw)
    return SeriesFrame.from_dataframe(_df() if df is None else df, **args)


# --------------------------------------------------------------------------------------------- frames


def test_frame_from_dataframe_layout_and_schema():
    df = _df()
    f = _frame(df, groups={"u": "plant", "temp": "plant"})
    s = f.schema
    assert f.values.dtype == np.float32 and f.values.shape == (200, 4)
    assert s.names == ("y", "temp", "promo", "u")
    assert s.roles == ("target", "past_covariate", "future_covariate", "action")
    assert s.group_names == ("target", "plant", "future_covariate")
    assert s.group_index == (0, 1, 2, 1)
    assert s.target_indices == (0,) and s.n_variates == 4 and s.freq == "h"
    assert s.known_future == (False, False, True, True)
    assert s.binary == (False, False, True, False)  # promo is 0/1
    np.testing.assert_allclose(f.column("temp"), df["temp"].to_numpy(np.float32))
    d = json.loads(json.dumps(s.to_dict()))
    assert SeriesSchema.from_dict(d) == s and SeriesSchema.from_dict(d).binary == s.binary


def test_booleans_become_binary_01():
    df = _df(50)
    df["promo"] = np.where(RNG.random(50) < 0.5, "TRUE", "FALSE")
    df["u"] = RNG.random(50) < 0.3  # bool dtype
    f = _frame(df)
    assert set(np.unique(f.column("promo"))) <= {0.0, 1.0}
    np.testing.assert_array_equal(f.column("u"), df["u"].to_numpy(np.float32))
    assert f.schema.binary == (False, False, True, True)


@pytest.mark.parametrize(
    "mutate, kw, match",
    [
        (None, dict(targets=["y", "nope"]),
         r"columns \['nope'\] \(named in data.loader.targets\) not found.*available columns are \['time', 'y'"),
        (None, dict(targets=[]), r"no target variates given \(data.loader.targets is empty\)"),
        (None, dict(past_covariates=["temp", "y"]),
         r"'y' is listed both in data.loader.targets and in data.loader.past_covariates"),
        (None, dict(groups={"ghost": "g"}), r"data.loader.groups has keys \['ghost'\].*must be among"),
        (lambda d: d.assign(temp=["a"] + ["1.0"] * (len(d) - 1)), {},
         r"'temp' \(past_covariate\) is not numeric.*'a' at row 0"),
        (lambda d: d.assign(y=np.nan), {}, r"'y' \(target\) of item '0' has no observed values"),
        (lambda d: d.assign(y=3.5), {}, r"target 'y' of item '0' is constant"),
        (lambda d: d.iloc[[0, 2, 1, *range(3, len(d))]], dict(sort_by_time=False),
         r"not in increasing order: row 2.*data.loader.sort_by_time=true"),
        (lambda d: pd.concat([d.iloc[:5], d.iloc[4:]]), {}, r"duplicate timestamps: 2023-03-01 04:00:00"),
        (lambda d: d.drop(index=[7]), {},
         r"not on a regular 'h' grid.*1 of 200 steps are absent.*comes 2023-03-01 08:00:00.*data.loader.freq.*"
         r"data.loader.fill_missing_steps=true"),
        (lambda d: d.assign(time=d["time"].astype(str).where(d.index != 3, "garbage")), {}, r"cannot be parsed"),
    ],
)
def test_validation_errors(mutate, kw, match):
    df = _df()
    if mutate is not None:
        df = mutate(df)
    with pytest.raises(DataValidationError, match=match):
        _frame(df, **kw)


def test_constant_covariate_allowed_and_inf_becomes_nan():
    df = _df().assign(temp=2.0)
    df.loc[5, "u"] = np.inf
    with pytest.warns(UserWarning, match=r"infinite values in \['u'\]"):
        f = _frame(df)
    assert np.isnan(f.column("u")[5]) and not np.isinf(f.values).any()


def test_gaps_filled_on_request_and_explicit_freq():
    df = _df(100).drop(index=[10, 11, 50])
    with pytest.warns(UserWarning, match=r"inserted 3 missing time steps as NaN \(3.0% of the 100-step"):
        f = _frame(df, fill_missing_steps=True)
    assert f.length == 100 and np.isnan(f.values[[10, 11, 50]]).all()
    assert not np.isnan(f.values[12]).any()
    with pytest.raises(DataValidationError, match=r"grid \(freq given as data.loader.freq=30min\): the data's median "
                       r"spacing is 1h but freq '30min' steps 30min, and freq must match the data's spacing: set "
                       r"data.loader.freq=1h"):
        _frame(_df(100), freq="30min")
    with pytest.raises(DataValidationError, match=r"^item '0': timestamps are not on a regular 'D' grid and "
                       r"fill_missing_steps cannot help: the data's median spacing is 1h but freq 'D' steps 1D"):
        _frame(_df(100), freq="D", fill_missing_steps=True)


def test_schema_compatibility_messages():
    a = _frame().schema
    roles = {"u": "past_covariate"}
    b = SeriesSchema(tuple(Variate(v.name, roles.get(v.name, v.role), v.group) for v in a.variates), "30min")
    with pytest.raises(ValueError, match=r"role of 'u' differs.*frequency differs: expected 'h', got '30min'"):
        a.check_compatible(b)
    c = SeriesSchema((Variate("y", "target", "target"),), "h")
    with pytest.raises(DataValidationError, match=r"variates differ.*missing \['temp', 'promo', 'u'\]"):
        a.check_compatible(c)
    a.check_compatible(SeriesSchema.from_dict(a.to_dict()))
    f1, f2 = _frame(), _frame(item_id="1", targets=["y", "temp"], past_covariates=[])
    with pytest.raises(DataValidationError, match=r"item '1' does not match item '0'"):
        validate_collection([f1, f2])
    with pytest.raises(DataValidationError, match=r"item id '0' appears more than once"):
        validate_collection([f1, _frame()])


# --------------------------------------------------------------------------------------------- scaling


def _nanmean(x: np.ndarray) -> np.ndarray:
    n = (~np.isnan(x)).sum(axis=1)
    return np.where(n > 0, np.nansum(x.astype(np.float64), axis=1) / np.maximum(n, 1), 0.0)


def _nanstd(x: np.ndarray) -> np.ndarray:
    d = x.astype(np.float64) - _nanmean(x)[:, None, :]
    n = (~np.isnan(x)).sum(axis=1)
    return np.sqrt(np.nansum(d * d, axis=1) / np.maximum(n, 1))


def test_scaler_round_trip_with_nans_numpy_and_torch():
    x = (RNG.normal(0, 1, (4, 64, 5)) * RNG.uniform(0.1, 300, 5) + RNG.uniform(-1e3, 1e3, 5)).astype(np.float32)
    x[RNG.random(x.shape) < 0.2] = np.nan
    x[1, :, 2] = np.nan  # a variate never observed in one window
    binary = np.array([False, False, False, False, True])
    x[..., 4] = np.where(np.isnan(x[..., 4]), np.nan, RNG.integers(0, 2, x.shape[:2]))
    loc, scale = fit_scaler(x, binary)  # [4, 5]
    assert loc.shape == (4, 5) and loc.dtype == np.float32
    seen = ~np.isnan(x).all(axis=1)  # [4, 5] variate observed in the window
    np.testing.assert_allclose(loc[:, :4], _nanmean(x)[:, :4], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(scale[:, :4][seen[:, :4]], _nanstd(x)[:, :4][seen[:, :4]], rtol=1e-4)
    assert loc[1, 2] == 0 and scale[1, 2] == 1  # nothing observed
    assert (loc[:, 4] == 0).all() and (scale[:, 4] == 1).all()  # binary left alone
    y = apply_scaler(x, loc, scale)
    obs = ~np.isnan(x[..., :4])
    np.testing.assert_allclose(np.nanmean(y[[0, 2, 3], :, :4], axis=1), 0, atol=1e-4)
    np.testing.assert_allclose(invert_scaler(y, loc, scale)[..., :4][obs], x[..., :4][obs], rtol=1e-5, atol=1e-2)
    lt, st = fit_scaler(torch.from_numpy(x), binary)
    np.testing.assert_allclose(lt.numpy(), loc, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(st.numpy(), scale, rtol=1e-5)
    yt = apply_scaler(torch.from_numpy(x), lt, st)
    np.testing.assert_allclose(invert_scaler(yt, lt, st).numpy()[..., :4][obs], x[..., :4][obs], rtol=1e-5, atol=1e-2)


def test_scaler_constant_and_zero_windows_do_not_divide_by_zero():
    c = float(RNG.uniform(100, 200))
    x = np.stack([np.full(32, c), np.zeros(32)], axis=1).astype(np.float32)  # [32, 2]
    loc, scale = fit_scaler(x)
    assert np.isfinite(scale).all() and (scale > 0).all()
    assert scale[0] == pytest.approx(1e-3 * c, rel=1e-5) and scale[1] == 1.0
    assert np.isfinite(apply_scaler(x + 1, loc, scale)).all()


# --------------------------------------------------------------------------------------------- windows


def _ramp_frames(lengths=(120, 90), V=3) -> list[SeriesFrame]:
    """Value = step index (+ random offset per variate) so positions can be read back from values."""
    schema = SeriesSchema((Variate("y", "target", "target"), Variate("x", "past_covariate", "p"),
                           Variate("z", "future_covariate", "f")), "D")
    frames = []
    for i, T in enumerate(lengths):
        vals = np.arange(T, dtype=np.float32)[:, None] + RNG.uniform(0, 0.5, V).astype(np.float32)  # [T, V]
        vals[RNG.random(vals.shape) < 0.05] = np.nan
        vals[0, 0] = 0.0
        frames.append(SeriesFrame(str(i), pd.date_range("2020-01-01", periods=T, freq="D"), vals, schema))
    return frames


def test_window_shapes_origins_masks_and_causality():
    frames = _ramp_frames()
    C, H = 16, 5
    ds = WindowDataset(frames, C, H, stride=3, scale=False)
    items, origins = ds.window_index()
    assert len(ds) == ds.n_windows == len(items)
    assert origins[items == 0][0] == C and origins[items == 0][-1] <= 120 - H
    assert np.all(np.diff(origins[items == 0]) == 3)
    for k in RNG.choice(len(ds), 20, replace=False):
        b = ds[int(k)]
        assert b["context"].shape == (C, 3) and b["horizon"].shape == (H, 3)
        assert b["context"].dtype == torch.float32 and b["context_mask"].dtype == torch.bool
        assert b["loc"].shape == (3,) and b["item_index"].dtype == torch.int64 and b["origin"].shape == ()
        i, t = int(b["item_index"]), int(b["origin"])
        raw = frames[i].values
        np.testing.assert_array_equal(b["context_mask"].numpy(), ~np.isnan(raw[t - C : t]))
        np.testing.assert_array_equal(b["horizon_mask"].numpy(), ~np.isnan(raw[t : t + H]))
        # causality: every observed context value comes from a step < t, every horizon value from >= t
        ctx = b["context"].numpy()[b["context_mask"].numpy()]
        hor = b["horizon"].numpy()[b["horizon_mask"].numpy()]
        assert ctx.max() < t and hor.min() >= t
        assert (b["context"].numpy()[~b["context_mask"].numpy()] == 0).all()


def test_window_scaling_uses_context_statistics_only():
    frames = _ramp_frames((200,))
    ds = WindowDataset(frames, 32, 8)
    b = ds[40]
    t = int(b["origin"])
    raw = frames[0].values[t - 32 : t + 8]
    loc, scale = fit_scaler(raw[:32])
    np.testing.assert_allclose(b["loc"].numpy(), loc, rtol=1e-6)
    h = invert_scaler(b["horizon"].numpy(), b["loc"].numpy(), b["scale"].numpy())
    m = b["horizon_mask"].numpy()
    np.testing.assert_allclose(h[m], raw[32:][m], rtol=1e-5)


def test_left_padding_with_min_context():
    frames = _ramp_frames((60,))
    ds = WindowDataset(frames, 32, 4, min_context=8, scale=False)
    assert ds.window_index()[1][0] == 8
    b = ds[0]
    assert not b["context_mask"][:24].any() and (b["context"][:24] == 0).all()
    np.testing.assert_array_equal(b["context_mask"][24:].numpy(), ~np.isnan(frames[0].values[:8]))


def test_window_errors():
    frames = _ramp_frames((50, 30))
    with pytest.raises(DataValidationError, match=r"item '1' has 30 steps, but a window needs at least 36"):
        WindowDataset(frames, 32, 4)
    for bad in (dict(context_len=0), dict(horizon=-1), dict(stride=0)):
        args = dict(context_len=8, horizon=4, stride=1) | bad
        with pytest.raises(DataValidationError, match=rf"{next(iter(bad))} must be a positive integer"):
            WindowDataset(frames, **args)
    with pytest.raises(DataValidationError, match=r"split 'val' has no full window: item '0': 3 steps"):
        WindowDataset(frames, 8, 4, time_ranges=[range(47, 50), range(27, 30)], split="val")


def test_random_mode_seeded_and_epoch_dependent():
    frames = _ramp_frames((300, 200))
    mk = lambda seed: WindowDataset(frames, 16, 4, mode="random", samples_per_epoch=64, seed=seed)  # noqa: E731
    a, b = mk(1), mk(1)
    oa = [int(a[i]["origin"]) for i in range(64)]
    assert len(a) == 64 and oa == [int(b[i]["origin"]) for i in range(64)]
    a.set_epoch(1)
    assert oa != [int(a[i]["origin"]) for i in range(64)]
    assert oa != [int(mk(2)[i]["origin"]) for i in range(64)]


def test_splits_by_time_and_disjoint_horizons():
    frames = _ramp_frames((400, 300))
    sp = split_by_time(frames, 0.2, 0.1)
    assert sp.lengths("test") == (40, 30) and sp.lengths("val") == (80, 60)
    for i, f in enumerate(frames):
        assert sp.train[i].stop == sp.val[i].start and sp.val[i].stop == sp.test[i].start
        assert sp.train[i].start == 0 and sp.test[i].stop == f.length
    steps = {}
    for name in ("train", "val", "test"):
        ds = WindowDataset(frames, 24, 6, time_ranges=sp[name], stride=1, split=name)
        items, origins = ds.window_index()
        steps[name] = {(i, o + h) for i, o in zip(items, origins) for h in range(6)}
        for i in range(len(frames)):
            o = origins[items == i]
            assert o.min() >= sp[name][i].start and o.max() + 6 <= sp[name][i].stop
    assert not (steps["train"] & steps["val"]) and not (steps["val"] & steps["test"])
    assert not (steps["train"] & steps["test"])
    sp2 = split_by_time(frames, val_length=50, test_length=25)
    assert sp2.lengths("val") == (50, 50) and sp2.lengths("test") == (25, 25)
    with pytest.raises(DataValidationError, match=r"item '1' has 300 steps, not enough"):
        split_by_time(frames, val_length=200, test_length=100)


# --------------------------------------------------------------------------------------------- loaders


def test_bundled_loaders():
    (v,) = load_vic_elec()
    assert v.length == 52_608 and v.freq == "30min" and v.schema.names == ("Demand", "Temperature", "Holiday")
    assert v.schema.roles == ("target", "past_covariate", "future_covariate") and v.schema.binary[2]
    assert (v.timestamps[1:] - v.timestamps[:-1] == pd.Timedelta("30min")).all()
    assert v.timestamps[0] == pd.Timestamp("2011-12-31 13:00")  # UTC wall clock
    epf = load_epf()
    assert [f.item_id for f in epf] == ["FR", "BE"] and all(f.length == 16_080 and f.freq == "h" for f in epf)
    assert epf[0].schema.roles == ("target", "past_covariate", "future_covariate", "future_covariate")
    (p,) = load_pedestrian()
    assert p.freq == "h" and p.length == 17_544 and p.schema.n_variates == 4
    assert set(p.schema.roles) == {"target"} and p.schema.group_names == p.schema.names
    assert np.isnan(p.values).any(axis=0).all()  # every sensor has gaps
    assert load_bundled("epf")[1].item_id == "BE"
    with pytest.raises(DataValidationError, match=r"unknown bundled dataset 'm4'; available: \['epf', 'pedestrian'"):
        load_bundled("m4")


def _two_item_wide() -> pd.DataFrame:
    a, b = _df(60), _df(60)
    b["time"] = b["time"] + pd.Timedelta("3h")
    return pd.concat([a.assign(store="b-first"), b.assign(store="a-second")], ignore_index=True)


def test_long_and_wide_give_same_frames():
    wide = _two_item_wide()
    kw = dict(timestamp="time", item_id="store", targets=["y"], past_covariates=["temp"], future_covariates=["promo"])
    fw = from_pandas(wide, **kw)
    long = wide.melt(id_vars=["store", "time"], value_vars=["y", "temp", "promo", "u"], var_name="var",
                     value_name="val")
    long = long.sample(frac=1.0, random_state=3)  # row order of long data carries no meaning
    fl = from_pandas(long, format="long", variable_col="var", value_col="val", **kw)
    assert [f.item_id for f in fw] == [f.item_id for f in fl] == ["b-first", "a-second"]
    for a, b in zip(fw, fl):
        assert a.schema == b.schema and a.schema.binary == b.schema.binary
        assert a.timestamps.equals(b.timestamps)
        np.testing.assert_array_equal(a.values, b.values)
    with pytest.raises(DataValidationError,
                       match=r"variates \[.nope.\] \(named in data.loader.targets.*not found in column .var. "
                             r"\(data.loader.variable_col\)"):
        from_pandas(long, format="long", variable_col="var", value_col="val", **(kw | dict(targets=["nope"])))
    dup = pd.concat([long, long.iloc[:1]])
    with pytest.raises(DataValidationError, match=r"duplicate timestamps in long data"):
        from_pandas(dup, format="long", variable_col="var", value_col="val", **kw)


def test_csv_and_parquet_round_trip(tmp_path):
    wide = _two_item_wide()
    kw = dict(timestamp="time", item_id="store", targets=["y"], past_covariates=["temp"], actions=["u"],
              future_covariates=["promo"])
    ref = from_pandas(wide, **kw)
    wide.to_csv(tmp_path / "d.csv", index=False)
    wide.to_parquet(tmp_path / "d.parquet", index=False)
    for got in (from_csv(tmp_path / "d.csv", **kw), from_parquet(tmp_path / "d.parquet", **kw)):
        for a, b in zip(ref, got):
            assert a.schema == b.schema and a.timestamps.equals(b.timestamps)
            np.testing.assert_allclose(a.values, b.values)
    out = pd.concat([f.to_dataframe(item_col="store", timestamp="time") for f in ref])
    out.to_csv(tmp_path / "e.csv", index=False)
    np.testing.assert_allclose(from_csv(tmp_path / "e.csv", **kw)[1].values, ref[1].values)
    with pytest.raises(FileNotFoundError, match=r"from_csv: no such file"):
        from_csv(tmp_path / "missing.csv", **kw)


def test_from_gluonts_list_dataset():
    from gluonts.dataset.common import ListDataset

    T = 80
    entries = [
        {"start": "2021-05-01", "target": RNG.normal(5, 1, T), "item_id": f"s{i}",
         "feat_dynamic_real": RNG.normal(0, 1, (2, T + 12)), "past_feat_dynamic_real": RNG.normal(0, 1, (1, T))}
        for i in range(3)
    ]
    frames = from_gluonts(ListDataset(entries, freq="h"))
    assert [f.item_id for f in frames] == ["s0", "s1", "s2"]
    f = frames[1]
    assert f.freq == "h" and f.length == T and f.timestamps[0] == pd.Timestamp("2021-05-01")
    assert f.schema.names == ("target", "past_feat_dynamic_real_0", "feat_dynamic_real_0", "feat_dynamic_real_1")
    assert f.schema.roles == ("target", "past_covariate", "future_covariate", "future_covariate")
    np.testing.assert_allclose(f.values[:, 2], entries[1]["feat_dynamic_real"][0, :T], rtol=1e-6)
    g = from_gluonts(ListDataset(entries, freq="h"), target_names=["load"],
                     groups={"load": "site", "feat_dynamic_real_1": "site"})
    assert g[0].schema.names[0] == "load" and g[0].schema.group_index == (0, 1, 2, 0)
    bad = entries[:1] + [{k: v for k, v in entries[1].items() if k != "past_feat_dynamic_real"}]
    with pytest.raises(DataValidationError, match=r"item 's1' has fields \(role, rows\)"):
        from_gluonts(ListDataset(bad, freq="h"))
    mv = from_gluonts(ListDataset([{"start": pd.Period("2020-01", "M"), "target": RNG.normal(0, 1, (3, 30))}],
                                  freq="ME", one_dim_target=False))
    assert mv[0].schema.target_indices == (0, 1, 2) and mv[0].freq == "MS"


# --------------------------------------------------------------------------------------------- synthetic


def test_synthetic_deterministic_and_covariate_effect_at_lag():
    kw = dict(n_items=2, length=3000, n_past_covariates=1, n_future_covariates=1, n_actions=1,
              covariate_effect=1.5, covariate_lag=[6, 0], noise=0.1, action_rate=0.02)
    a, b = make_synthetic(seed=7, **kw), make_synthetic(seed=7, **kw)
    np.testing.assert_array_equal(a[1].values, b[1].values)
    assert not np.array_equal(a[0].values, make_synthetic(seed=8, **kw)[0].values)
    f = a[0]
    assert f.schema.names == ("target", "past_cov_0", "future_cov_0", "action_0")
    assert f.schema.roles == ("target", "past_covariate", "future_covariate", "action") and f.schema.binary[3]
    y, x = f.column("target").astype(float), f.column("past_cov_0").astype(float)
    y = y - pd.Series(y).rolling(24, center=True, min_periods=1).mean().to_numpy()  # remove trend/level
    corr = {lag: np.corrcoef(y[lag:], x[: len(x) - lag])[0, 1] for lag in range(0, 13)}
    assert max(corr, key=corr.get) == 6 and corr[6] > 0.4 and corr[6] - max(corr[0], corr[12]) > 0.2
    u, = np.nonzero(f.column("action_0") == 1)
    assert len(u) > 20


def test_seasonal_naive_mae_zero_on_pure_seasonal():
    frames = make_synthetic(n_items=2, length=1000, trend=0.0, noise=0.0, n_past_covariates=0, n_future_covariates=0,
                            seasonal_periods=(24,), seasonal_amplitude=float(RNG.uniform(1, 5)))
    for H in (12, 60):  # 60 > season: repeats the last season
        ds = WindowDataset(frames, 48, H, stride=7)
        assert seasonal_naive_mae(ds) == pytest.approx(0.0, abs=1e-4)
        assert seasonal_naive_mae(ds, season=5) > 0.5


# --------------------------------------------------------------------------------------------- datamodule


def test_datamodule_end_to_end():
    frames = make_synthetic(n_items=2, length=1200, n_actions=1, seed=int(RNG.integers(1000)))
    dm = SeriesDataModule(frames=frames, context_len=96, horizon=24, val_fraction=0.1, test_fraction=0.1,
                          train_samples_per_epoch=100, batch_size=16, seed=3)
    dm.setup("fit")
    first = dm.dataset("train")
    dm.setup("test")
    assert dm.dataset("train") is first  # idempotent
    assert dm.schema.n_variates == 4 and dm.splits.lengths("val") == (120, 120)
    dl = dm.train_dataloader()
    batches = list(dl)
    assert sum(len(b["origin"]) for b in batches) == 100
    b = batches[0]
    assert b["context"].shape == (16, 96, 4) and b["horizon_mask"].shape == (16, 24, 4) and b["loc"].shape == (16, 4)
    dl.sampler.set_epoch(0)  # what Lightning does each epoch
    assert torch.equal(next(iter(dl))["origin"], b["origin"])
    assert not torch.equal(next(iter(dl))["origin"], b["origin"])  # no set_epoch: the sampler moves on
    vb = next(iter(dm.val_dataloader()))
    assert (vb["origin"] >= 960).all()
    assert len(dm.test_dataloader().dataset) == 2 * (120 // 24)
    assert 0 < dm.seasonal_naive_mae("val") < float("inf")
    dm2 = SeriesDataModule(loader=lambda: frames, context_len=96, horizon=24, test_fraction=0.0)
    assert dm2.test_dataloader() == [] and dm2.schema == dm.schema
    with pytest.raises(DataValidationError, match=r"exactly one of frames"):
        SeriesDataModule(context_len=8, horizon=2)


def test_datamodule_runs_with_lightning_trainer(tmp_path):
    import lightning as L

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(32, 8)
            self.seen: list[torch.Tensor] = []

        def training_step(self, batch, _):
            self.seen.append(batch["origin"].clone())
            pred = self.lin(batch["context"][..., 0])
            return ((pred - batch["horizon"][..., 0]) ** 2 * batch["horizon_mask"][..., 0]).mean()

        def validation_step(self, batch, _):
            pass

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    dm = SeriesDataModule(loader="vic_elec", context_len=32, horizon=8, train_samples_per_epoch=32, batch_size=32,
                          val_length=200, test_length=200)
    model = Tiny()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        limit_val_batches=1)
    trainer.fit(model, datamodule=dm)
    assert len(model.seen) == 2 and not torch.equal(model.seen[0], model.seen[1])  # new windows each epoch
