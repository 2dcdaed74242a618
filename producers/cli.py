"""`exitflow replay`: a dataset or a scenario file into the samples topic."""

from __future__ import annotations

import argparse

from stream.config import Topics, add_connection_args


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "replay", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="replay a dataset or scenario into Kafka as a stream",
        description="Send samples of a dataset (sst2, imdb, mrpc, rte, scitail, qqp, ag_news, csv:PATH, ...) or of "
        "a scenario file (YAML/TOML segments chaining datasets to create drift) to the samples topic, labels to "
        "the labels topic (evaluation only), at a given rate, with back-pressure and a progress bar.")
    p.add_argument("dataset", nargs="?", help="dataset name or csv:/tsv:/jsonl:PATH")
    p.add_argument("--scenario", help="a scenario file instead of DATASET")
    p.add_argument("--split", help="dataset split (default: the evaluation split)")
    p.add_argument("--limit", type=int, help="send at most N samples")
    p.add_argument("--rate", type=float, default=0.0, help="samples per second (0: as fast as possible)")
    p.add_argument("--shuffle", action="store_true", help="shuffle (with --seed) before --limit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loop", action="store_true", help="start over at the end (ids get a -rN suffix)")
    p.add_argument("--no-labels", action="store_true", help="do not send labels (out-of-domain data)")
    p.add_argument("--no-progress", action="store_true")
    add_connection_args(p, redis=False)
    p.set_defaults(func=cmd_replay)


def cmd_replay(args) -> int:
    from stream.errors import ConfigError

    from producers.replay import load_scenario, replay, single

    if bool(args.dataset) == bool(args.scenario):
        raise ConfigError("give either a DATASET or --scenario FILE")
    if args.scenario:
        scenario = load_scenario(args.scenario)
        if args.rate:
            scenario = scenario.__class__(scenario.name, scenario.segments, args.rate, args.loop or scenario.loop)
    else:
        scenario = single(args.dataset, args.split, args.limit, args.shuffle, args.seed, args.rate, args.loop,
                          not args.no_labels)
    sent = replay(scenario, args.bootstrap, Topics(args.prefix), args.limit, progress=not args.no_progress)
    print(f"sent {sent} samples")
    return 0
