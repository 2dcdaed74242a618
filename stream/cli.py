"""The `exitflow` command: one CLI for everything, each subcommand in the module that owns it.

Each module in COMMANDS defines ``register(subparsers)``, adding its parser(s) and setting
``func`` (called with the parsed args, returns an exit code). Modules import heavy libraries
(torch, kafka) inside their functions, so ``exitflow --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from stream.errors import ExitflowError

COMMANDS = [
    "stream.commands_model",      # train, export-matrix, model info|prepare
    "stream.commands_infra",      # up
    "producers.cli",              # replay
    "consumers.cli",              # worker device|edge|cloud, demo
    "policies.cli",               # policy list|show|use|reset|calibrate, eval
    "monitoring.cli",             # monitor
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="exitflow",
        description="Streaming early-exit and split-computing inference: replay datasets into Kafka, "
        "run device/edge/cloud stages of a multi-exit transformer, learn per sample where to exit or "
        "offload, and watch cost, offloads and drift live.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue  # that part of exitflow is not installed in this tree
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.DEBUG if args.verbose else logging.ERROR)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ExitflowError as exc:
        print(f"exitflow {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"exitflow {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
