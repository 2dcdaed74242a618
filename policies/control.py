"""The active policy, kept in Redis so every worker switches at its next batch boundary (hot swap).

``use`` first builds the policy (a bad parameter raises and leaves the current one serving), then
writes name, settings, cost model and a new version number in one MULTI. Workers read the small
``active`` hash once per batch and rebuild only when the version changed. Learned state is kept per
namespace (name + parameter hash), so A → B → A resumes A where it stopped.

Epochs: a namespace's state can start over (the device worker's drift hook, :class:`policies.state.EpochStart`).
``epoch:<ns>`` holds its current epoch ``n`` and the event that began each (``e<k>``); ``epochs`` lists
the latest events of every namespace for the monitor. The drift hook's settings (``drift_hook``, JSON)
are one per deployment, so every device worker runs the same detector.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from stream.costs import CostModel, preset
from stream.errors import ConfigError

from policies.base import Policy
from policies.registry import build


@dataclasses.dataclass(frozen=True)
class ActiveSpec:
    """What `exitflow policy use` wrote: a policy name, its settings and the cost model, with a version."""

    name: str
    params: dict[str, Any]
    cost: str = "splitee"
    cost_overrides: dict[str, float] = dataclasses.field(default_factory=dict)
    version: int = 0

    def cost_model(self, num_layers: int) -> CostModel:
        """The cost model for a ``num_layers``-layer model: the preset scaled to that depth, then the overrides."""
        return preset(self.cost, num_layers=num_layers, **self.cost_overrides)

    def build(self, num_layers: int, num_classes: int) -> Policy:
        return build(self.name, self.params, cost=self.cost_model(num_layers), num_layers=num_layers,
                     num_classes=num_classes, live=True)


class PolicyControl:
    """Reads and changes the active policy of one exitflow deployment (a Redis key prefix)."""

    def __init__(self, redis, prefix: str = "exitflow:") -> None:
        self.redis = redis
        self.key = prefix + "active"
        self.prefix = prefix

    def current(self) -> ActiveSpec | None:
        raw = self.redis.hgetall(self.key)
        if not raw:
            return None
        raw = {k.decode(): v.decode() for k, v in raw.items()}
        return ActiveSpec(raw["name"], json.loads(raw.get("params", "{}")), raw.get("cost", "splitee"),
                          json.loads(raw.get("cost_overrides", "{}")), int(raw.get("version", 0)))

    def num_layers(self) -> int | None:
        """The depth of the model the active policy was built for (None before the first `use`)."""
        raw = self.redis.hget(self.key, "num_layers")
        return None if raw is None else int(raw)

    def version(self) -> int:
        return int(self.redis.hget(self.key, "version") or 0)

    def use(self, name: str, params: dict[str, Any] | None = None, *, cost: str = "splitee",
            cost_overrides: dict[str, float] | None = None, num_layers: int = 6,
            num_classes: int = 2) -> ActiveSpec:
        """Validate by building, then make it active for every worker; returns the new spec."""
        spec = ActiveSpec(name, dict(params or {}), cost, dict(cost_overrides or {}))
        policy = spec.build(num_layers, num_classes)  # raises ConfigError, the current policy keeps serving
        info = json.dumps({"name": name, "params": spec.params, "cost": cost, "cost_overrides": spec.cost_overrides,
                           "num_layers": num_layers, "num_classes": num_classes}, sort_keys=True)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self.key, mapping={"name": name, "params": json.dumps(spec.params, sort_keys=True),
                                     "cost": cost, "cost_overrides": json.dumps(spec.cost_overrides),
                                     "num_layers": num_layers})
        pipe.hincrby(self.key, "version", 1)
        pipe.hset(self.prefix + "namespaces", policy.namespace(), info)
        _, version, _ = pipe.execute()
        return dataclasses.replace(spec, version=int(version))

    def namespace_info(self, namespace: str) -> dict[str, Any] | None:
        """How the policy of ``namespace`` was built (recorded by :meth:`use`), or None if unknown."""
        raw = self.redis.hget(self.prefix + "namespaces", namespace)
        return None if raw is None else json.loads(raw)

    def ensure(self, default: ActiveSpec, num_layers: int, num_classes: int) -> ActiveSpec:
        """The active spec, making ``default`` active first if none is set yet."""
        current = self.current()
        if current is not None:
            return current
        return self.use(default.name, default.params, cost=default.cost, cost_overrides=default.cost_overrides,
                        num_layers=num_layers, num_classes=num_classes)

    def reset(self, namespace: str) -> int:
        """Forget the learned state of one policy namespace (``name:hash``); returns keys deleted."""
        if ":" not in namespace:
            raise ConfigError(f"reset expects a namespace name:hash (see `exitflow policy show`), got {namespace!r}")
        return int(self.redis.delete(f"{self.prefix}state:{namespace}"))

    def epoch(self, namespace: str) -> int:
        """The current epoch of a base namespace's state (0 before any)."""
        return int(self.redis.hget(f"{self.prefix}epoch:{namespace}", "n") or 0)

    def epoch_events(self, namespace: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """The latest epoch starts (of every namespace, or of one), oldest first."""
        if namespace is not None:
            from policies.state import epoch_events
            return epoch_events(self.redis, namespace, self.prefix)[-limit:]
        return [json.loads(raw) for raw in self.redis.lrange(self.prefix + "epochs", -limit, -1)]

    def watch(self, namespace: str) -> tuple[int, int, str | None]:
        """What a device worker reads once per batch, in one round trip: the active version, the epoch of
        ``namespace`` and the drift hook's settings (JSON, None when unset)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hget(self.key, "version")
        pipe.hget(f"{self.prefix}epoch:{namespace}", "n")
        pipe.get(self.prefix + "drift_hook")
        version, epoch, hook = pipe.execute()
        return int(version or 0), int(epoch or 0), None if hook is None else hook.decode()

    def drift_hook(self) -> dict[str, Any] | None:
        """The deployment's drift hook settings as set by :meth:`set_drift_hook` (None: the workers' default)."""
        raw = self.redis.get(self.prefix + "drift_hook")
        return None if raw is None else json.loads(raw)

    def set_drift_hook(self, settings: dict[str, Any] | None) -> None:
        """Set (or with None, clear) the drift hook settings every device worker reads at its next batch."""
        if settings is None:
            self.redis.delete(self.prefix + "drift_hook")
        else:
            self.redis.set(self.prefix + "drift_hook", json.dumps(settings, sort_keys=True))

    def namespaces(self) -> list[str]:
        start = len(self.prefix + "state:")
        return sorted(k.decode()[start:] for k in self.redis.scan_iter(match=self.prefix + "state:*"))
