"""The compression framework: one registry, one module walker, one save/load path.

A compression *method* is a config dataclass plus a :class:`Method` handler. Applying it is
in place (``compress_(model, config)``) and returns a JSON-serialisable *record* of what was
done. The records are kept on the model (``model.distilkit_compression``) and written to
``compression_config.json`` beside the weights, so that :func:`load_compressed` can rebuild
the model's changed shapes (pruned heads, factorized layers, packed low-bit weights) from its
config *before* loading the state dict, strictly.

Lifecycle of a method inside a distillation run:

1. ``apply``: before training (prune, factorize, swap in fake-quant modules). May use the
   :class:`CompressionContext` (a data loader and a loss for importance scores).
2. ``callbacks``: ``TrainerCallback`` objects that act during training (schedules).
3. ``finalize``: after training (e.g. quantization's convert step to real low-bit weights).
4. ``restore``: at load time, rebuild the shapes described by the record, without data.
"""
from __future__ import annotations

import abc
import dataclasses
import fnmatch
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Optional

import torch
from torch import nn

COMPRESSION_FILE = "compression_config.json"
RECORDS_ATTR = "distilkit_compression"


@dataclass
class CompressionContext:
    """What a method may need from the run it is part of.

    ``dataloader`` yields batches (dicts of tensors) for importance scores; ``loss_fn(model,
    batch) -> scalar`` is the loss those scores are taken against (task loss or the
    distillation loss); ``teacher`` is the teacher model when there is one.
    """

    dataloader: Optional[Iterable[dict]] = None
    loss_fn: Optional[Callable[[nn.Module, dict], torch.Tensor]] = None
    teacher: Optional[nn.Module] = None
    max_batches: Optional[int] = None


class Method(abc.ABC):
    """Base class of a compression method handler. Subclass, set ``name`` and
    ``config_cls``, implement ``apply`` and ``restore``, and decorate with :func:`register`."""

    name: ClassVar[str] = ""
    config_cls: ClassVar[type] = object
    citation: ClassVar[str] = ""

    @abc.abstractmethod
    def apply(self, model: nn.Module, config: Any, ctx: CompressionContext) -> dict:
        """Compress ``model`` in place; return the record that ``restore`` needs."""

    @abc.abstractmethod
    def restore(self, model: nn.Module, record: dict) -> None:
        """Rebuild the shapes described by ``record`` on a freshly built model."""

    def callbacks(self, model: nn.Module, config: Any, ctx: CompressionContext) -> list:
        return []

    def finalize(self, model: nn.Module, config: Any, record: dict) -> dict:
        return record


_BY_NAME: dict[str, Method] = {}
_BY_CONFIG: dict[type, Method] = {}


def register(method_cls: type) -> type:
    """Class decorator: make a :class:`Method` reachable by its name (recipes) and by its
    config class (``compress_``)."""
    inst = method_cls()
    if not inst.name:
        raise ValueError(f"{method_cls.__name__} has no name")
    _BY_NAME[inst.name] = inst
    _BY_CONFIG[inst.config_cls] = inst
    return method_cls


def _ensure_builtin_methods() -> None:
    # Imported here, not at package import, so that ``import distilkit`` stays light and
    # each method file registers itself once.
    from distilkit.compress import _builtin  # noqa: F401


def method_names() -> list[str]:
    _ensure_builtin_methods()
    return sorted(_BY_NAME)


def get_method(name_or_config: Any) -> Method:
    """The handler for a method name (``"quantize"``) or a config instance."""
    _ensure_builtin_methods()
    if isinstance(name_or_config, str):
        if name_or_config not in _BY_NAME:
            raise ValueError(
                f"compression method {name_or_config!r} is unknown; "
                f"known methods: {', '.join(sorted(_BY_NAME))}"
            )
        return _BY_NAME[name_or_config]
    cls = type(name_or_config)
    if cls not in _BY_CONFIG:
        raise TypeError(f"{cls.__name__} is not a registered compression config")
    return _BY_CONFIG[cls]


def config_from_dict(entry: dict) -> Any:
    """Build a method's config from a recipe entry ``{method: NAME, field: value, ...}``.
    Unknown fields are an error that lists the valid ones."""
    if not isinstance(entry, dict) or "method" not in entry:
        raise ValueError(
            f"compression entry {entry!r} needs a 'method' key; known methods: "
            f"{', '.join(method_names())}"
        )
    entry = dict(entry)
    method = get_method(entry.pop("method"))
    names = {f.name for f in dataclasses.fields(method.config_cls)}
    unknown = sorted(set(entry) - names)
    if unknown:
        raise ValueError(
            f"compression method {method.name!r}: unknown field(s) {unknown}; "
            f"valid fields: {sorted(names)}"
        )
    return method.config_cls(**entry)


def config_to_dict(config: Any) -> dict:
    return {"method": get_method(config).name, **dataclasses.asdict(config)}


def _records(model: nn.Module) -> list:
    if not hasattr(model, RECORDS_ATTR):
        object.__setattr__(model, RECORDS_ATTR, [])
    return getattr(model, RECORDS_ATTR)


def compress_(model: nn.Module, config: Any, ctx: Optional[CompressionContext] = None) -> dict:
    """Apply one compression method to ``model`` in place and remember its record, so
    that :func:`save_compressed` / :func:`load_compressed` round-trip the result."""
    method = get_method(config)
    record = method.apply(model, config, ctx or CompressionContext())
    record = {"method": method.name, "config": dataclasses.asdict(config), **(record or {})}
    _records(model).append(record)
    return record


