"""The interface a task plugs into :func:`distilkit.pipeline.run_recipe` with.

The pipeline owns the order of a run and its guarantees (everything validated before work
starts, atomic outputs, main-process-only writes); a task supplies the parts that differ
between, say, classification and seq2seq: how its data is loaded and checked, how its
teachers are loaded, which student it builds, what the trainer trains on, how a model is
evaluated and how a run is summarised. A new task is one module with one :class:`Task`
subclass, registered in :mod:`distilkit.tasks`.

Teachers are loaded lazily (:class:`Teachers`): a run whose every teacher output is cached
reads the teacher's tokenizer and config, never its weights.
"""
from __future__ import annotations

import abc
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

STUDENT_KEYS = {
    "from_teacher": {"num_layers", "keep_layers", "num_decoder_layers", "keep_decoder_layers",
                     "strategy"},
    "pretrained": {"path"},
}


@dataclass
class Teachers:
    """A run's teacher(s): ``specs`` are local directories (or hub ids), the first one's
    ``tokenizer`` and ``config`` are read up front, the models only when :meth:`models` is
    first called."""

    specs: list
    tokenizer: Any
    config: Any
    loader: Callable[[str], Any]
    adapter: Optional[str] = None
    # The teacher-output cache namespace of the first teacher, once its outputs are attached:
    # the teacher's evaluation figures are cached there too.
    cache_namespace: Optional[str] = None
    # Which teacher class each data class is, when not simply the same ids (see the
    # classification task's label matching); None when the orders agree.
    label_index: Optional[list] = None
    _models: Optional[list] = None

    def models(self) -> list:
        if self._models is None:
            self._models = [self.loader(s) for s in self.specs]
        return self._models

    @property
    def loaded(self) -> bool:
        return self._models is not None

    def timing_model(self):
        """The first teacher to time beside a student, or None when none can be timed alone.
        The loaded model in a single process. A model of its architecture with random
        weights (:meth:`stand_in`) on a run that never loads it (fully cached), or whose
        teacher is sharded over several processes (its forward is a collective: timed by the
        main process alone it waits for ever); the latency table times its small models so
        too (a forward pass at a fixed shape costs the same whatever the weights), and the
        teacher's weights are not read. A teacher with an adapter or compression records
        (its shape is not its config's) is loaded, in a single process only."""
        from distilkit.device import processes

        alone = processes() == 1
        if self.loaded and alone:
            return self.models()[0]
        stand_in = self.stand_in()
        if stand_in is not None:
            return stand_in
        return self.models()[0] if alone else None

    def stand_in(self, auto_class=None):
        """A model of the first teacher's architecture (``auto_class``, default
        ``AutoModelForSequenceClassification``) with random weights, seeded, the run's random
        state left as it was; None when its config does not say its shape (not a local
        directory, an adapter, compression records)."""
        from distilkit.compress.base import read_records

        if self.first_dir is None or self.adapter or read_records(self.first_dir):
            return None
        import torch

        if auto_class is None:
            from transformers import AutoModelForSequenceClassification as auto_class
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = auto_class.from_config(self.config).eval()
        if os.path.isfile(os.path.join(self.first_dir, "generation_config.json")):
            from transformers import GenerationConfig

            # what the teacher's generate() does at each step (e.g. n-gram blocking)
            model.generation_config = GenerationConfig.from_pretrained(self.first_dir)
        return model

    @property
    def first_dir(self) -> Optional[str]:
        """The first teacher's directory when it is a local one."""
        s = self.specs[0]
        return s if isinstance(s, str) and os.path.isdir(s) else None


@dataclass
class Prepared:
    """What the trainer trains on, as a task prepares it."""

    train_dataset: Any
    eval_dataset: Any
    collator: Any
    importance_dataset: Any            # batches importance-based compression scores
    callbacks: list = field(default_factory=list)
    compute_metrics: Optional[Callable] = None
    # True when every term reads the teacher from cached outputs: no teacher is loaded.
    teacher_cached: bool = False
    stats: dict = field(default_factory=dict)   # extra figures for results.json


