"""A teacher fine-tuned from a base model on the task's own training split, and cached.

A base model (a pretrained encoder or embedding model, or a seq2seq model) usually has no head
for the task: the head starts random, and :func:`finetune_teacher` trains it (with the rest of
the model) on the training split, for classification (any number of labels, single sentences
or pairs) or seq2seq (source text -> target text). The built-in teacher
(:func:`builtin_teacher`, MiniLM-L6 on the built-in sentiment data) is one instance of it.

What a fine-tuned teacher is keyed by
    every byte of the base's weight files and its config and tokenizer files
    (:func:`distilkit.teacher_cache.teacher_fingerprint`), the contents of the training and
    validation rows of the columns used (in order: the order is the data order of training),
    the label names, the :class:`FinetuneConfig` and the task. Paths are not part of the key,
    so moving the base or the data reuses the teacher; any change to one of them trains a new
    one. The teacher is written under ``$DISTILKIT_CACHE/teachers/<name>-<key>`` in one rename
    (:func:`distilkit.teachers.save_teacher_dir`), so an interrupted fine-tune never leaves a
    directory that looks finished; the Trainer's scratch directory sits beside it and is
    removed, and no checkpoint is ever written (the best weights of early stopping are kept in
    memory). ``teacher_info.json`` records the base, the settings, the data hash and the
    validation figures.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Callable, Optional

from transformers import TrainerCallback

from distilkit import teachers
from distilkit.data import DataSpec, cache_root, load_raw
from distilkit.files import check_writable
from distilkit.teachers import BUILTIN_TEACHER, minilm_path, save_teacher_dir

TASKS = ("classification", "seq2seq")
# The recipe field that names the column of each role.
FIELD_OF_ROLE = {"text": "text_column", "text_pair": "text_pair_column", "label": "label_column",
                 "target": "label_column"}
METRICS = {"loss": False, "accuracy": True, "macro_f1": True}  # name -> higher is better
DEFAULT_EPOCHS = 3
DEFAULT_MAX_LENGTH = 128
FORMAT_VERSION = 1
# BLEU needs generation, which is slow on a CPU: the seq2seq figures use this many
# validation sentences at most (the validation loss uses all of them).
SEQ2SEQ_SCORED_SAMPLES = 500


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class FinetuneConfig:
    """How a teacher is fine-tuned from its base (a recipe's ``teacher.finetune``)."""

    max_steps: Optional[int] = field(default=None, metadata={"help": "Optimizer steps; or give num_train_epochs (default: 3 epochs)."})
    num_train_epochs: Optional[float] = field(default=None, metadata={"help": "Passes over the training split (when max_steps is not given; default 3)."})
    learning_rate: float = field(default=5e-5, metadata={"help": "Peak AdamW learning rate (linear decay to 0)."})
    batch_size: int = field(default=32, metadata={"help": "Training examples per step."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up steps."})
    warmup_ratio: Optional[float] = field(default=None, metadata={"help": "Warm-up as a fraction of the steps, in [0, 1) (instead of warmup_steps)."})
    max_length: Optional[int] = field(default=None, metadata={"help": f"Longest input (and, for seq2seq, target), in tokens; longer ones are truncated (default {DEFAULT_MAX_LENGTH}, or the base's positions if fewer)."})
    seed: int = field(default=42, metadata={"help": "Seed of the head's initialisation and of the data order."})
    weight_decay: Optional[float] = field(default=None, metadata={"help": "AdamW weight decay; default 0.0 for classification, 0.01 for seq2seq."})
    early_stopping_patience: Optional[int] = field(default=None, metadata={"help": "Stop after this many evaluations on the validation split without improvement, and keep the best weights (default: no early stopping)."})
    eval_steps: Optional[int] = field(default=None, metadata={"help": "Evaluate every this many steps when early stopping (default: a tenth of the steps)."})
    early_stopping_metric: str = field(default="loss", metadata={"help": "What early stopping watches on the validation split: 'loss', or for classification 'accuracy' or 'macro_f1'."})

    def __post_init__(self):
        for name in ("max_steps", "early_stopping_patience", "eval_steps"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < 1):
                raise ValueError(f"{name}: {v!r} must be a positive integer (or null)")
        if self.num_train_epochs is not None and not (_is_number(self.num_train_epochs)
                                                      and self.num_train_epochs > 0):
            raise ValueError(f"num_train_epochs: {self.num_train_epochs!r} must be a number > 0 "
                             "(or null)")
        if self.max_steps is not None and self.num_train_epochs is not None:
            raise ValueError(f"num_train_epochs: {self.num_train_epochs!r} and max_steps: "
                             f"{self.max_steps!r} are both set; give only one of them")
        if not (_is_number(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate: {self.learning_rate!r} must be a number > 0 "
                             "(try 5e-5)")
        for name, low in (("batch_size", 1), ("max_length", 2), ("warmup_steps", 0)):
            v = getattr(self, name)
            if (v is not None or name != "max_length") and (not _is_int(v) or v < low):
                raise ValueError(f"{name}: {v!r} must be an integer >= {low}")
        if self.warmup_ratio is not None:
            if not (_is_number(self.warmup_ratio) and 0 <= self.warmup_ratio < 1):
                raise ValueError(f"warmup_ratio: {self.warmup_ratio!r} must be a number in "
                                 "[0, 1) (try 0.1)")
            if self.warmup_steps:
                raise ValueError(f"warmup_ratio: {self.warmup_ratio!r} and warmup_steps: "
                                 f"{self.warmup_steps!r} are both set; give only one of them")
        if not _is_int(self.seed):
            raise ValueError(f"seed: {self.seed!r} must be an integer")
        if self.weight_decay is not None and not (_is_number(self.weight_decay)
                                                  and self.weight_decay >= 0):
            raise ValueError(f"weight_decay: {self.weight_decay!r} must be a number >= 0 "
                             "(or null for the task's default)")
        if self.early_stopping_metric not in METRICS:
            raise ValueError(f"early_stopping_metric: {self.early_stopping_metric!r} is not "
                             f"one of {sorted(METRICS)}")
        if self.eval_steps is not None and self.early_stopping_patience is None:
            raise ValueError(f"eval_steps: {self.eval_steps!r} is only used by early stopping; "
                             "set early_stopping_patience too, or remove eval_steps")

    @classmethod
    def from_dict(cls, d: Any, field: str = "teacher.finetune") -> "FinetuneConfig":
        """A config from a recipe's mapping; errors name ``field`` and the setting."""
        if d is None:
            d = {}
        if not isinstance(d, dict):
            raise ValueError(f"{field}: {d!r} must be a mapping of fine-tuning settings, e.g. "
                             "{max_steps: 500, learning_rate: 5e-5}")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(f"{field}.{unknown[0]}: unknown setting; use some of {names}")
        try:
            return cls(**d)
        except ValueError as e:
            raise ValueError(f"{field}.{e}") from None

    def total_steps(self, train_rows: int) -> int:
        """Optimizer steps over a training split of ``train_rows`` examples."""
        if self.max_steps is not None:
            return self.max_steps
        epochs = DEFAULT_EPOCHS if self.num_train_epochs is None else self.num_train_epochs
        return max(1, math.ceil(epochs * math.ceil(train_rows / self.batch_size)))

    def warmup(self, steps: int) -> int:
        if self.warmup_ratio is None:
            return self.warmup_steps
        return int(self.warmup_ratio * steps)


# The built-in teacher: all-MiniLM-L6-v2 fine-tuned on the built-in sentiment data with these
# settings (ENVIRONMENT.md: ~83% after 150 steps at L=64). Changing them changes its key.
BUILTIN_FINETUNE = FinetuneConfig(max_steps=200, learning_rate=5e-5, batch_size=32,
                                  warmup_steps=20, max_length=64, seed=42)


def parse_teacher_spec(spec: Any, field: str = "teacher") -> Optional[tuple[str, FinetuneConfig]]:
    """``(base, FinetuneConfig)`` for a recipe's ``teacher: {base: ..., finetune: {...}}``,
    ``None`` for any other teacher spec. Checks everything that needs no training."""
    if not isinstance(spec, dict):
        return None
    unknown = sorted(set(spec) - {"base", "finetune"})
    if unknown:
        raise ValueError(f"{field}.{unknown[0]}: unknown key; a teacher to fine-tune is "
                         "{base: PATH_OR_HUB_ID, finetune: {...settings}}")
    base = spec.get("base")
    if not isinstance(base, str) or not base.strip():
        raise ValueError(f"{field}.base: {base!r} must name the base model: a directory saved "
                         "with save_pretrained or a hub id like 'org/name'")
    path = os.path.expanduser(base)
    if teachers.looks_local(path) and not os.path.isdir(path):
        raise FileNotFoundError(f"{field}.base: {base!r} does not exist; give a directory "
                                "saved with save_pretrained or a hub id like 'org/name'")
    return base, FinetuneConfig.from_dict(spec.get("finetune"), f"{field}.finetune")


def resolve_teacher(spec: Any, field: str = "teacher", *, raw=None,
                    data: Optional[DataSpec] = None, task: str = "classification",
                    progress: bool = True) -> str:
    """Every teacher spec as a directory or hub id: ``builtin:minilm-rt`` is fine-tuned (or
    taken from the cache), ``{base, finetune}`` is fine-tuned on ``raw`` (the recipe's
    splits, columns named by ``data``), a path or hub id is checked by
    :func:`distilkit.teachers.resolve_teacher`."""
    if spec == BUILTIN_TEACHER:
        return builtin_teacher(progress=progress)
    parsed = parse_teacher_spec(spec, field)
    if parsed is None:
        return teachers.resolve_teacher(spec, field)
    if raw is None or data is None:
        raise ValueError(f"{field}: a teacher fine-tuned from {parsed[0]!r} needs the "
                         "recipe's data (raw and data) to be trained on")
    return finetune_teacher(parsed[0], raw, data, parsed[1], task=task, progress=progress)


def builtin_teacher(force: bool = False, progress: bool = True) -> str:
    """Path of the built-in teacher: MiniLM-L6 fine-tuned on the built-in train split.
    Trains it (a few minutes on 2 CPU cores) the first time, then reuses the cache."""
    spec = DataSpec()
    return finetune_teacher(minilm_path(), load_raw(spec), spec, BUILTIN_FINETUNE,
                            progress=progress, force=force, name="minilm-rt")


# ---------------------------------------------------------------------------------------
# The cache key
# ---------------------------------------------------------------------------------------

def _columns(spec: DataSpec, task: str) -> dict[str, str]:
    """Role -> column of the columns fine-tuning reads."""
    roles = {"text": spec.text_column}
    if task == "classification" and spec.text_pair_column:
        roles["text_pair"] = spec.text_pair_column
    if not spec.label_column:
        what = "an integer label column" if task == "classification" else "the target text"
        raise ValueError(f"label_column: fine-tuning a teacher needs {what}; name it "
                         "with label_column")
    roles["label" if task == "classification" else "target"] = spec.label_column
    return roles


def _splits(raw, spec: DataSpec) -> dict[str, Any]:
    """The splits fine-tuning reads: train, and validation when the data has one."""
    if spec.train_split not in raw:
        raise ValueError(f"train_split: {spec.train_split!r} is not in the dataset; it has "
                         f"{sorted(raw)}")
    out = {"train": raw[spec.train_split]}
    if spec.eval_split and spec.eval_split in raw:
        out["validation"] = raw[spec.eval_split]
    return out


def data_fingerprint(splits: dict, roles: dict[str, str], label_names: Optional[list]) -> str:
    """Hash of the rows fine-tuning reads: per split, the values of each used column in row
    order (column names and file paths are not part of it), and the label names."""
    h = hashlib.sha256(json.dumps({"labels": label_names}).encode())
    for split, d in splits.items():
        h.update(f"split:{split}:{len(d)}".encode())
        cols = list(roles.values())
        for batch in d.select_columns(sorted(set(cols))).iter(batch_size=10_000):
            for role, col in roles.items():
                h.update(f"{role}:".encode())
                h.update(json.dumps(batch[col], ensure_ascii=False).encode())
    return h.hexdigest()


def _key(base_dir: str, data_hash: str, config: FinetuneConfig, task: str) -> str:
    from distilkit.teacher_cache import teacher_fingerprint, tokenizer_fingerprint

    blob = {"format": FORMAT_VERSION, "task": task, "weights": teacher_fingerprint(base_dir),
            "tokenizer": tokenizer_fingerprint(base_dir), "data": data_hash,
            "config": asdict(config)}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")[:40] or "teacher"


# ---------------------------------------------------------------------------------------
# Checks that need no training
# ---------------------------------------------------------------------------------------

def _local_base(base: str) -> str:
    """A local directory holding the base's config, weights and tokenizer: ``base`` itself,
    or the snapshot of a hub id (only the files from_pretrained reads, not every format)."""
    path = os.path.expanduser(os.fspath(base))
    if not os.path.isdir(path):
        if teachers.looks_local(path):
            raise FileNotFoundError(f"teacher.base: {base!r} does not exist; give a directory "
                                    "saved with save_pretrained or a hub id like 'org/name'")
        from huggingface_hub import snapshot_download

        text = ["*.json", "*.txt", "*.model"]
        path = snapshot_download(base, allow_patterns=text + ["*.safetensors"])
        if not any(n.endswith(".safetensors") for n in os.listdir(path)):
            path = snapshot_download(base, allow_patterns=text + ["*.bin"])
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"teacher.base: {base!r} is not a model directory (no "
                                "config.json); give a directory saved with save_pretrained")
    return path


def _label_names(splits: dict, column: str) -> list[str]:
    """The class names of an integer label column: its ``ClassLabel`` names, or ``LABEL_i``
    for plain integers (matched by index). Every label must be a class id."""
    import numpy as np
    from datasets import ClassLabel

    feat = splits["train"].features[column]
    if isinstance(feat, ClassLabel):
        names = list(feat.names)
    elif str(getattr(feat, "dtype", "")).startswith(("int", "uint")):
        names = [f"LABEL_{i}" for i in range(max(splits["train"][column]) + 1)]
    else:
        raise ValueError(f"label_column: column {column!r} holds {getattr(feat, 'dtype', feat)}, "
                         "not class ids; load the data with distilkit.data.load_raw, which maps "
                         "string labels to ids")
    for split, d in splits.items():
        ids = np.asarray(d[column])
        bad = ids[(ids < 0) | (ids >= len(names))]
        if bad.size:
            raise ValueError(f"label_column: label {int(bad[0])} in split {split!r} is not one of "
                             f"the {len(names)} classes {names}")
    if len(names) < 2:
        raise ValueError(f"label_column: column {column!r} has {len(names)} class ({names}); a "
                         "classifier needs at least 2")
    return names


def _check_texts(splits: dict, roles: dict[str, str]) -> None:
    """Text columns hold strings, none missing (the tokenizer would fail on them later)."""
    for split, d in splits.items():
        for role, col in roles.items():
            if role == "label":
                continue
            dtype = str(getattr(d.features[col], "dtype", ""))
            if dtype not in ("string", "large_string"):
                raise ValueError(f"{FIELD_OF_ROLE[role]}: column {col!r} in split {split!r} "
                                 f"holds {dtype}, not text")
            missing = sum(v is None for v in d[col])
            if missing:
                raise ValueError(f"{FIELD_OF_ROLE[role]}: column {col!r} has {missing} missing "
                                 f"cells in split {split!r}; drop or fill them first")


def _check_model(base: str, base_dir: str, config: FinetuneConfig, task: str) -> FinetuneConfig:
    """``config`` with its ``max_length`` for this base, after the checks of the base that
    need no weights."""
    from transformers import AutoConfig

    from distilkit.modeling import ensure_registered

    ensure_registered()
    cfg = AutoConfig.from_pretrained(base_dir)
    if task == "seq2seq" and not getattr(cfg, "is_encoder_decoder", False):
        raise ValueError(f"teacher.base: {base!r} holds a {type(cfg).__name__}, not an "
                         "encoder-decoder model; give a seq2seq base (T5, BART, ...) or use "
                         "task: classification")
    positions = getattr(cfg, "max_position_embeddings", None)
    if config.max_length is None:
        config = replace(config, max_length=min(DEFAULT_MAX_LENGTH,
                                                positions or DEFAULT_MAX_LENGTH))
    if positions and config.max_length > positions:
        raise ValueError(f"teacher.finetune.max_length: {config.max_length} is beyond the base "
                         f"model's {positions} positions; use at most {positions}")
    if config.early_stopping_patience is not None and task == "seq2seq" \
            and config.early_stopping_metric != "loss":
        raise ValueError(f"teacher.finetune.early_stopping_metric: "
                         f"{config.early_stopping_metric!r} is for classification; a seq2seq "
                         "teacher stops on the validation 'loss'")
    return config


# ---------------------------------------------------------------------------------------
# Fine-tuning
# ---------------------------------------------------------------------------------------

@dataclass
class FinetunePlan:
    """What :func:`finetune_teacher` would do, worked out without training (every check
    passed): the teacher's cache directory ``out`` and whether it is already there."""

    out: str
    cached: bool
    base: str  # as given: a directory or a hub id
    base_dir: str  # a local directory with the base's files
    task: str
    config: FinetuneConfig  # max_length resolved for this base
    steps: int
    splits: dict  # "train" (and "validation") -> Dataset
    roles: dict  # role -> column
    labels: Optional[list]
    data_hash: str

    def info(self) -> dict:
        """The ``teacher_info.json`` fields known before training."""
        return {"base": self.base, "task": self.task, "settings": asdict(self.config),
                "data": {"hash": self.data_hash,
                         "rows": {k: len(d) for k, d in self.splits.items()},
                         "columns": self.roles},
                **({"labels": self.labels} if self.labels else {})}


def plan_finetune(base: str, raw, spec: DataSpec, config: Optional[FinetuneConfig] = None,
                  task: str = "classification", cache_dir: Optional[str] = None, *,
                  name: Optional[str] = None) -> FinetunePlan:
    """Every check of :func:`finetune_teacher` that needs no training (data, labels, base,
    settings against the base), and the cache key: for a dry run, or before a long run."""
    config = FinetuneConfig() if config is None else config
    if not isinstance(config, FinetuneConfig):
        raise ValueError(f"teacher.finetune: {config!r} must be a FinetuneConfig")
    if task not in TASKS:
        raise ValueError(f"task: {task!r} cannot fine-tune a teacher; use one of {TASKS}")
    roles = _columns(spec, task)
    splits = _splits(raw, spec)
    for split, d in splits.items():
        if split == "train" and len(d) == 0:
            raise ValueError(f"split {spec.train_split!r} is empty: fine-tuning needs training "
                             "examples")
        for role, col in roles.items():
            if col not in d.column_names:
                raise ValueError(f"{FIELD_OF_ROLE[role]}: column {col!r} is not in split "
                                 f"{split!r}; its columns are {d.column_names}")
    if config.early_stopping_patience is not None and "validation" not in splits:
        raise ValueError(f"teacher.finetune.early_stopping_patience: early stopping needs a "
                         f"validation split, and {spec.eval_split!r} is not in the dataset "
                         f"({sorted(raw)})")
    labels = _label_names(splits, roles["label"]) if task == "classification" else None
    _check_texts(splits, roles)
    base_dir = _local_base(base)
    # From here on max_length is a number: the key of a default and of an explicit equal
    # value is the same, as the teacher is.
    config = _check_model(base, base_dir, config, task)
    data_hash = data_fingerprint(splits, roles, labels)
    root = os.path.abspath(os.path.expanduser(cache_dir or os.path.join(cache_root(), "teachers")))
    prefix = name or _slug(os.path.basename(os.path.normpath(os.fspath(base))))
    out = os.path.join(root, f"{prefix}-{_key(base_dir, data_hash, config, task)}")
    return FinetunePlan(out=out, cached=os.path.isfile(os.path.join(out, teachers.INFO_FILE)),
                        base=os.fspath(base), base_dir=base_dir, task=task, config=config,
                        steps=config.total_steps(len(splits["train"])), splits=splits,
                        roles=roles, labels=labels, data_hash=data_hash)


def finetune_teacher(base: str, raw, spec: DataSpec, config: Optional[FinetuneConfig] = None,
                     task: str = "classification", progress: bool = True,
                     cache_dir: Optional[str] = None, *, force: bool = False,
                     name: Optional[str] = None) -> str:
    """Directory of the teacher fine-tuned from ``base`` on ``raw`` (a ``DatasetDict``) with
    ``config``: taken from the cache when it was trained before (nothing is loaded), else
    trained now and cached.

    ``base`` is a directory saved with ``save_pretrained`` (model and tokenizer) or a hub id.
    ``spec`` names the splits and columns: for classification the text (and
    ``text_pair_column``) and an integer label column (its ``ClassLabel`` names become the
    teacher's ``id2label``); for seq2seq ``text_column`` is the source and ``label_column``
    the target text. ``cache_dir`` defaults to ``$DISTILKIT_CACHE/teachers``; ``name`` is the
    directory's prefix (default: the base's name); ``force`` trains even on a cache hit.
    """
    plan = plan_finetune(base, raw, spec, config, task, cache_dir, name=name)
    if plan.cached and not force:
        if progress:
            print(f"[distilkit] teacher fine-tuned from {plan.base}: {plan.out} (cached)")
        return plan.out
    check_writable(os.path.dirname(plan.out), "cache_dir" if cache_dir else "DISTILKIT_CACHE")
    _fine_tune(plan, progress)
    return plan.out


def _fine_tune(plan: FinetunePlan, progress: bool) -> None:
    """Train as ``plan`` says and put the teacher (model, tokenizer, ``teacher_info.json``
    with the training and validation figures) in place at ``plan.out``."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(plan.base_dir)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"teacher.base: {plan.base!r} has no usable tokenizer "
                         f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); save "
                         "it beside the model with tokenizer.save_pretrained") from e
    if progress:
        print(f"[distilkit] fine-tuning a {plan.task} teacher from {plan.base} ({plan.steps} "
              f"steps); cached at {plan.out} for later runs")
    parent = os.path.dirname(plan.out)
    t0 = time.perf_counter()
    # The Trainer's scratch directory sits beside the cache entry, never inside it.
    with tempfile.TemporaryDirectory(dir=parent, prefix=".tmp-teacher-work-") as work:
        train = _train_classifier if plan.task == "classification" else _train_seq2seq
        model, data, collator, stopper = train(plan, tok, work, progress)
    figures = {}
    if "validation" in plan.splits:
        figures = validation_scores(model, data["validation"], collator, plan.task)
        if plan.task == "seq2seq":
            figures.update(_generation_scores(model, tok, plan))
    info = plan.info()
    info.update(steps=plan.steps, train_seconds=round(time.perf_counter() - t0, 1),
                parameters=sum(p.numel() for p in model.parameters()), validation=figures)
    if stopper is not None:
        info["early_stopping"] = stopper.summary()
    save_teacher_dir(plan.out, model.eval(), tok, info)


def _tokenized(plan: FinetunePlan, tok):
    from datasets import DatasetDict

    raw, roles, config = DatasetDict(plan.splits), plan.roles, plan.config
    if plan.task == "classification":
        from distilkit.data import tokenize

        spec = DataSpec(text_column=roles["text"], text_pair_column=roles.get("text_pair"),
                        label_column=roles["label"])
        return tokenize(raw, tok, spec, max_length=config.max_length)
    from distilkit.seq2seq.data import tokenize_seq2seq

    return tokenize_seq2seq(raw, tok, source_column=roles["text"], target_column=roles["target"],
                            max_source_length=config.max_length,
                            max_target_length=config.max_length)


def _stopper(plan: FinetunePlan, data, collator):
    c = plan.config
    if c.early_stopping_patience is None:
        return None
    return KeepBest(lambda m: validation_scores(m, data["validation"], collator, plan.task),
                    c.early_stopping_metric, c.early_stopping_patience,
                    c.eval_steps or max(1, plan.steps // 10))


def _train_classifier(plan: FinetunePlan, tok, work: str, progress: bool):
    import torch
    from transformers import (AutoConfig, AutoModelForSequenceClassification,
                              DataCollatorWithPadding, Trainer, TrainingArguments)

    config, labels = plan.config, plan.labels
    data = _tokenized(plan, tok)
    collator = DataCollatorWithPadding(tok)
    # A base that is already a classifier with another number of labels has a head of the
    # wrong shape: it is dropped and started afresh, like the missing head of a bare encoder.
    mismatched = AutoConfig.from_pretrained(plan.base_dir).num_labels != len(labels)
    torch.manual_seed(config.seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        plan.base_dir, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)}, ignore_mismatched_sizes=mismatched)
    stopper = _stopper(plan, data, collator)
    args = TrainingArguments(
        output_dir=work, per_device_train_batch_size=config.batch_size,
        learning_rate=config.learning_rate, max_steps=plan.steps,
        warmup_steps=config.warmup(plan.steps), weight_decay=config.weight_decay or 0.0,
        seed=config.seed, logging_steps=50, save_strategy="no", report_to=[],
        disable_tqdm=not progress)
    trainer = Trainer(model=model, args=args, train_dataset=data["train"],
                      data_collator=collator, callbacks=[stopper] if stopper else None)
    trainer.train()
    if stopper:
        stopper.restore(model)
    return model, data, collator, stopper


def _train_seq2seq(plan: FinetunePlan, tok, work: str, progress: bool):
    import torch
    from transformers import AutoModelForSeq2SeqLM

    from distilkit.seq2seq.data import seq2seq_collator
    from distilkit.seq2seq.teacher import train_supervised

    config = plan.config
    data = _tokenized(plan, tok)
    collator = seq2seq_collator(tok)
    torch.manual_seed(config.seed)
    model = AutoModelForSeq2SeqLM.from_pretrained(plan.base_dir)
    stopper = _stopper(plan, data, collator)
    train_supervised(model, tok, data["train"], work, plan.steps, config.batch_size,
                     config.learning_rate, config.warmup(plan.steps), config.seed, progress,
                     callbacks=[stopper] if stopper else None,
                     weight_decay=0.01 if config.weight_decay is None else config.weight_decay)
    if stopper:
        stopper.restore(model)
    return model, data, collator, stopper


def _generation_scores(model, tok, plan: FinetunePlan) -> dict:
    from distilkit.seq2seq.generate_eval import GenerationSettings, evaluate_generation

    m = evaluate_generation(model, tok, plan.splits["validation"], plan.roles["text"],
                            plan.roles["target"],
                            GenerationSettings(max_new_tokens=plan.config.max_length),
                            max_samples=SEQ2SEQ_SCORED_SAMPLES)
    return {k: m[k] for k in ("bleu", "chrf", "exact_match")} | {"scored": m["n"]}


# ---------------------------------------------------------------------------------------
# Validation figures and early stopping
# ---------------------------------------------------------------------------------------

def validation_scores(model, data, collator, task: str, batch_size: int = 64) -> dict:
    """Mean loss over the labelled positions of tokenized ``data`` (classification: also
    accuracy and macro-F1 via :mod:`distilkit.metrics`), and ``n``, the examples scored."""
    import numpy as np
    import torch

    from distilkit.device import model_device, to_device, to_host
    from distilkit.metrics import accuracy_f1

    was_training = model.training
    model.eval()
    device = model_device(model)
    total, count, preds, gold = 0.0, 0, [], []
    try:
        with torch.inference_mode():
            for s in range(0, len(data), batch_size):
                rows = data[s:s + batch_size]
                batch = to_device(collator([dict(zip(rows, v)) for v in zip(*rows.values())]),
                                  device)
                out = model(**batch)
                labelled = int((batch["labels"] != -100).sum())
                total += float(out.loss) * labelled
                count += labelled
                if task == "classification":
                    preds.append(to_host(out.logits.argmax(-1)).numpy())
                    gold.append(to_host(batch["labels"]).numpy())
    finally:
        model.train(was_training)
    scores = {"loss": total / max(count, 1), "n": len(data)}
    if task == "classification":
        scores.update(accuracy_f1(np.concatenate(preds), np.concatenate(gold)))
    return scores


class KeepBest(TrainerCallback):
    """Early stopping without checkpoints: every ``eval_steps`` steps (and at the last step)
    the model is scored by ``score`` (model -> figures); a copy of the best weights is kept in
    memory, training stops after ``patience`` evaluations without a strict improvement of
    ``metric``, and :meth:`restore` puts the best weights back."""

    def __init__(self, score: Callable[[Any], dict], metric: str, patience: int, eval_steps: int):
        self.score, self.metric = score, metric
        self.patience, self.eval_steps = patience, eval_steps
        self.higher = METRICS[metric]
        self.history: list[dict] = []
        self.best_value: Optional[float] = None
        self.best_step = 0
        self.best_state: Optional[dict] = None
        self.stale = 0

    def improves(self, value: float) -> bool:
        if self.best_value is None:
            return True
        return value > self.best_value if self.higher else value < self.best_value

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.eval_steps and state.global_step < state.max_steps:
            return
        figures = self.score(model)
        value = figures[self.metric]
        self.history.append({"step": state.global_step, **figures})
        if self.improves(value):
            self.best_value, self.best_step, self.stale = value, state.global_step, 0
            self.best_state = {k: v.detach().to("cpu", copy=True)
                               for k, v in model.state_dict().items()}
        else:
            self.stale += 1
            if self.stale >= self.patience:
                control.should_training_stop = True

    def restore(self, model) -> None:
        if self.best_state is not None:
            model.load_state_dict(self.best_state)
            self.best_state = None  # the weights are in the model now: free the copy

    def summary(self) -> dict:
        return {"metric": self.metric, "best_step": self.best_step, "best": self.best_value,
                "trained_steps": self.history[-1]["step"] if self.history else 0,
                "evaluations": self.history}
