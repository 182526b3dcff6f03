"""Token-level teacher outputs on disk: per target token, the teacher's top-k distribution.

Token-level KD on a seq2seq task reads the teacher's distribution over the whole vocabulary
at every target token; stored in full that is ``V`` floats a token (a 32k vocabulary in fp32:
128 KB), too much to keep. What this cache keeps instead, per target token, is the teacher's
distribution at the run's temperature ``T`` cut to its ``k`` most likely tokens plus one tail
bucket (:func:`distilkit.losses.topk_soft_targets`):

* ``log_probs`` ``(L, k)`` float16: ``log softmax(z / T)`` of the ``k`` tokens, largest first;
* ``ids`` ``(L, k)`` int32: those tokens;
* ``tail`` ``(L,)`` float32: the probability of every other token together (kept at full
  precision: it is one number a token, and small tails are where fp16 would lose it),

that is ``6k + 4`` bytes a token (k = 64: 388 bytes), against which the KD loss is the
``(k+1)``-way KL of :func:`distilkit.losses.topk_soft_target_kl`.

The temperature is fixed at caching time and is part of the key: the tail mass (and every
value) depends on it and cannot be recovered at another temperature from the top-k alone, so
a run at another ``temperature`` misses and computes its own entries. The target tokens are
the ones the student trains on (the teacher's own generations under ``sequence_kd``, else the
references): the teacher is run teacher-forced on exactly the ``labels`` of the dataset given.

What a cached value is keyed by (as :mod:`distilkit.teacher_cache`)
    * a *namespace* per teacher weights + config (:func:`~distilkit.teacher_cache.
      teacher_fingerprint`: the bytes of a saved directory, or a model's tensors), the dtype it
      computes in, tokenizer, ``max_length``, ``top_k``, ``temperature`` and this format;
    * inside it, a key per *example*: a hash of its source ids, attention mask and target ids,
      so an edited example misses and unchanged ones hit, whatever their order.

Storage and integrity are the :class:`~distilkit.shard_store.ShardStore`'s (ragged arrays, one
row per example whose first dimension is its target length; each shard checksummed, written
atomically; a damaged shard is discarded with a warning and its examples recomputed). The
store lives under ``$DISTILKIT_CACHE/seq2seq/topk``. When every example hits, a teacher given
as a directory is never loaded.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

from distilkit.loss_terms import TOPK_COLUMNS
from distilkit.shard_store import SHARD_FILE, ShardStore, distinct_missing  # noqa: F401

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
ARRAYS = ("log_probs", "ids", "tail")
DTYPES = {"log_probs": np.float16, "ids": np.int32, "tail": np.float32}
_KEY_COLUMNS = ("input_ids", "attention_mask", "labels")


def bytes_per_token(k: int) -> int:
    """Bytes the cache stores per target token at ``top_k = k`` (fp16 log-probs, int32 ids,
    one fp32 tail mass), before the per-example keys and offsets."""
    return sum(np.dtype(DTYPES[a]).itemsize * (1 if a == "tail" else k) for a in ARRAYS)


def check_top_k(value: Any, field: str = "teacher_cache.top_k") -> int:
    """``value`` as a top-k size, or one ValueError naming the field and the fix."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{field}: {value!r} must be a whole number >= 1 (the teacher's most "
                         "likely tokens kept per target token), e.g. 64")
    return value


class TopKCache(ShardStore):
    """Cached top-k teacher distributions (layout and guarantees: module docstring)."""

    def __init__(self, root: Optional[str] = None):
        from distilkit.data import cache_root

        super().__init__(root or os.path.join(cache_root(), "seq2seq", "topk"), FORMAT_VERSION,
                         "top-k teacher cache")


def example_keys(ds) -> list[bytes]:
    """One 16-byte key per example: a hash of its source ids, attention mask and labels."""
    from distilkit.teacher_cache import _token_arrays

    cols = [c for c in _KEY_COLUMNS if c in ds.column_names]
    if "input_ids" not in cols or "labels" not in cols:
        raise ValueError(f"the top-k teacher cache needs a tokenized seq2seq dataset (columns "
                         f"'input_ids' and 'labels'); its columns are {ds.column_names}")
    arrays = _token_arrays(ds, cols)
    keys = []
    for i in range(len(ds)):
        h = hashlib.blake2b(digest_size=16)
        for c in cols:
            vals, off = arrays[c]
            h.update(c.encode())
            h.update(vals[off[i]:off[i + 1]].tobytes())
        keys.append(h.digest())
    return keys


