"""Recipes: data-only YAML files that describe one distillation run.

Flat keys are either recipe keys (below), data keys (:class:`distilkit.data.DataSpec`) or
training keys (:class:`distilkit.DistilConfig`, i.e. every ``TrainingArguments`` field plus
the distillation settings). ``compression:`` is an ordered list of ``{method: NAME, ...}``
entries. Unknown keys are errors that suggest the closest valid key. YAML is read with
``safe_load``: a recipe can never import or call code.

Example::

    name: quickstart
    teacher: builtin:minilm-rt
    student: {type: from_teacher, num_layers: 3}
    dataset: builtin:rotten_tomatoes
    max_length: 64
    temperature: 2.0
    alpha_kd: 0.5
    alpha_ce: 0.5
    max_steps: 600
    compression:
      - {method: quantize, bits: 4, bucket_size: 256}
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Optional


from distilkit.data import DataSpec
from distilkit.values import coerce, load_yaml

STUDENT_TYPES = ("from_teacher", "config", "pretrained", "bilstm")


@dataclass
class RecipeKeys:
    """Keys of a recipe that are neither data nor training arguments."""

    name: str = "distil"
    task: str = "classification"
    teacher: Any = "builtin:minilm-rt"
    teacher_adapter: Optional[str] = None
    student: dict = field(default_factory=lambda: {"type": "from_teacher", "num_layers": 3})
    max_length: int = 64
    # classification: true caches the teacher's logits (distilkit.teacher_cache); seq2seq:
    # {top_k: N} caches its top-N distribution per target token (distilkit.seq2seq.topk_cache).
    teacher_cache: Any = False
    cache_dir: Optional[str] = None
    augment: Optional[dict] = None
    compression: list = field(default_factory=list)
    push_to_hub: bool = False
    hub_repo_id: Optional[str] = None
    save_merged_adapter: bool = True
    # task: seq2seq only (distilkit.tasks.seq2seq): sequence-level distillation
    # settings (SequenceKDSettings fields; null = train on the references) and decoding
    # settings for evaluation by generation (GenerationSettings fields).
    sequence_kd: Optional[dict] = None
    generation: Optional[dict] = None
    # After training, the student exported to ONNX beside it and measured in every runtime
    # (ExportSettings fields; true = the defaults; null = no export).
    export: Optional[dict] = None


EXPORT_FORMATS = ("onnx",)
SERVE_FILES = ("fp32", "int8", "4bit")   # the files an export writes, by their kind
QUANTIZE_METHODS = ("quantize", "ptq")


@dataclass
class ExportSettings:
    """A recipe's ``export:``: what ``distilkit export`` writes into ``student/onnx`` once the
    student is saved, and whether each runtime is then measured on the test split."""

    format: str = field(default="onnx", metadata={"help": "export format: onnx"})
    int8: bool = field(default=True, metadata={
        "help": "also write model_int8.onnx (onnxruntime dynamic int8 quantization)"})
    four_bit: bool = field(default=False, metadata={
        "help": "also write model_4bit.onnx from a 4-bit quantized student's packed codes "
                "(needs compression: [{method: quantize, bits: 4, ...}])"})
    serve: Optional[str] = field(default=None, metadata={
        "help": "the file to serve: fp32, int8 or 4bit (default: the 4-bit file when written, "
                "else int8 when its answers equalled PyTorch's on every check row, else fp32; "
                "with compression auto and a latency target in onnx / onnx_int8: that "
                "runtime's file)"})
    evaluate: bool = field(default=True, metadata={
        "help": "measure PyTorch fp32 and every ONNX file on the test split (accuracy and "
                "macro-F1, or BLEU by greedy generation for seq2seq; agreement with PyTorch, "
                "latency at batch 1 and 32, size) into results.json"})


def export_settings(value: Any, compression: Optional[list] = None,
                    task: str = "classification") -> Optional[ExportSettings]:
    """The settings of a recipe's ``export:`` (``None``/``false``: no export; ``true``: the
    defaults; a mapping of :class:`ExportSettings` fields), each value of its field's type, or
    one ValueError naming the key, the value and the fix. ``four_bit`` needs a 4-bit
    ``quantize``/``ptq`` step in ``compression`` (the packed codes it exports)."""
    if value is None or value is False:
        return None
    if value is True:
        value = {}
    if not isinstance(value, dict):
        raise ValueError(f"export: {value!r} must be a mapping like {{format: onnx, int8: true}}, "
                         "true (the defaults) or null")
    names = [f.name for f in dataclasses.fields(ExportSettings)]
    for k in value:
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"export: unknown key {k!r}{hint} (valid keys: {', '.join(names)})")
    s = ExportSettings(**{k: coerce(f"export.{k}", v, _hints(ExportSettings)[k])
                          for k, v in value.items()})
    if s.format not in EXPORT_FORMATS:
        raise ValueError(f"export.format: {s.format!r} is not an export format; use "
                         f"{' or '.join(EXPORT_FORMATS)}")
    if s.four_bit and task == "seq2seq":
        raise ValueError("export.four_bit: the 4-bit MatMulNBits export is for classification "
                         "students; set four_bit: false for this seq2seq recipe (int8: true "
                         "quantizes it)")
    if s.four_bit:
        from distilkit.compress.base import config_from_dict

        four = [e for e in compression or [] if isinstance(e, dict)
                and e.get("method") in QUANTIZE_METHODS
                and getattr(config_from_dict(e), "bits", None) == 4]
        if not four:
            raise ValueError("export.four_bit: true exports a 4-bit quantized student's packed "
                             "codes, but this recipe's student is not quantized to 4 bits; add "
                             "{method: quantize, bits: 4} to compression, or set four_bit: "
                             "false (int8: true quantizes any student)")
    if s.serve is not None:
        if task == "seq2seq":
            raise ValueError("export.serve: a seq2seq export serves the variant its own check "
                             "picks (serve_variant in export.json); remove serve")
        if s.serve not in SERVE_FILES:
            raise ValueError(f"export.serve: {s.serve!r} is not an exported file; use one of "
                             f"{', '.join(SERVE_FILES)}")
        if (s.serve == "int8" and not s.int8) or (s.serve == "4bit" and not s.four_bit):
            flag = "int8" if s.serve == "int8" else "four_bit"
            raise ValueError(f"export.serve: {s.serve} names a file this export does not "
                             f"write; set {flag}: true, or serve another file")
    from distilkit.budget import budget_export_file

    served = budget_export_file(compression)
    if served and served[1] == "int8" and not s.int8:
        raise ValueError("export.int8: false, but compression[0] (auto) meets its latency "
                         "budget in runtime onnx_int8, which serves model_int8.onnx; set "
                         "int8: true (or runtime: onnx, whose budget model.onnx meets)")
    if served and s.serve is None:
        s = dataclasses.replace(s, serve=served[1])
    return s


@functools.lru_cache(maxsize=None)
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _distil_config_cls():
    from distilkit.config import DistilConfig

    return DistilConfig


def _training_fields() -> set:
    from distilkit.config import DistilConfig

    return {f.name for f in dataclasses.fields(DistilConfig) if f.init}


def _data_fields() -> set:
    return {f.name for f in dataclasses.fields(DataSpec)}


def _recipe_fields() -> set:
    return {f.name for f in dataclasses.fields(RecipeKeys)}


# TrainingArguments' own names for the fields a recipe knows as data/recipe keys.
_RENAMED = {"teacher_model_name_or_path": "teacher"}
# DistilConfig fields a recipe sets as recipe keys (``teacher``, ``teacher_adapter``).
_AS_RECIPE_KEYS = ("teacher_model_name_or_path", "teacher_adapter")


def _distillation_defaults() -> dict:
    """The default of every field DistilConfig adds to TrainingArguments (the distillation
    settings), except those a recipe sets as recipe keys."""
    from transformers import TrainingArguments

    from distilkit.config import DistilConfig

    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    out = {}
    for f in dataclasses.fields(DistilConfig):
        if f.name in base or f.name in _AS_RECIPE_KEYS or not f.init:
            continue
        out[f.name] = (f.default_factory() if f.default_factory is not dataclasses.MISSING
                       else f.default)
    return out


def teacher_cache_setting(value: Any, task: str) -> Any:
    """A recipe's ``teacher_cache``: ``true``/``false`` (classification: cache the logits), or
    for ``task: seq2seq`` a mapping ``{top_k: N}`` (cache the teacher's N most likely tokens
    per target token), returned with its values as their types, or one ValueError naming the
    field, the value and the fix."""
    if not isinstance(value, dict):
        try:
            return bool(coerce("teacher_cache", value, bool))
        except ValueError as e:
            raise ValueError(f"{e} (or, for task: seq2seq, a mapping like {{top_k: 64}})") from None
    if task != "seq2seq":
        raise ValueError(f"teacher_cache: {value!r}: top_k is the token-level cache of task: "
                         "seq2seq; a classification recipe caches the full logits with "
                         "teacher_cache: true")
    unknown = sorted(set(value) - {"top_k"})
    if unknown or "top_k" not in value:
        raise ValueError(f"teacher_cache: {value!r} must be a mapping with one key, top_k "
                         f"(e.g. {{top_k: 64}}){f'; unknown key(s) {unknown}' if unknown else ''}")
    k = coerce("teacher_cache.top_k", value["top_k"], int)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"teacher_cache.top_k: {value['top_k']!r} must be a whole number >= 1 "
                         "(the teacher's most likely tokens kept per target token), e.g. 64")
    return {"top_k": k}


@dataclass
class Recipe:
    """A parsed, validated recipe. ``keys``/``data``/``training`` hold the three kinds of
    fields; :meth:`distil_config` builds the ``DistilConfig`` (validating it)."""

    keys: RecipeKeys
    data: DataSpec
    training: dict
    source: Optional[str] = None

    @classmethod
    def from_dict(cls, raw: dict, source: Optional[str] = None) -> "Recipe":
        if not isinstance(raw, dict):
            raise ValueError(f"{source or 'recipe'}: a recipe is a mapping of keys to values, "
                             f"got {type(raw).__name__}")
        rk, dk, tk = _recipe_fields(), _data_fields(), _training_fields()
        keys, data, training = {}, {}, {}
        for k, v in raw.items():
            if k in rk:
                keys[k] = coerce(k, v, _hints(RecipeKeys)[k])
            elif k in dk:
                data[k] = coerce(k, v, _hints(DataSpec)[k])
            elif k in tk and k not in _RENAMED:
                training[k] = coerce(k, v, _hints(_distil_config_cls())[k])
            else:
                close = difflib.get_close_matches(k, sorted(rk | dk | (tk - set(_RENAMED))), n=3)
                hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
                raise ValueError(f"{source or 'recipe'}: unknown key {k!r}{hint} (recipe keys: "
                                 f"{', '.join(sorted(rk))}; data keys: {', '.join(sorted(dk))}; "
                                 "or any DistilConfig / TrainingArguments field)")
        recipe = cls(RecipeKeys(**keys), DataSpec(**data), training, source)
        recipe.validate()
        return recipe

    @classmethod
    def load(cls, path: str, overrides: Optional[dict] = None) -> "Recipe":
        """Read a YAML recipe and apply ``overrides`` (dotted keys reach into ``student``)."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"recipe {path!r} does not exist")
        with open(path, encoding="utf-8") as f:
            raw = load_yaml(f.read(), path)
        if raw is None:
            # An empty file would otherwise start a full default run somewhere unexpected.
            raise ValueError(f"recipe {path!r} is empty; give at least the teacher and the data "
                             "(copy recipes/quickstart.yaml or recipes/my_csv.yaml to start)")
        for k, v in (overrides or {}).items():
            apply_override(raw, k, v)
        return cls.from_dict(raw, source=path)

    def validate(self) -> None:
        """Every check that needs no model or data, so bad input fails before any work."""
        k = self.keys
        if k.task not in ("classification", "seq2seq"):
            raise ValueError(f"task: {k.task!r} must be 'classification' or 'seq2seq'")
        if not isinstance(k.student, dict) or k.student.get("type", "from_teacher") not in STUDENT_TYPES:
            raise ValueError(f"student: {k.student!r} needs a 'type' among {STUDENT_TYPES}")
        k.teacher_cache = teacher_cache_setting(k.teacher_cache, k.task)
        # Keys of the other task would be silently ignored: say so instead.
        if k.task == "seq2seq":
            if k.teacher_cache is True:
                raise ValueError("teacher_cache: true applies to task: classification (cached "
                                 "logits); a seq2seq recipe caches the teacher's top-k token "
                                 "distribution with teacher_cache: {top_k: 64} (token-level KD) "
                                 "and its generations with sequence_kd: {...}")
            if k.augment:
                raise ValueError("augment: applies to task: classification (a BiLSTM transfer "
                                 "set); remove it from this seq2seq recipe")
        else:
            for name in ("sequence_kd", "generation"):
                if getattr(k, name):
                    raise ValueError(f"{name}: applies to task: seq2seq only; add task: seq2seq "
                                     f"or remove {name}")
        from distilkit.finetune import parse_teacher_spec
        for i, t in enumerate(k.teacher if isinstance(k.teacher, list) else [k.teacher]):
            # a teacher to fine-tune: its settings checked now, not after the data is loaded
            parse_teacher_spec(t, "teacher" if not isinstance(k.teacher, list) else f"teacher[{i}]")
        if not isinstance(k.max_length, int) or k.max_length < 2:
            raise ValueError(f"max_length: {k.max_length!r} must be an integer >= 2")
        if not isinstance(k.compression, list):
            raise ValueError(f"compression: must be a list of {{method: NAME, ...}} entries, got {k.compression!r}")
        if k.compression:
            from distilkit.budget import split_auto
            from distilkit.compress.base import check_order, config_from_dict
            # A leading {method: auto, target: ...} is the budget search's (distilkit.budget);
            # each other entry raises naming the method or field; then an order that cannot work.
            _, rest = split_auto(k.compression, k.max_length, k.task, k.student,
                                 self.data.streaming)
            check_order([config_from_dict(entry) for entry in rest])
        if k.compression and isinstance(k.student, dict) and k.student.get("lora") \
                and not k.save_merged_adapter:
            raise ValueError("save_merged_adapter: false keeps the LoRA adapter unmerged, but "
                             "compression needs the merged weights to finalize; set "
                             "save_merged_adapter: true or remove compression")
        # Resolved to every field, so recipe.yaml and the card say what was exported.
        settings = export_settings(k.export, k.compression, k.task)
        k.export = dataclasses.asdict(settings) if settings else None
        if k.push_to_hub and not k.hub_repo_id:
            raise ValueError("push_to_hub: true needs hub_repo_id: ORG/NAME")
        self.distil_config()

    def distil_config(self, **extra):
        from distilkit.config import DistilConfig

        t = {"output_dir": f"runs/{self.keys.name}", "report_to": [], "save_strategy": "no",
             "logging_steps": 50, **self.training, **extra}
        if "use_cpu" not in t and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import torch
            # Launched as several processes on a machine without GPUs: they must join one
            # CPU (gloo) process group rather than each train alone.
            t["use_cpu"] = not torch.cuda.is_available()
        return DistilConfig(**t)

    def to_dict(self) -> dict:
        """The resolved recipe (all three kinds of keys), as written beside each run. Every
        distillation setting is there with the value the run used, including those left at
        their defaults (the loss weights, the temperature), so the card and ``results.json``
        say what was trained; other ``TrainingArguments`` appear only when the recipe set them."""
        out = dataclasses.asdict(self.keys)
        out.update(dataclasses.asdict(self.data))
        out.update(_distillation_defaults())
        out.update(self.training)
        return out


def parse_value(text: str) -> Any:
    """A command-line override value, read as a recipe value is (``1e-3``, ``true``, ``no``,
    ``[0, 2]``); its field's type is applied when the recipe is built."""
    return load_yaml(text, f"value {text!r}")


def apply_override(raw: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    d = raw
    for p in parts[:-1]:
        if not isinstance(d.get(p), dict):
            d[p] = {}
        d = d[p]
    d[parts[-1]] = value
