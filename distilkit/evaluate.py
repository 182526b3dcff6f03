"""Evaluation of a (distilled, compressed) classifier: what it scores and what it costs.

:func:`evaluate_model` returns one flat dict of figures, the same for the teacher and every
student, so that :mod:`distilkit.report` and :mod:`distilkit.card` can compare them:

* ``accuracy``, ``macro_f1``, ``examples``: task metrics on the given split (offline, no
  ``evaluate.load``).
* ``parameters``: weights the model computes with (tied tensors once; a packed low-bit weight
  counts as its logical shape), ``nonzero_parameters`` and ``sparsity``.
* ``size_on_disk_bytes``: the bytes of the real saved model files (weights, ``config.json``,
  ``compression_config.json``, ``generation_config.json``; the tokenizer is not counted, and
  ``size_files`` lists what was), and ``bits_per_weight`` = 8 x that / ``parameters``. Without
  ``model_dir`` the model is saved with :func:`~distilkit.compress.base.save_compressed` to a
  temporary directory and that is measured.
* ``latency_ms_batch1`` / ``latency_ms_batch32``: CPU wall time of one forward pass at sequence
  length ``max_length`` (real token ids repeated to that length, no padding), the median of
  several runs after warm-up, with the torch thread count in ``threads``.
* ``peak_memory_mb``: what inference at batch 32 needs: the model's tensors in memory
  (``model_memory_mb``) plus the peak growth of the process's resident memory during one
  forward pass (``activation_peak_mb``). On Linux the peak is read from ``VmHWM`` after
  resetting it (``/proc/self/clear_refs``) and returning freed heap pages (``malloc_trim``),
  which makes it the real high-water mark of that forward pass; elsewhere ``ru_maxrss`` is
  used, which can only grow and so may under-count. ``memory_method`` says which.
"""
from __future__ import annotations

import contextlib
import ctypes
import inspect
import json
import os
import statistics
import tempfile
import time
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

import distilkit.kernels  # noqa: F401 - registers the Triton forward of packed students on CUDA
from distilkit.device import model_device, synchronize, to_device, to_host
from distilkit.metrics import accuracy_f1

if TYPE_CHECKING:  # torch is imported where used, so `distilkit --help` stays fast
    import torch
    from torch import nn

