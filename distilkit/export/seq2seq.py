"""The ONNX export of a seq2seq (encoder-decoder) student, and the generation loop (greedy or
beam search) that runs it in onnxruntime.

Generation runs an encoder once and a decoder once per new token, so the export is three
graphs, each with dynamic batch, source-length and past-length axes:

* ``encoder.onnx``: ``input_ids``, ``attention_mask`` -> ``last_hidden_state``;
* ``decoder.onnx``, the first step (no past): ``decoder_input_ids``,
  ``encoder_hidden_states``, ``encoder_attention_mask`` -> ``logits`` and, for every decoder
  layer ``i``, ``present.{i}.decoder.{key|value}`` (self-attention) and
  ``present.{i}.encoder.{key|value}`` (cross-attention over the source);
* ``decoder_with_past.onnx``, every later step: ``decoder_input_ids`` (the one new token),
  ``encoder_attention_mask`` and ``past_key_values.{i}.{decoder|encoder}.{key|value}`` ->
  ``logits`` and ``present.{i}.decoder.{key|value}`` (the self-attention keys and values grown
  by one position; the cross-attention ones never change, so they are not returned).

Two decoder graphs rather than one merged graph with an ``If`` on "is there a past": each is a
plain graph that onnxruntime's dynamic quantization and graph optimizations handle as they
handle any other, and the loop never feeds the empty past tensors a merged graph needs on its
first step. Traced apart, the decoder's weights and the word embedding would be in both
decoder files (and the embedding in the encoder's): 8.0 MB of fp32 graphs for a 3.0 MB
truecasing student. So each variant's graphs keep their weights in one file beside them,
each distinct tensor once (``weights.bin``, ``weights_int8.bin``, ``weights_4bit.bin``:
ONNX external data, :mod:`distilkit.export.shared_weights`); ``bytes`` in ``export.json``
counts the graphs and that file.

transformers 5 keeps the past in ``EncoderDecoderCache`` objects; the export wrappers
(:class:`_FirstStep`, :class:`_NextStep`) build one from plain tensors inside the traced
function and return its tensors, so the graphs take and give tensors only. The model's own
forward computes everything else (BART's learned positions offset by the past length, T5's
relative position bias for a query at the past length, the final logits bias or scaling).

:class:`OnnxSeq2SeqGenerator` is greedy or beam search generation over the three files,
following the saved generation config the way ``transformers``' ``generate`` does: decoder
start token, ``forced_bos_token_id`` / ``forced_eos_token_id``, padding of rows that have
finished, and a stop once every row has produced an end-of-sequence token; with
``num_beams > 1``, ``generate``'s beam search (:mod:`distilkit.export.beam`: summed log-probs,
finished hypotheses per row scored ``sum / length ** length_penalty``, ``early_stopping``),
with the past key-values of each live beam taken from the beam it continues between steps.
Generation settings it does not implement (repetition penalties, n-gram blocking, minimum
lengths, ...) make the export refuse with the setting named; sampling is not offered.

The check, before anything is written: on real sentences in batches of different shapes
(batch 1 included), the ONNX greedy output must equal ``model.generate(num_beams=1,
do_sample=False)`` token for token, and the logits of every step (first and with-past) must be
within ``tolerance`` of the PyTorch model's, run teacher-forced on the same tokens. ``int8``
(onnxruntime's dynamic int8 quantization of each graph) reports its agreement, not enforced.
``four_bit`` traces the three graphs again with a 4-bit quantized student's packed linears as
``MatMulNBits`` (:mod:`distilkit.export.nbits`: its own codes and bucket scales, not a
re-quantization), checked like fp32.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from distilkit.export.beam import (EarlyStopping, beam_step, best_sequences, check_beam_settings,
                                   fill_id, init_beams, log_softmax)
from distilkit.export.runtime import OPSET, REPORT_FILE, quantize_int8, require_onnx, session
from distilkit.export.shared_weights import share_initializers

TOLERANCE = 1e-4
GRAPHS = ("encoder", "decoder", "decoder_with_past")
VARIANTS = {"fp32": "", "int8": "_int8", "4bit": "_4bit"}
CHECK_NEW_TOKENS = 48
# Sources of the kind the built-in truecasing task holds (lower-cased, unpunctuated), of
# different lengths.
CHECK_TEXTS = (
    "a gorgeous witty seductive movie",
    "the plot is nothing but boilerplate cliches from start to finish",
    "its a charming and often affecting journey",
    "dull",
    "an utterly incompetent conclusion to a film that had promise in its first hour",
    "the acting is fine but the story goes nowhere",
    "one of the best films of the year",
    "steven spielberg brings new york to life",
)
# Generation settings the loop does not implement, with the value at which they do nothing.
UNSUPPORTED_GENERATION = {
    "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0, "min_length": 0, "min_new_tokens": None,
    "bad_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None,
    "sequence_bias": None, "forced_decoder_ids": None,
    "exponential_decay_length_penalty": None, "guidance_scale": None, "stop_strings": None,
    # generate would sample, or return several hypotheses per source, by default.
    "do_sample": False, "num_return_sequences": 1,
}


def weights_file(variant: str) -> str:
    """The file the three graphs of ``variant`` keep their weights in (one copy each)."""
    graph_files(variant)  # the variant's check
    return f"weights{VARIANTS[variant]}.bin"


def graph_files(variant: str) -> dict:
    """File names of the three graphs of ``variant`` (``"fp32"``, ``"int8"`` or ``"4bit"``)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant: {variant!r} is not an export variant; use one of "
                         f"{sorted(VARIANTS)}")
    return {g: f"{g}{VARIANTS[variant]}.onnx" for g in GRAPHS}


