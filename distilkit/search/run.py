"""A recipe with ``compression: [{method: auto, target: {...}}, ...]`` run end to end: the
budget search (:mod:`distilkit.search.netadapt`) on the recipe's own student, teacher and
data, then the ordinary distillation run of the structure it found.

1. The run is prepared exactly as :func:`distilkit.pipeline.run_recipe` prepares it
   (:func:`~distilkit.pipeline.prepare_run`: checks, data, teachers, student, teacher outputs).
2. For a latency target the latency table of the student's shape is built (or read from its
   cache) and the teacher measured in the same runtime spec; the smallest student the search
   may reach is measured (size targets: counted), and an unreachable target is refused in one
   line naming the smallest reachable figure, before any student is trained.
3. The search shrinks the student step by step, each step scored with the distillation loss
   (the run's own ``DistilTrainer.compute_loss``), pruned physically, distilled
   ``steps_between`` steps with the run's loss, measured and scored on the validation split
   (with ``choose: measured``, each of the step's proposals is pruned and distilled from a
   copy, on the same batches, and the lowest validation loss kept).
4. The structure found becomes ordinary compression entries (``prune_heads`` with explicit
   ``heads``, ``prune_ffn`` with explicit ``neurons``, ``prune_layers`` with explicit
   ``layers``, in the original student's indices), with ``units: ranks`` a ``low_rank``
   entry with the searched ``ranks`` by module name, followed by the recipe's entries after
   ``auto``; :func:`~distilkit.pipeline.run_recipe` runs that resolved recipe from the
   recipe's student as any recipe, so ``output_dir/recipe.yaml`` reproduces the structure
   without searching. ``output_dir/search.json`` keeps the search's history, and
   ``results.json`` a ``search`` entry: the target, whether it is met, the final student's
   measured latency, speed-up, parameters and size.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import sys
import tempfile
import time
from typing import Optional

from torch import nn

SEARCH_FILE = "search.json"


class _AsTraining(nn.Module):
    """``model`` as :meth:`DistilTrainer.compute_loss` sees a model in training (it returns
    the distillation loss only then), while the model itself stays in eval mode (dropout off)
    for the importance scores."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.inner = model

    def __getattr__(self, name: str):
        # the loss reads the model's own attributes (a seq2seq model's config and
        # prepare_decoder_input_ids_from_labels)
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "inner":
                raise
            return getattr(self.inner, name)

    def forward(self, **kwargs):
        return self.inner(**kwargs)


def _mini_args(recipe, budget, step: int, out_dir: str, progress: bool):
    """Training arguments of the short distillation after a search step: the recipe's own
    (loss weights, learning rate, batch size), ``steps_between`` steps at a constant rate, a
    seed per step (each step sees other batches), nothing saved or evaluated by the Trainer."""
    seed = int(recipe.training.get("seed", 42)) + step
    return recipe.distil_config(
        disable_tqdm=True, max_steps=max(1, budget.steps_between), lr_scheduler_type="constant",
        warmup_steps=0, seed=seed, data_seed=seed, output_dir=out_dir,
        logging_steps=max(1, budget.steps_between), eval_strategy="no", save_strategy="no",
        load_best_model_at_end=False, report_to=[])


def _remove_all_but_smallest(structure, units, ffn_block):
    """The removal (current positions) that leaves :func:`smallest_structure`."""
    from distilkit.search.netadapt import Removal

    of = structure.stack_of()
    # the first layer of each stack stays (an encoder-decoder keeps one per stack)
    keep = [l for l in range(len(of)) if "layers" not in units or l == of.index(of[l])]
    return Removal(
        heads={l: list(range(1, structure.heads[l])) for l in keep
               if "heads" in units and structure.heads[l] > 1},
        neurons={l: list(range(ffn_block, structure.ffn[l])) for l in keep
                 if "ffn" in units and structure.ffn[l] > ffn_block},
        layers=[l for l in range(len(of)) if l not in keep])


def prune_removal(model: nn.Module, removal) -> nn.Module:
    """Remove ``removal``'s units (current positions) physically with the explicit forms of
    ``prune_heads`` / ``prune_ffn`` / ``prune_layers`` (cuts inside layers first, then the
    layers, so each method sees the positions the removal names)."""
    from distilkit.compress.base import compress_
    from distilkit.compress.families import get_adapter
    from distilkit.compress.prune import PruneFFNConfig, PruneHeadsConfig, PruneLayersConfig

    adapter = get_adapter(model, "method auto")
    layers = adapter.layers()
    holders = {b.layer: b.holder for b in adapter.attention_blocks() if b.kind == "self"}
    ffns = {b.layer: b.name for b in adapter.ffn_blocks()}
    if removal.heads:
        compress_(model, PruneHeadsConfig(heads={holders[layers[p]]: v
                                                 for p, v in removal.heads.items()}))
    if removal.neurons:
        compress_(model, PruneFFNConfig(neurons={ffns[layers[p]]: v
                                                 for p, v in removal.neurons.items()}))
    if removal.layers:
        compress_(model, PruneLayersConfig(layers=list(removal.layers)))
    return model


