"""The classification data layer on data as users have it: a single csv split by fractions,
dirty cells, files whose columns differ, string and 1..5 labels, and labels matched to a
teacher's id2label. Every bad input is one line naming the field, the value and the fix."""
import json
import math

import numpy as np
import pytest

from distilkit import data as data_mod
from distilkit.data import (DataSpec, builtin_dataset, class_names, label_names, load_raw,
                            match_teacher_labels, num_labels_of, split_indices, tokenize)
from tiny_text import SENTIMENTS, tiny_labelled, tiny_tokenizer, write_csv


def _one_line_error(exc_type, fn, *words):
    """``fn()`` raises ``exc_type`` with a one-line message holding every word."""
    with pytest.raises(exc_type) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


def _files(tmp_path, **splits):
    """csv files per split from rows, as data_files."""
    return {s: write_csv(tmp_path / f"{s}.csv", rows) for s, rows in splits.items()}


def _spec(data_files, **kw):
    return DataSpec(dataset=None, data_files=data_files, **kw)


# ------------------------------------------------------------------ the built-in data


def test_builtin_data_comes_out_exactly_as_before(monkeypatch):
    """The quickstart's figures depend on the built-in splits: load_raw changes no row,
    no split and no label (0/1 named negative/positive), and has nothing to say."""
    rows = [(t, 1.5 if lab == "positive" else (-1.5 if lab == "negative" else 0.0))
            for t, lab in tiny_labelled(300, seed=3)] + [("", 2.0)]
    monkeypatch.setattr(data_mod, "builtin_sentences", lambda: rows)
    expected = builtin_dataset()
    notes = []
    got = load_raw(DataSpec(), notes, classes=True)
    assert notes == [] and sorted(got) == sorted(expected) == ["test", "train", "validation"]
    for split in expected:
        assert got[split].features == expected[split].features
        assert got[split][:] == expected[split][:]
    assert label_names(got, DataSpec()) == ["negative", "positive"]
    assert num_labels_of(got, DataSpec()) == 2
    assert set(got["train"]["label"]) == {0, 1}


# ------------------------------------------------------------------ splits


def test_single_csv_with_fractions_gives_seeded_stratified_splits(tmp_path):
    rows = tiny_labelled(300, seed=1)
    path = write_csv(tmp_path / "my.csv", rows)
    spec = _spec(path, validation_fraction=0.1, test_fraction=0.2)  # a single path: train
    notes = []
    ds = load_raw(spec, notes, classes=True)
    assert {s: len(ds[s]) for s in ds} == {"train": 210, "validation": 30, "test": 60}
    assert label_names(ds, spec) == list(SENTIMENTS)
    for split in ds:
        assert ds[split].features["label"].names == list(SENTIMENTS)
        # stratified: each class in proportion (the file cycles through the three)
        counts = np.bincount(ds[split]["label"], minlength=3)
        assert counts.max() - counts.min() <= 1, (split, counts)
    # every row lands in exactly one split; each split keeps the file's order
    by_split = {s: [(t, SENTIMENTS[y]) for t, y in zip(ds[s]["text"], ds[s]["label"])] for s in ds}
    assert sorted(sum(by_split.values(), [])) == sorted(rows)
    for split, got in by_split.items():
        assert got == [r for r in rows if r in set(got)]
    # the run says what it did
    carved = [n for n in notes if "carved" in n]
    assert len(carved) == 1 and "'validation' (30 rows" in carved[0] and "'test' (60 rows" in carved[0]
    assert "split_seed 42" in carved[0] and "stratified by 'label'" in carved[0]
    assert any("0='negative', 1='neutral', 2='positive'" in n for n in notes)
    # deterministic: the same seed gives the same rows, another seed others
    again = load_raw(spec, classes=True)
    assert all(again[s][:] == ds[s][:] for s in ds)
    other = load_raw(_spec(path, validation_fraction=0.1, test_fraction=0.2, split_seed=7),
                     classes=True)
    assert other["test"]["text"] != ds["test"]["text"]