class Task(abc.ABC):
    """One kind of distillation run (see the module docstring)."""

    name: str = ""

    def validate(self, recipe) -> None:
        """Task-specific checks that need neither data nor models."""

    @abc.abstractmethod
    def load_data(self, recipe):
        """The recipe's splits as a ``DatasetDict``, columns and splits checked."""

    @abc.abstractmethod
    def load_teachers(self, recipe, raw, progress: bool) -> Teachers:
        """The teachers, checked against the data (labels, vocabulary)."""

    @abc.abstractmethod
    def build_student(self, recipe, raw, teachers: Teachers):
        """``(student, tokenizer)`` as the recipe's ``student:`` asks."""

    @abc.abstractmethod
    def prepare(self, recipe, args, raw, teachers: Teachers, student, tokenizer,
                progress: bool) -> Prepared:
        """Tokenized training / evaluation data, collator, callbacks, teacher outputs."""

    @abc.abstractmethod
    def eval_settings(self, recipe) -> tuple[str, dict]:
        """``(split, settings)``: the split a run is scored on and the keyword settings of
        :meth:`measure` (columns, lengths, generation)."""

    @abc.abstractmethod
    def measure(self, model, tokenizer, dataset, model_dir: Optional[str], settings: dict) -> dict:
        """The figures of one model on ``dataset``."""

    @abc.abstractmethod
    def figures_key(self, recipe, dataset, settings: dict) -> str:
        """What the teacher's figures depend on besides its cache namespace (the data's
        contents, the settings, the threads), hashed."""

    def evaluate_teacher(self, recipe, raw, teachers: Teachers) -> dict:
        """The teacher's figures on the evaluation split, read from its cache namespace when
        measured before (the teacher is then not run)."""
        split, settings = self.eval_settings(recipe)

        def compute():
            return self.measure(teachers.models()[0], teachers.tokenizer, raw[split],
                                teachers.first_dir, settings)
        if not teachers.cache_namespace:
            return compute()
        return cached_figures(teachers.cache_namespace,
                              self.figures_key(recipe, raw[split], settings), compute)

    @abc.abstractmethod
    def evaluate(self, recipe, raw, teachers: Teachers, student_dir: str,
                 progress: bool, teacher_figures: Optional[dict] = None) -> tuple[dict, dict, str]:
        """``(teacher figures, student figures, split)`` of the saved student;
        ``teacher_figures``: the teacher's, already measured (:meth:`evaluate_teacher`)."""

    @abc.abstractmethod
    def compare(self, teacher: dict, student: dict) -> dict:
        """Ratios of the student to the teacher for ``results.json``: ``size_ratio`` (teacher
        bytes on disk / student bytes) and ``parameter_ratio`` always, plus the task's own."""

    @abc.abstractmethod
    def summary(self, results: dict) -> str:
        """A short human summary of a run's results."""

    @abc.abstractmethod
    def default_spec(self):
        """The data a model of this task is evaluated on when nothing names any."""

    @abc.abstractmethod
    def evaluate_dir(self, model_dir: str, recipe, spec, split: Optional[str],
                     max_length: Optional[int], latency: bool) -> dict:
        """``distilkit evaluate`` on a saved model of this task."""


def ratios(teacher: dict, student: dict) -> dict:
    """The two size figures every task reports, each named for what it divides."""
    return {
        "size_ratio": teacher["size_on_disk_bytes"] / max(student["size_on_disk_bytes"], 1),
        "parameter_ratio": teacher["parameters"] / max(student["parameters"], 1),
    }


def check_max_length(max_length: int, config) -> None:
    """``max_length`` must fit the teacher's learned positions (else the run trains and then
    fails in evaluation, or silently truncates differently for teacher and student)."""
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and max_length > limit:
        raise ValueError(f"max_length: {max_length} is longer than the teacher's {limit} "
                         f"positions; use max_length <= {limit}")


def check_keys(field_name: str, spec: dict, allowed: set) -> None:
    bad = sorted(set(spec) - allowed)
    if bad:
        raise ValueError(f"{field_name}: unknown key(s) {bad}; allowed here: {sorted(allowed)}")


def build_student(recipe, teacher, tokenizer, train_texts=None):
    """The student the recipe's ``student:`` asks for, and the tokenizer it reads with.

    ``teacher`` is a loaded model, or (for ``type: from_teacher``) the teacher's directory,
    whose weights are then read lazily, only the layers the student keeps."""
    from distilkit.students.init import student_from_config, student_from_teacher

    spec = dict(recipe.keys.student)
    kind = spec.pop("type", "from_teacher")
    lora = spec.pop("lora", None)
    if kind == "from_teacher":
        check_keys("student", spec, STUDENT_KEYS["from_teacher"])
        student = student_from_teacher(teacher, **spec)
    elif kind == "config":
        student = student_from_config(teacher, **spec.get("config", {}),
                                      **({k: v for k, v in spec.items() if k != "config"}))
    elif kind == "pretrained":
        check_keys("student", spec, STUDENT_KEYS["pretrained"])
        from transformers import AutoTokenizer

        from distilkit.compress.base import load_compressed
        path = os.path.expanduser(spec["path"])
        student = load_compressed(path)
        if os.path.isfile(os.path.join(path, "tokenizer_config.json")):
            tokenizer = AutoTokenizer.from_pretrained(path)  # e.g. a BiLSTM's word vocabulary
    else:  # bilstm
        from distilkit.students.bilstm import build_bilstm_student
        student, tokenizer = build_bilstm_student(teacher, tokenizer, train_texts, **spec)
    if lora:
        from peft import LoraConfig, get_peft_model
        student = get_peft_model(student, LoraConfig(**lora))
    return student, tokenizer


def cached_figures(namespace: str, key: str, compute: Callable[[], dict]) -> dict:
    """The teacher's evaluation figures stored as ``teacher_figures-<key>.json`` in the
    teacher's cache ``namespace`` directory (beside its cached outputs): read back when there
    (marked ``figures_source: cached (...)``), else ``compute()``d and written atomically. An
    unreadable file is measured again and overwritten. The caller's ``key`` names everything
    the figures depend on (the evaluation data's contents, settings, threads)."""
    import json

    from distilkit.files import atomic_write_json

    path = os.path.join(namespace, f"teacher_figures-{key[:24]}.json")
    if os.path.isfile(path):
        try:
            with open(path) as f:
                return {**json.load(f), "figures_source": f"cached ({path})"}
        except (OSError, ValueError):
            pass  # unreadable: measure again, and overwrite it
    figures = compute()
    atomic_write_json(path, figures)
    return figures
