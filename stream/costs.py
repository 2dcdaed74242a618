"""The cost model shared by the live pipeline and the offline evaluator, with the papers' presets.

Costs are in λ units (λ = per-layer compute cost on the device). A sample's cost is computed from
what really ran for it (a :class:`Trace`), so live results and offline evaluation agree exactly.

The papers state their costs for 12-layer models. What carries over to an L-layer model is the ratio
o / (λL), so a preset built for ``num_layers=L`` scales its default offload cost by L / 12 (SplitEE's
o = 5λ becomes 2.5λ on 6 layers); a value the user gives is taken literally.

>>> splitee(num_layers=6).offload_cloud, splitee(num_layers=12).offload_cloud, splitee(3.0, num_layers=6).offload_cloud
(2.5, 5.0, 3.0)
>>> round(preset("splitee", num_layers=6).offload_ratio(6), 4)     # o / (λL) = 5 / 12, as in the paper
0.4167
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from stream.errors import ConfigError

Tier = Literal["device", "edge", "cloud"]
TIERS: tuple[Tier, ...] = ("device", "edge", "cloud")


@dataclasses.dataclass(frozen=True)
class Trace:
    """What ran for one sample: layers and evaluated exits per tier, and where it was offloaded."""

    device_layers: int = 0
    device_exits: int = 0
    tier: Tier = "device"
    edge_layers: int = 0
    cloud_layers: int = 0

    def __post_init__(self) -> None:
        if self.tier not in TIERS:
            raise ConfigError(f"trace tier must be one of {TIERS}, got {self.tier!r}")
        for field in ("device_layers", "device_exits", "edge_layers", "cloud_layers"):
            if getattr(self, field) < 0:
                raise ConfigError(f"trace {field} must be >= 0, got {getattr(self, field)}")


@dataclasses.dataclass(frozen=True)
class Cost:
    """Cost breakdown of one sample (or a sum of samples), in λ units."""

    device: float = 0.0
    edge: float = 0.0
    offload: float = 0.0
    fee: float = 0.0

    @property
    def total(self) -> float:
        return self.device + self.edge + self.offload + self.fee

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.device + other.device, self.edge + other.edge,
                    self.offload + other.offload, self.fee + other.fee)

    def as_dict(self) -> dict[str, float]:
        return {"device": self.device, "edge": self.edge, "offload": self.offload,
                "fee": self.fee, "total": self.total}


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Per-layer, per-exit, offload and fee costs (λ units) and the reward trade-off μ.

    * ``device_layer`` (SplitEE λ1, DIMEE λ_m): running one layer on the device.
    * ``device_exit`` (SplitEE λ2): evaluating one exit head on the device.
    * ``edge_layer`` / ``cloud_layer``: one layer on the edge (DIMEE λ_e) / in the cloud.
    * ``offload_edge`` / ``offload_cloud`` (DIMEE o_e / o_c, SplitEE o): sending a sample there.
    * ``cloud_fee`` (DIMEE γ): charged per sample the cloud serves.
    * ``mu``: weight of cost against confidence in the rewards (SplitEE μ).
    """

    name: str = "custom"
    device_layer: float = 1.0
    device_exit: float = 0.0
    edge_layer: float = 0.0
    cloud_layer: float = 0.0
    offload_edge: float = 5.0
    offload_cloud: float = 5.0
    cloud_fee: float = 0.0
    mu: float = 0.1

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name != "name" and not (isinstance(value, (int, float)) and value >= 0):
                raise ConfigError(f"cost model {self.name!r}: {field.name} must be a number >= 0, got {value!r}")

    @property
    def lam(self) -> float:
        """λ: the per-layer device cost including its exit (λ1 + λ2)."""
        return self.device_layer + self.device_exit

    def breakdown(self, trace: Trace) -> Cost:
        offload = {"device": 0.0, "edge": self.offload_edge, "cloud": self.offload_cloud}[trace.tier]
        return Cost(
            device=self.device_layer * trace.device_layers + self.device_exit * trace.device_exits,
            edge=self.edge_layer * trace.edge_layers + self.cloud_layer * trace.cloud_layers,
            offload=offload,
            fee=self.cloud_fee if trace.tier == "cloud" else 0.0,
        )

    def final_exit_cost(self, num_layers: int) -> float:
        """Reference cost: every layer and every exit on the device (SplitEE's Final-exit pays λ·L)."""
        return self.breakdown(Trace(device_layers=num_layers, device_exits=num_layers)).total

    def offload_ratio(self, num_layers: int) -> float:
        """o / (λL): the offload cost as a share of a full local pass, the figure that carries across depths."""
        return self.offload_cloud / (self.lam * num_layers)

    def describe(self, num_layers: int) -> str:
        """One line for reports: the preset, o and its ratio o / (λL), μ."""
        return (f"{self.name} costs, o = {self.offload_cloud:g}λ (o/(λL) = {self.offload_ratio(num_layers):.3f} "
                f"at L = {num_layers}), μ = {self.mu:g}")

    def with_overrides(self, **overrides: float) -> "CostModel":
        names = {f.name for f in dataclasses.fields(self)} - {"name"}
        unknown = set(overrides) - names
        if unknown:
            raise ConfigError(f"unknown cost parameter(s) {sorted(unknown)}; expected some of {sorted(names)}")
        return dataclasses.replace(self, **{k: float(v) for k, v in overrides.items()})


