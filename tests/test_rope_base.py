"""model.rope_base: the RoPE base reaches every attention path (dense, MSA main and index branch, the
probes' dense twin, streaming) and the default keeps the former model exactly."""
import pytest
import torch
from helpers import ROLES3, random_batch, small_model

from tsfm_msa.probes.command import dense_twin
from tsfm_msa import StreamingForecaster
from tsfm_msa.datasets.schema import SeriesSchema, Variate
from tsfm_msa.model.attention import ModelConfigError
from tsfm_msa.model.rope import DEFAULT_ROPE_BASE, apply_rope, rope_angles
from tsfm_msa.model.transformer import PatchTransformer
from tsfm_msa.streaming import full_forecast

CONTEXT, HORIZON = 96, 16


def _forecast(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(batch).quantiles


def _with_base(model: PatchTransformer, base: float, **kwargs) -> PatchTransformer:
    """The same weights in a model with another RoPE base."""
    other = small_model(seed=7, rope_base=base, **kwargs)
    other.load_state_dict(model.state_dict())
    return other


@pytest.mark.parametrize("attention", ["dense", "msa"])
def test_default_base_is_the_former_one_and_another_base_changes_the_forecast(attention):
    batch = random_batch(3, CONTEXT, HORIZON, 3, seed=11)
    model = small_model(attention, seed=5)
    assert all(layer.attention.rope_base == DEFAULT_ROPE_BASE == 10000.0 for layer in model.layers)
    same = _with_base(model, 10000.0, attention=attention)
    torch.testing.assert_close(_forecast(same, batch), _forecast(model, batch), rtol=0, atol=0)
    changed = _forecast(_with_base(model, 64.0, attention=attention), batch)
    assert (changed - _forecast(model, batch)).abs().max() > 1e-3


def test_base_reaches_the_index_branch():
    model = small_model("msa", seed=4)
    layout = model.layout(CONTEXT, HORIZON, torch.device("cpu"))
    x = torch.randn(2, layout.seq_len, 32, generator=torch.Generator().manual_seed(3))  # hidden states
    qi, ki = model.layers[0].attention.index_branch(x, layout)
    qi2, ki2 = _with_base(model, 32.0).layers[0].attention.index_branch(x, layout)
    assert (qi - qi2).abs().max() > 1e-3 and (ki - ki2).abs().max() > 1e-3


def test_dense_twin_keeps_the_base():
    batch = random_batch(2, CONTEXT, HORIZON, 3, seed=12)
    msa = small_model("msa", seed=6, rope_base=48.0)
    dense = small_model("dense", seed=8, rope_base=48.0)
    dense.load_state_dict({k: v for k, v in msa.state_dict().items() if ".index_" not in k})
    twin = dense_twin(msa)
    assert all(layer.attention.rope_base == 48.0 for layer in twin.layers)
    torch.testing.assert_close(_forecast(twin, batch), _forecast(dense, batch))


def test_streaming_uses_the_base():
    schema = SeriesSchema(variates=(Variate("y", "target", "target"), Variate("p", "past_covariate", "past"),
                                    Variate("f", "future_covariate", "future")), freq="h")
    g = torch.Generator().manual_seed(9)
    data = torch.randn(200, 3, generator=g).double() * 3 + 10
    model = small_model("msa", "sensor", seed=10, rope_base=40.0)
    stream = StreamingForecaster(model, data[:120], schema=schema, horizon=HORIZON)
    stream.update(data[120:200])
    c = stream.n_patches * stream.patch_len
    reference = full_forecast(model, stream.scaled(data[:c]), HORIZON)
    t = stream.target_index
    torch.testing.assert_close(stream.forecast().quantiles,
                               reference * stream.scale[t, None, None] + stream.loc[t, None, None], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("base", [32.0, 10000.0])
def test_rotated_scores_depend_on_the_time_difference_only(base):
    g = torch.Generator().manual_seed(13)
    q, k = torch.randn(1, 16, generator=g), torch.randn(1, 16, generator=g)
    times = torch.tensor([3, 10, 40, 47])  # pairs (3, 10) and (40, 47): the same difference
    cos, sin = rope_angles(times, 16, base)
    rq, rk = apply_rope(q.expand(4, 16), cos, sin), apply_rope(k.expand(4, 16), cos, sin)
    torch.testing.assert_close(rq[1] @ rk[0], rq[3] @ rk[2], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("base", [1.0, 0.5, -3.0, "10000", True])
def test_bad_base_is_a_one_line_model_error(base):
    with pytest.raises(ModelConfigError, match="model.rope_base"):
        PatchTransformer(ROLES3, [0, 1, 2], ["target", "past", "future"], patch_len=8, d_model=16, n_heads=2,
                         n_kv_heads=1, head_dim=8, attention="dense", rope_base=base)
