"""Dataset loaders: the shared files' quirks, generic files, and errors that name file and row."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from stream import datasets
from stream.config import data_dir
from stream.errors import DataError

needs_data = pytest.mark.skipif(not (data_dir() / "SST-2" / "dev.tsv").is_file(), reason="shared data not present")


@needs_data
@pytest.mark.parametrize("name,split,rows,counts,pair", [
    ("sst2", "dev", 872, [428, 444], False),
    ("imdb", "test", 25000, [12500, 12500], False),
    ("mrpc", "dev", 408, [129, 279], True),
    ("rte", "train", 2490, [1249, 1241], True),
    ("rte", "dev", 277, [146, 131], True),
    ("scitail", "test", 2126, [842, 1284], True),
    ("qqp", "sample", 23497, [14750, 8747], True),  # README: 14,749 + the repaired line 1 (label 0)
    ("ag_news", "test", 7600, [1900] * 4, False),
])
def test_shared_dataset_sizes_and_label_counts(name, split, rows, counts, pair):
    ds = datasets.load(name, split)
    assert len(ds) == rows == len(ds.ids) == len(set(ds.ids))
    assert ds.labels.dtype == np.int64
    assert np.bincount(ds.labels).tolist() == counts
    assert (ds.text_pairs is not None) == pair
    assert all(t and t == t.strip() for t in ds.texts)


@needs_data
def test_rte_row_with_five_fields_takes_label_from_last_field():
    ds = datasets.load("rte", "train")
    i = ds.ids.index("rte/train/2166")
    assert ds.texts[i].startswith('"That film wasn\'t too successful')
    assert ds.text_pairs[i] == 'The film "WarGames" was shot in 1983.'
    assert ds.label_names[ds.labels[i]] == "not_entailment"


@needs_data
def test_qqp_line_one_label_split_off_question2():
    ds = datasets.load("qqp", "sample")
    assert ds.ids[0] == "qqp/sample/1"
    assert ds.text_pairs[0] == "Which level of prepration is enough for the exam jlpt5?"
    assert ds.labels[0] == 0


@needs_data
def test_mrpc_bom_header_and_quotes_kept():
    ds = datasets.load("mrpc", "train")
    assert ds.labels[0] == 1 and ds.texts[0].startswith('Amrozi accused his brother, whom he called "the witness"')
    assert len(ds) == 3668  # a quoting CSV reader would merge rows at the unbalanced quotes


@needs_data
def test_ag_news_labels_zero_based_and_title_joined():
    ds = datasets.load("ag_news")
    assert ds.labels[0] == 2 and ds.label_names[2] == "Business"  # first row is "3"
    assert ds.texts[0].startswith("Fears for T N pension after talks. Unions representing")


@needs_data
def test_imdb_sorted_by_label_so_shuffle_before_limit():
    ds = datasets.load("imdb", "test")
    assert ds.labels[:12500].max() == 0 and ds.labels[12500:].min() == 1
    head = datasets.shuffle_limit(ds, shuffle=False, limit=2000)
    assert set(head.labels.tolist()) == {0}
    mixed = datasets.shuffle_limit(ds, shuffle=True, seed=0, limit=2000)
    assert 900 < mixed.labels.sum() < 1100
    again = datasets.shuffle_limit(ds, shuffle=True, seed=0, limit=2000)
    assert mixed.ids == again.ids and mixed.ids != datasets.shuffle_limit(ds, True, 1, 2000).ids
    i = ds.ids.index(mixed.ids[5])
    assert ds.texts[i] == mixed.texts[5] and ds.labels[i] == mixed.labels[5]


def test_unknown_dataset_and_split():
    with pytest.raises(DataError, match="unknown dataset 'nope'"):
        datasets.load("nope")
    with pytest.raises(DataError, match="no split 'train'"):
        datasets.load("imdb", "train")
    with pytest.raises(DataError, match="no train split"):
        datasets.default_split("scitail", "train")


def test_missing_file_names_it(tmp_path):
    with pytest.raises(DataError, match=r"missing\.csv: file not found"):
        datasets.load(f"csv:{tmp_path / 'missing.csv'}", text_column="text")


def test_shared_dataset_with_bad_row_names_file_and_row(tmp_path, monkeypatch):
    (tmp_path / "SST-2").mkdir()
    (tmp_path / "SST-2" / "dev.tsv").write_text("sentence\tlabel\ngood \t1\n \t0\nbad \t7\n")
    monkeypatch.setenv("EXITFLOW_DATA", str(tmp_path))
    with pytest.raises(DataError, match=r"dev\.tsv: row 3: empty or missing text"):
        datasets.load("sst2", "dev")
    (tmp_path / "SST-2" / "dev.tsv").write_text("sentence\tlabel\ngood \t1\nbad \t7\n")
    with pytest.raises(DataError, match=r"dev\.tsv: row 3: label 7 out of range"):
        datasets.load("sst2", "dev")
    (tmp_path / "SST-2" / "dev.tsv").write_text("sentence\tlabel\ngood \t1\textra\n")
    with pytest.raises(DataError, match=r"dev\.tsv: row 2: expected 2 .*fields, got 3"):
        datasets.load("sst2", "dev")
    (tmp_path / "SST-2" / "dev.tsv").write_text("text\tlabel\ngood \t1\n")
    with pytest.raises(DataError, match=r"dev\.tsv: row 1: expected header"):
        datasets.load("sst2", "dev")


def test_generic_csv_with_pair_and_label_map(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text('premise,hypothesis,gold\n"a, b",c,yes\nd,"e ""quoted""",no\n')
    ds = datasets.load(f"csv:{path}", text_column="premise", pair_column="hypothesis", label_column="gold",
                       label_map=datasets.parse_label_map("no,yes"))
    assert ds.texts == ["a, b", "d"] and ds.text_pairs == ["c", 'e "quoted"']
    assert ds.labels.tolist() == [1, 0] and ds.label_names == ("no", "yes")
    assert ds.ids == ["pairs/all/2", "pairs/all/3"]


