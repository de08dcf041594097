"""StreamingForecaster: incremental updates equal a full forward over the same history.

CPU, fp32, the references behind the dispatcher. Every model here has several KV blocks per sensor
group and top_k below the block count, so MSA selection is really sparse.
"""
import numpy as np
import pandas as pd
import pytest
import torch
from helpers import small_model

from tsfm_msa import StreamingForecaster, rolling_forecasts
from tsfm_msa.datasets.schema import SeriesSchema, Variate
from tsfm_msa.model.transformer import PatchTransformer
from tsfm_msa.streaming import StreamCapacityError, StreamInputError, full_forecast

SCHEMA3 = SeriesSchema(variates=(Variate("y", "target", "target"), Variate("p", "past_covariate", "past"),
                                 Variate("f", "future_covariate", "future")), freq="h")
HORIZON = 20
CASES = [("dense", "free"), ("msa", "free"), ("msa", "sensor"), ("msa", "hybrid")]


def _data(seed: int, rows: int, n_var: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n_var, generator=g).double() * 3 + 10
    x[torch.rand(rows, n_var, generator=g) < 0.05] = float("nan")  # missing observations
    return x


def _frame(x: torch.Tensor, start: str = "2024-01-01", names=("y", "p", "f")) -> pd.DataFrame:
    return pd.DataFrame(x.numpy(), columns=list(names), index=pd.date_range(start, periods=len(x), freq="h"))


def _reference(stream: StreamingForecaster, history: torch.Tensor, future: np.ndarray | None = None) -> torch.Tensor:
    """A full forward over the completed patches with the stream's frozen scale, in data units."""
    c = stream.n_patches * stream.patch_len
    scaled_future = None
    if future is not None:
        known = np.full((stream.horizon, stream.n_var), np.nan)
        known[:len(future), stream.future_index] = future
        scaled_future = stream.scaled(known)
    q = full_forecast(stream.model, stream.scaled(history[:c]), stream.horizon, scaled_future)
    t = stream.target_index
    return q * stream.scale[t, None, None] + stream.loc[t, None, None]


def _snapshot(stream: StreamingForecaster):
    return (stream.n_patches, stream.cached_tokens, stream.n_steps, stream.last_stamp, stream.pending.copy(),
            stream._k_time.clone(), [k.clone() for k in stream._k], [k.clone() for k in stream._ki],
            stream._block_group.clone())


def _assert_unchanged(before, stream):
    after = _snapshot(stream)
    assert before[:4] == after[:4]
    assert np.array_equal(before[4], after[4], equal_nan=True)
    for a, b in zip(before[5:], after[5:]):
        if isinstance(a, list):
            assert all(torch.equal(x, y) for x, y in zip(a, b))
        else:
            assert torch.equal(a, b)


@pytest.mark.parametrize("attention,policy", CASES)
def test_stream_equals_full_forward_after_many_updates(attention, policy):
    torch.manual_seed(0)
    model = small_model(attention, policy, top_k=3, n_kv_heads=3, seed=1)
    data = _data(2, 420)
    stream = StreamingForecaster(model, _frame(data[:101]), schema=SCHEMA3, horizon=HORIZON, prefill_patches=4)
    # Updates of every size: partial patches, exact patches, several patches at once.
    ends = [103, 109, 117, 117 + 8, 150, 151, 152, 200, 263, 300, 301, 344, 420]
    for end in ends:
        stream.update(_frame(data[stream.n_steps:end], start=str(pd.Timestamp("2024-01-01") + pd.Timedelta(hours=stream.n_steps))))
        got = stream.forecast().quantiles
        torch.testing.assert_close(got, _reference(stream, data), atol=1e-4, rtol=1e-5)
    assert stream.n_patches == 420 // 8 and len(stream.pending) == 420 % 8
    if attention == "msa":
        n_blocks = stream.cached_tokens // stream.block_size
        assert n_blocks > 4 * 3, "selection must be sparse in this test"


