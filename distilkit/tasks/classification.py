"""``task: classification``: sequence (and sentence-pair) classification.

Data from :mod:`distilkit.data`; one teacher or an ensemble (:mod:`distilkit.teachers`);
students from the teacher's layers, a smaller config, a saved model or a BiLSTM; optional
transfer-set augmentation (:mod:`distilkit.augment`); teacher outputs from the on-disk cache
(:mod:`distilkit.teacher_cache`); figures from :func:`distilkit.evaluate.evaluate_model`.

With ``teacher_cache: true`` and every output already cached, the teacher's weights are never
read: the student is built from the teacher's directory (only the layers it keeps), the
trainer reads the cached outputs, and the teacher's own figures for ``results.json`` come from
the cache too, keyed like its outputs (weights, tokenizer, max length) plus the evaluation
split's contents. A streamed training split (``streaming: true``) reads and fills the same
cache batch by batch (:class:`StreamTeacherCollator`).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
from typing import Any, Optional

import numpy as np
import torch
from torch import nn
from transformers import TrainerCallback

from distilkit.loss_terms import cached_outputs_needed, needs_live_teacher
from distilkit.tasks.base import (Prepared, Task, Teachers, build_student,
                                  check_max_length, ratios)

FIGURES_VERSION = 1


def _resolve_teachers(recipe, raw, progress: bool) -> list:
    """The recipe's ``teacher:`` (one spec, or a list: an ensemble) as resolved specs; the
    built-in teacher and ``{base, finetune}`` teachers are fine-tuned here (or taken from
    the cache) on the recipe's own training split."""
    from distilkit.finetune import resolve_teacher

    spec = recipe.keys.teacher
    return [resolve_teacher(s, raw=raw, data=recipe.data, progress=progress)
            for s in (spec if isinstance(spec, list) else [spec])]


