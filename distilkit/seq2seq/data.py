"""A real seq2seq task that runs offline, and the tokenization and batching of seq2seq data.

No translation or summarisation corpus can be installed here, so the task is built from real
text: **restore the casing and punctuation** of the built-in Rotten Tomatoes sentences
(:func:`distilkit.data.builtin_sentences`). The source is the sentence lower-cased with its
punctuation removed; the target is the original sentence (whitespace normalised)::

    source: the rock is destined to be the 21st centurys new conan and ...
    target: The Rock is destined to be the 21st Century's new ''Conan'' and ...

It is a monotone, mostly-copy task with real ambiguity (names, titles, where commas go), so a
small encoder-decoder learns it from ~8.5k sentences in minutes on a CPU while exact match and
BLEU still separate good models from weaker ones.

Seq2seq tokenization keeps ``input_ids``/``attention_mask`` from the source and ``labels`` from
the target; :class:`Seq2SeqCollator` pads labels with ``-100`` so padding never counts in the
cross-entropy or in the token-level distillation mask (the trainer derives the mask from
``labels != -100``). The models build ``decoder_input_ids`` from the labels themselves.
"""
from __future__ import annotations

import random
import unicodedata
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

SOURCE_COLUMN, TARGET_COLUMN = "source", "target"
_DELETE = {"'", "\u2019", "\u2018", "`"}  # apostrophes join the word: "he's" -> "hes"


def strip_case_and_punct(text: str) -> str:
    """The task's source side: lower-case, apostrophes deleted, every other punctuation or
    symbol character replaced by a space, whitespace collapsed."""
    out = []
    for ch in text.lower():
        if ch in _DELETE:
            continue
        cat = unicodedata.category(ch)
        out.append(" " if cat[0] in "PS" else ch)
    return " ".join("".join(out).split())


def normalize_target(text: str) -> str:
    """The task's target side: the original sentence with runs of whitespace collapsed."""
    return " ".join(text.split())


def truecase_pairs(max_words: Optional[int] = None) -> list[tuple[str, str]]:
    """(source, target) for every distinct built-in sentence (optionally at most ``max_words``
    words), in corpus order. Sentences whose source would be empty are dropped."""
    from distilkit.data import builtin_sentences

    seen, pairs = set(), []
    for text, _ in builtin_sentences():
        tgt = normalize_target(text)
        if not tgt or tgt in seen:
            continue
        if max_words is not None and len(tgt.split()) > max_words:
            continue
        src = strip_case_and_punct(tgt)
        if not src:
            continue
        seen.add(tgt)
        pairs.append((src, tgt))
    return pairs