def _describe(structure) -> str:
    n, hs, fs = structure.num_layers(), set(structure.heads), set(structure.ffn)
    if n == 1:
        h, f = structure.heads[0], structure.ffn[0]
        return f"1 layer, {h} head{'s' * (h > 1)}, {f} FFN neurons"
    heads = f"{hs.pop()} head{'s' * (max(structure.heads) > 1)}" if len(hs) == 1 else \
        f"{min(structure.heads)}-{max(structure.heads)} heads"
    ffn = f"{fs.pop()}" if len(fs) == 1 else f"{min(structure.ffn)}-{max(structure.ffn)}"
    stacks = f" ({structure.stacks[0]} encoder + {structure.stacks[1]} decoder)" \
        if structure.stacks else ""
    return f"{n} layers{stacks}, {heads} and {ffn} FFN neurons each"


def _where_timed(budget) -> str:
    """The runtime spec in words (a seq2seq student's: with the tokens it generates)."""
    return (f"{budget.runtime}, batch {budget.batch}, length {budget.seq_len}"
            + (f", {budget.new_tokens} tokens generated" if budget.new_tokens else ""))


def unreachable_message(budget, smallest_desc: str, figure: float,
                        teacher_ms: Optional[float], vocab: Optional[int] = None,
                        storage=None) -> str:
    """The one line refusing a target the smallest reachable student misses (``figure``: its
    measured ms, or its parameters / MB; ``vocab``: the word rows a later ``prune_vocab``
    keeps, which a size figure counts)."""
    where = f"compression[0] (auto): target.{budget.target}: {budget.value:g} cannot be reached"
    spec = _where_timed(budget)
    if budget.target == "speedup":
        best = teacher_ms / figure
        return (f"{where}: the smallest student ({smallest_desc}) is {best:.1f}x the teacher "
                f"({figure:.1f} ms vs {teacher_ms:.1f} ms, {spec}); ask for at most "
                f"{math.floor(best * 10) / 10:g}")
    if budget.target == "latency_ms":
        return (f"{where}: the smallest student ({smallest_desc}) takes {figure:.2f} ms "
                f"({spec}); ask for at least {math.ceil(figure * 100) / 100:g}")
    words = (f"with the {vocab:,} word rows the prune_vocab after auto keeps" if vocab else
             "the whole word table counts: {method: prune_vocab} after auto keeps only the "
             "rows the training data uses, and the search counts it")
    if budget.target == "parameters":
        return (f"{where}: the smallest student ({smallest_desc}) has {int(figure):,} "
                f"parameters ({words}); ask for at least {int(figure)}")
    kind = (f"weights as the quantization after auto stores them ({storage.describe()})"
            if storage else "fp32 weights")
    return (f"{where}: the smallest student ({smallest_desc}) is {figure:.3f} MB of {kind} "
            f"({words}); ask for at least {math.ceil(figure * 1000) / 1000:g}")


