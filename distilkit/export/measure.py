"""One exported student in every runtime it can be served with, measured the same way.

An export directory (``distilkit export``) holds ONNX files of one student, and its
``export.json`` names the model directory they were made from. :func:`evaluate_export` scores
the student on one data split in each runtime: PyTorch fp32 (that model directory, loaded with
:func:`~distilkit.compress.base.load_compressed`) and onnxruntime on each ONNX file
(``model.onnx``, ``model_int8.onnx``, ``model_4bit.onnx``, whichever are there). Per runtime:

* ``accuracy`` and ``f1`` (macro-F1): :func:`distilkit.metrics.accuracy_f1` of the predictions
  that :func:`distilkit.evaluate.predict` makes, batched and padded as for any model;
* ``agreement``: the share of the split's rows on which the runtime predicts what the PyTorch
  model predicts (1.0 for PyTorch itself);
* ``latency_b1_ms`` / ``latency_b32_ms``: median wall time of one forward pass at batch 1 and
  32 with every row ``max_length`` tokens long (the split's token ids repeated to that length,
  :func:`~distilkit.evaluate.fixed_length_batch`, and :func:`~distilkit.evaluate.latency_ms`,
  as :func:`~distilkit.evaluate.evaluate_model` times the teacher), one runtime after the
  other, torch and onnxruntime on the same number of threads (``threads``);
* ``size_mb`` / ``size_bytes``: the file on disk (PyTorch: the saved model files, tokenizer
  excluded, as :func:`~distilkit.evaluate.model_files` counts them).

A seq2seq export (:mod:`distilkit.export.seq2seq`: three graphs per variant and a greedy or
beam search loop) is scored by generation instead, :func:`evaluate_seq2seq_export`, with the
recipe's ``generation`` settings (``num_beams`` included) in every runtime: BLEU, chrF and
exact match, agreement as the share of sentences generated exactly as PyTorch generates them,
and generation time at batch 1 and 32.

onnxruntime is imported only when an export is measured (importing distilkit never needs it).
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from distilkit.export.runtime import REPORT_FILE, TIMING_SPIN_US, session

PYTORCH = "pytorch-fp32"
RUNTIME_TITLES = {PYTORCH: "PyTorch fp32", "onnx-fp32": "ONNX Runtime fp32",
                  "onnx-int8": "ONNX Runtime int8", "onnx-4bit": "ONNX Runtime 4-bit"}
LATENCY_RUNS = (20, 5)  # timed runs at batch 1 and batch 32, as evaluate_model's defaults
WARMUP = 2


class OrtClassifier(nn.Module):
    """An onnxruntime session behind a classifier's interface (``model(**batch)["logits"]``),
    so :func:`distilkit.evaluate.predict`, the latency helpers and a label view
    (:class:`~distilkit.tasks.classification.LabelMapped`) run it as they run a PyTorch model.
    The batch's tensors go to the graph's inputs by name (a sentence-pair BiLSTM's
    ``input_ids_b`` / ``attention_mask_b`` too); an input the graph takes but the batch lacks
    is filled as the tokenizer would: zeros for ``token_type_ids``, ones for a mask."""

    def __init__(self, path: str, config: Any, threads: Optional[int] = None,
                 spin_us: Optional[int] = None):
        super().__init__()
        self.session = session(path, threads, spin_us=spin_us)
        self.names = [i.name for i in self.session.get_inputs()]
        self.config = config

    def forward(self, **batch):
        if "input_ids_b" in self.names and "input_ids_b" not in batch:
            batch = self._split_pair(batch)
        feed = {}
        for name in self.names:
            t = batch.get(name)
            if t is None:  # the other masks go with their own ids (a pair's second sentence)
                like = batch["input_ids_b" if name.endswith("_b") else "input_ids"]
                t = (torch.zeros_like if name.startswith("token_type_ids") else torch.ones_like)(like)
            feed[name] = t.numpy().astype(np.int64, copy=False)
        return {"logits": torch.from_numpy(self.session.run(None, feed)[0])}

    def _split_pair(self, batch: dict) -> dict:
        """A sentence pair encoded as one sequence (the word tokenizer's ``$A $B``,
        ``token_type_ids`` 1 on ``$B``), cut into the graph's two inputs the way the PyTorch
        BiLSTM cuts it (:func:`~distilkit.students.bilstm.compact_left` of each segment)."""
        from distilkit.students.bilstm import compact_left

        ids, tt = batch["input_ids"], batch.get("token_type_ids")
        if tt is None:
            raise ValueError("a sentence-pair export needs pairs: give the data's second text "
                             "column (text_pair_column)")
        pad = self.config.pad_token_id
        real = batch.get("attention_mask", (ids != pad).long()).bool()
        a, a_mask, _ = compact_left(ids, real & (tt == 0), pad)
        b, b_mask, _ = compact_left(ids, real & (tt == 1), pad)
        return {"input_ids": a, "attention_mask": a_mask, "input_ids_b": b,
                "attention_mask_b": b_mask}


def is_export_dir(path: str) -> bool:
    """Whether ``path`` is a directory ``distilkit export`` wrote (it holds ``export.json``)."""
    return os.path.isfile(os.path.join(path, REPORT_FILE))


def read_export(export_dir: str) -> dict:
    """``export.json`` of ``export_dir``, or a FileNotFoundError that says how to make one."""
    path = os.path.join(export_dir, REPORT_FILE)
    if not os.path.isfile(path):
        found = sorted(os.listdir(export_dir)) if os.path.isdir(export_dir) else None
        raise FileNotFoundError(
            f"{export_dir!r} holds no {REPORT_FILE} (files there: {found or 'none'}); give a "
            "directory written by `distilkit export MODEL_DIR --format onnx`")
    with open(path, encoding="utf-8") as f:
        try:
            export = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e}); export again") from None
    return export


def is_seq2seq(export: dict) -> bool:
    """Whether an ``export.json`` is a seq2seq export's (generation graphs)."""
    return export.get("task") == "seq2seq"


