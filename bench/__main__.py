"""Dispatch `python -m bench [NAME [ARGS...]]` to ``bench/NAME.py``'s ``main(argv)``; no NAME runs them all."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path


def available() -> list[str]:
    """Modules of this package that define a ``main(argv)``, by name."""
    names = []
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"bench.{info.name}")
        if callable(getattr(module, "main", None)):
            names.append(info.name)
    return sorted(names)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    names = available()
    if argv and argv[0] in ("-h", "--help"):
        print(f"usage: python -m bench [NAME [ARGS...]]\n\nNAME is one of: {', '.join(names)}; "
              "without NAME every bench runs with its defaults. `python -m bench NAME --help` shows its options.")
        return 0
    if argv:
        name, rest = argv[0], argv[1:]
        if name not in names:
            print(f"python -m bench: unknown bench {name!r}; expected one of {', '.join(names)}", file=sys.stderr)
            return 2
        return int(importlib.import_module(f"bench.{name}").main(rest) or 0)
    worst = 0
    for name in names:
        print(f"== bench {name}", flush=True)
        worst = max(worst, int(importlib.import_module(f"bench.{name}").main([]) or 0))
    return worst


if __name__ == "__main__":
    sys.exit(main())
