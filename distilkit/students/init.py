"""Students built from their teacher: copy the embeddings and a chosen subset of layers.

This is DistilBERT's initialisation (every other layer of the teacher) and the "shrink and
fine-tune" construction of distilled BART / Marian students (alternating decoder layers). It
works on any model whose layers sit in ``ModuleList``s (BERT family, T5, BART, Marian): a new
model of the teacher's class is built from a copy of its config with fewer layers, and every
tensor is copied from the teacher with the layer indices renumbered. Layer-0-only tensors (T5's
relative position bias) come from the teacher's first layer whichever layers are kept.

Given a teacher *directory* instead of a model, the student is built from the saved config and
filled tensor by tensor from the safetensors files (``safe_open``), so the teacher is never
held in memory: a run whose teacher outputs are all cached need not load it.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
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


def _config_depths(config) -> dict[str, int]:
    """Depth of each stack as the config states it (used when there is no model to count)."""
    fields = config.to_dict()
    depths = {}
    for kind, attrs in _DEPTH_ATTRS.items():
        for attr in attrs:
            if isinstance(fields.get(attr), int):
                depths[kind] = fields[attr]
                break
    return depths


def _choose_layers(depths: dict[str, int], asks: dict, strategy: str) -> dict[str, list[int]]:
    """The teacher layers each stack keeps, from ``keep_*`` indices or a ``num_*`` count."""
    keep: dict[str, list[int]] = {}
    for kind, n_t in depths.items():
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
    return keep


def _student_config(teacher_config, depths: dict[str, int], keep: dict[str, list[int]]):
    cfg = copy.deepcopy(teacher_config)
    for kind, n_t in depths.items():
        if len(keep[kind]) != n_t:
            _set_depth(cfg, kind, len(keep[kind]), n_t)
    return cfg


def student_from_teacher(teacher: Union[nn.Module, str, os.PathLike],
                         keep_layers: Optional[Sequence[int]] = None,
                         num_layers: Optional[int] = None,
                         keep_decoder_layers: Optional[Sequence[int]] = None,
                         num_decoder_layers: Optional[int] = None,
                         strategy: str = "alternate") -> nn.Module:
    """A smaller copy of ``teacher`` with only some of its layers.

    Give ``keep_layers`` (0-based teacher layer indices, e.g. ``[0, 2, 4]``) or ``num_layers``
    with a ``strategy``; for encoder-decoder teachers the same for the decoder. Stacks not
    mentioned keep all their layers. Everything else (embeddings, pooler, head) is copied.

    ``teacher`` is a model, or a directory saved with ``save_pretrained`` (safetensors,
    single or sharded): then the teacher is never built, only the tensors the student keeps
    are read from disk, and the student is the one the loaded teacher would give (in eval
    mode, as a loaded teacher is), so a run whose teacher outputs are all cached need not
    load the teacher at all.
    """
    asks = {"encoder": (keep_layers, num_layers), "decoder": (keep_decoder_layers, num_decoder_layers)}
    if isinstance(teacher, (str, os.PathLike)):
        from distilkit.compress.base import load_compressed, read_records

        path = os.path.expanduser(os.fspath(teacher))
        if not os.path.isdir(path):
            raise FileNotFoundError(f"teacher: {path!r} is not a directory; give a model or a "
                                    "directory saved with save_pretrained")
        if not read_records(path):
            return _student_from_dir(path, asks, strategy)
        # A compressed teacher's tensors are the shapes and modules its methods left (packed,
        # factorised, pruned), which only the methods' restore() rebuilds: load it whole.
        teacher = load_compressed(path)
    stacks = layer_stacks(teacher)
    depths = {kind: len(teacher.get_submodule(name)) for kind, name in stacks.items()}
    keep = _choose_layers(depths, asks, strategy)
    student = type(teacher)(_student_config(teacher.config, depths, keep))
    t_state = teacher.state_dict()
    _copy_weights(student, keep, t_state.keys(), t_state.__getitem__)
    student.config.distilkit_init = {k: v for k, v in keep.items()}
    return student.train(teacher.training)


def _student_from_dir(path: str, asks: dict, strategy: str) -> nn.Module:
    """The student of the teacher saved in ``path``, its tensors read one by one from disk."""
    from transformers import AutoConfig

    from distilkit.compress.base import default_auto_class
    from distilkit.modeling import ensure_registered

    ensure_registered()
    config = AutoConfig.from_pretrained(path)
    auto_cls = default_auto_class(config)  # the head a run loads the teacher with
    try:
        cls = auto_cls._model_mapping[type(config)]
    except KeyError:
        raise ValueError(f"teacher: {path!r} holds a {type(config).__name__}, which "
                         f"{auto_cls.__name__} cannot load") from None
    depths = _config_depths(config)
    keep = _choose_layers(depths, asks, strategy)
    # Built like the eager path's type(teacher)(config): same class, default dtype.
    student = cls(_student_config(config, depths, keep))
    if set(layer_stacks(student)) != set(depths):
        raise ValueError(f"teacher: {path!r}: the config's layer counts {depths} do not match "
                         f"the layer lists of {cls.__name__}")
    with _saved_tensors(path) as (names, read):
        _copy_weights(student, keep, names, read)
    student.config.distilkit_init = {k: v for k, v in keep.items()}
    return student.eval()


@contextlib.contextmanager
def _saved_tensors(path: str):
    """``(names, read)``: the tensor names saved in ``path`` (``model.safetensors`` or the
    shards of its index) and a function reading one tensor; files are opened on first use
    and only the tensors asked for are loaded."""
    import safetensors  # looked up at call time, so tests can watch what is read

    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    with contextlib.ExitStack() as stack:
        handles: dict[str, object] = {}

        def handle(file: str):
            if file not in handles:
                handles[file] = stack.enter_context(safetensors.safe_open(file, framework="pt"))
            return handles[file]

        if os.path.isfile(single):
            where = dict.fromkeys(handle(single).keys(), single)
        elif os.path.isfile(index):
            with open(index) as f:
                where = {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
        else:
            raise FileNotFoundError(f"teacher: {path!r} has no model.safetensors (or index); "
                                    "save it with save_pretrained or pass the loaded model")
        yield where.keys(), lambda name: handle(where[name]).get_tensor(name)


def _copy_weights(student: nn.Module, keep: dict[str, list[int]], names, read) -> None:
    """Fill every student tensor from the teacher tensor it comes from: ``names`` are the
    teacher's tensor names, ``read(name)`` returns one."""
    stacks = layer_stacks(student)  # the same names as the teacher's: same class
    patterns = {kind: re.compile(rf"^{re.escape(name)}\.(\d+)\.(.*)$") for kind, name in stacks.items()}
    own = student.state_dict(keep_vars=True)
    new_state, unread = {}, {}
    for key in own:
        src = key
        for kind, pat in patterns.items():
            m = pat.match(key)
            if m:
                src = f"{stacks[kind]}.{keep[kind][int(m.group(1))]}.{m.group(2)}"
                if src not in names:  # layer-0-only tensors, e.g. T5 relative bias
                    src = f"{stacks[kind]}.0.{m.group(2)}"
                break
        if src in names:
            new_state[key] = read(src)
        else:
            unread[key] = src
    # save_pretrained stores tied tensors (shared embeddings, LM head) once: a tensor missing
    # from the files is fine when the student ties it to one that was read.
    for key, src in unread.items():
        if not any(own[other] is own[key] for other in new_state):
            raise ValueError(f"cannot find the teacher tensor {src!r} for student tensor {key!r}")
    missing, unexpected = student.load_state_dict(new_state, strict=False)
    assert set(missing) == set(unread) and not unexpected, (missing, unexpected)


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