def finalize_(model: nn.Module) -> None:
    """Run every applied method's ``finalize`` step (e.g. quantization's convert) in order."""
    records = _records(model)
    for i, rec in enumerate(records):
        method = get_method(rec["method"])
        cfg = method.config_cls(**rec["config"])
        records[i] = {**method.finalize(model, cfg, rec), "method": method.name,
                      "config": rec["config"]}


def compression_records(model: nn.Module) -> list:
    """The records of the methods applied to ``model`` (empty when none)."""
    return list(getattr(model, RECORDS_ATTR, []))


# ---------------------------------------------------------------------------------------
# The one module walker
# ---------------------------------------------------------------------------------------

def select_modules(
    model: nn.Module,
    include: Optional[Iterable[str]] = None,
    exclude: Iterable[str] = (),
    types: tuple = (nn.Linear,),
    field_name: str = "include",
) -> list[tuple[str, nn.Module]]:
    """Modules of ``types`` whose qualified name matches a glob in ``include`` (all when
    None) and none in ``exclude``. A pattern in ``include`` that matches no module of those
    types is an error naming the modules that exist, so typos fail before any work."""
    candidates = [(n, m) for n, m in model.named_modules() if n and isinstance(m, types)]
    chosen = candidates
    if include is not None:
        include = list(include)
        for pat in include:
            if not any(fnmatch.fnmatchcase(n, pat) for n, _ in candidates):
                names = [n for n, _ in candidates]
                shown = ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")
                raise ValueError(
                    f"{field_name}: pattern {pat!r} matches no "
                    f"{'/'.join(t.__name__ for t in types)} module; modules that exist: {shown}"
                )
        chosen = [(n, m) for n, m in candidates
                  if any(fnmatch.fnmatchcase(n, p) for p in include)]
    exclude = list(exclude)
    return [(n, m) for n, m in chosen if not any(fnmatch.fnmatchcase(n, p) for p in exclude)]


def set_module(model: nn.Module, fqn: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path ``fqn``."""
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


# ---------------------------------------------------------------------------------------
# Save and load
# ---------------------------------------------------------------------------------------

def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def save_compressed(model: nn.Module, out_dir: str, **save_kwargs) -> None:
    """``save_pretrained`` plus ``compression_config.json`` with the applied records."""
    model.save_pretrained(out_dir, **save_kwargs)
    records = compression_records(model)
    if records:
        _atomic_write_text(os.path.join(out_dir, COMPRESSION_FILE),
                           json.dumps({"records": records}, indent=2))


def read_records(path: str) -> list:
    f = os.path.join(path, COMPRESSION_FILE)
    if not os.path.isfile(f):
        return []
    with open(f) as fh:
        return json.load(fh)["records"]


def load_compressed(path: str, auto_cls: Any = None, **kwargs) -> nn.Module:
    """Load a model saved by :func:`save_compressed` (or a plain ``save_pretrained`` one);
    ``auto_cls`` defaults to :func:`default_auto_class` of the saved config.

    The architecture is built from the saved config, each record's ``restore`` rebuilds the
    shapes the method changed, then the saved tensors are loaded strictly: a mismatch between
    the metadata and the tensors is an error, never a silent partial load.
    """
    from transformers import AutoConfig

    from distilkit.modeling import ensure_registered, load_state_dict_from_dir

    ensure_registered()
    config = AutoConfig.from_pretrained(path)
    auto_cls = auto_cls or default_auto_class(config)
    records = read_records(path)
    if not records:
        return auto_cls.from_pretrained(path, **kwargs)
    model = auto_cls.from_config(config)
    for rec in records:
        get_method(rec["method"]).restore(model, rec)
    state = load_state_dict_from_dir(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied weights are saved once; anything else missing or extra means the metadata and the
    # tensors disagree.
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not _is_tied(model, k)]
    # Tensors the model class never saves (e.g. Marian's sinusoidal positions, rebuilt by
    # from_config) are declared by transformers as regexes in _keys_to_ignore_on_load_missing.
    ignore = getattr(model, "_keys_to_ignore_on_load_missing", None) or []
    missing = [k for k in missing if not any(re.search(p, k) for p in ignore)]
    if missing or unexpected:
        raise ValueError(
            f"{path}: {COMPRESSION_FILE} does not match the saved tensors "
            f"(missing: {missing[:8]}, unexpected: {unexpected[:8]})"
        )
    object.__setattr__(model, RECORDS_ATTR, records)
    model.eval()
    return model


def default_auto_class(config):
    """The Auto class distilkit's outputs load with: seq2seq LM for encoder-decoder configs,
    sequence classification otherwise (BiLSTM students included, once registered)."""
    from transformers import AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    if getattr(config, "is_encoder_decoder", False):
        return AutoModelForSeq2SeqLM
    return AutoModelForSequenceClassification


def _is_tied(model: nn.Module, key: str) -> bool:
    # A key is tied when its tensor is the same object as another already-loaded parameter.
    try:
        t = model.get_parameter(key)
    except AttributeError:
        return False
    return any(p is t for n, p in model.named_parameters(remove_duplicate=False) if n != key)


def from_pretrained(path: str, auto_cls: Any = None, **kwargs) -> nn.Module:
    """Load any model distilkit saved (compressed or not, BiLSTM students included): the
    ``from_pretrained`` of distilkit's outputs. Same as :func:`load_compressed`."""
    return load_compressed(path, auto_cls=auto_cls, **kwargs)