def _past_names(prefix: str, layers: int, cross: bool = True) -> list[str]:
    """``{prefix}.{i}.decoder.key``, ``.value`` (and ``.encoder.key``, ``.value``) per layer."""
    kinds = ("decoder", "encoder") if cross else ("decoder",)
    return [f"{prefix}.{i}.{k}.{kv}" for i in range(layers) for k in kinds
            for kv in ("key", "value")]


# ---------------------------------------------------------------------------------------
# Export forms: plain tensors in and out
# ---------------------------------------------------------------------------------------

class _Encoder(nn.Module):
    """The encoder alone: its last hidden states."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model.get_encoder()(input_ids=input_ids,
                                        attention_mask=attention_mask).last_hidden_state


def _decode(model, decoder_input_ids, encoder_hidden_states, encoder_attention_mask, cache):
    from transformers.modeling_outputs import BaseModelOutput

    return model(encoder_outputs=BaseModelOutput(last_hidden_state=encoder_hidden_states),
                 attention_mask=encoder_attention_mask, decoder_input_ids=decoder_input_ids,
                 past_key_values=cache, use_cache=True, return_dict=True).logits


class _FirstStep(nn.Module):
    """The first decoder step: logits and every layer's self- and cross-attention keys and
    values (``[batch, heads, length, head_dim]``), in :func:`_past_names` order."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, decoder_input_ids, encoder_hidden_states, encoder_attention_mask):
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        # Caches without a config grow a layer at a time, so a decoder deeper than the
        # encoder (the config's num_layers) is no problem.
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        logits = _decode(self.model, decoder_input_ids, encoder_hidden_states,
                         encoder_attention_mask, cache)
        out = [logits]
        for s, c in zip(cache.self_attention_cache.layers, cache.cross_attention_cache.layers):
            out += [s.keys, s.values, c.keys, c.values]
        return tuple(out)


