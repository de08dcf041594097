"""Variates, their roles and sensor groups: the static description of a multivariate series."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from pandas.tseries.frequencies import to_offset

from .errors import DataValidationError

VariateRole = Literal["target", "past_covariate", "future_covariate", "action"]
# Fixed order: variates are laid out targets first, then past, future covariates, actions.
ROLES: tuple[str, ...] = get_args(VariateRole)
# Roles whose values are known over the forecast horizon (actions = planned control inputs).
KNOWN_FUTURE_ROLES: frozenset[str] = frozenset({"future_covariate", "action"})


def normalize_freq(freq: str) -> str:
    """Canonical pandas frequency string ('H' -> 'h', '30T' -> '30min'); raise on garbage."""
    try:
        return to_offset(freq).freqstr
    except (ValueError, TypeError) as err:
        raise DataValidationError(
            f"freq={freq!r} is not a pandas frequency string; use e.g. '30min', 'h', 'D', 'W-SUN', 'MS'"
        ) from err


def same_freq(a: str, b: str) -> bool:
    """Frequencies equal as offsets ('h' == '60min')."""
    return to_offset(a) == to_offset(b)


@dataclass(frozen=True)
class Variate:
    """One channel of a series.

    binary: values are 0/1 flags (holidays, on/off actions); such channels are left unscaled.
    It is a property of the data, not of identity, so it is ignored by ==.
    """

    name: str
    role: str
    group: str
    binary: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise DataValidationError(
                f"variate {self.name!r} has role {self.role!r}; expected one of {list(ROLES)}"
            )


@dataclass(frozen=True)
class SeriesSchema:
    """Ordered variates plus the sampling frequency, shared by all items of a collection."""

    variates: tuple[Variate, ...]
    freq: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "variates", tuple(self.variates))
        object.__setattr__(self, "freq", normalize_freq(self.freq))
        if not self.variates:
            raise DataValidationError("a schema needs at least one variate (got none)")
        seen: set[str] = set()
        for v in self.variates:
            if v.name in seen:
                raise DataValidationError(f"variate name {v.name!r} appears twice; names must be unique")
            seen.add(v.name)
        if not self.target_indices:
            raise DataValidationError("a schema needs at least one variate with role 'target'")

    # --- per-variate views -------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(v.name for v in self.variates)

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(v.role for v in self.variates)

    @property
    def groups(self) -> tuple[str, ...]:
        return tuple(v.group for v in self.variates)

    @property
    def binary(self) -> tuple[bool, ...]:
        return tuple(v.binary for v in self.variates)

    @property
    def n_variates(self) -> int:
        return len(self.variates)

    @property
    def group_names(self) -> tuple[str, ...]:
        """Unique sensor-group names in order of first appearance."""
        return tuple(dict.fromkeys(v.group for v in self.variates))

    @property
    def group_index(self) -> tuple[int, ...]:
        """Sensor-group id of every variate (index into group_names)."""
        pos = {g: i for i, g in enumerate(self.group_names)}
        return tuple(pos[v.group] for v in self.variates)

    @property
    def role_index(self) -> tuple[int, ...]:
        """Role id of every variate (index into ROLES)."""
        return tuple(ROLES.index(v.role) for v in self.variates)

    def indices_of(self, *roles: str) -> tuple[int, ...]:
        """Positions of the variates having any of the given roles."""
        for r in roles:
            if r not in ROLES:
                raise ValueError(f"unknown role {r!r}; expected one of {list(ROLES)}")
        return tuple(i for i, v in enumerate(self.variates) if v.role in roles)

    @property
    def target_indices(self) -> tuple[int, ...]:
        return self.indices_of("target")

    @property
    def known_future(self) -> tuple[bool, ...]:
        """True for variates whose horizon values the model may see (future covariates, actions)."""
        return tuple(v.role in KNOWN_FUTURE_ROLES for v in self.variates)

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"no variate named {name!r}; variates are {list(self.names)}") from None

    # --- persistence & comparison ------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, e.g. for a checkpoint's hyper-parameters."""
        return {
            "freq": self.freq,
            "variates": [
                {"name": v.name, "role": v.role, "group": v.group, "binary": v.binary} for v in self.variates
            ],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SeriesSchema":
        return cls(
            variates=tuple(
                Variate(name=v["name"], role=v["role"], group=v["group"], binary=bool(v.get("binary", False)))
                for v in d["variates"]
            ),
            freq=d["freq"],
        )

    def with_binary(self, binary: tuple[bool, ...]) -> "SeriesSchema":
        """Copy with new binary flags (used to agree flags across the items of a collection)."""
        return SeriesSchema(
            variates=tuple(
                Variate(v.name, v.role, v.group, bool(b)) for v, b in zip(self.variates, binary, strict=True)
            ),
            freq=self.freq,
        )

    def differences(self, other: "SeriesSchema") -> list[str]:
        """Human-readable list of what differs (empty if compatible)."""
        diffs: list[str] = []
        if self.names != other.names:
            missing = [n for n in self.names if n not in other.names]
            extra = [n for n in other.names if n not in self.names]
            msg = f"variates differ: expected {list(self.names)}, got {list(other.names)}"
            if missing or extra:
                msg += f" (missing {missing}, unexpected {extra})"
            else:
                msg += " (same names, different order)"
            diffs.append(msg)
        else:
            for a, b in zip(self.variates, other.variates):
                if a.role != b.role:
                    diffs.append(f"role of {a.name!r} differs: expected {a.role!r}, got {b.role!r}")
                if a.group != b.group:
                    diffs.append(f"sensor group of {a.name!r} differs: expected {a.group!r}, got {b.group!r}")
        if not same_freq(self.freq, other.freq):
            diffs.append(f"frequency differs: expected {self.freq!r}, got {other.freq!r}")
        return diffs

    def check_compatible(self, other: "SeriesSchema") -> None:
        """Raise DataValidationError (a ValueError) naming every difference: variates, roles, groups, freq."""
        diffs = self.differences(other)
        if diffs:
            raise DataValidationError("incompatible series schemas: " + "; ".join(diffs))