def test_split_indices_are_exact_disjoint_and_proportional():
    strata = np.array([0] * 70 + [1] * 20 + [2] * 10)
    val, test, train = split_indices(100, [10, 20], seed=0, strata=strata)
    assert (len(val), len(test), len(train)) == (10, 20, 70)
    assert sorted(np.concatenate([val, test, train]).tolist()) == list(range(100))
    assert np.bincount(strata[val], minlength=3).tolist() == [7, 2, 1]
    assert np.bincount(strata[test], minlength=3).tolist() == [14, 4, 2]
    for part in (val, test, train):
        assert part.tolist() == sorted(part.tolist())
    assert [p.tolist() for p in split_indices(100, [10, 20], 0, strata)] == \
        [val.tolist(), test.tolist(), train.tolist()]
    plain = split_indices(50, [5], seed=1)
    assert len(plain[0]) == 5 and len(plain[1]) == 45


def test_missing_split_says_which_field_carves_it(tmp_path):
    path = write_csv(tmp_path / "my.csv", tiny_labelled(30))
    _one_line_error(ValueError, lambda: load_raw(_spec(path)), "split 'validation'",
                    "validation_fraction: 0.1", "eval_split")
    _one_line_error(ValueError, lambda: load_raw(_spec(path, validation_fraction=0.2)),
                    "split 'test'", "test_fraction: 0.1", "test_split: null")
    ds = load_raw(_spec(path, validation_fraction=0.2, test_split=None), classes=True)
    assert sorted(ds) == ["train", "validation"] and len(ds["validation"]) == 6
    # one split for evaluation and test: carved once
    ds = load_raw(_spec(path, eval_split="test", validation_fraction=0.2), classes=True)
    assert sorted(ds) == ["test", "train"] and len(ds["test"]) == 6
    _one_line_error(ValueError, lambda: load_raw(_spec(path, eval_split="test", validation_fraction=0.2,
                                                       test_fraction=0.1)),
                    "test_fraction: 0.1", "carved by validation_fraction already")


def test_fraction_for_a_split_the_data_has_is_refused(tmp_path):
    files = _files(tmp_path, train=tiny_labelled(30), validation=tiny_labelled(9), test=tiny_labelled(9))
    _one_line_error(ValueError, lambda: load_raw(_spec(files, validation_fraction=0.1)),
                    "validation_fraction: 0.1", "already has a 'validation' split", "remove validation_fraction")
    _one_line_error(ValueError, lambda: load_raw(_spec(files, test_split=None, test_fraction=0.1)),
                    "test_fraction: 0.1", "test_split is null")


@pytest.mark.parametrize("kw, words", [
    ({"validation_fraction": 1.5}, ["validation_fraction: 1.5", "between 0 and 1"]),
    ({"test_fraction": 0}, ["test_fraction: 0", "e.g. 0.1"]),
    ({"test_fraction": "0.1"}, ["test_fraction: '0.1'"]),
    ({"validation_fraction": math.nan}, ["validation_fraction: nan"]),
    ({"validation_fraction": 0.6, "test_fraction": 0.5}, ["validation_fraction + test_fraction", "below 1"]),
    ({"split_seed": "x"}, ["split_seed: 'x'", "integer"]),
    ({"bad_rows": "skip"}, ["bad_rows: 'skip'", "drop, error"]),
])
def test_bad_split_and_row_settings(kw, words):
    _one_line_error(ValueError, lambda: DataSpec(**kw), *words)


def test_fractions_that_leave_nothing_to_train_on(tmp_path):
    path = write_csv(tmp_path / "my.csv", tiny_labelled(2))  # one row each for validation, test
    _one_line_error(ValueError, lambda: load_raw(_spec(path, validation_fraction=0.4, test_fraction=0.4)),
                    "validation_fraction + test_fraction", "2 rows", "smaller fractions")


def test_data_files_as_a_path_that_does_not_exist(tmp_path):
    _one_line_error(FileNotFoundError, lambda: load_raw(_spec(str(tmp_path / "nope.csv"))),
                    "data_files:", "nope.csv")


# ------------------------------------------------------------------ dirty data


def _dirty_rows():
    rows = tiny_labelled(30, seed=2)
    rows[3] = ("", rows[3][1])          # empty cell
    rows[5] = ("   ", rows[5][1])       # only spaces
    rows[8] = ("NaN", rows[8][1])       # read by pandas as a missing value
    rows[11] = (rows[11][0], "")        # no label
    return rows


