"""Compression to a budget: the recipe's ``{method: auto, target: {...}}`` entry, validated.

``compression: [{method: auto, target: {speedup: 4}, ...}]`` asks the search
(:mod:`distilkit.search.netadapt`) for the student structure (attention heads, FFN neurons,
layers) that meets one target, measured in one runtime at one batch size and length. This
module is the entry's config and its checks, which need neither models nor data, so that
:mod:`distilkit.recipe` refuses a bad entry in one line before any work:

* exactly one target: ``latency_ms`` (the student's measured latency), ``speedup`` (the
  teacher's latency / the student's, both measured in the same runtime spec), ``size_mb``
  (the weights as saved: fp32, 4 bytes per parameter, unless a later quantize / ptq stores
  them) or ``parameters``;
* the runtime spec: ``runtime`` (pytorch, onnx, onnx_int8), ``batch``, ``seq_len`` (default:
  the recipe's ``max_length``), ``threads`` (0: as many as torch uses), ``clock`` (wall, or
  cpu: process CPU time, which other work on a shared machine does not inflate);
* the search settings: ``step_fraction`` (NetAdapt's per-step cut of the current figure),
  ``steps_between`` (short distillation steps after each step), ``units`` (which kinds of
  unit may go: heads, ffn, layers, and for a size target followed by quantize / ptq, bits:
  weights stored at fewer bits, down to ``min_bits``; for a size target followed by
  prune_vocab, vocab: the word rows of the rarest training tokens; for a size target, ranks:
  each layer weight factorized by truncated SVD, its rank lowered ``rank_block`` at a time),
  ``ffn_block`` (FFN neurons removed together), ``max_iterations``,
  ``eval_examples`` (validation examples scored after each step), ``importance_batches``,
  ``choose`` (measured: each step distils one proposal per kind of unit and the mixed plan,
  keeping the lowest validation loss, as NetAdapt does; importance: the mixed plan alone),
  ``tolerance`` (how far past the target the search may land: a step removes no unit that
  would take the predicted figure below ``limit / (1 + tolerance)`` while a smaller unit is
  left, so a 4x target ends between 4x and 4.2x rather than a whole layer beyond it).

A seq2seq student (task: seq2seq; T5, BART, Marian) is searched over heads, ffn and layers,
for a size or for the latency of generating ``new_tokens`` tokens in PyTorch
(:func:`_check_seq2seq` says why the rest is refused).

``auto`` must be the first compression entry, and only non-structural methods (quantize,
ptq, prune_vocab, magnitude) may follow it: the search decides the structure, and a
structural method after it would change what it measured.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from distilkit.values import coerce

AUTO = "auto"
TARGETS = ("latency_ms", "speedup", "size_mb", "parameters")
# The runtimes a latency target is measured in (distilkit.search.latency.RUNTIMES, which sits
# far above this module; tests/test_search.py checks that the two agree).
RUNTIMES = ("pytorch", "onnx", "onnx_int8")
UNITS = ("heads", "ffn", "layers")   # the default units (distilkit.search.netadapt.UNITS)
# bits: of a later quantize / ptq entry; vocab: the rows a later prune_vocab keeps (its
# max_tokens); ranks: each layer weight's rank (a low_rank entry the search writes); all three
# for size targets
ALL_UNITS = UNITS + ("bits", "vocab", "ranks")
QUANTIZERS = ("quantize", "ptq")
CHOICES = ("measured", "importance")   # as distilkit.search.netadapt.CHOICES
CLOCKS = ("wall", "cpu")   # as distilkit.search.latency.CLOCKS (checked by the tests too)
# Methods that change the shapes the search chose and measured: not allowed after ``auto``.
STRUCTURAL = ("prune_heads", "prune_ffn", "prune_layers", "low_rank", "lstm_projection")
LATENCY_TARGETS = ("latency_ms", "speedup")
DEFAULT_NEW_TOKENS = 32   # tokens a seq2seq student generates when timed, unless given


@dataclass(frozen=True)
class BudgetConfig:
    """A validated ``{method: auto, ...}`` entry (module docstring)."""

    target: str = field(metadata={"help": "latency_ms, speedup, size_mb or parameters"})
    value: float = field(metadata={"help": "the target's figure"})
    runtime: str = field(default="pytorch", metadata={
        "help": "where latency is measured: pytorch, onnx (ONNX Runtime fp32), onnx_int8"})
    batch: int = field(default=32, metadata={"help": "batch size latency is measured at"})
    seq_len: Optional[int] = field(default=None, metadata={
        "help": "sequence length latency is measured at (default: the recipe's max_length)"})
    threads: int = field(default=0, metadata={
        "help": "intra-op threads latency is measured with (0: torch's current count)"})
    new_tokens: Optional[int] = field(default=None, metadata={
        "help": "a seq2seq student's latency: the tokens it generates per sequence (exactly "
                "that many, greedy; default 32)"})
    clock: str = field(default="wall", metadata={
        "help": "wall (the latency as served) or cpu (process CPU time: what other work on "
                "a shared machine does not inflate)"})
    step_fraction: float = field(default=0.1, metadata={
        "help": "each step removes units worth this fraction of the current figure (NetAdapt)"})
    steps_between: int = field(default=30, metadata={
        "help": "distillation steps after each step (0: none)"})
    units: tuple = field(default=UNITS, metadata={
        "help": "kinds of unit that may be removed: heads, ffn, layers, and for a size target "
                "followed by quantize or ptq, bits (each weight's stored bits, lowered); "
                "followed by prune_vocab, vocab (the rarest training tokens' word rows); "
                "ranks (each layer weight factorized by truncated SVD, its rank lowered)"})
    min_bits: int = field(default=2, metadata={
        "help": "with units bits: the fewest bits a weight may be stored at"})
    rank_block: int = field(default=32, metadata={
        "help": "with units ranks: a rank cut lowers one weight's rank by this much (and no "
                "rank goes below it)"})
    ffn_block: int = field(default=64, metadata={"help": "FFN neurons removed together"})
    max_iterations: int = field(default=40, metadata={"help": "at most this many steps"})
    eval_examples: int = field(default=256, metadata={
        "help": "validation examples scored after each step (0: none)"})
    importance_batches: int = field(default=8, metadata={
        "help": "training batches the gradient importance of each step is averaged over"})
    choose: str = field(default="measured", metadata={
        "help": "measured: each step distils one proposal per kind of unit beside the mixed "
                "plan and keeps the lowest validation loss (NetAdapt); importance: the mixed "
                "plan of the gradient scores alone (a third of the distillation)"})
    tolerance: float = field(default=0.05, metadata={
        "help": "land within this share of the target: no unit is removed that would take "
                "the predicted figure below limit / (1 + tolerance) while a smaller unit is left"})

    @property
    def latency(self) -> bool:
        """Whether the target is a measured latency (else a size, computed exactly)."""
        return self.target in LATENCY_TARGETS

    def label(self) -> str:
        """A short name of the target, e.g. ``speedup_4`` (the directory ``distilkit search``
        writes it to)."""
        v = int(self.value) if float(self.value).is_integer() else self.value
        return f"{self.target}_{v}"

    def describe(self) -> str:
        """The target and where it is measured, for the dry run and the logs."""
        what = {"latency_ms": f"latency <= {self.value:g} ms",
                "speedup": f"speed-up >= {self.value:g}x over the teacher",
                "size_mb": f"size <= {self.value:g} MB of weights as saved (fp32 unless a "
                           "later ptq or quantize stores them)",
                "parameters": f"parameters <= {int(self.value):,}"}[self.target]
        if self.latency:
            what += (f" ({self.runtime}, batch {self.batch}, length {self.seq_len}, "
                     + (f"{self.new_tokens} tokens generated, " if self.new_tokens else "")
                     + f"{self.threads or 'torch default'} threads"
                     + (", CPU clock)" if self.clock == "cpu" else ")"))
        return what

    def plan_line(self) -> str:
        """What the search will do, in one line (``distilkit distill --dry-run``)."""
        return (f"{self.describe()}: NetAdapt-style steps of {self.step_fraction:g} of the "
                f"current figure over {', '.join(self.units)}"
                + (f" (FFN blocks of {self.ffn_block})" if "ffn" in self.units else "")
                + (f" (bits down to {self.min_bits})" if "bits" in self.units else "")
                + (" (word rows: the rarest training tokens first)" if "vocab" in self.units
                   else "")
                + (f" (ranks in blocks of {self.rank_block})" if "ranks" in self.units else "")
                + f", {self.steps_between} distillation steps after each"
                + (" proposal (per kind of unit and mixed; the lowest validation loss kept)"
                   if self.choose == "measured" else "") + ", at most "
                f"{self.max_iterations} steps; then the training below on the structure found")

    def to_entry(self) -> dict:
        """Back to the recipe entry this config was read from (every setting resolved)."""
        d = dataclasses.asdict(self)
        if d["new_tokens"] is None:   # not a seq2seq latency: the key does not apply
            del d["new_tokens"]
        target = {d.pop("target"): d.pop("value")}
        return {"method": AUTO, "target": target, **{k: (list(v) if isinstance(v, tuple) else v)
                                                      for k, v in d.items()}}


_SETTINGS = [f for f in dataclasses.fields(BudgetConfig) if f.name not in ("target", "value")]
KEYS = ("method", "target", *(f.name for f in _SETTINGS))
_TYPES = {"runtime": str, "clock": str, "choose": str, "batch": int, "seq_len": int,
          "threads": int, "step_fraction": float, "new_tokens": int,
          "steps_between": int, "ffn_block": int, "max_iterations": int, "eval_examples": int,
          "importance_batches": int, "tolerance": float, "min_bits": int,
          "rank_block": int}


def _where(i: int) -> str:
    return f"compression[{i}] (auto)"


def _unknown(where: str, key: Any, valid, noun: str = "key") -> ValueError:
    close = difflib.get_close_matches(str(key), list(valid), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ValueError(f"{where}: unknown {noun} {key!r}{hint} (valid {noun}s: {', '.join(valid)})")


def _target(where: str, value: Any) -> tuple[str, float]:
    if not isinstance(value, dict) or not value:
        raise ValueError(f"{where}: target: {value!r} must be a mapping with one of "
                         f"{', '.join(TARGETS)}, e.g. target: {{speedup: 4}}")
    for k in value:
        if k not in TARGETS:
            raise _unknown(f"{where}: target", k, TARGETS, "target")
    if len(value) != 1:
        raise ValueError(f"{where}: target: give exactly one of {', '.join(TARGETS)}, got "
                         f"{', '.join(value)}; search for one budget at a time (distilkit "
                         "search --target ... runs several)")
    (kind, raw), = value.items()
    num = coerce(f"{where}: target.{kind}", raw, int if kind == "parameters" else float)
    if isinstance(num, bool) or not isinstance(num, (int, float)) or not num > 0 \
            or not math.isfinite(num):
        raise ValueError(f"{where}: target.{kind}: {raw!r} must be a number > 0 "
                         + {"latency_ms": "(milliseconds per batch), e.g. 20",
                            "speedup": "(teacher latency / student latency), e.g. 4",
                            "size_mb": "(megabytes of the weights as saved), e.g. 30",
                            "parameters": "(a whole number), e.g. 10000000"}[kind])
    return kind, num


def budget_from_entry(entry: dict, max_length: int, index: int = 0) -> BudgetConfig:
    """The :class:`BudgetConfig` of a recipe's ``{method: auto, ...}`` entry (the
    ``index``-th compression entry), every value of its type, or one ValueError naming the
    key, the value and the fix."""
    where = _where(index)
    for k in entry:
        if k not in KEYS:
            raise _unknown(where, k, KEYS)
    if "target" not in entry:
        raise ValueError(f"{where}: needs a target: one of {', '.join(TARGETS)}, e.g. "
                         "{method: auto, target: {speedup: 4}}")
    kind, value = _target(where, entry["target"])
    kw: dict = {}
    for f in _SETTINGS:
        if f.name not in entry:
            continue
        v = entry[f.name]
        if f.name == "units":
            kw["units"] = _units(where, v)
            continue
        v = coerce(f"{where}: {f.name}", v, _TYPES[f.name])
        if isinstance(v, bool):
            raise ValueError(f"{where}: {f.name}: {v!r} must be a number")
        kw[f.name] = v
    b = BudgetConfig(target=kind, value=value, **kw)
    if b.runtime not in RUNTIMES:
        close = difflib.get_close_matches(str(b.runtime), RUNTIMES, n=1)
        raise ValueError(f"{where}: runtime: {b.runtime!r} is not a runtime; use one of "
                         f"{', '.join(RUNTIMES)}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    if b.choose not in CHOICES:
        raise ValueError(f"{where}: choose: {b.choose!r} must be one of {', '.join(CHOICES)} "
                         "(measured: the step's proposals distilled and compared)")
    if b.clock not in CLOCKS:
        raise ValueError(f"{where}: clock: {b.clock!r} must be one of {', '.join(CLOCKS)}")
    for name, low in (("batch", 1), ("seq_len", 2), ("ffn_block", 1), ("max_iterations", 1),
                      ("new_tokens", 1),
                      ("min_bits", 1), ("rank_block", 1),
                      ("steps_between", 0), ("threads", 0), ("eval_examples", 0),
                      ("importance_batches", 1)):
        v = getattr(b, name)
        if v is not None and v < low:
            raise ValueError(f"{where}: {name}: {v!r} must be a whole number >= {low}")
    if not 0 < b.step_fraction < 1:
        raise ValueError(f"{where}: step_fraction: {b.step_fraction!r} must be in (0, 1): the "
                         "share of the current figure each step removes, e.g. 0.1")
    if not 0 <= b.tolerance < 1:
        raise ValueError(f"{where}: tolerance: {b.tolerance!r} must be in [0, 1): how far past "
                         "the target the search may land, e.g. 0.05")
    return dataclasses.replace(b, seq_len=b.seq_len or max_length)


def _units(where: str, value: Any) -> tuple:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise ValueError(f"{where}: units: {value!r} must be a non-empty list of "
                         f"{', '.join(ALL_UNITS)}")
    for u in items:
        if u not in ALL_UNITS:
            raise _unknown(f"{where}: units", u, ALL_UNITS, "unit")
    return tuple(u for u in ALL_UNITS if u in items)  # one canonical order


def is_auto(entry: Any) -> bool:
    return isinstance(entry, dict) and entry.get("method") == AUTO


# The ``distilkit export`` file (its kind in export.json) each ONNX runtime serves.
RUNTIME_EXPORT_FILE = {"onnx": "fp32", "onnx_int8": "int8"}


def budget_export_file(compression: Optional[list]) -> Optional[tuple[str, str]]:
    """``(runtime, export file kind)`` when a recipe's ``auto`` entry has a latency target
    measured in an ONNX runtime: the file the searched student meets its budget in, so the one
    to serve (the export's own rule could name another: its fp32 file, when int8 flipped the
    answer on a check row, is several times slower); else None."""
    entry = next((e for e in compression or [] if is_auto(e)), None)
    target = entry.get("target") if entry else None
    if not (isinstance(target, dict) and any(k in LATENCY_TARGETS for k in target)):
        return None
    runtime = entry.get("runtime", "pytorch")
    kind = RUNTIME_EXPORT_FILE.get(runtime)
    return (runtime, kind) if kind else None


def split_auto(compression: list, max_length: int, task: str = "classification",
               student: Optional[dict] = None, streaming: bool = False
               ) -> tuple[Optional[BudgetConfig], list]:
    """``(budget, the entries after it)`` of a recipe's ``compression:`` list, or ``(None,
    the whole list)`` without ``auto``; refuses ``auto`` anywhere but first, twice, for a task
    or student the search does not handle, or followed by a structural method."""
    autos = [i for i, e in enumerate(compression) if is_auto(e)]
    if not autos:
        return None, list(compression)
    if autos[0] != 0:
        raise ValueError(f"compression[{autos[0]}]: method auto must be the first compression "
                         "entry (it chooses the structure the methods after it work on); move "
                         "it first")
    if len(autos) > 1:
        raise ValueError(f"compression[{autos[1]}]: method auto is given twice; keep one")
    if task not in ("classification", "seq2seq"):
        raise ValueError(f"{_where(0)}: the budget search handles task: classification and "
                         f"seq2seq; task: {task} is not supported: give its structure with "
                         "prune_heads / prune_layers / prune_ffn instead")
    student = student or {}
    if student.get("type") == "bilstm" or student.get("lora"):
        what = "a BiLSTM student" if student.get("type") == "bilstm" else "a LoRA student"
        raise ValueError(f"{_where(0)}: the budget search prunes a transformer student's heads, "
                         f"FFN neurons and layers, not {what}; use student: {{type: "
                         "from_teacher}, config or pretrained, without lora")
    if streaming:
        raise ValueError(f"{_where(0)}: the budget search scores and distils on the training "
                         "split between its steps, which streaming: true never holds; set "
                         "streaming: false")
    budget = budget_from_entry(compression[0], max_length, 0)
    rest = list(compression[1:])
    if task == "seq2seq":
        budget = _check_seq2seq(budget, rest)
    elif budget.new_tokens is not None:
        raise ValueError(f"{_where(0)}: new_tokens: {budget.new_tokens} is the tokens a "
                         "seq2seq student generates when timed; an encoder classifier "
                         "generates none: remove new_tokens")
    for j, e in enumerate(rest, start=1):
        m = e.get("method") if isinstance(e, dict) else None
        if m in STRUCTURAL:
            raise ValueError(f"compression[{j}]: {m} after method auto cannot work: the search "
                             f"chooses the heads, FFN neurons and layers itself and measures "
                             f"that structure; remove {m}, or use {m} without auto (only "
                             "quantize, ptq, prune_vocab or magnitude may follow auto)")
    if "bits" in budget.units:
        _check_bits_unit(budget, rest)
    if "vocab" in budget.units:
        _check_vocab_unit(budget, rest)
    if "ranks" in budget.units:
        _check_ranks_unit(budget, rest)
    return budget, rest


def _check_seq2seq(budget: BudgetConfig, rest: list) -> BudgetConfig:
    """An encoder-decoder student is searched over heads, ffn and layers in both stacks:
    for a size (counted exactly) or a latency, timed as generation of ``new_tokens`` tokens
    (exactly that many, greedy) in PyTorch (the ONNX runtimes here serve encoder
    classifiers). The word table is shared by the encoder, the decoder and the output layer,
    and the bits, vocab and ranks units count an encoder classifier's weights. Returns the
    budget with ``new_tokens`` resolved (32 unless given) for a latency target."""
    where = _where(0)
    if budget.latency and budget.runtime != "pytorch":
        raise ValueError(f"{where}: runtime: {budget.runtime} for a seq2seq student: its "
                         "generation is timed in pytorch; use runtime: pytorch")
    extra = [u for u in budget.units if u not in UNITS]
    if extra:
        raise ValueError(f"{where}: units: {extra[0]} for a seq2seq student: the search "
                         "removes its heads, ffn and layers; use units among heads, ffn, layers")
    for j, e in enumerate(rest, start=1):
        m = e.get("method") if isinstance(e, dict) else None
        if m == "prune_vocab" or (m in QUANTIZERS and budget.target == "size_mb"):
            raise ValueError(f"compression[{j}]: {m} after auto with a seq2seq student: the "
                             "search counts fp32 weights and the whole word table; use target "
                             f"parameters (which {m} leaves as they are), or drop {m}")
    if budget.latency:
        return dataclasses.replace(budget, new_tokens=budget.new_tokens or DEFAULT_NEW_TOKENS)
    return budget


def _check_ranks_unit(budget: BudgetConfig, rest: list) -> None:
    """``units: [.., ranks]`` factorizes layer weights (the search writes a ``low_rank`` entry
    after the pruning): counted for a size target (a quantize / ptq entry after it quantizes
    both factors of a factorized weight at that weight's bits), or timed for a latency one
    (the latency table then times factorized layers too), with measured proposals. Module
    patterns name the dense weights, not their factors (``...query`` is ``...query.up`` and
    ``...query.down`` once factorized), so bits searched per weight and a quantization entry
    choosing modules by name are refused."""
    where = _where(0)
    if "bits" in budget.units:
        raise ValueError(f"{where}: units: bits and ranks together: the bits searched per "
                         "weight are written by module name, which a factorized weight no "
                         "longer has; drop one of them")
    for j, e in enumerate(rest, start=1):
        if isinstance(e, dict) and e.get("method") in QUANTIZERS:
            named = [k for k in ("include", "exclude", "bits_per_pattern") if e.get(k)]
            if named:
                raise ValueError(f"compression[{j}]: {e['method']} with {named[0]} after auto "
                                 "with units: ranks: its module names would miss the factors "
                                 "of the weights the search factorizes; drop "
                                 f"{named[0]} (every linear is quantized), or drop ranks")
    if budget.choose != "measured":
        raise ValueError(f"{where}: units: ranks needs choose: measured (a rank's estimated "
                         "loss is not on the heads' scale: only the distilled proposals "
                         "compare them)")


def _check_vocab_unit(budget: BudgetConfig, rest: list) -> None:
    """``units: [.., vocab]`` sets how many training tokens a later prune_vocab keeps: it
    needs a size target (a word row costs no time), that entry without its own max_tokens,
    and measured proposals."""
    where = _where(0)
    if budget.target not in ("size_mb", "parameters"):
        raise ValueError(f"{where}: units: vocab drops word rows, which changes the size, not "
                         f"{budget.target} (a row is looked up, not computed): use it with a "
                         "size_mb or parameters target, or drop vocab")
    v = [(j, e) for j, e in enumerate(rest, start=1)
         if isinstance(e, dict) and e.get("method") == "prune_vocab"]
    if not v:
        raise ValueError(f"{where}: units: vocab chooses how many training tokens a prune_vocab "
                         "after auto keeps, and there is none: add {method: prune_vocab} after "
                         "it, or drop vocab")
    j, e = v[-1]
    if e.get("max_tokens") is not None:
        raise ValueError(f"compression[{j}]: max_tokens with units: vocab in auto: the search "
                         "chooses how many tokens to keep; remove max_tokens, or drop vocab")
    if budget.choose != "measured":
        raise ValueError(f"{where}: units: vocab needs choose: measured (a word row has no "
                         "gradient score on the heads' scale: only the distilled proposals "
                         "compare them)")


def _check_bits_unit(budget: BudgetConfig, rest: list) -> None:
    """``units: [.., bits]`` lowers the bits a later quantize / ptq entry stores weights at:
    it needs a size target, such an entry with ``bits`` (and ``bits_per_pattern``, where the
    search starts) on the uniform scheme, not ``target_bits``, and measured proposals."""
    where = _where(0)
    if budget.target != "size_mb":
        raise ValueError(f"{where}: units: bits changes only how many bytes a weight is stored "
                         f"in, not {budget.target}: use it with a size_mb target, or drop bits")
    q = [(j, e) for j, e in enumerate(rest, start=1)
         if isinstance(e, dict) and e.get("method") in QUANTIZERS]
    if not q:
        raise ValueError(f"{where}: units: bits lowers the bits of a quantize or ptq entry after "
                         "auto, and there is none: add {method: ptq, bits: 4} (or quantize) "
                         "after it, or drop bits")
    j, e = q[-1]
    # bits_per_pattern is where the search starts (e.g. layers at 8 bits, the word table,
    # which is not searched, at 4); target_bits would allocate the bits again after it
    if e.get("target_bits"):
        raise ValueError(f"compression[{j}]: target_bits with units: bits in auto: the search "
                         "chooses each weight's bits itself; remove target_bits and give bits")
    if e.get("scheme", "uniform") != "uniform":
        raise ValueError(f"compression[{j}]: scheme: {e.get('scheme')!r} with units: bits: "
                         "the search estimates the uniform scheme's error; use scheme: uniform")
    start = int(e.get("bits", 4))
    if not 1 <= budget.min_bits <= start:
        raise ValueError(f"{where}: min_bits: {budget.min_bits} must be between 1 and the "
                         f"{e['method']} entry's bits ({start}): the search only lowers bits")
    if budget.choose != "measured":
        raise ValueError(f"{where}: units: bits needs choose: measured (a bit's estimated loss "
                         "is not on the heads' scale: only the distilled proposals compare "
                         "them)")