class ClassificationTask(Task):
    name = "classification"

    def validate(self, recipe) -> None:
        k, spec = recipe.keys, recipe.data
        if not spec.streaming:
            return
        steps = recipe.training.get("max_steps", -1)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
            raise ValueError(f"max_steps: {steps!r}, but streaming: true reads the training split "
                             "as a stream of unknown length, so the run is as long as max_steps "
                             "says; set max_steps: N (e.g. max_steps: 1000)")
        workers = recipe.training.get("dataloader_num_workers", 0)
        if k.teacher_cache and workers:
            raise ValueError(f"dataloader_num_workers: {workers}, but with streaming: true and "
                             "teacher_cache the teacher's outputs are read and cached as each "
                             "batch is collated, which must happen in the training process; "
                             "set dataloader_num_workers: 0, or teacher_cache: false")
        if k.augment:
            raise ValueError("augment: makes new sentences from the whole training split, which "
                             "streaming: true never holds; remove augment, or set streaming: false")
        if isinstance(k.student, dict) and k.student.get("type") == "bilstm":
            raise ValueError("student: type bilstm builds its word vocabulary from the whole "
                             "training split, which streaming: true never holds; use a "
                             "transformer student (type: from_teacher or config), or set "
                             "streaming: false")
        from distilkit.finetune import parse_teacher_spec
        for t in k.teacher if isinstance(k.teacher, list) else [k.teacher]:
            if parse_teacher_spec(t):
                raise ValueError("teacher: {base: ..., finetune: ...} fine-tunes the teacher on "
                                 "the training split, which streaming: true never holds; "
                                 "fine-tune it in a run without streaming (or with distilkit "
                                 "finetune) and give its directory as teacher")

    def load_data(self, recipe):
        from distilkit.data import load_raw

        notes: list = []
        raw = load_raw(recipe.data, notes, classes=True)
        for note in notes:
            print(f"[distilkit] {note}", file=sys.stderr)
        return raw

    def load_teachers(self, recipe, raw, progress: bool) -> Teachers:
        from transformers import AutoConfig, AutoTokenizer

        from distilkit.data import label_names, match_teacher_labels
        from distilkit.teachers import load_teacher

        k, spec = recipe.keys, recipe.data
        specs = _resolve_teachers(recipe, raw, progress)
        teachers = Teachers(specs=specs, tokenizer=AutoTokenizer.from_pretrained(specs[0]),
                            config=AutoConfig.from_pretrained(specs[0]),
                            loader=lambda s: load_teacher(s, adapter=k.teacher_adapter),
                            adapter=k.teacher_adapter)
        check_max_length(k.max_length, teachers.config)
        for other in specs[1:]:  # one label view serves the ensemble: the members must agree
            other_labels = AutoConfig.from_pretrained(other).id2label
            if other_labels != teachers.config.id2label:
                raise ValueError(f"teacher: the ensemble's members label their classes "
                                 f"differently ({teachers.config.id2label} vs {other_labels}); "
                                 "give teachers trained on the same labels")
        names = label_names(raw, spec)
        if names:
            notes: list = []
            index = match_teacher_labels(names, teachers.config.id2label, notes)
            for note in notes:
                print(f"[distilkit] {note}", file=sys.stderr)
            if index != list(range(teachers.config.num_labels)):
                # The data's classes are a reordering (or a subset) of the teacher's: the
                # teacher is seen through a view that answers in the data's order, live, in the
                # cache and in its evaluation alike.
                teachers.label_index = index
                teachers.loader = lambda s, load=teachers.loader: LabelMapped(load(s), index, names)
            teachers.config = _with_labels(teachers.config, names)
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
        if lazy:
            teacher = teachers.first_dir
        elif kind == "config":  # a fresh model of the teacher's architecture: its config will do
            teacher = teachers.config
        else:
            teacher = teachers.models()[0]
            teacher = getattr(teacher, "inner", teacher) if kind == "from_teacher" else teacher
        student, tok = build_student(recipe, teacher, teachers.tokenizer, texts)
        if kind == "from_teacher" and teachers.label_index is not None:
            _select_head_rows(student, teachers.label_index)
        _set_labels(student, teachers.config, spec)
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
        if spec.streaming:
            return self._prepare_stream(recipe, args, raw, teachers, tokenizer)
        train_raw = raw[spec.train_split]
        if k.augment:
            from distilkit.augment import augment_dataset
            train_raw = augment_dataset(train_raw, k.augment, spec, seed=args.seed)
        ds = tokenize(raw, tokenizer, spec, max_length=k.max_length)
        train_ds = (tokenize({"train": train_raw}, tokenizer, spec, max_length=k.max_length)["train"]
                    if k.augment else ds[spec.train_split])
        live = needs_live_teacher(args)
        if k.teacher_cache and live:
            _say_cache_unused()
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

    def _prepare_stream(self, recipe, args, raw, teachers: Teachers, tokenizer) -> Prepared:
        """``streaming: true``: the training split as a stream tokenized on the fly (through a
        seeded shuffle buffer with ``shuffle_buffer``), evaluation on the splits loaded as
        usual. ``raw``'s training split is the stream's first rows
        (:data:`distilkit.data.STREAM_HEAD`): they score importance-based compression.

        With ``teacher_cache`` the teacher's outputs come with each batch
        (:class:`StreamTeacherCollator`): read from the cache, or computed (the teacher
        loaded on the first miss) and cached, so the trainer reads the same columns as from
        a loaded split's cache and has no teacher of its own; a run whose every row hits
        never loads the teacher. Without it, or when a term reads what is not cached, the
        teacher runs every step."""
        from distilkit.collate import DistilCollator
        from distilkit.data import label_names, tokenize, tokenize_stream, train_stream
        from distilkit.metrics import classification_metrics

        k, spec = recipe.keys, recipe.data
        if tokenizer is not teachers.tokenizer:
            raise ValueError("student: it reads its own tokens, but a stream carries only the "
                             "student's tokens, not the teacher's; use a student with the "
                             "teacher's tokenizer, or streaming: false")
        live = needs_live_teacher(args)
        if k.teacher_cache and live:
            _say_cache_unused()
        head = raw[spec.train_split]
        # A training split without the label column is a transfer set: KD terms only.
        labelled = spec.label_column in head.column_names
        stream = train_stream(spec, label_names(raw, spec) if labelled else None, seed=args.seed)
        train_ds = tokenize_stream(stream, tokenizer, spec, head.column_names, k.max_length)
        # Every process reads the stream and keeps its own slice of each global batch
        # (accelerate's IterableDatasetShard; a stream of several files is split by file
        # instead), so one process's batches are the same as N processes' together.
        # Dispatching (process 0 reads, then sends) would concatenate batches padded to
        # different lengths, which fails.
        args.accelerator_config.dispatch_batches = False
        ds = tokenize(raw, tokenizer, spec, max_length=k.max_length)
        collator = DistilCollator(tokenizer)
        stats: dict = {"head_rows": len(head)}
        callbacks = []
        cached = bool(k.teacher_cache) and not live
        if cached:
            # The collator runs after each process has taken its slice of the global batch,
            # so each process computes (and caches) the teacher's outputs of its rows only.
            collator = StreamTeacherCollator(collator,
                                             *self._stream_sources(recipe, args, teachers))
            callbacks.append(_StreamCacheCallback(collator, stats))
        return Prepared(train_dataset=train_ds, eval_dataset=ds[spec.eval_split],
                        collator=collator, importance_dataset=ds[spec.train_split],
                        callbacks=callbacks, compute_metrics=classification_metrics,
                        teacher_cached=cached, stats={"streaming": stats})

    def _stream_sources(self, recipe, args, teachers: Teachers) -> tuple:
        """The :class:`~distilkit.teacher_cache.StreamTeacherOutputs` of a streamed run: the
        first teacher's (every output the terms read), and, for an ensemble, each member's
        logits; keyed and computed as :meth:`_attach_teacher_outputs` does for a loaded
        split, so both share one cache."""
        from distilkit.teacher_cache import StreamTeacherOutputs

        k = recipe.keys
        outputs = cached_outputs_needed(args)
        by_path = not teachers.adapter
        members = teachers.specs if by_path else teachers.models()
        kw = dict(max_length=k.max_length, cache_dir=k.cache_dir,
                  teacher_dtype=args.teacher_dtype, device=lambda: args.device,
                  teacher_loader=(lambda s: getattr(m := teachers.loader(s), "inner", m))
                  if by_path else None)
        first = StreamTeacherOutputs(members[0], outputs=outputs, **kw)
        teachers.cache_namespace = first.namespace
        ensemble = []
        if len(members) > 1:
            ensemble = [first if i == 0 and outputs == ("logits",) else
                        StreamTeacherOutputs(m, outputs=("logits",), **kw)
                        for i, m in enumerate(members)]
        # Keyed by path, the cache holds the teacher's own outputs, put in the data's label
        # order per batch; a loaded teacher (with an adapter) answers in that order already.
        return first, ensemble, (teachers.label_index if by_path else None)

    def _attach_teacher_outputs(self, recipe, args, teachers, train_raw, train_ds, progress):
        from distilkit.data import tokenize
        from distilkit.teacher_cache import attach_ensemble_logits, attach_teacher_outputs

        k, spec = recipe.keys, recipe.data
        outputs = cached_outputs_needed(args)
        t_train = tokenize({"t": train_raw}, teachers.tokenizer, spec, max_length=k.max_length)["t"]
        kw = dict(teacher_dataset=t_train, max_length=k.max_length, cache_dir=k.cache_dir,
                  progress=progress, teacher_loader=teachers.loader,
                  teacher_dtype=args.teacher_dtype)
        # With an adapter the teacher is the merged model, not the files at its path: key the
        # cache by (and compute with) the loaded weights (label view included). Keyed by
        # path, the cache holds the teacher's own outputs, put in the data's label order here.
        by_path = not teachers.adapter
        members = teachers.specs if by_path else teachers.models()
        if by_path:
            kw["teacher_loader"] = lambda s: getattr(m := teachers.loader(s), "inner", m)
        stats: dict = {}
        train_ds = attach_teacher_outputs(train_ds, members[0], outputs=outputs, stats=stats, **kw)
        teachers.cache_namespace = stats["namespace"]
        if len(members) > 1:  # every member's logits, averaged per step like a live ensemble
            train_ds = attach_ensemble_logits(train_ds, members, **kw)
        if by_path and teachers.label_index is not None:
            from distilkit.teacher_cache import COLUMN, ENSEMBLE_COLUMN, attach_logits

            for col, ens in ((COLUMN["logits"], False), (ENSEMBLE_COLUMN, True)):
                if col in train_ds.column_names:
                    values = np.asarray(train_ds.with_format("numpy")[col])
                    train_ds = attach_logits(train_ds, values[..., teachers.label_index], ensemble=ens)
        return train_ds

    def eval_settings(self, recipe) -> tuple[str, dict]:
        k, spec = recipe.keys, recipe.data
        return spec.test_split or spec.eval_split, dict(
            text_column=spec.text_column, text_pair_column=spec.text_pair_column,
            label_column=spec.label_column, max_length=k.max_length)

    def measure(self, model, tokenizer, dataset, model_dir, settings: dict) -> dict:
        from distilkit.evaluate import evaluate_model

        return evaluate_model(model, tokenizer, dataset, model_dir=model_dir, **settings)

    def figures_key(self, recipe, dataset, settings: dict) -> str:
        """The evaluation data's contents (not its path) and the threads."""
        import torch

        h = hashlib.sha256(f"v{FIGURES_VERSION}:threads={torch.get_num_threads()}".encode())
        for c in (settings["text_column"], settings["text_pair_column"],
                  settings["label_column"]):
            if c:
                h.update(f"{c}:".encode())
                h.update(json.dumps(list(dataset[c]), default=str).encode())
        return h.hexdigest()

    def evaluate(self, recipe, raw, teachers: Teachers, student_dir: str,
                 progress: bool, teacher_figures: Optional[dict] = None) -> tuple[dict, dict, str]:
        from transformers import AutoTokenizer

        from distilkit.compress.base import load_compressed

        split, settings = self.eval_settings(recipe)
        t_metrics = teacher_figures or self.evaluate_teacher(recipe, raw, teachers)
        student, tokenizer = load_compressed(student_dir), AutoTokenizer.from_pretrained(student_dir)
        s_metrics = self.measure(student, tokenizer, raw[split], student_dir, settings)
        timed = teachers.timing_model() if t_metrics.get("latency_ms_batch32") is not None \
            and s_metrics.get("latency_ms_batch32") is not None else None
        if timed is not None:
            # The speed-up is read from the two timed in turns, now: the teacher's own
            # figures may be cached from another hour (another load of the machine).
            from distilkit.evaluate import side_by_side_latency

            lat = side_by_side_latency({"teacher": (timed, teachers.tokenizer),
                                        "student": (student, tokenizer)}, raw[split],
                                       **settings)
            method = "timed in turns with the student (evaluate.side_by_side_latency)"
            t_metrics = {**t_metrics, **lat["teacher"], "latency_method": method}
            s_metrics = {**s_metrics, **lat["student"],
                         "latency_method": method.replace("student", "teacher")}
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
        from distilkit.data import label_names, load_raw
        from distilkit.evaluate import evaluate_model

        max_length = max_length or (recipe.keys.max_length if recipe else None) or 128
        raw = load_raw(spec, classes=True)
        split = split or spec.test_split or spec.eval_split
        if split not in raw:
            raise ValueError(f"split {split!r} is not in the dataset; it has {sorted(raw)}")
        model = load_compressed(model_dir)
        names = label_names(raw, spec)
        if names:  # the model's answers read in the data's label order, by name
            model = in_data_order(model, names)
        res = evaluate_model(model, AutoTokenizer.from_pretrained(model_dir),
                             raw[split], text_column=spec.text_column,
                             text_pair_column=spec.text_pair_column,
                             label_column=spec.label_column, max_length=max_length,
                             model_dir=model_dir, latency=latency)
        res["split"] = split
        return res


