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

Order. Each method declares what it ``needs`` from the model the earlier methods leave, what
it ``replaces`` (so later methods can no longer rely on it) and what it ``keeps`` needing
until its ``finalize`` (so later methods must not replace it). :func:`check_order` refuses a
list of configs that breaks one of these, naming both methods and the order that works;
``compress_`` does the same against the records already on the model, before any work.

Wrappers. Records live on the model itself, never on a wrapper: :func:`unwrap` goes through
DDP / accelerate (``.module``) and peft (``get_base_model()``), so they survive
``merge_and_unload``. A layer wrapped by a peft adapter is named (and targeted) by the
adapter layer's name, the name it has again once the adapter is merged; the adapter's own
modules (``lora_A``, ``lora_B``, ...) are never targets.
"""
from __future__ import annotations

import abc
import contextlib
import dataclasses
import fnmatch
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Optional

import torch
from torch import nn

from distilkit.device import model_device, to_device
from distilkit.files import atomic_write_text

COMPRESSION_FILE = "compression_config.json"
RECORDS_ATTR = "distilkit_compression"


@dataclass
class CompressionContext:
    """What a method may need from the run it is part of.

    ``dataloader`` yields batches (dicts of tensors) for importance scores; ``loss_fn(model,
    batch) -> scalar`` is the loss those scores are taken against (task loss or the
    distillation loss); ``teacher`` is the teacher model when there is one; ``tokenizer``
    the student's (its special tokens, for vocabulary pruning).
    """

    dataloader: Optional[Iterable[dict]] = None
    loss_fn: Optional[Callable[[nn.Module, dict], torch.Tensor]] = None
    teacher: Optional[nn.Module] = None
    max_batches: Optional[int] = None
    tokenizer: Any = None


def batches_on_device(model: nn.Module, ctx: CompressionContext,
                      limit: Optional[int] = None) -> Iterable[dict]:
    """The context's batches (at most ``limit`` and ``ctx.max_batches``), each moved to the
    model's own device (data-driven scores must not feed a GPU model host tensors)."""
    if ctx is None or ctx.dataloader is None:
        raise ValueError("gradient importance needs data: pass CompressionContext(dataloader=...) "
                         "or choose a data-free importance ('weight' for heads, 'l1' for neurons)")
    limits = [n for n in (limit, ctx.max_batches) if n is not None]
    device = model_device(model)
    for i, batch in enumerate(ctx.dataloader):
        if limits and i >= min(limits):
            break
        yield to_device(batch, device)


# What a method can need from the model the earlier methods leave. Each entry: the noun
# used in error messages and the verb for what a method that breaks it does.
CAPABILITIES = {
    # Every nn.Linear a later method may select is plain (not fake-quantized or packed, which
    # still pass ``isinstance(m, nn.Linear)``) and free (not held by magnitude's masks).
    "plain_linear": ("plain nn.Linear layers", "replaces"),
    # The attention and FFN projections that structured pruning slices by name are nn.Linear.
    "named_linears": ("the attention and feed-forward projections as nn.Linear layers",
                      "replaces"),
    # Module names inside the layer stacks still denote the modules an earlier record named.
    "layer_names": ("each layer at the name it had", "renumbers"),
    "plain_lstm": ("plain nn.LSTM modules", "replaces"),
    "plain_embedding": ("a plain nn.Embedding as the input word embedding", "replaces"),
}