class _Searcher:
    """The model-facing steps of :func:`distilkit.search.netadapt.search` for one run."""

    def __init__(self, recipe, parts, budget, work_dir: str, progress: bool, storage=None):
        self.recipe, self.parts, self.budget = recipe, parts, budget
        self.work_dir, self.progress = work_dir, progress
        self.storage = storage   # with units bits: how the later quantize stores weights
        self.trainer = None
        ev = parts.prep.eval_dataset
        self.eval_ds = ev.select(range(min(len(ev), budget.eval_examples))) \
            if budget.eval_examples and ev is not None else None

    def _trainer(self, model, step: int):
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        from distilkit.seq2seq.generate_eval import GenerationEvalCallback

        args = _mini_args(self.recipe, self.budget, step, self.work_dir, self.progress)
        self.trainer = self.parts.trainer(model, args=args)
        # The search's own line per step is its progress; the Trainer's log dicts of every
        # short run (several per step with measured proposals) would bury it. A seq2seq
        # run's generation scoring would decode the validation split after every proposal:
        # the search judges them by the validation loss alone.
        for cb in (PrinterCallback, ProgressCallback, GenerationEvalCallback):
            self.trainer.remove_callback(cb)
        return self.trainer

    def score(self, model):
        """Gradient importance of every head, FFN neuron and layer against the run's
        distillation loss, on a fresh sample of training batches each step."""
        import torch

        from distilkit.compress.families import get_adapter
        from distilkit.compress.importance import ffn_importance, head_importance, layer_importance
        from distilkit.search.netadapt import Scores

        trainer = self.trainer
        if trainer is None or trainer.model is not model:  # the last one may be a proposal's
            trainer = self._trainer(model, 0)
        step = getattr(self, "_scored", 0)
        self._scored = step + 1
        bs = self.parts.args.per_device_train_batch_size
        ds = self.parts.prep.train_dataset.shuffle(seed=int(self.parts.args.seed) + step)
        ds = ds.select(range(min(len(ds), bs * self.budget.importance_batches)))
        ctx = self.parts.context(max_batches=self.budget.importance_batches, dataset=ds,
                                 loss_fn=lambda m, b: trainer.compute_loss(_AsTraining(m), b))
        adapter = get_adapter(model, "method auto")
        layers = adapter.layers()
        units = self.budget.units
        blocks = [b for b in adapter.attention_blocks() if b.kind == "self"]
        ffns = adapter.ffn_blocks()
        heads = head_importance(adapter, ctx) if "heads" in units else \
            {b.holder: torch.zeros(adapter.num_heads(b)) for b in blocks}
        neurons = ffn_importance(adapter, ctx, "gradient") if "ffn" in units else \
            {b.name: torch.zeros(model.get_submodule(b.down).in_features) for b in ffns}
        lay = layer_importance(adapter, ctx) if "layers" in units else dict.fromkeys(layers, 0.0)
        by_layer_h = {b.layer: heads[b.holder].tolist() for b in blocks}
        by_layer_f = {b.layer: neurons[b.name].tolist() for b in ffns}
        bits = None
        if "bits" in units:
            from distilkit.compress.quantize import fisher_errors
            from distilkit.search.storage import role_names

            names = role_names(model)
            top = max(b for row in self.storage.rows() for b in row)
            flat = fisher_errors(model, [n for row in names for n in row], ctx,
                                 self.budget.importance_batches,
                                 list(range(self.budget.min_bits, top + 1)),
                                 self.storage.bucket_size)
            it = iter(flat)
            bits = [[next(it) for _ in row] for row in names]
        ranks = self._rank_scores(model, ctx) if "ranks" in units else None
        return Scores(heads=[by_layer_h[n] for n in layers],
                      neurons=[by_layer_f[n] for n in layers], layers=[lay[n] for n in layers],
                      bits=bits, ranks=ranks)

    def _rank_scores(self, model, ctx) -> list:
        """Per layer and weight, ``{rank: Fisher-estimated loss}`` over the ranks it may take
        at its current shape: the multiples of ``rank_block`` whose factors are smaller than
        it, and 0 (dense, no loss)."""
        from distilkit.compress.low_rank import fisher_rank_errors
        from distilkit.search.structure import factorizes, role_names

        block = self.budget.rank_block
        names = role_names(model)
        flat_names = [n for row in names for n in row]
        allowed = []
        for name in flat_names:
            m, n = model.get_submodule(name).weight.shape
            allowed.append([r for r in range(block, min(m, n) + 1, block)
                            if factorizes(m, n, r)])
        errs = fisher_rank_errors(model, flat_names, ctx, self.budget.importance_batches,
                                  allowed)
        it = iter(errs)
        return [[{0: 0.0, **next(it)} for _ in row] for row in names]

    def distil(self, model, step: int, structure=None) -> dict:
        """``steps_between`` distillation steps of the pruned student, then its validation
        figures on the first ``eval_examples`` examples; with ``structure.bits``, of the
        student with those weights quantized as the later entry will store them (trained in
        fp32 meanwhile: the figures judge what it would become, not how it trains); with
        ``structure.ranks``, with those weights projected to their ranks (trained dense
        meanwhile, likewise)."""
        import contextlib

        trainer = self._trainer(model, step)
        out: dict = {}
        if self.budget.steps_between > 0:
            trainer.train()
            logs = [h for h in trainer.state.log_history if "loss" in h]
            if logs:
                out["train_loss"] = round(float(logs[-1]["loss"]), 6)
        stored = contextlib.nullcontext()
        if structure is not None and structure.bits is not None:
            from distilkit.compress.quantize import quantized_weights
            from distilkit.search.storage import bits_patterns

            stored = quantized_weights(model, bits_patterns(model, structure.bits, default=0),
                                       self.storage.bucket_size)
        if structure is not None and structure.ranks is not None:
            from distilkit.compress.low_rank import low_rank_weights
            from distilkit.search.structure import rank_patterns

            stored = low_rank_weights(model, rank_patterns(model, structure.ranks))
        if self.eval_ds is not None and len(self.eval_ds):
            with stored:
                m = trainer.evaluate(eval_dataset=self.eval_ds)
            out.update({k if k == "eval_loss" else k[len("eval_"):]: round(float(v), 6)
                        for k, v in m.items()
                        if k in ("eval_accuracy", "eval_macro_f1", "eval_loss")})
        model.eval()
        return out


