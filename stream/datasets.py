"""Loaders for the shared text-classification datasets and for generic CSV/TSV/JSONL files.

``load("sst2", "dev")`` returns a :class:`Dataset`; ``load("csv:/path/f.csv", text_column="review",
label_column="stars")`` reads any file. Every loader follows the quirks listed in
``shared/data/README.md`` (TSVs read without quoting, MRPC's BOM, RTE's 5-field row, QQP's glued
label on line 1, AG News' 1-based labels, IMDb sorted by label). Errors name the file and the
1-based line (row) that is wrong.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import json
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from stream.config import data_dir
from stream.errors import DataError

SENTIMENT = ("negative", "positive")
ENTAILMENT = ("entailment", "not_entailment")


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Texts (and optional second texts of a pair) with integer labels, in file order unless shuffled."""

    name: str
    split: str
    ids: list[str]
    texts: list[str]
    text_pairs: list[str] | None
    labels: np.ndarray | None  # int64 [N]
    label_names: tuple[str, ...] | None
    source: str

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_classes(self) -> int | None:
        return len(self.label_names) if self.label_names else None

    def subset(self, indices: Sequence[int] | np.ndarray) -> "Dataset":
        idx = np.asarray(indices, dtype=np.int64)
        return dataclasses.replace(
            self,
            ids=[self.ids[i] for i in idx],
            texts=[self.texts[i] for i in idx],
            text_pairs=None if self.text_pairs is None else [self.text_pairs[i] for i in idx],
            labels=None if self.labels is None else self.labels[idx],
        )


def shuffle_limit(ds: Dataset, shuffle: bool = False, seed: int = 0, limit: int | None = None) -> Dataset:
    """Shuffle with ``seed`` (if asked) and then keep the first ``limit`` samples, in that order."""
    order = np.random.default_rng(seed).permutation(len(ds)) if shuffle else np.arange(len(ds))
    if limit is not None:
        if limit < 0:
            raise DataError(f"limit must be >= 0, got {limit}")
        order = order[:limit]
    return ds.subset(order)


# --- row readers: yield (1-based line number, fields) -------------------------------------------

def _open_text(path: Path, encoding: str = "utf-8"):
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding=encoding, newline="")
    return open(path, encoding=encoding, newline="")


def _tsv_rows(path: Path, encoding: str = "utf-8") -> Iterator[tuple[int, list[str]]]:
    # QUOTE_NONE: MRPC/RTE/QQP texts hold unbalanced quotes that a quoting reader would merge.
    with _open_text(path, encoding) as f:
        for line_no, line in enumerate(f, start=1):
            yield line_no, line.rstrip("\r\n").split("\t")


def _csv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    with _open_text(path) as f:
        reader = csv.reader(f)
        for fields in reader:
            yield reader.line_num, fields


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict]]:
    with _open_text(path) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: line {line_no}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}: line {line_no}: expected a JSON object, got {type(obj).__name__}")
            yield line_no, obj


# --- building a Dataset row by row ---------------------------------------------------------------

class _Builder:
    """Collects rows, checking each one, so every error can name the file and row."""

    def __init__(self, name: str, split: str, path: Path, label_names: Sequence[str] | None,
                 label_map: dict[str, int] | None, pair: bool):
        self.name, self.split, self.path = name, split, path
        self.label_names = tuple(label_names) if label_names is not None else None
        self.label_map = label_map
        self.pair = pair
        self.ids: list[str] = []
        self.texts: list[str] = []
        self.pairs: list[str] = []
        self.labels: list[int] = []

    def error(self, row: int, what: str) -> DataError:
        return DataError(f"{self.path}: row {row}: {what}")

    def add(self, row: int, text, pair=None, label=None, has_label: bool = True) -> None:
        for field, value in (("text", text), ("text pair", pair)) if self.pair else (("text", text),):
            if not isinstance(value, str) or not value.strip():
                raise self.error(row, f"empty or missing {field} ({value!r})")
        if has_label:
            self.labels.append(self._label(row, label))
        self.ids.append(f"{self.name}/{self.split}/{row}")
        self.texts.append(text.strip())
        if self.pair:
            self.pairs.append(pair.strip())

    def _label(self, row: int, value) -> int:
        key = str(value).strip() if value is not None else ""
        if self.label_map is not None:
            if key not in self.label_map:
                raise self.error(row, f"unknown label {value!r}; expected one of {sorted(self.label_map)}")
            return self.label_map[key]
        try:
            label = int(key)
        except ValueError:
            raise self.error(row, f"label {value!r} is not an integer (give a label map for string labels)") from None
        if self.label_names is not None and not 0 <= label < len(self.label_names):
            raise self.error(row, f"label {label} out of range 0..{len(self.label_names) - 1}")
        if label < 0:
            raise self.error(row, f"label {label} is negative")
        return label

    def build(self, has_labels: bool = True) -> Dataset:
        if not self.texts:
            raise DataError(f"{self.path}: no samples")
        labels = np.asarray(self.labels, dtype=np.int64) if has_labels else None
        names = self.label_names
        if names is None and labels is not None:
            names = tuple(str(i) for i in range(int(labels.max()) + 1))
        return Dataset(self.name, self.split, self.ids, self.texts, self.pairs if self.pair else None,
                       labels, names, str(self.path))