class Method(abc.ABC):
    """Base class of a compression method handler. Subclass, set ``name`` and
    ``config_cls``, implement ``apply`` and ``restore``, and decorate with :func:`register`.

    Declare how it composes with the methods before and after it (keys of
    :data:`CAPABILITIES`): ``needs`` (must hold when it is applied), ``replaces`` (no longer
    holds once it is applied, including after its ``finalize`` and at load time) and
    ``keeps`` (must still hold until its ``finalize`` runs after training). Override
    :meth:`replaced` when what it replaces depends on its config. ``post_training``: a run
    applies it to the trained student, after training (post-training quantization), not to
    the student it is about to train.
    """

    name: ClassVar[str] = ""
    config_cls: ClassVar[type] = object
    citation: ClassVar[str] = ""
    needs: ClassVar[frozenset] = frozenset()
    replaces: ClassVar[frozenset] = frozenset()
    keeps: ClassVar[frozenset] = frozenset()
    post_training: ClassVar[bool] = False

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

    def finalize_tokenizer(self, model: nn.Module, config: Any, record: dict, tokenizer: Any
                           ) -> tuple[Any, dict]:
        """After :meth:`finalize`: the tokenizer to save with the model and the updated record
        (default: both unchanged). A method that changes which ids the model reads (e.g.
        ``prune_vocab`` shrinking the vocabulary) changes model and tokenizer together here."""
        return tokenizer, record

    def undo_config(self, config: Any, record: dict) -> None:
        """Set the model ``config`` back to what it was before this method ran (e.g. the
        depth ``prune_layers`` changed). :func:`load_compressed` builds the model from the
        config as it was before the first record, then replays every ``restore`` in order."""

    def replaced(self, config: Any) -> frozenset:
        """What this method, with ``config``, replaces (default: :attr:`replaces`)."""
        return self.replaces


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


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / accelerate (``.module``), ``torch.compile`` (``._orig_mod``) and
    peft (``get_base_model()``) wrappers: where compression records live and what module names
    are relative to."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
        elif _is_peft_model(model):
            model = model.get_base_model()
        else:
            return model


def _is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None))


def _records(model: nn.Module) -> list:
    model = unwrap(model)
    if not hasattr(model, RECORDS_ATTR):
        object.__setattr__(model, RECORDS_ATTR, [])
    return getattr(model, RECORDS_ATTR)


def _order_reason(first: Method, first_cfg: Any, second: Method, second_cfg: Any
                  ) -> Optional[str]:
    """Why ``second`` cannot follow ``first``, or None when it can."""
    broken = sorted(second.needs & first.replaced(first_cfg))
    if broken:
        noun, verb = CAPABILITIES[broken[0]]
        return f"{second.name} needs {noun}, which {first.name} {verb}"
    broken = sorted(first.keeps & second.replaced(second_cfg))
    if broken:
        noun, verb = CAPABILITIES[broken[0]]
        return (f"{first.name} needs {noun} until it finalizes after training, which "
                f"{second.name} {verb}")
    return None


def order_error(first_cfg: Any, second_cfg: Any) -> Optional[str]:
    """The one-line error for applying ``second_cfg`` after ``first_cfg``, naming both
    methods and the order that works; None when this order works."""
    first, second = get_method(first_cfg), get_method(second_cfg)
    why = _order_reason(first, first_cfg, second, second_cfg)
    if why is None:
        return None
    if first.name == second.name:
        fix = f"apply {first.name} once"
    elif _order_reason(second, second_cfg, first, first_cfg) is None:
        fix = f"put {second.name} before {first.name}"
    else:
        fix = f"no order of {first.name} and {second.name} works: keep one of them"
    return f"compression: {second.name} after {first.name} cannot work: {why}; {fix}"


def check_order(configs: Iterable[Any]) -> None:
    """Refuse (``ValueError``) a list of method configs, in the order they would be
    applied, in which a method cannot work after an earlier one. Pure: needs no model."""
    configs = list(configs)
    for j, later in enumerate(configs):
        for earlier in configs[:j]:
            msg = order_error(earlier, later)
            if msg:
                raise ValueError(msg)


def compress_(model: nn.Module, config: Any, ctx: Optional[CompressionContext] = None) -> dict:
    """Apply one compression method to ``model`` in place and remember its record, so
    that :func:`save_compressed` / :func:`load_compressed` round-trip the result.

    ``model`` may be wrapped (peft, DDP): the method works on, and the record is kept on,
    the model inside. An order that cannot work after the records already there is refused
    before anything changes."""
    method = get_method(config)
    records = _records(model)
    for rec in records:
        earlier = get_method(rec["method"])
        msg = order_error(earlier.config_cls(**rec["config"]), config)
        if msg:
            raise ValueError(msg)
    record = method.apply(unwrap(model), config, ctx or CompressionContext())
    record = {"method": method.name, "config": dataclasses.asdict(config), **(record or {})}
    records.append(record)
    return record


