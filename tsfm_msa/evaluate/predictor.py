"""A trained ForecastModule (dense or MSA) as a GluonTS ``PyTorchPredictor`` emitting ``QuantileForecast``s.

GluonTS entries map onto the checkpoint's schema as in ``gluonts_data``: ``target`` -> the target
variates, ``past_feat_dynamic_real`` -> past covariates, ``feat_dynamic_real`` -> known-future
covariates and actions (covering the forecast horizon too). The network scales every window the
way training did (``fit_scaler`` on the context) and returns quantiles in the data's units.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from gluonts.dataset.common import Dataset
from gluonts.dataset.field_names import FieldName
from gluonts.model.forecast import Forecast
from gluonts.model.forecast_generator import QuantileForecastGenerator
from gluonts.torch.model.predictor import PyTorchPredictor
from gluonts.transform import AddObservedValuesIndicator, Chain, InstanceSplitter, TestSplitSampler, Transformation
from torch import nn

from tsfm_msa.datasets import SeriesSchema, fit_scaler
from tsfm_msa.datasets.schema import same_freq
from tsfm_msa.model.transformer import PatchTransformer

PAST_OBSERVED = "past_feat_observed"
FUTURE_OBSERVED = "feat_observed"


class CheckpointMismatchError(ValueError):
    """The data do not fit the checkpoint (variates, frequency, covariates, horizon)."""


class _QuantileNet(nn.Module):
    """GluonTS batch (time-major arrays) -> our window batch -> quantiles in data units."""

    def __init__(self, model: PatchTransformer, schema: SeriesSchema, context_len: int, model_horizon: int,
                 prediction_length: int) -> None:
        super().__init__()
        self.model = model
        self.context_len, self.model_horizon, self.prediction_length = context_len, model_horizon, prediction_length
        roles = schema.roles
        self.n_var = len(roles)
        self.target_idx = list(schema.indices_of("target"))
        self.past_idx = list(schema.indices_of("past_covariate"))
        self.future_idx = list(schema.indices_of("future_covariate", "action"))
        self.register_buffer("binary", torch.tensor(schema.binary, dtype=torch.bool), persistent=False)

    def forward(
        self,
        past_target: torch.Tensor,  # [B, C] or [B, C, D]
        past_observed_values: torch.Tensor,  # same shape, 1 = observed (0 on NaN and left padding)
        past_past_feat_dynamic_real: torch.Tensor | None = None,  # [B, C, P]
        past_past_feat_observed: torch.Tensor | None = None,
        past_feat_dynamic_real: torch.Tensor | None = None,  # [B, C, F]
        past_feat_observed: torch.Tensor | None = None,
        future_feat_dynamic_real: torch.Tensor | None = None,  # [B, h, F], h = prediction_length
        future_feat_observed: torch.Tensor | None = None,
    ) -> tuple[tuple[torch.Tensor], None, None]:
        if past_target.dim() == 2:
            past_target, past_observed_values = past_target[..., None], past_observed_values[..., None]
        B, C = past_target.shape[:2]
        H, h = self.model_horizon, self.prediction_length
        ctx = past_target.new_full((B, C, self.n_var), float("nan"))  # [B, C, V], NaN = missing
        hor = past_target.new_full((B, H, self.n_var), float("nan"))  # [B, H, V]
        ctx[..., self.target_idx] = torch.where(past_observed_values > 0, past_target, torch.nan)
        if self.past_idx:
            ctx[..., self.past_idx] = torch.where(past_past_feat_observed > 0, past_past_feat_dynamic_real, torch.nan)
        if self.future_idx:
            ctx[..., self.future_idx] = torch.where(past_feat_observed > 0, past_feat_dynamic_real, torch.nan)
            # Known-future values beyond the requested length (h < H) stay missing.
            hor[:, :h, self.future_idx] = torch.where(future_feat_observed > 0, future_feat_dynamic_real, torch.nan)
        loc, scale = fit_scaler(ctx, self.binary)  # [B, V]
        ctx_mask, hor_mask = ~torch.isnan(ctx), ~torch.isnan(hor)
        batch = {
            "context": torch.nan_to_num((ctx - loc[:, None]) / scale[:, None], nan=0.0),
            "context_mask": ctx_mask,
            "horizon": torch.nan_to_num((hor - loc[:, None]) / scale[:, None], nan=0.0),
            "horizon_mask": hor_mask,
            "loc": loc,
            "scale": scale,
        }
        q = self.model(batch, "predict").quantiles[:, :, :h]  # [B, D, h, Q] scaled, sorted along Q
        t = self.target_idx
        q = q * scale[:, t, None, None] + loc[:, t, None, None]
        # Quantiles only: the model has no mean; a QuantileForecast's .mean is then its median (GluonTS's
        # convention), which is what RMSE[mean] scores (the mean of the quantile levels is no mean).
        out = q.permute(0, 2, 1, 3)  # [B, h, D, Q]
        if out.shape[2] == 1:
            out = out[:, :, 0]  # univariate: [B, h, Q]
        return (out,), None, None


def input_transform(context_len: int, prediction_length: int, has_past: bool, has_future: bool) -> Transformation:
    """GluonTS test-time chain: observed-value masks, then the last ``context_len`` steps (left-padded)."""
    steps: list[Transformation] = [
        AddObservedValuesIndicator(target_field=FieldName.TARGET, output_field=FieldName.OBSERVED_VALUES)
    ]
    fields = [FieldName.OBSERVED_VALUES]
    if has_past:
        steps.append(AddObservedValuesIndicator(target_field=FieldName.PAST_FEAT_DYNAMIC_REAL,
                                                output_field=PAST_OBSERVED))
        fields += [FieldName.PAST_FEAT_DYNAMIC_REAL, PAST_OBSERVED]
    if has_future:
        steps.append(AddObservedValuesIndicator(target_field=FieldName.FEAT_DYNAMIC_REAL,
                                                output_field=FUTURE_OBSERVED))
        fields += [FieldName.FEAT_DYNAMIC_REAL, FUTURE_OBSERVED]
    steps.append(InstanceSplitter(
        target_field=FieldName.TARGET, is_pad_field=FieldName.IS_PAD, start_field=FieldName.START,
        forecast_start_field=FieldName.FORECAST_START, instance_sampler=TestSplitSampler(),
        past_length=context_len, future_length=prediction_length, time_series_fields=fields,
    ))
    return Chain(steps)


class TSFMPredictor(PyTorchPredictor):
    """PyTorchPredictor over a tsfm_msa checkpoint; checks every entry against the checkpoint's schema."""

    schema: SeriesSchema

    def check_entry(self, entry: dict) -> None:
        """Raise CheckpointMismatchError naming what differs between a GluonTS entry and the schema."""
        s = self.schema
        item = entry.get(FieldName.ITEM_ID, "?")
        target = np.asarray(entry[FieldName.TARGET])
        n_t = 1 if target.ndim == 1 else target.shape[0]
        T = target.shape[-1]
        problems = []
        want = {"target": len(s.indices_of("target")),
                FieldName.PAST_FEAT_DYNAMIC_REAL: len(s.indices_of("past_covariate")),
                FieldName.FEAT_DYNAMIC_REAL: len(s.indices_of("future_covariate", "action"))}
        got = {"target": n_t}
        for field in (FieldName.PAST_FEAT_DYNAMIC_REAL, FieldName.FEAT_DYNAMIC_REAL):
            arr = entry.get(field)
            got[field] = 0 if arr is None else np.atleast_2d(np.asarray(arr)).shape[0]
        names = {"target": "targets", FieldName.PAST_FEAT_DYNAMIC_REAL: "past covariates",
                 FieldName.FEAT_DYNAMIC_REAL: "known-future covariates"}
        for field, n in want.items():
            if got[field] != n:
                problems.append(f"{got[field]} {names[field]} ({field}) but the checkpoint has {n}")
        start = entry.get(FieldName.START)
        if isinstance(start, pd.Period) and not same_freq(start.freqstr, s.freq):
            problems.append(f"frequency {start.freqstr!r} but the checkpoint was trained on {s.freq!r}")
        if want[FieldName.FEAT_DYNAMIC_REAL] and got[FieldName.FEAT_DYNAMIC_REAL] == want[FieldName.FEAT_DYNAMIC_REAL]:
            n_f = np.asarray(entry[FieldName.FEAT_DYNAMIC_REAL]).shape[-1]
            if n_f < T + self.prediction_length:
                problems.append(f"feat_dynamic_real covers {n_f} steps; it must cover the target's {T} steps plus "
                                f"the {self.prediction_length}-step horizon")
        if problems:
            raise CheckpointMismatchError(
                f"item {item!r} does not fit the checkpoint (variates {list(s.names)}, freq {s.freq!r}): "
                + "; ".join(problems))

    def predict(self, dataset: Dataset, num_samples: int | None = None) -> Iterator[Forecast]:  # type: ignore[override]
        def checked():
            for entry in dataset:
                self.check_entry(entry)
                yield entry

        yield from super().predict(checked(), num_samples=num_samples)