def compute_topk(teacher, ds, k: int, temperature: float, batch_size: int = 64,
                 progress: bool = False) -> list[dict[str, np.ndarray]]:
    """Run ``teacher`` teacher-forced on ``ds``'s ``labels`` and return, per example, its
    top-k distribution at every target token (``{"log_probs", "ids", "tail"}``, first
    dimension = the example's target length), in the storage dtypes. Examples are batched by
    length; padding is masked, so the values do not depend on batching."""
    import torch

    from distilkit.device import model_device, to_device, to_host
    from distilkit.losses import topk_soft_targets
    from distilkit.teacher_cache import _token_arrays

    cols = [c for c in _KEY_COLUMNS if c in ds.column_names]
    arrays = _token_arrays(ds, cols)
    src_len = np.diff(arrays["input_ids"][1])
    tgt_len = np.diff(arrays["labels"][1])
    order = np.argsort(-(src_len + tgt_len), kind="stable")
    pad_id = getattr(teacher.config, "pad_token_id", None) or 0
    device = model_device(teacher)
    out: list = [None] * len(ds)
    batches = range(0, len(order), batch_size)
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc="teacher top-k", unit="batch")
    teacher.eval()
    with torch.inference_mode():
        for start in batches:
            rows = order[start:start + batch_size]
            batch = {}
            for name, fill in (("input_ids", pad_id), ("attention_mask", 0), ("labels", -100)):
                if name not in arrays:
                    continue
                vals, off = arrays[name]
                width = max(int(np.diff(off)[rows].max()), 1)
                t = np.full((len(rows), width), fill, dtype=np.int64)
                for j, r in enumerate(rows):
                    t[j, :off[r + 1] - off[r]] = vals[off[r]:off[r + 1]]
                batch[name] = torch.from_numpy(t)
            if "attention_mask" not in batch:
                batch["attention_mask"] = (batch["input_ids"] != pad_id).long()
            labels = batch.pop("labels")
            # The decoder inputs the trainer gives the teacher live (labels shifted right).
            batch["decoder_input_ids"] = teacher.prepare_decoder_input_ids_from_labels(labels=labels)
            logits = teacher(**to_device(batch, device)).logits
            lp, ids, tail = topk_soft_targets(logits, k, temperature)
            lp, ids, tail = (to_host(x).numpy() for x in (lp.half(), ids.int(), tail))
            for j, r in enumerate(rows):
                n = int(tgt_len[r])
                out[r] = {"log_probs": lp[j, :n], "ids": ids[j, :n], "tail": tail[j, :n]}
    return out


