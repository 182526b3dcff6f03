"""Sequence-level knowledge distillation (Kim & Rush 2016): train the student on the teacher's
generated outputs instead of (or beside) the references.

Token-level KD matches the teacher's next-token distribution at every position of the
*reference*; sequence-level KD approximates the teacher's distribution over whole *sequences*
by its mode: the teacher decodes every training input (greedy or beam search), and the student
is trained with plain cross-entropy on those outputs (``alpha_ce``), optionally plus token-level
KD against the teacher on the same outputs (``alpha_kd``; Kim & Rush's "Seq-KD + Word-KD").
The teacher's outputs are simpler and more consistent than human references, which is why a
small student often learns them better. Unlike token-level KD it needs no shared vocabulary:
the teacher's outputs are text, re-tokenized for the student, so it is the way to distil
between models with different tokenizers.

Decoding a training set is the expensive part, so outputs are cached on disk
(``$DISTILKIT_CACHE/seq2seq/generations``), one directory (*namespace*) per teacher weights,
tokenizer and :class:`SequenceKDSettings`; the weight and tokenizer fingerprints are those of
:mod:`distilkit.teacher_cache`. Inside a namespace each example is keyed by a hash of its source
text, so a changed or added sentence is decoded and the others are reused. The cache is a
:class:`~distilkit.shard_store.ShardStore`, like the teacher-output cache: each write is a
*shard* (the generated ids as ragged int32 arrays and their text as UTF-8 bytes, with a
manifest holding each file's size and SHA-256) built in a temporary directory and renamed into
place: an interrupted run leaves nothing that looks complete, and a damaged shard is discarded
(with a warning) and recomputed.
"""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from distilkit.seq2seq.generate_eval import GenerationSettings, generate_texts
from distilkit.shard_store import SHARD_FILE, ShardStore  # noqa: F401 - the layout

# 2: shards of the shared ShardStore (1 was JSON lines); the version is part of the namespace
# key, so version-1 shards are never read as version 2.
FORMAT_VERSION = 2


@dataclass
class SequenceKDSettings(GenerationSettings):
    """How the teacher decodes the training inputs, and what the student trains on."""

    include_references: bool = field(default=False, metadata={"help": "Train on the references as well as the teacher's outputs (twice the examples)."})

    def generation(self) -> GenerationSettings:
        return GenerationSettings(num_beams=self.num_beams, max_new_tokens=self.max_new_tokens,
                                  batch_size=self.batch_size, length_penalty=self.length_penalty)

    def key_fields(self) -> dict:
        """What changes the teacher's outputs (the batch size does not: padding is masked)."""
        return {"num_beams": self.num_beams, "max_new_tokens": self.max_new_tokens,
                "length_penalty": float(self.length_penalty)}


def sequence_kd_settings(value) -> SequenceKDSettings:
    """Settings from ``None`` (defaults), a dict (a recipe's ``sequence_kd:`` entry) or an
    instance; unknown keys are an error that lists the valid ones."""
    if value is None or value is True:
        return SequenceKDSettings()
    if isinstance(value, SequenceKDSettings):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"sequence_kd: {value!r} must be a mapping like {{num_beams: 4}}")
    names = {f for f in SequenceKDSettings.__dataclass_fields__}
    bad = sorted(set(value) - names)
    if bad:
        raise ValueError(f"sequence_kd: unknown key(s) {bad}; valid keys: {sorted(names)}")
    return SequenceKDSettings(**value)


