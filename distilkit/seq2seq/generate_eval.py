"""Evaluation of seq2seq models by generation: BLEU, chrF, exact match and latency, offline.

Teacher-forced loss says little about what a seq2seq model outputs, so seq2seq students are
scored on what they *generate* (``predict_with_generate`` in transformers' Seq2SeqTrainer):

* **BLEU** (Papineni et al. 2002) and **chrF** (Popović 2015), corpus-level, from ``sacrebleu``
  with its default settings (13a tokenisation, exponential smoothing for BLEU; character
  6-grams, beta 2 for chrF), which run offline and are the reported standard;
* **exact match**: the share of outputs equal to the reference after whitespace
  normalisation (the natural score for the truecasing task, where most outputs are right or
  wrong as a whole);
* **latency**: the median wall time of generating one sentence at batch size 1 (what a user
  waiting for one answer sees), and the throughput time per sentence in batched generation.

:func:`generate_texts` is the one generation loop (sorted by length to batch with little
padding, original order restored); :func:`evaluate_generation` generates over a dataset and
scores; :func:`compute_metrics_for_generate` is a ``compute_metrics`` for a
``Seq2SeqTrainer(predict_with_generate=True)``; :class:`GenerationEvalCallback` adds the
generation scores to every evaluation of a ``Trainer``/``DistilTrainer``, which evaluate by
teacher-forced loss only.
"""
from __future__ import annotations

import statistics
import time
import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from transformers import TrainerCallback

from distilkit.device import model_device, synchronize, to_device, to_host