def _expect_fields(b: _Builder, row: int, fields: list, n: int) -> None:
    if len(fields) != n:
        raise b.error(row, f"expected {n} tab/comma-separated fields, got {len(fields)}")


def _check_header(b: _Builder, row: int, fields: list[str], expected: list[str]) -> None:
    if fields != expected:
        raise b.error(row, f"expected header {expected}, got {fields}")


# --- one loader per shared dataset ---------------------------------------------------------------

def _sst2(b: _Builder) -> None:
    for row, fields in _tsv_rows(b.path):
        if row == 1:
            _check_header(b, row, fields, ["sentence", "label"])
            continue
        _expect_fields(b, row, fields, 2)
        b.add(row, fields[0], label=fields[1])


def _imdb(b: _Builder) -> None:
    # Sorted by label upstream (all negatives first): shuffle before streaming it.
    for row, obj in _jsonl_rows(b.path):
        b.add(row, obj.get("text"), label=obj.get("label"))


def _mrpc(b: _Builder) -> None:
    for row, fields in _tsv_rows(b.path, encoding="utf-8-sig"):  # the file starts with a BOM
        if row == 1:
            _check_header(b, row, fields, ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"])
            continue
        _expect_fields(b, row, fields, 5)
        b.add(row, fields[3], fields[4], label=fields[0])


def _rte(b: _Builder) -> None:
    for row, fields in _tsv_rows(b.path):
        if row == 1:
            _check_header(b, row, fields, ["index", "sentence1", "sentence2", "label"])
            continue
        # GLUE's train.tsv line 2166 has an extra empty field before the label: take the last one.
        if len(fields) == 5 and fields[3] == "":
            fields = fields[:3] + fields[4:]
        _expect_fields(b, row, fields, 4)
        b.add(row, fields[1], fields[2], label=fields[3])


def _scitail(b: _Builder) -> None:
    for row, obj in _jsonl_rows(b.path):
        b.add(row, obj.get("premise"), obj.get("hypothesis"), label=obj.get("label"))


def _qqp(b: _Builder) -> None:
    for row, fields in _tsv_rows(b.path):
        # Line 1 has its label glued to question2 with a space ("...jlpt5? 0"): split it back off.
        if len(fields) == 5 and row == 1:
            question2, _, label = fields[4].rpartition(" ")
            fields = fields[:4] + [question2, label]
        _expect_fields(b, row, fields, 6)
        b.add(row, fields[3], fields[4], label=fields[5])


def _ag_news(b: _Builder) -> None:
    for row, fields in _csv_rows(b.path):
        _expect_fields(b, row, fields, 3)
        label = fields[0].strip()
        if label not in {"1", "2", "3", "4"}:
            raise b.error(row, f"unknown label {fields[0]!r}; expected 1..4")
        b.add(row, f"{fields[1].strip()}. {fields[2].strip()}", label=int(label) - 1)  # 1-based → 0-based


@dataclasses.dataclass(frozen=True)
class Spec:
    files: dict[str, str]           # split → path under data_dir()
    reader: Callable[[_Builder], None]
    label_names: tuple[str, ...]
    label_map: dict[str, int] | None = None
    pair: bool = False


DATASETS: dict[str, Spec] = {
    "sst2": Spec({"train": "SST-2/train.tsv", "dev": "SST-2/dev.tsv"}, _sst2, SENTIMENT),
    "imdb": Spec({"test": "imdb/test.jsonl.gz"}, _imdb, SENTIMENT),
    "mrpc": Spec({"train": "MRPC/train.tsv", "dev": "MRPC/dev.tsv"}, _mrpc,
                 ("not_paraphrase", "paraphrase"), pair=True),
    "rte": Spec({"train": "RTE/train.tsv", "dev": "RTE/dev.tsv"}, _rte, ENTAILMENT,
                {n: i for i, n in enumerate(ENTAILMENT)}, pair=True),
    "scitail": Spec({"test": "scitail/test.jsonl"}, _scitail, ENTAILMENT,
                    {n: i for i, n in enumerate(ENTAILMENT)}, pair=True),
    "qqp": Spec({"sample": "QQP-train-sample/new_dev.tsv"}, _qqp, ("not_duplicate", "duplicate"), pair=True),
    "ag_news": Spec({"test": "ag_news/test.csv"}, _ag_news, ("World", "Sports", "Business", "Sci/Tech")),
}


def default_split(name: str, purpose: str = "eval") -> str:
    """The split used when none is given: 'train' for training, else the evaluation split (dev, or test)."""
    if name.split(":", 1)[0] in GENERIC:
        return "all"
    splits = _spec(name).files
    if purpose == "train":
        if "train" not in splits:
            raise DataError(f"dataset {name!r} has no train split (it has {', '.join(splits)})")
        return "train"
    return next(s for s in ("dev", "test", "sample", "train") if s in splits)


def _spec(name: str) -> Spec:
    try:
        return DATASETS[name]
    except KeyError:
        raise DataError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)} "
                        f"or csv:PATH, tsv:PATH, jsonl:PATH") from None


