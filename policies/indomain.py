"""The in-domain protocol of DIMEE (§IV-C) and EENet (§4): one labelled task, split 80/10/10 with a seed.

The model is fine-tuned on the 80% train split, the policy is calibrated on the 10% validation split
(DIMEE's pools and α, EENet's scoring networks and thresholds) and judged on the 10% test split.
:func:`prepare` trains the model once and exports the validation and test matrices, cached under
``$EXITFLOW_HOME`` like the SplitEE sources (``models/minilm-<task>-indomain-s<seed>``).

SST-2's labelled files are GLUE train (67,349 phrases) and dev (872); split together, the test split
holds phrases of training sentences as well (the paper's split has the same property).

Training budgets on 2 CPU cores: a task's 80% is used in full except SST-2 (30,000 phrases, as the
default model) and the QQP sample (12,000 pairs), which would take 20+ minutes each.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stream.train import TrainConfig

#: Task → training recipe on its 80% split (``limit``: at most this many training samples).
RECIPES: dict[str, dict[str, Any]] = {
    "sst2": {"limit": 30000, "config": TrainConfig(epochs=1, max_len=64, batch_size=32, lr=1e-4, seed=0)},
    "mrpc": {"limit": None, "config": TrainConfig(epochs=3, max_len=128, batch_size=16, lr=5e-5, seed=0)},
    "rte": {"limit": None, "config": TrainConfig(epochs=3, max_len=128, batch_size=16, lr=5e-5, seed=0)},
    "qqp": {"limit": 12000, "config": TrainConfig(epochs=1, max_len=128, batch_size=32, lr=1e-4, seed=0)},
    "ag_news": {"limit": None, "config": TrainConfig(epochs=2, max_len=128, batch_size=32, lr=1e-4, seed=0)},
}


def splits(task: str, seed: int = 0):
    """The task's labelled files, concatenated and cut 80/10/10 with ``seed``: ``{'train', 'val', 'test'}``."""
    from stream import datasets

    return datasets.three_way(datasets.labelled(task), seed)


def model_dir(task: str, seed: int = 0, backbone: str = "default", train_limit: int | None = None) -> Path:
    from stream.config import home

    tag = "" if backbone == "default" and train_limit is None else \
        "-" + "".join(ch if ch.isalnum() else "_" for ch in f"{backbone}-{train_limit}")
    return home() / "models" / f"minilm-{task}-indomain-s{seed}{tag}"


def prepare(task: str, *, seed: int = 0, backbone: str = "default", train_limit: int | None = None,
            max_len: int | None = None, threads: int = 2, force: bool = False, log=None) -> dict[str, Any]:
    """Fine-tune ``task``'s model on its train split (once) and export ``{'val': matrix, 'test': matrix}``.

    Matrices are exported at ``max_len`` tokens (default: the recipe's training length).
    """
    import dataclasses
    import shutil

    import torch

    from stream.config import home
    from stream.errors import ConfigError
    from stream.matrix import ConfidenceMatrix
    from stream.model import MultiExitModel
    from stream.train import export_matrix, fine_tune

    if task not in RECIPES:
        raise ConfigError(f"no in-domain recipe for task {task!r}; expected one of {sorted(RECIPES)}")
    torch.set_num_threads(threads)
    recipe = RECIPES[task]
    parts = splits(task, seed)
    out = model_dir(task, seed, backbone, train_limit)
    trained = False
    if force or not ((out / "model.safetensors").is_file() and (out / "card.json").is_file()):
        if log:
            log(f"fine-tuning the {task} model on its 80% split ({len(parts['train'])} samples, "
                f"at most {train_limit or recipe['limit'] or 'all'})")
        tmp = out.with_name(out.name + ".partial")
        config = dataclasses.replace(recipe["config"], seed=seed)
        fine_tune(backbone, parts["train"], parts["val"], tmp, config, train_limit or recipe["limit"],
                  progress=log is not None)
        if out.exists():
            shutil.rmtree(out)
        tmp.replace(out)
        trained = True
    matrices: dict[str, Any] = {}
    model = None
    for part in ("val", "test"):
        file = home() / "reproduce" / out.name / f"{task}-{part}-s{seed}.npz"
        if trained or force or not file.is_file():
            model = model or MultiExitModel.load(out)
            if log:
                log(f"exporting {task}/{part} ({len(parts[part])} samples)")
            matrix = export_matrix(model, parts[part], max_len or recipe["config"].max_len, progress=log is not None)
            matrix.meta.update(protocol="in-domain 80/10/10", split_seed=seed, part=part, model=str(out))
            file.parent.mkdir(parents=True, exist_ok=True)
            matrix.save(file)
        matrices[part] = ConfidenceMatrix.load(file)
        matrices[part].meta["path"] = str(file)
    return matrices
