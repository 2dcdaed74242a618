"""Policy names → classes, and building a policy from ``--set key=value`` strings with clear errors."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from stream.costs import CostModel
from stream.errors import ConfigError

from policies.base import Policy

# One module per policy family; each module's classes register by their ``name``.
MODULES = ("policies.baselines", "policies.splitee", "policies.dimee", "policies.deex", "policies.eenet",
           "policies.oracle")


def registry() -> dict[str, type[Policy]]:
    """Every policy class by name (modules not present in this tree are skipped)."""
    out: dict[str, type[Policy]] = {}
    for module_name in MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        for obj in vars(module).values():
            if inspect.isclass(obj) and issubclass(obj, Policy) and obj.name and obj.__module__ == module_name:
                out[obj.name] = obj
    return out


def parameters(cls: type[Policy]) -> dict[str, inspect.Parameter]:
    """The settings a policy takes (its constructor keywords), without the shared ones."""
    params = {}
    for klass in reversed(cls.__mro__):
        if klass is object or "__init__" not in vars(klass):
            continue
        for name, param in inspect.signature(klass.__init__).parameters.items():
            if name not in ("self", "cost", "num_layers", "num_classes") and param.kind is param.KEYWORD_ONLY:
                params[name] = param
    return params


def _coerce(policy: str, key: str, raw: Any, default: Any) -> Any:
    if not isinstance(raw, str):
        return raw
    kind = type(default) if default not in (inspect.Parameter.empty, None) else str
    try:
        if kind is bool:
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1", "yes")
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        if default is None:  # optional number or string: best effort
            for conv in (int, float):
                try:
                    return conv(raw)
                except ValueError:
                    pass
        return raw
    except ValueError:
        raise ConfigError(f"policy {policy!r}: parameter {key}={raw!r} is not a valid "
                          f"{kind.__name__}") from None


def build(name: str, params: dict[str, Any] | None = None, *, cost: CostModel, num_layers: int,
          num_classes: int = 2, live: bool = False) -> Policy:
    """Build policy ``name`` with ``params`` (strings are converted to the constructor's types)."""
    classes = registry()
    if name not in classes:
        raise ConfigError(f"unknown policy {name!r}; expected one of {', '.join(sorted(classes))}")
    cls = classes[name]
    if live and cls.offline_only:
        raise ConfigError(f"policy {name!r} reads labels or hindsight: offline evaluation only (exitflow eval)")
    accepted = parameters(cls)
    params = dict(params or {})
    unknown = set(params) - set(accepted)
    if unknown:
        raise ConfigError(f"policy {name!r}: unknown parameter(s) {sorted(unknown)}; "
                          f"it takes {sorted(accepted) or 'none'}")
    kwargs = {k: _coerce(name, k, v, accepted[k].default) for k, v in params.items()}
    try:
        policy = cls(cost=cost, num_layers=num_layers, num_classes=num_classes, **kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"policy {name!r}: {exc}") from None
    if live and policy.offline_only:  # a setting can make it read hindsight (splitee-s side_info=oracle)
        raise ConfigError(f"policy {name!r} with {params} reads labels or hindsight: offline evaluation only "
                          f"(exitflow eval)")
    return policy


def parse_sets(items: list[str] | None) -> dict[str, str]:
    """``['alpha=0.9', 'split=3']`` → ``{'alpha': '0.9', 'split': '3'}``."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out
