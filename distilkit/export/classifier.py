"""The ONNX export of a classification student: every encoder kind distilkit makes and the
BiLSTM student, traced with dynamic batch and sequence axes and checked in onnxruntime
against the PyTorch model before anything is written.

The student is loaded with :func:`~distilkit.compress.base.load_compressed`, so every
compressed student (layer-dropped, head-pruned with per-layer head counts, FFN-pruned,
low-rank, vocabulary-pruned, packed low-bit weights, which compute with their dequantized
copy) exports the function it computes in PyTorch. ``int8`` adds onnxruntime's dynamic int8
quantization of the same graph (weights int8, activations quantized per call). ``four_bit``
adds ``model_4bit.onnx`` for a student trained with 4-bit quantized distillation: its packed
linears become onnxruntime ``MatMulNBits`` nodes fed with the student's own codes and bucket
scales and its packed embeddings (``quantize_embeddings``) ``GatherBlockQuantized`` nodes
(:mod:`distilkit.export.nbits`), so the file computes the quantized student's own function;
other packed weights (packed LSTM matrices) stay as their dequantized fp32 copy.

The check: the tokenizer encodes real sentences (or sentence pairs) in batches of different
lengths (batch 1 included), PyTorch and onnxruntime both run them, and the fp32 and 4-bit
exports must give logits within ``tolerance`` and the same argmax on every row, else the
export fails and nothing is written. The int8 model is an approximation: its argmax agreement
rate and max logit difference are reported, not enforced. The figures go to ``export.json``
beside the model files, with the file to serve (``serve``, rule in ``serve_rule``).

BiLSTM students run through an export form of their forward (:class:`_BiLSTMForExport`) that
keeps the sequence axis dynamic. A sentence-pair BiLSTM takes its two sentences as separate
inputs, ``input_ids`` / ``attention_mask`` and ``input_ids_b`` / ``attention_mask_b``, each
with its own dynamic sequence axis (``sequence`` and ``sequence_b``): encode the first
sentences and the second ones each on their own with the saved tokenizer. It is checked on
pairs (default :data:`CHECK_PAIRS`).
"""
from __future__ import annotations

import os
import shutil
import warnings
from typing import Optional, Sequence

import torch
from torch import nn

from distilkit.evaluate import find_model_dir
from distilkit.export.runtime import (DISABLED_OPTIMIZERS, FP32_FILE, INT8_FILE, NBITS_FILE,
                                      OPSET, REPORT_FILE, require_onnx, session)

TOLERANCE = 1e-4
# Sentences of the kind the built-in sentiment data holds, of different lengths.
CHECK_TEXTS = (
    "a gorgeous, witty, seductive movie.",
    "the plot is nothing but boilerplate clichés from start to finish.",
    "it's a charming and often affecting journey.",
    "dull.",
    "an utterly incompetent conclusion to a film that had promise in its first hour, "
    "undone by a script that never trusts its audience.",
    "the acting is fine but the story goes nowhere",
    "one of the best films of the year",
    "a mess",
)
# Pairs of those sentences, each with one of another length: the default check of a
# sentence-pair student.
CHECK_PAIRS = tuple(zip(CHECK_TEXTS, CHECK_TEXTS[3:] + CHECK_TEXTS[:3]))
SERVE_RULE = ("model_4bit.onnx when it was exported (it computes the quantized student's own "
              "function), else model_int8.onnx when its argmax agreed with PyTorch on every "
              "check row, else model.onnx")


class _LogitsOnly(nn.Module):
    """The model's logits as the one output, from positional inputs named by ``names``."""

    def __init__(self, model: nn.Module, names: Sequence[str]):
        super().__init__()
        self.model, self.names = model, list(names)

    def forward(self, *inputs):
        return self.model(**dict(zip(self.names, inputs))).logits


