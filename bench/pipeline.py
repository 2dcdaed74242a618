"""End-to-end pipeline throughput next to the raw batched model on the same samples and layer counts.

The pipeline run: embedded broker + Redis, one device and one cloud worker process (one torch thread
each, the 2 cores of this machine), workers warmed up first, then N samples replayed; samples/s is N
over the time from the first sample sent to the last result. The raw run: the same policy decides the
same samples in-process through the same decision loop (`run_device` then `run_remote`), batch by batch,
with no Kafka, Redis or serialisation — only tokenisation and the layers each sample really ran, with
two torch threads. ratio = pipeline / raw is the pipeline's efficiency (target ≥ 0.7 at batch ≥ 16).

    python -m bench pipeline [--limit 1000] [--batch-size 32] [--policy static-maxprob --set threshold=0.9]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from stream.config import Topics, default_model_dir


def raw_throughput(model, texts: list[str], spec, batch_size: int, max_len: int) -> tuple[float, dict]:
    """Samples/s of the model alone, deciding with the same policy and running the same layers."""
    import torch

    from policies.base import Observation, Offload, StateView
    from consumers.runner import ModelRunner
    from policies.engine import run_device, run_remote

    policy = spec.build(model.num_layers, model.num_classes)
    state = StateView()
    layers = {"device": 0, "remote": 0}
    started = time.perf_counter()
    with torch.inference_mode():
        for lo in range(0, len(texts), batch_size):
            chunk = texts[lo:lo + batch_size]
            batch = model.tokenize(chunk, max_len=max_len)
            emb = model.embed(batch).numpy()
            hidden, mask = model.start(batch)
            runner = ModelRunner(model, hidden, mask)
            obs = [Observation(f"raw{lo + i}", model.num_layers, embedding=emb[i]) for i in range(len(chunk))]
            outcomes = run_device(policy, state, obs, runner)
            layers["device"] += sum(o.trace.device_layers for o in outcomes)
            off = [i for i, o in enumerate(outcomes) if isinstance(o.action, Offload)]
            if off:
                # The remote side resumes from the (float16 round-tripped) hidden states, like the cloud worker.
                rows = torch.tensor(off)
                remote_runner = ModelRunner(model, runner.hidden[rows].half().float(), mask[rows])
                remote = run_remote([outcomes[i].observation.layer for i in off],
                                    [outcomes[i].action for i in off], model.num_layers, remote_runner)
                layers["remote"] += sum(r.layers_run for r in remote)
    elapsed = time.perf_counter() - started
    return len(texts) / elapsed, layers


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench pipeline", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--dataset", default="imdb")
    ap.add_argument("--limit", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--policy", default="static-maxprob")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--out", type=Path, default=Path("artifacts/bench_pipeline.json"))
    args = ap.parse_args(argv)

    import torch

    from policies.control import ActiveSpec, PolicyControl
    from policies.registry import parse_sets
    from producers.replay import replay, single
    from stream import datasets
    from stream import kafka as K
    from stream.infra import Broker, RedisServer
    from stream.model import MultiExitModel

    model_dir = args.model or default_model_dir()
    if not (model_dir / "exitflow_model.json").is_file():
        print(f"bench pipeline: no model at {model_dir}; run `exitflow model prepare` first", file=sys.stderr)
        return 1
    params = parse_sets(args.set) or ({"threshold": "0.9", "max_layer": "3"} if args.policy == "static-maxprob" else {})
    spec = ActiveSpec(args.policy, params, "splitee")
    ds = datasets.shuffle_limit(datasets.load(args.dataset), True, 0, args.limit)

    torch.set_num_threads(2)
    model = MultiExitModel.load(model_dir)
    raw_throughput(model, ds.texts[:2 * args.batch_size], spec, args.batch_size, args.max_len)  # warm-up
    raw_sps, raw_layers = raw_throughput(model, ds.texts, spec, args.batch_size, args.max_len)
    print(f"raw model: {raw_sps:.1f} samples/s (layers device {raw_layers['device']}, remote {raw_layers['remote']})")

    prefix = f"bench{int(time.time())}."
    topics = Topics(prefix)
    logs = Path("artifacts/bench_pipeline_logs")
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    with Broker() as broker, RedisServer() as redis:
        K.create_topics(broker.bootstrap, topics.all(), partitions=2)
        import redis as redis_lib
        PolicyControl(redis_lib.Redis.from_url(redis.url)).use(spec.name, spec.params, cost=spec.cost,
                                                                num_layers=model.num_layers,
                                                                num_classes=model.num_classes)
        cmd = [sys.executable, "-m", "stream.cli", "worker"]
        common = ["--model", str(model_dir), "--bootstrap", broker.bootstrap, "--redis-url", redis.url,
                  "--prefix", prefix, "--batch-size", str(args.batch_size), "--max-len", str(args.max_len),
                  "--threads", "1", "--policy", spec.name]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        for stage in ("device", "cloud"):
            procs.append(subprocess.Popen(cmd + [stage] + common, env=env, stdout=open(logs / f"{stage}.log", "wb"),
                                          stderr=subprocess.STDOUT))
        try:
            # Warm-up: both workers have joined their groups and run a batch before the clock starts.
            warm = replay(single("sst2", "dev", 64, True, 1), broker.bootstrap, topics, progress=False)
            _wait(broker.bootstrap, topics.results, warm, 180)
            started = time.time()
            replay(single(args.dataset, None, args.limit, True, 0), broker.bootstrap, topics, progress=False)
            last = _wait(broker.bootstrap, topics.results, warm + args.limit, 1800)
            pipe_sps = args.limit / (last - started)
        finally:
            for p in procs:
                p.terminate()
                p.wait(30)
    result = {"samples": args.limit, "batch_size": args.batch_size, "max_len": args.max_len, "policy": spec.name,
              "params": spec.params, "pipeline_samples_per_s": pipe_sps, "raw_samples_per_s": raw_sps,
              "ratio": pipe_sps / raw_sps, "raw_layers": raw_layers}
    print(f"pipeline: {pipe_sps:.1f} samples/s, raw model: {raw_sps:.1f} samples/s, ratio {pipe_sps / raw_sps:.2f} "
          f"(batch {args.batch_size}, {args.limit} {args.dataset} samples, policy {spec.name} {spec.params})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _wait(bootstrap: str, topic: str, n: int, timeout: float) -> float:
    """Wait until ``topic`` holds ``n`` distinct result ids; returns the latest result's timestamp."""
    from stream import kafka as K
    from stream import messages
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = K.read_all(bootstrap, topic, idle_s=0.2)
        if len({r.key for r in records}) >= n:
            return max(messages.decode("result", r.value)["ts"] for r in records)
        time.sleep(0.5)
    raise TimeoutError(f"only {len(records)} of {n} results on {topic} after {timeout:.0f}s")