@dataclass
class GenerationSettings:
    """How outputs are generated (greedy when ``num_beams`` is 1)."""

    num_beams: int = field(default=1, metadata={"help": "Beam width; 1 = greedy decoding."})
    max_new_tokens: int = field(default=96, metadata={"help": "Longest output, in tokens."})
    batch_size: int = field(default=64, metadata={"help": "Sentences generated together."})
    length_penalty: float = field(default=1.0, metadata={"help": "Beam search length penalty (>0 favours longer outputs)."})

    def __post_init__(self):
        for name in ("num_beams", "max_new_tokens", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: {v!r} must be an integer >= 1")
        if not isinstance(self.length_penalty, (int, float)):
            raise ValueError(f"length_penalty: {self.length_penalty!r} must be a number (1.0 = none)")

    def generate_kwargs(self) -> dict:
        # with the key-value cache whatever the model's config says (a model the Trainer
        # trained has use_cache False: generating without it recomputes every earlier token)
        kw = {"max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams,
              "do_sample": False, "use_cache": True}
        if self.num_beams > 1:
            kw.update(length_penalty=float(self.length_penalty), early_stopping=True)
        return kw

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerationResult:
    """Generated texts (in input order), their token ids without the decoder start token or
    padding, and the wall time spent in ``generate``."""

    texts: list
    ids: list
    seconds: float


def device_clock(device: torch.device) -> float:
    """``time.perf_counter()`` once the work queued on ``device`` has finished."""
    synchronize(device)
    return time.perf_counter()


def cache_kwargs(config) -> dict:
    """A decoder cache that grows layer by layer, for encoder-decoder models whose decoder is
    deeper than their encoder (e.g. a T5 after prune_layers dropped encoder layers):
    transformers 5.23 sizes T5's default cache by ``num_layers``, the *encoder* depth, and
    ``generate`` then fails with an IndexError in the decoder's extra layers."""
    enc = getattr(config, "num_layers", None)
    dec = getattr(config, "num_decoder_layers", None)
    if getattr(config, "is_encoder_decoder", False) and enc and dec and dec > enc:
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache
        return {"past_key_values": EncoderDecoderCache(DynamicCache(), DynamicCache())}
    return {}


def _strip(ids: Sequence[int], start_id: Optional[int], pad_id: Optional[int],
           eos_id: Optional[int]) -> list[int]:
    """Output ids without the leading decoder start token and without padding; the first
    ``</s>`` is kept (it is part of the target the student learns), anything after dropped."""
    ids = list(ids)
    if ids and start_id is not None and ids[0] == start_id:
        ids = ids[1:]
    out = []
    for t in ids:
        if t == pad_id and t != eos_id:
            break
        out.append(t)
        if t == eos_id:
            break
    return out


@torch.inference_mode()
def generate_texts(model, tokenizer, sources: Sequence[str],
                   settings: Optional[GenerationSettings] = None,
                   max_source_length: int = 96, exact: bool = False) -> GenerationResult:
    """Generate an output for every source string with ``model``; see :class:`GenerationSettings`.
    ``exact``: no end of sequence, every output exactly ``max_new_tokens`` long (a stand-in
    timed for the lengths another model writes). Without an end token rather than with it
    masked until then (``min_new_tokens``): that logits processor made the truecase BART's
    generation 5-9% slower than its own; without one, a random-weights stand-in writing the
    teacher's lengths read 0.955-1.026x the teacher's milliseconds (five readings in turns,
    2026-12-08)."""
    s = settings or GenerationSettings()
    sources = list(sources)
    was_training = model.training
    model.eval()
    cfg = model.config
    start_id = getattr(model.generation_config, "decoder_start_token_id", None)
    if start_id is None:
        start_id = getattr(cfg, "decoder_start_token_id", None)
    pad_id = tokenizer.pad_token_id
    eos_id = tokenizer.eos_token_id
    lengths = [len(x) for x in tokenizer(sources, truncation=True, max_length=max_source_length)["input_ids"]] if sources else []
    order = sorted(range(len(sources)), key=lambda i: -lengths[i])
    texts: list = [None] * len(sources)
    ids: list = [None] * len(sources)
    dev = model_device(model)
    seconds = 0.0
    try:
        for b in range(0, len(order), s.batch_size):
            idx = order[b:b + s.batch_size]
            enc = tokenizer([sources[i] for i in idx], truncation=True,
                            max_length=max_source_length, padding=True, return_tensors="pt")
            enc = to_device({k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")},
                            dev)
            t0 = device_clock(dev)
            out = model.generate(**enc, **s.generate_kwargs(), **cache_kwargs(cfg),
                                 pad_token_id=pad_id, eos_token_id=None if exact else eos_id)
            seconds += device_clock(dev) - t0
            rows = to_host(out).tolist()  # one transfer per batch, not one per sentence
            for j, i in enumerate(idx):
                ids[i] = _strip(rows[j], start_id, pad_id, eos_id)
                texts[i] = tokenizer.decode(ids[i], skip_special_tokens=True)
    finally:
        model.train(was_training)
    return GenerationResult(texts=texts, ids=ids, seconds=seconds)


def score_texts(predictions: Sequence[str], references: Sequence[str]) -> dict:
    """Corpus BLEU and chrF (sacrebleu, 0-100) and exact match (0-1) of predictions against one
    reference each."""
    import sacrebleu

    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        raise ValueError("no references to score against")
    exact = np.mean([" ".join(p.split()) == " ".join(r.split())
                     for p, r in zip(predictions, references)])
    return {"bleu": float(sacrebleu.corpus_bleu(predictions, [references]).score),
            "chrf": float(sacrebleu.corpus_chrf(predictions, [references]).score),
            "exact_match": float(exact), "n": len(references)}


def _one_at_a_time(sources: Sequence[str], settings: Optional[GenerationSettings],
                   caller: str) -> tuple[list, GenerationSettings]:
    """The sources as a list (refused when empty) and ``settings`` at batch size 1: how a
    latency is timed."""
    s = settings or GenerationSettings()
    sources = list(sources)
    if not sources:
        raise ValueError(f"{caller} needs at least one source sentence")
    return sources, GenerationSettings(num_beams=s.num_beams, max_new_tokens=s.max_new_tokens,
                                       batch_size=1, length_penalty=s.length_penalty)


@torch.inference_mode()
def latency_ms(model, tokenizer, sources: Sequence[str],
               settings: Optional[GenerationSettings] = None, warmup: int = 2) -> float:
    """Median milliseconds to generate one output at batch size 1 over ``sources``."""
    sources, one = _one_at_a_time(sources, settings, "latency_ms")
    for src in sources[:warmup]:
        generate_texts(model, tokenizer, [src], one)
    times = [generate_texts(model, tokenizer, [src], one).seconds * 1000 for src in sources]
    return float(statistics.median(times))


def side_by_side_latency_ms(models: dict, tokenizer, sources: Sequence[str],
                            settings: Optional[GenerationSettings] = None,
                            warmup: int = 2, lengths: Optional[dict] = None) -> dict:
    """``{name: ms}``: :func:`latency_ms` of each of ``models`` (``name -> model``, one
    tokenizer), the models taking turns on the same sources
    (:func:`distilkit.evaluate.interleaved_latency_ms`): a turn generates one source twice
    and times the second, and every model's turn of a round has the same source. The figures
    a speed-up is read from: a teacher timed in another hour (its cached figures) was timed
    under another load of the machine than its student. ``lengths``: ``{name: tokens per
    source}`` for a model made to write exactly that many (a stand-in with random weights for
    a model not loaded: what generation costs is set by the architecture and the number of
    tokens, not by the weights' values)."""
    import itertools

    from distilkit.evaluate import interleaved_latency_ms

    sources, one = _one_at_a_time(sources, settings, "side_by_side_latency_ms")
    lengths = lengths or {}
    for name, n in lengths.items():
        if len(n) != len(sources) or not all(isinstance(t, int) and t >= 1 for t in n):
            raise ValueError(f"lengths[{name!r}]: give one token count >= 1 per source "
                             f"({len(sources)}), got {n!r}")

    def turn(model, n):   # each source twice in a row: a turn's untimed run and its timed one
        queue = itertools.cycle(i for i in range(len(sources)) for _ in range(2))

        def run():
            i = next(queue)
            if n is None:
                return generate_texts(model, tokenizer, [sources[i]], one)
            fixed = dataclasses.replace(one, max_new_tokens=n[i])
            return generate_texts(model, tokenizer, [sources[i]], fixed, exact=True)
        return run

    return interleaved_latency_ms({name: turn(m, lengths.get(name))
                                   for name, m in models.items()},
                                  runs=len(sources), warmup=warmup, block=2)


def evaluate_generation(model, tokenizer, dataset, source_column: str = "source",
                        target_column: str = "target",
                        settings: Optional[GenerationSettings] = None,
                        max_samples: Optional[int] = None, latency_samples: int = 0,
                        return_predictions: bool = False) -> dict:
    """Generate over a dataset of texts and score the outputs against its targets.

    Returns ``bleu``, ``chrf``, ``exact_match``, ``n``, ``gen_ms_per_sentence`` (batched
    throughput) and, with ``latency_samples > 0``, ``latency_ms`` (median, batch size 1) and
    ``latency_tokens`` (the tokens written for each of those sources).
    """
    from distilkit.seq2seq.data import check_seq2seq_columns

    check_seq2seq_columns(dataset, source_column, target_column)
    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    srcs, refs = list(dataset[source_column]), list(dataset[target_column])
    res = generate_texts(model, tokenizer, srcs, settings)
    out = score_texts(res.texts, refs)
    out["gen_ms_per_sentence"] = 1000 * res.seconds / max(len(srcs), 1)
    if latency_samples:
        out["latency_ms"] = latency_ms(model, tokenizer, srcs[:latency_samples], settings)
        # how many tokens it wrote for each of them: what a stand-in of its architecture is
        # timed writing when it is not loaded (side_by_side_latency_ms)
        out["latency_tokens"] = [max(1, len(i)) for i in res.ids[:latency_samples]]
    if return_predictions:
        out["predictions"] = res.texts
    return out


def compute_metrics_for_generate(tokenizer):
    """A ``compute_metrics`` for ``Seq2SeqTrainer(..., predict_with_generate=True)``: decodes
    the generated ids and the labels (``-100`` read as padding) and scores them."""
    pad = tokenizer.pad_token_id

    def compute(eval_pred) -> dict:
        preds = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
        preds = np.where(np.asarray(preds) < 0, pad, preds)
        labels = np.where(np.asarray(eval_pred.label_ids) == -100, pad, eval_pred.label_ids)
        p = tokenizer.batch_decode(preds, skip_special_tokens=True)
        r = tokenizer.batch_decode(labels, skip_special_tokens=True)
        m = score_texts(p, r)
        m.pop("n")
        return m

    return compute


class GenerationEvalCallback(TrainerCallback):
    """Adds generation scores (``eval_bleu``, ``eval_chrf``, ``eval_exact_match``) to every
    evaluation of a ``Trainer`` or ``DistilTrainer``, whose own evaluation is the
    teacher-forced loss. The scores are added to the metrics ``evaluate()`` returns and to the
    log history."""

    def __init__(self, tokenizer, dataset, source_column: str = "source",
                 target_column: str = "target", settings: Optional[GenerationSettings] = None,
                 max_samples: Optional[int] = 200):
        from distilkit.seq2seq.data import check_seq2seq_columns

        check_seq2seq_columns(dataset, source_column, target_column)
        self.tokenizer, self.dataset = tokenizer, dataset
        self.source_column, self.target_column = source_column, target_column
        self.settings, self.max_samples = settings, max_samples

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
        if model is None or metrics is None:
            return
        m = evaluate_generation(model, self.tokenizer, self.dataset, self.source_column,
                                self.target_column, self.settings, self.max_samples)
        add = {f"eval_{k}": v for k, v in m.items() if k in ("bleu", "chrf", "exact_match")}
        metrics.update(add)
        state.log_history.append({**add, "step": state.global_step})