# --- generic files ---------------------------------------------------------------------------------

def _generic(kind: str, path: Path, text_column, pair_column, label_column, label_map, header: bool) -> Dataset:
    name = path.stem
    names = None
    if label_map is not None:
        names = tuple(k for k, _ in sorted(label_map.items(), key=lambda kv: kv[1]))
    b = _Builder(name, "all", path, names, label_map, pair=pair_column is not None)
    if text_column is None:
        raise DataError(f"{path}: give the text column (--text-column) for a {kind} file")
    if kind == "jsonl":
        for row, obj in _jsonl_rows(path):
            for col in (text_column, pair_column, label_column):
                if col is not None and col not in obj:
                    raise b.error(row, f"missing key {col!r} (keys: {sorted(obj)})")
            b.add(row, obj[text_column], obj.get(pair_column) if pair_column else None,
                  obj.get(label_column) if label_column else None, has_label=label_column is not None)
        return b.build(has_labels=label_column is not None)

    rows = _tsv_rows(path) if kind == "tsv" else _csv_rows(path)
    columns: dict[str, int] = {}
    for row, fields in rows:
        if header and not columns:
            fields = [f.lstrip("\ufeff") if i == 0 else f for i, f in enumerate(fields)]
            columns = {c: i for i, c in enumerate(fields)}
            for col in (text_column, pair_column, label_column):
                if col is not None and _column_index(col, columns) is None:
                    raise b.error(row, f"no column {col!r} in header {fields}")
            continue
        if not header and not columns:
            columns = {str(i): i for i in range(len(fields))}

        def get(col):
            i = _column_index(col, columns)
            if i is None or i >= len(fields):
                raise b.error(row, f"column {col!r} missing (row has {len(fields)} fields)")
            return fields[i]

        b.add(row, get(text_column), get(pair_column) if pair_column is not None else None,
              get(label_column) if label_column is not None else None, has_label=label_column is not None)
    return b.build(has_labels=label_column is not None)


def _column_index(col, columns: dict[str, int]) -> int | None:
    if str(col) in columns:
        return columns[str(col)]
    if str(col).isdigit():
        return int(col)  # a 0-based position
    return None


GENERIC = ("csv", "tsv", "jsonl")


def parse_label_map(text: str | None) -> dict[str, int] | None:
    """'neg=0,pos=1' or 'neg,pos' (indices by position) → {'neg': 0, 'pos': 1}."""
    if not text:
        return None
    out: dict[str, int] = {}
    for i, item in enumerate(p.strip() for p in text.split(",")):
        key, sep, value = item.partition("=")
        try:
            out[key.strip()] = int(value) if sep else i
        except ValueError:
            raise DataError(f"label map item {item!r}: expected NAME=INT") from None
    return out