def later_vocab(rest: list, student: nn.Module, parts) -> Optional[int]:
    """The word rows a ``prune_vocab`` after ``auto`` will keep of ``student`` (the tokens of
    the whole training split and the specials, as it will count them), or None without one.
    A size target counts the student as it is saved, so the search counts these rows, not
    the whole table it prunes nothing of."""
    from distilkit.compress.base import config_from_dict
    from distilkit.compress.vocab import kept_ids

    entry = next((e for e in rest if isinstance(e, dict) and e.get("method") == "prune_vocab"),
                 None)
    if entry is None:
        return None
    return len(kept_ids(student, config_from_dict(entry), parts.context())[0])


class VocabMask:
    """The forward pre-hook a search over ``vocab`` puts on the student's word embedding: each
    id the later ``prune_vocab`` will not keep reads the [UNK] row, as it will in the saved
    student, so every proposal is trained and scored on what it will compute. ``data``: the
    kept data tokens, most frequent first (:func:`~distilkit.compress.vocab.droppable_ids`);
    :meth:`drop` sends the rarest of them to [UNK] too. A deep copy of the model copies it."""

    def __init__(self, kept: list, data: list, unk: int, vocab_size: int):
        import torch

        self.id_map = torch.full((vocab_size,), unk, dtype=torch.long)
        self.id_map[torch.tensor(kept, dtype=torch.long)] = torch.tensor(kept, dtype=torch.long)
        self.data, self.kept_data, self.unk = list(data), len(data), unk

    def __call__(self, module, args):
        ids = args[0]
        return (self.id_map.to(ids.device)[ids], *args[1:])

    def drop(self, rows: int) -> None:
        if not 0 < rows <= self.kept_data:
            raise ValueError(f"VocabMask.drop({rows}): {self.kept_data} data tokens are kept")
        import torch

        gone = self.data[self.kept_data - rows:self.kept_data]
        self.id_map[torch.tensor(gone, dtype=torch.long)] = self.unk
        self.kept_data -= rows

    @classmethod
    def install(cls, model: nn.Module, kept: list, data: list, unk: int) -> "VocabMask":
        emb = model.get_input_embeddings()
        mask = cls(kept, data, unk, emb.num_embeddings)
        emb.register_forward_pre_hook(mask)
        return mask

    @classmethod
    def of(cls, model: nn.Module) -> "VocabMask":
        hooks = model.get_input_embeddings()._forward_pre_hooks.values()
        return next(h for h in hooks if isinstance(h, cls))


def later_droppable(rest: list, student: nn.Module, parts) -> tuple[list, list, int]:
    """``(kept ids, the data tokens among them most frequent first, [UNK])`` of the
    ``prune_vocab`` after ``auto`` (:func:`~distilkit.compress.vocab.droppable_ids`)."""
    from distilkit.compress.base import config_from_dict
    from distilkit.compress.vocab import droppable_ids

    entry = next(e for e in rest if isinstance(e, dict) and e.get("method") == "prune_vocab")
    return droppable_ids(student, config_from_dict(entry), parts.context())


def with_max_tokens(rest: list, max_tokens: int) -> list:
    """``rest`` with its ``prune_vocab`` entry keeping the ``max_tokens`` most frequent
    training tokens: the word rows a search over ``vocab`` chose."""
    j = max(i for i, e in enumerate(rest) if isinstance(e, dict) and e.get("method") == "prune_vocab")
    return rest[:j] + [{**rest[j], "max_tokens": int(max_tokens)}] + rest[j + 1:]


def later_id_map_bytes(rest: list, student: nn.Module, storage) -> int:
    """Bytes of the int32 id map a ``prune_vocab`` after ``auto`` saves with the student:
    one entry per original token when it keeps the id-map form (``tokenizer: keep``, or a
    later quantization that packs the kept table, which a plain embedding of a shrunk
    tokenizer cannot then be made of); 0 otherwise. 122 KB on MiniLM: 2% of a 6 MB student."""
    entry = next((e for e in rest if isinstance(e, dict) and e.get("method") == "prune_vocab"),
                 None)
    if entry is None:
        return 0
    if entry.get("tokenizer", "shrink") == "keep" or (storage is not None and storage.word):
        return 4 * int(student.get_input_embeddings().num_embeddings)
    return 0