#: The depth the papers' cost figures are stated for (BERT-base / ElasticBERT-base).
PAPER_LAYERS = 12


def scaled(value: float, num_layers: int | None) -> float:
    """A 12-layer cost figure carried to ``num_layers`` layers by the ratio value / L (None: as printed)."""
    return value if num_layers is None else value * num_layers / PAPER_LAYERS


def splitee(offload: float | None = None, num_layers: int | None = None) -> CostModel:
    """SplitEE §5.2: λ = λ1 + λ2 = 1 with λ2 = λ1/6, offload o (1..5 λ, default 5λ·L/12), μ = 0.1."""
    if offload is None:
        offload = scaled(5.0, num_layers)
    return CostModel(name="splitee", device_layer=6 / 7, device_exit=1 / 7, edge_layer=0.0,
                     cloud_layer=0.0, offload_edge=offload, offload_cloud=offload, cloud_fee=0.0, mu=0.1)


def dimee(fee: float | None = None, num_layers: int | None = None) -> CostModel:
    """DIMEE §V: λ_m = 1.5λ, λ_e = λ, o_e = 2.5λ, o_c = 3λ (12 layers; scaled by L/12), cloud fee γ.

    γ is not given in the paper. Ours: the cloud charges its compute of the whole backbone at the edge's
    price, γ = λ_e·L (12λ for BERT-base, 6λ on 6 layers), so a cloud inference (o_c + γ = 15λ·L/12) costs
    more than any edge one (at most o_e + λ_e·n = 8.5λ·L/12), the order the paper's tiers assume. With a
    small γ (say 1λ) the cloud is the cheapest tier for any sample that does not exit at mobile layer 1,
    and every router degenerates to "all to the cloud". ``exitflow reproduce dimee`` sweeps γ as well.
    """
    return CostModel(name="dimee", device_layer=1.5, device_exit=0.0, edge_layer=1.0, cloud_layer=0.0,
                     offload_edge=scaled(2.5, num_layers), offload_cloud=scaled(3.0, num_layers),
                     cloud_fee=scaled(12.0, num_layers) if fee is None else fee, mu=0.1)


PRESETS = {"splitee": splitee, "dimee": dimee}


def parse_overrides(items: list[str] | None) -> dict[str, float]:
    """``--cost KEY=VALUE`` items as numbers: ``['mu=0.05']`` → ``{'mu': 0.05}``; fields are checked by the preset."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--cost expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"--cost {key.strip()}={value.strip()!r}: expected a number") from None
    return out


def preset(name: str, num_layers: int | None = None, **overrides: float) -> CostModel:
    """A named preset for an ``num_layers``-layer model, optionally overridden (``preset('splitee', offload_cloud=3)``).

    ``num_layers=None`` keeps the papers' figures as printed (their 12-layer reading).
    """
    if num_layers is not None and num_layers < 1:
        raise ConfigError(f"cost model {name!r}: num_layers must be >= 1, got {num_layers!r}")
    try:
        model = PRESETS[name](num_layers=num_layers)
    except KeyError:
        raise ConfigError(f"unknown cost model {name!r}; expected one of {sorted(PRESETS)}") from None
    return model.with_overrides(**overrides) if overrides else model