def export_model_dir(export_dir: str, export: dict) -> str:
    """The PyTorch model the export was made from: ``export.json``'s ``model_dir``, else (a run
    directory moved or copied since) the export's parent when it holds the model, as the
    default layout ``MODEL_DIR/onnx`` has it."""
    from distilkit.evaluate import model_files

    named = export.get("model_dir")
    if named and os.path.isfile(os.path.join(named, "config.json")):
        return named
    parent = os.path.dirname(os.path.abspath(export_dir))
    try:
        model_files(parent)
        return parent
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{export_dir}: the model it was exported from ({named!r}, named in {REPORT_FILE}) "
            "is not there, nor in the export's parent directory; put the export back in its "
            "model directory, or export again") from None


def runtime_files(export: dict) -> dict[str, str]:
    """``runtime -> ONNX file`` of an export, in its ``files`` order (fp32, int8, 4bit)."""
    return {f"onnx-{kind}": f["file"] for kind, f in export.get("files", {}).items()}


def evaluate_export(export_dir: str, dataset, *, text_column: str = "text",
                    text_pair_column: Optional[str] = None, label_column: str = "label",
                    label_names: Optional[Sequence[str]] = None, max_length: int = 128,
                    batch_size: int = 64, threads: Optional[int] = None, latency: bool = True,
                    latency_runs: tuple[int, int] = LATENCY_RUNS, progress: bool = True) -> dict:
    """The figures of the student exported to ``export_dir`` in each runtime (module
    docstring), on ``dataset`` (a ``datasets.Dataset`` with the text and label columns).

    ``label_names``: the data's class names in id order; when the model numbers its classes
    otherwise, its answers are read in the data's order by name, as ``distilkit evaluate``
    does for a PyTorch model. ``threads``: for torch and onnxruntime alike (default torch's
    current count). ``latency=False`` skips the timing (its keys are then ``None``).

    Returns ``{export_dir, model_dir, task, serve, examples, max_length, threads,
    latency_protocol,
    runtimes: {runtime: {runtime_title, file, accuracy, f1, agreement, latency_b1_ms,
    latency_b32_ms, size_mb, size_bytes}}}``; ONNX files are named relative to ``export_dir``,
    the PyTorch ones relative to ``model_dir``.
    """
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from distilkit.compress.base import load_compressed
    from distilkit.evaluate import (WEIGHT_SUFFIXES, _encode, fixed_length_batch, latency_ms,
                                    model_files, predict)
    from distilkit.metrics import accuracy_f1

    export = read_export(export_dir)
    if is_seq2seq(export):
        raise ValueError(f"{export_dir}: a seq2seq export; measure it with "
                         "evaluate_seq2seq_export (generation), not as a classifier")
    if len(dataset) == 0:
        raise ValueError("the evaluation split is empty")
    model_dir = export_model_dir(export_dir, export)
    threads = threads or torch.get_num_threads()
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    rows, labels = _encode(dataset, tokenizer, text_column, text_pair_column, label_column,
                           max_length)
    pad_id = getattr(tokenizer, "pad_token_id", None) or 0

    reference = load_compressed(model_dir).float().eval()
    models: dict[str, nn.Module] = {PYTORCH: reference}
    saved = model_files(model_dir)
    files = {PYTORCH: ", ".join(n for n in saved if n.endswith(WEIGHT_SUFFIXES))}
    sizes = {PYTORCH: sum(saved.values())}
    for name, file in runtime_files(export).items():
        path = os.path.join(export_dir, file)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{export_dir}: {file} is named in {REPORT_FILE} but missing; "
                                    "export again")
        models[name] = OrtClassifier(path, reference.config, threads, spin_us=TIMING_SPIN_US)
        files[name], sizes[name] = file, os.path.getsize(path)
    if label_names:
        from distilkit.tasks.classification import in_data_order

        models = {k: in_data_order(m, list(label_names)) for k, m in models.items()}

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    bar = tqdm(total=len(models) + (2 if latency else 0), desc="runtimes", unit="step",
               disable=not progress, leave=False)
    try:
        preds = {}
        for name, m in models.items():
            bar.set_postfix_str(name)
            preds[name] = predict(m, rows, pad_id, batch_size)
            bar.update()
        times: dict[int, dict] = {}
        if latency:
            for b, runs in zip((1, 32), latency_runs):
                batch = fixed_length_batch(rows, b, max_length)
                bar.set_postfix_str(f"latency batch {b}")
                # One runtime after the other, each warm (its warm-up runs first), its
                # onnxruntime threads spinning at most TIMING_SPIN_US after a run.
                times[b] = {k: latency_ms(m, batch, WARMUP, runs) for k, m in models.items()}
                bar.update()
    finally:
        bar.close()
        torch.set_num_threads(before)

    runtimes = {}
    for name in models:
        scores = accuracy_f1(preds[name], labels)
        runtimes[name] = {
            "runtime_title": RUNTIME_TITLES.get(name, name), "file": files[name],
            "accuracy": scores["accuracy"], "f1": scores["macro_f1"],
            "agreement": float((preds[name] == preds[PYTORCH]).mean()),
            "latency_b1_ms": round(times[1][name], 3) if latency else None,
            "latency_b32_ms": round(times[32][name], 3) if latency else None,
            "size_mb": round(sizes[name] / 1e6, 3), "size_bytes": sizes[name],
        }
    return {
        "export_dir": os.path.abspath(export_dir), "model_dir": os.path.abspath(model_dir),
        "task": "classification", "serve": export.get("serve"), "examples": int(len(labels)),
        "max_length": max_length,
        "threads": threads,
        "latency_protocol": (f"median of {latency_runs[0]} (batch 1) / {latency_runs[1]} "
                             f"(batch 32) runs after {WARMUP} warm-up, one runtime after the "
                             f"other; {max_length} real tokens a row, no padding")
                            if latency else None,
        "runtimes": runtimes,
    }


