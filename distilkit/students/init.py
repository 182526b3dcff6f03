"""Students built from their teacher: copy the embeddings and a chosen subset of layers.

This is DistilBERT's initialisation (every other layer of the teacher) and the "shrink and
fine-tune" construction of distilled BART / Marian students (alternating decoder layers). It
works on any model whose layers sit in ``ModuleList``s (BERT family, T5, BART, Marian): a new
model of the teacher's class is built from a copy of its config with fewer layers, and every
tensor is copied from the teacher with the layer indices renumbered. Layer-0-only tensors (T5's
relative position bias) come from the teacher's first layer whichever layers are kept.
"""
from __future__ import annotations

import copy
import re
from typing import Optional, Sequence, Union

import torch
from torch import nn

# Config attributes that hold the depth of each stack, per family.
_DEPTH_ATTRS = {
    "encoder": ("num_hidden_layers", "num_layers", "encoder_layers", "n_layers"),
    "decoder": ("num_decoder_layers", "decoder_layers"),
}


def layer_stacks(model: nn.Module) -> dict[str, str]:
    """Qualified names of the encoder / decoder layer lists of a transformer."""
    stacks = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0 or not name:
            continue
        last = name.rsplit(".", 1)[-1]
        if last not in ("layer", "layers", "block"):
            continue
        kind = "decoder" if "decoder" in name else "encoder"
        if kind not in stacks or len(name) < len(stacks[kind]):
            stacks[kind] = name
    if not stacks:
        raise ValueError(f"{type(model).__name__}: found no layer list (encoder.layer, "
                         "layers or block); students from teachers support the BERT family, "
                         "T5, BART and Marian")
    return stacks


def pick_layers(n_teacher: int, n_student: int, strategy: str = "alternate") -> list[int]:
    """0-based teacher layers to keep: ``alternate`` spreads them evenly and keeps the last
    (DistilBERT / shrink-and-fine-tune), ``first`` keeps the first ones (PKD init), ``last`` the
    final ones."""
    if not 1 <= n_student <= n_teacher:
        raise ValueError(f"num_layers: {n_student} must be between 1 and the teacher's "
                         f"{n_teacher} layers")
    if strategy == "first":
        return list(range(n_student))
    if strategy == "last":
        return list(range(n_teacher - n_student, n_teacher))
    if strategy == "alternate":
        if n_student == 1:
            return [n_teacher - 1]
        step = (n_teacher - 1) / (n_student - 1)
        return sorted({round(i * step) for i in range(n_student)})
    raise ValueError(f"layer strategy {strategy!r}: use 'alternate', 'first' or 'last'")


def _set_depth(config, kind: str, n: int, n_teacher: int) -> None:
    touched = False
    for attr in _DEPTH_ATTRS[kind]:
        if getattr(config, attr, None) == n_teacher and attr in config.to_dict():
            setattr(config, attr, n)
            touched = True
    if not touched:
        raise ValueError(f"cannot find the {kind} depth in {type(config).__name__}")


def student_from_teacher(teacher: nn.Module,
                         keep_layers: Optional[Sequence[int]] = None,
                         num_layers: Optional[int] = None,
                         keep_decoder_layers: Optional[Sequence[int]] = None,
                         num_decoder_layers: Optional[int] = None,
                         strategy: str = "alternate") -> nn.Module:
    """A smaller copy of ``teacher`` with only some of its layers.

    Give ``keep_layers`` (0-based teacher layer indices, e.g. ``[0, 2, 4]``) or ``num_layers``
    with a ``strategy``; for encoder-decoder teachers the same for the decoder. Stacks not
    mentioned keep all their layers. Everything else (embeddings, pooler, head) is copied.
    """
    stacks = layer_stacks(teacher)
    keep: dict[str, list[int]] = {}
    asks = {"encoder": (keep_layers, num_layers), "decoder": (keep_decoder_layers, num_decoder_layers)}
    for kind, name in stacks.items():
        n_t = len(teacher.get_submodule(name))
        explicit, n = asks[kind]
        field = "keep_layers" if kind == "encoder" else "keep_decoder_layers"
        if explicit is not None:
            ks = sorted(int(i) for i in explicit)
            if not ks or ks[0] < 0 or ks[-1] >= n_t or len(set(ks)) != len(ks):
                raise ValueError(f"{field}: {list(explicit)} must be distinct layer indices in "
                                 f"0..{n_t - 1} (the teacher's {kind} has {n_t} layers)")
        elif n is not None:
            ks = pick_layers(n_t, n, strategy)
        else:
            ks = list(range(n_t))
        keep[kind] = ks
    cfg = copy.deepcopy(teacher.config)
    for kind, name in stacks.items():
        n_t = len(teacher.get_submodule(name))
        if len(keep[kind]) != n_t:
            _set_depth(cfg, kind, len(keep[kind]), n_t)
    student = type(teacher)(cfg)
    _copy_weights(teacher, student, stacks, keep)
    student.config.distilkit_init = {k: v for k, v in keep.items()}
    return student.train(teacher.training)


def _copy_weights(teacher, student, stacks, keep) -> None:
    t_state = teacher.state_dict()
    new_state = {}
    patterns = {kind: re.compile(rf"^{re.escape(name)}\.(\d+)\.(.*)$") for kind, name in stacks.items()}
    for key in student.state_dict():
        src = key
        for kind, pat in patterns.items():
            m = pat.match(key)
            if m:
                src = f"{stacks[kind]}.{keep[kind][int(m.group(1))]}.{m.group(2)}"
                if src not in t_state:  # layer-0-only tensors, e.g. T5 relative bias
                    src = f"{stacks[kind]}.0.{m.group(2)}"
                break
        if src not in t_state:
            raise ValueError(f"cannot find the teacher tensor for student tensor {key!r}")
        new_state[key] = t_state[src].clone()
    student.load_state_dict(new_state, strict=True)


def student_from_config(teacher_or_config, num_labels: Optional[int] = None, **overrides):
    """A fresh, randomly initialised student of the teacher's architecture with the given
    config overrides (e.g. ``num_hidden_layers=2, hidden_size=128``)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoModelForSeq2SeqLM

    base = getattr(teacher_or_config, "config", teacher_or_config)
    cfg = copy.deepcopy(base)
    unknown = [k for k in overrides if k not in cfg.to_dict()]
    if unknown:
        raise ValueError(f"student config: unknown field(s) {unknown} for {type(cfg).__name__}")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    if num_labels is not None:
        cfg.num_labels = num_labels
    cls = AutoModelForSeq2SeqLM if getattr(cfg, "is_encoder_decoder", False) else AutoModelForSequenceClassification
    return cls.from_config(cfg)