class _NextStep(nn.Module):
    """A later decoder step: the past as plain tensors (self key, self value, cross key,
    cross value per layer) -> logits and the grown self-attention keys and values."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, decoder_input_ids, encoder_attention_mask, *past):
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        self_cache, cross_cache = DynamicCache(), DynamicCache()
        for i in range(len(past) // 4):
            self_cache.update(past[4 * i], past[4 * i + 1], i)
            cross_cache.update(past[4 * i + 2], past[4 * i + 3], i)
        # A full cross-attention cache marks every layer as updated: the layers read the cached
        # keys and values and never project the encoder states again. The decoder still wants
        # encoder states (their presence switches cross-attention on, their shape sizes the
        # source mask), so it gets zeros of the right shape, which nothing reads.
        cache = EncoderDecoderCache(self_cache, cross_cache)
        key = past[2]
        hidden = key.new_zeros(key.shape[0], key.shape[2], self.model.config.d_model)
        logits = _decode(self.model, decoder_input_ids, hidden, encoder_attention_mask, cache)
        out = [logits]
        for s in cache.self_attention_cache.layers:
            out += [s.keys, s.values]
        return tuple(out)


def _export(module: nn.Module, example: tuple, path: str, inputs: list, outputs: list,
            axes: dict, four_bit_of: Optional[nn.Module] = None) -> dict:
    """Trace ``module`` on ``example`` to ``path``; with ``four_bit_of`` (the model inside
    ``module``) its packed linears become MatMulNBits nodes. Returns the 4-bit figures, else
    nothing."""
    if four_bit_of is not None:
        from distilkit.export.nbits import export_four_bit

        return export_four_bit(four_bit_of, module, example, path, input_names=inputs,
                               output_names=outputs, dynamic_axes=axes)
    with warnings.catch_warnings():
        # The tracer warns about every Python-level branch on a shape; whether the graphs
        # generalise is what the check measures, on other batch sizes, lengths and pasts.
        warnings.simplefilter("ignore")
        torch.onnx.export(module, example, path, input_names=inputs, output_names=outputs,
                          dynamic_axes=axes, opset_version=OPSET, dynamo=False)
    return {}


def _export_graphs(model: nn.Module, batch: dict, out_dir: str, start_id: int,
                   variant: str = "fp32") -> tuple[dict, dict]:
    """Write the three graphs of ``model`` to ``out_dir``, traced on ``batch``: fp32, or with
    ``variant="4bit"`` the packed linears as MatMulNBits (:mod:`distilkit.export.nbits`).
    Returns their file names and, for 4-bit, each graph's MatMulNBits figures."""
    files = graph_files(variant)
    nbits = model if variant == "4bit" else None
    info = {}
    ids, mask = (torch.from_numpy(batch[k]) for k in ("input_ids", "attention_mask"))
    src = {0: "batch", 1: "source"}
    info["encoder"] = _export(
        _Encoder(model).eval(), (ids, mask), os.path.join(out_dir, files["encoder"]),
        ["input_ids", "attention_mask"], ["last_hidden_state"],
        {"input_ids": src, "attention_mask": src, "last_hidden_state": src}, nbits)

    with torch.no_grad():
        hidden = _Encoder(model)(ids, mask)
        # Two decoder tokens in the example, so the traced target axis is not a constant 1.
        dec = torch.full((ids.shape[0], 2), start_id, dtype=torch.long)
        first = _FirstStep(model)(dec, hidden, mask)
    layers = (len(first) - 1) // 4
    presents = _past_names("present", layers)
    axes = {"decoder_input_ids": {0: "batch", 1: "target"}, "encoder_hidden_states": src,
            "encoder_attention_mask": src, "logits": {0: "batch", 1: "target"}}
    axes.update({n: {0: "batch", 2: "source" if ".encoder." in n else "target"}
                 for n in presents})
    info["decoder"] = _export(
        _FirstStep(model).eval(), (dec, hidden, mask), os.path.join(out_dir, files["decoder"]),
        ["decoder_input_ids", "encoder_hidden_states", "encoder_attention_mask"],
        ["logits"] + presents, axes, nbits)

    pasts = _past_names("past_key_values", layers)
    grown = _past_names("present", layers, cross=False)
    axes = {"decoder_input_ids": {0: "batch"}, "encoder_attention_mask": src,
            "logits": {0: "batch"}}
    axes.update({n: {0: "batch", 2: "source" if ".encoder." in n else "past"} for n in pasts})
    axes.update({n: {0: "batch", 2: "past_plus_one"} for n in grown})
    step = torch.full((ids.shape[0], 1), start_id, dtype=torch.long)
    info["decoder_with_past"] = _export(
        _NextStep(model).eval(), (step, mask, *first[1:]),
        os.path.join(out_dir, files["decoder_with_past"]),
        ["decoder_input_ids", "encoder_attention_mask"] + pasts, ["logits"] + grown, axes, nbits)
    return files, (info if nbits is not None else {})


# ---------------------------------------------------------------------------------------
# The generation loop
# ---------------------------------------------------------------------------------------

def generation_ids(model: nn.Module) -> dict:
    """The token ids and beam search defaults generation follows, from the model's generation
    config (as ``generate`` reads them), or a ValueError naming a setting the ONNX loop does
    not implement."""
    g = model.generation_config
    for name, neutral in UNSUPPORTED_GENERATION.items():
        value = getattr(g, name, neutral)
        if value is not None and value != neutral and not (neutral is None and value == []):
            raise ValueError(f"generation_config.{name}: {value!r} is not implemented by the "
                             f"ONNX generation loop (greedy or beam search, with forced "
                             f"BOS/EOS and length_penalty/early_stopping only); set it "
                             f"to {neutral!r} in generation_config.json to export this model")
    start = g.decoder_start_token_id
    if start is None:  # what generate falls back to
        start = g.bos_token_id
    eos = g.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if start is None or not eos:
        raise ValueError(f"generation_config: decoder_start_token_id={start!r}, eos_token_id="
                         f"{g.eos_token_id!r}; generation needs both: set them in "
                         "generation_config.json")
    pad = g.pad_token_id if g.pad_token_id is not None else eos[0]
    return {"decoder_start_token_id": int(start), "eos_token_id": [int(e) for e in eos],
            "pad_token_id": int(pad), "forced_bos_token_id": g.forced_bos_token_id,
            "forced_eos_token_id": g.forced_eos_token_id, **beam_settings(g)}