def load(name: str, split: str | None = None, *, text_column: str | int | None = None,
         pair_column: str | int | None = None, label_column: str | int | None = None,
         label_map: dict[str, int] | None = None, header: bool = True) -> Dataset:
    """Load a shared dataset by name (``sst2``, ``imdb``, ...) or a file as ``csv:PATH``, ``tsv:PATH``, ``jsonl:PATH``.

    Columns of generic files are header names (or 0-based positions); ``label_map`` maps label
    strings to class indices (labels must otherwise be integers). ``split`` defaults to the
    evaluation split; IMDb also answers to 'test'.
    """
    kind, sep, path = name.partition(":")
    if sep and kind in GENERIC:
        return _generic(kind, Path(path).expanduser(), text_column, pair_column, label_column, label_map, header)
    spec = _spec(name)
    split = split or default_split(name)
    if split not in spec.files:
        raise DataError(f"dataset {name!r} has no split {split!r}; expected one of {', '.join(spec.files)}")
    b = _Builder(name, split, data_dir() / spec.files[split], spec.label_names, spec.label_map, spec.pair)
    spec.reader(b)
    return b.build()


# --- in-domain protocol splits --------------------------------------------------------------------

def concat(parts: Sequence[Dataset], split: str) -> Dataset:
    """Several splits of one dataset as one, in order (ids stay unique: they name their split and row)."""
    if not parts:
        raise DataError("concat: no datasets given")
    first = parts[0]
    for ds in parts[1:]:
        if (ds.name, ds.label_names, ds.text_pairs is None) != (first.name, first.label_names, first.text_pairs is None):
            raise DataError(f"concat: {ds.name}/{ds.split} does not match {first.name}/{first.split}")
    pairs = None if first.text_pairs is None else [p for ds in parts for p in ds.text_pairs]
    labels = None if any(ds.labels is None for ds in parts) else np.concatenate([ds.labels for ds in parts])
    return Dataset(first.name, split, [i for ds in parts for i in ds.ids], [t for ds in parts for t in ds.texts],
                   pairs, labels, first.label_names, ", ".join(ds.source for ds in parts))


def labelled(name: str) -> Dataset:
    """Every labelled file of a shared dataset, concatenated (SST-2 train + dev, AG News' test, ...)."""
    spec = _spec(name)
    parts = [load(name, split) for split in spec.files]
    parts = [ds for ds in parts if ds.labels is not None]
    if not parts:
        raise DataError(f"dataset {name!r} has no labelled split")
    return concat(parts, "labelled")


def split_indices(n: int, seed: int = 0, fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> list[np.ndarray]:
    """A seeded permutation of ``range(n)`` cut into disjoint parts of the given fractions (DIMEE §IV-C: 80/10/10).

    Sizes are rounded down except the first, which takes the remainder, so the parts cover all n.

    >>> [len(p) for p in split_indices(1000)], [len(p) for p in split_indices(7, fractions=(0.5, 0.5))]
    ([800, 100, 100], [4, 3])
    >>> bool((split_indices(50, seed=3)[1] == split_indices(50, seed=3)[1]).all())
    True
    """
    fractions = [float(f) for f in fractions]
    if not fractions or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-9:
        raise DataError(f"split fractions must be > 0 and sum to 1, got {fractions}")
    order = np.random.default_rng(seed).permutation(n)
    sizes = [int(n * f) for f in fractions[1:]]
    sizes.insert(0, n - sum(sizes))
    cuts = np.cumsum(sizes)[:-1]
    return list(np.split(order, cuts))


PROTOCOL_SPLITS = ("train", "val", "test")


def three_way(ds: Dataset, seed: int = 0, fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> dict[str, Dataset]:
    """``ds`` cut into train / val / test (:func:`split_indices`); each part's ``split`` names its share."""
    parts = split_indices(len(ds), seed, fractions)
    if len(parts) != len(PROTOCOL_SPLITS):
        raise DataError(f"three_way needs 3 fractions, got {list(fractions)}")
    if min(len(p) for p in parts) == 0:
        raise DataError(f"{ds.source}: {len(ds)} samples are too few to split {list(fractions)}")
    return {name: dataclasses.replace(ds.subset(np.sort(p)), split=f"{name}-s{seed}")
            for name, p in zip(PROTOCOL_SPLITS, parts)}