@pytest.mark.parametrize("policy", ["free", "sensor"])
def test_stream_with_several_variates_per_group_and_known_future(policy):
    """Groups of 2-3 variates (tokens of one time share blocks, block boundaries inside a time step),
    a known-future covariate given at forecast time, and a visible future plan."""
    roles = ["target", "target", "past_covariate", "future_covariate", "action", "past_covariate"]
    groups = [0, 0, 1, 1, 2, 2]
    schema = SeriesSchema(variates=tuple(Variate(n, r, ["a", "b", "c"][g]) for n, r, g in
                                         zip("uvwxyz", roles, groups)), freq="h")
    torch.manual_seed(3)
    model = PatchTransformer(roles, groups, ["a", "b", "c"], patch_len=4, d_model=32, n_layers=2, n_heads=6,
                             n_kv_heads=3, head_dim=8, block_size=8, top_k=3, index_dim=8, group_policy=policy,
                             attention=["msa", "dense"], future_covariates_visible=True).eval()
    data = _data(4, 200, n_var=6)
    stream = StreamingForecaster(model, data[:42], schema=schema, horizon=10)
    g = torch.Generator().manual_seed(5)
    for end in (50, 63, 64, 91, 130, 200):
        stream.update(data[stream.n_steps:end])
        future = torch.randn(7, 2, generator=g).double().numpy()  # 7 of 10 horizon steps known
        got = stream.forecast(future=future).quantiles
        torch.testing.assert_close(got, _reference(stream, data, future), atol=1e-4, rtol=1e-5)
    part = stream.forecast(prediction_length=3).quantiles
    torch.testing.assert_close(part, stream.forecast().quantiles[:, :3])


def test_scale_is_frozen_and_level_shift_stays_correct():
    model = small_model("msa", "free", top_k=3, n_kv_heads=3, seed=2)
    data = _data(6, 300)
    stream = StreamingForecaster(model, data[:96], schema=SCHEMA3, horizon=HORIZON)
    loc, scale = stream.loc.clone(), stream.scale.clone()
    data[150:, 0] += 1000.0  # a level shift of the target, ~300 standard deviations
    for end in (160, 200, 300):
        stream.update(data[stream.n_steps:end])
        got = stream.forecast().quantiles
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, _reference(stream, data), atol=1e-3, rtol=1e-5)
    assert torch.equal(stream.loc, loc) and torch.equal(stream.scale, scale)
    # The frozen scale differs from a refit on the shifted window: that is what keeps the cache valid.
    from tsfm_msa.datasets.scaling import fit_scaler
    refit_loc, _ = fit_scaler(data[-96:], torch.zeros(3, dtype=torch.bool))
    assert abs(float(refit_loc[0] - loc[0])) > 500


def test_nan_observations_are_masked_not_propagated():
    model = small_model("msa", "hybrid", top_k=3, n_kv_heads=3, seed=3)
    data = _data(7, 240)
    data[100:140, 1] = float("nan")  # a whole covariate outage
    data[120:124, 0] = float("nan")
    stream = StreamingForecaster(model, data[:96], schema=SCHEMA3, horizon=HORIZON)
    stream.update(data[96:240])
    got = stream.forecast().quantiles
    assert torch.isfinite(got).all()
    assert all(torch.isfinite(k).all() for k in stream._k)
    torch.testing.assert_close(got, _reference(stream, data), atol=1e-4, rtol=1e-5)


def test_bad_updates_are_refused_and_leave_the_cache_unchanged():
    model = small_model("msa", "sensor", top_k=3, n_kv_heads=3, seed=4)
    data = _data(8, 200)
    stream = StreamingForecaster(model, _frame(data[:99]), schema=SCHEMA3, horizon=HORIZON)
    before = _snapshot(stream)
    nxt = pd.Timestamp("2024-01-01") + pd.Timedelta(hours=99)
    good = _frame(data[99:110], start=str(nxt))
    cases = {
        "missing \\['f'\\]": good.drop(columns=["f"]),
        "unexpected \\['extra'\\]": good.assign(extra=1.0),
        "unexpected \\['Y'\\]": good.rename(columns={"y": "Y"}),
        "goes backwards": _frame(data[99:110], start=str(nxt - pd.Timedelta(hours=5))),
        "repeats": pd.concat([good.iloc[:3], good.iloc[2:3], good.iloc[3:]]),
        "skips": _frame(data[99:110], start=str(nxt + pd.Timedelta(hours=2))),
        "tensors \\[T, V\\]|frame indexed by time": data[99:110],
    }
    for message, rows in cases.items():
        with pytest.raises(StreamInputError, match=message):
            stream.update(rows)
        _assert_unchanged(before, stream)
    with pytest.raises(StreamInputError, match="prediction_length=21"):
        stream.forecast(prediction_length=HORIZON + 1)
    _assert_unchanged(before, stream)
    # After all the refusals the stream still matches the full forward.
    stream.update(good)
    torch.testing.assert_close(stream.forecast().quantiles, _reference(stream, data), atol=1e-4, rtol=1e-5)


