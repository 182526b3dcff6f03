"""``task: classification``: sequence (and sentence-pair) classification.

Data from :mod:`distilkit.data`; one teacher or an ensemble (:mod:`distilkit.teachers`);
students from the teacher's layers, a smaller config, a saved model or a BiLSTM; optional
transfer-set augmentation (:mod:`distilkit.augment`); teacher outputs from the on-disk cache
(:mod:`distilkit.teacher_cache`); figures from :func:`distilkit.evaluate.evaluate_model`.

With ``teacher_cache: true`` and every output already cached, the teacher's weights are never
read: the student is built from the teacher's directory (only the layers it keeps), the
trainer reads the cached outputs, and the teacher's own figures for ``results.json`` come from
the cache too, keyed like its outputs (weights, tokenizer, max length) plus the evaluation
split's contents.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Any, Optional

from distilkit.loss_terms import cached_outputs_needed, needs_live_teacher
from distilkit.tasks.base import (Prepared, Task, Teachers, build_student, check_max_length,
                                  ratios)

FIGURES_VERSION = 1


def _resolve_teachers(spec: Any) -> list:
    """The recipe's ``teacher:`` (one spec, or a list: an ensemble) as resolved specs."""
    from distilkit.teachers import resolve_teacher

    return [resolve_teacher(s) for s in spec] if isinstance(spec, list) else [resolve_teacher(spec)]