def finalize_(model: nn.Module, tokenizer: Any = None) -> Any:
    """Run every applied method's ``finalize`` step (e.g. quantization's convert) in order.
    Given the run's ``tokenizer``, also each method's ``finalize_tokenizer`` step, and return
    the tokenizer to save beside the model (the same one unless a method changed the ids the
    model reads, as ``prune_vocab`` does); without one, return None and leave every method's
    input ids as they are."""
    records = _records(model)
    base = unwrap(model)
    for i, rec in enumerate(records):
        method = get_method(rec["method"])
        cfg = method.config_cls(**rec["config"])
        records[i] = {**method.finalize(base, cfg, rec), "method": method.name,
                      "config": rec["config"]}
    if tokenizer is None:
        return None
    for i, rec in enumerate(records):
        method = get_method(rec["method"])
        tokenizer, new = method.finalize_tokenizer(base, method.config_cls(**rec["config"]),
                                                   rec, tokenizer)
        records[i] = {**new, "method": method.name, "config": rec["config"]}
    return tokenizer


def compression_records(model: nn.Module) -> list:
    """The records of the methods applied to ``model`` (empty when none)."""
    return list(getattr(unwrap(model), RECORDS_ATTR, []))


# ---------------------------------------------------------------------------------------
# The one module walker
# ---------------------------------------------------------------------------------------

@contextlib.contextmanager
def weights_replaced(model: nn.Module, new: dict):
    """Within the block, the ``weight`` of each module named in ``new`` ({name: f}) holds
    ``f(weight)``: what a method would store it as (its quantization, its truncated SVD),
    for an evaluation that judges the stored model; the original values are put back after
    it, also on error."""
    saved = {}
    try:
        with torch.no_grad():
            for name, f in new.items():
                w = model.get_submodule(name).weight
                saved[name] = w.detach().clone()
                w.copy_(f(w))
        yield model
    finally:
        with torch.no_grad():
            for name, w in saved.items():
                model.get_submodule(name).weight.copy_(w)


def is_plain_linear(module: nn.Module) -> bool:
    """True for a plain ``nn.Linear``: ``x @ weight.T + bias`` from its own Parameters.

    Fake-quantized (parametrized), packed and bitsandbytes linears still pass
    ``isinstance(m, nn.Linear)``, but each is its own subclass (a parametrized module's class
    is ``ParametrizedLinear``), so only the exact class counts; a peft adapter layer, a
    factorized or a sparse linear is not an ``nn.Linear`` at all."""
    return type(module) is nn.Linear


def is_peft_layer(module: nn.Module) -> bool:
    # peft's tuner layers and auxiliary wrappers (LoRA layers, modules_to_save) all declare
    # the names of the adapter submodules they hold; checked without importing peft.
    return hasattr(type(module), "adapter_layer_names")


def _is_mergeable_lora(module: nn.Module) -> bool:
    """A peft LoRA layer whose delta merges into its base layer's weight (``W + s B A``);
    weight-decomposed variants (DoRA) also rescale W, which fake quantization cannot follow."""
    return (is_peft_layer(module) and hasattr(module, "base_layer")
            and hasattr(module, "lora_A") and callable(getattr(module, "get_delta_weight", None))
            and not getattr(module, "lora_variant", None))


def get_target(model: nn.Module, name: str) -> nn.Module:
    """The module a compression record's ``name`` denotes: the module at ``name``, or the
    base layer of the peft adapter layer there (its name once the adapter is merged)."""
    module = model.get_submodule(name)
    while is_peft_layer(module) and hasattr(module, "base_layer"):
        module = module.base_layer
    return module


def adapter_layer(model: nn.Module, name: str) -> Optional[nn.Module]:
    """The peft LoRA layer wrapping the module ``name`` denotes, or None."""
    module = model.get_submodule(name)
    return module if _is_mergeable_lora(module) else None


def _candidates(model: nn.Module, types: tuple) -> list[tuple[str, nn.Module, Optional[nn.Module]]]:
    """``(name, module, peft wrapper or None)`` for every module of ``types``. A module a peft
    adapter wraps is named by the adapter layer; nothing inside an adapter layer (its
    ``lora_A``/``lora_B``, the base layer's own path) is a candidate."""
    out, wrappers = [], []
    for name, m in model.named_modules():
        if not name or any(name.startswith(w + ".") for w in wrappers):
            continue
        if is_peft_layer(m):
            wrappers.append(name)
            inner = get_target(model, name)
            if isinstance(inner, types):
                out.append((name, inner, m))
        elif isinstance(m, types):
            out.append((name, m, None))
    return out


