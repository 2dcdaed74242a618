"""`exitflow worker device|edge|cloud` and `exitflow demo`."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from stream.config import add_connection_args, default_model_dir, redis_url

log = logging.getLogger(__name__)


def add_policy_args(p) -> None:
    from stream.costs import LINKS
    from stream.messages import DEFAULT_HIDDEN_ENCODING, HIDDEN_ENCODINGS
    p.add_argument("--policy", default="static-maxprob",
                   help="policy to make active if none is yet (see `exitflow policy list`)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="policy parameter (repeatable)")
    p.add_argument("--cost-model", default="splitee", choices=("splitee", "dimee"), help="cost model preset")
    p.add_argument("--cost", action="append", default=[], metavar="KEY=VALUE",
                   help="override a cost-model field, e.g. offload_cloud=3 (repeatable)")
    p.add_argument("--link", choices=sorted(LINKS), default=None,
                   help="price each offload by its real bytes over this uplink, o = (RTT + bytes/bandwidth) / "
                   "layer time (figures: stream.costs.Link); default: the preset's constant o")
    p.add_argument("--layer-ms", type=float, default=None,
                   help="ms per sample of one device layer for --link (default: stream.costs.DEFAULT_LAYER_MS, "
                   "measured by `python -m bench model`)")
    p.add_argument("--pending-timeout", type=float, default=None, metavar="S",
                   help="device: expire an offloaded pull whose feedback has not come after S seconds (its pending "
                   "count undone once; 0: never; default consumers.device.PENDING_TIMEOUT_S = 600)")
    p.add_argument("--hidden-encoding", choices=sorted(HIDDEN_ENCODINGS),
                   default=os.environ.get("EXITFLOW_HIDDEN_ENCODING", DEFAULT_HIDDEN_ENCODING),
                   help="how the device sends an offload's hidden state: int8 per token or float16 "
                   "(env EXITFLOW_HIDDEN_ENCODING)")


def policy_spec(args, hidden_size: int = 384):
    """The policy to make active; ``--link`` adds its cost overrides, priced for ``max_len`` tokens."""
    from policies.control import ActiveSpec
    from policies.registry import parse_sets
    from stream.costs import link_overrides, parse_overrides
    from stream.messages import hidden_payload_bytes
    overrides = parse_overrides(args.cost)
    if getattr(args, "link", None):
        ref = hidden_payload_bytes(args.max_len, hidden_size, args.hidden_encoding)
        overrides = {**link_overrides(args.link, args.layer_ms, ref), **overrides}
    return ActiveSpec(args.policy, parse_sets(args.set), args.cost_model, overrides)


def register(subparsers) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = subparsers.add_parser(
        "worker", formatter_class=fmt, help="run a stage worker: device, edge or cloud",
        description="The device worker consumes samples (and feedback), runs the layers the active policy asks "
        "for, exits or offloads the float16 hidden state; the edge/cloud workers resume from it and publish the "
        "result and the policy's feedback. Offsets are committed only after the result and the state it changed "
        "are durable.")
    p.add_argument("stage", choices=("device", "edge", "cloud"))
    p.add_argument("--model", type=Path, default=None, help="model directory (default: the default model)")
    p.add_argument("--batch-size", type=int, default=32, help="records per poll and per model batch")
    p.add_argument("--max-len", type=int, default=128, help="truncate inputs to this many tokens")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (one process per core is fastest)")
    p.add_argument("--group", help="consumer group (default: <prefix><stage>)")
    p.add_argument("--idle-exit", type=float, default=None, help="stop after this many seconds without records")
    p.add_argument("--outage-timeout", type=float, default=60.0,
                   help="exit with code 3 when Kafka or Redis stays unreachable this long (retrying meanwhile)")
    p.add_argument("--lease-timeout", type=float, default=6.0,
                   help="partition lease time in Redis: a dead worker's partitions move to the others after it")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    p.add_argument("--metrics-host", default="127.0.0.1")
    p.add_argument("--reference", type=Path, default=None,
                   help="labelled in-domain matrix (.npz, e.g. the SST-2 dev calibration); the device worker "
                   "reports each input's distance to its nearest class centroid, the monitor's drift signal")
    add_policy_args(p)
    add_connection_args(p)
    p.set_defaults(func=cmd_worker)

    from consumers.demo import register_demo
    register_demo(subparsers)


def load_model(path: Path | None, threads: int):
    import torch

    from stream.model import MultiExitModel
    torch.set_num_threads(max(1, threads))
    return MultiExitModel.load(path or default_model_dir())


def warm_up(model, max_len: int, batch_size: int) -> float:
    """One forward pass through every layer and exit on a few batch shapes, before the first record.

    torch's first calls at a new shape allocate and pick kernels; without this, the first batches of a
    fresh worker run several times slower and land in the latency tail. Returns the seconds it took.
    """
    import time

    import torch
    started = time.perf_counter()
    with torch.inference_mode():
        for n, length in ((1, 16), (min(batch_size, 8), max_len // 2), (batch_size, max_len)):
            batch = model.tokenize(["warm up " * length] * n, max_len=max_len)
            model.embed(batch)
            hidden, mask = model.start(batch)
            model.run(hidden, mask, 0, model.num_layers, "each")
    return time.perf_counter() - started


def stage_metrics(stage: str, port: int | None, host: str):
    """The stage's Prometheus metrics, served on ``port`` when given (None if monitoring is absent)."""
    try:
        from monitoring.metrics import StageMetrics, serve
    except ImportError:
        return None
    metrics = StageMetrics(stage)
    if port is not None:
        serve(metrics.registry, port, host)
    return metrics


def cmd_worker(args) -> int:
    import faulthandler
    import signal

    from consumers.worker import WorkerConfig
    faulthandler.register(signal.SIGUSR1)   # `kill -USR1 PID` prints every thread's stack to the log

    config = WorkerConfig(bootstrap=args.bootstrap, redis_url=redis_url(args), topic_prefix=args.prefix,
                          redis_prefix=args.redis_prefix, group=args.group, batch_size=args.batch_size,
                          idle_exit_s=args.idle_exit, metrics_port=args.metrics_port,
                          metrics_host=args.metrics_host, broker_timeout_s=args.outage_timeout, lease_s=args.lease_timeout,
                          exit_process_on_outage=True)
    model = load_model(args.model, args.threads)
    warm_s = warm_up(model, args.max_len, args.batch_size)     # before the metrics port says "ready"
    metrics = stage_metrics(args.stage, args.metrics_port, args.metrics_host)
    if args.stage == "device":
        from consumers.device import DeviceWorker
        from monitoring.drift import reference_centroids
        reference = reference_centroids(args.reference) if args.reference else None
        worker = DeviceWorker(config, model, policy_spec(args, model.hidden_size), max_len=args.max_len,
                              metrics=metrics, reference=reference, hidden_encoding=args.hidden_encoding,
                              **({} if args.pending_timeout is None else {"pending_timeout_s": args.pending_timeout}))
    else:
        from consumers.remote import RemoteWorker
        worker = RemoteWorker(config, model, args.stage, max_len=args.max_len, metrics=metrics)
    log.info("%s worker pid %d ready (model %s, %d layers, warmed up in %.1fs)", args.stage, os.getpid(),
             getattr(model, "path", args.model), model.num_layers, warm_s)
    return worker.run()