def test_empty_and_missing_cells_are_dropped_and_counted_then_tokenize(tmp_path):
    """Before, an empty text cell reached the tokenizer as None (a TypeError traceback)."""
    files = _files(tmp_path, train=_dirty_rows(), validation=_dirty_rows()[:12], test=tiny_labelled(6))
    spec = _spec(files)
    notes = []
    ds = load_raw(spec, notes, classes=True)
    assert len(ds["train"]) == 26 and len(ds["validation"]) == 8 and len(ds["test"]) == 6
    assert all(t.strip() for s in ds for t in ds[s]["text"])
    dropped = [n for n in notes if "dropped" in n]
    assert len(dropped) == 2  # the clean test split has nothing to say
    assert "split 'train'" in dropped[0] and "dropped 4 of 30 rows" in dropped[0]
    assert "3 with an empty, missing or non-text 'text'" in dropped[0]
    assert "1 with a missing 'label'" in dropped[0] and "bad_rows: error" in dropped[0]
    tok = tokenize(ds, tiny_tokenizer(), spec, max_length=16)
    assert len(tok["train"]) == 26 and all(len(ids) > 2 for ids in tok["train"]["input_ids"])
    # without classes (the seq2seq use), the same rows go, labels stay as they are
    plain = load_raw(spec)
    assert len(plain["train"]) == 26 and set(plain["train"]["label"]) == set(SENTIMENTS)


def test_bad_rows_error_refuses_them(tmp_path):
    files = _files(tmp_path, train=_dirty_rows(), validation=tiny_labelled(6), test=tiny_labelled(6))
    _one_line_error(ValueError, lambda: load_raw(_spec(files, bad_rows="error")),
                    "text_column:", "3 of the 30 rows", "split 'train'", "train.csv",
                    "'text'", "example 4", "bad_rows: drop")
    rows = tiny_labelled(30)
    rows[7] = (rows[7][0], "")
    files = _files(tmp_path, train=rows, validation=tiny_labelled(6), test=tiny_labelled(6))
    _one_line_error(ValueError, lambda: load_raw(_spec(files, bad_rows="error")),
                    "label_column:", "1 of the 30 rows", "a missing 'label'", "example 8")


def test_nan_cells_from_a_dataframe(tmp_path):
    import pandas as pd

    rows = tiny_labelled(20)
    df = pd.DataFrame({"text": [t for t, _ in rows], "label": [float(i % 2) for i in range(20)]})
    df.loc[2, "label"] = float("nan")
    df.loc[4, "text"] = None
    df.to_parquet(tmp_path / "train.parquet")
    df.iloc[:6].to_parquet(tmp_path / "validation.parquet")
    files = {s: str(tmp_path / f"{s}.parquet") for s in ("train", "validation")}
    notes = []
    ds = load_raw(_spec(files, test_split=None), notes, classes=True)
    assert len(ds["train"]) == 18 and len(ds["validation"]) == 4
    # 0.0 / 1.0 (a float column because of the NaN) are the classes "0" and "1"
    assert ds["train"].features["label"].names == ["0", "1"]
    assert ds["train"]["label"] == [i % 2 for i in range(20) if i not in (2, 4)]


def test_numbers_in_a_text_column(tmp_path):
    # a column of numbers only is the wrong column
    files = _files(tmp_path, train=[(str(i), "positive" if i % 2 else "negative") for i in range(10)],
                   validation=[("1", "positive")], test=[("2", "negative")])
    _one_line_error(ValueError, lambda: load_raw(_spec(files)),
                    "text_column:", "'text'", "int64", "not text", "set text_column")
    # a number among text (json) is a non-text cell: dropped, and the column is text
    path = tmp_path / "train.jsonl"
    rows = [{"text": t, "label": y} for t, y in tiny_labelled(12)]
    rows[1]["text"], rows[2]["text"] = 5, None
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    notes = []
    ds = load_raw(_spec(str(path), validation_fraction=0.25, test_split=None), notes, classes=True)
    assert len(ds["train"]) + len(ds["validation"]) == 10
    assert ds["train"].features["text"].dtype == "string"
    assert "2 with an empty, missing or non-text 'text'" in notes[0]