class _BiLSTMForExport(nn.Module):
    """The BiLSTM student's function in ops that trace with dynamic sequence axes. The model's
    own ``compact_left`` cuts each batch to its longest row with ``.item()``, which a trace
    would freeze to the example's length; here the kept tokens are moved to the front of a
    full-width row instead (the extra positions are padding, masked out of the pool and beyond
    every row's length for the packed LSTM), which gives the same pooled features.

    A sentence-pair student takes the second sentences as ``input_ids_b`` /
    ``attention_mask_b`` (their own width) and encodes the two halves one after the other with
    the shared encoder; the model pads them to one width and encodes them in one call, which
    gives the same features row by row."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def _encode(self, input_ids, attention_mask):
        from distilkit.students.bilstm import masked_max_pool

        m, pad = self.model, self.model.config.pad_token_id
        keep = attention_mask.bool()
        width = input_ids.shape[1]
        pos = torch.arange(width, device=input_ids.device).unsqueeze(0)
        # Unique keys (dropped positions after kept ones, each in order): any sort is stable.
        order = torch.argsort((~keep).long() * width + pos, dim=1)
        lengths = keep.sum(dim=1)
        mask = pos < lengths.unsqueeze(1)
        ids = torch.gather(input_ids, 1, order).masked_fill(~mask, pad)
        packed = nn.utils.rnn.pack_padded_sequence(m.embeddings(ids), lengths.clamp(min=1),
                                                   batch_first=True, enforce_sorted=False)
        out, _ = m.lstm(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=width)
        return masked_max_pool(out, mask.long())

    def forward(self, input_ids, attention_mask, input_ids_b=None, attention_mask_b=None):
        from distilkit.students.bilstm import pair_features

        m = self.model
        feats = self._encode(input_ids, attention_mask)
        if input_ids_b is not None:
            feats = pair_features(feats, self._encode(input_ids_b, attention_mask_b))
        return m.classifier(torch.relu(m.mlp(feats)))


def _is_pair_bilstm(model: nn.Module) -> bool:
    cfg = model.config
    return cfg.model_type == "distilkit-bilstm" and bool(getattr(cfg, "sentence_pair", False))


def _exportable(model: nn.Module, model_dir: str, tok_keys: Sequence[str]
                ) -> tuple[nn.Module, list[str]]:
    """The module to trace and the names of its inputs, or a ValueError for a student kind
    that cannot be exported."""
    import inspect

    cfg = model.config
    if getattr(cfg, "is_encoder_decoder", False):
        raise ValueError(f"{model_dir}: a seq2seq model ({cfg.model_type}); distilkit export "
                         "handles classification students only for now")
    if cfg.model_type == "distilkit-bilstm":
        names = ["input_ids", "attention_mask"]
        if cfg.sentence_pair:
            names += ["input_ids_b", "attention_mask_b"]
        return _BiLSTMForExport(model).eval(), names
    params = inspect.signature(model.forward).parameters
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids")
             if n in params and n in tok_keys]
    # eval() on the wrapper too: the exporter puts the module back in the mode it found it in,
    # and a new module is in training mode (dropout on in the reference run).
    return _LogitsOnly(model, names).eval(), names


def _is_pair(t) -> bool:
    return (isinstance(t, (tuple, list)) and len(t) == 2
            and all(isinstance(x, str) and x.strip() for x in t))


def check_batches(tokenizer, texts: Sequence, max_length: int = 128,
                  separate_pairs: bool = False) -> list[dict]:
    """The texts as batches of different shapes: all of them padded together, the first half,
    the shortest text alone and the longest alone (numpy int64 arrays by input name).

    ``texts`` are sentences, or pairs ``(first, second)`` of sentences. Pairs are encoded as
    the tokenizer encodes a pair (one sequence, ``token_type_ids`` 1 on the second
    sentence), or with ``separate_pairs`` each side on its own: the first sentences as
    ``input_ids`` / ``attention_mask``, the second ones as ``input_ids_b`` /
    ``attention_mask_b`` (how a sentence-pair BiLSTM is exported)."""
    texts = [tuple(t) if isinstance(t, list) else t for t in texts]
    single = all(isinstance(t, str) and t.strip() for t in texts)
    if not texts or not (single or all(_is_pair(t) for t in texts)):
        raise ValueError(f"check_data: {texts!r} must be a non-empty list of non-empty strings, "
                         "or of (first, second) pairs of non-empty strings")
    if separate_pairs and single:
        raise ValueError("check_data: this is a sentence-pair student; give (first, second) "
                         "pairs of sentences (with --texts: 'first<TAB>second' lines)")

    def size(t):
        return len(t) if single else len(t[0]) + len(t[1])

    by_len = sorted(texts, key=size)
    groups = [texts, texts[: max(1, len(texts) // 2)], by_len[:1], by_len[-1:]]

    def encode(*parts):
        enc = tokenizer(*parts, padding=True, truncation=True, max_length=max_length,
                        return_tensors="np")
        return {k: v.astype("int64") for k, v in enc.items()}

    out = []
    for g in groups:
        if single:
            out.append(encode(g))
        elif separate_pairs:
            first, second = encode([a for a, _ in g]), encode([b for _, b in g])
            out.append({**first, **{f"{k}_b": v for k, v in second.items()}})
        else:
            out.append(encode([a for a, _ in g], [b for _, b in g]))
    return out


def _run_torch(model: nn.Module, names: Sequence[str], batch: dict):
    """The model's own logits (its own forward, not the export form traced)."""
    with torch.no_grad():
        return model(**{n: torch.from_numpy(batch[n]) for n in names}).logits.float().numpy()