class OrtSeq2Seq(nn.Module):
    """An exported seq2seq model's generation loop in onnxruntime
    (:class:`~distilkit.export.seq2seq.OnnxSeq2SeqGenerator`: greedy, or beam search with
    ``num_beams``, ``length_penalty`` and ``early_stopping``) behind ``model.generate``, so
    :mod:`distilkit.seq2seq.generate_eval` generates, scores and times it as it does a PyTorch
    model, with the same settings. ``pad_token_id`` fills the places after a row's end, as
    ``generate`` fills them. Sampling (``do_sample=True``) is refused; the other arguments
    ``generate_texts`` passes for transformers (a cache, the end id, which the export's
    generation config holds) do not change the loop."""

    def __init__(self, export_dir: str, variant: str, config: Any, generation_config: Any,
                 threads: Optional[int] = None):
        super().__init__()
        from distilkit.export.seq2seq import OnnxSeq2SeqGenerator

        self.generator = OnnxSeq2SeqGenerator(export_dir, variant, threads)
        self.config, self.generation_config = config, generation_config

    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 64,
                 num_beams: int = 1, length_penalty: Optional[float] = None,
                 early_stopping=None, pad_token_id: Optional[int] = None,
                 do_sample: bool = False, **_transformers_only):
        if do_sample:
            raise ValueError("do_sample: True; the ONNX generation loop decodes greedily or by "
                             "beam search only: use do_sample=False")
        mask = None if attention_mask is None else attention_mask.numpy()
        out = self.generator.generate(input_ids.numpy(), mask, max_new_tokens, num_beams,
                                      length_penalty=length_penalty,
                                      early_stopping=early_stopping, pad_token_id=pad_token_id)
        return torch.from_numpy(out)