def beam_settings(g) -> dict:
    """The generation config ``g``'s beam search defaults: ``num_beams``, ``length_penalty``
    and ``early_stopping`` (checked, so a bad saved value is refused at export, not at
    serving)."""
    # Unset (None) is transformers 5's "the global default", which generate fills in from
    # GenerationConfig._get_default_generation_params (1.0 and False in 5.23).
    defaults = type(g)._get_default_generation_params()
    num_beams, length_penalty, early_stopping = (
        defaults[n] if getattr(g, n, None) is None else getattr(g, n)
        for n in ("num_beams", "length_penalty", "early_stopping"))
    try:
        check_beam_settings(num_beams, length_penalty, early_stopping)
    except ValueError as e:
        raise ValueError(f"generation_config.{e}; fix it in generation_config.json") from None
    return {"num_beams": num_beams, "length_penalty": float(length_penalty),
            "early_stopping": early_stopping}


def _as_past(name: str) -> str:
    return name.replace("present.", "past_key_values.", 1)


class OnnxSeq2SeqGenerator:
    """Greedy or beam search generation with an exported seq2seq model in onnxruntime (CPU).

    ``onnx_dir`` is a directory written by :func:`export_seq2seq`; ``variant`` is ``"fp32"``,
    ``"int8"`` or ``"4bit"`` (one of ``export.json``'s ``files``); ``threads`` sets onnxruntime's
    intra-op threads (default: onnxruntime's choice). The three sessions are the attributes
    ``encoder``, ``decoder`` and ``decoder_with_past``.
    """

    def __init__(self, onnx_dir: str, variant: str = "fp32", threads: Optional[int] = None):
        path = os.path.join(onnx_dir, REPORT_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"onnx_dir: {onnx_dir!r} has no {REPORT_FILE}; give a "
                                    "directory written by distilkit export")
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
        if report.get("task") != "seq2seq":
            raise ValueError(f"onnx_dir: {onnx_dir!r} holds a {report.get('task', 'classifier')}"
                             " export, not a seq2seq one")
        if variant not in report["files"]:
            raise ValueError(f"variant: {variant!r} was not exported to {onnx_dir}; it has "
                             f"{sorted(report['files'])} (export with --int8 for int8)")
        self.onnx_dir = onnx_dir
        ids = dict(report["generation"])
        if "num_beams" not in ids:
            # An export.json written before beam search: the beam defaults are those of the
            # generation config saved beside it, which is what generate would read.
            from transformers import GenerationConfig

            ids.update(beam_settings(GenerationConfig.from_pretrained(onnx_dir)))
        self._setup(onnx_dir, report["files"][variant]["graphs"], ids, threads)

    def _setup(self, onnx_dir: str, graphs: dict, ids: dict, threads: Optional[int]) -> None:
        self.encoder, self.decoder, self.decoder_with_past = (
            session(os.path.join(onnx_dir, graphs[g]), threads) for g in GRAPHS)
        self.ids = ids
        # present.{i}.{decoder|encoder}.{key|value} comes back as past_key_values.{i}...
        self._first_names = [_as_past(o.name) for o in self.decoder.get_outputs()[1:]]
        self._next_names = [_as_past(o.name) for o in self.decoder_with_past.get_outputs()[1:]]
        self._tokenizer = None

    @classmethod
    def _from_files(cls, onnx_dir: str, graphs: dict, ids: dict) -> "OnnxSeq2SeqGenerator":
        gen = cls.__new__(cls)
        gen.onnx_dir = onnx_dir
        gen._setup(onnx_dir, graphs, ids, None)
        return gen

    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 64,
                 num_beams: Optional[int] = None, length_penalty: Optional[float] = None,
                 early_stopping: Optional[EarlyStopping] = None,
                 pad_token_id: Optional[int] = None) -> np.ndarray:
        """Outputs for the sources ``input_ids`` (``[batch, source]`` int, any array type numpy
        reads; ``attention_mask`` 1 on real tokens, default all ones), at most
        ``max_new_tokens`` new tokens each: greedy with ``num_beams=1``, else beam search with
        ``num_beams`` beams (:mod:`distilkit.export.beam`), scored with ``length_penalty``
        and stopped by ``early_stopping`` (``True``, ``False`` or ``"never"``); all three
        default to the saved generation config's (transformers' defaults where it sets none:
        1, 1.0, False), as in ``generate``. ``pad_token_id`` (default the
        generation config's) fills the places after a row's end. Returns an int64 array
        ``[batch, out_len]`` laid out as ``transformers``' ``generate(num_beams=...,
        do_sample=False)`` returns it: column 0 the decoder start token, then the tokens;
        greedy: rows that finished earlier padded with the pad id after their end-of-sequence
        token, ``out_len`` 1 + the steps until every row finished; beam search: each row's
        best hypothesis, padded after its end as generate's beam search pads (the pad id, or
        the first end id when the pad id is 0), ``out_len`` 1 + the longest of them."""
        g = self.ids
        num_beams = g["num_beams"] if num_beams is None else num_beams
        length_penalty = g["length_penalty"] if length_penalty is None else length_penalty
        early_stopping = g["early_stopping"] if early_stopping is None else early_stopping
        check_beam_settings(num_beams, length_penalty, early_stopping)
        pad = g["pad_token_id"] if pad_token_id is None else pad_token_id
        if not isinstance(pad, (int, np.integer)) or isinstance(pad, bool):
            raise ValueError(f"pad_token_id: {pad!r} must be a token id (an integer)")
        if num_beams == 1:
            return self._generate(input_ids, attention_mask, max_new_tokens, pad=int(pad))[0]
        return self._beam_search(input_ids, attention_mask, max_new_tokens, num_beams,
                                 float(length_penalty), early_stopping, int(pad))

    def _inputs(self, input_ids, attention_mask, max_new_tokens) -> tuple:
        """The checked ``input_ids`` and ``attention_mask`` as int64 arrays."""
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) \
                or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: {max_new_tokens!r} must be an integer >= 1")
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
            raise ValueError(f"input_ids: shape {ids.shape} must be [batch, source], both >= 1")
        mask = np.ones_like(ids) if attention_mask is None else \
            np.asarray(attention_mask, dtype=np.int64)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask: shape {mask.shape} != input_ids' {ids.shape}")
        return ids, mask

    def _first_step(self, ids: np.ndarray, mask: np.ndarray) -> tuple:
        """The encoder, then the first decoder step on the start token: the prompt
        ``[batch, 1]``, the logits and the past by name."""
        hidden = self.encoder.run(None, {"input_ids": ids, "attention_mask": mask})[0]
        prompt = np.full((ids.shape[0], 1), self.ids["decoder_start_token_id"], dtype=np.int64)
        first = self.decoder.run(None, {"decoder_input_ids": prompt,
                                        "encoder_hidden_states": hidden,
                                        "encoder_attention_mask": mask})
        return prompt, first[0], dict(zip(self._first_names, first[1:]))

    def _generate(self, input_ids, attention_mask, max_new_tokens: int,
                  keep_logits: bool = False, run_all: bool = False,
                  pad: Optional[int] = None):
        """Greedy :meth:`generate`, and with ``keep_logits`` the ``[batch, vocab]`` logits of
        every step (before forcing); ``run_all`` runs all ``max_new_tokens`` steps even once
        every row has finished (so a check sees the with-past graph at every past length)."""
        ids, mask = self._inputs(input_ids, attention_mask, max_new_tokens)
        g = self.ids
        eos = np.array(g["eos_token_id"])
        pad = g["pad_token_id"] if pad is None else pad
        out, logits, past = self._first_step(ids, mask)
        # Self-attention keys and values are replaced every step, cross-attention ones kept.
        done = np.zeros(ids.shape[0], dtype=bool)
        max_length = 1 + max_new_tokens  # generate's, with a one-token decoder prompt
        kept = []
        for step in range(max_new_tokens):
            scores = logits[:, -1, :].astype(np.float32)
            if keep_logits:
                kept.append(scores)
            scores = self._force(scores, out.shape[1], max_length)
            token = np.where(done, pad, scores.argmax(-1)).astype(np.int64)
            out = np.concatenate([out, token[:, None]], axis=1)
            done |= np.isin(token, eos)
            if (done.all() and not run_all) or step == max_new_tokens - 1:
                break
            res = self.decoder_with_past.run(None, {"decoder_input_ids": token[:, None],
                                                    "encoder_attention_mask": mask, **past})
            logits = res[0]
            past.update(zip(self._next_names, res[1:]))
        return out, kept

    def _beam_search(self, input_ids, attention_mask, max_new_tokens: int, num_beams: int,
                     length_penalty: float, early_stopping: EarlyStopping,
                     pad: int) -> np.ndarray:
        """Beam search over the three graphs: the encoder and the first decoder step run once
        per source row and their outputs are repeated for its ``num_beams`` beams (they are
        the same for every beam); each later step runs the with-past graph on all
        ``batch * num_beams`` beams after taking every self-attention key/value from the
        beam each live beam continues. The cross-attention past needs no take: a beam only
        continues a beam of its own row, whose cross-attention past is the same."""
        ids, mask = self._inputs(input_ids, attention_mask, max_new_tokens)
        eos = self.ids["eos_token_id"]
        prompt, logits, past = self._first_step(ids, mask)
        past = {n: np.repeat(v, num_beams, axis=0) for n, v in past.items()}
        mask = np.repeat(mask, num_beams, axis=0)
        max_length = 1 + max_new_tokens
        state = init_beams(prompt, num_beams, max_length, fill_id(pad, eos))
        log_probs = np.repeat(log_softmax(logits[:, -1, :]), num_beams, axis=0)
        while True:
            # generate's beam search runs its logits processors on the log-probs.
            log_probs = self._force(log_probs, state.cur_len, max_length)
            state = beam_step(state, log_probs, eos, length_penalty, early_stopping)
            if not state.going:
                return best_sequences(state)
            order = state.reorder_index()
            for n in self._next_names:
                past[n] = np.take(past[n], order, axis=0)
            res = self.decoder_with_past.run(None, {"decoder_input_ids": state.last_tokens(),
                                                    "encoder_attention_mask": mask, **past})
            past.update(zip(self._next_names, res[1:]))
            log_probs = log_softmax(res[0][:, -1, :])

    def _force(self, scores: np.ndarray, cur_len: int, max_length: int) -> np.ndarray:
        """``generate``'s forced BOS (the first new token) then forced EOS (the token that
        reaches ``max_length``; it wins when both apply, as in ``generate``'s processor
        order): every other token's score set to -inf."""
        g = self.ids
        for when, name in ((cur_len == 1, "forced_bos_token_id"),
                           (cur_len == max_length - 1, "forced_eos_token_id")):
            forced = g.get(name)
            if when and forced is not None:
                scores = np.full_like(scores, -np.inf)
                scores[:, [forced] if isinstance(forced, int) else list(forced)] = 0.0
        return scores

    @property
    def tokenizer(self):
        """The tokenizer saved beside the graphs (loaded on first use)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.onnx_dir)
        return self._tokenizer

    def decode(self, output) -> list[str]:
        """The texts of :meth:`generate`'s rows: start token, padding and everything after the
        first end-of-sequence token dropped, special tokens skipped."""
        from distilkit.seq2seq.generate_eval import _strip

        g = self.ids
        return [self.tokenizer.decode(_strip(row, g["decoder_start_token_id"], g["pad_token_id"],
                                             g["eos_token_id"][0]), skip_special_tokens=True)
                for row in np.asarray(output).tolist()]


# ---------------------------------------------------------------------------------------
# The check and the export
# ---------------------------------------------------------------------------------------

def _reference(model: nn.Module, batch: dict, max_new_tokens: int) -> np.ndarray:
    """``model.generate``'s greedy output on ``batch``."""
    from distilkit.seq2seq.generate_eval import cache_kwargs

    with torch.no_grad():
        out = model.generate(input_ids=torch.from_numpy(batch["input_ids"]),
                             attention_mask=torch.from_numpy(batch["attention_mask"]),
                             num_beams=1, do_sample=False, max_new_tokens=max_new_tokens,
                             **cache_kwargs(model.config))
    return out.numpy().astype(np.int64)