def _run_ort(session, batch: dict):
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {n: batch[n] for n in names})[0]


def compare(session, model: nn.Module, names: Sequence[str], batches: list[dict]) -> dict:
    """Max |logit difference| and argmax agreement of ``session`` against ``model``."""
    import numpy as np

    diff, agree, rows = 0.0, 0, 0
    for b in batches:
        ref, got = _run_torch(model, names, b), _run_ort(session, b)
        if ref.shape != got.shape:
            raise RuntimeError(f"ONNX output shape {got.shape} != PyTorch's {ref.shape}")
        diff = max(diff, float(np.abs(ref - got).max()))
        agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        rows += ref.shape[0]
    return {"max_abs_diff": diff, "argmax_agreement": agree / rows, "rows": rows}


def _check_failed(model_dir: str, what: str, check: dict, tolerance: float) -> Optional[str]:
    if check["max_abs_diff"] <= tolerance and check["argmax_agreement"] == 1.0:
        return None
    return (f"{model_dir}: {what} does not compute the PyTorch model's function (max |logit "
            f"diff| {check['max_abs_diff']:.3g} > tolerance {tolerance:g} or argmax agreement "
            f"{check['argmax_agreement']:.3f} < 1); nothing was written")


def _fused_ok(path: str, model: nn.Module, names, batches, tolerance: float) -> bool:
    """Whether the fused graph at ``path`` loads and computes the model's function. A layout
    the optimizer mis-fuses (e.g. layers with their own head counts after head pruning, given
    one count) fails to load or to match, and the traced graph is quantized instead."""
    try:
        check = compare(session(path), model, names, batches)
    except Exception:  # onnxruntime refuses the graph: its own error type, not ours to name
        return False
    return _check_failed("", "", check, tolerance) is None


def trace(module: nn.Module, example: tuple, path: str, names: Sequence[str],
          axes: dict) -> None:
    """``module`` traced into ``path`` (inputs ``names``, output ``logits``, ``axes``
    dynamic), as every classifier export and the budget search's latency table trace it."""
    with warnings.catch_warnings():
        # The tracer warns about every Python-level branch on a shape; whether the graph
        # generalises is what the checks measure, on other batch sizes and lengths.
        warnings.simplefilter("ignore")
        torch.onnx.export(module, example, path, input_names=list(names),
                          output_names=["logits"], dynamic_axes=axes, opset_version=OPSET,
                          dynamo=False)


def int8_file(model: nn.Module, names: Sequence[str], example: tuple, axes: dict,
              batches: list[dict], fp32: str, dst: str, tolerance: float = TOLERANCE,
              encoder: bool = True, attention: bool = True) -> str:
    """The ``--int8`` file of ``model`` (traced already into ``fp32``) written to ``dst``; the
    graph it was made from is returned: for an encoder the fused graphs, best first ("fused",
    then "fused except attention"), the first that checks out against the model on
    ``batches``, else the traced one ("traced"). Per-channel scales for encoders.
    ``attention=False``: not the first (the latency table prices a layer in the graph a
    student with a head-pruned layer gets, whose attention never fuses)."""
    from distilkit.export.int8 import fused_graph, int8_from, remove

    src, graph, fused = fp32, "traced", None
    if encoder:
        tmp = os.path.dirname(os.path.abspath(dst))
        kinds = ((True, "fused"), (False, "fused except attention"))
        for fuse, label in kinds[0 if attention else 1:]:
            fused = fused_graph(model, lambda m: _LogitsOnly(m, names), example, names,
                                axes, os.path.join(tmp, ".fused.onnx"), fuse)
            if fused and _fused_ok(fused, model, names, batches, tolerance):
                src, graph = fused, label
                break
    int8_from(src, dst, per_channel=encoder)
    remove(fused)
    return graph


