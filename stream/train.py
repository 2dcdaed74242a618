"""Fine-tuning a multi-exit model with the joint loss, evaluating it, and exporting confidence matrices.

The joint loss is the weighted sum of every exit's cross-entropy: all weights 1 by default (the plain
sum of SplitEE §5.1), EENet §3.1's γ_k = k/(K(K+1)) with ``exit_weights="eenet"``, or any list (see
:func:`exit_weights`). Training is deterministic for a seed: the data order comes from a seeded
generator, and ``torch.manual_seed`` fixes head initialisation and dropout.
"""

from __future__ import annotations

import dataclasses
import math
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from stream import datasets
from stream.config import default_model_dir
from stream.datasets import Dataset
from stream.errors import ConfigError, DataError
from stream.matrix import ConfidenceMatrix
from stream.model import MultiExitModel, payload_bytes


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    epochs: float = 1.0
    max_len: int = 64
    batch_size: int = 32
    lr: float = 1e-4
    warmup: float = 0.06          # fraction of the steps with a linear warm-up, then linear decay to 0
    weight_decay: float = 0.01
    exit_weights: tuple[float, ...] | str | None = None  # one per exit, "eenet", or None = all 1 (plain sum)
    seed: int = 0
    eval_batch_size: int = 64

    def __post_init__(self) -> None:
        for name in ("epochs", "max_len", "batch_size", "lr", "eval_batch_size"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"train {name} must be > 0, got {getattr(self, name)!r}")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"train warmup must be in [0, 1), got {self.warmup!r}")
        exit_weights(self.exit_weights, None)


#: Named exit-weight schemes: K exits → one weight per exit.
EXIT_WEIGHT_SCHEMES = {
    "sum": lambda k: (1.0,) * k,
    "eenet": lambda k: tuple(i / (k * (k + 1)) for i in range(1, k + 1)),   # EENet §3.1 γ_k, as printed
}


def exit_weights(spec: str | Sequence[float] | None, num_layers: int | None) -> tuple[float, ...] | str | None:
    """Per-exit loss weights from ``--exit-weights``: None/'' (all 1), a scheme name or a comma list.

    ``eenet`` is EENet §3.1's γ_k = k/(K(K+1)) (as printed they add up to 1/2, a weighted average up to a
    factor 2 that AdamW hardly notices). With ``num_layers=None`` the spec is only checked and a scheme
    name comes back as is (the depth is known once the model is built).

    >>> exit_weights("eenet", 3)
    (0.08333333333333333, 0.16666666666666666, 0.25)
    >>> exit_weights("1,0.5", 2), exit_weights(None, 2), exit_weights("eenet", None)
    ((1.0, 0.5), None, 'eenet')
    """
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return None
    if isinstance(spec, str) and spec.strip().lower() in EXIT_WEIGHT_SCHEMES:
        name = spec.strip().lower()
        return name if num_layers is None else EXIT_WEIGHT_SCHEMES[name](num_layers)
    try:
        weights = tuple(float(w) for w in (spec.split(",") if isinstance(spec, str) else spec))
    except (TypeError, ValueError):
        raise ConfigError(f"exit weights: expected {' or '.join(EXIT_WEIGHT_SCHEMES)} or comma-separated numbers, "
                          f"got {spec!r}") from None
    if not all(math.isfinite(w) and w >= 0 for w in weights) or not any(weights):
        raise ConfigError(f"exit weights must be finite, >= 0 and not all 0, got {spec!r}")
    if num_layers is not None and len(weights) != num_layers:
        raise ConfigError(f"{len(weights)} exit weights for a model with {num_layers} exits")
    return weights


# The recipe of `exitflow model prepare`: 5 min 19 s on 2 cores, dev evaluation included (310 s training).
DEFAULT_RECIPE = {
    "dataset": "sst2",
    "limit": 30000,       # train phrases used (of 67,349)
    "min_words": 0,       # keep short fragments too: with min_words=6 dev was 86.7% vs 88.0%, IMDb equal
    "config": TrainConfig(epochs=1, max_len=64, batch_size=32, lr=1e-4, seed=0),
}