def test_a_split_with_no_usable_rows(tmp_path):
    files = _files(tmp_path, train=tiny_labelled(10), validation=[("", "positive"), (" ", "negative")],
                   test=tiny_labelled(3))
    _one_line_error(ValueError, lambda: load_raw(_spec(files)),
                    "split 'validation'", "no usable rows", "all 2")


def test_files_whose_columns_differ(tmp_path):
    """Before, a datasets traceback (DatasetGenerationCastError)."""
    a = write_csv(tmp_path / "a.csv", tiny_labelled(6))
    b = write_csv(tmp_path / "b.csv", tiny_labelled(6), header=("sentence", "label"))
    c = write_csv(tmp_path / "c.csv", [r + ("x",) for r in tiny_labelled(6)], header=("text", "label", "id"))
    # two splits: the one without the text column is named, with both files' columns
    _one_line_error(ValueError, lambda: load_raw(_spec({"train": a, "validation": b}, test_split=None)),
                    "text_column:", "split 'validation' (", "b.csv", "['sentence', 'label']",
                    "a.csv", "['text', 'label']", "rename the column")
    # two files of one split
    _one_line_error(ValueError, lambda: load_raw(_spec({"train": [a, c], "validation": a}, test_split=None)),
                    "data_files.train:", "different columns", "a.csv: ['text', 'label']",
                    "c.csv: ['text', 'label', 'id']", "same header")
    # an extra column in another split is no reason to refuse
    ds = load_raw(_spec({"train": a, "validation": c}, test_split=None), classes=True)
    assert ds["validation"].column_names == ["text", "label", "id"]


def test_a_file_the_reader_cannot_parse(tmp_path):
    bad = tmp_path / "train.csv"
    bad.write_text("text,label\ngood film,positive\nbad film,negative,extra\n")
    _one_line_error(ValueError, lambda: load_raw(_spec(str(bad), validation_fraction=0.5, test_split=None)),
                    "data_files:", "train.csv", "cannot be read as csv", "Expected 2 fields in line 3")


def test_json_files_of_every_shape(tmp_path):
    rows = tiny_labelled(8)
    # a pretty-printed list of objects (its first line alone is no json), and a one-line one
    (tmp_path / "train.json").write_text(json.dumps([{"text": t, "label": y} for t, y in rows], indent=1))
    (tmp_path / "validation.json").write_text(json.dumps([{"text": t, "label": y} for t, y in rows[:3]]))
    files = {s: str(tmp_path / f"{s}.json") for s in ("train", "validation")}
    ds = load_raw(_spec(files, test_split=None), classes=True)
    assert len(ds["train"]) == 8 and ds["validation"].features["label"].names == list(SENTIMENTS)


# ------------------------------------------------------------------ labels


def test_labels_one_to_five_become_ids_zero_to_four(tmp_path):
    rows = [(t, str(1 + i % 5)) for i, (t, _) in enumerate(tiny_labelled(50))]
    files = _files(tmp_path, train=rows, validation=rows[:10], test=rows[10:20])
    notes = []
    ds = load_raw(_spec(files), notes, classes=True)
    assert label_names(ds, DataSpec()) == ["1", "2", "3", "4", "5"]
    assert ds["train"]["label"][:5] == [0, 1, 2, 3, 4]
    assert ds["test"].features["label"].names == ["1", "2", "3", "4", "5"]
    assert "0='1', 1='2'" in notes[-1]
    assert num_labels_of(ds, DataSpec()) == 5


def test_class_names_order():
    assert class_names(["2", "10", "1"]) == ["1", "2", "10"]
    assert class_names(["0", "1", "2"]) == ["0", "1", "2"]  # ids 0..n-1 keep their ids
    assert class_names(["pos", "neg", "neutral"]) == ["neg", "neutral", "pos"]
    assert class_names(["-1", "1"]) == ["-1", "1"]


def test_non_integer_numbers_are_not_classes(tmp_path):
    rows = [(t, 0.25 * (i % 3)) for i, (t, _) in enumerate(tiny_labelled(12))]
    files = _files(tmp_path, train=rows, validation=rows[:3], test=rows[:3])
    _one_line_error(ValueError, lambda: load_raw(_spec(files), classes=True),
                    "label_column:", "0.25", "class names or integer ids")