MODEL_CONFIG_FILES = ("config.json", "compression_config.json", "generation_config.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
# Written by DistilTrainer in checkpoints: training state, not part of the model.
NOT_MODEL_FILES = ("distil_projections.safetensors", "optimizer.pt", "scheduler.pt",
                   "training_args.bin", "rng_state.pth")
PAIR_KEYS = ("input_ids", "token_type_ids", "attention_mask", "input_ids_b", "attention_mask_b")


# ---------------------------------------------------------------------------------------
# Sizes and counts
# ---------------------------------------------------------------------------------------

def model_files(model_dir: str) -> dict[str, int]:
    """``file -> bytes`` of the files that make up a saved model in ``model_dir``. Raises
    ``FileNotFoundError`` naming what is missing when there is no saved model there."""
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"{model_dir!r} is not a directory; give the directory a model "
                                "was saved to (save_pretrained / distilkit distill's student/)")
    names = sorted(os.listdir(model_dir))
    weights = [n for n in names if n.endswith(WEIGHT_SUFFIXES) and n not in NOT_MODEL_FILES]
    missing = []
    if "config.json" not in names:
        missing.append("config.json")
    if not weights:
        missing.append("model weights (model.safetensors, model-*.safetensors or "
                       "pytorch_model.bin)")
    if missing:
        hint = ""
        if os.path.isfile(os.path.join(model_dir, "student", "config.json")):
            hint = f"; it holds a run: the model is in {os.path.join(model_dir, 'student')!r}"
        raise FileNotFoundError(f"{model_dir!r} holds no saved model: missing "
                                f"{' and '.join(missing)} (files there: {names or 'none'}){hint}")
    keep = weights + [n for n in names if n in MODEL_CONFIG_FILES or n.endswith(".index.json")]
    return {n: os.path.getsize(os.path.join(model_dir, n)) for n in sorted(keep)}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(parameters, non-zero parameters)``; tied parameters are counted once. A module that
    stores its weights compactly (e.g. the magnitude method's ``SparseLinear``: only the
    nonzero values) reports its logical counts through a ``parameter_counts()`` method, so a
    pruned layer counts as its dense shape with its zeros, not as its stored values."""
    import torch
    total = nonzero = 0
    sharded, sharded_nonzero = False, torch.zeros((), dtype=torch.long)
    own: set = set()
    for m in model.modules():
        if callable(getattr(m, "parameter_counts", None)):
            t, n = m.parameter_counts()
            total, nonzero = total + t, nonzero + n
            own.update(id(p) for p in m.parameters())
    for p in model.parameters():  # deduplicated by identity
        if id(p) not in own:
            local, full = _local_shard(p)
            total += full
            if local is p:
                nonzero += int(torch.count_nonzero(p.detach()))
            else:
                sharded = True
                sharded_nonzero += torch.count_nonzero(local.detach()).cpu()
    if sharded:
        # Each process counts its own shard; the sum over the processes is the model's (a
        # collective: a sharded teacher is evaluated by every process together).
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dev = "cuda" if dist.get_backend() == "nccl" else "cpu"
            t = sharded_nonzero.to(dev)
            dist.all_reduce(t)
            sharded_nonzero = t.cpu()
        nonzero += int(sharded_nonzero)
    return total, nonzero


def _local_shard(t) -> tuple:
    """``(what this process holds of t, t's whole element count)``: the local shard of an
    FSDP2 parameter (a DTensor) or of a DeepSpeed ZeRO-3 partitioned one (``ds_tensor``,
    while the parameter itself is an empty placeholder), else ``(t, t.numel())``."""
    if hasattr(t, "ds_tensor") and hasattr(t, "ds_numel"):
        return t.ds_tensor, int(t.ds_numel)
    if hasattr(t, "to_local") and hasattr(t, "placements"):
        return t.to_local(), t.numel()
    return t, t.numel()



def saved_parameters(model_dir: str) -> int:
    """Parameters of a saved model, read from its safetensors headers (no weights loaded);
    tensors saved once (tied weights) count once, as they do in :func:`count_parameters`."""
    from safetensors import safe_open

    total = 0
    for name in model_files(model_dir):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(model_dir, name), framework="pt") as f:
                for key in f.keys():
                    total += int(np.prod(f.get_slice(key).get_shape()))
    return total


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers in this process's memory, shared storage
    once (of a sharded model: this process's shards)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        t = _local_shard(t)[0]
        key = (t.untyped_storage().data_ptr(), t.device.type)
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


# ---------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------

def _encode(ds, tokenizer, text_column, text_pair_column, label_column, max_length):
    """``(features list, labels array)`` from a raw (text) or tokenized dataset."""
    cols = ds.column_names
    if "input_ids" in cols:
        label_col = "labels" if "labels" in cols else label_column
        if label_col not in cols:
            raise ValueError(f"label_column: the tokenized dataset has no 'labels' or "
                             f"{label_column!r} column; its columns are {cols}")
        feats = {k: list(ds[k]) for k in PAIR_KEYS if k in cols}
        labels = list(ds[label_col])
    else:
        for name, col in (("text_column", text_column), ("text_pair_column", text_pair_column),
                          ("label_column", label_column)):
            if col is not None and col not in cols:
                raise ValueError(f"{name}: column {col!r} is not in the evaluation data; its "
                                 f"columns are {cols}")
        if label_column is None:
            raise ValueError("label_column: evaluation needs labels; name the label column")
        args = (list(ds[text_column]),) + ((list(ds[text_pair_column]),) if text_pair_column else ())
        enc = tokenizer(*args, truncation=True, max_length=max_length)
        feats = {k: enc[k] for k in PAIR_KEYS if k in enc}
        labels = list(ds[label_column])
    n = len(labels)
    rows = [{k: v[i] for k, v in feats.items()} for i in range(n)]
    return rows, np.asarray(labels)


def _accepted(model: nn.Module, batch: dict) -> dict:
    params = inspect.signature(model.forward).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return batch
    return {k: v for k, v in batch.items() if k in params}


def _pad(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    import torch
    out = {}
    for k in rows[0]:
        fill = pad_id if k.startswith("input_ids") else 0
        width = max(1, max(len(r[k]) for r in rows))
        t = torch.full((len(rows), width), fill, dtype=torch.long)
        for i, r in enumerate(rows):
            t[i, :len(r[k])] = torch.as_tensor(r[k], dtype=torch.long)
        out[k] = t
    return out


def _logits(model, batch):
    # Fed on the model's own device (a no-op for tensors already there, e.g. timed batches).
    out = model(**to_device(_accepted(model, batch), model_device(model)))
    return out["logits"] if isinstance(out, dict) else out.logits


def predict(model: nn.Module, rows: list[dict], pad_id: int = 0, batch_size: int = 64) -> np.ndarray:
    """Argmax predictions, batched by length (padding is masked, so order does not matter)."""
    import torch
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    preds = np.zeros(len(rows), dtype=np.int64)
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            # One device-to-host copy per batch, of the argmax only.
            preds[idx] = to_host(_logits(model, _pad([rows[i] for i in idx], pad_id)).argmax(-1)).numpy()
    return preds


def fixed_length_batch(rows: list[dict], batch: int, length: int) -> dict[str, torch.Tensor]:
    """``batch`` real examples (cycled), each token field repeated to exactly ``length``."""
    import torch
    out = {}
    for k in rows[0]:
        out[k] = torch.as_tensor(np.stack([
            np.resize(np.asarray(rows[i % len(rows)][k] or [0], dtype=np.int64), length)
            for i in range(batch)]))
    if "attention_mask" in out:
        out["attention_mask"] = torch.ones_like(out["attention_mask"])
    return out


# ---------------------------------------------------------------------------------------
# Timing and memory
# ---------------------------------------------------------------------------------------

def latency_ms(model: nn.Module, batch: dict, warmup: int = 2, runs: int = 10) -> float:
    """Median wall time in ms of ``model(**batch)`` after ``warmup`` untimed runs, the batch
    already on the model's device (synchronised on CUDA, so the work itself is timed)."""
    import torch
    dev = model_device(model)
    batch = to_device(batch, dev)
    times = []
    with torch.inference_mode():
        for i in range(warmup + runs):
            synchronize(dev)
            t0 = time.perf_counter()
            _logits(model, batch)
            synchronize(dev)
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1000)
    return float(statistics.median(times))