class StreamTeacherCollator:
    """A collator for a streamed training split with ``teacher_cache``: each batch's rows get
    the teacher-output columns a loaded split's cache attaches (``teacher_logits``, with
    ``teacher_cls_hidden`` where a term reads [CLS] states, ``teacher_ensemble_logits`` for
    an ensemble), from ``first`` and the ensemble's members (each a
    :class:`~distilkit.teacher_cache.StreamTeacherOutputs`), in the data's label order
    (``label_index``), then ``collator`` pads them. The trainer serves its terms from those
    columns, as from a loaded split's."""

    def __init__(self, collator, first, ensemble=(), label_index: Optional[list] = None):
        self.collator, self.first, self.ensemble = collator, first, list(ensemble)
        self.label_index = label_index

    @property
    def sources(self) -> list:
        """Every distinct teacher-output source (one per cache namespace)."""
        return list({id(s): s for s in [self.first, *self.ensemble]}.values())

    def __call__(self, features: list) -> dict:
        from distilkit.teacher_cache import COLUMN, ENSEMBLE_COLUMN

        got = self.first.outputs_for(features)
        cols = {COLUMN[kind]: v for kind, v in got.items()}
        if self.ensemble:
            cols[ENSEMBLE_COLUMN] = np.stack(
                [got["logits"] if m is self.first else m.outputs_for(features)["logits"]
                 for m in self.ensemble], axis=1)
        if self.label_index is not None:
            for c in (COLUMN["logits"], ENSEMBLE_COLUMN):
                if c in cols:
                    cols[c] = cols[c][..., self.label_index]
        return self.collator([{**f, **{c: v[i] for c, v in cols.items()}}
                              for i, f in enumerate(features)])