def target_names(model: nn.Module, types: tuple = (nn.Linear,)) -> list[str]:
    """Names of every module of ``types`` that a method may target (see
    :func:`select_modules`: peft-wrapped layers by the adapter layer's name)."""
    return [n for n, _, _ in _candidates(model, types)]


def require_plain(chosen: list[tuple[str, nn.Module]], method: str) -> None:
    """Refuse a chosen ``nn.Linear`` that is not plain (fake-quantized or packed): a method
    that rebuilds linears from their weight would silently drop that quantization."""
    for name, m in chosen:
        if isinstance(m, nn.Linear) and not is_plain_linear(m):
            raise ValueError(f"{method}: {name} is a {type(m).__name__}, not a plain "
                             f"nn.Linear (an earlier method replaced it); apply {method} "
                             f"before the method that quantized it")


def select_modules(
    model: nn.Module,
    include: Optional[Iterable[str]] = None,
    exclude: Iterable[str] = (),
    types: tuple = (nn.Linear,),
    field_name: str = "include",
    method: str = "compression",
    lora: bool = False,
) -> list[tuple[str, nn.Module]]:
    """Modules of ``types`` whose qualified name matches a glob in ``include`` (all when
    None) and none in ``exclude``. A pattern in ``include`` that matches no module of those
    types is an error naming the modules that exist, so typos fail before any work.

    peft adapters: a wrapped layer is returned under the adapter layer's name, as its base
    layer; the adapter's own modules never are. A method whose result can absorb a LoRA
    merge passes ``lora=True``; otherwise choosing a wrapped layer is an error naming
    ``method``."""
    candidates = _candidates(model, types)
    names = [n for n, _, _ in candidates]
    chosen = candidates
    if include is not None:
        include = list(include)
        for pat in include:
            if not any(fnmatch.fnmatchcase(n, pat) for n in names):
                shown = ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")
                raise ValueError(
                    f"{field_name}: pattern {pat!r} matches no "
                    f"{'/'.join(t.__name__ for t in types)} module; modules that exist: {shown}"
                )
        chosen = [c for c in candidates if any(fnmatch.fnmatchcase(c[0], p) for p in include)]
    exclude = list(exclude)
    chosen = [c for c in chosen if not any(fnmatch.fnmatchcase(c[0], p) for p in exclude)]
    for name, _, wrapper in chosen:
        if wrapper is not None and not (lora and _is_mergeable_lora(wrapper)):
            raise_wrapped(method, name, wrapper)
    return [(n, m) for n, m, _ in chosen]


def raise_wrapped(method: str, name: str, wrapper: nn.Module) -> None:
    """The error for a method asked to change a layer that a peft adapter wraps."""
    what = "a peft LoRA adapter" if hasattr(wrapper, "lora_A") else \
        f"peft's {type(wrapper).__name__}"
    raise ValueError(
        f"{method}: {name} is wrapped by {what}, whose merge could not go into the "
        f"compressed layer; exclude it (exclude: ['{name}']), or compress before adding "
        f"the adapter or after merging it")


