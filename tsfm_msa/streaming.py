"""Streaming forecaster: per-layer K/V and index-key caches, updated patch by patch (DESIGN.md section 9).

Every layer is causal in time, so the keys, values and index keys of a context token never change
once computed. :class:`StreamingForecaster` computes them once, when the token's patch completes,
and stores them in a *paged* cache: blocks of ``block_size`` slots, each owned by one sensor group,
allocated in arrival order (a group's open block fills before it gets a new one). Each group's token
sequence is thus cut into blocks exactly as the full forward's group-major layout cuts its segment
(DESIGN.md section 3), only the block ids differ, which selection never depends on (sets of blocks).
Per slot the cache keeps the key time (``INT32_MAX`` = unused), per block its sensor group; this and
each group's open block and last token are the state selection needs (the max-pool itself depends on
the query, so it is recomputed by the decode kernel: O(L * Di) per new query).

``forecast()`` appends the hidden horizon tokens (and known-future covariates) to the groups' open
blocks and fresh blocks past the end, as the full layout would, runs them as queries through every
layer, and then marks those slots unused again: horizon tokens are never cached.

Scaling: the per-variate ``loc``/``scale`` are fitted once, on the initial history (``fit_scaler``,
as in training), and then frozen. Cached states depend on the scaled inputs, so a scale refitted on
every window would invalidate the whole cache; running statistics would need every cached state
recomputed too (the network is not linear in its inputs). A level shift after the start is thus
seen by the model as large scaled values, exactly as a full forward with the same frozen scale sees
it; start a new forecaster (from recent history) to refit the scale.

Forecasts are issued at patch boundaries: rows that do not complete a patch stay pending (they are
used as soon as the patch completes), and the forecast starts after the last completed patch.

Size limit: the cache holds at most ``max_tokens`` slots (context tokens plus the free slots of
open blocks). An update that would pass it raises :class:`StreamCapacityError` and leaves the cache
as it was; there is no silent sliding (evicting old tokens would change what the full forward sees).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from tsfm_msa import kernels
from tsfm_msa.datasets.scaling import fit_scaler
from tsfm_msa.datasets.schema import SeriesSchema
from tsfm_msa.model.attention import MSAAttention
from tsfm_msa.model.rope import apply_rope, rope_angles
from tsfm_msa.model.transformer import PatchTransformer
from tsfm_msa.tokens import ROLES, ROLES_WITH_FUTURE

INT32_MAX = kernels.INT32_MAX


class StreamInputError(ValueError):
    """An update or forecast request does not fit the stream (variates, timestamps, horizon)."""


class StreamCapacityError(RuntimeError):
    """The cache would grow beyond its configured ``max_tokens``."""


@dataclass
class StreamForecast:
    """Quantiles of one forecast in the data's units."""

    quantiles: torch.Tensor  # [n_targets, h, Q], sorted along Q
    levels: tuple[float, ...]
    target_names: tuple[str, ...]
    index: pd.Index  # the h forecast timestamps (or integer steps for a stream without timestamps)

    def to_frame(self) -> pd.DataFrame:
        """Long frame: one row per (target, timestamp), one column per quantile level."""
        parts = []
        for t, name in enumerate(self.target_names):
            part = pd.DataFrame(self.quantiles[t].cpu().numpy(), index=self.index,
                                columns=[str(q) for q in self.levels])
            part.insert(0, "target", name)
            parts.append(part)
        return pd.concat(parts)


@dataclass
class _Tokens:
    """New tokens of one update or forecast, in group-major order (group, time, variate)."""

    variate: torch.Tensor  # [n] long
    patch: torch.Tensor  # [n] long, absolute patch index on the stream's time axis
    group: torch.Tensor  # [n] long
    hidden: torch.Tensor  # [n] bool, horizon targets
    k_time: torch.Tensor  # [n] int32
    slots: torch.Tensor  # [n] long, cache slot of every token
    new_block_groups: list[int]  # sensor group of every block opened for these tokens
    open_after: list[tuple[int, int] | None]  # per group: (open block, fill) after these tokens
    last_slot_after: list[int]  # per group: slot of the group's last token after these tokens


def _unwrap(model: Any) -> tuple[PatchTransformer, dict]:
    """A PatchTransformer and the hyper-parameters of its ForecastModule (empty for a bare model)."""
    if isinstance(model, PatchTransformer):
        return model, {}
    inner = getattr(model, "model", None)
    if isinstance(inner, PatchTransformer):
        return inner, dict(getattr(model, "hparams", {}) or {})
    raise TypeError(f"expected a ForecastModule or PatchTransformer, got {type(model).__name__}")