def attach_topk(dataset, teacher, *, top_k: int, temperature: float,
                tokenizer_name_or_path: Any = None, max_length: Optional[int] = None,
                cache_dir: Optional[str] = None, batch_size: int = 64, progress: bool = True,
                teacher_loader: Optional[Callable[[str], Any]] = None,
                teacher_dtype: Optional[str] = None, stats: Optional[dict] = None):
    """Return the tokenized seq2seq ``dataset`` with the teacher's top-k distribution of
    every target token as the columns the :class:`~distilkit.DistilTrainer` reads instead of
    running the teacher (:data:`distilkit.loss_terms.TOPK_COLUMNS`), from the cache where
    possible and computed (then cached) for the examples that miss.

    Args:
        dataset: a ``datasets.Dataset`` with ``input_ids``, ``attention_mask`` and ``labels``
            (the targets the student trains on).
        teacher: a saved teacher directory (loaded with ``teacher_loader`` only on a miss) or
            an encoder-decoder model.
        top_k: tokens kept per target token.
        temperature: the temperature of the run's KD term; fixed here, part of the key.
        tokenizer_name_or_path, max_length: part of the namespace key.
        cache_dir: the store's root (default ``$DISTILKIT_CACHE/seq2seq/topk``).
        teacher_dtype: the dtype the teacher computes in ('float32', 'bfloat16', 'float16'),
            part of the key; ``None``: float32 for a directory, a model's own dtype.
        stats: filled with ``examples``, ``tokens``, ``hits``, ``computed``,
            ``teacher_loaded``, ``namespace``, ``top_k``, ``temperature``,
            ``bytes_per_token`` (stored bytes per target token), ``namespace_bytes`` (the
            namespace on disk) and ``seconds``.
    """
    from distilkit.config import teacher_torch_dtype
    from distilkit.teacher_cache import model_dtype_name, teacher_fingerprint, tokenizer_fingerprint

    t0 = time.perf_counter()
    check_top_k(top_k, "top_k")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature <= 0:
        raise ValueError(f"temperature: {temperature!r} must be a number > 0")
    if len(dataset) == 0:
        raise ValueError("the dataset is empty: there are no target tokens to cache")
    cache = TopKCache(cache_dir)
    cache.check_writable("cache_dir", "set cache_dir to a writable directory or remove "
                                      "teacher_cache: {top_k: ...}")
    path = os.fspath(teacher) if isinstance(teacher, (str, os.PathLike)) else None
    vocab = None
    if path is not None:
        from transformers import AutoConfig
        vocab = AutoConfig.from_pretrained(path).vocab_size
    else:
        vocab = teacher.config.vocab_size
    if top_k > vocab:
        raise ValueError(f"teacher_cache.top_k: {top_k} is more than the teacher's vocabulary "
                         f"({vocab} tokens); use top_k <= {vocab}")
    teacher_torch_dtype(teacher_dtype)
    compute_dtype = teacher_dtype or ("float32" if path is not None else model_dtype_name(teacher))
    fingerprint = {"teacher": teacher_fingerprint(path if path else teacher),
                   "tokenizer": tokenizer_fingerprint(tokenizer_name_or_path),
                   "max_length": max_length, "top_k": int(top_k),
                   "temperature": float(temperature), "compute_dtype": compute_dtype}
    keys = example_keys(dataset)
    found_arrays, found = cache.lookup(fingerprint, keys, ARRAYS)
    rows: list = [None] * len(keys)
    for i in np.flatnonzero(found):
        rows[i] = {a: found_arrays[a][i] for a in ARRAYS}
    missing = np.flatnonzero(~found)
    loaded = False
    if len(missing):
        uniq = distinct_missing(keys, found)
        model, owned = teacher, False
        if path is not None:
            if teacher_loader is None:
                from distilkit.seq2seq.teacher import load_seq2seq_teacher
                model, owned = load_seq2seq_teacher(path)[0], True
            else:
                model = teacher_loader(path)
            loaded = True
        if model_dtype_name(model) != compute_dtype:
            # A model we did not load (the caller's, or a loader's shared one) is cast as a copy.
            import copy
            model = (model if owned else copy.deepcopy(model)).to(teacher_torch_dtype(compute_dtype))
        computed = compute_topk(model, dataset.select(uniq), top_k, temperature, batch_size,
                                progress)
        cache.store(fingerprint, [keys[i] for i in uniq],
                    {a: [c[a] for c in computed] for a in ARRAYS})
        pos = {keys[i]: j for j, i in enumerate(uniq)}
        for i in missing:
            rows[i] = computed[pos[keys[i]]]
    result = _set_columns(dataset, rows, top_k)
    tokens = int(sum(len(r["tail"]) for r in rows))
    info = {"examples": len(keys), "tokens": tokens, "hits": int(found.sum()),
            "computed": int(len(missing)), "teacher_loaded": loaded,
            "namespace": cache.namespace_dir(fingerprint), "top_k": int(top_k),
            "temperature": float(temperature), "bytes_per_token": bytes_per_token(top_k),
            "namespace_bytes": _dir_bytes(cache.namespace_dir(fingerprint)),
            "seconds": round(time.perf_counter() - t0, 3)}
    if stats is not None:
        stats.update(info)
    msg = (f"[distilkit] top-k teacher cache (k={top_k}, T={temperature:g}): {info['hits']}/"
           f"{info['examples']} examples cached, {info['computed']} computed, "
           f"{info['bytes_per_token']} bytes per target token, {info['seconds']:.1f}s "
           f"({info['namespace']})")
    logger.info(msg)
    if progress:
        print(msg)
    return result


def _dir_bytes(d: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)


def _set_columns(ds, rows: Sequence[dict], k: int):
    """The three top-k columns, built in Arrow (no Python lists): per example a list of
    ``k``-wide rows (``log_probs`` float16, ``ids`` int32) and a list of ``tail`` floats.
    They are read back as numpy arrays (the dataset's format for them), so the collator pads
    arrays, not nested Python lists."""
    import pyarrow as pa
    from datasets import List, Value

    lengths = np.array([len(r["tail"]) for r in rows], dtype=np.int64)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    for a in ARRAYS:
        col = TOPK_COLUMNS[a]
        if col in ds.column_names:
            ds = ds.remove_columns(col)
        flat = np.concatenate([np.asarray(r[a], dtype=DTYPES[a]).reshape(-1) for r in rows])
        values = pa.array(flat)
        feature: Any = Value({"log_probs": "float16", "ids": "int32", "tail": "float32"}[a])
        if a != "tail":
            values = pa.FixedSizeListArray.from_arrays(values, k)
            feature = List(feature, length=k)
        ds = ds.add_column(col, pa.ListArray.from_arrays(offsets, values), feature=List(feature))
    fmt = ds.format
    cols = [TOPK_COLUMNS[a] for a in ARRAYS]
    if fmt["type"] is None:
        ds = ds.with_format("numpy", columns=cols, output_all_columns=True)
    return ds