def set_module(model: nn.Module, fqn: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path ``fqn``."""
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


# ---------------------------------------------------------------------------------------
# Save and load
# ---------------------------------------------------------------------------------------

def save_compressed(model: nn.Module, out_dir: str, **save_kwargs) -> None:
    """``save_pretrained`` plus ``compression_config.json`` with the applied records."""
    records = compression_records(model)
    if records and _is_peft_model(model):
        raise ValueError(
            f"save_compressed: {type(model).__name__} is a peft model whose base model is "
            f"compressed; saving it would write the adapter alone. Merge the adapter first "
            f"(model = model.merge_and_unload()) and save the merged model")
    # The records describe the model inside any wrapper; without records a peft model
    # saves its adapter, as peft does.
    target = unwrap(model) if records else model
    with _serving_cache(unwrap(model)):
        target.save_pretrained(out_dir, **save_kwargs)
    if records:
        atomic_write_text(os.path.join(out_dir, COMPRESSION_FILE),
                          json.dumps({"records": records}, indent=2))


@contextlib.contextmanager
def _serving_cache(model: nn.Module):
    """The model saved with its key-value cache on (``use_cache`` in its config and
    generation config), as it is served, and left as it was. The Trainer sets
    ``config.use_cache`` to its argument's (False by default in transformers 5) on the model
    it trains, and a seq2seq student saved so generated without its cache, recomputing every
    earlier token at each step: 2.3x slower than its own teacher on the truecasing BART
    (batch 32, 32 tokens, 2026-12-07)."""
    seq2seq = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
    # (an encoder classifier has no cache to serve with)
    configs = [c for c in (getattr(model, "config", None),
                           getattr(model, "generation_config", None))
               if seq2seq and getattr(c, "use_cache", None) is False]
    for c in configs:
        c.use_cache = True
    try:
        yield
    finally:
        for c in configs:
            c.use_cache = False


def read_records(path: str) -> list:
    f = os.path.join(path, COMPRESSION_FILE)
    if not os.path.isfile(f):
        return []
    with open(f) as fh:
        return json.load(fh)["records"]


LOAD_KWARGS = ("dtype", "torch_dtype", "device_map")


def load_compressed(path: str, auto_cls: Any = None, **kwargs) -> nn.Module:
    """Load a model saved by :func:`save_compressed` (or a plain ``save_pretrained`` one);
    ``auto_cls`` defaults to :func:`default_auto_class` of the saved config.

    The architecture is built from the saved config, each record's ``restore`` rebuilds the
    shapes the method changed, then the saved tensors are loaded strictly: a mismatch between
    the metadata and the tensors is an error, never a silent partial load.

    Without records, ``kwargs`` go to ``from_pretrained``. With records, ``dtype`` (or
    ``torch_dtype``: a torch dtype, its name or ``"auto"``) sets the floating tensors'
    precision (packed codes and their fp32 bucket scales are the stored format and stay) and
    ``device_map`` puts the model on one device (``"cuda:0"``, a ``torch.device``, or
    ``{"": device}``); anything else is an error rather than silently dropped.
    """
    from transformers import AutoConfig

    from distilkit.modeling import ensure_registered, load_state_dict_from_dir

    ensure_registered()
    config = AutoConfig.from_pretrained(path)
    auto_cls = auto_cls or default_auto_class(config)
    records = read_records(path)
    if not records:
        return auto_cls.from_pretrained(path, **kwargs)
    dtype, device = _load_options(path, config, kwargs)
    # The model is built as it was before the first method ran; the records then replay.
    for rec in reversed(records):
        get_method(rec["method"]).undo_config(config, rec)
    model = auto_cls.from_config(config, **({"dtype": dtype} if dtype else {}))
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
    if device is not None:
        model.to(device)
    model.eval()
    return model


def _load_options(path: str, config: Any, kwargs: dict
                  ) -> tuple[Optional[torch.dtype], Optional[torch.device]]:
    """``(dtype, device)`` from ``load_compressed``'s keyword arguments (None: not given),
    or a ValueError naming the one it cannot honour."""
    unknown = sorted(set(kwargs) - set(LOAD_KWARGS))
    if unknown:
        raise ValueError(f"load_compressed: {unknown[0]}={kwargs[unknown[0]]!r} cannot be "
                         f"honoured: {path} has compression records, whose modules are rebuilt "
                         f"here; only {', '.join(LOAD_KWARGS[::2])} are supported")
    if "dtype" in kwargs and "torch_dtype" in kwargs:
        raise ValueError("load_compressed: both dtype and torch_dtype given; pass dtype only")
    name = "dtype" if "dtype" in kwargs else "torch_dtype"
    dtype = kwargs.get(name)
    if dtype == "auto":  # as transformers reads it: the dtype the config was saved with
        dtype = getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, dtype)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"load_compressed: {name}={kwargs.get(name)!r} is not a floating "
                         f"torch dtype; use e.g. torch.float16, torch.bfloat16 or 'float32'")
    device_map = kwargs.get("device_map")
    if device_map is None:
        return dtype, None
    spec = device_map[""] if isinstance(device_map, dict) and set(device_map) == {""} \
        else device_map
    try:
        if isinstance(spec, (str, int, torch.device)) and spec != "auto":
            return dtype, torch.device(spec)
    except (RuntimeError, ValueError):
        pass
    raise ValueError(f"load_compressed: device_map={device_map!r} cannot be honoured for a "
                     f"compressed model (its modules are rebuilt from the records, not "
                     f"dispatched): give one device, e.g. device_map='cuda:0' or "
                     f"{{'': 'cuda:0'}}")


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
