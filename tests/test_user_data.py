"""A new user's own CSV through the CLI: messy files, every loader option in csv.yaml, README examples (CPU)."""
from __future__ import annotations

import inspect
import json
import re
import shlex
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tsfm_msa.cli import main
from tsfm_msa.train.lightning_module import ForecastModule
from tsfm_msa.datasets import DataValidationError, SeriesDataModule, SeriesFrame, from_csv, from_pandas
from tsfm_msa.train.run import seasonal_naive_reference, summary_markdown, write_summary

ROOT = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(20261201)
DATA_CONFIGS = ("vic_elec", "epf", "pedestrian", "synthetic", "csv")
# A tiny model and budget for end-to-end CLI runs.
TINY = ["model.patch_len=8", "model.d_model=32", "model.n_layers=1", "model.top_k=2", "data.batch_size=16",
        "data.train_samples_per_epoch=32", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "cpu_threads=1"]


def _compose(overrides: list[str], config: str = "train"):
    with initialize_config_module("tsfm_msa.configs", version_base=None):
        return compose(config, overrides=overrides)


def _wide(n: int = 120, freq: str = "h") -> pd.DataFrame:
    """Fresh random hourly table: target load, past covariate temp."""
    return pd.DataFrame({
        "date": pd.date_range("2024-01-01", periods=n, freq=freq).strftime("%Y-%m-%d %H:%M:%S"),
        "load": RNG.normal(100, 10, n).round(3),
        "temp": RNG.normal(5, 3, n).round(3),
    })


def _load(df: pd.DataFrame, **kw) -> list[SeriesFrame]:
    return from_pandas(df, **({"timestamp": "date", "targets": ["load"], "past_covariates": ["temp"]} | kw))


# ------------------------------------------------------------------------------------ 1. empty file


def test_empty_csv_and_header_only_csv_give_one_line_errors(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataValidationError, match=r"CSV file .*empty.csv' is empty \(no header row"):
        from_csv(empty, timestamp="date", targets=["load"])
    header_only = tmp_path / "header.csv"
    header_only.write_text("date,load\n")
    with pytest.raises(DataValidationError, match=r"the data has no rows \(columns \['date', 'load'\]\)"):
        from_csv(header_only, timestamp="date", targets=["load"])


