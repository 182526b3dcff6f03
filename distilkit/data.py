"""Datasets: a hub name or local csv/json/jsonl/parquet files, and the built-in default.

The built-in default is real and offline: the 10,605 Rotten Tomatoes sentences rated by
humans that ship inside the vaderSentiment 3.3.2 source distribution (Hutto & Gilbert,
ICWSM 2014). The label is the sign of the mean rating (zeros dropped) and the
train/validation/test split is fixed by a seed, so every run sees the same examples.
"""
from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from typing import Optional

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


@dataclass
class DataSpec:
    """Where the data comes from and which columns mean what.

    ``dataset`` is a hub dataset name, ``builtin:rotten_tomatoes``, or ``None`` with
    ``data_files`` naming local files per split (``{"train": "a.csv", ...}``).
    """

    dataset: Optional[str] = BUILTIN_NAME
    dataset_config: Optional[str] = None
    data_files: Optional[dict] = None
    text_column: str = "text"
    text_pair_column: Optional[str] = None
    label_column: Optional[str] = "label"
    train_split: str = "train"
    eval_split: str = "validation"
    test_split: Optional[str] = "test"
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None


_LOCAL_TYPES = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".tsv": "csv"}


def load_raw(spec: DataSpec):
    """Load the splits named in ``spec`` as a ``DatasetDict`` and check the columns, before
    any model is touched."""
    from datasets import DatasetDict, load_dataset

    if spec.data_files:
        files = dict(spec.data_files)
        for split, f in files.items():
            for one in (f if isinstance(f, list) else [f]):
                if not os.path.isfile(one):
                    raise FileNotFoundError(f"data_files.{split}: {one!r} does not exist")
        exts = {os.path.splitext(f if isinstance(f, str) else f[0])[1].lower() for f in files.values()}
        if len(exts) != 1 or next(iter(exts)) not in _LOCAL_TYPES:
            raise ValueError(f"data_files: use one of {sorted(_LOCAL_TYPES)} for all splits, got {sorted(exts)}")
        ext = next(iter(exts))
        for split, f in files.items():
            if all(_file_has_no_rows(one, ext) for one in (f if isinstance(f, list) else [f])):
                raise ValueError(f"split {split!r} is empty ({f}): it needs at least one example")
        kwargs = {"delimiter": "\t"} if ext == ".tsv" else {}
        ds = load_dataset(_LOCAL_TYPES[ext], data_files=files, **kwargs)
    elif spec.dataset == BUILTIN_NAME:
        ds = builtin_dataset()
    elif spec.dataset:
        ds = load_dataset(spec.dataset, spec.dataset_config)
    else:
        raise ValueError("dataset: give a hub dataset name, 'builtin:rotten_tomatoes', or data_files")
    if not isinstance(ds, DatasetDict):
        ds = DatasetDict({spec.train_split: ds})
    check_columns(ds, spec)
    for split in (spec.train_split, spec.eval_split, spec.test_split):
        if split and split not in ds:
            raise ValueError(f"split {split!r} is not in the dataset; it has {sorted(ds)} "
                             "(set train_split / eval_split / test_split, or test_split: null)")
        if split and len(ds[split]) == 0:
            raise ValueError(f"split {split!r} is empty: it needs at least one example")
    if spec.max_train_samples:
        ds[spec.train_split] = ds[spec.train_split].select(range(min(spec.max_train_samples, len(ds[spec.train_split]))))
    if spec.max_eval_samples:
        for split in (spec.eval_split, spec.test_split):
            if split:
                ds[split] = ds[split].select(range(min(spec.max_eval_samples, len(ds[split]))))
    return ds


def _file_has_no_rows(path: str, ext: str) -> bool:
    """True for a local csv/tsv with only a header, or an empty json/jsonl file."""
    if ext == ".parquet":
        return False
    with open(path, encoding="utf-8") as f:
        lines = [ln for ln in f if ln.strip()]
    if ext in (".csv", ".tsv"):
        return len(lines) < 2
    return not lines or "".join(lines).strip() in ("[]", "{}")


def check_columns(ds, spec: DataSpec) -> None:
    """Every split that is used must have the text (and pair, and label) columns."""
    need = [("text_column", spec.text_column)]
    if spec.text_pair_column:
        need.append(("text_pair_column", spec.text_pair_column))
    for split, d in ds.items():
        cols = d.column_names
        for fname, col in need:
            if col not in cols:
                raise ValueError(f"{fname}: column {col!r} is not in split {split!r}; "
                                 f"its columns are {cols}")
        if spec.label_column and spec.label_column not in cols and split == spec.train_split:
            raise ValueError(f"label_column: column {spec.label_column!r} is not in split "
                             f"{split!r}; its columns are {cols} (set label_column: null to "
                             "distil on a transfer set without labels)")


def num_labels_of(ds, spec: DataSpec) -> Optional[int]:
    if not spec.label_column or spec.label_column not in ds[spec.train_split].column_names:
        return None
    feat = ds[spec.train_split].features[spec.label_column]
    if hasattr(feat, "num_classes"):
        return feat.num_classes
    return len(set(ds[spec.train_split][spec.label_column]))


def tokenize(ds, tokenizer, spec: DataSpec, max_length: int = 64):
    """Tokenize every split (no padding: the collator pads per batch) and keep ``labels``."""
    def fn(batch):
        args = (batch[spec.text_column],)
        if spec.text_pair_column:
            args += (batch[spec.text_pair_column],)
        enc = tokenizer(*args, truncation=True, max_length=max_length)
        if spec.label_column and spec.label_column in batch:
            enc["labels"] = batch[spec.label_column]
        return enc

    out = {}
    for split, d in ds.items():
        out[split] = d.map(fn, batched=True, remove_columns=d.column_names,
                           desc=f"tokenizing {split}")
    from datasets import DatasetDict
    return DatasetDict(out)