def test_unknown_labels_in_an_evaluation_split(tmp_path):
    train = [r for r in tiny_labelled(30) if r[1] != "neutral"]
    files = _files(tmp_path, train=train, validation=tiny_labelled(6), test=train[:4])
    _one_line_error(ValueError, lambda: load_raw(_spec(files), classes=True),
                    "label_column:", "split 'validation'", "validation.csv", "['neutral']",
                    "['negative', 'positive']", "add training examples")


def test_one_class_is_not_a_classification_task(tmp_path):
    rows = [(t, "positive") for t, _ in tiny_labelled(10)]
    files = _files(tmp_path, train=rows, validation=rows[:2], test=rows[:2])
    _one_line_error(ValueError, lambda: load_raw(_spec(files), classes=True),
                    "label_column:", "one class", "['positive']")


def test_hub_style_class_labels_and_missing_minus_one(tmp_path):
    """A ClassLabel stored with the data keeps its names and ids; -1 (no label, as in GLUE
    test splits) is a missing label."""
    from datasets import ClassLabel, Dataset, Features, Value

    feats = Features({"text": Value("string"), "label": ClassLabel(names=["pos", "neg"])})
    rows = tiny_labelled(10, names=("positive", "negative"))
    Dataset.from_dict({"text": [t for t, _ in rows], "label": [i % 2 for i in range(10)]},
                      features=feats).to_parquet(str(tmp_path / "train.parquet"))
    Dataset.from_dict({"text": ["good", "bad"], "label": [-1, 1]},
                      features=feats).to_parquet(str(tmp_path / "test.parquet"))
    files = {s: str(tmp_path / f"{s}.parquet") for s in ("train", "test")}
    notes = []
    ds = load_raw(_spec(files, eval_split="test"), notes, classes=True)
    assert label_names(ds, DataSpec()) == ["pos", "neg"]  # the data's own order
    assert ds["test"]["label"] == [1] and "1 with a missing 'label'" in notes[0]
    assert not any(n.startswith("labels:") for n in notes)


# ------------------------------------------------------------------ matching the teacher


def test_teacher_with_names_is_matched_by_name():
    teacher = {0: "positive", 1: "negative", 2: "neutral"}
    notes = []
    assert match_teacher_labels(["negative", "neutral", "positive"], teacher, notes) == [1, 2, 0]
    assert "by name" in notes[0] and "'negative'->'negative'" in notes[0]
    # keys as a config.json has them, a teacher with more classes, another case
    assert match_teacher_labels(["neg", "pos"], {"0": "NEG", "1": "other", "2": "POS"}) == [0, 2]


def test_teacher_with_placeholder_names_is_matched_by_index():
    notes = []
    assert match_teacher_labels(["negative", "positive"], {0: "LABEL_0", 1: "LABEL_1"}, notes) == [0, 1]
    assert "by index" in notes[0]
    # data whose labels are the ids themselves
    assert match_teacher_labels(["0", "1"], {0: "negative", 1: "positive"}) == [0, 1]
    _one_line_error(ValueError, lambda: match_teacher_labels(["a", "b", "c"], {0: "LABEL_0", 1: "LABEL_1"}),
                    "labels:", "3 classes", "['a', 'b', 'c']", "['LABEL_0', 'LABEL_1']", "finetune")


def test_teacher_without_the_data_labels():
    _one_line_error(ValueError,
                    lambda: match_teacher_labels(["business", "sport"], {0: "negative", 1: "positive"}),
                    "labels:", "['business', 'sport']", "['negative', 'positive']",
                    "missing: ['business', 'sport']", "rename the data's labels", "finetune")
    _one_line_error(ValueError, lambda: match_teacher_labels(["a", "b"], {0: "x", 2: "y"}),
                    "teacher:", "[0, 2]", "config.json")


def test_teacher_labels_from_loaded_data(tmp_path):
    """The names load_raw stores are what the teacher is matched against."""
    files = _files(tmp_path, train=tiny_labelled(30), validation=tiny_labelled(6), test=tiny_labelled(6))
    ds = load_raw(_spec(files), classes=True)
    mapping = match_teacher_labels(label_names(ds, DataSpec()), {0: "positive", 1: "neutral", 2: "negative"})
    assert mapping == [2, 1, 0]