def test_cli_empty_csv_is_one_line(tmp_path, capsys):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(SystemExit) as exc:
        main(["train", "data=csv", f"data.loader.path={empty}", "data.loader.timestamp=date",
              "data.loader.targets=[load]", f"hydra.run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "is empty" in err and "Traceback" not in err and "EmptyDataError" not in err


# ------------------------------------------------------------------ 2. no seasonal-naive reference


def _one_minute_day(tmp_path: Path) -> Path:
    """1-minute series exactly one season (1440 steps) long: seasonal naive has no value a day back."""
    n = 1440
    t = np.arange(n)
    df = pd.DataFrame({
        "date": pd.date_range("2024-05-01", periods=n, freq="min").strftime("%Y-%m-%d %H:%M"),
        "load": (np.sin(2 * np.pi * t / 60) + RNG.normal(0, 0.1, n)).round(4),
    })
    path = tmp_path / "minute.csv"
    df.to_csv(path, index=False)
    return path


def test_summary_without_seasonal_naive_reference_is_valid_json_and_markdown(tmp_path):
    frames = from_csv(_one_minute_day(tmp_path), timestamp="date", targets=["load"])
    dm = SeriesDataModule(frames=frames, context_len=64, horizon=16)
    naive, note = seasonal_naive_reference(dm)
    mae = naive["load"]
    assert naive == {"load": None} and "1440 steps at freq 'min'" in note
    summary = {"run": "r", "steps": 2, "train_seconds": 0.1, "val_loss": float("nan"), "val_mae": 0.5,
               "seasonal_naive_val_mae": mae, "seasonal_naive_note": note, "mae_ratio_vs_seasonal_naive": None,
               "val_support_frac": None, "best_checkpoint": None, "metrics_csv": None}
    with pytest.raises(ValueError, match="not JSON compliant"):
        write_summary(summary, tmp_path)  # a NaN that slipped through is refused, never written as NaN
    summary["val_loss"] = None
    write_summary(summary, tmp_path)
    text = (tmp_path / "summary.json").read_text()
    loaded = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c} in summary.json"))
    assert loaded["seasonal_naive_val_mae"] is None and loaded["mae_ratio_vs_seasonal_naive"] is None
    md = (tmp_path / "summary.md").read_text()
    assert "n/a — no seasonal-naive reference" in md and "1440 steps" in md
    assert "n/a — the model has no validation MAE" in summary_markdown(
        summary | {"seasonal_naive_val_mae": 1.0, "seasonal_naive_note": None, "val_mae": None})


def test_cli_trains_one_season_of_minute_data_and_writes_the_summary(tmp_path, capsys):
    run_dir = tmp_path / "run"
    main(["train", "data=csv", f"data.loader.path={_one_minute_day(tmp_path)}", "data.loader.timestamp=date",
          "data.loader.targets=[load]", "data.context_len=64", "data.horizon=16", *TINY,
          "trainer.max_steps=2", "trainer.val_check_interval=2", "indexer_warmup.steps=1",
          f"hydra.run.dir={run_dir}"])
    summary = json.loads((run_dir / "summary.json").read_text(), parse_constant=pytest.fail)
    assert summary["seasonal_naive_val_mae"] is None and "one season" in summary["seasonal_naive_note"]
    assert summary["val_mae"] > 0
    assert "no seasonal-naive reference" in (run_dir / "summary.md").read_text()
    out = capsys.readouterr().out
    assert "no seasonal-naive reference" in out
    assert "never routes sparsely" not in out  # 1 warmup step of 2: the run does route sparsely


# ----------------------------------------------------------------------------- 3. missing values


def test_missing_value_markers_become_nan(tmp_path):
    df = _wide(40)
    df = df.astype({"load": object, "temp": object})
    markers = {3: " ", 5: "NA", 7: "n/a ", 9: "-", 11: "null", 13: "", 15: "  NaN", 17: "?"}
    for row, marker in markers.items():
        df.loc[row, "temp"] = marker
    df.loc[20, "load"] = "   "
    path = tmp_path / "blanks.csv"
    df.to_csv(path, index=False)
    [frame] = from_csv(path, timestamp="date", targets=["load"], past_covariates=["temp"])
    assert np.isnan(frame.column("temp")[list(markers)]).all() and np.isnan(frame.column("load")[20])
    observed = [r for r in range(40) if r not in markers]
    np.testing.assert_allclose(frame.column("temp")[observed], df["temp"][observed].astype(float), rtol=1e-6)


def test_missing_values_option_is_configurable():
    df = _wide(30).astype({"temp": object})
    df.loc[4, "temp"] = "absent"
    df.loc[6, "temp"] = -999.0
    with pytest.raises(DataValidationError, match=r"'absent' at row 4 is not a number.*data.loader.missing_values"):
        _load(df)
    [frame] = _load(df, missing_values=["", "absent", -999])
    assert np.isnan(frame.column("temp")[[4, 6]]).all() and np.isfinite(frame.column("temp")[5])
    # With an empty list only blank cells are missing: "NA" is then a bad value, named in the message.
    df.loc[4, "temp"] = "NA"
    with pytest.raises(DataValidationError, match=r"'NA' at row 4.*now \[\]"):
        _load(df, missing_values=[])
    with pytest.raises(DataValidationError, match=r"data.loader.missing_values must be a list"):
        _load(df, missing_values="NA")


def test_decimal_comma_and_separator_hints(tmp_path):
    df = _wide(10).astype({"temp": object})
    df.loc[2, "temp"] = "3,5"
    with pytest.raises(DataValidationError, match=r"""decimal comma: set 'data.loader.read_kwargs=\{decimal:","\}'"""):
        _load(df)
    path = tmp_path / "semicolon.csv"
    _wide(10).to_csv(path, index=False, sep=";")
    with pytest.raises(DataValidationError, match=r"""separate columns with ';': set 'data.loader.read_kwargs=\{sep:";"\}'"""):
        from_csv(path, timestamp="date", targets=["load"])
    [frame] = from_csv(path, timestamp="date", targets=["load"], read_kwargs={"sep": ";"})
    assert frame.length == 10


# ----------------------------------------------------------------------------------- 4. sorting


def test_unsorted_rows_are_sorted_with_a_count_or_refused():
    df = _wide(50)
    shuffled = df.iloc[[0, 1, 7, 2, 3, 4, 5, 6, *range(8, 47), 49, 47, 48]]  # rows 7 and 49 moved
    with pytest.warns(UserWarning, match=r"the series: 2 of 50 rows were out of time order and have been sorted"):
        [frame] = _load(shuffled)
    [expected] = _load(df)
    np.testing.assert_array_equal(frame.values, expected.values)
    assert frame.timestamps.equals(expected.timestamps)
    with pytest.raises(DataValidationError, match=r"not in increasing order.*data.loader.sort_by_time=true"):
        _load(shuffled, sort_by_time=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # sorted input: no warning
        _load(df)


def test_item_stacked_rows_interleaved_and_unsorted():
    a, b = _wide(30), _wide(30)
    stacked = pd.concat([a.assign(site="a"), b.assign(site="b")], ignore_index=True)
    frames = _load(stacked, item_id="site")
    messy = stacked.iloc[RNG.permutation(len(stacked))]
    with pytest.warns(UserWarning, match=r"item-stacked data: \d+ of 60 rows were out of time order") as record:
        mixed = _load(messy, item_id="site")
    assert len([w for w in record if "out of time order" in str(w.message)]) == 1  # one warning per file
    assert sorted(f.item_id for f in mixed) == ["a", "b"]
    for f in mixed:
        g = next(x for x in frames if x.item_id == f.item_id)
        np.testing.assert_array_equal(f.values, g.values)
    with pytest.raises(DataValidationError, match=r"item-stacked data: the rows of series .* not in increasing"):
        _load(messy, item_id="site", sort_by_time=False)
    with pytest.raises(DataValidationError, match=r"duplicate timestamps.*data.loader.item_id"):
        _load(stacked)  # two series stacked without item_id


# --------------------------------------------------------------------------- 5. filling the grid


def test_fill_missing_steps_counts_and_limits():
    df = _wide(100)
    gappy = df.drop(index=range(10, 15))  # 5 of 100 steps absent
    with pytest.raises(DataValidationError, match=r"5 of 100 steps are absent.*data.loader.fill_missing_steps=true"):
        _load(gappy)
    with pytest.warns(UserWarning, match=r"inserted 5 missing time steps as NaN \(5.0% of the 100-step 'h' grid"):
        [frame] = _load(gappy, fill_missing_steps=True)
    assert frame.length == 100 and np.isnan(frame.values[10:15]).all()
    sparse = df.iloc[::3]  # keeps 34 rows on an hourly grid of 100: 66% would be invented
    with pytest.raises(DataValidationError, match=r"insert 66 empty time steps, 66.0% of the 100-step 'h' grid, "
                       r"more than data.loader.max_fill_fraction=0.1.*data.loader.max_fill_fraction=0.66.*"
                       r"\(the data's median spacing is 3h\)$"):
        _load(sparse, fill_missing_steps=True, freq="h")
    with pytest.warns(UserWarning, match=r"inserted 66 missing"):
        [frame] = _load(sparse, fill_missing_steps=True, freq="h", max_fill_fraction=0.7)
    assert frame.length == 100
    with pytest.raises(DataValidationError, match=r"max_fill_fraction must be a number in \[0, 1\]"):
        _load(gappy, fill_missing_steps=True, max_fill_fraction=5)


# ------------------------------------------------------------------------------- 8. timestamps


def test_time_of_day_without_date_and_numeric_timestamps_are_refused():
    df = _wide(30)
    df["date"] = pd.date_range("2024-01-01", periods=30, freq="min").strftime("%H:%M")
    with pytest.raises(DataValidationError, match=r"time of day without a date \('00:00' at row 0\)"):
        _load(df)
    df["date"] = pd.date_range("2024-01-01", periods=30, freq="min").strftime("%I:%M:%S %p")
    with pytest.raises(DataValidationError, match=r"time of day without a date"):
        _load(df)
    df["date"] = np.arange(2000, 2030)
    with pytest.raises(DataValidationError, match=r"holds numbers \(e.g. 2000\), not dates.*read_kwargs"):
        _load(df)
    df["date"] = pd.date_range("2000", periods=30, freq="YS").year.astype(str)  # years as text are dates
    assert _load(df)[0].freq == "YS-JAN"


# ---------------------------------------------------------- 6. every loader option in csv.yaml


def test_csv_config_lists_every_loader_option_with_a_comment():
    options = set(inspect.signature(from_pandas).parameters) - {"df"} | {"path", "read_kwargs"}
    cfg = _compose(["data=csv"])
    listed = set(cfg.data.loader) - {"_target_", "_partial_"}
    assert listed == options
    loader = OmegaConf.to_container(cfg.data.loader)
    for name, param in inspect.signature(from_pandas).parameters.items():  # the config's defaults are the code's
        if param.default is not inspect.Parameter.empty:
            default = list(param.default) if isinstance(param.default, tuple) else param.default
            assert loader[name] == default, name
    assert loader["read_kwargs"] is None
    text = (ROOT / "configs" / "data" / "csv.yaml").read_text()
    for name in options:  # each option is explained on its line or just above it
        lines = text.splitlines()
        i = next(k for k, line in enumerate(lines) if line.strip().startswith(f"{name}:"))
        assert "#" in lines[i] or lines[i - 1].strip().startswith("#"), name


def test_loader_options_override_without_plus(tmp_path):
    a, b = _wide(60), _wide(60)
    stacked = pd.concat([a.assign(site="a"), b.assign(site="b")], ignore_index=True)
    stacked["temp"] = stacked["temp"].astype(object)
    stacked.loc[7, "temp"] = "-999"
    path = tmp_path / "stacked.csv"
    stacked.iloc[::-1].to_csv(path, index=False, sep="|")
    cfg = _compose(["data=csv", f"data.loader.path={path}", "data.loader.timestamp=date",
                    "data.loader.targets=[load]", "data.loader.past_covariates=[temp]", "data.loader.item_id=site",
                    "data.loader.freq=h", "data.loader.sort_by_time=true", "data.loader.missing_values=[-999]",
                    "data.loader.fill_missing_steps=true", "data.loader.max_fill_fraction=0.2",
                    "data.loader.groups={load:grid,temp:weather}", 'data.loader.read_kwargs={sep:"|"}',
                    "data.loader.format=wide", "data.loader.actions=[]", "data.loader.future_covariates=[]",
                    "data.loader.variable_col=null", "data.loader.value_col=null"])
    with pytest.warns(UserWarning, match="out of time order"):
        frames = instantiate(cfg.data.loader, _convert_="all")()
    assert [f.item_id for f in frames] == ["b", "a"] and frames[0].schema.groups == ("grid", "weather")
    assert np.isnan(frames[1].column("temp")[7])
    typo = _compose(["data=csv", f"data.loader.path={path}", "data.loader.timestamp=date",
                     "data.loader.targets=[load]", "+data.loader.timstamp=date"])
    with pytest.raises(DataValidationError, match=r"unknown loader option\(s\) \['data.loader.timstamp'\]"):
        instantiate(typo.data.loader, _convert_="all")()


def test_messages_name_the_full_override_key():
    df = _wide(20)
    cases = [
        (dict(targets=[]), r"data.loader.targets is empty"),
        (dict(targets=["nope"]), r"named in data.loader.targets"),
        (dict(timestamp="when"), r"named in data.loader.timestamp"),
        (dict(item_id="site"), r"named in data.loader.item_id"),
        (dict(format="longg"), r"data.loader.format='longg'"),
        (dict(format="long"), r"data.loader.format=long .*needs data.loader.timestamp, data.loader.variable_col"),
        (dict(targets=[2024]), r"data.loader.targets must list column names.*'data.loader.targets=\[\"2024\"\]'"),
        (dict(groups={"x": "g"}), r"data.loader.groups has keys"),
        (dict(past_covariates=["load"]), r"listed both in data.loader.targets and in data.loader.past_covariates"),
    ]
    for kw, match in cases:
        with pytest.raises(DataValidationError, match=match):
            _load(df, **kw)


# ------------------------------------------------------- 7. README examples and the shared base


def _readme_examples() -> list[tuple[str, list[str]]]:
    """(CSV text, override list) of every worked example in the README's "Your own data" section."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Your own data"):]
    section = section[: section.index("\n## ", 1)]
    pairs = re.findall(r"```csv\n(.*?)```\s*```bash\n(.*?)```", section, flags=re.S)
    out = []
    for csv_text, command in pairs:
        words = shlex.split(command.replace("\\\n", " "), comments=True)
        assert words[:2] == ["tsfm-msa", "train"], words
        out.append((csv_text, words[2:]))
    return out


def test_readme_examples_compose_and_load(tmp_path):
    examples = _readme_examples()
    assert len(examples) == 3  # wide, item-stacked, long
    layouts = []
    for csv_text, overrides in examples:
        path_arg = next(o for o in overrides if o.startswith("data.loader.path="))
        path = tmp_path / path_arg.split("=", 1)[1]
        path.write_text(csv_text, encoding="utf-8")
        overrides = [f"data.loader.path={path}" if o == path_arg else o for o in overrides]
        cfg = _compose(overrides)
        frames = instantiate(cfg.data.loader, _convert_="all")()
        loader = cfg.data.loader
        names = [*loader.targets, *loader.past_covariates, *loader.future_covariates, *loader.actions]
        assert all(f.schema.names == tuple(names) for f in frames)
        layouts.append((loader.format, loader.item_id, len(frames)))
        if "Température" in names:  # the wide example shows a space and NA as missing values
            assert np.isnan(frames[0].column("Température")[[1, 3]]).all()
        # The model the command trains accepts the window (e.g. enough KV blocks for model.top_k).
        module = ForecastModule(model_config=OmegaConf.to_container(cfg.model, resolve=True),
                                schema=frames[0].schema.to_dict(), context_len=cfg.data.context_len,
                                horizon=cfg.data.horizon)
        module.model.layout(cfg.data.context_len, cfg.data.horizon, torch.device("cpu"))
    assert layouts == [("wide", None, 1), ("wide", "store", 2), ("long", "site", 1)]


@pytest.mark.parametrize("data", DATA_CONFIGS)
def test_data_configs_extend_the_shared_base(data):
    base = OmegaConf.load(ROOT / "configs" / "data" / "_base.yaml")
    cfg = _compose([f"data={data}", "data.context_len=128", "data.horizon=12", "data.batch_size=8"])
    assert set(base) <= set(cfg.data) and cfg.data._target_ == base._target_
    assert (cfg.data.context_len, cfg.data.horizon, cfg.data.val_stride, cfg.data.test_stride) == (128, 12, 12, 12)
    assert "_target_" in cfg.data.loader
    with open(ROOT / "configs" / "data" / f"{data}.yaml") as fh:
        assert "_base" in fh.read()
    evaluate = _compose([f"data={data}", "data.horizon=6"], config="evaluate")
    assert evaluate.data.val_stride == 6


def test_window_and_split_messages_name_data_keys():
    frames = _load(_wide(100))
    with pytest.raises(DataValidationError, match=r"a window needs at least 124.*data.context_len / data.horizon"):
        SeriesDataModule(frames=frames, context_len=100, horizon=24).setup()
    with pytest.raises(DataValidationError, match=r"smaller data.val_fraction / data.test_fraction"):
        SeriesDataModule(frames=frames, context_len=8, horizon=4, val_fraction=0.5, test_fraction=0.5).setup()
    with pytest.raises(DataValidationError, match=r"'val' has no full window.*larger split \(data.val_fraction\)"):
        SeriesDataModule(frames=frames, context_len=8, horizon=24, val_fraction=0.1).setup()


def test_day_first_timestamps_get_a_one_line_hint_that_works(tmp_path):
    """dd/mm/yyyy dates: one line naming the read_kwargs override, and that override loads the file."""
    rng = np.random.default_rng()
    times = pd.date_range("2025-03-01", periods=400, freq="h")
    path = tmp_path / "dmy.csv"
    pd.DataFrame({"Zeit": times.strftime("%d/%m/%Y %H:%M"), "flow": rng.normal(size=400)}).to_csv(path, index=False)
    with pytest.raises(DataValidationError) as err:
        from_csv(path, timestamp="Zeit", targets=["flow"])
    message = str(err.value)
    assert "\n" not in message and "dayfirst:true" in message and "data.loader.read_kwargs" in message
    (frame,) = from_csv(path, timestamp="Zeit", targets=["flow"], read_kwargs={"parse_dates": ["Zeit"], "dayfirst": True})
    assert pd.Timestamp(frame.timestamps[0]) == times[0] and pd.Timestamp(frame.timestamps[-1]) == times[-1]


def test_read_kwargs_hints_keep_what_the_user_already_set(tmp_path):
    """A semicolon file with day-first dates and decimal commas: following each hint in turn (each one the
    whole read_kwargs override, as pasted through the shell and Hydra) loads the file; no hint drops a key
    an earlier hint added (the loop between the separator and the date hints a user hit)."""

    rng = np.random.default_rng()
    times = pd.date_range("2025-03-01", periods=300, freq="h")
    values = [f"{v:.3f}".replace(".", ",") for v in rng.normal(size=300)]
    path = tmp_path / "de.csv"
    pd.DataFrame({"Zeitstempel": times.strftime("%d.%m.%Y %H:%M"), "Last": values}).to_csv(path, index=False, sep=";")
    read_kwargs: dict = {}
    for _ in range(4):
        try:
            (frame,) = from_csv(path, timestamp="Zeitstempel", targets=["Last"], read_kwargs=read_kwargs)
            break
        except DataValidationError as err:
            hint = re.search(r"'(data\.loader\.read_kwargs=\{[^']*\})'", str(err))
            assert hint, str(err)
            with initialize_config_module("tsfm_msa.configs", version_base=None):
                cfg = compose("train", overrides=["data=csv", *shlex.split(f"'{hint.group(1)}'")])
            new = OmegaConf.to_container(cfg.data.loader.read_kwargs)
            assert set(read_kwargs) <= set(new), (read_kwargs, new)  # nothing set before is dropped
            read_kwargs = new
    else:
        pytest.fail(f"still not loaded after 4 hints; read_kwargs={read_kwargs}")
    assert set(read_kwargs) >= {"sep", "decimal", "dayfirst"}
    assert pd.Timestamp(frame.timestamps[0]) == times[0] and frame.values.dtype.kind == "f"


@pytest.mark.parametrize("example", [{"sep": ";"}, {"decimal": ","}, "%Y-%m-%d %H:%M", ["a", "b"], "h"])
def test_option_hints_run_as_pasted(example):
    """A hint's override, pasted into a shell, reaches Hydra as the value it names."""
    import shlex

    from hydra import compose, initialize_config_module

    from tsfm_msa.datasets.errors import option

    [override] = shlex.split(option("read_kwargs", example).split(" (Python:")[0])
    with initialize_config_module("tsfm_msa.configs", version_base=None):
        cfg = compose("train", overrides=["data=csv", override])
    value = cfg.data.loader.read_kwargs
    assert (list(value) if isinstance(example, list) else dict(value) if isinstance(example, dict) else value) == example


def test_a_warmup_as_long_as_the_run_is_named(tmp_path, capsys):
    """indexer_warmup.steps >= trainer.max_steps: the MSA model never routes sparsely; the console says so."""
    main(["train", "data=csv", f"data.loader.path={_one_minute_day(tmp_path)}", "data.loader.timestamp=date",
          "data.loader.targets=[load]", "data.context_len=64", "data.horizon=16", *TINY,
          "trainer.max_steps=2", "trainer.val_check_interval=2", "indexer_warmup.steps=2",
          f"hydra.run.dir={tmp_path / 'run'}"])
    assert "indexer_warmup.steps=2 >= trainer.max_steps=2: this MSA model never routes sparsely" in capsys.readouterr().out


# ------------------------------------------------------------------------- new-user trial, data files


def test_time_zone_crossing_daylight_saving_becomes_evenly_spaced_utc(tmp_path):
    """Hourly Europe/Paris times with +01:00 then +02:00 offsets (the March DST change) load as naive UTC."""
    local = pd.date_range("2024-03-30 12:00", periods=48, freq="h", tz="Europe/Paris")
    assert len(set(t.utcoffset() for t in local)) == 2  # the series really crosses the change
    path = tmp_path / "paris.csv"
    pd.DataFrame({"when": local.map(lambda t: t.isoformat()), "flow": RNG.normal(size=48)}).to_csv(path, index=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no pandas FutureWarning about mixed time zones either
        (frame,) = from_csv(path, timestamp="when", targets=["flow"])
    assert frame.timestamps.tz is None and frame.freq == "h"
    assert (frame.timestamps == local.tz_convert("UTC").tz_localize(None)).all()
    assert frame.timestamps[0] == pd.Timestamp("2024-03-30 11:00")  # 12:00+01:00
    assert (np.diff(frame.timestamps.asi8) == 3600 * 10**9).all()


def test_latin1_csv_gets_the_encoding_hint_and_the_hint_works(tmp_path):
    path = tmp_path / "latin1.csv"
    times = pd.date_range("2024-01-01", periods=30, freq="h").strftime("%Y-%m-%d %H:%M")
    text = "date,Température\n" + "".join(f"{t},{v:.2f}\n" for t, v in zip(times, RNG.normal(size=30)))
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(DataValidationError) as err:
        from_csv(path, timestamp="date", targets=["Température"])
    message = str(err.value)
    assert "\n" not in message and "not UTF-8" in message
    [override] = shlex.split(re.search(r"(data\.loader\.read_kwargs=\S+) \(Python", message).group(1))
    assert override == "data.loader.read_kwargs={encoding:latin-1}"
    cfg = _compose(["data=csv", override])
    read_kwargs = OmegaConf.to_container(cfg.data.loader.read_kwargs)
    (frame,) = from_csv(path, timestamp="date", targets=["Température"], read_kwargs=read_kwargs)
    assert frame.length == 30 and frame.schema.names == ("Température",)


def test_thousands_separator_hint_works(tmp_path):
    path = tmp_path / "thousands.csv"
    times = pd.date_range("2024-01-01", periods=30, freq="h").strftime("%Y-%m-%d %H:%M")
    values = RNG.uniform(1000, 9000, 30).round(1)
    pd.DataFrame({"date": times, "load": [f"{v:,.1f}" for v in values]}).to_csv(path, index=False)
    with pytest.raises(DataValidationError) as err:
        from_csv(path, timestamp="date", targets=["load"])
    message = str(err.value)
    assert "thousands separator" in message and "decimal comma" not in message
    [override] = shlex.split(re.search(r"('data\.loader\.read_kwargs=\S+') \(Python", message).group(1))
    read_kwargs = OmegaConf.to_container(_compose(["data=csv", override]).data.loader.read_kwargs)
    assert read_kwargs == {"thousands": ","}
    (frame,) = from_csv(path, timestamp="date", targets=["load"], read_kwargs=read_kwargs)
    np.testing.assert_allclose(frame.column("load"), values, rtol=1e-6)


def test_cli_path_to_a_directory_says_it_is_a_directory(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "data=csv", f"data.loader.path={tmp_path}", "data.loader.timestamp=date",
              "data.loader.targets=[load]", f"hydra.run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert "is a directory, not a file" in err and "CSV or Parquet file" in err and "no such file" not in err


def _flow_until(n: int, last_observed: int) -> pd.DataFrame:
    """Hourly 'flow' (target) and 'temp', flow missing from row last_observed + 1 on."""
    t = np.arange(n)
    flow = (np.sin(2 * np.pi * t / 24) + RNG.normal(0, 0.1, n)).round(4)
    flow[last_observed + 1:] = np.nan
    return pd.DataFrame({"when": pd.date_range("2024-01-01", periods=n, freq="h").strftime("%Y-%m-%d %H:%M"),
                         "flow": flow, "temp": RNG.normal(size=n).round(3)})


def test_a_split_without_observed_target_values_is_refused():
    """flow missing from row 700 of 900: validation and test hold no flow; the MAE would be a fake 0."""
    frames = from_pandas(_flow_until(900, 699), timestamp="when", targets=["flow"], past_covariates=["temp"])
    with pytest.raises(DataValidationError) as err:
        SeriesDataModule(frames=frames, context_len=64, horizon=16).setup()
    message = str(err.value)
    assert "\n" not in message
    assert "target 'flow' has no observed value in the 'val' split (0 of 80 horizon values in its 5 window(s))" in message
    assert "last observed at 2024-01-30 03:00:00" in message and "data.val_fraction" in message
    frames = from_pandas(_flow_until(900, 809), timestamp="when", targets=["flow"], past_covariates=["temp"])
    with pytest.raises(DataValidationError, match=r"no observed value in the 'test' split .*data\.test_fraction"):
        SeriesDataModule(frames=frames, context_len=64, horizon=16).setup()
    # One observed value in each split is enough (the metrics are then means over what is observed).
    df = _flow_until(900, 809)
    df.loc[880, "flow"] = 0.5
    frames = from_pandas(df, timestamp="when", targets=["flow"], past_covariates=["temp"])
    SeriesDataModule(frames=frames, context_len=64, horizon=16).setup()


def test_cli_train_on_a_target_missing_at_the_end_is_one_line(tmp_path, capsys):
    path = tmp_path / "wide.csv"
    _flow_until(900, 699).to_csv(path, index=False)
    with pytest.raises(SystemExit) as exc:
        main(["train", "data=csv", f"data.loader.path={path}", "data.loader.timestamp=when",
              "data.loader.targets=[flow]", *TINY, "trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "target 'flow' has no observed value in the 'val' split" in err
    assert not (tmp_path / "run" / "summary.json").exists()


def test_summary_with_an_exact_seasonal_naive_names_the_model_mae():
    """Seasonal naive MAE 0 (a target flat through the validation part): no ratio, but the model has its MAE."""
    summary = {"run": "r", "steps": 2, "train_seconds": 0.1, "val_loss": 0.01, "val_mae": 0.0024,
               "seasonal_naive_val_mae": 0.0, "seasonal_naive_note": None, "mae_ratio_vs_seasonal_naive": None,
               "val_support_frac": None, "best_checkpoint": None, "metrics_csv": None}
    md = summary_markdown(summary)
    assert "the model has no validation MAE" not in md
    assert "n/a — seasonal naive is exact on the validation part (MAE 0), so no ratio; the model's validation MAE is 0.0024" in md


def test_a_table_without_item_column_is_not_called_item_0(tmp_path):
    """The loader's placeholder id "0" stays out of messages: the user never made an item '0'."""
    df = _wide(40)
    path = tmp_path / "wide.csv"
    pd.concat([df.iloc[:5], df.iloc[4:]]).to_csv(path, index=False)  # row 4 twice
    with pytest.raises(DataValidationError) as err:
        from_csv(path, timestamp="date", targets=["load"])
    assert "the series in 'wide.csv' has duplicate timestamps" in str(err.value) and "item '0'" not in str(err.value)
    with pytest.raises(DataValidationError, match=r"^target 'load' of the series is constant"):
        _load(df.assign(load=1.0))
    frames = _load(df)
    assert frames[0].item_id == "0"  # the id itself is unchanged (checkpoints and evaluation match on it)
    with pytest.raises(DataValidationError, match=r"^the series has 40 steps, but a window needs at least 80"):
        SeriesDataModule(frames=frames, context_len=64, horizon=16).setup()
    # Several items keep their names.
    stacked = pd.concat([df.assign(site="a"), df.assign(site="b", load=2.0)])
    with pytest.raises(DataValidationError, match=r"target 'load' of item 'b' is constant"):
        _load(stacked, item_id="site")


# ------------------------------------------------------------- targets of different scales


def test_summary_compares_each_target_with_seasonal_naive(tmp_path, capsys):
    """Two targets ~5e3 and ~1e6: pooled raw-unit MAEs would be the large target's alone. The summary gives
    each target's MAEs and ratio, and the headline ratio is the mean of the per-target ratios."""
    n = 400
    t = np.arange(n)
    df = pd.DataFrame({
        "date": pd.date_range("2024-01-01", periods=n, freq="h").strftime("%Y-%m-%d %H:%M"),
        "Leistung_kW": (5e3 + 500 * np.sin(2 * np.pi * t / 24) + RNG.normal(0, 100, n)).round(2),
        "Umsatz": (1e6 + 1e5 * np.sin(2 * np.pi * t / 24) + RNG.normal(0, 1e5, n)).round(2),
    })
    path = tmp_path / "two.csv"
    df.to_csv(path, index=False)
    run_dir = tmp_path / "run"
    main(["train", "data=csv", f"data.loader.path={path}", "data.loader.timestamp=date",
          "data.loader.targets=[Leistung_kW,Umsatz]", "data.context_len=64", "data.horizon=16", *TINY,
          "trainer.max_steps=2", "trainer.val_check_interval=2", "indexer_warmup.steps=1",
          f"hydra.run.dir={run_dir}"])
    summary = json.loads((run_dir / "summary.json").read_text(), parse_constant=pytest.fail)
    rows = {r["target"]: r for r in summary["per_target"]}
    assert list(rows) == ["Leistung_kW", "Umsatz"]
    for name, row in rows.items():  # each target's naive MAE is the one it has alone, on the same windows
        alone = SeriesDataModule(frames=from_csv(path, timestamp="date", targets=[name]), context_len=64, horizon=16)
        assert row["seasonal_naive_val_mae"] == pytest.approx(alone.seasonal_naive_mae("val"))
        assert row["mae_ratio_vs_seasonal_naive"] == pytest.approx(row["val_mae"] / row["seasonal_naive_val_mae"])
    assert rows["Leistung_kW"]["seasonal_naive_val_mae"] < 1e3 < rows["Umsatz"]["seasonal_naive_val_mae"]
    assert summary["mae_ratio_vs_seasonal_naive"] == pytest.approx(
        np.mean([r["mae_ratio_vs_seasonal_naive"] for r in rows.values()]))
    assert summary["val_mae"] is None and summary["seasonal_naive_val_mae"] is None  # no pooled raw units
    md = (run_dir / "summary.md").read_text()
    assert "mean of the 2 targets' ratios" in md and "| Leistung_kW |" in md and "| Umsatz |" in md
    assert "seasonal naive (season 24 steps of 1h)" in md


def test_summary_states_the_season_of_daily_data():
    """Daily data: GluonTS's season is 1 step; the summary says so rather than leaving it implied."""
    summary = {"run": "r", "steps": 2, "train_seconds": 0.1, "val_loss": 0.01, "val_mae": 2.0,
               "seasonal_naive_val_mae": 4.0, "seasonal_naive_note": None, "mae_ratio_vs_seasonal_naive": 0.5,
               "seasonal_naive_season": 1, "freq": "D", "val_support_frac": None, "best_checkpoint": None,
               "metrics_csv": None}
    md = summary_markdown(summary)
    assert "| validation MAE, seasonal naive (season 1 step of 1D) | 4 |" in md
    assert "0.500 — the model beats seasonal naive" in md


@pytest.mark.parametrize("override, message", [
    ("data.horizon=0", "data.horizon must be a positive integer, got 0"),
    ("data.context_len=-4", "data.context_len must be a positive integer, got -4"),
    ("data.val_stride=0", "data.val_stride must be a positive integer or null, got 0"),
    ("data.min_context=600", "data.min_context (600) cannot exceed data.context_len (512)"),
    ("data.val_fraction=1.5", "data.val_fraction must be a number in [0, 1) (a share of each series), got 1.5"),
])
def test_cli_names_the_data_key_of_a_bad_window_setting(tmp_path, capsys, override, message):
    path = tmp_path / "wide.csv"
    _wide(40).to_csv(path, index=False)
    with pytest.raises(SystemExit) as exc:
        main(["train", "data=csv", f"data.loader.path={path}", "data.loader.timestamp=date",
              "data.loader.targets=[load]", override, f"hydra.run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err


def test_cli_item_id_naming_a_value_column_says_so(tmp_path, capsys):
    """item_id=temp (a continuous value, nearly unique per row): not 'item 4.92 has only 1 time steps'."""
    path = tmp_path / "wide.csv"
    _wide(60).to_csv(path, index=False)
    with pytest.raises(SystemExit) as exc:
        main(["train", "data=csv", f"data.loader.path={path}", "data.loader.timestamp=date",
              "data.loader.targets=[load]", "data.loader.past_covariates=[]", "data.loader.item_id=temp",
              f"hydra.run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "data.loader.item_id='temp' looks like a value column, not a series id" in err
    assert "time steps, too few" not in err
    # Items with a few rows each still load.
    frames = _load(pd.concat([_wide(30).assign(site=s) for s in "abc"]), item_id="site")
    assert [f.item_id for f in frames] == ["a", "b", "c"]