class _StreamCacheCallback(TrainerCallback):
    """At the end of training: the stream's computed teacher outputs still buffered are
    written to the cache, and how many rows hit and were computed (summed over the
    processes) go to ``stats`` (``results.json``'s ``streaming.teacher_cache``) and, on the
    main process, to stderr."""

    def __init__(self, collator: StreamTeacherCollator, stats: dict):
        self.collator, self.stats = collator, stats

    def on_train_end(self, args, state, control, **kwargs):
        sources = self.collator.sources
        for s in sources:
            s.flush()
        counts = torch.tensor([[s.hits, s.computed, int(s.teacher_loaded)] for s in sources],
                              dtype=torch.long)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            counts = counts.to(args.device)
            torch.distributed.all_reduce(counts)
            counts = counts.cpu()
        hits, computed, loaded = (int(v) for v in counts.sum(0))
        self.stats["teacher_cache"] = {"hits": hits, "computed": computed,
                                       "teacher_loaded": bool(loaded),
                                       "namespace": self.collator.first.namespace}
        if state.is_world_process_zero:
            print(f"[distilkit] teacher cache (stream): {hits:,} row outputs read from the "
                  f"cache, {computed:,} computed by the teacher and cached"
                  f"{'' if loaded else ' (the teacher was never loaded)'} "
                  f"({self.collator.first.namespace})", file=sys.stderr)