def evaluate_seq2seq_export(export_dir: str, dataset, *, source_column: str = "source",
                            target_column: str = "target", generation: Optional[dict] = None,
                            threads: Optional[int] = None, latency: bool = True,
                            latency_samples: int = 16, runs: int = 3,
                            progress: bool = True) -> dict:
    """The seq2seq student exported to ``export_dir`` in each runtime (PyTorch fp32 and the
    ONNX generation loop on each exported variant), scored by generation on ``dataset``: ``bleu``,
    ``chrf``, ``exact_match`` (:func:`~distilkit.seq2seq.generate_eval.score_texts`),
    ``agreement`` (the share of sentences whose output equals PyTorch's), ``latency_b1_ms``
    (median time to generate one sentence alone, over ``latency_samples`` sentences,
    :func:`~distilkit.seq2seq.generate_eval.latency_ms`), ``latency_b32_ms`` (median of
    ``runs`` generations of 32 sentences together) and ``size_mb`` (PyTorch: the saved model
    files; ONNX: the variant's three graphs). Every runtime decodes with ``generation``'s
    settings (:class:`~distilkit.seq2seq.generate_eval.GenerationSettings`: greedy, or beam
    search with ``num_beams`` and ``length_penalty``; ``max_new_tokens``)."""
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from distilkit.compress.base import load_compressed
    from distilkit.evaluate import WEIGHT_SUFFIXES, model_files
    from distilkit.seq2seq.data import check_seq2seq_columns
    from distilkit.seq2seq.generate_eval import (GenerationSettings, generate_texts,
                                                 latency_ms, score_texts)

    export = read_export(export_dir)
    if not is_seq2seq(export):
        raise ValueError(f"{export_dir}: a classifier export; measure it with evaluate_export")
    check_seq2seq_columns(dataset, source_column, target_column)
    if len(dataset) == 0:
        raise ValueError("the evaluation split is empty")
    settings = GenerationSettings(**(generation or {}))
    model_dir = export_model_dir(export_dir, export)
    threads = threads or torch.get_num_threads()
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    srcs, refs = list(dataset[source_column]), list(dataset[target_column])

    reference = load_compressed(model_dir).float().eval()
    saved = model_files(model_dir)
    models: dict[str, nn.Module] = {PYTORCH: reference}
    files = {PYTORCH: ", ".join(n for n in saved if n.endswith(WEIGHT_SUFFIXES))}
    sizes = {PYTORCH: sum(saved.values())}
    for kind, f in export.get("files", {}).items():
        models[f"onnx-{kind}"] = OrtSeq2Seq(export_dir, kind, reference.config,
                                            reference.generation_config, threads)
        files[f"onnx-{kind}"], sizes[f"onnx-{kind}"] = f["file"], f["bytes"]

    batch32 = [srcs[i % len(srcs)] for i in range(32)]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    bar = tqdm(total=len(models), desc="runtimes", unit="runtime", disable=not progress,
               leave=False)
    runtimes: dict = {}
    try:
        texts = {}
        for name, m in models.items():
            bar.set_postfix_str(name)
            texts[name] = generate_texts(m, tokenizer, srcs, settings).texts
            r = {"runtime_title": RUNTIME_TITLES.get(name, name), "file": files[name],
                 **{k: v for k, v in score_texts(texts[name], refs).items() if k != "n"},
                 "agreement": float(np.mean([a == b for a, b in zip(texts[name], texts[PYTORCH])])),
                 "latency_b1_ms": None, "latency_b32_ms": None,
                 "size_mb": round(sizes[name] / 1e6, 3), "size_bytes": sizes[name]}
            if latency:
                r["latency_b1_ms"] = round(latency_ms(m, tokenizer, srcs[:latency_samples],
                                                      settings), 3)
                wide = GenerationSettings(**{**settings.to_dict(), "batch_size": 32})
                r["latency_b32_ms"] = round(1000 * float(np.median([
                    generate_texts(m, tokenizer, batch32, wide).seconds
                    for _ in range(runs)])), 3)
            runtimes[name] = r
            bar.update()
    finally:
        bar.close()
        torch.set_num_threads(before)
    return {
        "export_dir": os.path.abspath(export_dir), "model_dir": os.path.abspath(model_dir),
        "task": "seq2seq", "serve": export.get("serve"),
        "serve_variant": export.get("serve_variant"), "examples": len(refs), "threads": threads,
        "generation": settings.to_dict(),
        "latency_protocol": (f"batch 1: median over {min(latency_samples, len(srcs))} sentences "
                             f"generated alone; batch 32: median of {runs} generations of 32 "
                             f"sentences; {decoding(settings.to_dict())}, one runtime after "
                             "the other")
                            if latency else None,
        "runtimes": runtimes,
    }