def export_classifier(model_dir: str, out_dir: Optional[str] = None, int8: bool = False,
                      four_bit: bool = False, check_data: Optional[Sequence] = None,
                      tolerance: float = TOLERANCE) -> dict:
    """Export the classification student in ``model_dir`` (a model directory, or a run directory
    with ``student/``) to ``out_dir`` (default ``MODEL_DIR/onnx``): ``model.onnx``, with
    ``int8`` also ``model_int8.onnx``, with ``four_bit`` also ``model_4bit.onnx`` (the 4-bit
    student's packed linears as MatMulNBits and packed embeddings as GatherBlockQuantized,
    :mod:`distilkit.export.nbits`; a model it cannot
    take is refused before any work), the tokenizer, ``config.json`` and ``export.json``.

    ``check_data``: sentences, or ``(first, second)`` pairs; default :data:`CHECK_TEXTS`, and
    :data:`CHECK_PAIRS` for a sentence-pair BiLSTM (which must be checked on pairs). The fp32
    and 4-bit files are checked on them against PyTorch (the 4-bit file against the quantized
    student itself): max |logit diff| <= ``tolerance`` and the same argmax on every row, else
    RuntimeError and nothing is written. Returns the figures written to ``export.json``;
    ``serve`` names the 4-bit file when there is one, else the int8 file when its argmax
    agreed on every check row, else the fp32 one.
    """
    from transformers import AutoTokenizer

    from distilkit.compress.base import load_compressed
    from distilkit.files import atomic_dir, atomic_write_json

    require_onnx()
    if not (isinstance(tolerance, (int, float)) and tolerance > 0):
        raise ValueError(f"tolerance={tolerance!r}: use a positive number, e.g. {TOLERANCE}")
    model_dir = find_model_dir(model_dir)
    out_dir = out_dir or os.path.join(model_dir, "onnx")
    model = load_compressed(model_dir).float().eval()
    if four_bit:
        from distilkit.export.nbits import check_four_bit

        check_four_bit(model)
    pair = _is_pair_bilstm(model)
    texts = list(check_data) if check_data else list(CHECK_PAIRS if pair else CHECK_TEXTS)
    if model.config.model_type == "distilkit-bilstm" and not pair and texts and \
            all(_is_pair(t) for t in texts):
        raise ValueError(f"check_data: {model_dir} is a single-sentence BiLSTM student; give "
                         "one sentence a row, not (first, second) pairs")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batches = check_batches(tokenizer, texts, separate_pairs=pair)
    module, names = _exportable(model, model_dir, list(batches[0]))
    result: dict = {}

    def fill(tmp: str) -> None:
        fp32 = os.path.join(tmp, FP32_FILE)
        example = tuple(torch.from_numpy(batches[0][n]) for n in names)
        axes = {n: {0: "batch", 1: "sequence_b" if n.endswith("_b") else "sequence"}
                for n in names}
        axes["logits"] = {0: "batch"}
        trace(module, example, fp32, names, axes)
        check = compare(session(fp32), model, names, batches)
        failed = _check_failed(model_dir, "the ONNX export", check, tolerance)
        if failed:
            raise RuntimeError(failed)
        files = {"fp32": {"file": FP32_FILE, "bytes": os.path.getsize(fp32), **check}}
        if int8:
            q = os.path.join(tmp, INT8_FILE)
            encoder = isinstance(module, _LogitsOnly)
            graph = int8_file(model, names, example, axes, batches, fp32, q, tolerance,
                              encoder=encoder)
            files["int8"] = {"file": INT8_FILE, "bytes": os.path.getsize(q),
                             "graph": graph, "per_channel": encoder,
                             **compare(session(q), model, names, batches)}
        if four_bit:
            from distilkit.export.nbits import export_four_bit

            nb = os.path.join(tmp, NBITS_FILE)
            info = export_four_bit(model, module, example, nb, input_names=names,
                                   output_names=["logits"], dynamic_axes=axes)
            check4 = compare(session(nb), model, names, batches)
            failed = _check_failed(model_dir, "the 4-bit (MatMulNBits) export", check4,
                                   tolerance)
            if failed:
                raise RuntimeError(failed)
            files["4bit"] = {"file": NBITS_FILE, "bytes": os.path.getsize(nb), **check4, **info}
        tokenizer.save_pretrained(tmp)
        shutil.copy(os.path.join(model_dir, "config.json"), os.path.join(tmp, "config.json"))
        serve = ("4bit" if four_bit else
                 "int8" if int8 and files["int8"]["argmax_agreement"] == 1.0 else "fp32")
        result.update({
            "model_dir": os.path.abspath(model_dir), "out_dir": os.path.abspath(out_dir),
            "format": "onnx", "opset": OPSET, "inputs": names, "tolerance": tolerance,
            "check_rows": check["rows"], "files": files, "serve": files[serve]["file"],
            "serve_rule": SERVE_RULE,
            # how distilkit's sessions load the files (and how to serve them: faster on CPU)
            "disabled_optimizers": list(DISABLED_OPTIMIZERS),
        })
        atomic_write_json(os.path.join(tmp, REPORT_FILE), result)

    atomic_dir(out_dir, fill)
    return result