def _say_cache_unused() -> None:
    print("[distilkit] teacher_cache: not used, because alpha_hidden / alpha_attention / "
          "alpha_cosine read the teacher's per-token states, which are not cached; the "
          "teacher runs every step", file=sys.stderr)


def in_data_order(model: nn.Module, names: list) -> nn.Module:
    """``model`` answering in the data's class order (matched by name), or itself when it
    already does."""
    from distilkit.data import match_teacher_labels

    index = match_teacher_labels(names, model.config.id2label)
    return model if index == list(range(model.config.num_labels)) else \
        LabelMapped(model, index, names)


class LabelMapped(nn.Module):
    """A classifier seen in another label order: its logits are ``inner``'s at ``index`` (one
    teacher class per data class, in the data's order). Hidden states and attentions pass
    through; ``config`` says the data's labels. The index is a buffer, so a fingerprint of
    this module's state covers it."""

    def __init__(self, inner: nn.Module, index: list, names: list):
        super().__init__()
        self.inner = inner
        self.register_buffer("label_index", torch.tensor(index, dtype=torch.long), persistent=True)
        self.config = _with_labels(inner.config, names)

    @property
    def device(self):
        from distilkit.device import model_device
        return model_device(self.inner)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # get_input_embeddings, generation settings, ...: inner's
            return getattr(super().__getattr__("inner"), name)

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        out["logits"] = out["logits"].index_select(-1, self.label_index.to(out["logits"].device))
        return out


def _with_labels(config, names: list):
    """A copy of ``config`` whose labels are ``names`` (ids in list order)."""
    cfg = copy.deepcopy(config)
    cfg.num_labels = len(names)
    cfg.id2label = dict(enumerate(names))
    cfg.label2id = {n: i for i, n in enumerate(names)}
    return cfg


def _select_head_rows(student: nn.Module, index: list) -> None:
    """Keep (in ``index`` order) the rows of the student's output layer that a student copied
    from the teacher got from the teacher's head: its classes become the data's."""
    n = student.config.num_labels
    heads = [(name, m) for name, m in student.named_modules()
             if isinstance(m, nn.Linear) and m.out_features == n]
    if not heads:
        raise ValueError(f"cannot find the output layer of {type(student).__name__} "
                         f"({n} classes) to put the teacher's classes in the data's order")
    name, head = heads[-1]
    new = nn.Linear(head.in_features, len(index), bias=head.bias is not None)
    with torch.no_grad():
        new.weight.copy_(head.weight[index])
        if head.bias is not None:
            new.bias.copy_(head.bias[index])
    parent, _, child = name.rpartition(".")
    setattr(student.get_submodule(parent) if parent else student, child, new)
    student.config.num_labels = len(index)


def _set_labels(student: nn.Module, teacher_config, spec) -> None:
    """The student answers with the data's labels: its ``id2label``/``label2id`` are the
    teacher's (already in the data's order), and its class count must match."""
    cfg = getattr(student, "config", None)
    if cfg is None or not getattr(teacher_config, "id2label", None):
        return
    if cfg.num_labels != teacher_config.num_labels:
        raise ValueError(f"student: predicts {cfg.num_labels} classes but label_column "
                         f"{spec.label_column!r} has {teacher_config.num_labels}; build the "
                         "student for these classes")
    cfg.id2label = dict(teacher_config.id2label)
    cfg.label2id = dict(teacher_config.label2id)