def test_tensor_stream_checks_width():
    model = small_model("dense", seed=5)
    data = _data(9, 120)
    stream = StreamingForecaster(model, data[:40], schema=SCHEMA3, horizon=HORIZON)
    before = _snapshot(stream)
    with pytest.raises(StreamInputError, match=r"\[T, V=3\]"):
        stream.update(data[40:50, :2])
    _assert_unchanged(before, stream)


def test_capacity_limit_errors_and_keeps_the_cache():
    model = small_model("msa", "free", top_k=3, n_kv_heads=3, seed=6)
    data = _data(10, 400)
    stream = StreamingForecaster(model, data[:96], schema=SCHEMA3, horizon=HORIZON, max_tokens=64)
    stream.update(data[96:128])  # 16 patches x 3 groups of one variate: 3 x 2 blocks of 8 = 48 slots
    assert stream.cached_tokens == 48
    before = _snapshot(stream)
    with pytest.raises(StreamCapacityError, match="max_tokens=64"):
        stream.update(data[128:136])  # the 17th patch opens 3 blocks: 72 slots
    _assert_unchanged(before, stream)


def test_forecast_does_not_change_the_cache_and_failures_roll_back(monkeypatch):
    model = small_model("msa", "free", top_k=3, n_kv_heads=3, seed=7)
    data = _data(11, 200)
    stream = StreamingForecaster(model, data[:100], schema=SCHEMA3, horizon=HORIZON)
    before = _snapshot(stream)
    first = stream.forecast().quantiles
    assert torch.equal(stream._k_time, before[5]) and stream.cached_tokens == before[1]
    torch.testing.assert_close(stream.forecast().quantiles, first)
    # A failure inside a layer (here: the kernel) leaves the committed cache as it was.
    from tsfm_msa import kernels

    def boom(*args, **kwargs):
        raise RuntimeError("kernel failed")

    monkeypatch.setattr(kernels, "decode_attention", boom)
    with pytest.raises(RuntimeError, match="kernel failed"):
        stream.update(data[100:140])
    monkeypatch.undo()
    after = _snapshot(stream)
    assert before[:3] == after[:3] and torch.equal(before[5], after[5])
    stream.update(data[100:140])
    torch.testing.assert_close(stream.forecast().quantiles, _reference(stream, data), atol=1e-4, rtol=1e-5)


def test_forecast_frame_has_timestamps_after_the_last_patch():
    model = small_model("dense", seed=8)
    data = _data(12, 100)
    stream = StreamingForecaster(model, _frame(data[:45]), schema=SCHEMA3, horizon=HORIZON)
    fc = stream.forecast()
    frame = fc.to_frame()
    assert fc.index[0] == pd.Timestamp("2024-01-01") + pd.Timedelta(hours=40)  # 5 patches of 8, 5 rows pending
    assert list(frame.columns[1:]) == [str(q) for q in fc.levels] and len(frame) == HORIZON


