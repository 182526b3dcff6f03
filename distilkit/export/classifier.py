"""The ONNX export of a classification student: every encoder kind distilkit makes and the
BiLSTM student, traced with dynamic batch and sequence axes and checked in onnxruntime
against the PyTorch model before anything is written.

The student is loaded with :func:`~distilkit.compress.base.load_compressed`, so every
compressed student (layer-dropped, head-pruned with per-layer head counts, FFN-pruned,
low-rank, vocabulary-pruned, packed low-bit weights, which compute with their dequantized
copy) exports the function it computes in PyTorch. ``int8`` adds onnxruntime's dynamic int8
quantization of the same graph (weights int8, activations quantized per call).

The check: the tokenizer encodes real sentences in batches of different lengths (batch 1
included), PyTorch and onnxruntime both run them, and the fp32 export must give logits within
``tolerance`` and the same argmax on every row, else the export fails. The int8 model is an
approximation: its argmax agreement rate and max logit difference are reported, not enforced.
The figures go to ``export.json`` beside the model files.

BiLSTM students run through an export form of their forward (:class:`_BiLSTMForExport`) that
keeps the sequence axis dynamic.
"""
from __future__ import annotations

import os
import shutil
import warnings
from typing import Optional, Sequence

import torch
from torch import nn

from distilkit.evaluate import find_model_dir
from distilkit.export.runtime import (FP32_FILE, INT8_FILE, OPSET, REPORT_FILE, require_onnx,
                                      session)

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


class _LogitsOnly(nn.Module):
    """The model's logits as the one output, from positional inputs named by ``names``."""

    def __init__(self, model: nn.Module, names: Sequence[str]):
        super().__init__()
        self.model, self.names = model, list(names)

    def forward(self, *inputs):
        return self.model(**dict(zip(self.names, inputs))).logits


class _BiLSTMForExport(nn.Module):
    """The single-sentence BiLSTM student's function in ops that trace with a dynamic sequence
    axis. The model's own ``compact_left`` cuts each batch to its longest row with ``.item()``,
    which a trace would freeze to the example's length; here the kept tokens are moved to the
    front of a full-width row instead (the extra positions are padding, masked out of the pool
    and beyond every row's length for the packed LSTM), which gives the same pooled features."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
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
        hidden = torch.relu(m.mlp(masked_max_pool(out, mask.long())))
        return m.classifier(hidden)


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
        if cfg.sentence_pair:
            raise ValueError(f"{model_dir}: a sentence-pair BiLSTM student cannot be exported "
                             "to ONNX yet; export single-sentence students")
        return _BiLSTMForExport(model).eval(), ["input_ids", "attention_mask"]
    params = inspect.signature(model.forward).parameters
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids")
             if n in params and n in tok_keys]
    # eval() on the wrapper too: the exporter puts the module back in the mode it found it in,
    # and a new module is in training mode (dropout on in the reference run).
    return _LogitsOnly(model, names).eval(), names


def check_batches(tokenizer, texts: Sequence[str], max_length: int = 128) -> list[dict]:
    """The texts as batches of different shapes: all of them padded together, the first half,
    the shortest text alone and the longest alone (numpy int64 arrays by input name)."""
    texts = list(texts)
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise ValueError(f"check_data: {texts!r} must be a non-empty list of non-empty strings")
    by_len = sorted(texts, key=len)
    groups = [texts, texts[: max(1, len(texts) // 2)], by_len[:1], by_len[-1:]]
    return [{k: v.astype("int64") for k, v in tokenizer(g, padding=True, truncation=True,
                                                         max_length=max_length,
                                                         return_tensors="np").items()}
            for g in groups]


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


def export_classifier(model_dir: str, out_dir: Optional[str] = None, int8: bool = False,
                      four_bit: bool = False, check_data: Optional[Sequence[str]] = None,
                      tolerance: float = TOLERANCE) -> dict:
    """Export the classification student in ``model_dir`` (a model directory, or a run directory
    with ``student/``) to ``out_dir`` (default ``MODEL_DIR/onnx``): ``model.onnx``, with
    ``int8`` also ``model_int8.onnx``, the tokenizer, ``config.json`` and ``export.json``.

    The fp32 export is checked on ``check_data`` (sentences; default :data:`CHECK_TEXTS`)
    against PyTorch: max |logit diff| <= ``tolerance`` and the same argmax, else RuntimeError
    and nothing is written. Returns the figures written to ``export.json``; ``serve`` names
    the int8 file when its argmax agreed on every check row, else the fp32 one.
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
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batches = check_batches(tokenizer, check_data or CHECK_TEXTS)
    module, names = _exportable(model, model_dir, list(batches[0]))
    result: dict = {}

    def fill(tmp: str) -> None:
        fp32 = os.path.join(tmp, FP32_FILE)
        example = tuple(torch.from_numpy(batches[0][n]) for n in names)
        axes = {n: {0: "batch", 1: "sequence"} for n in names}
        axes["logits"] = {0: "batch"}
        with warnings.catch_warnings():
            # The tracer warns about every Python-level branch on a shape; whether the graph
            # generalises is what the check below measures, on other batch sizes and lengths.
            warnings.simplefilter("ignore")
            torch.onnx.export(module, example, fp32, input_names=names,
                              output_names=["logits"], dynamic_axes=axes, opset_version=OPSET,
                              dynamo=False)
        check = compare(session(fp32), model, names, batches)
        if check["max_abs_diff"] > tolerance or check["argmax_agreement"] < 1.0:
            raise RuntimeError(
                f"{model_dir}: the ONNX export does not compute the PyTorch model's function "
                f"(max |logit diff| {check['max_abs_diff']:.3g} > tolerance {tolerance:g} or "
                f"argmax agreement {check['argmax_agreement']:.3f} < 1); nothing was written")
        files = {"fp32": {"file": FP32_FILE, "bytes": os.path.getsize(fp32), **check}}
        if int8:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            q = os.path.join(tmp, INT8_FILE)
            quantize_dynamic(fp32, q, weight_type=QuantType.QInt8)
            files["int8"] = {"file": INT8_FILE, "bytes": os.path.getsize(q),
                             **compare(session(q), model, names, batches)}
        tokenizer.save_pretrained(tmp)
        shutil.copy(os.path.join(model_dir, "config.json"), os.path.join(tmp, "config.json"))
        serve = "int8" if int8 and files["int8"]["argmax_agreement"] == 1.0 else "fp32"
        result.update({
            "model_dir": os.path.abspath(model_dir), "out_dir": os.path.abspath(out_dir),
            "format": "onnx", "opset": OPSET, "inputs": names, "tolerance": tolerance,
            "check_rows": check["rows"], "files": files, "serve": files[serve]["file"],
            "serve_rule": "model_int8.onnx when its argmax agreed with PyTorch on every check "
                          "row, else model.onnx",
        })
        atomic_write_json(os.path.join(tmp, REPORT_FILE), result)

    atomic_dir(out_dir, fill)
    return result