class StreamingForecaster:
    """Incremental forecaster over per-layer KV and index-key caches (see the module docstring).

    ``model`` is a trained ``ForecastModule`` (schema and horizon come from its hyper-parameters) or
    a ``PatchTransformer`` (pass ``schema`` and ``horizon``). ``history`` is a pandas frame (a
    DatetimeIndex or a ``timestamp_column``, one column per schema variate) or a tensor/array
    ``[T, V]`` of observations (NaN = missing); it fixes the frozen scale and fills the caches.
    """

    def __init__(
        self,
        model: Any,
        history: pd.DataFrame | torch.Tensor | np.ndarray,
        schema: SeriesSchema | dict | None = None,
        horizon: int | None = None,
        max_tokens: int = 1 << 20,
        timestamp_column: str = "timestamp",
        prefill_patches: int = 64,
    ) -> None:
        """``prefill_patches`` bounds the patches appended per pass (the history is fed in such passes)."""
        net, hparams = _unwrap(model)
        self.model = net.eval()
        if schema is None:
            if "schema" not in hparams:
                raise StreamInputError("pass schema=... (a SeriesSchema or its dict) with a bare PatchTransformer")
            schema = hparams["schema"]
        self.schema = schema if isinstance(schema, SeriesSchema) else SeriesSchema.from_dict(dict(schema))
        if list(self.schema.roles) != list(net.roles) or list(self.schema.group_index) != list(net.groups):
            raise StreamInputError(f"the schema (roles {list(self.schema.roles)}, groups {list(self.schema.group_index)}) "
                                   f"does not match the model (roles {net.roles}, groups {net.groups})")
        horizon = horizon if horizon is not None else hparams.get("horizon")
        if not isinstance(horizon, int) or horizon <= 0:
            raise StreamInputError(f"horizon must be a positive int (the model's forecast length), got {horizon!r}")
        for layer in net.layers:
            attn = layer.attention
            if getattr(attn, "selector", None) is not None:
                raise StreamInputError("a probe selector is installed on an MSA layer; streaming uses the learned indexer")
            if getattr(attn, "group_policy", "free") != "free" and attn.n_kv_heads != len(net.group_names):
                raise StreamInputError(f"group_policy={attn.group_policy} needs n_kv_heads ({attn.n_kv_heads}) equal to "
                                       f"the number of sensor groups ({len(net.group_names)})")
        self.horizon = horizon
        self.max_tokens = int(max_tokens)
        self.timestamp_column = timestamp_column
        self.patch_len, self.block_size = net.patch_len, net.block_size
        self.n_horizon_patches = -(-horizon // self.patch_len)
        self.n_var = len(net.roles)
        self.members = [[v for v in range(self.n_var) if net.groups[v] == g] for g in range(len(net.group_names))]
        self.target_index = list(net.target_index)
        self.future_index = [v for v, r in enumerate(net.roles) if r in ("future_covariate", "action")]
        param = next(net.parameters())
        self.device, self.dtype = param.device, param.dtype

        values, stamps = self._read_rows(history, first=True)
        if values.shape[0] < self.patch_len:
            raise StreamInputError(f"the initial history has {values.shape[0]} rows; it needs at least one full patch "
                                   f"({self.patch_len} rows)")
        loc, scale = fit_scaler(torch.from_numpy(values), torch.tensor(self.schema.binary, dtype=torch.bool))
        self.loc, self.scale = loc.to(self.device), scale.to(self.device)  # [V] float64 -> frozen
        self._init_cache()
        self.last_stamp = None if stamps is None else stamps[0] - self._offset
        self.n_steps = 0  # rows consumed (completed patches + pending)
        self.pending = np.empty((0, self.n_var))
        self.prefill_patches = prefill_patches
        self._consume(values, stamps)

    # ------------------------------------------------------------------ public API
    @property
    def n_patches(self) -> int:
        """Completed patches in the cache."""
        return self._n_ctx

    @property
    def cached_tokens(self) -> int:
        """Cache slots in use (context tokens plus the free slots of open blocks)."""
        return self._n_blocks * self.block_size

    def update(self, new_rows: pd.DataFrame | torch.Tensor | np.ndarray) -> int:
        """Append observations (same format as the history). Completed patches go into the caches, a
        remainder stays pending. Returns the number of patches added. On any error the stream is
        left exactly as it was."""
        values, stamps = self._read_rows(new_rows, first=False)
        return self._consume(values, stamps)

    @torch.no_grad()
    def forecast(self, prediction_length: int | None = None,
                 future: pd.DataFrame | torch.Tensor | np.ndarray | None = None) -> StreamForecast:
        """Quantiles for the ``prediction_length`` (default: the model's horizon) steps after the last
        completed patch. ``future`` gives known-future covariates/actions for those steps (rows beyond
        it are missing)."""
        h = self.horizon if prediction_length is None else prediction_length
        if not isinstance(h, int) or not 1 <= h <= self.horizon:
            raise StreamInputError(f"prediction_length={h!r} must be an int in [1, {self.horizon}] (the model's horizon); "
                                   f"train a model with a longer horizon to forecast further")
        hor = self._future_values(future)  # [n_hor * P, V] scaled, NaN = missing
        tokens = self._horizon_tokens()
        values, mask = self._token_patches(hor, tokens, self._n_ctx)
        x = self._embed(values, mask, tokens)
        written = tokens.slots
        self._reserve(self._n_blocks + len(tokens.new_block_groups))
        try:
            self._stage(tokens)
            x = self._run_layers(x, tokens, self._forced(tokens))
        finally:
            self._k_time[0, written] = INT32_MAX  # horizon tokens are never cached
            self._block_group[self._n_blocks:] = -1
        x = self.model.norm(x)
        is_target = tokens.hidden.nonzero().squeeze(-1)  # group-major order: (group, time, variate)
        order = torch.argsort(tokens.variate[is_target] * (1 << 32) + tokens.patch[is_target])  # target-major
        out = self.model.head(x[0, is_target[order]])  # [n_targets * n_hor, P * Q]
        n_t = len(self.target_index)
        quantiles = out.view(n_t, self.n_horizon_patches * self.patch_len, -1)[:, :h].float()
        quantiles = torch.sort(quantiles, dim=-1).values
        t = self.target_index
        quantiles = quantiles * self.scale[t, None, None] + self.loc[t, None, None]
        return StreamForecast(quantiles=quantiles, levels=tuple(float(q) for q in self.model.quantile_levels),
                              target_names=tuple(self.schema.names[i] for i in t), index=self._future_index(h))

    def scaled(self, values: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Raw observations ``[T, V]`` -> the model's inputs with the frozen scale (NaN kept)."""
        x = torch.as_tensor(np.asarray(values, dtype=np.float64), device=self.device)
        return (x - self.loc) / self.scale

    # ------------------------------------------------------------------ input checks
    @property
    def _offset(self):
        return pd.tseries.frequencies.to_offset(self.schema.freq)

    def _read_rows(self, rows, first: bool) -> tuple[np.ndarray, pd.DatetimeIndex | None]:
        """Rows -> values [T, V] float64 (NaN = missing) and their timestamps (None for tensors)."""
        names = list(self.schema.names)
        if isinstance(rows, pd.DataFrame):
            frame = rows
            if self.timestamp_column in frame.columns:
                frame = frame.set_index(self.timestamp_column)
            index = frame.index
            if isinstance(index, pd.PeriodIndex):
                index = index.to_timestamp()
            if not isinstance(index, pd.DatetimeIndex):
                raise StreamInputError(f"the frame needs a DatetimeIndex or a {self.timestamp_column!r} column; got a "
                                       f"{type(frame.index).__name__}")
            missing = [n for n in names if n not in frame.columns]
            extra = [c for c in frame.columns if c not in names]
            if missing or extra:
                raise StreamInputError(f"the frame's columns must be the schema's variates {names}: missing {missing}, "
                                       f"unexpected {extra}")
            if not first and self.last_stamp is None:
                raise StreamInputError("this stream was started from a tensor without timestamps; update it with "
                                       "tensors [T, V] too")
            if len(index):
                self._check_stamps(index, first)
            values = frame[names].to_numpy(dtype=np.float64, na_value=np.nan)
            return values, index
        if isinstance(rows, (torch.Tensor, np.ndarray)):
            arr = rows.detach().cpu().double().numpy() if isinstance(rows, torch.Tensor) else np.asarray(rows, dtype=np.float64)
            if arr.ndim == 1 and self.n_var == 1:
                arr = arr[:, None]
            if arr.ndim != 2 or arr.shape[1] != self.n_var:
                raise StreamInputError(f"a tensor update must be [T, V={self.n_var}] (variates {names}), got shape "
                                       f"{tuple(arr.shape)}")
            if not first and self.last_stamp is not None:
                raise StreamInputError("this stream has timestamps; update it with a frame indexed by time so gaps "
                                       "and repeats can be checked")
            return arr, None
        raise StreamInputError(f"rows must be a pandas DataFrame, torch.Tensor or numpy array, got {type(rows).__name__}")

    def _check_stamps(self, index: pd.DatetimeIndex, first: bool) -> None:
        start = index[0] if first else self.last_stamp + self._offset
        expected = pd.date_range(start=start, periods=len(index), freq=self._offset)
        bad = np.flatnonzero(np.asarray(index != expected))
        if not len(bad):
            return
        i = int(bad[0])
        got, want = index[i], expected[i]
        previous = index[i - 1] if i else self.last_stamp
        if previous is not None and got == previous:
            kind = "repeats the previous timestamp"
        elif got < want:
            kind = "goes backwards"
        else:
            kind = "skips steps"
        raise StreamInputError(f"row {i} has timestamp {got} but the next step is {want} (freq {self.schema.freq!r}): "
                               f"the update {kind}; send each step once, in order, with NaN for missing values")

    def _future_values(self, future) -> torch.Tensor:
        """Known-future covariates of the horizon, scaled: [n_hor * P, V] (NaN = missing)."""
        steps = self.n_horizon_patches * self.patch_len
        raw = np.full((steps, self.n_var), np.nan)
        if future is not None:
            names = [self.schema.names[v] for v in self.future_index]
            if isinstance(future, pd.DataFrame):
                frame = future.set_index(self.timestamp_column) if self.timestamp_column in future.columns else future
                extra = [c for c in frame.columns if c not in names]
                if extra or not len(names):
                    raise StreamInputError(f"future rows may only hold the known-future covariates/actions {names}; "
                                           f"got unexpected columns {extra}")
                if self.last_stamp is not None and len(frame):
                    origin = self._origin_stamp()
                    want = pd.date_range(start=origin, periods=len(frame), freq=self._offset)
                    if not frame.index.equals(want):
                        raise StreamInputError(f"future rows must be indexed by the forecast steps starting at {origin} "
                                               f"(freq {self.schema.freq!r}), got {list(frame.index[:3])}...")
                arr = frame.reindex(columns=names).to_numpy(dtype=np.float64, na_value=np.nan)
            else:
                arr = np.asarray(future.detach().cpu() if isinstance(future, torch.Tensor) else future, dtype=np.float64)
                if arr.ndim != 2 or arr.shape[1] != len(names):
                    raise StreamInputError(f"future must be [h, {len(names)}] (columns {names}), got {tuple(arr.shape)}")
            if arr.shape[0] > self.horizon:
                raise StreamInputError(f"future has {arr.shape[0]} rows, beyond the model's horizon {self.horizon}")
            raw[:arr.shape[0], self.future_index] = arr
        return self.scaled(raw)

    def _origin_stamp(self):
        """Timestamp of the first step after the last completed patch."""
        return self.last_stamp - (len(self.pending) - 1) * self._offset

    def _future_index(self, h: int) -> pd.Index:
        if self.last_stamp is None:
            start = self._n_ctx * self.patch_len
            return pd.RangeIndex(start, start + h)
        return pd.date_range(start=self._origin_stamp(), periods=h, freq=self._offset)

    # ------------------------------------------------------------------ cache
    def _init_cache(self) -> None:
        net = self.model
        self._n_ctx = 0
        self._n_blocks = 0
        self._open: list[tuple[int, int] | None] = [None] * len(self.members)
        self._last_slot = [-1] * len(self.members)
        self._capacity = 0  # blocks
        self._k_time = torch.empty(1, 0, dtype=torch.int32, device=self.device)
        self._block_group = torch.empty(0, dtype=torch.long, device=self.device)
        self._k, self._v, self._ki = [], [], []
        for layer in net.layers:
            attn = layer.attention
            self._k.append(torch.empty(1, attn.n_kv_heads, 0, attn.head_dim, dtype=self.dtype, device=self.device))
            self._v.append(torch.empty(1, attn.n_kv_heads, 0, attn.head_dim, dtype=self.dtype, device=self.device))
            dim = attn.index_dim if isinstance(attn, MSAAttention) else 0
            self._ki.append(torch.empty(1, 0, dim, dtype=self.dtype, device=self.device))

    def _reserve(self, n_blocks: int) -> None:
        """Grow the buffers (doubling) to hold ``n_blocks`` blocks; unused slots stay invisible."""
        if n_blocks <= self._capacity:
            return
        new_cap = max(n_blocks, 2 * self._capacity, 16)
        extra = (new_cap - self._capacity) * self.block_size

        def grow(t: torch.Tensor, dim: int, fill=0) -> torch.Tensor:
            shape = list(t.shape)
            shape[dim] = extra
            return torch.cat([t, torch.full(shape, fill, dtype=t.dtype, device=t.device)], dim=dim)

        self._k_time = grow(self._k_time, 1, INT32_MAX)
        self._block_group = torch.cat([self._block_group, torch.full((new_cap - self._capacity,), -1,
                                                                     dtype=torch.long, device=self.device)])
        self._k = [grow(t, 2) for t in self._k]
        self._v = [grow(t, 2) for t in self._v]
        self._ki = [grow(t, 1) for t in self._ki]
        self._capacity = new_cap

    def _plan(self, per_group: list[list[tuple[int, int, bool, int]]]) -> _Tokens:
        """Slots for new tokens: ``per_group[g]`` lists (variate, patch, hidden, k_time) in order.
        Each group fills its open block, then opens fresh blocks after the last one in use."""
        bs = self.block_size
        variate, patch, group, hidden, k_time, slots = [], [], [], [], [], []
        new_groups: list[int] = []
        open_after, last_after = list(self._open), list(self._last_slot)
        next_block = self._n_blocks
        for g, toks in enumerate(per_group):
            if not toks:
                continue
            blocks, fill = ([self._open[g][0]], self._open[g][1]) if self._open[g] else ([], 0)
            n_new = -(-(fill + len(toks)) // bs) - len(blocks)
            blocks += list(range(next_block, next_block + n_new))
            new_groups += [g] * n_new
            next_block += n_new
            pos = torch.arange(len(toks)) + fill
            blocks_t = torch.tensor(blocks, dtype=torch.long)
            slots.append(blocks_t[pos // bs] * bs + pos % bs)
            end = fill + len(toks)
            open_after[g] = (blocks[-1], end % bs) if end % bs else None
            last_after[g] = int(slots[-1][-1])
            for v, t, hid, kt in toks:
                variate.append(v)
                patch.append(t)
                group.append(g)
                hidden.append(hid)
                k_time.append(kt)
        dev = self.device
        return _Tokens(
            variate=torch.tensor(variate, dtype=torch.long, device=dev),
            patch=torch.tensor(patch, dtype=torch.long, device=dev),
            group=torch.tensor(group, dtype=torch.long, device=dev),
            hidden=torch.tensor(hidden, dtype=torch.bool, device=dev),
            k_time=torch.tensor(k_time, dtype=torch.int32, device=dev),
            slots=torch.cat(slots).to(dev),
            new_block_groups=new_groups, open_after=open_after, last_slot_after=last_after)

    def _context_tokens(self, first_patch: int, n_patches: int) -> _Tokens:
        per_group = [[(v, t, False, t) for t in range(first_patch, first_patch + n_patches) for v in members]
                     for members in self.members]
        return self._plan(per_group)

    def _horizon_tokens(self) -> _Tokens:
        n_ctx, roles = self._n_ctx, self.model.roles
        visible_plan = self.model.future_covariates_visible
        per_group = []
        for members in self.members:
            toks = []
            for t in range(n_ctx, n_ctx + self.n_horizon_patches):
                for v in members:
                    if roles[v] not in ROLES_WITH_FUTURE:
                        continue
                    is_plan = roles[v] in ("future_covariate", "action")
                    toks.append((v, t, roles[v] == "target", n_ctx if (visible_plan and is_plan) else t))
            per_group.append(toks)
        return self._plan(per_group)

    def _stage(self, tokens: _Tokens) -> None:
        """Make the new tokens' slots visible (key times) and their blocks known; the K/V values are
        written layer by layer."""
        first = self._n_blocks
        n_new = len(tokens.new_block_groups)
        self._block_group[first:first + n_new] = torch.tensor(tokens.new_block_groups, dtype=torch.long,
                                                               device=self.device)
        self._k_time[0, tokens.slots] = tokens.k_time

    # ------------------------------------------------------------------ the network on new tokens
    def _token_patches(self, scaled: torch.Tensor, tokens: _Tokens, first_patch: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Values [n, P] and observed mask [n, P] of every new token from scaled rows
        ``[n_patches * P, V]`` starting at ``first_patch`` (hidden targets carry nothing)."""
        P = self.patch_len
        rows = scaled.view(-1, P, self.n_var)  # [n_patches, P, V]
        local = tokens.patch - first_patch
        values = rows[local, :, tokens.variate]  # [n, P]
        mask = ~torch.isnan(values) & ~tokens.hidden[:, None] & torch.isfinite(values)
        values = torch.where(mask, values, torch.zeros_like(values))
        return values.to(self.dtype), mask

    def _embed(self, values: torch.Tensor, mask: torch.Tensor, tokens: _Tokens) -> torch.Tensor:
        net = self.model
        x = net.input_proj(torch.cat([values, mask.to(values.dtype)], dim=-1))  # [n, d_model]
        role = torch.tensor([ROLES.index(r) for r in net.roles], device=self.device)[tokens.variate]
        x = x + net.variate_embed(tokens.variate) + net.role_embed(role)
        x = x + tokens.hidden[:, None] * net.hidden_embed
        return x[None]  # [1, n, d_model]

    def _forced(self, tokens: _Tokens) -> torch.Tensor:
        """Local blocks ``[G_sensor, n]`` of every new query: for sensor group g, the block holding
        g's latest data-carrying token not later than the query (the full layout's
        ``group_local_block``), and ``[0]`` row: the token's own block, or for hidden horizon targets
        its group's local block (``own_local_block``)."""
        bs = self.block_size
        n = tokens.slots.numel()
        n_groups = len(self.members)
        group_local = torch.empty(n_groups, n, dtype=torch.long, device=self.device)
        carries = ~tokens.hidden
        for g in range(n_groups):
            in_g = (tokens.group == g) & carries
            cand_slots = tokens.slots[in_g]
            cand_patch = tokens.patch[in_g]
            # Latest candidate (group-major order = time, then variate) with patch <= query patch.
            count = torch.searchsorted(cand_patch, tokens.patch, right=True)  # candidates are time-sorted
            fallback = torch.full_like(tokens.patch, self._last_slot[g])
            picked = torch.where(count > 0, cand_slots[(count - 1).clamp(min=0)] if len(cand_slots) else fallback,
                                 fallback)
            group_local[g] = picked // bs
        own = tokens.slots // bs
        own_local = torch.where(tokens.hidden, group_local[tokens.group, torch.arange(n, device=self.device)], own)
        return torch.cat([own_local[None], group_local])  # [1 + n_groups, n]

    def _run_layers(self, x: torch.Tensor, tokens: _Tokens, forced: torch.Tensor) -> torch.Tensor:
        """New tokens through every layer: write their K/V (and index keys) into the cache, then
        attend over the cache. Returns the hidden states after the last layer ``[1, n, d_model]``."""
        n_active = (self._n_blocks + len(tokens.new_block_groups)) * self.block_size
        q_time = tokens.patch.to(torch.int32)[None]  # [1, n]
        k_time = self._k_time[:, :n_active]
        slots = tokens.slots
        for li, layer in enumerate(self.model.layers):
            attn = layer.attention
            h = layer.norm1(x)
            n = h.shape[1]
            cos, sin = rope_angles(tokens.patch, attn.head_dim, attn.rope_base)
            q = apply_rope(attn.q_proj(h).view(1, n, attn.n_heads, attn.head_dim).transpose(1, 2), cos, sin)
            k = apply_rope(attn.k_proj(h).view(1, n, attn.n_kv_heads, attn.head_dim).transpose(1, 2), cos, sin)
            v = attn.v_proj(h).view(1, n, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
            self._k[li][:, :, slots] = k
            self._v[li][:, :, slots] = v
            k_cache, v_cache = self._k[li][:, :, :n_active], self._v[li][:, :, :n_active]
            if isinstance(attn, MSAAttention):
                cos_i, sin_i = rope_angles(tokens.patch, attn.index_dim, attn.rope_base)
                qi = apply_rope(attn.index_q(h).view(1, n, attn.n_kv_heads, attn.index_dim).transpose(1, 2), cos_i, sin_i)
                self._ki[li][:, slots] = apply_rope(attn.index_k(h), cos_i, sin_i)
                block_idx = self._select(attn, qi, self._ki[li][:, :n_active], q_time, k_time, forced, n_active)
                out, _ = kernels.decode_attention(q, k_cache, v_cache, block_idx, q_time, k_time, self.block_size)
            else:
                out = dense_decode_attention(q, k_cache, v_cache, q_time, k_time)
            out = attn.o_proj(out.transpose(1, 2).reshape(1, n, attn.n_heads * attn.head_dim))
            x = x + layer.dropout(out)
            x = x + layer.dropout(layer.mlp(layer.norm2(x)))
        return x

    def _select(self, attn: MSAAttention, qi, ki, q_time, k_time, forced, n_active) -> torch.Tensor:
        """The layer's group policy (as ``MSAAttention.select``) over the cache's blocks."""
        bs = self.block_size
        groups, n = attn.n_kv_heads, qi.shape[2]
        if attn.group_policy == "free":
            own = forced[0].view(1, 1, n, 1).expand(1, groups, n, 1).int().contiguous()
            return kernels.decode_select(qi, ki, q_time, k_time, bs, attn.top_k, None, own)
        n_blocks = n_active // bs
        block_group = self._block_group[:n_blocks]
        allowed = (block_group[None, :] == torch.arange(groups, device=self.device)[:, None])[None].contiguous()
        local = forced[1:][None, :, :, None].int().contiguous()  # [1, G, n, 1]
        if attn.group_policy == "sensor":
            return kernels.decode_select(qi, ki, q_time, k_time, bs, attn.top_k, allowed, local)
        first = kernels.decode_select(qi, ki, q_time, k_time, bs, attn.k_own, allowed, local)
        if attn.k_own == attn.top_k:
            return first
        return kernels.decode_select(qi, ki, q_time, k_time, bs, attn.top_k, None, first)

    # ------------------------------------------------------------------ appending patches
    @torch.no_grad()
    def _consume(self, values: np.ndarray, stamps: pd.DatetimeIndex | None) -> int:
        """Pending + new rows -> completed patches into the cache (all or nothing)."""
        P = self.patch_len
        rows = np.concatenate([self.pending, values]) if len(self.pending) else values
        n_new = len(rows) // P
        needed = self._blocks_after(n_new)
        if needed * self.block_size > self.max_tokens:
            raise StreamCapacityError(
                f"the cache holds {self.cached_tokens} token slots; with {n_new} more patches it would hold "
                f"{needed * self.block_size}, "
                f"beyond max_tokens={self.max_tokens}; raise max_tokens or start a new StreamingForecaster from "
                f"recent history")
        snapshot = (self._n_ctx, self._n_blocks, list(self._open), list(self._last_slot))
        done = 0
        try:
            while done < n_new:
                step = min(self._patches_per_chunk(), n_new - done)
                chunk = rows[done * P:(done + step) * P]
                self._append_patches(self.scaled(chunk), step)
                done += step
        except BaseException:
            self._rollback(snapshot)
            raise
        self.pending = rows[n_new * P:].copy()
        self.n_steps += len(values)
        if stamps is not None and len(stamps):
            self.last_stamp = stamps[-1]
        return n_new

    def _patches_per_chunk(self) -> int:
        """Patches appended per pass: at most ``prefill_patches``, and few enough that the per-pass
        score tiles (new queries x heads x cached tokens) stay below ~2^28 elements at long context."""
        rows = max(max(a.attention.n_heads, a.attention.n_kv_heads) for a in self.model.layers)
        per_patch = rows * self.n_var * max(self.cached_tokens, 1)
        return max(1, min(self.prefill_patches, (1 << 28) // per_patch))

    def _blocks_after(self, n_patches: int) -> int:
        bs = self.block_size
        total = self._n_blocks
        for g, members in enumerate(self.members):
            fill = self._open[g][1] if self._open[g] else 0
            total += -(-(fill + n_patches * len(members)) // bs) - (1 if self._open[g] else 0)
        return total

    def _append_patches(self, scaled: torch.Tensor, n_patches: int) -> None:
        tokens = self._context_tokens(self._n_ctx, n_patches)
        self._reserve(self._n_blocks + len(tokens.new_block_groups))
        values, mask = self._token_patches(scaled, tokens, self._n_ctx)
        x = self._embed(values, mask, tokens)
        self._stage(tokens)
        self._run_layers(x, tokens, self._forced(tokens))
        self._n_blocks += len(tokens.new_block_groups)
        self._open, self._last_slot = tokens.open_after, tokens.last_slot_after
        self._n_ctx += n_patches

    def _rollback(self, snapshot) -> None:
        """Forget every slot written after ``snapshot`` (key times back to unused)."""
        n_ctx, n_blocks, open_, last = snapshot
        first_free = [(o[0] * self.block_size + o[1]) if o else None for o in open_]
        for g, start in enumerate(first_free):
            if start is not None:
                end = (open_[g][0] + 1) * self.block_size
                self._k_time[0, start:end] = INT32_MAX
        self._k_time[0, n_blocks * self.block_size:] = INT32_MAX
        self._block_group[n_blocks:] = -1
        self._n_ctx, self._n_blocks, self._open, self._last_slot = n_ctx, n_blocks, open_, last


def dense_decode_attention(
    q: torch.Tensor,  # [B, Hq, Lq, D]
    k: torch.Tensor,  # [B, G, Lk, D]
    v: torch.Tensor,  # [B, G, Lk, D]
    q_time: torch.Tensor,  # [B, Lq] int32
    k_time: torch.Tensor,  # [B, Lk] int32
) -> torch.Tensor:
    """Dense attention of a few new queries over the whole cache, by time visibility. The query
    heads of a group are folded into the query axis, so the cache is read once per KV head (no
    ``repeat_interleave`` copy of a long cache). Queries with no visible key get 0."""
    batch, n_heads, n_q, dim = q.shape
    groups = k.shape[1]
    rep = n_heads // groups
    visible = k_time[:, None, :] <= q_time[:, :, None]  # [B, Lq, Lk]
    empty = ~visible.any(-1)  # [B, Lq]
    visible = visible | empty[..., None]  # keep softmax finite; zeroed below
    mask = visible[:, None, None].expand(batch, 1, rep, n_q, -1).reshape(batch, 1, rep * n_q, -1)
    qg = q.reshape(batch, groups, rep * n_q, dim)
    out = nn.functional.scaled_dot_product_attention(qg, k, v, attn_mask=mask)
    out = out.reshape(batch, n_heads, n_q, dim)  # SDPA's CUDA kernels may return a strided output
    return out.masked_fill(empty[:, None, :, None], 0.0)


@torch.no_grad()
def full_forecast(
    model: PatchTransformer,
    scaled_history: torch.Tensor,  # [C, V] scaled, NaN = missing
    horizon: int,
    scaled_future: torch.Tensor | None = None,  # [H, V] scaled, NaN = missing (targets ignored)
) -> torch.Tensor:
    """One full forward over the whole window (what the predictor does per origin): quantiles
    ``[n_targets, horizon, Q]`` in scaled units. The windowed reference of the streaming path."""
    device = next(model.parameters()).device
    ctx = scaled_history.to(device)
    hor = torch.full((horizon, ctx.shape[1]), float("nan"), dtype=ctx.dtype, device=device)
    if scaled_future is not None:
        hor[:scaled_future.shape[0]] = scaled_future.to(device)
    batch = {"context": torch.nan_to_num(ctx, nan=0.0)[None].float(), "context_mask": ~torch.isnan(ctx)[None],
             "horizon": torch.nan_to_num(hor, nan=0.0)[None].float(), "horizon_mask": ~torch.isnan(hor)[None]}
    dtype = next(model.parameters()).dtype
    batch = {k: (t.to(dtype) if t.is_floating_point() else t) for k, t in batch.items()}
    return model(batch, "predict").quantiles[0].float()


@dataclass
class RollingResult:
    """Rolling forecasts of one series: ``quantiles [W, n_targets, h, Q]`` in data units."""

    quantiles: torch.Tensor
    origins: list[int]  # row index of the first forecast step of each window
    seconds: float


def rolling_forecasts(
    model: Any,
    series: pd.DataFrame | torch.Tensor | np.ndarray,
    origins: list[int],
    schema: SeriesSchema | dict | None = None,
    horizon: int | None = None,
    start: int = 0,
    mode: str = "stream",
    max_tokens: int = 1 << 22,
) -> RollingResult:
    """Forecasts of one series at every origin (row index of the first forecast step), all with the
    context ``series[start:origin]`` and the scale frozen on ``series[start:origins[0]]``.

    ``mode="stream"`` feeds the series once through a :class:`StreamingForecaster` and forecasts at
    each origin; ``mode="windowed"`` re-encodes every window with a full forward (the predictor's
    path). Both give the same numbers; the stream reads each patch once. Every ``origin - start``
    must be a multiple of the model's ``patch_len`` (forecasts are issued at patch boundaries).
    Known-future covariates come from the series rows after each origin.
    """
    if mode not in ("stream", "windowed"):
        raise ValueError(f"mode must be 'stream' or 'windowed', got {mode!r}")
    origins = sorted(int(o) for o in origins)
    began = time.perf_counter()
    streamer = StreamingForecaster(model, _rows(series, start, origins[0]), schema=schema, horizon=horizon,
                                   max_tokens=max_tokens)
    P = streamer.patch_len
    for o in origins:
        if (o - start) % P:
            raise StreamInputError(f"origin {o} is not a patch boundary: origin - start ({o - start}) must be a multiple "
                                   f"of patch_len={P}")
    n_rows = len(series)
    raw = series[list(streamer.schema.names)].to_numpy(np.float64) if isinstance(series, pd.DataFrame) \
        else np.asarray(series.cpu() if isinstance(series, torch.Tensor) else series, dtype=np.float64)
    outs = []
    for o in origins:
        if o > n_rows:
            raise StreamInputError(f"origin {o} is past the end of the series ({n_rows} rows)")
        future_raw = raw[o:o + streamer.horizon]
        future = future_raw[:, streamer.future_index] if streamer.future_index else None
        if mode == "stream":
            if o > start + streamer.n_steps:
                streamer.update(_rows(series, start + streamer.n_steps, o))
            outs.append(streamer.forecast(future=future).quantiles)
        else:
            known = np.full((streamer.horizon, streamer.n_var), np.nan)
            known[:len(future_raw), streamer.future_index] = future_raw[:, streamer.future_index]
            scaled_future = streamer.scaled(known)
            q = full_forecast(streamer.model, streamer.scaled(raw[start:o]), streamer.horizon, scaled_future)
            t = streamer.target_index
            outs.append(q * streamer.scale[t, None, None] + streamer.loc[t, None, None])
    return RollingResult(quantiles=torch.stack(outs), origins=origins, seconds=time.perf_counter() - began)


def _rows(series, begin: int, end: int):
    if isinstance(series, pd.DataFrame):
        return series.iloc[begin:end]
    return series[begin:end]


def rolling_quantile_forecasts(result: RollingResult, index: pd.DatetimeIndex, levels: tuple[float, ...],
                               item_id: str | None = None) -> list:
    """GluonTS ``QuantileForecast``s of a :func:`rolling_forecasts` result, one per origin, keyed like
    the predictor's (the quantile levels as strings, then ``"mean"`` = mean of the quantiles).
    ``index`` is the series' time index (it gives each window's start period). Univariate targets
    get ``[Q + 1, h]`` arrays, several targets ``[Q + 1, h, n_targets]``."""
    from gluonts.model.forecast import QuantileForecast

    keys = [str(round(float(q), 4)) for q in levels] + ["mean"]
    freq = index.freq or pd.infer_freq(index)
    out = []
    for w, origin in enumerate(result.origins):
        q = result.quantiles[w].float()  # [T, h, Q]
        arrays = torch.cat([q, q.mean(-1, keepdim=True)], dim=-1).permute(2, 1, 0).cpu().numpy()  # [Q + 1, h, T]
        if arrays.shape[-1] == 1:
            arrays = arrays[..., 0]
        out.append(QuantileForecast(arrays, start_date=pd.Period(index[origin], freq=freq), forecast_keys=keys,
                                    item_id=item_id))
    return out