def select_train(ds: Dataset, limit: int | None, min_words: int = 0, seed: int = 0) -> Dataset:
    """Phrases with at least ``min_words`` words, shuffled with ``seed``, the first ``limit`` of them."""
    keep = [i for i, t in enumerate(ds.texts) if len(t.split()) >= min_words] if min_words else range(len(ds))
    return datasets.shuffle_limit(ds.subset(list(keep)), shuffle=True, seed=seed, limit=limit)


def _lengths(model: MultiExitModel, ds: Dataset, max_len: int) -> np.ndarray:
    enc = model.tokenizer(ds.texts, ds.text_pairs, truncation=True, max_length=max_len)
    return np.array([len(ids) for ids in enc["input_ids"]])


def _train_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator, pool: int = 50) -> list[np.ndarray]:
    """Shuffled batches of similar length (less padding): sort pools of ``pool`` batches by length."""
    order = rng.permutation(len(lengths))
    batches = []
    for start in range(0, len(order), batch_size * pool):
        chunk = order[start:start + batch_size * pool]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def _batch(model: MultiExitModel, ds: Dataset, idx: Sequence[int], max_len: int) -> dict[str, torch.Tensor]:
    texts = [ds.texts[i] for i in idx]
    pairs = [ds.text_pairs[i] for i in idx] if ds.text_pairs is not None else None
    return model.tokenize(texts, pairs, max_len=max_len)


def _check_labels(model: MultiExitModel, ds: Dataset) -> np.ndarray:
    if ds.labels is None:
        raise DataError(f"{ds.source}: dataset {ds.name}/{ds.split} has no labels")
    if ds.labels.max() >= model.num_classes:
        raise DataError(f"{ds.source}: label {int(ds.labels.max())} but the model has {model.num_classes} classes")
    return ds.labels