def later_storage(rest: list, student: nn.Module):
    """How a ``quantize`` / ``ptq`` after ``auto`` will store ``student``
    (:class:`~distilkit.search.storage.Storage`), or None without one: a size target counts
    the weights as that entry saves them, not in fp32."""
    from distilkit.compress.base import config_from_dict
    from distilkit.search.storage import storage_of

    from distilkit.budget import QUANTIZERS

    entry = next((e for e in rest if isinstance(e, dict) and e.get("method") in QUANTIZERS),
                 None)
    if entry is None:
        return None
    try:
        return storage_of(student, config_from_dict(entry))
    except ValueError as e:
        raise ValueError(f"compression ({entry['method']} after auto): {e}") from None


def with_bits(rest: list, model: nn.Module, bits: tuple) -> list:
    """``rest`` with its last quantize / ptq entry storing ``model``'s layer weights at the
    searched ``bits`` (:attr:`Structure.bits`): the ones that differ from its ``bits`` become
    its ``bits_per_pattern`` (exact module names of the pruned student, which the final run's
    student has too: prune_layers renumbers its layers the same way). An entry with its own
    ``bits_per_pattern`` (where the search started) gets every layer weight's exact name
    first, then its own globs, which still decide the weights outside the layers (the first
    matching pattern wins)."""
    from distilkit.budget import QUANTIZERS
    from distilkit.search.storage import bits_patterns

    j = max(i for i, e in enumerate(rest) if isinstance(e, dict) and e.get("method") in QUANTIZERS)
    entry = dict(rest[j])
    own = dict(entry.get("bits_per_pattern") or {})
    per = bits_patterns(model, bits, 0 if own else int(entry.get("bits", 4)))
    per.update({pat: b for pat, b in own.items() if pat not in per})
    if per:
        entry["bits_per_pattern"] = per
    return rest[:j] + [entry] + rest[j + 1:]


def project_ranks(model: nn.Module, changed: dict) -> None:
    """A rank cut of the search (``Removal.ranks``: per layer position ``{role: rank}``): the
    weights it names are replaced by their truncated SVDs where that rank factorizes them, so
    the short distillation after it starts from what the factors will compute."""
    from distilkit.compress.low_rank import project_
    from distilkit.search.structure import rank_patterns, role_names

    rows = [[changed.get(p, {}).get(j, 0) for j in range(len(row))]
            for p, row in enumerate(role_names(model))]
    project_(model, rank_patterns(model, rows))


def served_view(model: nn.Module, structure) -> nn.Module:
    """``model`` as it will be served when the search has given it ``structure.ranks``: a copy
    with those weights as factorized layers of the ranks' shapes, for timing (the searched
    student stays dense, its weights projected to the ranks); ``model`` itself when no weight
    is factorized."""
    from distilkit.compress.low_rank import factorized_shapes
    from distilkit.search.structure import rank_patterns

    per = rank_patterns(model, structure.ranks) if structure.ranks else {}
    return factorized_shapes(model, per) if per else model


def with_ranks(model: nn.Module, ranks: tuple) -> list:
    """The ``low_rank`` entry (a list of zero or one) that factorizes ``model``'s layer weights
    at the searched ``ranks`` (:attr:`Structure.ranks`), by the exact module names of the
    pruned student, which the final run's student has too after the pruning entries
    (prune_layers renumbers its layers the same way); weights a rank would not shrink stay
    dense."""
    from distilkit.search.structure import rank_patterns

    per = rank_patterns(model, ranks)
    return [{"method": "low_rank", "ranks": per}] if per else []


def _rounded(x: Optional[float]) -> Optional[float]:
    return None if x is None else round(x, 3)


def self_attention_holders(model: nn.Module) -> list:
    """The module name of each layer's self-attention, by (original) layer position."""
    from distilkit.compress.families import get_adapter

    adapter = get_adapter(model, "method auto")
    return [b.holder for b in adapter.attention_blocks() if b.kind == "self"]


def by_self_attention(entries: list, holders: list) -> list:
    """``entries`` with ``prune_heads``' layer positions named by their self-attention
    (``holders``): its indices would count an encoder-decoder's cross attentions too."""
    return [{**e, "heads": {holders[o]: v for o, v in e["heads"].items()}}
            if e["method"] == "prune_heads" else e for e in entries]


def _teacher_module(teachers):
    m = teachers.models()[0]
    return getattr(m, "inner", m)   # a label view computes what its teacher computes


def _teacher_ms(teacher: nn.Module, spec, repeats: int = 3) -> float:
    """The teacher's latency in ``spec``: the median of ``repeats`` measurements (a first
    measurement in a fresh process runs slow)."""
    import statistics

    from distilkit.search.latency import measure_model_ms

    return float(statistics.median(measure_model_ms(teacher, spec) for _ in range(repeats)))


