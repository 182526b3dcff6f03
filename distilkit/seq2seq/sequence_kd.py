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
text, so a changed or added sentence is decoded and the others are reused. Each write is a
*shard* (``outputs.jsonl`` + ``manifest.json`` with its size and SHA-256) built in a temporary
directory and renamed into place: an interrupted run leaves nothing that looks complete, and a
damaged shard is discarded (with a warning) and recomputed.

The generic output cache of :mod:`distilkit.teacher_cache` stores fixed-shape float arrays
(classification logits); generated sequences are variable-length token lists, so they have
this small store of their own.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
import warnings
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

from distilkit.seq2seq.generate_eval import GenerationSettings, generate_texts

SHARD_FILE, MANIFEST, NAMESPACE_FILE = "outputs.jsonl", "manifest.json", "namespace.json"
FORMAT_VERSION = 1


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


def _source_key(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


class GenerationCache:
    """Teacher generations on disk (layout and guarantees: module docstring)."""

    def __init__(self, root: Optional[str] = None):
        from distilkit.data import cache_root

        self.root = os.path.abspath(os.path.expanduser(
            root or os.path.join(cache_root(), "seq2seq", "generations")))

    def namespace(self, teacher, tokenizer, settings: SequenceKDSettings,
                  max_source_length: int) -> str:
        from distilkit.teacher_cache import teacher_fingerprint, tokenizer_fingerprint

        fp = {"format": FORMAT_VERSION, "teacher": teacher_fingerprint(teacher),
              "tokenizer": tokenizer_fingerprint(tokenizer), "settings": settings.key_fields(),
              "max_source_length": max_source_length}
        key = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:24]
        ns = os.path.join(self.root, key)
        if not os.path.isfile(os.path.join(ns, NAMESPACE_FILE)):
            os.makedirs(ns, exist_ok=True)
            tmp = os.path.join(ns, f".{NAMESPACE_FILE}.{uuid.uuid4().hex}")
            with open(tmp, "w") as f:
                json.dump(fp, f, indent=2)
            os.replace(tmp, os.path.join(ns, NAMESPACE_FILE))
        return ns

    def lookup(self, ns: str) -> dict[str, dict]:
        """Every cached ``source key -> {"ids", "text"}`` in namespace ``ns``."""
        found: dict[str, dict] = {}
        if not os.path.isdir(ns):
            return found
        for name in sorted(os.listdir(ns)):
            shard = os.path.join(ns, name)
            if not name.startswith("shard-"):
                continue
            try:
                with open(os.path.join(shard, MANIFEST)) as f:
                    man = json.load(f)
                path = os.path.join(shard, SHARD_FILE)
                if os.path.getsize(path) != man["bytes"] or _sha256(path) != man["sha256"]:
                    raise ValueError("size or checksum differs from the manifest")
                with open(path, encoding="utf-8") as f:
                    rows = [json.loads(line) for line in f]
                if len(rows) != man["rows"]:
                    raise ValueError(f"{len(rows)} rows, the manifest says {man['rows']}")
            except Exception as e:  # unreadable, truncated, corrupted: recompute
                warnings.warn(f"generation cache: discarding damaged shard {shard} ({e}); its "
                              "examples will be decoded again", RuntimeWarning, stacklevel=2)
                shutil.rmtree(shard, ignore_errors=True)
                continue
            for r in rows:
                found.setdefault(r["k"], {"ids": r["ids"], "text": r["text"]})
        return found

    def store(self, ns: str, rows: Sequence[dict]) -> str:
        """Write one shard of ``{"k", "ids", "text"}`` rows atomically; returns its path."""
        os.makedirs(ns, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=ns, prefix=".tmp-")
        try:
            path = os.path.join(tmp, SHARD_FILE)
            with open(path, "w", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
            with open(os.path.join(tmp, MANIFEST), "w") as f:
                json.dump({"format": FORMAT_VERSION, "rows": len(rows),
                           "bytes": os.path.getsize(path), "sha256": _sha256(path),
                           "created": time.strftime("%Y-%m-%dT%H:%M:%S")}, f)
            final = os.path.join(ns, f"shard-{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:8]}")
            os.replace(tmp, final)
            return final
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def teacher_generations(teacher, tokenizer, sources: Sequence[str],
                        settings: Optional[SequenceKDSettings] = None,
                        cache_dir: Optional[str] = None, max_source_length: int = 96,
                        stats: Optional[dict] = None, progress: bool = False) -> list[dict]:
    """The teacher's output (``{"ids": [...], "text": "..."}``, ids ending with ``</s>``)
    for every source, from the cache where possible; the rest are decoded and cached.
    ``stats`` is filled with ``examples``, ``hits``, ``computed``, ``seconds``, ``namespace``."""
    t0 = time.perf_counter()
    s = settings or SequenceKDSettings()
    sources = list(sources)
    if not sources:
        raise ValueError("sequence-level KD: no training inputs to decode")
    cache = GenerationCache(cache_dir)
    ns = cache.namespace(teacher, tokenizer, s, max_source_length)
    have = cache.lookup(ns)
    keys = [_source_key(x) for x in sources]
    todo: dict[str, str] = {}
    for k, x in zip(keys, sources):
        if k not in have:
            todo.setdefault(k, x)
    if todo:
        if progress:
            print(f"[distilkit] sequence-level KD: the teacher decodes {len(todo)} inputs "
                  f"(beam {s.num_beams}); {len(sources) - len(todo)} cached")
        res = generate_texts(teacher, tokenizer, list(todo.values()), s.generation(),
                             max_source_length)
        rows = [{"k": k, "ids": ids, "text": text}
                for k, ids, text in zip(todo, res.ids, res.texts)]
        cache.store(ns, rows)
        have.update({r["k"]: {"ids": r["ids"], "text": r["text"]} for r in rows})
    if stats is not None:
        stats.update({"examples": len(sources), "hits": len(sources) - sum(k in todo for k in keys),
                      "computed": len(todo), "seconds": round(time.perf_counter() - t0, 3),
                      "namespace": ns})
    return [have[k] for k in keys]


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
                        stats: Optional[dict] = None, progress: bool = False):
    """Decode ``raw``'s inputs with the teacher (cached) and return the student's tokenized
    training set with the teacher's outputs as labels. ``student_tokenizer`` defaults to the
    teacher's; a different one (different vocabulary) re-tokenizes the teacher's text."""
    s = settings or SequenceKDSettings()
    gens = teacher_generations(teacher, tokenizer, raw[source_column], s, cache_dir,
                               max_source_length, stats, progress)
    s_tok = student_tokenizer or tokenizer
    same = student_tokenizer is None or s_tok.get_vocab() == tokenizer.get_vocab()
    return with_teacher_targets(raw, gens, s_tok, source_column, target_column,
                                s.include_references, max_source_length, max_target_length,
                                same_tokenizer=same)


def settings_dict(settings: SequenceKDSettings) -> dict:
    """JSON form of the settings, for results files."""
    return asdict(settings)
