"""tsfm_msa: time-series foundation models with MiniMax-style sparse attention."""


def __getattr__(name: str) -> object:
    # Lazy: the streaming module pulls in pandas and the model; `import tsfm_msa` stays cheap.
    if name in ("StreamingForecaster", "rolling_forecasts"):
        from tsfm_msa import streaming

        return getattr(streaming, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