def predictor_from_module(module, prediction_length: int | None = None, batch_size: int = 64,
                          device: str = "cpu") -> TSFMPredictor:
    """Wrap a (trained) ForecastModule; prediction_length defaults to the model's horizon and may not exceed it."""
    hp = module.hparams
    schema = SeriesSchema.from_dict(dict(hp["schema"]))
    horizon, context_len = int(hp["horizon"]), int(hp["context_len"])
    h = horizon if prediction_length is None else int(prediction_length)
    if h > horizon:
        raise CheckpointMismatchError(
            f"prediction length {h} is longer than the checkpoint's horizon {horizon}; evaluate with a horizon "
            f"<= {horizon} or train a model with data.horizon={h}")
    if h < 1:
        raise CheckpointMismatchError(f"prediction length must be >= 1, got {h}")
    model = module.model.eval()
    levels = [round(float(q), 4) for q in model.quantile_levels.tolist()]
    net = _QuantileNet(model, schema, context_len, horizon, h)
    has_past = bool(schema.indices_of("past_covariate"))
    has_future = bool(schema.indices_of("future_covariate", "action"))
    names = ["past_target", "past_observed_values"]
    if has_past:
        names += ["past_past_feat_dynamic_real", "past_past_feat_observed"]
    if has_future:
        names += ["past_feat_dynamic_real", "past_feat_observed", "future_feat_dynamic_real", "future_feat_observed"]
    predictor = TSFMPredictor(
        input_names=names, prediction_net=net, batch_size=batch_size, prediction_length=h,
        input_transform=input_transform(context_len, h, has_past, has_future),
        forecast_generator=QuantileForecastGenerator(quantiles=[str(q) for q in levels]),
        device=device,
    )
    predictor.schema = schema
    return predictor


