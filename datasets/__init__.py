"""Data for tsfm_msa: validated multivariate series, loaders, windows, scaling, the LightningDataModule."""

from .bundled import load_bundled, load_epf, load_pedestrian, load_vic_elec
from .errors import DataValidationError
from .frame import SeriesFrame, validate_collection
from .gluonts_input import from_gluonts
from .naive import seasonal_naive_mae, seasonal_naive_mae_per_target, seasonality
from .scaling import apply_scaler, fit_scaler, invert_scaler
from .schema import ROLES, SeriesSchema, Variate, VariateRole
from .synthetic import make_synthetic
from .tabular import from_csv, from_pandas, from_parquet
from .windows import Splits, WindowDataset, split_by_time


def __getattr__(name: str) -> object:
    # Lazy: importing Lightning costs seconds; code that only needs frames/windows should not pay it.
    if name == "SeriesDataModule":
        from .datamodule import SeriesDataModule

        return SeriesDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "ROLES",
    "DataValidationError",
    "SeriesDataModule",
    "SeriesFrame",
    "SeriesSchema",
    "Splits",
    "Variate",
    "VariateRole",
    "WindowDataset",
    "apply_scaler",
    "fit_scaler",
    "from_csv",
    "from_gluonts",
    "from_pandas",
    "from_parquet",
    "invert_scaler",
    "load_bundled",
    "load_epf",
    "load_pedestrian",
    "load_vic_elec",
    "make_synthetic",
    "seasonal_naive_mae",
    "seasonal_naive_mae_per_target",
    "seasonality",
    "split_by_time",
    "validate_collection",
]
