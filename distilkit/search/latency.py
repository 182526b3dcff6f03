"""What a pruned encoder classifier (or encoder-decoder) costs in a runtime: a latency table
measured once per model shape, runtime spec and machine, cached on disk.

Design. The table is built from whole small models served the way the final student is
served, so the table and the student's final figure are measured the same way:

* ``base``: the model with 0 encoder layers (embeddings, pooler, classifier head);
* on a grid of head counts ``h`` (every count 1..num_heads, or ``grid`` of them) and FFN
  widths ``f`` (``grid`` points from 1 to the intermediate size, evenly spaced), the model
  with 1 layer keeping ``h`` heads and ``f`` neurons; its cost minus ``base`` is the cost of
  one such layer.

A layer of any ``(h, f)`` costs ``fixed + per_head * h + per_neuron * f``, the three
non-negative figures fitted to the grid by least squares (:func:`fit_layer_cost`), and a
structure costs ``base + sum of its layers``: a transformer runs its layers one after the
other on tensors of the same shape, so their costs add. Why a fit, not the grid itself: a
layer's work is linear in its heads (Q/K/V/O projections and attention, per head) and in its
FFN neurons, while one measurement of a 30-70 ms model on a shared 2-core machine is off by
5-35% (median 6.5% from the fit on the built-in shape's table, 2026-12-02); interpolated
bilinearly, that noise made the table non-monotone (12 heads at 1,024 neurons measured 45 ms,
11 heads 62 ms), so removing a head or neurons "saved" nothing and the search, near its
target, could only take a whole layer (2x asked, 3.4x got). The fit can only get cheaper as
units go, and ``fit_error`` (the median relative residual on the grid) says how well the law
holds. The word-table size does not enter (one row gather per
token, whatever the table's size); it only enters the size (:mod:`~distilkit.search.structure`).

Encoder-decoder models (T5, BART, Marian; pytorch only) are timed generating: a batch of
``batch`` random sources of ``seq_len`` tokens, greedy, exactly ``new_tokens`` tokens each (the
end of sequence is held off until then, so a student and its teacher do the same number of
decoder steps whatever they would write). Their table has a grid per stack: ``base`` is the
model with no layer in either stack, and a layer of each stack is timed alone in its stack
(1 encoder + 0 decoder layers, 0 + 1), each fitted to its own law: a decoder layer runs once
per generated token (self-attention over what it wrote, cross-attention over the source, its
FFN) and an encoder layer once, so a decoder layer costs several encoder layers. Measured on a
tiny BART (CPU clock, 1 thread, batch 4, 16 source tokens, 8 generated): predicted speed-ups of
1.06 / 1.27 / 1.37 against measured 1.03 / 1.20 / 1.27 for an encoder layer, a decoder layer
and both dropped (tests/test_search_seq2seq.py holds them within :data:`TOLERANCE`).

Factorized layers (a table built with ``ranks=True``, for a search over ranks): the unpruned
layer is timed dense and then with every weight factorized at each rank of
:func:`rank_points` (as ``low_rank`` serves it, two thin products), and what factorizing saves
is fitted as ``per_weight`` ms per multiply-add no longer done less ``per_factorized`` per
weight split (:func:`fit_rank_cost`). A layer of a structure with ranks costs its dense cost
less that saving for each of its weights (at its pruned shape), so rank cuts are priced in the
same milliseconds as heads, FFN blocks and layers.

Runtimes (:data:`RUNTIMES`): ``pytorch`` (eager fp32, ``torch.set_num_threads(threads)``),
``onnx`` (the graph ``distilkit export`` traces, in onnxruntime fp32) and ``onnx_int8`` (as
``distilkit export --int8`` makes it: onnxruntime's fused graph, checked against PyTorch, with
the fallbacks of :func:`distilkit.export.classifier.export_classifier`, then dynamic int8 with
per-channel scales). Every small model is exported in a temporary directory; onnxruntime
sessions take ``threads`` intra-op threads and spin at most
:data:`~distilkit.export.runtime.TIMING_SPIN_US` waiting for work, so a run is as fast as
served and nothing keeps competing for the cores after it.

Table protocol (:func:`_measure_table`, table version 2): the base, every grid point and
every factorized layer is timed in turns with one stopwatch model (the unpruned one-layer
model, :func:`_pair_ms`: ``PAIR_BLOCK`` runs a turn, the median of the rounds' ratios), in a
shuffled order (the same each time), and costs its ratio to the stopwatch times the
stopwatch's median over the whole table. Version 1 timed each model alone, row by row: a
machine getting busier while it was measured made the later rows (more heads) dearer, and a
1.4x seq2seq search, its table re-measured in a busy minute, took heads where a decoder
layer was the saving (BLEU 2.77 against 37, 2026-12-07). Measured by
``scripts/bench_latency_table.py`` on the built-in BART (generation, wall clock, 2 threads,
another process starting and stopping every 4 s): predicted students' speed-ups 4.6% off
the measured ones (median; 6.5% at most) against 21% (31%) timed alone; on a quiet machine
1.8% (5.3%) against 3.3% (10%); the table takes 4x as long (67 s against 16 s). On the
built-in MiniLM (batch 32, length 64) under the same load, 6.3% at most against 13.3%, and a
layer's heads priced at 35% of it as on the quiet machine (34%) against 22% timed alone.

Fused attention in int8 (table version 3). onnxruntime's optimizer fuses a BERT-family
attention with one head count for the whole graph, so the int8 file of a student with a head
pruned anywhere is made without fused attention (the fused graph fails its check and
``distilkit export --int8`` falls back), and a layer with a factorized q, k, v or o weight
loses it alone (:meth:`LatencyTable.fused_layers`). An int8 table of a fusable family
therefore times its grid and its factorized layers without fused attention, the graph of
every structure that prunes a head, and also the base and the layer keeping every head at
each FFN width with it (``fused_fit``), the graph of every other structure. Version 2 timed
neither: its grid layers were copies holding their own config, which the export's switch to
eager attention never reached, so they were traced with SDPA and fused nothing while the
students were fused. On the 4-layer test BERT (batch 32, length 32, 1 thread, CPU clock,
Intel 2-core, 2026-12-08) a fused layer runs ~10% slower than one without, and a head-pruned
student's speed-up was predicted 7% high by version 2 against 1.5-2.4% by version 3 (27% high
on an AMD CI machine, where the test failed). On the built-in MiniLM's int8 files (batch 32,
length 64, 2 threads, wall clock) version 3 predicted four pruned students' speed-ups to 0.15%
(median; 3.2% at most) (scripts/bench_latency_table.py --runtime onnx_int8).

Measurement (:func:`measure_model_ms`): random token ids and an all-ones attention mask (and
zero token types where the family has them) at ``(batch, seq_len)``, ``WARMUP`` untimed runs,
then the median of ``REPEATS`` timed runs, more for a model faster than ``MIN_TIMED_MS /
REPEATS`` (up to ``MAX_REPEATS``) (the protocol of :func:`distilkit.evaluate.latency_ms`),
on the spec's ``clock``: ``wall`` (the latency as served) or ``cpu`` (the process's CPU time,
which other processes sharing the cores do not inflate: with ``threads=1`` the latency of the
machine left idle; the tests use it, as several people share this 2-core machine; with more
threads it also counts time spent waiting for a preempted peer).

Cache. ``<cache root>/latency/<family>-<hash>.json`` (cache root: ``$DISTILKIT_CACHE``, as
:func:`distilkit.data.cache_root`; or ``cache_dir``), keyed by the shape
(:meth:`~distilkit.search.structure.BaseShape.key`), the spec (threads resolved), the grid,
the protocol and the machine (CPU model, core count, platform, torch version and, for the
onnx runtimes, onnxruntime's). The file holds its key; one that does not parse or does not
hold its key is measured again and replaced (atomically, :mod:`distilkit.files`).

Accuracy (:data:`TOLERANCE`): the tests require each head-, FFN- and layer-pruned model's
predicted speed-up over the unpruned one within 25% of the speed-up measured with the two
timed in turns (:func:`measure_pair_ms`), in pytorch and onnx_int8, on the CPU clock with one
thread, with a busy process beside them on this 2-core machine; the absolute figure within 2x
(the CPU's own speed drifted 15% second to second on the AMD 2-core machines, so a model timed
minutes after its table read 30-57% off it, 2026-12-03). Measured 2026-12-02 on the built-in MiniLM shape (random weights, batch
32, length 64, pytorch, CPU clock, 1 thread), predicted vs measured: 6 layers 664 vs 652 ms,
3 layers 335 vs 331, 2 layers 225 vs 215, 1 layer 115 vs 99 (the same model timed twice
differs that much under other people's load). The wall clock with 2 threads under that load is
not usable (a forward pass varied 40x from run to run: a preempted peer thread stalls the
other): time on an idle machine, or on the CPU clock.

Build time: the built-in MiniLM shape (12 heads, 1536 neurons) at batch 32, length 64 in
pytorch is 12 x 7 one-layer models plus the base: 43 s (CPU clock, 1 thread) and 128 s (wall
clock, 2 threads, loaded machine) on 2 cores timed alone (version 1), about 4x that in turns
with the stopwatch; the onnx runtimes export each model first (about
2-4 s each for int8), so a coarser ``grid`` suits them (``grid=4``: 16 models).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import platform
import random
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from distilkit.compress.families import get_adapter, slice_cols, slice_rows
from distilkit.search.structure import (BaseShape, Structure, base_shape_of, factorizes,
                                        is_seq2seq, role_names, role_shapes, structure_of)

logger = logging.getLogger(__name__)

RUNTIMES = ("pytorch", "onnx", "onnx_int8")
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
WARMUP = 2
REPEATS = 5            # timed runs per small model of the table
MEASURE_REPEATS = 7    # timed runs of a whole model (measure_ms)
PAIR_BLOCK = 2         # runs of one model per turn when timed beside another, the last timed
MIN_TIMED_MS, MAX_REPEATS = 200.0, 50  # more runs of a fast model, at most this many
DEFAULT_GRID = 7       # FFN widths on the grid (1 .. intermediate); heads: every count
TOLERANCE = 0.25
# Ranks (as fractions of the hidden width) a table with ranks times one factorized layer at:
# below the break-even rank of every weight of a BERT-shaped layer (hidden / 2 for q, k, v, o)
RANK_FRACTIONS = (1 / 12, 1 / 6, 1 / 4, 1 / 3)
TABLE_VERSION = 3   # 2: every model timed in turns with a stopwatch model, shuffled;
#                    3: an int8 table's grid without fused attention, and a fused-attention law
ONNX_GRAPHS = 2   # the exported graphs' revision (2: int8 without SkipLayerNorm / BiasGelu)


@dataclass(frozen=True)
class RuntimeSpec:
    """Where and at what shape latency is measured."""

    runtime: str = "pytorch"
    batch: int = 32
    seq_len: int = 64
    threads: int = 0  # 0: torch.get_num_threads()
    # "wall": latency as served (perf_counter); "cpu": the process's CPU time over the run
    # (time.process_time), which other work on a shared machine does not inflate; with
    # threads=1 it is the latency of the same machine left idle.
    clock: str = "wall"
    # An encoder-decoder model is timed generating this many tokens per sequence (exactly:
    # greedy, end-of-sequence suppressed until then); 0 for an encoder classifier.
    new_tokens: int = 0

    def __post_init__(self):
        if self.clock not in CLOCKS:
            raise ValueError(f"clock={self.clock!r} is not one of {list(CLOCKS)}")
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime={self.runtime!r} is not one of {list(RUNTIMES)}; "
                             "e.g. runtime: onnx_int8")
        for name in ("batch", "seq_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} must be an integer >= 1, e.g. {name}: "
                                 f"{32 if name == 'batch' else 64}")
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 0:
            raise ValueError(f"threads={self.threads!r} must be an integer >= 0 (0: as many as "
                             "torch uses)")
        if isinstance(self.new_tokens, bool) or not isinstance(self.new_tokens, int) \
                or self.new_tokens < 0:
            raise ValueError(f"new_tokens={self.new_tokens!r} must be an integer >= 0 (the "
                             "tokens a seq2seq model generates when timed; 0: an encoder)")

    def resolved_threads(self) -> int:
        return self.threads or torch.get_num_threads()

    def key(self) -> dict:
        out = {**asdict(self), "threads": self.resolved_threads()}
        if not self.new_tokens:   # an encoder's key as it was before seq2seq timing
            del out["new_tokens"]
        return out


# ---------------------------------------------------------------------------------------
# Measuring one model
# ---------------------------------------------------------------------------------------

def _input_names(model: nn.Module) -> list[str]:
    """The inputs a served model gets: ids, mask, and token types where the family has more
    than one (what its tokenizer returns)."""
    import inspect

    params = inspect.signature(model.forward).parameters
    names = ["input_ids", "attention_mask"]
    if "token_type_ids" in params and getattr(model.config, "type_vocab_size", 0) > 1:
        names.append("token_type_ids")
    return names


def _batch(model: nn.Module, batch: int, seq_len: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, int(model.config.vocab_size), (batch, seq_len), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if "token_type_ids" in _input_names(model):
        out["token_type_ids"] = torch.zeros_like(ids)
    return out


@contextlib.contextmanager
def _torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _onnx_file(model: nn.Module, runtime: str, tmp: str, attention: bool = True) -> str:
    """``model`` exported as ``distilkit export`` serves it (``runtime``: onnx or onnx_int8),
    in ``tmp``: the same trace, and for int8 the same fused graphs and fallbacks, checked
    against the model on small random batches (``attention=False``: int8 without the fused
    attention, as a student with a head-pruned layer gets it)."""
    from distilkit.export.classifier import _LogitsOnly, int8_file, trace
    from distilkit.export.runtime import FP32_FILE, INT8_FILE, require_onnx

    require_onnx()
    names = _input_names(model)
    example = tuple(_batch(model, 2, 8)[n] for n in names)
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes["logits"] = {0: "batch"}
    fp32 = os.path.join(tmp, FP32_FILE)
    trace(_LogitsOnly(model, names).eval(), example, fp32, names, axes)
    if runtime == "onnx":
        return fp32
    checks = [{n: t.numpy() for n, t in _batch(model, b, s, seed=b).items() if n in names}
              for b, s in ((1, 5), (3, 11))]
    q = os.path.join(tmp, INT8_FILE)
    int8_file(model, names, example, axes, checks, fp32, q, attention=attention)
    return q


def _median_ms(fn, clock: str, repeats: int) -> float:
    """Median ms of ``fn()`` on ``clock`` over ``repeats`` runs (or more, for a fast ``fn``)
    after ``WARMUP`` untimed ones (:func:`distilkit.evaluate.latency_ms`'s protocol, on either
    clock)."""
    now = CLOCKS[clock]
    times: list[float] = []
    with torch.inference_mode():
        for _ in range(WARMUP):
            fn()
        # A fast model gets more runs (up to MAX_REPEATS, until MIN_TIMED_MS are timed): a
        # millisecond-long run is the one other processes' noise decides.
        while len(times) < repeats or (sum(times) < MIN_TIMED_MS and len(times) < MAX_REPEATS):
            t0 = now()
            fn()
            times.append((now() - t0) * 1000)
    return float(statistics.median(times))


@contextlib.contextmanager
def _runner(model: nn.Module, spec: RuntimeSpec, attention: bool = True):
    """A callable that runs one forward pass of ``model`` as ``spec`` serves it (module
    docstring), to be timed. The runtimes are CPU ones: a model elsewhere or in another dtype
    (a student in training) is run as an fp32 copy on the CPU, and its own training mode is
    left as it was. ``attention``: see :func:`_onnx_file`."""
    if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in model.parameters()):
        model = copy.deepcopy(model).float().cpu()
    was_training = model.training
    model.eval()
    try:
        batch = _batch(model, spec.batch, spec.seq_len)
        threads = spec.resolved_threads()
        if is_seq2seq(model):
            from distilkit.seq2seq.generate_eval import cache_kwargs

            n = spec.new_tokens
            kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1,
                      use_cache=True, **cache_kwargs(model.config))   # as served
            with _torch_threads(threads):
                yield lambda: model.generate(**batch, **kw)
            return
        if spec.runtime == "pytorch":
            with _torch_threads(threads):
                yield lambda: model(**batch)
            return
        from distilkit.export.measure import OrtClassifier
        from distilkit.export.runtime import TIMING_SPIN_US

        with tempfile.TemporaryDirectory(prefix="distilkit-latency-") as tmp:
            path = _onnx_file(model, spec.runtime, tmp, attention)
            served = OrtClassifier(path, model.config, threads, spin_us=TIMING_SPIN_US)
            yield lambda: served(**batch)
    finally:
        model.train(was_training)


def _time_model(model: nn.Module, spec: RuntimeSpec, repeats: int = MEASURE_REPEATS) -> float:
    """Median ms of one forward pass of ``model`` at ``spec``."""
    with _runner(model, spec) as run:
        return _median_ms(run, spec.clock, repeats)


def _pair_ms(run_model, run_ref, clock: str, repeats: int, block: int) -> tuple[float, float]:
    """:func:`measure_pair_ms` on two runners already open (a table keeps its stopwatch's
    open: an ONNX runtime would export it again for every model timed beside it)."""
    now = CLOCKS[clock]
    ratios, refs = [], []
    with torch.inference_mode():
        for i in range(WARMUP + repeats):
            order = (("ref", run_ref), ("model", run_model))
            t = {}
            for name, run in (order if i % 2 == 0 else order[::-1]):
                for _ in range(block):
                    t0 = now()
                    run()
                    t[name] = (now() - t0) * 1000
            if i >= WARMUP:
                ratios.append(t["model"] / max(t["ref"], 1e-9))
                refs.append(t["ref"])
    ref = float(statistics.median(refs))
    return float(statistics.median(ratios)) * ref, ref


def measure_pair_ms(model: nn.Module, reference: nn.Module, spec: RuntimeSpec,
                    repeats: int = MEASURE_REPEATS, block: int = PAIR_BLOCK
                    ) -> tuple[float, float]:
    """``(model ms, reference ms)`` in ``spec``, the two run in turns (which goes first
    alternates), after ``WARMUP`` rounds: the reference's figure is its median, the model's
    the median of the rounds' ratios model / reference times it. A busy moment of the machine
    slows both runs of its round alike, so it leaves the ratio (the speed-up) as it is; timed
    one after the other, a 7-run median of each drifted by up to 35% within a minute on the
    shared 2-core machine (2026-12-02). A turn is ``block`` runs of one model and only its
    last is timed, so each is timed as serving leaves it, its weights in the caches: run by
    run, the int8 quickstart student timed cold after the teacher read 23% slower than it
    serves (:func:`distilkit.evaluate.interleaved_latency_ms`, 2026-12-03)."""
    _check_model(model, spec)
    _check_model(reference, spec)
    if not (isinstance(block, int) and block >= 1):
        raise ValueError(f"block={block!r}: use an integer >= 1")
    with _runner(model, spec) as run_model, _runner(reference, spec) as run_ref:
        return _pair_ms(run_model, run_ref, spec.clock, repeats, block)


# Pairings whose median is a verdict on a budget (the run's, and the Pareto table's): single
# pairings of one student read 1-3% apart on a 2-core machine (2026-12-03), and the table's
# single pairing read a 4x student 3% faster than its run's median an hour before (2026-12-07).
VERDICT_PAIRINGS = 5


def verdict_pair_ms(model: nn.Module, reference: nn.Module, spec: RuntimeSpec,
                    pairings: int = VERDICT_PAIRINGS) -> tuple[float, float]:
    """``(model ms, reference ms)`` of the pairing (:func:`measure_pair_ms`) whose ratio is
    the median of ``pairings`` of them: the one figure a budget's verdict rests on."""
    pairs = sorted((measure_pair_ms(model, reference, spec) for _ in range(pairings)),
                   key=lambda p: p[0] / max(p[1], 1e-9))
    return pairs[len(pairs) // 2]


def _check_model(model: nn.Module, spec: RuntimeSpec) -> None:
    structure_of(model)   # refuses a family or kind the table cannot model
    if is_seq2seq(model) and (spec.runtime != "pytorch" or not spec.new_tokens):
        raise ValueError(f"latency: {type(model).__name__} is an encoder-decoder (seq2seq) "
                         "model, timed generating new_tokens tokens in pytorch: give "
                         f"runtime pytorch and new_tokens >= 1 (got runtime {spec.runtime}, "
                         f"new_tokens {spec.new_tokens})")
    if not is_seq2seq(model) and spec.new_tokens:
        raise ValueError(f"latency: new_tokens={spec.new_tokens} is for encoder-decoder models; "
                         f"{type(model).__name__} generates nothing: give new_tokens 0")
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and spec.seq_len > limit:
        raise ValueError(f"seq_len={spec.seq_len} is longer than the model's "
                         f"max_position_embeddings ({limit}); give seq_len <= {limit}")


def fuses_attention(model: nn.Module, spec: RuntimeSpec) -> bool:
    """Whether ``model``'s int8 graph in ``spec`` can hold onnxruntime's fused attention
    (:mod:`distilkit.export.int8`): then its table has a second law, for the structures that
    keep every head (module docstring)."""
    from distilkit.export.int8 import FUSABLE

    return spec.runtime == "onnx_int8" and not is_seq2seq(model) \
        and model.config.model_type in FUSABLE


def measure_model_ms(model: nn.Module, spec: RuntimeSpec) -> float:
    """The whole ``model`` measured in ``spec``'s runtime: the median of ``MEASURE_REPEATS``
    runs after ``WARMUP`` (ground truth for a table's predictions)."""
    _check_model(model, spec)
    return _time_model(model, spec)


# ---------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------

def _nonnegative_fit(cols, y) -> list[float]:
    """The least-squares ``coef >= 0`` of ``cols @ coef ~= y``. Exact for a few unknowns: the
    optimum is the unconstrained fit on some subset of the columns (the others 0), so every
    subset is fitted and the best one with no negative figure kept."""
    import itertools

    import numpy as np

    cols, y = np.asarray(cols, dtype=float), np.asarray(y, dtype=float)
    k_all = cols.shape[1]
    best_err, best = float((y ** 2).sum()), np.zeros(k_all)   # all figures 0
    for k in range(1, k_all + 1):
        for subset in itertools.combinations(range(k_all), k):
            coef = np.linalg.lstsq(cols[:, subset], y, rcond=None)[0]
            if (coef < 0).any():
                continue
            full = np.zeros(k_all)
            full[list(subset)] = coef
            err = float(((cols @ full - y) ** 2).sum())
            if err < best_err - 1e-12 * max(1.0, best_err):
                best_err, best = err, full
    return [float(c) for c in best]


def fit_layer_cost(heads: Sequence[int], ffn: Sequence[int], grid: Sequence[Sequence[float]]
                   ) -> tuple[float, float, float]:
    """``(fixed, per_head, per_neuron)`` in ms, each >= 0: the least-squares fit of
    ``fixed + per_head * h + per_neuron * f`` to ``grid[i][j]``, the cost measured at
    ``heads[i]`` heads and ``ffn[j]`` neurons (:func:`_nonnegative_fit`)."""
    import numpy as np

    hh, ff = np.meshgrid(np.asarray(heads, dtype=float), np.asarray(ffn, dtype=float),
                         indexing="ij")
    y = np.asarray(grid, dtype=float).ravel()
    fixed, per_head, per_neuron = _nonnegative_fit(
        np.stack([np.ones_like(y), hh.ravel(), ff.ravel()], axis=1), y)
    return fixed, per_head, per_neuron


def _rank_terms(shapes: Sequence, ranks: Sequence[int]) -> tuple[int, int]:
    """``(weights saved, weights factorized)`` of a layer whose weights of ``shapes`` take
    ``ranks`` (0: dense; a rank that would not shrink a weight leaves it dense, as
    :func:`~distilkit.search.structure.weight_count` counts it)."""
    saved = count = 0
    for (m, n), r in zip(shapes, ranks):
        if factorizes(m, n, r):
            saved += m * n - (m + n) * min(int(r), m, n)
            count += 1
    return saved, count


def fit_rank_cost(shapes: Sequence, ranks: Sequence[int], saving_ms: Sequence[float]
                  ) -> tuple[float, float]:
    """``(per_weight, per_factorized)`` in ms, each >= 0: the time a factorized layer saves
    is ``per_weight`` per multiply-add (a weight is one per token) it no longer does, less
    ``per_factorized`` per weight split in two (one more matrix product and its output),
    fitted to ``saving_ms[i]``, measured with every weight of ``shapes`` at ``ranks[i]``."""
    terms = [_rank_terms(shapes, [r] * len(shapes)) for r in ranks]
    per_weight, per_factorized = _nonnegative_fit(
        [[saved, -count] for saved, count in terms], saving_ms)
    return per_weight, per_factorized


def rank_points(shape: BaseShape) -> list[int]:
    """The ranks a table with ranks times (:data:`RANK_FRACTIONS` of the hidden width)."""
    return sorted({max(1, round(shape.hidden * f)) for f in RANK_FRACTIONS})


def grid_points(total: int, n: int) -> list[int]:
    """``n`` (at most ``total``) distinct counts evenly spaced from 1 to ``total``."""
    n = max(2, min(int(n), total)) if total > 1 else 1
    if n == 1:
        return [1]
    return sorted({1 + round(i * (total - 1) / (n - 1)) for i in range(n)})


def machine_key(runtime: str) -> dict:
    """What makes timings of one machine comparable: CPU model, cores, platform, versions."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f
                        if ln.lower().startswith("model name")), cpu)
    except OSError:
        pass
    out = {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
           "python": platform.python_version(), "torch": torch.__version__}
    if runtime != "pytorch":
        from distilkit.export.runtime import require_onnx

        out["onnxruntime"] = require_onnx().__version__
    return out


def _empty_stack_model(model: nn.Module, layers) -> nn.Module:
    """A fresh model of ``model``'s class and config with ``layers`` unpruned layers (an int
    for every stack, or one per stack: an encoder-decoder's encoder and decoder), random
    weights: timing does not depend on their values."""
    cfg = copy.deepcopy(model.config)
    adapter = get_adapter(model, "latency table")
    attrs = list(adapter.depths())
    per_stack = [layers] * len(attrs) if isinstance(layers, int) else list(layers)
    for attr, n in zip(attrs, per_stack):
        setattr(cfg, attr, n)
    torch.manual_seed(0)
    return type(model)(cfg).float().eval()


def _pruned_layer(layer: nn.Module, model: nn.Module, heads: int, ffn: int) -> None:
    """Prune the only layer of ``model`` (a deep copy of ``layer`` put in its place) to its
    first ``heads`` (self-attention) heads and ``ffn`` neurons."""
    adapter = get_adapter(model, "latency table")
    [name] = adapter.layers()
    stack, index = name.rsplit(".", 1)
    # The copy shares the model's config: a copy of its own (deepcopy's default) kept the
    # attention implementation the export switches the model's config to for fusing, so no
    # grid point's int8 graph was fused while every student's was (2026-12-08).
    model.get_submodule(stack)[int(index)] = copy.deepcopy(layer,
                                                           {id(model.config): model.config})
    block = next(b for b in adapter.attention_blocks() if b.kind == "self")
    adapter.prune_heads(block, list(range(heads)))
    f = adapter.ffn_blocks()[0]
    keep = torch.arange(ffn)
    for up in f.up:
        slice_rows(model, up, keep)
    slice_cols(model, f.down, keep)


def _measure_table(model: nn.Module, shape: BaseShape, spec: RuntimeSpec, heads: list[int],
                   ffn: list[int], progress: bool, ranks: Sequence[int] = (),
                   paired: bool = True) -> dict:
    """Measure the base and every grid point (module docstring); with ``ranks``, what the
    unpruned layer saves with all its weights factorized at each of them. Every model is
    timed in turns with one stopwatch model (the unpruned one-layer model,
    :func:`_pair_ms`), in a shuffled order, and costs its ratio to the stopwatch times the
    stopwatch's median over the whole table: a busy minute slows a model and the stopwatch
    beside it alike, and what it leaves lands on no axis of the grid. ``paired=False``: the
    protocol before 2026-12-07 (each model timed alone, in grid order; its cost its median
    ms), kept as the baseline of scripts/bench_latency_table.py."""
    from tqdm.auto import tqdm

    from distilkit.compress.low_rank import factorized_shapes

    seq2seq = is_seq2seq(model)
    # An encoder-decoder: the base has no layer in either stack, and each stack's layer is
    # timed alone in its own stack (a decoder layer runs once per generated token).
    base_model = _empty_stack_model(model, (0, 0) if seq2seq else 0)
    ones = [_empty_stack_model(model, (1, 0) if seq2seq else 1)]
    if seq2seq:
        ones.append(_empty_stack_model(model, (0, 1)))
    watch = _empty_stack_model(model, (1, 0) if seq2seq else 1)
    # each small model's unpruned layer, kept aside: every grid point prunes a copy of it
    full_layers = [one.get_submodule(get_adapter(one).layers()[0]) for one in ones]
    names = role_names(ones[0])[0] if ranks else []

    def grid_model(stack: int, h: int, f: int) -> nn.Module:
        _pruned_layer(full_layers[stack], ones[stack], h, f)
        return ones[stack]

    def rank_model(r: int, low: bool) -> nn.Module:
        one = grid_model(0, shape.num_heads, shape.intermediate)
        if not low:
            return one
        shapes = [tuple(one.get_submodule(n).weight.shape) for n in names]
        return factorized_shapes(one, {n: r for n, (m, k) in zip(names, shapes)
                                       if factorizes(m, k, r)})

    fused = fuses_attention(model, spec)
    jobs = [("base",)] + [("grid", stack, i, j) for stack in range(len(ones))
                          for i in range(len(heads)) for j in range(len(ffn))] \
        + [("rank", k, low) for k in range(len(ranks)) for low in (False, True)] \
        + ([("fused", None)] + [("fused", j) for j in range(len(ffn))] if fused else [])
    # Shuffled (the same order each time): timed row by row, the machine getting busier
    # while the table was measured read as heads costing more.
    order = [jobs[0]] + random.Random(0).sample(jobs[1:], len(jobs) - 1) if paired else jobs
    bar = tqdm(total=len(jobs), desc=f"latency table ({spec.runtime})", unit="model",
               disable=not progress)
    t0 = time.perf_counter()
    ratio, watch_ms = {}, []
    try:
        # (the baseline protocol times each model alone: no stopwatch)
        with _runner(watch, spec) if paired else contextlib.nullcontext() as run_watch:
            if paired:   # a fast stopwatch gets more rounds, as _median_ms a fast model runs
                first = _median_ms(run_watch, spec.clock, REPEATS)
                repeats = max(REPEATS, min(MAX_REPEATS,
                                           math.ceil(MIN_TIMED_MS / max(first, 1e-6))))
            for job in order:
                if job[0] == "base" or job == ("fused", None):
                    m = base_model
                elif job[0] == "grid":
                    m = grid_model(job[1], heads[job[2]], ffn[job[3]])
                elif job[0] == "fused":
                    m = grid_model(0, shape.num_heads, ffn[job[1]])
                else:
                    m = rank_model(ranks[job[1]], job[2])
                # the fused attention of an int8 graph only on the "fused" row (module
                # docstring): every other point is priced as a head-pruned student runs
                attention = job[0] == "fused" or not fused
                if paired:
                    with _runner(m, spec, attention) as run:
                        ms, ref = _pair_ms(run, run_watch, spec.clock, repeats, PAIR_BLOCK)
                    ratio[job] = ms / max(ref, 1e-9)
                    watch_ms.append(ref)
                else:
                    with _runner(m, spec, attention) as run:
                        ratio[job] = _median_ms(run, spec.clock, REPEATS)
                bar.update()
    finally:
        bar.close()
    unit = float(statistics.median(watch_ms)) if paired else 1.0
    base = ratio[("base",)] * unit
    grids = [[[(ratio[("grid", stack, i, j)] * unit - base) for j in range(len(ffn))]
              for i in range(len(heads))] for stack in range(len(ones))]
    out = {"base_ms": base, "layer_ms": grids[0], "stopwatch_ms": unit,
           "seconds": round(time.perf_counter() - t0, 1)}
    if seq2seq:
        out["decoder_layer_ms"] = grids[1]
    if ranks:
        out["rank_saving_ms"] = [(ratio[("rank", k, False)] - ratio[("rank", k, True)]) * unit
                                 for k in range(len(ranks))]
    if fused:
        out["fused_base_ms"] = ratio[("fused", None)] * unit
        out["fused_layer_ms"] = [(ratio[("fused", j)] - ratio[("fused", None)]) * unit
                                 for j in range(len(ffn))]
    return out


class LatencyTable:
    """The measured cost of every structure of one base shape in one runtime spec."""

    tolerance: float = TOLERANCE

    def __init__(self, shape: BaseShape, spec: RuntimeSpec, heads: Sequence[int],
                 ffn: Sequence[int], base_ms: float, layer_ms: Sequence[Sequence[float]],
                 path: Optional[str] = None, measured: bool = False,
                 ranks: Sequence[int] = (), rank_saving_ms: Sequence[float] = (),
                 decoder_layer_ms: Optional[Sequence[Sequence[float]]] = None,
                 fused_base_ms: Optional[float] = None,
                 fused_layer_ms: Optional[Sequence[float]] = None):
        self.shape, self.spec = shape, spec
        self.heads, self.ffn = list(heads), list(ffn)
        self._base, self._layer = float(base_ms), [list(map(float, r)) for r in layer_ms]
        self.path, self.measured = path, measured
        # an encoder-decoder's decoder layer (its own law: it runs once per generated token)
        self._decoder = None if decoder_layer_ms is None else \
            [list(map(float, r)) for r in decoder_layer_ms]
        self.fit = fit_layer_cost(self.heads, self.ffn, self._layer)
        self.decoder_fit = None if self._decoder is None else \
            fit_layer_cost(self.heads, self.ffn, self._decoder)
        # (per_weight, per_factorized) of factorized layers; None: not measured (no ranks)
        self.ranks, self.rank_saving = list(ranks), [float(v) for v in rank_saving_ms]
        self.rank_fit = fit_rank_cost(role_shapes(shape.num_heads, shape.intermediate, shape),
                                      self.ranks, self.rank_saving) if self.ranks else None
        # An int8 graph with onnxruntime's fused attention (every head kept): its base and
        # its unpruned layers at each FFN width, fitted on their own (None: no such graph)
        self._fused_base = None if fused_base_ms is None else float(fused_base_ms)
        self._fused = None if fused_layer_ms is None else [float(v) for v in fused_layer_ms]
        self.fused_fit = None if self._fused is None else \
            fit_layer_cost([shape.num_heads], self.ffn, [self._fused])
        residuals = [abs(g / max(self.layer_ms(h, f, stack), 1e-9) - 1.0)
                     for stack, grid in enumerate(filter(None, (self._layer, self._decoder)))
                     for h, row in zip(self.heads, grid) for f, g in zip(self.ffn, row)]
        residuals += [abs(g / max(self.layer_ms(shape.num_heads, f, fused=True), 1e-9) - 1.0)
                      for f, g in zip(self.ffn, self._fused or ())]
        self.fit_error = float(statistics.median(residuals))

    # -- building -------------------------------------------------------------------------
    @classmethod
    def for_model(cls, model: nn.Module, spec: RuntimeSpec, cache_dir: Optional[str] = None,
                  progress: bool = True, grid: Optional[int] = None,
                  validate: bool = False, ranks: bool = False) -> "LatencyTable":
        """The table of ``model``'s base shape in ``spec``: read from the cache, else measured
        and cached. ``grid``: points per axis (default every head count and
        :data:`DEFAULT_GRID` FFN widths); at least 2. ``validate``: time ``model`` itself
        once and measure a cached table again when it mispredicts it by more than
        :attr:`tolerance`: the cache key names the machine, not how busy it was, and a table
        measured under load predicted 946 ms for a student a quiet machine ran in 418.
        ``ranks``: also time the unpruned layer factorized at :func:`rank_points` (another
        cached table: its key names the ranks), so that structures with ranks are predicted."""
        if not isinstance(spec, RuntimeSpec):
            raise ValueError(f"spec={spec!r}: give a RuntimeSpec(runtime, batch, seq_len, "
                             "threads)")
        if grid is not None and (isinstance(grid, bool) or not isinstance(grid, int)
                                 or grid < 2):
            raise ValueError(f"grid={grid!r} must be an integer >= 2 (points per axis)")
        _check_model(model, spec)
        if ranks and is_seq2seq(model):
            raise ValueError("ranks=True: the factorized layers are timed for encoder "
                             "classifiers only, not for an encoder-decoder model")
        shape = base_shape_of(model)
        heads = grid_points(shape.num_heads, grid or shape.num_heads)
        ffn = grid_points(shape.intermediate, grid or DEFAULT_GRID)
        key = {"version": TABLE_VERSION, "shape": shape.key(), "spec": spec.key(),
               "machine": machine_key(spec.runtime), "heads": heads, "ffn": ffn,
               "protocol": {"warmup": WARMUP, "repeats": REPEATS,
                            "min_timed_ms": MIN_TIMED_MS, "max_repeats": MAX_REPEATS}}
        if ranks:
            key["ranks"] = rank_points(shape)
        if is_seq2seq(model):
            key["decoder"] = True   # a second grid: the decoder's layer
        if fuses_attention(model, spec):
            key["fused"] = True     # a second law: int8 with fused attention
        if spec.runtime != "pytorch":
            # How the exported files are made and served changes what they cost: a table
            # measured on other graphs (the int8 ones with SkipLayerNormalization, before
            # 2026-12-02) is not this one.
            from distilkit.export.runtime import DISABLED_OPTIMIZERS, TIMING_SPIN_US

            key["serving"] = {"graphs": ONNX_GRAPHS, "disabled_optimizers":
                              list(DISABLED_OPTIMIZERS), "spin_us": TIMING_SPIN_US}
        path = cls.cache_path(key, cache_dir)
        cached = cls._load(path, key, shape, spec)
        if cached is not None and validate:
            # The better of two: the first forward passes of a fresh process run slow (663
            # against 383 ms for the same 6-layer student, 2026-12-02).
            predicted = cached.predict_ms(structure_of(model))
            measured = min(_time_model(model, spec) for _ in range(2))
            if abs(predicted - measured) > cached.tolerance * measured:
                logger.warning("latency table %s predicts %.1f ms for a model measured now at "
                               "%.1f ms (the machine's load has changed since): measuring it "
                               "again", path, predicted, measured)
                cached = None
        if cached is not None:
            return cached
        figures = _measure_table(model, shape, spec, heads, ffn, progress,
                                 key.get("ranks", ()))
        from distilkit.files import atomic_write_json

        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write_json(path, {"key": key, **figures})
        return cls(shape, spec, heads, ffn, figures["base_ms"], figures["layer_ms"], path,
                   measured=True, ranks=key.get("ranks", ()),
                   rank_saving_ms=figures.get("rank_saving_ms", ()),
                   decoder_layer_ms=figures.get("decoder_layer_ms"),
                   fused_base_ms=figures.get("fused_base_ms"),
                   fused_layer_ms=figures.get("fused_layer_ms"))

    @staticmethod
    def cache_path(key: dict, cache_dir: Optional[str] = None) -> str:
        if cache_dir is None:
            from distilkit.data import cache_root

            cache_dir = os.path.join(cache_root(), "latency")
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        return os.path.join(cache_dir, f"{key['shape']['family']}-{digest}.json")

    @classmethod
    def _load(cls, path: str, key: dict, shape: BaseShape, spec: RuntimeSpec
              ) -> Optional["LatencyTable"]:
        if not os.path.exists(path):
            return None
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            if data["key"] != key:
                raise ValueError("it holds another table's key")
            decoder = data["decoder_layer_ms"] if key.get("decoder") else None
            grid = data["layer_ms"]
            for g in filter(None, (grid, decoder)):
                if len(g) != len(key["heads"]) or any(len(r) != len(key["ffn"]) for r in g):
                    raise ValueError("its grid does not match its key")
            saving = data.get("rank_saving_ms", []) if "ranks" in key else []
            if len(saving) != len(key.get("ranks", [])):
                raise ValueError("its factorized timings do not match its key")
            fused = (float(data["fused_base_ms"]), data["fused_layer_ms"]) \
                if key.get("fused") else (None, None)
            if fused[1] is not None and len(fused[1]) != len(key["ffn"]):
                raise ValueError("its fused-attention timings do not match its key")
            return cls(shape, spec, key["heads"], key["ffn"], float(data["base_ms"]), grid,
                       path, ranks=key.get("ranks", ()), rank_saving_ms=saving,
                       decoder_layer_ms=decoder, fused_base_ms=fused[0],
                       fused_layer_ms=fused[1])
        except (OSError, ValueError, KeyError, TypeError) as e:
            logger.warning("latency table %s cannot be read (%s): measuring it again", path, e)
            return None

    # -- predicting -----------------------------------------------------------------------
    def base_ms(self) -> float:
        """Embeddings, pooler and classifier head: the model with no encoder layer."""
        return self._base

    def layer_ms(self, heads: int, ffn: int, stack: int = 0, fused: bool = False) -> float:
        """One layer of ``stack`` (0: the encoder; 1: an encoder-decoder's decoder) keeping
        ``heads`` heads and ``ffn`` neurons (the law fitted to its grid,
        :func:`fit_layer_cost`); ``fused``: in an int8 graph with fused attention (every head
        kept, a table with :attr:`fused_fit`)."""
        if not 1 <= heads <= self.shape.num_heads or not 1 <= ffn <= self.shape.intermediate:
            raise ValueError(f"layer_ms: heads={heads}, ffn={ffn} outside this table's shape "
                             f"(heads 1..{self.shape.num_heads}, ffn 1..{self.shape.intermediate})")
        if stack and self.decoder_fit is None:
            raise ValueError("layer_ms: this table has no decoder (an encoder's table)")
        if fused and (self.fused_fit is None or heads != self.shape.num_heads or stack):
            raise ValueError(f"layer_ms: fused=True is for an int8 table's layers keeping all "
                             f"{self.shape.num_heads} heads (got heads={heads})")
        fixed, per_head, per_neuron = self.decoder_fit if stack else \
            self.fused_fit if fused else self.fit
        return fixed + per_head * heads + per_neuron * ffn

    def rank_saving_ms(self, heads: int, ffn: int, ranks: Sequence[int]) -> float:
        """What a layer keeping ``heads`` heads and ``ffn`` neurons saves with its weights at
        ``ranks`` (:attr:`Structure.ranks` order; the law of :func:`fit_rank_cost`)."""
        if not any(ranks):
            return 0.0
        if self.rank_fit is None:
            raise ValueError("this latency table was measured without factorized layers, so "
                             "it cannot predict a structure with ranks: build it with "
                             "LatencyTable.for_model(..., ranks=True)")
        saved, count = _rank_terms(role_shapes(heads, ffn, self.shape, len(ranks)), ranks)
        per_weight, per_factorized = self.rank_fit
        return per_weight * saved - per_factorized * count

    def fused_layers(self, structure: Structure) -> list[bool]:
        """Which layers of ``structure`` its int8 graph runs with onnxruntime's fused attention
        (:func:`distilkit.export.classifier.int8_file`): none in a table without the fused
        law, nor when a head is pruned anywhere (the graph is fused with one head count for
        the whole model, its check fails and the export falls back to the graph without
        it); otherwise every layer but those with a factorized q, k, v or o weight, which
        breaks the pattern the optimizer fuses (measured on exports, 2026-12-08)."""
        n = structure.num_layers()
        if self.fused_fit is None or any(h != self.shape.num_heads for h in structure.heads):
            return [False] * n
        return [not any(r[:4]) for r in (structure.ranks or ((),) * n)]

    def predict_ms(self, structure: Structure) -> float:
        """The latency of a model of this shape pruned to ``structure`` (and, with its
        ``ranks``, factorized); a layer costs at least nothing."""
        ranks = structure.ranks or ((),) * structure.num_layers()
        fused = self.fused_layers(structure)
        # the embeddings fuse with their layer norm only before a fused first layer
        base = self._fused_base if fused and fused[0] else self._base
        return base + sum(
            max(0.0, self.layer_ms(h, f, stack, fu) - self.rank_saving_ms(h, f, r))
            for h, f, r, stack, fu in zip(structure.heads, structure.ffn, ranks,
                                          structure.stack_of(), fused))

    def measure_ms(self, model: nn.Module) -> float:
        """``model`` measured whole in this table's runtime spec (ground truth)."""
        return measure_model_ms(model, self.spec)