def load_predictor(checkpoint: str | Path, prediction_length: int | None = None, batch_size: int = 64,
                   device: str = "cpu") -> TSFMPredictor:
    """GluonTS predictor from a `tsfm-msa train` checkpoint (dense or MSA)."""
    from tsfm_msa.train.lightning_module import ForecastModule

    path = checkpoint_file(checkpoint)
    module = ForecastModule.load_from_checkpoint(str(path), map_location=device)
    try:
        return predictor_from_module(module, prediction_length, batch_size, device)
    except CheckpointMismatchError as err:
        raise CheckpointMismatchError(f"{err}{trained_with(path)}") from None


def checkpoint_file(checkpoint: str | Path) -> Path:
    """A checkpoint file, or a `tsfm-msa train` run folder: its best checkpoint, else its last one."""
    path = Path(checkpoint)
    if path.is_dir():
        # The newest best (a resumed run may hold an older one, and best-step1000 sorts before best-step200).
        found = (sorted((path / "checkpoints").glob("best-*.ckpt"), key=lambda p: p.stat().st_mtime)
                 or list((path / "checkpoints").glob("last.ckpt")))
        if not found:
            raise FileNotFoundError(f"checkpoint={checkpoint} is a folder without checkpoints/best-*.ckpt or "
                                    "checkpoints/last.ckpt; pass a .ckpt file or a `tsfm-msa train` run folder")
        path = found[-1]
    elif not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    return path


def trained_with(checkpoint: Path) -> str:
    """'; it was trained with data=csv data.loader.path=... (<run>/.hydra/overrides.yaml): ...' from the
    checkpoint's run folder, or '' when there is none: evaluate reads the data from its own overrides, not
    from the checkpoint, so a mismatch usually means the training run's data overrides are missing."""
    overrides_file = checkpoint.parent.parent / ".hydra" / "overrides.yaml"
    if not overrides_file.is_file():
        return ""
    from omegaconf import OmegaConf

    data = [str(o) for o in OmegaConf.load(overrides_file) if str(o).lstrip("+~").startswith("data")]
    if not data:
        return f"; the checkpoint's run used the default data ({overrides_file}): evaluate with no data= overrides"
    return (f"; the checkpoint's run was trained with {' '.join(data)} ({overrides_file}): pass the same data "
            "overrides to evaluate")


def check_schema(predictor: TSFMPredictor, data_schema: SeriesSchema, checkpoint: str | Path | None = None) -> None:
    """Compare the checkpoint's schema with a dataset's (names, roles, groups, freq) before predicting."""
    diffs = predictor.schema.differences(data_schema)
    if diffs:
        hint = trained_with(checkpoint_file(checkpoint)) if checkpoint is not None else ""
        raise CheckpointMismatchError("the checkpoint does not match the dataset: " + "; ".join(diffs) + hint)
