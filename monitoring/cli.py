"""`exitflow monitor`: the live dashboard, JSON API and monitor metrics of a running stack."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "monitor", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="live dashboard: cost, offloads, exits per layer, accuracy window, policy and arms, drift",
        description="Follow the results and labels topics of a running stack, join them by sample id, run "
        "the drift detectors and serve a live dashboard (/), a JSON API (/api/summary, /api/events) and "
        "Prometheus metrics (/metrics). Read-only: it writes nothing to Kafka or Redis.")
    from stream.config import add_connection_args
    add_connection_args(p)
    p.add_argument("--no-redis", action="store_true", help="do not read the active policy and arms from Redis")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (beyond loopback: anyone who can reach it "
                   "sees the dashboard)")
    p.add_argument("--port", type=int, default=8090, help="dashboard/API port (0: any free port)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="also serve /metrics on this port (it is always on the dashboard port too)")
    p.add_argument("--from-end", action="store_true", help="start at the end of the topics, not the beginning")
    p.add_argument("--label-max-age", type=float, default=600.0,
                   help="seconds a result waits for its label (and a label for its result) before it is dropped")
    p.add_argument("--join-capacity", type=int, default=50_000, help="results/labels waiting in the join, at most")
    p.add_argument("--url-file", type=Path, help="write the dashboard URL here once it serves (for a parent process)")
    p.set_defaults(func=cmd_monitor)


def cmd_monitor(args) -> int:
    from monitoring.service import Monitor
    from stream.config import redis_url

    mon = Monitor(args.bootstrap, redis_url=None if args.no_redis else redis_url(args), prefix=args.prefix, redis_prefix=args.redis_prefix,
                  host=args.host, port=args.port, metrics_port=args.metrics_port,
                  from_beginning=not args.from_end, join_capacity=args.join_capacity,
                  label_max_age_s=args.label_max_age)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"exitflow monitor: listening on {args.host}: anyone who can reach it can read the dashboard "
              "(it is read-only)", file=sys.stderr)
    signal.signal(signal.SIGTERM, lambda *_: mon.request_stop())
    mon.start()
    print(f"exitflow monitor: dashboard at {mon.url} (Kafka {args.bootstrap}, topics {args.prefix}*)", flush=True)
    if args.url_file:
        args.url_file.write_text(mon.url + "\n")
    try:
        mon.wait()
    except KeyboardInterrupt:
        pass
    finally:
        mon.stop()
    print("exitflow monitor: stopped", file=sys.stderr)
    return 0