def test_generic_errors_name_file_and_row(tmp_path):
    path = tmp_path / "f.csv"
    path.write_text("text,label\nfine,pos\nalso fine,maybe\n")
    with pytest.raises(DataError, match=r"f\.csv: row 3: unknown label 'maybe'"):
        datasets.load(f"csv:{path}", text_column="text", label_column="label", label_map={"neg": 0, "pos": 1})
    with pytest.raises(DataError, match=r"f\.csv: row 2: label 'pos' is not an integer"):
        datasets.load(f"csv:{path}", text_column="text", label_column="label")
    with pytest.raises(DataError, match=r"f\.csv: row 1: no column 'review'"):
        datasets.load(f"csv:{path}", text_column="review")


def test_generic_tsv_without_header_and_unlabelled(tmp_path):
    path = tmp_path / "f.tsv"
    path.write_text('1\tsay "hi\n0\tbye\n')
    ds = datasets.load(f"tsv:{path}", text_column=1, label_column=0, header=False)
    assert ds.texts == ['say "hi', "bye"] and ds.labels.tolist() == [1, 0]
    unlabelled = datasets.load(f"tsv:{path}", text_column=1, header=False)
    assert unlabelled.labels is None
    path.write_text("1\tfine\n0\n")
    with pytest.raises(DataError, match=r"f\.tsv: row 2: column 1 missing"):
        datasets.load(f"tsv:{path}", text_column=1, label_column=0, header=False)


def test_generic_jsonl_gz_and_errors(tmp_path):
    path = tmp_path / "r.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps({"t": "one", "y": 0}) + "\n" + json.dumps({"t": "two", "y": 1}) + "\n")
    ds = datasets.load(f"jsonl:{path}", text_column="t", label_column="y")
    assert ds.texts == ["one", "two"] and ds.labels.tolist() == [0, 1]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"t": "ok", "y": 0}\n{"t": "no label"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl: row 2: missing key 'y'"):
        datasets.load(f"jsonl:{bad}", text_column="t", label_column="y")
    bad.write_text('{"t": "ok", "y": 0}\nnot json\n')
    with pytest.raises(DataError, match=r"bad\.jsonl: line 2: not valid JSON"):
        datasets.load(f"jsonl:{bad}", text_column="t", label_column="y")


def test_shuffle_limit_keeps_columns_aligned():
    ds = datasets.Dataset("toy", "all", [f"id{i}" for i in range(10)], [f"t{i}" for i in range(10)],
                          [f"p{i}" for i in range(10)], np.arange(10) % 2, ("a", "b"), "toy")
    out = datasets.shuffle_limit(ds, shuffle=True, seed=3, limit=4)
    assert len(out) == 4
    for i, t, p, y in zip(out.ids, out.texts, out.text_pairs, out.labels):
        k = int(i[2:])
        assert t == f"t{k}" and p == f"p{k}" and y == k % 2
    assert datasets.shuffle_limit(ds, limit=3).ids == ["id0", "id1", "id2"]
    with pytest.raises(DataError):
        datasets.shuffle_limit(ds, limit=-1)