def paired_ms(model: nn.Module, teacher: nn.Module, spec) -> tuple[float, float]:
    """``(model ms, teacher ms)`` measured in turns in ``spec``
    (:func:`~distilkit.search.latency.measure_pair_ms`): on a machine that other work slows
    now and then, both are slowed alike, so their ratio, the speed-up, stays what it is."""
    from distilkit.search.latency import measure_pair_ms

    return measure_pair_ms(model, teacher, spec)


def search_and_run(recipe, progress: bool = True) -> dict:
    """Search the structure for the recipe's ``auto`` target, then run the resolved recipe
    (module docstring). Returns the final run's results."""
    from distilkit.budget import split_auto
    from distilkit.files import atomic_write_json
    from distilkit.pipeline import prepare_run, run_recipe
    from distilkit.recipe import Recipe
    from distilkit.search.latency import LatencyTable, RuntimeSpec
    from distilkit.search.netadapt import Goal, search, smallest_structure
    from distilkit.search.structure import base_shape_of, parameters, size_mb, structure_of

    t0 = time.time()
    k = recipe.keys
    budget, rest = split_auto(k.compression, k.max_length, k.task, k.student,
                              recipe.data.streaming)
    args = recipe.distil_config(disable_tqdm=not progress)
    bare = Recipe.from_dict({**recipe.to_dict(), "compression": []}, source=recipe.source)
    parts = prepare_run(bare, progress, args)
    student = parts.student
    structure, shape = structure_of(student), base_shape_of(student)
    spec = RuntimeSpec(runtime=budget.runtime, batch=budget.batch, seq_len=budget.seq_len,
                       threads=budget.threads, clock=budget.clock,
                       new_tokens=(budget.new_tokens or 0) if structure.stacks else 0)
    droppable = later_droppable(rest, student, parts) if "vocab" in budget.units else None
    vocab = None if budget.latency else \
        len(droppable[0]) if droppable else later_vocab(rest, student, parts)
    storage = later_storage(rest, student) if budget.target == "size_mb" else None
    id_map_mb = later_id_map_bytes(rest, student, storage) / 1e6 if budget.target == "size_mb" \
        else 0.0
    for unit in ("bits", "vocab"):
        if unit in budget.units and (not budget.eval_examples or parts.prep.eval_dataset is None):
            raise ValueError(f"compression[0] (auto): units: {unit} compares proposals by the "
                             "validation loss of the student as it will be stored, and there "
                             "is no validation split to score: give data a validation split "
                             f"(or eval_examples > 0), or drop {unit}")
    if "bits" in budget.units:
        structure = dataclasses.replace(structure, bits=storage.rows())
    if "ranks" in budget.units:   # every layer weight starts dense
        from distilkit.search.structure import role_names

        structure = dataclasses.replace(
            structure, ranks=tuple((0,) * len(row) for row in role_names(student)))
    min_vocab = 1
    if droppable:
        # the search starts from the rows prune_vocab would keep, the rest reading [UNK]
        kept, data, unk = droppable
        VocabMask.install(student, kept, data, unk)
        structure = dataclasses.replace(structure, vocab=len(kept))
        min_vocab = len(kept) - len(data)
    smallest = smallest_structure(structure, budget.units, budget.ffn_block, budget.min_bits,
                                  min_vocab, budget.rank_block)
    table = None
    if budget.latency:
        table = LatencyTable.for_model(student, spec, progress=progress, validate=True,
                                       ranks="ranks" in budget.units)
    # A seq2seq student is timed only for a latency target (generation): for a size, no
    # spec says how many tokens it would generate.
    seq2seq = structure.stacks is not None
    timed = budget.latency or not seq2seq
    teacher = _teacher_module(parts.teachers) if timed else None
    teacher_ms = _teacher_ms(teacher, spec) if timed else None
    if budget.latency:
        # Each figure is the student's latency over the teacher's, measured in turns, put in
        # the teacher's reference milliseconds (its median at the start): a speed-up target
        # is met when teacher / student >= the speed-up, a latency_ms target when the student
        # takes at most that many of those milliseconds. With the teacher as the stopwatch's
        # reference, the machine's speed drifting during the search (its teacher read 300-410
        # ms within an hour, 2026-12-02) does not move the goal.
        limit = teacher_ms / budget.value if budget.target == "speedup" else budget.value

        def figure(m):
            ms, t = paired_ms(m, teacher, spec)
            return ms * teacher_ms / t
        view = served_view if "ranks" in budget.units else None
        goal = Goal(limit, "ms", figure=figure, cost=table.predict_ms, view=view)
        tiny = prune_removal(copy.deepcopy(student),
                             _remove_all_but_smallest(structure, budget.units, budget.ffn_block))
        if view is not None:
            tiny = view(tiny, smallest)
        ms, t = paired_ms(tiny, teacher, spec)
        floor = ms * teacher_ms / t
        del tiny
    else:
        count = parameters if budget.target == "parameters" else size_mb

        def counted(s):
            s = dataclasses.replace(s, vocab=min(s.vocab, vocab)) if vocab else s
            return (count(s, shape, storage=storage) if storage else count(s, shape)) + id_map_mb
        goal = Goal(float(budget.value), "parameters" if budget.target == "parameters" else "MB",
                    figure=lambda m: counted(structure_of(m)), cost=counted, exact=True)
        floor = float(goal.cost(smallest))
    if floor > goal.limit:
        # with vocab a unit, the smallest student keeps only the rows kept whatever the data
        rows = smallest.vocab if "vocab" in budget.units else vocab
        raise ValueError(unreachable_message(budget, _describe(smallest),
                                             floor, teacher_ms, vocab=rows, storage=storage))
    if progress:
        print(f"[distilkit] search: {budget.describe()}: from {_describe(structure)} "
              f"to <= {goal.limit:,.4g} {goal.unit}"
              + (f"; teacher {teacher_ms:.2f} ms" if budget.latency else ""), file=sys.stderr)

    # prune_heads' explicit indices count every attention block (an encoder-decoder's cross
    # attentions too): the search's heads are written by the self-attention's module name
    self_holders = self_attention_holders(student)
    with tempfile.TemporaryDirectory(prefix="distilkit-search-") as work:
        searcher = _Searcher(recipe, parts, budget, work, progress, storage=storage)

        def prune(model, removal):
            model = prune_removal(model, removal)
            if removal.vocab:
                VocabMask.of(model).drop(removal.vocab)
            if removal.ranks:
                project_ranks(model, removal.ranks)
            return model

        found = search(student, structure, goal, score=searcher.score, prune=prune,
                       distil=searcher.distil, units=budget.units, ffn_block=budget.ffn_block,
                       step_fraction=budget.step_fraction, max_iterations=budget.max_iterations,
                       progress=progress, tolerance=budget.tolerance, choose=budget.choose,
                       min_bits=budget.min_bits, min_vocab=min_vocab)
    got = structure_of(found["model"])
    bits = found["structure"].bits
    kept_rows = found["structure"].vocab
    if "vocab" in budget.units:   # the model keeps its whole table, masked
        if VocabMask.of(found["model"]).kept_data != kept_rows - min_vocab:
            raise RuntimeError(f"search: the student's word mask keeps "
                               f"{VocabMask.of(found['model']).kept_data} data tokens, the "
                               f"tracked structure {kept_rows - min_vocab}")
        got = dataclasses.replace(got, vocab=kept_rows)
    if got != dataclasses.replace(found["structure"], bits=None, ranks=None):
        # the bookkeeping must describe the pruned model exactly
        raise RuntimeError(f"search: the pruned student's structure {got} differs from the "
                           f"tracked one {found['structure']}")
    if not found["met"]:
        print(f"[distilkit] search: target not met ({found['stopped']}): the structure found "
              f"measures {found['history'][-1]['measured']:,.4g} {goal.unit} against "
              f"<= {goal.limit:,.4g}; training it anyway", file=sys.stderr)
    entries = found["tracker"].entries()
    if seq2seq:
        entries = by_self_attention(entries, self_holders)
    ranks = found["structure"].ranks
    if ranks is not None:
        entries += with_ranks(found["model"], ranks)
    if bits is not None:
        rest = with_bits(rest, found["model"], bits)
    if "vocab" in budget.units:
        rest = with_max_tokens(rest, kept_rows - min_vocab)
    # (the export settings carry ``serve`` already: export_settings resolved it from auto)
    resolved = Recipe.from_dict({**recipe.to_dict(), "compression": entries + rest},
                                source=recipe.source)
    record = {
        "target": {budget.target: budget.value}, "budget": budget.to_entry(),
        "spec": {"runtime": spec.runtime, "batch": spec.batch, "seq_len": spec.seq_len,
                 "threads": spec.threads, "clock": spec.clock,
                 **({"new_tokens": spec.new_tokens} if spec.new_tokens else {})},
        "limit": goal.limit, "unit": goal.unit, "teacher_ms": teacher_ms,
        "teacher_dir": parts.teachers.first_dir, "smallest": {"structure": _describe(smallest),
                                                              "figure": floor},
        "table_tolerance": getattr(table, "tolerance", None), "vocab_counted": vocab,
        "storage_counted": dataclasses.asdict(storage) if storage else None,
        "id_map_counted_bytes": round(id_map_mb * 1e6),
        "met": found["met"], "stopped": found["stopped"], "history": found["history"],
        "within_tolerance": found["within_tolerance"], "tolerance": budget.tolerance,
        "structure": {"heads": list(got.heads), "ffn": list(got.ffn),
                      **({"bits": [list(r) for r in bits]} if bits is not None else {}),
                      **({"ranks": [list(r) for r in ranks]} if ranks is not None else {}),
                      **({"vocab": kept_rows, "max_tokens": kept_rows - min_vocab}
                         if "vocab" in budget.units else {})},
        "compression": entries + rest, "search_seconds": round(time.time() - t0, 1),
    }
    out_dir = args.output_dir
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_json(os.path.join(out_dir, SEARCH_FILE), record)
    # The final run builds its own student; the teacher stays, to be measured beside it.
    del found, student, parts

    def final_figures(student_dir: str) -> dict:
        """The search's figures of the saved final student, measured in the same spec."""
        from distilkit.compress.base import load_compressed
        from distilkit.search.latency import verdict_pair_ms
        from distilkit.search.netadapt import judged

        model = load_compressed(student_dir)
        ms = t_ms = None
        if timed:
            ms, t_ms = verdict_pair_ms(model, teacher, spec)  # a latency verdict rests on it
        try:
            st = dataclasses.replace(structure_of(model), bits=bits)   # bits: as searched
            params = parameters(st, shape)
            mb = size_mb(st, shape, storage=storage) + id_map_mb
        except (ValueError, AttributeError):  # a packed (quantized) student: count it as saved
            st, params, mb = None, sum(p.numel() for p in model.parameters()), None
        in_ref = None if ms is None else ms * teacher_ms / t_ms   # in the teacher's reference
        figure = {"latency_ms": in_ref, "speedup": in_ref, "parameters": params,
                  "size_mb": mb}[budget.target]
        met, within = (False, False) if figure is None else \
            judged(figure, goal.limit, budget.tolerance)
        return {"search": {
            "target": {budget.target: budget.value}, "limit": goal.limit, "unit": goal.unit,
            "met": bool(met), "search_met": record["met"], "spec": record["spec"],
            "within_tolerance": within, "tolerance": budget.tolerance,
            "measured_ms": _rounded(ms), "teacher_ms": _rounded(t_ms),
            "reference_ms": _rounded(in_ref), "teacher_reference_ms": _rounded(teacher_ms),
            "speedup": None if ms is None else round(t_ms / max(ms, 1e-9), 3),
            "parameters": params,
            "size_mb": round(mb, 4) if mb is not None else None,
            "storage": storage.describe() if storage else None,
            "structure": record["structure"], "steps": len(record["history"]) - 1,
            "search_seconds": record["search_seconds"], "table_tolerance": record["table_tolerance"],
        }}

    results = run_recipe(resolved, progress, extra=final_figures)
    if results.get("search"):
        record["final"] = results["search"]
        atomic_write_json(os.path.join(out_dir, SEARCH_FILE), record)
        print(final_line(results["search"], budget), file=sys.stderr)
    return results


