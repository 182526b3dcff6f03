"""Datasets: a hub name or local csv/json/jsonl/parquet files, and the built-in default.

The built-in default is real and offline: the 10,605 Rotten Tomatoes sentences rated by
humans that ship inside the vaderSentiment 3.3.2 source distribution (Hutto & Gilbert,
ICWSM 2014). The label is the sign of the mean rating (zeros dropped) and the
train/validation/test split is fixed by a seed, so every run sees the same examples.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from typing import Optional, Union

from distilkit.files import atomic_write_bytes

BUILTIN_NAME = "builtin:rotten_tomatoes"
_VADER = "vaderSentiment==3.3.2"
_MEMBER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"


def cache_root() -> str:
    """Where distilkit keeps downloaded data, fine-tuned teachers and teacher outputs."""
    return os.environ.get("DISTILKIT_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "distilkit"))


def _vader_sdist() -> str:
    """Path of the vaderSentiment sdist, fetched with pip from the package registry once."""
    d = os.path.join(cache_root(), "downloads")
    os.makedirs(d, exist_ok=True)
    for name in os.listdir(d):
        if name.startswith("vaderSentiment-3.3.2") and name.endswith(".tar.gz"):
            return os.path.join(d, name)
    with tempfile.TemporaryDirectory(dir=d) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary",
               ":all:", _VADER, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        files = [f for f in os.listdir(tmp) if f.endswith(".tar.gz")] if proc.returncode == 0 else []
        if not files:
            raise RuntimeError(
                "the built-in dataset needs the vaderSentiment 3.3.2 source distribution and "
                f"`{' '.join(cmd)}` failed:\n{proc.stderr.strip()}\n"
                "Fix: run that command with access to PyPI, or put the .tar.gz in "
                f"{d}, or point DISTILKIT_CACHE at a cache that has it."
            )
        os.replace(os.path.join(tmp, files[0]), os.path.join(d, files[0]))
        return os.path.join(d, files[0])


def builtin_sentences() -> list[tuple[str, float]]:
    """(sentence, mean human rating) for the 10,605 Rotten Tomatoes snippets."""
    path = os.path.join(cache_root(), "data", "movieReviewSnippets_GroundTruth.txt")
    if not os.path.isfile(path):
        with tarfile.open(_vader_sdist()) as outer:
            inner_name = next(m for m in outer.getnames()
                              if m.endswith("additional_resources/hutto_ICWSM_2014.tar.gz"))
            inner_bytes = outer.extractfile(inner_name).read()
        with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
            data = inner.extractfile(_MEMBER).read()
        atomic_write_bytes(path, data)
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.rstrip("\r\n").split("\t")
            if len(parts) < 3:
                continue
            rows.append(("\t".join(parts[2:]).strip(), float(parts[1])))
    return rows


def builtin_dataset(seed: int = 1234, val_fraction: float = 0.1, test_fraction: float = 0.1):
    """The built-in binary sentiment task as a ``DatasetDict`` (train/validation/test) with
    columns ``text`` and ``label`` (1 = positive). The split depends only on ``seed``."""
    import random

    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    rows = [(t, 1 if s > 0 else 0) for t, s in builtin_sentences() if s != 0 and t]
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_val, n_test = int(len(rows) * val_fraction), int(len(rows) * test_fraction)
    parts = {"test": order[:n_test], "validation": order[n_test:n_test + n_val],
             "train": order[n_test + n_val:]}
    feats = Features({"text": Value("string"), "label": ClassLabel(names=["negative", "positive"])})
    return DatasetDict({
        k: Dataset.from_dict({"text": [rows[i][0] for i in idx], "label": [rows[i][1] for i in idx]},
                             features=feats)
        for k, idx in parts.items()
    })


BAD_ROWS = ("drop", "error")


@dataclass
class DataSpec:
    """Where the data comes from and which columns mean what.

    ``dataset`` is a hub dataset name, ``builtin:rotten_tomatoes``, or ``None`` with
    ``data_files`` naming local files per split (``{"train": "a.csv", ...}``); a single
    path (or list of paths) is the training split.

    ``validation_fraction`` / ``test_fraction`` carve the evaluation / test split out of the
    training split (seeded by ``split_seed``) when the data has no such split. Rows whose
    text is empty, missing or not text, or whose label is missing, are dropped (counted in
    the notes) or refused, as ``bad_rows`` (``drop`` / ``error``) says.

    ``streaming``: the training split is never loaded whole. It is read as a stream
    (:func:`train_stream`), cleaned and tokenized on the fly; only its first
    :data:`STREAM_HEAD` rows are read up front, to check its columns and classes. The
    evaluation and test splits, which must then be splits of their own, load as usual.

    ``shuffle_buffer``: with ``streaming``, the stream is shuffled through a buffer of that
    many rows (datasets' ``IterableDataset.shuffle``, seeded by the run's ``seed``, so a
    seed gives one order, in every process alike); ``0`` (the default) keeps the source's
    order, as a stream of an already shuffled corpus wants. A loaded split needs none: it
    is shuffled whole every epoch.
    """

    dataset: Optional[str] = BUILTIN_NAME
    dataset_config: Optional[str] = None
    data_files: Optional[Union[dict, str, list]] = None
    text_column: str = "text"
    text_pair_column: Optional[str] = None
    label_column: Optional[str] = "label"
    train_split: str = "train"
    eval_split: str = "validation"
    test_split: Optional[str] = "test"
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    validation_fraction: Optional[float] = None
    test_fraction: Optional[float] = None
    split_seed: int = 42
    bad_rows: str = "drop"
    streaming: bool = False
    shuffle_buffer: int = 0

    def __post_init__(self):
        for name in ("validation_fraction", "test_fraction"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                  or not 0 < v < 1):
                raise ValueError(f"{name}: {v!r} is not a fraction between 0 and 1; give e.g. "
                                 "0.1, or null to carve no split")
        if (self.validation_fraction or 0) + (self.test_fraction or 0) >= 1:
            raise ValueError(f"validation_fraction + test_fraction: {self.validation_fraction} + "
                             f"{self.test_fraction} leave nothing to train on; their sum must "
                             "be below 1 (e.g. 0.1 each)")
        if isinstance(self.split_seed, bool) or not isinstance(self.split_seed, int):
            raise ValueError(f"split_seed: {self.split_seed!r} is not an integer; give e.g. 42")
        if self.bad_rows not in BAD_ROWS:
            raise ValueError(f"bad_rows: {self.bad_rows!r} is not one of {', '.join(BAD_ROWS)} "
                             "(drop: skip rows with empty text or a missing label, counted; "
                             "error: refuse them)")
        if not isinstance(self.streaming, bool):
            raise ValueError(f"streaming: {self.streaming!r} is not true or false")
        v = self.shuffle_buffer
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"shuffle_buffer: {v!r} is not a whole number >= 0; give the rows "
                             "held to shuffle the stream (e.g. 1000), or 0 for its own order")
        if v and not self.streaming:
            raise ValueError(f"shuffle_buffer: {v} shuffles a streamed training split, but "
                             "streaming is false (a loaded split is shuffled whole every "
                             "epoch); remove shuffle_buffer, or set streaming: true")
        if self.streaming:
            for name in ("validation_fraction", "test_fraction"):
                if getattr(self, name):
                    raise ValueError(f"{name}: {getattr(self, name)} carves a split out of the "
                                     "training split, but streaming: true never holds the "
                                     "training split; give that split as its own file "
                                     f"(data_files: {{{self.train_split}: ..., "
                                     f"{self.eval_split}: ...}}) and remove {name}")


_LOCAL_TYPES = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".tsv": "csv"}


def load_raw(spec: DataSpec, notes: Optional[list] = None, *, classes: bool = False):
    """Load the splits named in ``spec`` as a ``DatasetDict`` and check them, before any
    model is touched: columns present (and the same in every file of a split), rows with
    bad text or a missing label dropped or refused (``bad_rows``), evaluation / test splits
    carved out of the training split where asked (``validation_fraction`` /
    ``test_fraction``).

    ``classes``: the label column holds classes (classification). Carved splits are then
    stratified by label, and the labels, integers or strings, become ids in a stable order
    (see :func:`class_names`), stored as a ``ClassLabel`` on every split; a label of an
    evaluation split that training never sees is an error. Without it (seq2seq: the label
    column is a target text) labels are left as they are.

    What was done to the data (rows dropped, splits carved, labels mapped) is appended to
    ``notes``, one sentence each, for the run to print.
    """
    from datasets import DatasetDict

    notes = [] if notes is None else notes
    if spec.streaming and not classes:
        raise ValueError("streaming: true applies to task: classification (a transfer set read "
                         "as a stream); remove it from this recipe")
    ds, sources = _load(spec)
    if spec.streaming:
        notes.append(f"split {spec.train_split!r} ({sources[spec.train_split]}): read as a "
                     f"stream, cleaned and tokenized on the fly; its first "
                     f"{len(ds[spec.train_split]):,} rows were read up front to check its "
                     "columns and classes")
    for split in (spec.train_split, spec.eval_split, spec.test_split):
        if split and split in ds and len(ds[split]) == 0:
            raise ValueError(f"split {split!r} is empty: it needs at least one example")
    if spec.train_split not in ds:
        raise ValueError(f"train_split: split {spec.train_split!r} is not in the dataset; it has "
                         f"{sorted(ds)} (set train_split to the split to train on)")
    used = [s for s in dict.fromkeys((spec.train_split, spec.eval_split, spec.test_split))
            if s and s in ds]
    check_columns(DatasetDict({s: ds[s] for s in used}), spec, sources)
    for split in used:
        ds[split] = _drop_bad_rows(ds[split], spec, split, sources[split], notes)
    _carve_splits(ds, spec, sources, notes, stratify=classes)
    if classes:
        _encode_labels(ds, spec, sources, notes)
    if spec.max_train_samples:
        ds[spec.train_split] = ds[spec.train_split].select(range(min(spec.max_train_samples, len(ds[spec.train_split]))))
    if spec.max_eval_samples:
        for split in (spec.eval_split, spec.test_split):
            if split:
                ds[split] = ds[split].select(range(min(spec.max_eval_samples, len(ds[split]))))
    return ds


def _load(spec: DataSpec):
    """The dataset as a ``DatasetDict``, and per split where its rows come from (for
    messages: the files, or the dataset's name). With ``streaming`` the training split is
    its first :data:`STREAM_HEAD` rows, read from the stream (:func:`_stream_head`)."""
    from datasets import DatasetDict, get_dataset_split_names, load_dataset

    streamed = spec.train_split if spec.streaming else None
    if spec.data_files:
        ds, sources = _load_files(spec, streamed)
    elif spec.dataset == BUILTIN_NAME:
        ds = builtin_dataset()
    elif spec.dataset and streamed:  # only the evaluation splits are loaded
        have = get_dataset_split_names(spec.dataset, spec.dataset_config)
        if streamed not in have:
            raise ValueError(f"train_split: split {streamed!r} is not in {spec.dataset!r}; it has "
                             f"{sorted(have)} (set train_split to the split to train on)")
        ds = DatasetDict({s: load_dataset(spec.dataset, spec.dataset_config, split=s)
                          for s in dict.fromkeys((spec.eval_split, spec.test_split))
                          if s and s in have and s != streamed})
    elif spec.dataset:
        ds = load_dataset(spec.dataset, spec.dataset_config)
    else:
        raise ValueError("dataset: give a hub dataset name, 'builtin:rotten_tomatoes', or data_files")
    if not isinstance(ds, DatasetDict):
        ds = DatasetDict({spec.train_split: ds})
    if not spec.data_files:
        sources = {split: f"{spec.dataset or ''} {split}".strip() for split in ds}
    if streamed:
        sources[streamed] = f"{sources.get(streamed) or f'{spec.dataset} {streamed}'}, streamed"
        ds[streamed] = _stream_head(spec, sources[streamed])
    return ds, sources


def _files_by_split(spec: DataSpec):
    """``data_files`` as ``{split: [paths]}``, and whether it was one path (or list) for the
    training split."""
    files = spec.data_files
    single = not isinstance(files, dict)  # `data_files: my.csv`: the training split
    files = {spec.train_split: files} if single else dict(files)
    return ({split: [os.fspath(f) for f in (fs if isinstance(fs, (list, tuple)) else [fs])]
             for split, fs in files.items()}, single)


def _load_files(spec: DataSpec, streamed: Optional[str] = None):
    """Local files: each split is loaded on its own (splits may differ in columns they do
    not use); the files of one split must have the same columns. The ``streamed`` split is
    checked (files present, one type, csv / tsv / parquet headers that agree) but not
    loaded."""
    from datasets import DatasetDict, load_dataset

    files, single = _files_by_split(spec)

    def key(split):  # the recipe key the user wrote
        return "data_files" if single else f"data_files.{split}"

    for split, fs in files.items():
        for one in fs:
            if not os.path.isfile(one):
                raise FileNotFoundError(f"{key(split)}: {one!r} does not exist")
    exts = {os.path.splitext(f)[1].lower() for fs in files.values() for f in fs}
    if len(exts) != 1 or next(iter(exts)) not in _LOCAL_TYPES:
        raise ValueError(f"data_files: use one of {sorted(_LOCAL_TYPES)} for all splits, got {sorted(exts)}")
    ext = next(iter(exts))
    for split, fs in files.items():
        if split == streamed and ext in (".json", ".jsonl"):
            continue  # a json file's columns are read from its rows: the stream checks them
        if split != streamed and all(_file_has_no_rows(one, ext) for one in fs):
            raise ValueError(f"split {split!r} is empty ({', '.join(fs)}): it needs at least one example")
        cols = {f: c for f in fs if (c := _file_columns(f, ext)) is not None}
        if len({frozenset(c) for c in cols.values()}) > 1:
            listed = "; ".join(f"{f}: {c}" for f, c in cols.items())
            raise ValueError(f"{key(split)}: the files of split {split!r} have different "
                             f"columns ({listed}); give every file of a split the same header")
    from datasets.exceptions import DatasetGenerationError

    ds = DatasetDict()
    for split, fs in files.items():
        if split == streamed:
            continue
        try:
            ds[split] = load_dataset(_LOCAL_TYPES[ext], data_files={split: fs}, **_reader_kwargs(ext))[split]
        except DatasetGenerationError as e:  # the reader's own words say what is wrong
            cause = e.__cause__ or e.__context__ or e
            why = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
            raise ValueError(f"{key(split)}: {', '.join(fs)} cannot be read as "
                             f"{ext.lstrip('.')} ({why}); fix the file") from None
    return ds, {split: ", ".join(fs) for split, fs in files.items()}


def _reader_kwargs(ext: str) -> dict:
    return {"delimiter": "\t"} if ext == ".tsv" else {}


# ------------------------------------------------------------------ streaming

STREAM_HEAD = 256  # rows of a streamed training split read up front (columns, classes)


def _open_stream(spec: DataSpec):
    """The training split as a ``datasets.IterableDataset``, as the source gives it (local
    files and hub datasets through datasets' streaming readers; the built-in data, which is
    small and in memory anyway, through ``to_iterable_dataset``)."""
    from datasets import load_dataset

    split = spec.train_split
    if spec.data_files:
        fs = _files_by_split(spec)[0][split]
        ext = os.path.splitext(fs[0])[1].lower()
        return load_dataset(_LOCAL_TYPES[ext], data_files={split: fs}, streaming=True,
                            **_reader_kwargs(ext))[split]
    if spec.dataset == BUILTIN_NAME:
        return builtin_dataset()[split].to_iterable_dataset()
    return load_dataset(spec.dataset, spec.dataset_config, split=split, streaming=True)


def _stream_head(spec: DataSpec, source: str):
    """The first :data:`STREAM_HEAD` rows of the streamed training split as a ``Dataset``:
    what :func:`load_raw` checks (columns, bad rows) and reads the classes from."""
    from itertools import islice

    from datasets import Dataset

    stream = _open_stream(spec)
    rows = list(islice(iter(stream), STREAM_HEAD))
    if not rows:
        raise ValueError(f"split {spec.train_split!r} is empty ({source}): it needs at least "
                         "one example")
    return Dataset.from_list(rows, features=stream.features)


def train_stream(spec: DataSpec, class_names: Optional[list] = None, where: str = "",
                 seed: int = 0):
    """The training split as a ``datasets.IterableDataset``, cleaned row by row as
    :func:`load_raw` cleans a loaded split: rows with empty, missing or non-text text (or
    pair) cells, or a missing label, are skipped (``bad_rows: drop``) or refused with their
    row number (``bad_rows: error``); labels become ids of ``class_names`` (the classes
    ``load_raw`` read, :func:`label_names`), and a label outside them is an error, since
    the classes cannot change once training has started. Without ``class_names`` (a
    transfer set, ``label_column: null``) rows carry no label. ``max_train_samples`` keeps
    the first rows. With ``shuffle_buffer`` the rows (the first ``max_train_samples`` of
    them, if set) come through a shuffle buffer of that many rows, seeded by ``seed``."""
    stream = _open_stream(spec)
    where = where or f"split {spec.train_split!r}"
    texts = [("text_column", spec.text_column)] + (
        [("text_pair_column", spec.text_pair_column)] if spec.text_pair_column else [])
    col = spec.label_column if class_names else None
    index = {n: i for i, n in enumerate(class_names or [])}
    own = getattr((stream.features or {}).get(col), "names", None) if col else None

    def clean(batch, idx):
        keep = []
        for j, i in enumerate(idx):
            bad = [(fname, f"{c!r} is empty, missing or not text") for fname, c in texts
                   if _bad_text_cell(batch[c][j])]
            if col:
                v = batch[col][j]
                if _missing_label(v) or (own is not None and v < 0):
                    bad.append(("label_column", f"{col!r} is missing"))
            if bad and spec.bad_rows == "error":
                raise ValueError(f"{bad[0][0]}: row {i + 1} of {where} has "
                                 f"{'; '.join(w for _, w in bad)}; fill it in, or set "
                                 "bad_rows: drop to skip such rows")
            if not bad:
                keep.append(j)
        out = {k: [v[j] for j in keep] for k, v in batch.items()}
        if col:
            ids = []
            for j, v in zip(keep, out[col]):
                name = own[v] if own is not None else _label_key(v, where, col)
                if name not in index:
                    raise ValueError(
                        f"label_column: row {idx[j] + 1} of {where} has label {name!r}, which "
                        f"is not among the classes {class_names} read from its first "
                        f"{STREAM_HEAD} rows and the evaluation splits; put an example of "
                        "every class among the first rows (or in the evaluation split)")
                ids.append(index[name])
            out[col] = ids
        return out

    stream = stream.map(clean, batched=True, with_indices=True)
    if spec.max_train_samples:
        stream = stream.take(spec.max_train_samples)
    if spec.shuffle_buffer:
        # Every process shuffles with the same seed, so all read the same order and each
        # keeps its own slice of every global batch, as without the buffer.
        stream = stream.shuffle(seed=seed, buffer_size=spec.shuffle_buffer)
    return stream


def _file_columns(path: str, ext: str) -> Optional[list]:
    """The column names of a local file, read from its header (csv/tsv), schema (parquet)
    or first record (json: a list of objects, an object of columns, or jsonl), without
    loading it; ``None`` where they cannot be read (datasets then says why)."""
    if ext == ".parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    with open(path, encoding="utf-8", newline="") as f:
        if ext in (".csv", ".tsv"):
            return next(csv.reader(f, delimiter="\t" if ext == ".tsv" else ","), [])
        text = f.read().strip()
    for candidate in (text, text.split("\n", 1)[0]):  # one json document, else jsonl
        try:
            obj = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(obj, list):
            obj = obj[0] if obj else None
        return list(obj) if isinstance(obj, dict) else None
    return None


def _file_has_no_rows(path: str, ext: str) -> bool:
    """True for a local csv/tsv with only a header, or an empty json/jsonl file."""
    if ext == ".parquet":
        return False
    with open(path, encoding="utf-8") as f:
        lines = [ln for ln in f if ln.strip()]
    if ext in (".csv", ".tsv"):
        return len(lines) < 2
    return not lines or "".join(lines).strip() in ("[]", "{}")


def check_columns(ds, spec: DataSpec, sources: Optional[dict] = None) -> None:
    """Every split that is used must have the text (and pair, and label) columns.
    ``sources`` (split -> files) names the files in the message."""
    sources = sources or {}

    def where(split):
        return f"split {split!r}" + (f" ({sources[split]})" if split in sources else "")

    def others(col):
        return "".join(f"; {where(s)} has {d.column_names}" for s, d in ds.items()
                       if col in d.column_names)

    need = [("text_column", spec.text_column)]
    if spec.text_pair_column:
        need.append(("text_pair_column", spec.text_pair_column))
    for split, d in ds.items():
        cols = d.column_names
        for fname, col in need:
            if col not in cols:
                raise ValueError(f"{fname}: column {col!r} is not in {where(split)}; its "
                                 f"columns are {cols}{others(col)} (rename the column, or set "
                                 f"{fname})")
        # A streamed training split may be a transfer set: the label column is the evaluation's.
        if spec.label_column and spec.label_column not in cols and split == spec.train_split \
                and not spec.streaming:
            raise ValueError(f"label_column: column {spec.label_column!r} is not in "
                             f"{where(split)}; its columns are {cols}{others(spec.label_column)} "
                             "(set label_column: null to distil on a transfer set without labels)")


# ------------------------------------------------------------------ dirty rows


def _is_text(feat) -> bool:
    from datasets import Value

    return isinstance(feat, Value) and feat.dtype in ("string", "large_string")


def _bad_text(d, col: str, fname: str, where: str) -> "np.ndarray":
    """Rows whose ``col`` is missing, empty (or only spaces) or not a string. A column that
    holds no text at all (numbers, lists) is refused: it is the wrong column."""
    import numpy as np
    import pyarrow.compute as pc
    from datasets import Json

    feat = d.features[col]
    if _is_text(feat):
        arr = d.with_format("arrow")[col]
        bad = pc.or_kleene(pc.is_null(arr), pc.equal(pc.utf8_trim_whitespace(arr), ""))
        return bad.fill_null(True).to_numpy(zero_copy_only=False)
    if isinstance(feat, Json):  # mixed cell types (json files): keep the strings
        return np.array([_bad_text_cell(v) for v in d[col]], dtype=bool)
    raise ValueError(f"{fname}: column {col!r} of {where} holds {feat}, not text; set {fname} "
                     f"to the column with the text (the columns are {d.column_names})")


def _bad_text_cell(v) -> bool:
    """One cell that cannot be used as text: missing, not a string, or only spaces (the rule
    :func:`_bad_text` applies column-wise, for a row read from a stream)."""
    return not (isinstance(v, str) and v.strip())


def _missing_label(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or \
        (isinstance(v, str) and not v.strip())


def _bad_labels(d, col: str) -> "np.ndarray":
    """Rows whose label is missing: null, NaN, an empty string, or -1 in a ``ClassLabel``
    (the hub's "no label", e.g. GLUE test splits)."""
    import numpy as np
    import pyarrow.compute as pc
    from datasets import ClassLabel, Value

    feat = d.features[col]
    if isinstance(feat, (ClassLabel, Value)):
        arr = d.with_format("arrow")[col]
        bad = pc.is_null(arr, nan_is_null=True)
        if isinstance(feat, ClassLabel):
            bad = pc.or_kleene(bad, pc.less(arr, 0))
        elif _is_text(feat):
            bad = pc.or_kleene(bad, pc.equal(pc.utf8_trim_whitespace(arr), ""))
        return bad.fill_null(True).to_numpy(zero_copy_only=False)
    return np.array([_missing_label(v) for v in d[col]], dtype=bool)


def _drop_bad_rows(d, spec: DataSpec, split: str, source: str, notes: list):
    """``d`` without the rows that cannot be used (or an error, with ``bad_rows: error``);
    the count per reason goes to ``notes``."""
    import numpy as np
    from datasets import Value

    where = f"split {split!r} ({source})"
    checks = [("text_column", spec.text_column, "an empty, missing or non-text")]
    if spec.text_pair_column:
        checks.append(("text_pair_column", spec.text_pair_column, "an empty, missing or non-text"))
    if spec.label_column and spec.label_column in d.column_names:
        checks.append(("label_column", spec.label_column, "a missing"))
    bad = None
    reasons = []
    for fname, col, what in checks:
        mask = _bad_labels(d, col) if fname == "label_column" else _bad_text(d, col, fname, where)
        n = int(mask.sum())
        if n and spec.bad_rows == "error":
            first = int(mask.argmax()) + 1
            raise ValueError(f"{fname}: {n:,} of the {len(d):,} rows of {where} have {what} "
                             f"{col!r} (first: example {first}); fill them in, or set "
                             "bad_rows: drop to skip such rows")
        if n:
            reasons.append(f"{n:,} with {what} {col!r}")
        bad = mask if bad is None else bad | mask
    if reasons:
        n_bad = int(bad.sum())
        if n_bad == len(d):
            raise ValueError(f"{where} has no usable rows: all {len(d):,} have bad cells "
                             f"({'; '.join(reasons)}); check text_column / label_column")
        d = d.select(np.flatnonzero(~bad))
        notes.append(f"{where}: dropped {n_bad:,} of {n_bad + len(d):,} rows "
                     f"({'; '.join(reasons)}); bad_rows: error refuses them instead")
    # Mixed-type (json) text columns hold only strings now: store them as text.
    text_cols = [c for f, c, _ in checks if f != "label_column" and not _is_text(d.features[c])]
    if text_cols:
        feats = d.features.copy()
        for c in text_cols:
            feats[c] = Value("string")
        d = d.map(lambda b: {c: b[c] for c in text_cols}, batched=True, features=feats)
    return d


# ------------------------------------------------------------------ carved splits


def split_indices(n: int, sizes: list, seed: int, strata=None) -> list:
    """Row indices of ``n`` rows cut into parts of ``sizes`` rows, plus the rest last; each
    part sorted (the file's order). Seeded: the same ``seed`` gives the same rows.

    With ``strata`` (one integer code per row, e.g. the label) every part takes each
    stratum in proportion, give or take one row: rows are ordered by stratum, randomly
    within it, and each part picks evenly spaced positions of that order."""
    import numpy as np

    rank = np.random.default_rng(seed).permutation(n)
    order = np.lexsort((rank, strata)) if strata is not None else np.argsort(rank)
    parts = []
    for size in sizes:
        pos = np.arange(len(order))
        pick = (pos * size) // len(order) != ((pos + 1) * size) // len(order)
        parts.append(np.sort(order[pick]))
        order = order[~pick]
    return parts + [np.sort(order)]


def _carve_splits(ds, spec: DataSpec, sources: dict, notes: list, stratify: bool) -> None:
    """Add the evaluation / test split carved out of the training split, where the data has
    none and a fraction asks for it; a missing split with no fraction is an error saying
    how to get one."""
    import numpy as np

    train = spec.train_split
    wanted = []
    for split_field, split, frac, fname, alt in (
            ("eval_split", spec.eval_split, spec.validation_fraction, "validation_fraction",
             "eval_split to a split it has"),
            ("test_split", spec.test_split, spec.test_fraction, "test_fraction",
             f"test_split: null to report on {spec.eval_split!r}")):
        if split in [w[0] for w in wanted]:  # eval_split and test_split are one split
            if frac:
                raise ValueError(f"{fname}: {frac}, but split {split!r} (eval_split and "
                                 f"test_split) is carved by validation_fraction already; "
                                 f"remove {fname}")
            continue
        if not split:
            if frac:
                raise ValueError(f"{fname}: {frac} carves a split, but test_split is null; "
                                 f"set test_split: test, or remove {fname}")
            continue
        if split in ds and frac:
            raise ValueError(f"{fname}: {frac} would carve split {split!r} out of {train!r}, "
                             f"but the data already has a {split!r} split ({len(ds[split]):,} "
                             f"rows); remove {fname}")
        if split not in ds and spec.streaming:
            raise ValueError(f"{split_field}: split {split!r} is not in the dataset; it has "
                             f"{sorted(ds)}; with streaming: true it cannot be carved out of "
                             f"{train!r}: give it as its own split (data_files: {{{train}: ..., "
                             f"{split}: ...}}), or set {alt}")
        if split not in ds and not frac:
            raise ValueError(f"{split_field}: split {split!r} is not in the dataset; it has "
                             f"{sorted(ds)} (set {fname}: 0.1 to carve it out of {train!r}, or "
                             f"{alt})")
        if split not in ds:
            wanted.append((split, frac, fname))
    if not wanted:
        return
    d = ds[train]
    n = len(d)
    sizes = [max(1, round(n * frac)) for _, frac, _ in wanted]
    if sum(sizes) >= n:
        raise ValueError(f"{' + '.join(w[2] for w in wanted)}: {sizes} of the {n:,} rows of split "
                         f"{train!r} leave none to train on; give more data or smaller fractions")
    col = spec.label_column
    strata = None
    if stratify and col and col in d.column_names:
        values = d.with_format("arrow")[col].to_pylist() if _is_arrow_readable(d, col) else d[col]
        where = f"split {train!r} ({sources[train]})"
        strata = np.unique(np.array([_label_key(v, where, col) for v in values]),
                           return_inverse=True)[1]
    parts = split_indices(n, sizes, spec.split_seed, strata)
    for (split, frac, _), idx in zip(wanted, parts):
        ds[split] = d.select(idx)
        sources[split] = f"carved out of {train!r}"
    ds[train] = d.select(parts[-1])
    carved = " and ".join(f"{split!r} ({len(idx):,} rows, {frac:g})"
                          for (split, frac, _), idx in zip(wanted, parts))
    how = f", stratified by {col!r}" if strata is not None else ""
    notes.append(f"split {train!r} ({sources[train]}): carved {carved} out of its {n:,} rows "
                 f"(split_seed {spec.split_seed}{how}); {train!r} keeps {len(parts[-1]):,}")


def _is_arrow_readable(d, col: str) -> bool:
    """Whether the column's arrow values are its values (not a json encoding of them)."""
    from datasets import ClassLabel, Value

    return isinstance(d.features[col], (ClassLabel, Value))


# ------------------------------------------------------------------ labels


def _label_key(v, where: str, col: str) -> str:
    """The class name of one label value: strings stripped, integral numbers as integers
    (``1.0`` from a csv column with a gap is ``"1"``)."""
    if isinstance(v, str):
        return v.strip()
    if isinstance(v, float):
        if not v.is_integer():
            raise ValueError(f"label_column: {col!r} of {where} holds {v!r}, not a class; "
                             "classification needs class names or integer ids")
        return str(int(v))
    return str(v)


def class_names(keys) -> list:
    """Class names in their id order: by value when every name is an integer (``"2"``
    before ``"10"``; labels 1..5 become ids 0..4, labels 0..n-1 keep their ids), else
    sorted as text."""
    keys = set(keys)
    if all(re.fullmatch(r"[+-]?\d+", k) for k in keys):
        return sorted(keys, key=lambda k: (int(k), k))
    return sorted(keys)


def _label_values(d, col: str) -> list:
    """The distinct label values of a split."""
    import pyarrow.compute as pc

    if _is_arrow_readable(d, col):
        return pc.unique(d.with_format("arrow")[col]).to_pylist()
    return list({json.dumps(v): v for v in d[col]}.values())


def _encode_labels(ds, spec: DataSpec, sources: dict, notes: list) -> None:
    """Labels as ids of the training split's classes, a ``ClassLabel`` on every split that
    has them; a class no training row has is an error."""
    from datasets import ClassLabel

    col, train = spec.label_column, spec.train_split
    source = _labelled_split(ds, spec)
    if source is None:
        return
    feat = ds[source].features[col]
    given = isinstance(feat, ClassLabel)
    if given:
        names = list(feat.names)
    else:
        where = f"split {source!r} ({sources[source]})"
        keys = {_label_key(v, where, col) for v in _label_values(ds[source], col)}
        if spec.streaming:  # the stream's first rows may lack a class the evaluation has
            for split in (spec.eval_split, spec.test_split):
                d = ds.get(split) if split else None
                if d is not None and col in d.column_names:
                    own = getattr(d.features[col], "names", None)
                    keys |= {own[v] if own else _label_key(v, f"split {split!r}", col)
                             for v in _label_values(d, col)}
        names = class_names(keys)
    if len(names) < 2:
        raise ValueError(f"label_column: {col!r} of split {train!r} ({sources[train]}) has one "
                         f"class ({names}); classification needs at least two (check "
                         "label_column, or the training file)")
    index = {name: i for i, name in enumerate(names)}
    target = ClassLabel(names=names)
    for split in dict.fromkeys((train, spec.eval_split, spec.test_split)):
        if not split or split not in ds or col not in ds[split].column_names:
            continue
        d, where = ds[split], f"split {split!r} ({sources[split]})"
        f = d.features[col]
        if isinstance(f, ClassLabel) and f.names == names:
            continue
        own = list(f.names) if isinstance(f, ClassLabel) else None

        def key(v, own=own, where=where):
            return own[v] if own is not None else _label_key(v, where, col)
        unknown = sorted({key(v) for v in _label_values(d, col)} - index.keys())
        if unknown:
            raise ValueError(f"label_column: {where} has labels that no row of split {train!r} "
                             f"has: {unknown} (training has {names}); add training examples "
                             f"of them, or remove those rows from {split!r}")
        feats = d.features.copy()
        feats[col] = target
        ds[split] = d.map(lambda b: {col: [index[key(v)] for v in b[col]]}, batched=True,
                          features=feats)
    if not given:
        shown = ", ".join(f"{i}={n!r}" for i, n in enumerate(names[:10]))
        more = f", ... ({len(names)} in all)" if len(names) > 10 else ""
        notes.append(f"labels: {len(names)} classes in {col!r}, ids in sorted order: "
                     f"{shown}{more}")


def label_names(ds, spec: DataSpec) -> Optional[list]:
    """The class names in id order (``load_raw(..., classes=True)`` stores them as a
    ``ClassLabel``), or ``None`` when the data has no labels or they are not classes."""
    from datasets import ClassLabel

    source = _labelled_split(ds, spec)
    if source is None:
        return None
    feat = ds[source].features[spec.label_column]
    return list(feat.names) if isinstance(feat, ClassLabel) else None


def _labelled_split(ds, spec: DataSpec) -> Optional[str]:
    """The split whose labels name the classes: the training split; with ``streaming``, a
    training split without the label column is a transfer set and the evaluation (else
    test) split's labels name them. None when no such split has labels."""
    col = spec.label_column
    if not col:
        return None
    if col in ds[spec.train_split].column_names:
        return spec.train_split
    if spec.streaming:
        for split in (spec.eval_split, spec.test_split):
            if split and split in ds and col in ds[split].column_names:
                return split
    return None


_PLACEHOLDER = re.compile(r"LABEL_\d+")  # transformers' id2label when a model has no names


def match_teacher_labels(data_names: list, teacher_id2label: dict,
                         notes: Optional[list] = None) -> list:
    """Which teacher output each data class is: ``mapping[data_id] = teacher_id``.

    A teacher with real label names is matched by name (exactly, else ignoring case when
    that is unambiguous); every data class must be among the teacher's, which may have more.
    A teacher with only ``LABEL_i`` names, or data whose labels are the ids ``0..n-1``
    themselves, is matched by index, and the counts must agree. How it matched goes to
    ``notes``."""
    ids = sorted(int(i) for i in teacher_id2label)
    if ids != list(range(len(ids))):
        raise ValueError(f"teacher: its id2label ids are {ids}, not 0..{len(ids) - 1}; fix the "
                         "teacher's config.json")
    t_names = [str(teacher_id2label[i] if i in teacher_id2label else teacher_id2label[str(i)])
               for i in ids]
    data_names = [str(n) for n in data_names]
    by_index = all(_PLACEHOLDER.fullmatch(n) for n in t_names) or \
        data_names == [str(i) for i in range(len(data_names))]
    if by_index:
        if len(data_names) != len(t_names):
            raise ValueError(f"labels: the data has {len(data_names)} classes {data_names} but "
                             f"the teacher {len(t_names)} ({t_names}); use a teacher fine-tuned "
                             f"on these {len(data_names)} classes (teacher: {{base: ..., "
                             "finetune: {}}} fine-tunes one)")
        mapping = list(range(len(data_names)))
        how = "by index"
    else:
        exact = {n: i for i, n in enumerate(t_names)}
        folded = {n.casefold(): i for i, n in enumerate(t_names)}
        if all(n in exact for n in data_names):
            mapping = [exact[n] for n in data_names]
        elif len(folded) == len(t_names) and all(n.casefold() in folded for n in data_names):
            mapping = [folded[n.casefold()] for n in data_names]
        else:
            missing = [n for n in data_names if n.casefold() not in folded]
            raise ValueError(f"labels: the data's classes {data_names} are not all among the "
                             f"teacher's {t_names} (missing: {missing}); rename the data's "
                             "labels to the teacher's names, or use a teacher fine-tuned on "
                             "these classes (teacher: {base: ..., finetune: {}})")
        how = "by name"
    if notes is not None:
        pairs = ", ".join(f"{n!r}->{t_names[t]!r}" for n, t in zip(data_names[:10], mapping))
        notes.append(f"labels: matched to the teacher's {how} ({pairs}"
                     f"{', ...' if len(data_names) > 10 else ''})")
    return mapping


def num_labels_of(ds, spec: DataSpec) -> Optional[int]:
    if not spec.label_column or spec.label_column not in ds[spec.train_split].column_names:
        return None
    feat = ds[spec.train_split].features[spec.label_column]
    if hasattr(feat, "num_classes"):
        return feat.num_classes
    return len(set(ds[spec.train_split][spec.label_column]))


def _tokenize_fn(tokenizer, spec: DataSpec, max_length: int):
    """One batch of rows to the model's inputs (no padding: the collator pads per batch),
    with ``labels`` where the rows have them."""
    def fn(batch):
        args = (batch[spec.text_column],)
        if spec.text_pair_column:
            args += (batch[spec.text_pair_column],)
        enc = tokenizer(*args, truncation=True, max_length=max_length)
        if spec.label_column and spec.label_column in batch:
            enc["labels"] = batch[spec.label_column]
        return enc
    return fn


def tokenize(ds, tokenizer, spec: DataSpec, max_length: int = 64):
    """Tokenize every split (no padding: the collator pads per batch) and keep ``labels``."""
    fn = _tokenize_fn(tokenizer, spec, max_length)
    out = {}
    for split, d in ds.items():
        out[split] = d.map(fn, batched=True, remove_columns=d.column_names,
                           desc=f"tokenizing {split}")
    from datasets import DatasetDict
    return DatasetDict(out)


def tokenize_stream(stream, tokenizer, spec: DataSpec, columns: list, max_length: int = 64):
    """A stream (:func:`train_stream`) tokenized on the fly, as :func:`tokenize` tokenizes a
    split; ``columns`` are the stream's columns, dropped (a cleaned stream does not always
    know them itself)."""
    return stream.map(_tokenize_fn(tokenizer, spec, max_length), batched=True,
                      remove_columns=list(columns))