@pytest.mark.parametrize("attention,policy", [("msa", "sensor"), ("dense", "free")])
def test_rolling_forecasts_stream_equals_windowed(attention, policy):
    model = small_model(attention, policy, top_k=3, n_kv_heads=3, seed=9)
    data = _data(13, 400)
    origins = [200 + 24 * i for i in range(6)]
    stream = rolling_forecasts(model, _frame(data), origins, schema=SCHEMA3, horizon=HORIZON, start=40)
    windowed = rolling_forecasts(model, _frame(data), origins, schema=SCHEMA3, horizon=HORIZON, start=40,
                                 mode="windowed")
    assert stream.quantiles.shape == (6, 1, HORIZON, 9)
    torch.testing.assert_close(stream.quantiles, windowed.quantiles, atol=1e-4, rtol=1e-5)
    with pytest.raises(StreamInputError, match="patch boundary"):
        rolling_forecasts(model, _frame(data), [203], schema=SCHEMA3, horizon=HORIZON, start=40)


@pytest.mark.skipif(__import__("os").environ.get("TRITON_INTERPRET") != "1", reason="runs the kernels in the interpreter")
def test_stream_through_the_triton_decode_kernels_matches_the_reference_path():
    pytest.importorskip("triton")
    from tsfm_msa.kernels import dispatch

    model = small_model("msa", "hybrid", top_k=3, n_kv_heads=3, seed=10)
    data = _data(14, 120)
    ref = StreamingForecaster(model, data[:64], schema=SCHEMA3, horizon=HORIZON)
    ref.update(data[64:120])
    dispatch.set_backend("triton")
    try:
        tri = StreamingForecaster(model, data[:64], schema=SCHEMA3, horizon=HORIZON, prefill_patches=5)
        tri.update(data[64:120])
        got = tri.forecast().quantiles
    finally:
        dispatch.set_backend("auto")
    torch.testing.assert_close(got, ref.forecast().quantiles, atol=1e-4, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or __import__("os").environ.get("TRITON_INTERPRET") == "1",
                    reason="needs CUDA (and no interpreter)")
@pytest.mark.parametrize("attention,policy", CASES)
def test_stream_equals_full_forward_on_gpu(attention, policy):
    """fp32 on CUDA: the stream runs the Triton decode kernels, the full forward the training kernels."""
    model = small_model(attention, policy, top_k=3, n_kv_heads=3, seed=11).cuda()
    data = _data(15, 600)
    stream = StreamingForecaster(model, data[:200], schema=SCHEMA3, horizon=HORIZON)
    for end in (233, 300, 420, 600):
        stream.update(data[stream.n_steps:end])
        torch.testing.assert_close(stream.forecast().quantiles, _reference(stream, data), atol=2e-3, rtol=1e-4)


def test_rolling_results_convert_to_gluonts_quantile_forecasts():
    pytest.importorskip("gluonts")
    from tsfm_msa.streaming import rolling_quantile_forecasts

    model = small_model("msa", "free", top_k=3, n_kv_heads=3, seed=12)
    frame = _frame(_data(16, 300))
    result = rolling_forecasts(model, frame, [200, 224, 248], schema=SCHEMA3, horizon=HORIZON, start=40)
    levels = tuple(model.quantile_levels.tolist())
    forecasts = rolling_quantile_forecasts(result, frame.index, levels, item_id="a")
    assert [f.start_date.to_timestamp() for f in forecasts] == [frame.index[o] for o in (200, 224, 248)]
    median = forecasts[1].quantile(0.5)
    np.testing.assert_allclose(median, result.quantiles[1, 0, :, 4].numpy(), rtol=1e-6)
    assert forecasts[0].prediction_length == HORIZON


def test_forecast_module_gives_schema_and_horizon():
    from tsfm_msa.train.lightning_module import ForecastModule

    config = dict(patch_len=8, d_model=32, n_layers=2, n_heads=6, n_kv_heads=3, head_dim=8, block_size=8, top_k=3,
                  index_dim=8, group_policy="sensor", attention="msa")
    torch.manual_seed(13)
    module = ForecastModule(model_config=config, schema=SCHEMA3.to_dict(), context_len=96, horizon=HORIZON).eval()
    data = _data(17, 200)
    stream = StreamingForecaster(module, _frame(data[:96]))
    stream.update(_frame(data[96:200], start=str(pd.Timestamp("2024-01-01") + pd.Timedelta(hours=96))))
    assert stream.horizon == HORIZON and stream.schema == SCHEMA3
    torch.testing.assert_close(stream.forecast().quantiles, _reference(stream, data), atol=1e-4, rtol=1e-5)