def interleaved_latency_ms(fns: dict, runs: int = 7, warmup: int = 2, block: int = 1) -> dict:
    """Median wall time in ms of each callable of ``fns``, the callables taking turns, so that
    machine noise hits all alike: the way to compare models side by side.

    The order is shuffled from turn to turn (seeded: the same every call). A callable pays for
    what ran just before it: PyTorch's OpenMP threads keep spinning for a while after a
    forward, so in a fixed order the callable after a PyTorch model was always timed on
    busy cores (measured: 8% slower than the same ONNX file timed elsewhere in the order).

    ``block``: a turn runs its callable ``block`` times in a row; with ``block > 1`` a turn's
    first run is not timed, so every timed run is of a model in the state serving leaves it
    in, its weights in the caches from its previous run. Run by run (``block=1``) a small
    model pays for the large one before it: after the teacher's 90 MB the int8 quickstart
    student's 11 MB are out of the caches, and it timed 31.7 ms where it serves in 25.8
    (batch 32, 2026-12-03). ``runs`` is the number of turns timed (``runs * (block - 1)``
    timed runs with blocks) after ``warmup`` untimed turns."""
    import random

    import torch
    if not (isinstance(block, int) and block >= 1):
        raise ValueError(f"block={block!r}: use an integer >= 1")
    times: dict = {k: [] for k in fns}
    keys, order = list(fns), random.Random(0)
    with torch.inference_mode():
        for i in range(warmup + runs):
            order.shuffle(keys)
            for k in keys:
                fn = fns[k]
                for j in range(block):
                    t0 = time.perf_counter()
                    fn()
                    if torch.cuda.is_initialized():  # a callable on a GPU: time its work
                        torch.cuda.synchronize()
                    if i >= warmup and (block == 1 or j > 0):
                        times[k].append((time.perf_counter() - t0) * 1000)
    return {k: float(statistics.median(v)) for k, v in times.items()}


def _status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Return freed heap to the OS and reset VmHWM to the current RSS; False if unsupported."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kb("VmHWM:") is not None
    except OSError:
        return False


def inference_peak_bytes(model: nn.Module, batch: dict) -> tuple[int, str]:
    """Peak growth of memory during one forward pass, and how it was measured: on CUDA the
    allocator's own peak counter, on the CPU the process's resident memory."""
    import torch
    import gc

    gc.collect()
    dev = model_device(model)
    batch = to_device(batch, dev)
    with torch.inference_mode():
        if dev.type == "cuda":
            synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
            _logits(model, batch)
            synchronize(dev)
            return (max(0, torch.cuda.max_memory_allocated(dev) - base),
                    "cuda allocator max_memory_allocated")
        if _reset_peak():
            base = _status_kb("VmRSS:")
            _logits(model, batch)
            peak = _status_kb("VmHWM:")
            return max(0, (peak - base) * 1024), "linux VmHWM reset via /proc/self/clear_refs"
        import resource

        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        _logits(model, batch)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        scale = 1 if os.uname().sysname == "Darwin" else 1024
        return max(0, (after - before) * scale), "ru_maxrss delta (a lower bound)"


# ---------------------------------------------------------------------------------------
# The evaluation
# ---------------------------------------------------------------------------------------