def train(model: MultiExitModel, train_ds: Dataset, config: TrainConfig = TrainConfig(),
          dev_ds: Dataset | None = None, progress: bool = True) -> dict:
    """Fine-tune all layers and exits with the joint loss; return a summary (losses, time, dev accuracy)."""
    from tqdm import tqdm
    from transformers import get_linear_schedule_with_warmup

    labels = torch.as_tensor(_check_labels(model, train_ds))
    weights = exit_weights(config.exit_weights, model.num_layers) or (1.0,) * model.num_layers
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    lengths = _lengths(model, train_ds, config.max_len)
    epochs = [_train_batches(lengths, config.batch_size, rng) for _ in range(math.ceil(config.epochs))]
    plan = [b for epoch in epochs for b in epoch][:max(1, round(config.epochs * len(epochs[0])))]

    no_decay = ("bias", "LayerNorm.weight", "LayerNorm.bias")
    groups = [
        {"params": [p for n, p in model.named_parameters() if not n.endswith(no_decay)], "weight_decay": config.weight_decay},
        {"params": [p for n, p in model.named_parameters() if n.endswith(no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=config.lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(config.warmup * len(plan)), len(plan))
    w = torch.tensor(weights, dtype=torch.float32)

    model.train()
    losses: list[float] = []
    seen, start = 0, time.perf_counter()
    bar = tqdm(plan, desc="train", unit="batch", disable=not progress, dynamic_ncols=True)
    for idx in bar:
        batch = _batch(model, train_ds, idx, config.max_len)
        logits = model(batch)
        target = labels[idx]
        per_exit = torch.stack([torch.nn.functional.cross_entropy(lg, target) for lg in logits])
        loss = (w * per_exit).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        seen += len(idx)
        elapsed = time.perf_counter() - start
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}", samples_s=f"{seen / elapsed:.1f}")
    bar.close()
    model.eval()
    summary = {"train_samples": len(train_ds), "samples_seen": seen, "steps": len(plan),
               "train_time_s": round(time.perf_counter() - start, 1), "first_loss": losses[0],
               "final_loss": float(np.mean(losses[-50:])), "losses": losses}
    if dev_ds is not None:
        t0 = time.perf_counter()
        summary["dev_accuracy"] = evaluate(model, dev_ds, config.max_len, config.eval_batch_size, progress)
        summary["dev_eval_time_s"] = round(time.perf_counter() - t0, 1)
    return summary


def _eval_batches(model: MultiExitModel, ds: Dataset, max_len: int, batch_size: int) -> list[np.ndarray]:
    # Sorted by length (less padding); callers put results back in dataset order.
    order = np.argsort(_lengths(model, ds, max_len), kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def evaluate(model: MultiExitModel, ds: Dataset, max_len: int = 128, batch_size: int = 64,
             progress: bool = False) -> list[float]:
    """Accuracy of every exit on a labelled dataset, first exit first."""
    matrix = export_matrix(model, ds, max_len, batch_size, progress=progress, embeddings=False, desc="eval")
    return [round(float(a), 4) for a in matrix.accuracy()]


def export_matrix(model: MultiExitModel, ds: Dataset, max_len: int = 128, batch_size: int = 64,
                  progress: bool = True, embeddings: bool = True, desc: str = "export") -> ConfidenceMatrix:
    """Every exit's probabilities (and input embeddings, payload sizes) for every sample of ``ds``."""
    from tqdm import tqdm

    if len(ds) == 0:
        raise DataError(f"{ds.source}: dataset {ds.name}/{ds.split} is empty")
    labels = _check_labels(model, ds) if ds.labels is not None else None
    n, layers = len(ds), model.num_layers
    probs = np.zeros((n, layers, model.num_classes), dtype=np.float32)
    embeds = np.zeros((n, model.hidden_size), dtype=np.float32) if embeddings else None
    real_lengths = np.zeros(n, dtype=np.int64)
    model.eval()
    with torch.inference_mode(), tqdm(total=n, desc=desc, unit="sample", disable=not progress, dynamic_ncols=True) as bar:
        for idx in _eval_batches(model, ds, max_len, batch_size):
            batch = _batch(model, ds, idx, max_len)
            hidden, mask = model.start(batch)
            _, out = model.run(hidden, mask, 0, layers, exits="each")
            probs[idx] = torch.stack([out[layer] for layer in range(1, layers + 1)], dim=1).numpy()
            if embeds is not None:
                embeds[idx] = model.embed(batch).numpy()
            real_lengths[idx] = mask.sum(1).numpy()
            bar.update(len(idx))
    # Each layer's hidden state has the same shape, so the payload is the same after any layer.
    mean_bytes = int(round(float(np.mean([payload_bytes(t, model.hidden_size) for t in real_lengths]))))
    meta = {"dataset": ds.name, "split": ds.split, "source": ds.source, "max_len": max_len,
            "label_names": list(ds.label_names or model.label_names), "model": str(model.path) if model.path else None,
            "num_layers": layers, "payload_dtype": "float16"}
    return ConfidenceMatrix(probs, None if labels is None else labels.astype(np.int64), embeds,
                            np.full(layers, mean_bytes, dtype=np.int64), list(ds.ids), meta)


def make_card(model: MultiExitModel, train_ds: Dataset, config: TrainConfig, summary: dict, **extra) -> dict:
    """The model card saved next to the weights: what it was trained on, how, and how well it does."""
    import transformers

    card = dict(model.card)
    card.update({
        "dataset": train_ds.name, "split": train_ds.split, "source": train_ds.source,
        "num_classes": model.num_classes, "label_names": model.label_names, "pooling": model.pooling,
        "train_samples": summary["train_samples"], "steps": summary["steps"], "epochs": config.epochs,
        "max_len": config.max_len, "batch_size": config.batch_size, "lr": config.lr, "warmup": config.warmup,
        "weight_decay": config.weight_decay,
        "exit_weights": list(exit_weights(config.exit_weights, model.num_layers) or [1.0] * model.num_layers),
        "exit_weights_spec": config.exit_weights if isinstance(config.exit_weights, str) else None,
        "seed": config.seed, "train_time_s": summary["train_time_s"], "final_loss": round(summary["final_loss"], 4),
        "dev_accuracy": summary.get("dev_accuracy"), "dev_eval_time_s": summary.get("dev_eval_time_s"),
        "torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
        "machine": platform.machine(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
    card.update(extra)
    return card


#: `exitflow reproduce`'s source models (SplitEE §5.2: fine-tune on the source task, evaluate on the shifted
#: target). RTE and MRPC are small: three epochs of pairs at 128 tokens, a lower learning rate.
SOURCE_RECIPES = {
    "sst2": DEFAULT_RECIPE,
    "rte": {"dataset": "rte", "limit": None, "min_words": 0,
            "config": TrainConfig(epochs=3, max_len=128, batch_size=16, lr=5e-5, seed=0)},
    "mrpc": {"dataset": "mrpc", "limit": None, "min_words": 0,
             "config": TrainConfig(epochs=3, max_len=128, batch_size=16, lr=5e-5, seed=0)},
}


def fine_tune(backbone: str, train_ds: Dataset, dev_ds: Dataset | None, out: Path, config: TrainConfig,
              limit: int | None = None, min_words: int = 0, pooling: str = "mean",
              progress: bool = True) -> tuple[MultiExitModel, dict]:
    """Fine-tune a fresh model on (a selection of) ``train_ds``, evaluate it on ``dev_ds``, save it with its card."""
    start = time.perf_counter()
    selected = select_train(train_ds, limit, min_words, config.seed)
    model = MultiExitModel.from_backbone(backbone, train_ds.num_classes, config.seed, train_ds.label_names, pooling)
    if progress:
        print(f"training {backbone} ({model.num_layers} exits) on {len(selected)} samples of "
              f"{train_ds.name}/{train_ds.split}", file=sys.stderr)
    summary = train(model, selected, config, dev_ds, progress)
    model.card = make_card(model, selected, config, summary, min_words=min_words,
                           dev_split=dev_ds.split if dev_ds is not None else None,
                           wall_time_s=round(time.perf_counter() - start, 1))
    model.save(out)
    return model, summary


def load_splits(name: str) -> tuple[Dataset, Dataset | None]:
    """A named dataset's train split and its evaluation split (None when it has only train)."""
    dev_split = datasets.default_split(name)
    train_ds = datasets.load(name, datasets.default_split(name, "train"))
    return train_ds, datasets.load(name, dev_split) if dev_split != "train" else None


def prepare_default(force: bool = False, progress: bool = True) -> tuple[Path, bool]:
    """Train the default model into ``default_model_dir()`` unless it is there; return (dir, trained?)."""
    return prepare_source("sst2", default_model_dir(), force=force, progress=progress)


def prepare_source(name: str, out: Path, *, force: bool = False, progress: bool = True, backbone: str = "default",
                   limit: int | None = None) -> tuple[Path, bool]:
    """Train the source model ``name`` (:data:`SOURCE_RECIPES`) into ``out`` unless it is there."""
    if name not in SOURCE_RECIPES:
        raise ConfigError(f"no training recipe for source {name!r}; expected one of {sorted(SOURCE_RECIPES)}")
    if not force and (out / "model.safetensors").is_file() and (out / "card.json").is_file():
        return out, False
    recipe = SOURCE_RECIPES[name]
    tmp = out.with_name(out.name + ".partial")
    train_ds, dev_ds = load_splits(recipe["dataset"])
    fine_tune(backbone, train_ds, dev_ds, tmp, recipe["config"], limit or recipe["limit"], recipe["min_words"],
              progress=progress)
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)  # a crash mid-training never leaves a half model under the real name
    return out, True