def _generated(row: list, eos: list) -> list:
    """A row's tokens after the start token, up to and including its first end-of-sequence
    token (the padding after it dropped)."""
    out = []
    for t in row[1:]:
        out.append(t)
        if t in eos:
            break
    return out


def compare_generation(gen: OnnxSeq2SeqGenerator, model: nn.Module, batches: list[dict],
                       max_new_tokens: int = CHECK_NEW_TOKENS) -> dict:
    """The ONNX generator against ``model`` on ``batches``: ``identical`` (every output array
    equal to ``model.generate``'s, padding and length included), ``sequence_agreement`` (the
    share of rows generating the same tokens), ``argmax_agreement`` (the share of PyTorch's
    generated tokens the ONNX output has at the same place) and ``max_abs_diff``, the largest
    logit difference over all ``max_new_tokens`` steps (the first and every past length, the
    loop run on past the end of every row), PyTorch run teacher-forced on the ONNX tokens."""
    eos = gen.ids["eos_token_id"]
    identical, same_rows, rows, equal, total, diff = True, 0, 0, 0, 0, 0.0
    for b in batches:
        ref = _reference(model, b, max_new_tokens)
        got = gen.generate(b["input_ids"], b["attention_mask"], max_new_tokens, num_beams=1)
        identical &= ref.shape == got.shape and bool((ref == got).all())
        for r, g in zip(ref.tolist(), got.tolist()):
            r, g = _generated(r, eos), _generated(g, eos)
            same_rows += r == g
            equal += sum(a == c for a, c in zip(r, g))
            total += len(r)
        rows += ref.shape[0]
        full, kept = gen._generate(b["input_ids"], b["attention_mask"], max_new_tokens,
                                   keep_logits=True, run_all=True)
        with torch.no_grad():
            forced = model(input_ids=torch.from_numpy(b["input_ids"]),
                           attention_mask=torch.from_numpy(b["attention_mask"]),
                           decoder_input_ids=torch.from_numpy(full[:, :len(kept)])).logits
        diff = max(diff, float(np.abs(forced.float().numpy() - np.stack(kept, axis=1)).max()))
    return {"max_abs_diff": diff, "argmax_agreement": equal / max(total, 1),
            "sequence_agreement": same_rows / rows, "identical": identical, "rows": rows,
            "tokens": total}