class ClassificationTask(Task):
    name = "classification"

    def load_data(self, recipe):
        from distilkit.data import load_raw

        return load_raw(recipe.data)

    def load_teachers(self, recipe, raw, progress: bool) -> Teachers:
        from transformers import AutoConfig, AutoTokenizer

        from distilkit.data import num_labels_of
        from distilkit.teachers import load_teacher

        k, spec = recipe.keys, recipe.data
        specs = _resolve_teachers(k.teacher)
        teachers = Teachers(specs=specs, tokenizer=AutoTokenizer.from_pretrained(specs[0]),
                            config=AutoConfig.from_pretrained(specs[0]),
                            loader=lambda s: load_teacher(s, adapter=k.teacher_adapter),
                            adapter=k.teacher_adapter)
        check_max_length(k.max_length, teachers.config)
        n_labels = num_labels_of(raw, spec)
        if n_labels is not None and teachers.config.num_labels != n_labels:
            raise ValueError(f"the teacher predicts {teachers.config.num_labels} labels but "
                             f"label_column {spec.label_column!r} has {n_labels} classes: "
                             "fine-tune a teacher on this task first")
        return teachers

    def build_student(self, recipe, raw, teachers: Teachers):
        spec = recipe.data
        texts = list(raw[spec.train_split][spec.text_column])
        if spec.text_pair_column:
            texts += list(raw[spec.train_split][spec.text_pair_column])
        kind = recipe.keys.student.get("type", "from_teacher")
        # From the teacher's layers, the student reads the teacher's directory lazily (only the
        # kept layers): no teacher model is built. An adapter changes the weights, so a
        # teacher with one is built (and merged) first.
        lazy = kind == "from_teacher" and teachers.first_dir and not teachers.adapter \
            and not teachers.loaded
        teacher = teachers.first_dir if lazy else teachers.models()[0]
        student, tok = build_student(recipe, teacher, teachers.tokenizer, texts)
        if getattr(student.config, "model_type", "") == "distilkit-bilstm":
            from distilkit.students.bilstm import check_pair_data
            check_pair_data(student.config, spec.text_pair_column)
        return student, tok

    def prepare(self, recipe, args, raw, teachers: Teachers, student, tokenizer,
                progress: bool) -> Prepared:
        from distilkit.collate import DistilCollator
        from distilkit.data import tokenize
        from distilkit.metrics import classification_metrics

        k, spec = recipe.keys, recipe.data
        train_raw = raw[spec.train_split]
        if k.augment:
            from distilkit.augment import augment_dataset
            train_raw = augment_dataset(train_raw, k.augment, spec, seed=args.seed)
        ds = tokenize(raw, tokenizer, spec, max_length=k.max_length)
        train_ds = (tokenize({"train": train_raw}, tokenizer, spec, max_length=k.max_length)["train"]
                    if k.augment else ds[spec.train_split])
        live = needs_live_teacher(args)
        if k.teacher_cache and live:
            print("[distilkit] teacher_cache: not used, because alpha_hidden / alpha_attention / "
                  "alpha_cosine read the teacher's per-token states, which are not cached; the "
                  "teacher runs every step", file=sys.stderr)
        # A student with its own tokenizer (a word-level BiLSTM) cannot feed the teacher its
        # tokens, so the teacher's outputs are computed on the teacher's tokens, through the
        # cache, whatever teacher_cache says.
        own_tokens = tokenizer is not teachers.tokenizer
        cached = False
        if own_tokens or (k.teacher_cache and not live):
            train_ds = self._attach_teacher_outputs(recipe, args, teachers, train_raw, train_ds,
                                                    progress)
            cached = not live
        return Prepared(train_dataset=train_ds, eval_dataset=ds[spec.eval_split],
                        collator=DistilCollator(tokenizer),
                        importance_dataset=ds[spec.train_split],
                        compute_metrics=classification_metrics, teacher_cached=cached)

    def _attach_teacher_outputs(self, recipe, args, teachers, train_raw, train_ds, progress):
        from distilkit.data import tokenize
        from distilkit.teacher_cache import attach_ensemble_logits, attach_teacher_outputs

        k, spec = recipe.keys, recipe.data
        outputs = cached_outputs_needed(args)
        t_train = tokenize({"t": train_raw}, teachers.tokenizer, spec, max_length=k.max_length)["t"]
        kw = dict(teacher_dataset=t_train, max_length=k.max_length, cache_dir=k.cache_dir,
                  progress=progress, teacher_loader=teachers.loader)
        # With an adapter the teacher is the merged model, not the files at its path: key the
        # cache by (and compute with) the loaded weights.
        members = teachers.models() if teachers.adapter else teachers.specs
        stats: dict = {}
        train_ds = attach_teacher_outputs(train_ds, members[0], outputs=outputs, stats=stats, **kw)
        teachers.cache_namespace = stats["namespace"]
        if len(members) > 1:  # every member's logits, averaged per step like a live ensemble
            train_ds = attach_ensemble_logits(train_ds, members, **kw)
        return train_ds

    def evaluate(self, recipe, raw, teachers: Teachers, student_dir: str,
                 progress: bool) -> tuple[dict, dict, str]:
        from transformers import AutoTokenizer

        from distilkit.compress.base import load_compressed
        from distilkit.evaluate import evaluate_model

        k, spec = recipe.keys, recipe.data
        split = spec.test_split or spec.eval_split
        common = dict(text_column=spec.text_column, text_pair_column=spec.text_pair_column,
                      label_column=spec.label_column, max_length=k.max_length)

        def teacher_figures():
            return evaluate_model(teachers.models()[0], teachers.tokenizer, raw[split],
                                  model_dir=teachers.first_dir, **common)
        if teachers.cache_namespace:
            t_metrics = _cached_teacher_figures(recipe, teachers.cache_namespace, raw[split],
                                                teacher_figures)
        else:
            t_metrics = teacher_figures()
        student = load_compressed(student_dir)
        s_metrics = evaluate_model(student, AutoTokenizer.from_pretrained(student_dir), raw[split],
                                   model_dir=student_dir, **common)
        return t_metrics, s_metrics, split

    def compare(self, teacher: dict, student: dict) -> dict:
        return {
            "retention": student["accuracy"] / max(teacher["accuracy"], 1e-9),
            **ratios(teacher, student),
            "speedup_batch32": teacher["latency_ms_batch32"] / max(student["latency_ms_batch32"], 1e-9),
        }

    def summary(self, results: dict) -> str:
        t, s = results["teacher"], results["student"]
        return "\n".join([
            f"== distilkit: {results['name']} (split: {results['split']}) ==",
            f"teacher  accuracy {t['accuracy']:.4f}  params {t['parameters']:,}  "
            f"size {t['size_on_disk_bytes'] / 1e6:.2f} MB",
            f"student  accuracy {s['accuracy']:.4f}  params {s['parameters']:,}  "
            f"size {s['size_on_disk_bytes'] / 1e6:.2f} MB",
            f"retention {100 * results['retention']:.1f}%   parameters "
            f"{results['parameter_ratio']:.2f}x fewer   size {results['size_ratio']:.2f}x "
            f"smaller   speed-up (batch 32) {results['speedup_batch32']:.2f}x   "
            f"time {results['train_seconds']:.0f}s"])

    def default_spec(self):
        from distilkit.data import DataSpec

        return DataSpec()

    def evaluate_dir(self, model_dir: str, recipe, spec, split: Optional[str],
                     max_length: Optional[int], latency: bool) -> dict:
        from transformers import AutoTokenizer

        from distilkit.compress.base import load_compressed
        from distilkit.data import load_raw
        from distilkit.evaluate import evaluate_model

        max_length = max_length or (recipe.keys.max_length if recipe else None) or 128
        raw = load_raw(spec)
        split = split or spec.test_split or spec.eval_split
        if split not in raw:
            raise ValueError(f"split {split!r} is not in the dataset; it has {sorted(raw)}")
        res = evaluate_model(load_compressed(model_dir), AutoTokenizer.from_pretrained(model_dir),
                             raw[split], text_column=spec.text_column,
                             text_pair_column=spec.text_pair_column,
                             label_column=spec.label_column, max_length=max_length,
                             model_dir=model_dir, latency=latency)
        res["split"] = split
        return res


def _cached_teacher_figures(recipe, namespace: str, split_ds, compute) -> dict:
    """The teacher's evaluation figures, computed once per teacher-output cache namespace
    (teacher weights, tokenizer, max length) and evaluation data (its contents, not its
    path), then read back: the teacher is loaded only on a miss (``compute``). Stored as one
    JSON file per key in the namespace directory, beside the cached outputs."""
    import torch

    from distilkit.files import atomic_write_json

    spec = recipe.data
    h = hashlib.sha256(f"v{FIGURES_VERSION}:threads={torch.get_num_threads()}".encode())
    for c in (spec.text_column, spec.text_pair_column, spec.label_column):
        if c:
            h.update(f"{c}:".encode())
            h.update(json.dumps(list(split_ds[c]), default=str).encode())
    path = os.path.join(namespace, f"teacher_figures-{h.hexdigest()[:24]}.json")
    if os.path.isfile(path):
        try:
            with open(path) as f:
                return {**json.load(f), "figures_source": f"cached ({path})"}
        except (OSError, ValueError):
            pass  # unreadable: measure again, and overwrite it
    figures = compute()
    atomic_write_json(path, figures)
    return figures
