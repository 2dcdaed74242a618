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

**A link** (:class:`Link`, presets ``LINKS``) prices an offload by its real size instead of a constant:
o = λ · (RTT + bytes / uplink bandwidth) / (time of one device layer), with the layer time measured by
``python -m bench model``. It is set through the cost overrides ``link_rtt_ms``, ``link_mbps``,
``layer_ms`` (and ``link_ref_bytes``, the size that prices an offload whose bytes are not known yet), which
:func:`link_overrides` fills from a preset; a trace's ``offload_bytes`` (the offload message's real size,
recorded by the edge/cloud stage) is what it charges. Without a link, o is the constant, as in the papers.

>>> c = preset("splitee", num_layers=6, **link_overrides("4g", layer_ms=4.0))
>>> round(c.breakdown(Trace(1, 1, tier="cloud", offload_bytes=50_000)).offload, 2)   # (20 + 68.38) / 4
22.09
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
    offload_bytes: int = 0  # size of the offload message (0: none, or not known yet)

    def __post_init__(self) -> None:
        if self.tier not in TIERS:
            raise ConfigError(f"trace tier must be one of {TIERS}, got {self.tier!r}")
        for field in ("device_layers", "device_exits", "edge_layers", "cloud_layers", "offload_bytes"):
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

    def offload_cost(self, tier: Tier, nbytes: int = 0) -> float:
        """o of an offload to ``tier`` of ``nbytes`` bytes (0 on the device); a constant without a link."""
        return {"device": 0.0, "edge": self.offload_edge, "cloud": self.offload_cloud}[tier]

    def breakdown(self, trace: Trace) -> Cost:
        return Cost(
            device=self.device_layer * trace.device_layers + self.device_exit * trace.device_exits,
            edge=self.edge_layer * trace.edge_layers + self.cloud_layer * trace.cloud_layers,
            offload=self.offload_cost(trace.tier, trace.offload_bytes),
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
        """A copy with fields replaced; a link field (``link_mbps``, …) makes it a :class:`LinkedCostModel`."""
        names = {f.name for f in dataclasses.fields(LinkedCostModel)} - {"name"}
        unknown = set(overrides) - names
        if unknown:
            raise ConfigError(f"unknown cost parameter(s) {sorted(unknown)}; expected some of {sorted(names)}")
        cls = LinkedCostModel if set(overrides) & set(LINK_FIELDS) else type(self)
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return cls(**{**values, **{k: float(v) for k, v in overrides.items()}})


@dataclasses.dataclass(frozen=True)
class Link:
    """An uplink from the device to the edge/cloud: round-trip time and bandwidth.

    Presets (``LINKS``), mean uplink bandwidth and RTT:

    * ``3g`` 1.1 Mbit/s, ``4g`` (LTE) 5.85 Mbit/s, ``wifi`` 18.88 Mbit/s: the uplink bandwidths measured
      by Neurosurgeon (Kang et al., ASPLOS 2017), the figures the SplitEE paper (its ref. [12]) and the
      split-computing survey (Matsubara et al., its ref. [60]) build on.
    * ``5g`` 50 Mbit/s: ITU-R M.2410-0 (IMT-2020 minimum requirements), user-experienced uplink data rate.
    * RTT: 2 × the user-plane latency requirement of ITU-R M.2410-0 for 5G (4 ms → 8 ms) and of ITU-R
      M.2134 for 4G/IMT-Advanced (10 ms → 20 ms); 3G 100 ms and Wi-Fi 5 ms are typical values
      (assumptions, not from a standard).

    Both tiers are reached over the same uplink (the edge/cloud RTT difference is not modelled).

    >>> round(LINKS["4g"].ms(98_304), 1), round(LINKS["4g"].ms(49_664), 1)   # 128 tokens, f16 / i8
    (154.4, 87.9)
    """

    name: str
    rtt_ms: float
    mbps: float

    def ms(self, nbytes: float) -> float:
        """Time to deliver ``nbytes`` bytes: RTT + bytes / bandwidth, in milliseconds."""
        return self.rtt_ms + float(nbytes) * 8 / (self.mbps * 1e3)


LINKS = {"3g": Link("3g", 100.0, 1.1), "4g": Link("4g", 20.0, 5.85), "5g": Link("5g", 8.0, 50.0),
         "wifi": Link("wifi", 5.0, 18.88)}
LINK_FIELDS = ("link_rtt_ms", "link_mbps", "layer_ms", "link_ref_bytes")

#: ms per sample of one device layer with its exit: the default model's full pass at 128 tokens, batch
#: 32, 2 threads (`python -m bench model`: 20.43 ms per sample for 6 layers), divided by its 6 layers.
DEFAULT_LAYER_MS = 3.4


@dataclasses.dataclass(frozen=True)
class LinkedCostModel(CostModel):
    """A cost model that prices an offload by its bytes over a link: o = λ · link.ms(bytes) / layer_ms.

    An offload whose size is not known (a trace with ``offload_bytes = 0``, e.g. a policy's estimate before
    the remote stage answered) costs the link's price of ``link_ref_bytes``; with ``link_ref_bytes = 0`` it
    keeps the constant ``offload_edge`` / ``offload_cloud``. With ``link_ref_bytes > 0`` those constants are
    set to that price, so the policies that read them (routing, reports) see the link too.
    """

    link_rtt_ms: float = 0.0
    link_mbps: float = 0.0
    layer_ms: float = DEFAULT_LAYER_MS
    link_ref_bytes: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.link_mbps <= 0 or self.layer_ms <= 0:
            raise ConfigError(f"cost model {self.name!r}: a link needs link_mbps > 0 and layer_ms > 0, got "
                              f"link_mbps={self.link_mbps!r}, layer_ms={self.layer_ms!r}")
        if self.link_ref_bytes > 0:
            ref = self.link_cost(self.link_ref_bytes)
            object.__setattr__(self, "offload_edge", ref)
            object.__setattr__(self, "offload_cloud", ref)

    @property
    def link(self) -> Link:
        return Link("custom", self.link_rtt_ms, self.link_mbps)

    def link_cost(self, nbytes: float) -> float:
        """o in λ units for an offload of ``nbytes`` bytes."""
        return self.lam * self.link.ms(nbytes) / self.layer_ms

    def offload_cost(self, tier: Tier, nbytes: int = 0) -> float:
        if tier == "device" or nbytes <= 0:
            return super().offload_cost(tier, nbytes)
        return self.link_cost(nbytes)

    def describe(self, num_layers: int) -> str:
        return (f"{super().describe(num_layers)}; link RTT {self.link_rtt_ms:g} ms, {self.link_mbps:g} Mbit/s, "
                f"device layer {self.layer_ms:g} ms (o from each offload's bytes; {self.offload_cloud:.3g}λ at "
                f"{self.link_ref_bytes:.0f} bytes)")


def link_overrides(link: str | Link, layer_ms: float | None = None, ref_bytes: int = 0) -> dict[str, float]:
    """The cost overrides that put ``link`` (a preset name or a :class:`Link`) under a cost preset.

    >>> link_overrides("wifi", layer_ms=3.4, ref_bytes=49_664)
    {'link_rtt_ms': 5.0, 'link_mbps': 18.88, 'layer_ms': 3.4, 'link_ref_bytes': 49664.0}
    """
    if isinstance(link, str):
        try:
            link = LINKS[link]
        except KeyError:
            raise ConfigError(f"unknown link {link!r}; expected one of {sorted(LINKS)}") from None
    return {"link_rtt_ms": link.rtt_ms, "link_mbps": link.mbps,
            "layer_ms": DEFAULT_LAYER_MS if layer_ms is None else float(layer_ms), "link_ref_bytes": float(ref_bytes)}


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