def export_seq2seq(model_dir: str, out_dir: Optional[str] = None, int8: bool = False,
                   four_bit: bool = False, check_data: Optional[Sequence[str]] = None,
                   tolerance: float = TOLERANCE, max_new_tokens: int = CHECK_NEW_TOKENS) -> dict:
    """Export the seq2seq student in ``model_dir`` (a model directory, or a run directory with
    ``student/``) to ``out_dir`` (default ``MODEL_DIR/onnx``): the three graphs (see the
    module docstring), with ``int8`` also their ``*_int8.onnx`` dynamic int8 quantizations,
    with ``four_bit`` also ``*_4bit.onnx`` (a 4-bit quantized student's packed linears as
    MatMulNBits, :mod:`distilkit.export.nbits`; a student it cannot take is refused before
    any work), the tokenizer, ``config.json``, ``generation_config.json`` and ``export.json``.

    The fp32 and 4-bit exports are checked on ``check_data`` (source sentences; default
    :data:`CHECK_TEXTS`) with ``max_new_tokens`` new tokens: greedy outputs equal to
    ``model.generate``'s on every row and logits within ``tolerance`` at every step, else
    RuntimeError and nothing is written; int8's agreement is reported. Returns the figures
    written to ``export.json``; ``serve_variant`` (the ``variant`` to give
    :class:`OnnxSeq2SeqGenerator`) is ``"4bit"`` when written, else ``"int8"`` when its outputs
    equalled PyTorch's on every check row, else ``"fp32"``.
    """
    from transformers import AutoTokenizer

    from distilkit.compress.base import load_compressed
    from distilkit.evaluate import find_model_dir
    from distilkit.export.classifier import check_batches
    from distilkit.files import atomic_dir, atomic_write_json

    require_onnx()
    if not (isinstance(tolerance, (int, float)) and tolerance > 0):
        raise ValueError(f"tolerance={tolerance!r}: use a positive number, e.g. {TOLERANCE}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: use an integer >= 1, e.g. "
                         f"{CHECK_NEW_TOKENS}")
    model_dir = find_model_dir(model_dir)
    out_dir = out_dir or os.path.join(model_dir, "onnx")
    model = load_compressed(model_dir).float().eval()
    if not getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(f"{model_dir}: a {model.config.model_type} model is not an "
                         "encoder-decoder; export it with export_classifier")
    if four_bit:
        from distilkit.export.nbits import check_four_bit

        check_four_bit(model)
    texts = list(check_data) if check_data else list(CHECK_TEXTS)
    if not all(isinstance(t, str) and t.strip() for t in texts):
        raise ValueError(f"check_data: {texts[:3]!r}...: a seq2seq student is checked on source "
                         "sentences, one non-empty string each (with --texts: one a line, no "
                         "'first<TAB>second' pairs)")
    if len(texts) < 2:
        # The graphs are traced on all of them together: a batch of one could be traced into
        # graphs that only take one row, and the check would never see two.
        raise ValueError(f"check_data: {len(texts)} sentence; give at least 2 (of different "
                         "lengths) so the export is traced and checked on batches of several")
    ids = generation_ids(model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batches = [{k: b[k] for k in ("input_ids", "attention_mask")}
               for b in check_batches(tokenizer, texts)]
    result: dict = {}

    def checked(tmp: str, graphs: dict, what: str) -> dict:
        check = compare_generation(OnnxSeq2SeqGenerator._from_files(tmp, graphs, ids), model,
                                   batches, max_new_tokens)
        if not check["identical"] or check["max_abs_diff"] > tolerance:
            raise RuntimeError(
                f"{model_dir}: {what} does not generate what the PyTorch model does (outputs "
                f"equal on {check['sequence_agreement']:.3f} of the rows, max |logit diff| "
                f"{check['max_abs_diff']:.3g}, tolerance {tolerance:g}); nothing was written")
        return check

    def shared(tmp: str, graphs: dict, variant: str) -> dict:
        # One copy of the weights the graphs share (the decoder's are in both decoder
        # graphs), before the check, which then runs the files as they are served.
        return share_initializers(tmp, [graphs[g] for g in GRAPHS], weights_file(variant))

    def fill(tmp: str) -> None:
        start = ids["decoder_start_token_id"]
        fp32, _ = _export_graphs(model, batches[0], tmp, start)
        weights = shared(tmp, fp32, "fp32")
        check = checked(tmp, fp32, "the ONNX export")
        files = {"fp32": _describe(tmp, fp32, check, weights)}
        if int8:
            q = graph_files("int8")
            for g in GRAPHS:
                quantize_int8(os.path.join(tmp, fp32[g]), os.path.join(tmp, q[g]))
            weights = shared(tmp, q, "int8")
            files["int8"] = _describe(tmp, q, compare_generation(
                OnnxSeq2SeqGenerator._from_files(tmp, q, ids), model, batches, max_new_tokens),
                weights)
        if four_bit:
            nb, info = _export_graphs(model, batches[0], tmp, start, variant="4bit")
            weights = shared(tmp, nb, "4bit")
            files["4bit"] = {**_describe(tmp, nb, checked(tmp, nb, "the 4-bit (MatMulNBits) "
                                                                   "export"), weights),
                             "nbits": info}
        tokenizer.save_pretrained(tmp)
        shutil.copy(os.path.join(model_dir, "config.json"), os.path.join(tmp, "config.json"))
        model.generation_config.save_pretrained(tmp)
        serve = ("4bit" if four_bit else
                 "int8" if int8 and files["int8"]["sequence_agreement"] == 1.0 else "fp32")
        result.update({
            "model_dir": os.path.abspath(model_dir), "out_dir": os.path.abspath(out_dir),
            "format": "onnx", "task": "seq2seq", "opset": OPSET,
            "inputs": ["input_ids", "attention_mask"], "tolerance": tolerance,
            "check_rows": check["rows"], "check_max_new_tokens": max_new_tokens,
            "generation": ids, "files": files, "serve": files[serve]["file"],
            "serve_variant": serve,
            "serve_rule": "4bit when written (checked like fp32), else int8 when its greedy "
                          "outputs equalled PyTorch's on every check row, else fp32; load with "
                          "distilkit.export.seq2seq.OnnxSeq2SeqGenerator(out_dir, "
                          "variant=serve_variant)",
        })
        atomic_write_json(os.path.join(tmp, REPORT_FILE), result)

    atomic_dir(out_dir, fill)
    return result


def _describe(tmp: str, graphs: dict, check: dict, weights: dict) -> dict:
    """One variant's entry in ``export.json``: its graphs, their sizes, the weights file they
    share, its check figures. ``file`` names the three files at once (for the one-line
    summary); ``bytes`` is the variant on disk, graphs and weights file."""
    sizes = {g: os.path.getsize(os.path.join(tmp, f)) for g, f in graphs.items()}
    stem = graphs["encoder"][len("encoder"):]
    return {"file": "{" + ",".join(GRAPHS) + "}" + stem, "graphs": graphs,
            "graph_bytes": sizes, "weights_file": weights["weights_file"],
            "weights_bytes": weights["weights_bytes"], "shared_tensors": weights["shared"],
            "bytes": sum(sizes.values()) + weights["weights_bytes"], **check}