def _source_key(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


class GenerationCache(ShardStore):
    """Teacher generations on disk (layout and guarantees: module docstring)."""

    def __init__(self, root: Optional[str] = None):
        from distilkit.data import cache_root

        super().__init__(root or os.path.join(cache_root(), "seq2seq", "generations"),
                         FORMAT_VERSION, "generation cache")

    @staticmethod
    def fingerprint(teacher, tokenizer, settings: SequenceKDSettings,
                    max_source_length: int) -> dict:
        """What the teacher's outputs depend on: its weights, tokenizer and decoding."""
        from distilkit.teacher_cache import teacher_fingerprint, tokenizer_fingerprint

        return {"teacher": teacher_fingerprint(teacher),
                "tokenizer": tokenizer_fingerprint(tokenizer), "settings": settings.key_fields(),
                "max_source_length": max_source_length}

    def generations(self, fingerprint: dict, keys: Sequence[bytes]) -> list[Optional[dict]]:
        """``{"ids", "text"}`` for each source key, ``None`` where none is cached."""
        arrays, found = self.lookup(fingerprint, keys, ("ids", "text"))
        return [{"ids": arrays["ids"][i].tolist(), "text": arrays["text"][i].tobytes().decode()}
                if hit else None for i, hit in enumerate(found)]

    def add(self, fingerprint: dict, keys: Sequence[bytes], generations: Sequence[dict]) -> str:
        """Write one shard of ``{"ids", "text"}`` generations atomically; returns its path."""
        return self.store(fingerprint, keys, {
            "ids": [np.asarray(g["ids"], dtype=np.int32) for g in generations],
            "text": [np.frombuffer(g["text"].encode("utf-8"), dtype=np.uint8)
                     for g in generations]})


def teacher_generations(teacher, tokenizer, sources: Sequence[str],
                        settings: Optional[SequenceKDSettings] = None,
                        cache_dir: Optional[str] = None, max_source_length: int = 96,
                        stats: Optional[dict] = None, progress: bool = False,
                        teacher_loader: Optional[Callable[[str], Any]] = None) -> list[dict]:
    """The teacher's output (``{"ids": [...], "text": "..."}``, ids ending with ``</s>``)
    for every source, from the cache where possible; the rest are decoded and cached.
    ``teacher`` is a model, or a saved directory (keyed by its files) loaded with
    ``teacher_loader`` only when some source misses. ``stats`` is filled with ``examples``,
    ``hits``, ``computed``, ``seconds``, ``namespace``."""
    t0 = time.perf_counter()
    s = settings or SequenceKDSettings()
    sources = list(sources)
    if not sources:
        raise ValueError("sequence-level KD: no training inputs to decode")
    cache = GenerationCache(cache_dir)
    fp = cache.fingerprint(teacher, tokenizer, s, max_source_length)
    keys = [_source_key(x) for x in sources]
    gens = cache.generations(fp, keys)
    todo: dict[bytes, str] = {}
    for k, x, g in zip(keys, sources, gens):
        if g is None:
            todo.setdefault(k, x)
    if todo:
        if progress:
            print(f"[distilkit] sequence-level KD: the teacher decodes {len(todo)} inputs "
                  f"(beam {s.num_beams}); {len(sources) - len(todo)} cached")
        model = teacher
        if isinstance(teacher, (str, os.PathLike)):
            if teacher_loader is None:
                from distilkit.seq2seq.teacher import load_seq2seq_teacher
                teacher_loader = lambda p: load_seq2seq_teacher(p)[0]  # noqa: E731
            model = teacher_loader(os.fspath(teacher))
        res = generate_texts(model, tokenizer, list(todo.values()), s.generation(),
                             max_source_length)
        new = {k: {"ids": list(ids), "text": text} for k, ids, text in zip(todo, res.ids, res.texts)}
        cache.add(fp, list(new), list(new.values()))
        gens = [new[k] if g is None else g for k, g in zip(keys, gens)]
    if stats is not None:
        stats.update({"examples": len(sources), "hits": len(sources) - sum(k in todo for k in keys),
                      "computed": len(todo), "seconds": round(time.perf_counter() - t0, 3),
                      "namespace": cache.namespace_dir(fp)})
    return gens


def with_teacher_targets(raw, generations: Sequence[dict], tokenizer,
                         source_column: str = "source", target_column: Optional[str] = "target",
                         include_references: bool = False, max_source_length: int = 96,
                         max_target_length: int = 96, same_tokenizer: bool = True):
    """The tokenized training set for sequence-level KD: inputs from ``raw[source_column]``,
    labels = the teacher's outputs. With ``same_tokenizer`` the teacher's token ids are used
    as they are (no decode/re-encode drift); otherwise its text is tokenized with the
    student's ``tokenizer``. ``include_references`` appends the reference pairs too."""
    from datasets import Dataset, concatenate_datasets

    from distilkit.seq2seq.data import check_seq2seq_columns, tokenize_seq2seq

    check_seq2seq_columns(raw, source_column, target_column if include_references else None)
    if len(generations) != len(raw):
        raise ValueError(f"{len(generations)} teacher outputs for {len(raw)} training inputs")
    enc = tokenizer(list(raw[source_column]), truncation=True, max_length=max_source_length)
    if same_tokenizer:
        eos = tokenizer.eos_token_id
        labels = [list(g["ids"][:max_target_length]) for g in generations]
        for lab in labels:
            if lab and lab[-1] != eos and len(lab) == max_target_length:
                lab[-1] = eos  # truncated like the tokenizer truncates references
    else:
        labels = tokenizer([g["text"] for g in generations], truncation=True,
                           max_length=max_target_length)["input_ids"]
    keep = [i for i, lab in enumerate(labels) if lab]
    ds = Dataset.from_dict({"input_ids": [enc["input_ids"][i] for i in keep],
                            "attention_mask": [enc["attention_mask"][i] for i in keep],
                            "labels": [labels[i] for i in keep]})
    if include_references:
        refs = tokenize_seq2seq(raw, tokenizer, source_column, target_column,
                                max_source_length, max_target_length)
        ds = concatenate_datasets([ds, refs.select_columns(["input_ids", "attention_mask", "labels"])])
    return ds


def sequence_kd_dataset(teacher, tokenizer, raw, settings: Optional[SequenceKDSettings] = None,
                        source_column: str = "source", target_column: Optional[str] = "target",
                        student_tokenizer=None, cache_dir: Optional[str] = None,
                        max_source_length: int = 96, max_target_length: int = 96,
                        stats: Optional[dict] = None, progress: bool = False,
                        teacher_loader: Optional[Callable[[str], Any]] = None):
    """Decode ``raw``'s inputs with the teacher (cached) and return the student's tokenized
    training set with the teacher's outputs as labels. ``student_tokenizer`` defaults to the
    teacher's; a different one (different vocabulary) re-tokenizes the teacher's text.
    ``teacher`` / ``teacher_loader``: as :func:`teacher_generations`."""
    s = settings or SequenceKDSettings()
    gens = teacher_generations(teacher, tokenizer, raw[source_column], s, cache_dir,
                               max_source_length, stats, progress, teacher_loader)
    s_tok = student_tokenizer or tokenizer
    same = student_tokenizer is None or s_tok.get_vocab() == tokenizer.get_vocab()
    return with_teacher_targets(raw, gens, s_tok, source_column, target_column,
                                s.include_references, max_source_length, max_target_length,
                                same_tokenizer=same)


def settings_dict(settings: SequenceKDSettings) -> dict:
    """JSON form of the settings, for results files."""
    return asdict(settings)