def final_line(s: dict, budget) -> str:
    """The one line that says whether the final student meets the target, as measured."""
    verdict = ("met" + (" (within the tolerance)" if s["within_tolerance"] else
                        f" (more than {budget.tolerance:.0%} past it)")) if s["met"] else "NOT met"
    figure = {"parameters": s.get("parameters"), "size_mb": s.get("size_mb")}.get(
        budget.target, s.get("reference_ms"))
    if not s["met"] and figure and s.get("limit"):
        # how far: a student 1% over a latency limit is another verdict than one 40% over
        verdict += f" ({figure / s['limit'] - 1:.1%} over the limit)"
    where = _where_timed(budget)
    if budget.target == "speedup":
        got = f"{s['speedup']:.2f}x the teacher ({s['measured_ms']:.1f} vs {s['teacher_ms']:.1f} ms)"
    elif budget.target == "latency_ms":
        got = (f"{s['reference_ms']:.1f} ms (measured {s['measured_ms']:.1f} ms beside the "
               f"teacher's {s['teacher_ms']:.1f}, whose reference is {s['teacher_reference_ms']:.1f})")
    elif budget.target == "parameters":
        got = f"{s['parameters']:,} parameters"
    else:
        kind = "weights as stored" if s.get("storage") else "fp32 weights"
        got = (f"{s['size_mb']:.3f} MB of {kind}" if s.get("size_mb") is not None
               else "a size that cannot be counted")
    return (f"[distilkit] search: target {budget.target} {budget.value:g}: the final student "
            f"is {got} [{where}]: {verdict}" if budget.latency else
            f"[distilkit] search: target {budget.target} {budget.value:g}: the final student "
            f"has {got}: {verdict}")