def word_windows(target: str, max_words: int) -> list[str]:
    """``target`` cut into windows of at most ``max_words`` words, overlapping by half a
    window (the whole text when it is short enough). Deterministic."""
    words = target.split()
    if len(words) <= max_words:
        return [" ".join(words)]
    stride = max(1, max_words // 2)
    starts = list(range(0, len(words) - max_words + 1, stride))
    if starts[-1] != len(words) - max_words:
        starts.append(len(words) - max_words)
    return [" ".join(words[i:i + max_words]) for i in starts]


def truecase_dataset(seed: int = 1234, val_fraction: float = 0.1, test_fraction: float = 0.1,
                     max_words: Optional[int] = None, train_windows: bool = False):
    """The truecasing-and-punctuation task as a ``DatasetDict`` (train/validation/test) with
    columns ``source`` and ``target``.

    Sentences are split into train/validation/test by ``seed`` alone. ``max_words`` keeps the
    validation and test sentences of at most that many words; the training split then holds
    the short training sentences, or with ``train_windows`` every training sentence cut into
    overlapping windows of ``max_words`` words (:func:`word_windows`), which gives a small
    model several times more real text to learn copying from, at the cost of short inputs.
    """
    from datasets import Dataset, DatasetDict

    for name, v in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 < v < 0.5:
            raise ValueError(f"{name}: {v!r} must be in (0, 0.5), e.g. 0.1")
    if max_words is not None and (not isinstance(max_words, int) or max_words < 1):
        raise ValueError(f"max_words: {max_words!r} must be a positive integer or None")
    if train_windows and max_words is None:
        raise ValueError("train_windows: needs max_words (the window length in words)")
    pairs = truecase_pairs()
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_val, n_test = int(len(pairs) * val_fraction), int(len(pairs) * test_fraction)
    parts = {"test": order[:n_test], "validation": order[n_test:n_test + n_val],
             "train": order[n_test + n_val:]}
    out = {}
    for split, idx in parts.items():
        rows = [pairs[i] for i in idx]
        if split == "train" and train_windows:
            rows = [(strip_case_and_punct(w), w) for _, t in rows for w in word_windows(t, max_words)]
            rows = [r for r in rows if r[0]]
        elif max_words is not None:
            rows = [r for r in rows if len(r[1].split()) <= max_words]
        out[split] = Dataset.from_dict({SOURCE_COLUMN: [r[0] for r in rows],
                                        TARGET_COLUMN: [r[1] for r in rows]})
    return DatasetDict(out)


def truecase_tokenizer(ds=None, settings=None):
    """The task's tokenizer, trained on the train split's sources and targets (cached).
    Returns ``(tokenizer, path)``."""
    from distilkit.seq2seq.tokenizer import cached_tokenizer

    ds = ds if ds is not None else truecase_dataset()
    train = ds["train"]
    texts = list(train[SOURCE_COLUMN]) + list(train[TARGET_COLUMN])
    return cached_tokenizer(texts, settings, name="truecase")


def check_seq2seq_columns(ds, source_column: str = SOURCE_COLUMN,
                          target_column: Optional[str] = TARGET_COLUMN) -> None:
    """Every split must have the source column, and the target column unless
    ``target_column`` is None (inputs only, e.g. for sequence-level distillation)."""
    splits = ds.items() if hasattr(ds, "items") else [("data", ds)]
    for split, d in splits:
        cols = d.column_names
        if source_column not in cols:
            raise ValueError(f"source_column: column {source_column!r} is not in split "
                             f"{split!r}; its columns are {cols}")
        if target_column is not None and target_column not in cols:
            raise ValueError(
                f"target_column: column {target_column!r} is not in split {split!r}; its "
                f"columns are {cols}. A seq2seq dataset needs the target text; to train on a "
                "teacher's outputs instead, tokenize with target_column=None and use "
                "distilkit.seq2seq.sequence_kd.with_teacher_targets")


def tokenize_seq2seq(ds, tokenizer, source_column: str = SOURCE_COLUMN,
                     target_column: Optional[str] = TARGET_COLUMN,
                     max_source_length: int = 96, max_target_length: int = 96):
    """Tokenize a ``Dataset`` or ``DatasetDict``: ``input_ids``/``attention_mask`` from the
    source, ``labels`` from the target (no padding here; the collator pads per batch). Long
    sequences are truncated, keeping the final ``</s>``."""
    check_seq2seq_columns(ds, source_column, target_column)
    for name, v in (("max_source_length", max_source_length), ("max_target_length", max_target_length)):
        if not isinstance(v, int) or v < 2:
            raise ValueError(f"{name}: {v!r} must be an integer >= 2")

    def fn(batch):
        enc = tokenizer(batch[source_column], truncation=True, max_length=max_source_length)
        out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if target_column is not None:
            out["labels"] = tokenizer(batch[target_column], truncation=True,
                                      max_length=max_target_length)["input_ids"]
        return out

    def one(d, split):
        return d.map(fn, batched=True, remove_columns=d.column_names, desc=f"tokenizing {split}")

    if hasattr(ds, "items"):
        from datasets import DatasetDict

        return DatasetDict({k: one(d, k) for k, d in ds.items()})
    return one(ds, "data")


@dataclass
class Seq2SeqCollator:
    """Pads a list of tokenized examples into a batch: ``input_ids`` with ``pad_token_id``,
    ``attention_mask`` with 0, ``labels`` with ``-100`` (ignored by every loss), and the
    per-target-token teacher columns of :mod:`distilkit.seq2seq.topk_cache` with zeros to the
    labels' width (their padded positions are masked by the labels). Other list-valued
    features of equal length are stacked as they are."""

    pad_token_id: int = 0
    label_pad_token_id: int = -100
    pad_to_multiple_of: Optional[int] = None

    def _pad(self, rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
        n = max(len(r) for r in rows)
        if self.pad_to_multiple_of:
            n = -(-n // self.pad_to_multiple_of) * self.pad_to_multiple_of
        out = torch.full((len(rows), n), value, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, :len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        return out

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("Seq2SeqCollator: empty batch")
        pads = {"input_ids": self.pad_token_id, "attention_mask": 0,
                "labels": self.label_pad_token_id}
        from distilkit.loss_terms import TOPK_COLUMNS

        per_token = set(TOPK_COLUMNS.values())
        batch = {}
        for key in features[0]:
            rows = [f[key] for f in features]
            if key in pads:
                batch[key] = self._pad(rows, pads[key])
            elif key not in per_token:
                batch[key] = torch.as_tensor(rows)
        for key in [k for k in features[0] if k in per_token]:
            if "labels" not in batch:
                raise ValueError(f"Seq2SeqCollator: column {key!r} is per target token and "
                                 "needs the 'labels' column beside it")
            batch[key] = self._pad_tokens([f[key] for f in features], batch["labels"].shape[1])
        return batch

    @staticmethod
    def _pad_tokens(rows, width: int) -> torch.Tensor:
        """Per-target-token arrays ``(L_i, ...)`` as one ``(B, width, ...)`` tensor, zeros after
        each row's end."""
        import numpy as np

        arrs = [np.asarray(r) for r in rows]
        out = np.zeros((len(arrs), width, *arrs[0].shape[1:]), dtype=arrs[0].dtype)
        for i, a in enumerate(arrs):
            out[i, :len(a)] = a
        return torch.from_numpy(out)


def seq2seq_collator(tokenizer, pad_to_multiple_of: Optional[int] = None) -> Seq2SeqCollator:
    """A :class:`Seq2SeqCollator` for ``tokenizer``'s pad id."""
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token first")
    return Seq2SeqCollator(pad_token_id=tokenizer.pad_token_id,
                           pad_to_multiple_of=pad_to_multiple_of)


BUILTIN_TRUECASE = "builtin:truecase"


def default_seq2seq_spec():
    """The data a seq2seq model is evaluated on when nothing names any: the built-in task."""
    from distilkit.data import DataSpec

    return DataSpec(dataset=BUILTIN_TRUECASE, text_column=SOURCE_COLUMN, label_column=TARGET_COLUMN)


def load_seq2seq_data(spec, max_words: Optional[int] = None, train_windows: bool = False):
    """The splits of ``spec`` (a :class:`distilkit.data.DataSpec`: the recipe's
    ``text_column`` is the source, ``label_column`` the target), with the columns checked
    before any model is loaded: the target only where it is needed (evaluation splits, and
    training unless ``label_column`` is null). ``max_words`` / ``train_windows`` shape the
    built-in truecasing task."""
    from distilkit.data import DataSpec, load_raw

    if spec.dataset == BUILTIN_TRUECASE:
        if spec.dataset_config is not None:
            raise ValueError(f"dataset_config: {spec.dataset_config!r}; {BUILTIN_TRUECASE} has "
                             "no configurations (set it to null)")
        ds = truecase_dataset(max_words=max_words, train_windows=train_windows)
        for split in (spec.train_split, spec.eval_split, spec.test_split):
            if split and split not in ds:
                raise ValueError(f"split {split!r} is not in {BUILTIN_TRUECASE}; it has {sorted(ds)}")
        if spec.max_train_samples:
            ds[spec.train_split] = ds[spec.train_split].select(
                range(min(spec.max_train_samples, len(ds[spec.train_split]))))
        if spec.max_eval_samples:
            for split in (spec.eval_split, spec.test_split):
                if split:
                    ds[split] = ds[split].select(range(min(spec.max_eval_samples, len(ds[split]))))
    else:
        ds = load_raw(DataSpec(**{**spec.__dict__}))
    check_seq2seq_columns({spec.train_split: ds[spec.train_split]}, spec.text_column,
                          spec.label_column)
    for split in (spec.eval_split, spec.test_split):
        if split:
            if not spec.label_column:
                raise ValueError("label_column: null leaves the evaluation splits without "
                                 "targets; name the target column (seq2seq evaluation scores "
                                 "generations against it)")
            check_seq2seq_columns({split: ds[split]}, spec.text_column, spec.label_column)
    return ds