def decoding(generation: dict) -> str:
    """``"greedy"`` or ``"beam 4, length_penalty 1"``: how a seq2seq measurement decoded."""
    k = generation.get("num_beams", 1)
    if k == 1:
        return "greedy"
    return f"beam {k}, length_penalty {generation.get('length_penalty', 1.0):g}"


def format_runtimes(res: dict) -> str:
    """The per-runtime figures as an aligned table, for the terminal."""
    first, second = ("bleu", "chrf") if res.get("task") == "seq2seq" else ("accuracy", "f1")
    head = ("runtime", "file", first, second, "agreement", "b1 ms", "b32 ms", "size MB")
    cells = [head]
    for name, r in res["runtimes"].items():
        cells.append((name, r["file"], f"{r[first]:.4f}", f"{r[second]:.4f}",
                      f"{r['agreement']:.4f}",
                      *(f"{r[k]:.2f}" if r[k] is not None else "n/a"
                        for k in ("latency_b1_ms", "latency_b32_ms")),
                      f"{r['size_mb']:.2f}"))
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(row, widths))) for row in cells]
    at = (f"sequence length {res['max_length']}" if res.get("max_length") else
          f"{decoding(res['generation'])}, at most {res['generation']['max_new_tokens']} new "
          "tokens")
    lines.append(f"({res['examples']} examples, {res['threads']} threads, {at}; serve: "
                 f"{res['serve']})")
    return "\n".join(lines)