def evaluate_model(model: nn.Module, tokenizer: Any, eval_dataset, *, text_column: str = "text",
                   text_pair_column: Optional[str] = None, label_column: Optional[str] = "label",
                   max_length: int = 128, model_dir: Optional[str] = None, batch_size: int = 64,
                   latency: bool = True, latency_runs: tuple[int, int] = (20, 5),
                   warmup: int = 2) -> dict:
    """Task metrics, size and CPU cost of ``model`` (figures: module docstring).

    Args:
        model: a sequence-classification model (a transformers model or a distilkit student).
        tokenizer: the model's tokenizer (used when ``eval_dataset`` holds raw text).
        eval_dataset: a ``datasets.Dataset`` with the text and label columns, or already
            tokenized (``input_ids`` and ``labels``).
        max_length: truncation length, and the sequence length latency is measured at.
        model_dir: the directory the model was saved to; its files are what is measured.
        latency_runs: timed runs at batch 1 and at batch 32 (after ``warmup`` runs each).
        latency: set False to skip timing and memory (their keys are then ``None``).
    """
    import torch
    if len(eval_dataset) == 0:
        raise ValueError("the evaluation split is empty")
    model.eval()
    rows, labels = _encode(eval_dataset, tokenizer, text_column, text_pair_column, label_column,
                           max_length)
    pad_id = getattr(tokenizer, "pad_token_id", None) or 0
    preds = predict(model, rows, pad_id, batch_size)
    res: dict[str, Any] = {**accuracy_f1(preds, labels), "examples": int(len(labels))}
    params, nonzero = count_parameters(model)
    res.update(parameters=params, nonzero_parameters=nonzero,
               sparsity=round(1 - nonzero / params, 6) if params else 0.0)
    if model_dir is None:
        from distilkit.compress.base import save_compressed

        with tempfile.TemporaryDirectory(prefix="distilkit-size-") as tmp:
            save_compressed(model, tmp)
            files = model_files(tmp)
        res["size_source"] = "saved to a temporary directory with save_compressed"
    else:
        files = model_files(model_dir)
        res["size_source"] = os.path.abspath(model_dir)
    res["size_on_disk_bytes"] = sum(files.values())
    res["size_files"] = files
    res["bits_per_weight"] = round(8 * res["size_on_disk_bytes"] / params, 4) if params else None
    res["max_length"] = max_length
    res["threads"] = torch.get_num_threads()
    if latency:
        b1, b32 = fixed_length_batch(rows, 1, max_length), fixed_length_batch(rows, 32, max_length)
        res["latency_ms_batch1"] = round(latency_ms(model, b1, warmup, latency_runs[0]), 3)
        res["latency_ms_batch32"] = round(latency_ms(model, b32, warmup, latency_runs[1]), 3)
        act, method = inference_peak_bytes(model, b32)
        mem = tensor_bytes(model)
        res.update(model_memory_mb=round(mem / 2**20, 3), activation_peak_mb=round(act / 2**20, 3),
                   peak_memory_mb=round((mem + act) / 2**20, 3), memory_method=method)
    else:
        res.update(latency_ms_batch1=None, latency_ms_batch32=None, peak_memory_mb=None)
    return res


def side_by_side_latency(models: dict, eval_dataset, *, text_column: str = "text",
                         text_pair_column: Optional[str] = None,
                         label_column: Optional[str] = "label", max_length: int = 128,
                         runs: tuple[int, int] = (20, 5), warmup: int = 2) -> dict:
    """``{name: {"latency_ms_batch1", "latency_ms_batch32"}}`` of ``models`` (``name ->
    (model, tokenizer)``), each on the same sentences through its own tokenizer, timed in
    turns (:func:`interleaved_latency_ms`, two runs a turn, the second timed): the figures a
    speed-up is read from. Timed minutes apart, or read from the teacher's cached figures,
    the teacher's milliseconds came from another machine load than the student's (a 3-layer
    student of the built-in teacher read 9.5x faster, beside it 2x, 2026-12-07)."""
    batches = {}
    for name, (model, tokenizer) in models.items():
        model.eval()
        rows, _ = _encode(eval_dataset, tokenizer, text_column, text_pair_column, label_column,
                          max_length)
        batches[name] = {b: fixed_length_batch(rows, b, max_length) for b in (1, 32)}
    out: dict = {name: {} for name in models}
    for b, n in zip((1, 32), runs):
        fns = {name: (lambda m=m, x=batches[name][b]: _logits(m, x))
               for name, (m, _) in models.items()}
        for name, ms in interleaved_latency_ms(fns, runs=n, warmup=warmup, block=2).items():
            out[name][f"latency_ms_batch{b}"] = round(ms, 3)
    return out


def find_model_dir(path: str) -> str:
    """``path`` itself when it holds a model, or its ``student/`` when it is a run directory."""
    if not os.path.isfile(os.path.join(path, "config.json")) and \
            os.path.isfile(os.path.join(path, "student", "config.json")):
        return os.path.join(path, "student")
    model_files(path)  # raises, naming what is missing
    return path

