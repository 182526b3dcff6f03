"""Teacher outputs on disk (offline distillation): computed once, reused by every later run.

Distilling the same teacher into many students repeats the same teacher forward passes; on a
CPU those dominate a run (MiniLM-L6 over 8.5k sentences: ~2 minutes, more than a small
student's whole training). :func:`attach_teacher_outputs` adds the teacher's outputs to a
tokenized dataset as columns the :class:`~distilkit.DistilTrainer` reads instead of running
the teacher (``teacher_logits``: ``C`` floats per example; ``teacher_cls_hidden``: the [CLS]
vector of every ``hidden_states`` entry, ``(L+1, H)``, index 0 = embeddings, for Patient-KD).

What a cached value is keyed by
    * a *namespace* (one directory) per teacher weights + config, the dtype the teacher
      computes in (``compute_dtype``: a bf16 teacher's logits never serve an fp32 run),
      tokenizer, ``max_length``, which outputs, and the storage format. Teacher weights are hashed from the bytes of the
      saved weight files (or the tensors of an in-memory model), never from a path or a
      modification time, so retraining a teacher in place changes the key;
    * inside it, a key per *example*: a hash of the token ids the teacher reads (input ids,
      token types, attention mask). The dataset part of the fingerprint is therefore its
      contents, independent of file paths and row order: an edited example misses and is
      recomputed, unchanged ones hit, and augmented or unlabelled transfer examples share the
      same store (only the new ones are computed).

When every example hits, the teacher is never constructed: it is given as a path plus a loader
that is called only on a miss.

Storage and integrity
    The cache is a :class:`~distilkit.shard_store.ShardStore` of float32 arrays: each write
    adds one *shard* directory (outputs always stored as float32, whatever the compute dtype,
    which the namespace's info file records) holding ``outputs.safetensors`` (example keys and output arrays)
    and ``manifest.json`` (rows, arrays, each file's size and SHA-256), assembled in a
    ``.tmp-*`` directory and renamed into place, so no cache ever looks valid without being
    complete. A shard that fails its size or checksum (truncated, corrupted) is deleted with a
    warning and its examples are recomputed.

Logits computed elsewhere (another framework, an API, an earlier experiment) are attached with
:func:`attach_logits`, which checks them and adds the same columns.

This is the offline setting of Hinton et al. (2015) and of Tang et al. (2019), whose augmented
transfer set is labelled by the teacher once.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import time
from collections import OrderedDict
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import numpy as np

from distilkit.compress.base import compression_records
from distilkit.config import teacher_torch_dtype
from distilkit.files import sha256_file
from distilkit.shard_store import KEYS, MANIFEST, SHARD_FILE, ShardStore, distinct_missing  # noqa: F401

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
OUTPUT_KINDS = ("logits", "cls_hidden")
COLUMN = {"logits": "teacher_logits", "cls_hidden": "teacher_cls_hidden"}
ENSEMBLE_COLUMN = "teacher_ensemble_logits"
_KEY_BYTES = 16
# Config entries that name where/how a model was loaded, not what it computes.
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "_attn_implementation",
                         "_attn_implementation_autoset", "attn_implementation", "torch_dtype",
                         "dtype", "architectures", "_commit_hash", "use_cache")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_TOKENIZER_PREFIXES = ("tokenizer", "vocab", "merges", "spiece", "sentencepiece",
                       "special_tokens_map", "added_tokens")


# ---------------------------------------------------------------------------------------
# Fingerprints
# ---------------------------------------------------------------------------------------

def _clean_config(cfg: dict) -> dict:
    return {k: v for k, v in sorted(cfg.items()) if k not in _VOLATILE_CONFIG_KEYS}


def teacher_fingerprint(teacher: Any) -> str:
    """Hash of what the teacher computes: for a saved directory, the bytes of every weight
    file plus its config (and ``compression_config.json``); for a model object, its class,
    config and every tensor of its state dict."""
    h = hashlib.sha256()
    if isinstance(teacher, (str, os.PathLike)):
        path = os.fspath(teacher)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"teacher: {path!r} is not a directory; the teacher cache "
                                    "fingerprints a teacher saved with save_pretrained")
        names = sorted(os.listdir(path))
        weights = [n for n in names if n.endswith(_WEIGHT_SUFFIXES) or n.endswith(".index.json")]
        if not any(n.endswith(_WEIGHT_SUFFIXES) for n in weights):
            raise FileNotFoundError(f"teacher: {path!r} holds no weight file (*.safetensors or "
                                    f"*.bin); files: {names}")
        for n in weights:
            h.update(f"file:{n}:".encode())
            h.update(sha256_file(os.path.join(path, n)).encode())
        for n in ("config.json", "compression_config.json"):
            f = os.path.join(path, n)
            if os.path.isfile(f):
                with open(f) as fh:
                    data = json.load(fh)
                if n == "config.json":
                    data = _clean_config(data)
                h.update(f"{n}:{json.dumps(data, sort_keys=True)}".encode())
        return h.hexdigest()
    import torch

    h.update(f"class:{type(teacher).__name__}".encode())
    cfg = getattr(teacher, "config", None)
    if cfg is not None and hasattr(cfg, "to_dict"):
        h.update(json.dumps(_clean_config(cfg.to_dict()), sort_keys=True, default=str).encode())
    records = compression_records(teacher)
    if records:
        h.update(json.dumps(records, sort_keys=True, default=str).encode())
    for name, t in sorted(teacher.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> Optional[str]:
    """Hash of a tokenizer's vocabulary files (a directory), its vocabulary (an object), or the
    name itself (a hub id). ``None`` when no tokenizer is named: the token ids, which are
    hashed per example anyway, then stand for the tokenization."""
    if tokenizer is None:
        return None
    if isinstance(tokenizer, (str, os.PathLike)):
        path = os.fspath(tokenizer)
        if not os.path.isdir(path):
            return f"name:{path}"
        h = hashlib.sha256()
        for n in sorted(os.listdir(path)):
            if n.startswith(_TOKENIZER_PREFIXES):
                h.update(f"{n}:".encode())
                h.update(sha256_file(os.path.join(path, n)).encode())
        return h.hexdigest()
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    blob = json.dumps({"class": type(tokenizer).__name__, "vocab": sorted(vocab.items())})
    return hashlib.sha256(blob.encode()).hexdigest()


def _input_columns(ds) -> list[str]:
    cols = ds.column_names
    prefix = "teacher_" if "teacher_input_ids" in cols else ""
    if f"{prefix}input_ids" not in cols:
        raise ValueError(f"the teacher cache needs a tokenized dataset with an 'input_ids' column "
                         f"(or 'teacher_input_ids'); its columns are {cols}")
    return [f"{prefix}{c}" for c in ("input_ids", "token_type_ids", "attention_mask")
            if f"{prefix}{c}" in cols]


def _token_arrays(ds, cols: Sequence[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``column -> (flat int64 values, offsets)`` read straight from Arrow (fast, and
    independent of how the ids are stored: int32 or int64, any chunking or row selection)."""
    table = ds.select_columns(list(cols)).with_format("arrow")[:]
    out = {}
    for c in cols:
        arr = table.column(c).combine_chunks()
        offsets = arr.offsets.to_numpy().astype(np.int64)
        out[c] = (arr.flatten().to_numpy(zero_copy_only=False).astype(np.int64),
                  offsets - offsets[0])
    return out


def example_keys(ds, cols: Optional[Sequence[str]] = None) -> list[bytes]:
    """One 16-byte key per example: a hash of the token ids the teacher reads."""
    cols = list(cols or _input_columns(ds))
    arrays = _token_arrays(ds, cols)
    keys = []
    for i in range(len(ds)):
        h = hashlib.blake2b(digest_size=_KEY_BYTES)
        for c in cols:
            vals, off = arrays[c]
            # The name is part of the hash, so ids read as token types can never collide.
            h.update(c.removeprefix("teacher_").encode())
            h.update(vals[off[i]:off[i + 1]].tobytes())
        keys.append(h.digest())
    return keys


# ---------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------

def default_cache_dir() -> str:
    from distilkit.data import cache_root

    return os.path.join(cache_root(), "teacher_outputs")


class TeacherCache(ShardStore):
    """A directory of cached teacher outputs: a :class:`~distilkit.shard_store.ShardStore` of
    float32 arrays (layout and guarantees: module docstring).

    Args:
        root: where the cache lives; defaults to ``$DISTILKIT_CACHE/teacher_outputs``
            (``~/.cache/distilkit/teacher_outputs``).
    """

    def __init__(self, root: Optional[str] = None):
        super().__init__(root or default_cache_dir(), FORMAT_VERSION, "teacher cache")

    def check_writable(self) -> None:
        """Fail now, before any teacher or training work, when the cache cannot be written."""
        super().check_writable("cache_dir", "set cache_dir to a writable directory, fix its "
                                            "permissions, or turn the cache off with "
                                            "teacher_cache: false")

    def store(self, fingerprint: dict, keys: Sequence[bytes], arrays: dict[str, np.ndarray]) -> str:
        """Write one shard of float32 outputs atomically; returns its directory."""
        return super().store(fingerprint, keys, {k: np.asarray(v, dtype=np.float32)
                                                 for k, v in arrays.items()})


# ---------------------------------------------------------------------------------------
# Computing and attaching
# ---------------------------------------------------------------------------------------

def _default_loader(path: str):
    from distilkit.teachers import load_teacher

    return load_teacher(path)


def _resolve_path(spec: str) -> str:
    """A local directory for a teacher spec (path, built-in name or hub id)."""
    from distilkit.teachers import resolve_teacher

    path = resolve_teacher(spec)
    if os.path.isdir(path):
        return path
    from huggingface_hub import snapshot_download

    return snapshot_download(path)


def model_dtype_name(model) -> str:
    """The floating dtype of ``model``'s parameters as a name ('float32', 'bfloat16', ...);
    'float32' for a model without floating parameters."""
    for p in model.parameters():
        if p.is_floating_point():
            return str(p.dtype).removeprefix("torch.")
    return "float32"


def compute_teacher_outputs(teacher, ds, cols: Sequence[str], outputs: Sequence[str],
                            batch_size: int = 64, progress: bool = False) -> dict[str, np.ndarray]:
    """Run ``teacher`` over the token columns ``cols`` of ``ds`` and return the requested
    outputs as float32 arrays with one row per example (upcast from whatever dtype the
    teacher computes in). Examples are batched by length, so little time goes to padding;
    padding is masked, so results do not depend on batching. Each batch is fed on the
    teacher's own device and its outputs come back to the host in one copy."""
    import torch

    from distilkit.device import model_device, to_device, to_host

    device = model_device(teacher)
    arrays = _token_arrays(ds, cols)
    base = {c.removeprefix("teacher_"): v for c, v in arrays.items()}
    ids, offs = base["input_ids"]
    lengths = np.diff(offs)
    order = np.argsort(-lengths, kind="stable")
    pad_id = getattr(getattr(teacher, "config", None), "pad_token_id", None) or 0
    teacher.eval()
    res: dict[str, np.ndarray] = {}
    batches = range(0, len(order), batch_size)
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc="teacher outputs", unit="batch")
    with torch.inference_mode():
        for start in batches:
            rows = order[start:start + batch_size]
            width = max(int(lengths[rows].max()), 1)
            batch = {}
            for name, (vals, off) in base.items():
                fill = pad_id if name == "input_ids" else 0
                t = np.full((len(rows), width), fill, dtype=np.int64)
                for j, r in enumerate(rows):
                    t[j, :off[r + 1] - off[r]] = vals[off[r]:off[r + 1]]
                batch[name] = torch.from_numpy(t)
            if "attention_mask" not in batch:
                batch["attention_mask"] = (torch.arange(width)[None, :]
                                           < torch.from_numpy(lengths[rows])[:, None]).long()
            out = teacher(**to_device(batch, device),
                          output_hidden_states="cls_hidden" in outputs)
            logits = out["logits"] if isinstance(out, dict) else out.logits
            if logits.dim() != 2:
                raise ValueError(f"the teacher returned logits of shape {tuple(logits.shape)}; the "
                                 "teacher cache stores sequence-classification outputs (B, C). "
                                 "Distil sequence-to-sequence models with the teacher loaded")
            got = {"logits": logits}
            if "cls_hidden" in outputs:
                hs = out["hidden_states"] if isinstance(out, dict) else out.hidden_states
                if hs is None:
                    raise ValueError(f"{type(teacher).__name__} returns no hidden_states, so its "
                                     "[CLS] states cannot be cached; set alpha_patient: 0")
                got["cls_hidden"] = torch.stack([h[:, 0] for h in hs], dim=1)
            # One device-to-host copy per batch: every output flattened, side by side.
            flat = [got[kind].float().reshape(len(rows), -1) for kind in outputs]
            host = to_host(torch.cat(flat, dim=1)).numpy()
            cuts = np.cumsum([f.shape[1] for f in flat])[:-1]
            for kind, v in zip(outputs, np.split(host, cuts, axis=1)):
                shape = tuple(got[kind].shape[1:])
                if kind not in res:
                    res[kind] = np.zeros((len(order), *shape), dtype=np.float32)
                res[kind][rows] = v.reshape(len(rows), *shape)
    return res


def _namespace_of(teacher, teacher_dtype: Optional[str], tokenizer: Any,
                  max_length: Optional[int], outs: Sequence[str]) -> tuple:
    """``(path, compute_dtype, fingerprint)`` of a teacher's cache namespace: its local
    directory (``None`` for a model object), the dtype it computes in (``teacher_dtype``,
    else float32 for a path, which the default loader gives, else the model's own) and the
    fingerprint keying the namespace (module docstring)."""
    path = _resolve_path(os.fspath(teacher)) if isinstance(teacher, (str, os.PathLike)) else None
    teacher_torch_dtype(teacher_dtype)
    compute_dtype = teacher_dtype or ("float32" if path is not None else model_dtype_name(teacher))
    fingerprint = {"teacher": teacher_fingerprint(path if path else teacher),
                   "tokenizer": tokenizer_fingerprint(tokenizer), "max_length": max_length,
                   "outputs": list(outs), "compute_dtype": compute_dtype}
    return path, compute_dtype, fingerprint


def _computing_model(teacher, path: Optional[str], loader: Optional[Callable], compute_dtype: str):
    """The model that computes the misses: loaded from ``path`` (with ``loader``), else the
    model object given, in ``compute_dtype`` (the key's dtype, so the key never lies)."""
    model = (loader or _default_loader)(path) if path is not None else teacher
    if model_dtype_name(model) != compute_dtype:
        # The caller's model is not ours to change: cast a copy.
        model = (model if path is not None else copy.deepcopy(model)).to(
            teacher_torch_dtype(compute_dtype))
    return model


def _check_outputs(outputs: Union[str, Iterable[str]]) -> tuple[str, ...]:
    outs = (outputs,) if isinstance(outputs, str) else tuple(outputs)
    bad = [o for o in outs if o not in OUTPUT_KINDS]
    if not outs or bad:
        raise ValueError(f"outputs: {outputs!r} must name some of {OUTPUT_KINDS}, e.g. "
                         "('logits',) or ('logits', 'cls_hidden') for Patient-KD")
    return tuple(sorted(set(outs), key=OUTPUT_KINDS.index))


def attach_teacher_outputs(dataset, teacher, *, teacher_dataset=None,
                           tokenizer_name_or_path: Any = None, max_length: Optional[int] = None,
                           outputs: Union[str, Sequence[str]] = ("logits",),
                           cache_dir: Optional[str] = None, batch_size: int = 64,
                           progress: bool = True,
                           teacher_loader: Optional[Callable[[str], Any]] = None,
                           stats: Optional[dict] = None, teacher_dtype: Optional[str] = None):
    """Return ``dataset`` with the teacher's outputs as columns ``teacher_logits`` (and
    ``teacher_cls_hidden``), taken from the cache where possible and computed (then cached)
    for the examples that miss.

    Args:
        dataset: a tokenized ``datasets.Dataset`` (``input_ids``, optionally
            ``attention_mask`` / ``token_type_ids``) or a ``DatasetDict`` (each split).
        teacher: a saved teacher directory (``distilkit.builtin_teacher()`` for the built-in
            one) or a hub id (loaded with ``teacher_loader`` only if some example misses), or
            a model object.
        teacher_dataset: the same examples tokenized for the teacher, row for row, when the
            student reads different tokens (e.g. a word-level BiLSTM student). Default: the
            teacher reads ``dataset`` (its ``teacher_input_ids`` columns when present).
        tokenizer_name_or_path: the teacher's tokenizer (directory, hub id or object), part of
            the namespace key.
        max_length: the truncation length used for tokenization, part of the namespace key.
        outputs: ``("logits",)`` or ``("logits", "cls_hidden")``.
        cache_dir: the cache root (default ``$DISTILKIT_CACHE/teacher_outputs``); it must be
            writable, checked before anything is loaded.
        batch_size: teacher batch size on a miss.
        teacher_loader: ``path -> model``; default :func:`distilkit.teachers.load_teacher`.
        stats: a dict filled with ``examples``, ``hits``, ``computed``, ``teacher_loaded``,
            ``namespace``, ``compute_dtype`` and ``seconds``.
        teacher_dtype: the dtype the teacher computes in on a miss ('float32', 'bfloat16',
            'float16'; a ``DistilConfig``'s ``teacher_dtype``), part of the namespace key.
            ``None``: a model object's own dtype, and float32 for a path (what the default
            loader gives; a loaded teacher is cast to the key's dtype, so the key never lies).
            A model object in another dtype is cast as a copy, never in place.
    """
    from datasets import DatasetDict

    if isinstance(dataset, DatasetDict):
        tds = teacher_dataset or {}
        return DatasetDict({split: attach_teacher_outputs(
            d, teacher, teacher_dataset=tds.get(split) if tds else None,
            tokenizer_name_or_path=tokenizer_name_or_path, max_length=max_length,
            outputs=outputs, cache_dir=cache_dir, batch_size=batch_size, progress=progress,
            teacher_loader=teacher_loader, stats=stats, teacher_dtype=teacher_dtype)
            for split, d in dataset.items()})
    t0 = time.perf_counter()
    outs = _check_outputs(outputs)
    if len(dataset) == 0:
        raise ValueError("the dataset is empty: there are no examples to get teacher outputs for")
    if batch_size < 1:
        raise ValueError(f"batch_size: {batch_size!r} must be >= 1")
    cache = TeacherCache(cache_dir)
    cache.check_writable()
    tds = dataset if teacher_dataset is None else teacher_dataset
    if len(tds) != len(dataset):
        raise ValueError(f"teacher_dataset has {len(tds)} rows but dataset has {len(dataset)}: "
                         "they must hold the same examples, row for row")
    cols = _input_columns(tds)
    path, compute_dtype, fingerprint = _namespace_of(teacher, teacher_dtype,
                                                     tokenizer_name_or_path, max_length, outs)
    keys = example_keys(tds, cols)
    arrays, found = cache.lookup(fingerprint, keys, outs)
    missing = np.flatnonzero(~found)
    loaded = False
    if len(missing):
        uniq = distinct_missing(keys, found)
        model = _computing_model(teacher, path, teacher_loader, compute_dtype)
        loaded = path is not None
        computed = compute_teacher_outputs(model, tds.select(uniq), cols, outs, batch_size,
                                           progress)
        cache.store(fingerprint, [keys[i] for i in uniq], computed)
        pos = {keys[i]: j for j, i in enumerate(uniq)}
        for kind in outs:
            if kind not in arrays:
                arrays[kind] = np.zeros((len(keys), *computed[kind].shape[1:]), np.float32)
            arrays[kind][missing] = computed[kind][[pos[keys[i]] for i in missing]]
    result = dataset
    for kind in outs:
        result = _set_column(result, COLUMN[kind], arrays[kind])
    info = {"examples": len(keys), "hits": int(found.sum()), "computed": int(len(missing)),
            "teacher_loaded": loaded, "namespace": cache.namespace_dir(fingerprint),
            "compute_dtype": compute_dtype,
            "seconds": round(time.perf_counter() - t0, 3)}
    if stats is not None:
        stats.update(info)
    msg = (f"[distilkit] teacher cache: {info['hits']}/{info['examples']} examples cached, "
           f"{info['computed']} computed, {info['seconds']:.1f}s ({info['namespace']})")
    logger.info(msg)
    if progress:
        print(msg)
    return result


def attach_ensemble_logits(dataset, teachers: Sequence[Any], **kwargs):
    """Return ``dataset`` with column ``teacher_ensemble_logits``: per example a ``(K, C)``
    array, row ``k`` the logits of ``teachers[k]``, each teacher cached in its own namespace
    (so a teacher shared between ensembles is computed once). ``kwargs`` are those of
    :func:`attach_teacher_outputs`; the ensemble is averaged at training time, at the
    run's temperature and ``ensemble_weights``, not here."""
    if len(teachers) < 2:
        raise ValueError(f"an ensemble needs at least 2 teachers, got {len(teachers)}")
    kwargs = {**kwargs, "outputs": ("logits",)}
    per = [np.asarray(attach_teacher_outputs(dataset, t, **kwargs)[COLUMN["logits"]],
                      dtype=np.float32) for t in teachers]
    if len({p.shape for p in per}) != 1:
        raise ValueError(f"the ensemble's teachers predict different numbers of classes "
                         f"({[p.shape[-1] for p in per]}); every teacher needs the same labels")
    return attach_logits(dataset, np.stack(per, axis=1), ensemble=True)


def attach_logits(dataset, logits: Any, ensemble: bool = False):
    """Return ``dataset`` with teacher logits you already have as the column the
    :class:`~distilkit.DistilTrainer` reads instead of running a teacher:
    ``teacher_logits`` (one teacher) or ``teacher_ensemble_logits`` (``ensemble=True``).
    The trainer then needs no ``teacher_model`` for the logit losses (``alpha_kd``,
    ``alpha_mse``).

    Args:
        dataset: a ``datasets.Dataset``, or a ``DatasetDict`` with ``logits`` a dict of the
            same splits.
        logits: a numpy array, torch tensor or nested lists, one row per example in the
            dataset's order: ``(examples, classes)``, or ``(examples, teachers, classes)``
            for an ensemble (averaged at training time with the run's ``temperature`` and
            ``ensemble_weights``). Every value must be finite.
        ensemble: whether ``logits`` holds several teachers per example.
    """
    from datasets import DatasetDict

    if isinstance(dataset, DatasetDict):
        if not isinstance(logits, dict) or set(logits) != set(dataset):
            given = sorted(logits) if isinstance(logits, dict) else type(logits).__name__
            raise ValueError(f"logits: for a DatasetDict give a dict with one entry per split "
                             f"{sorted(dataset)}, got {given}")
        return DatasetDict({split: attach_logits(d, logits[split], ensemble)
                            for split, d in dataset.items()})
    arr = _checked_logits(logits, len(dataset), ensemble)
    return _set_column(dataset, ENSEMBLE_COLUMN if ensemble else COLUMN["logits"], arr)


def _checked_logits(logits: Any, rows: int, ensemble: bool) -> np.ndarray:
    """``logits`` as a float32 array of ``rows`` examples, or a ValueError saying what is
    wrong with it (shape, row count, the first non-finite row)."""
    import torch

    from distilkit.device import to_host

    if torch.is_tensor(logits):
        logits = to_host(logits).float().numpy()
    try:
        arr = np.asarray(logits, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise ValueError(f"logits: not an array of numbers with rows of the same length ({e}); "
                         "give a numpy array, a torch tensor or nested lists of floats, one row "
                         "per example") from e
    want = "(examples, teachers, classes)" if ensemble else "(examples, classes)"
    if arr.ndim != (3 if ensemble else 2):
        other = ("pass ensemble=False for one teacher's logits" if ensemble else
                 "pass ensemble=True for an ensemble's (examples, teachers, classes)")
        raise ValueError(f"logits: shape {arr.shape} must be {want}; {other}")
    if arr.shape[0] != rows:
        raise ValueError(f"logits: {arr.shape[0]} rows for a dataset of {rows} rows; give one "
                         "row per example, in the dataset's order")
    if ensemble and arr.shape[1] < 2:
        raise ValueError(f"logits: shape {arr.shape}: an ensemble needs at least 2 teachers; "
                         "pass ensemble=False and shape (examples, classes) for one teacher")
    if arr.shape[-1] == 0:
        raise ValueError(f"logits: shape {arr.shape} has no classes; give one logit per class")
    bad = np.flatnonzero(~np.isfinite(arr.reshape(rows, -1)).all(axis=1))
    if bad.size:
        row = arr[bad[0]]
        raise ValueError(f"logits: row {bad[0]} holds {row[~np.isfinite(row)][0]} "
                         f"({bad.size} row(s) are not finite); teacher logits must be finite: "
                         "recompute those examples or drop them from the dataset")
    return arr


def _set_column(ds, name: str, values: np.ndarray):
    """Add ``values`` (one row per example) as a fixed-shape float32 column, built directly
    in Arrow (no Python lists), replacing a column of that name."""
    import pyarrow as pa
    from datasets import List, Value

    if name in ds.column_names:
        ds = ds.remove_columns(name)
    flat = pa.array(np.ascontiguousarray(values, dtype=np.float32).reshape(-1))
    feature: Any = Value("float32")
    arr = flat
    for dim in reversed(values.shape[1:]):
        arr = pa.FixedSizeListArray.from_arrays(arr, int(dim))
        feature = List(feature, length=int(dim))
    return ds.add_column(name, arr, feature=feature)


# ---------------------------------------------------------------------------------------
# Streams
# ---------------------------------------------------------------------------------------

_TOKEN_COLUMNS = ("input_ids", "token_type_ids", "attention_mask")


class StreamTeacherOutputs:
    """The teacher's outputs for the rows of a stream, one batch at a time (``streaming:
    true``), through the same cache, namespace and example keys as
    :func:`attach_teacher_outputs`: a stream run and a loaded run of the same rows share
    their cached outputs.

    :meth:`outputs_for` takes a batch's tokenized rows and returns their outputs: rows whose
    key is cached are read from the cache; the others are run through the teacher (loaded
    on the first miss, so a run whose every row hits never loads it; eval mode, no
    gradients) and buffered, to be written as one shard of up to ``flush_rows`` rows
    (:meth:`flush`; rows still buffered when the process ends are not cached, and are
    computed again next time). Each process computes only the rows of its own batches; its
    writes go through the shard store's atomic shard write, so processes filling one cache
    never see each other's partial shards.

    A stream's rows are never all at hand, so the namespace is read once, here, into an
    index (key -> shard, row); the arrays of the last ``keep_shards`` shards read stay in
    memory, others are read again, checksums checked again, when a row needs them (a warm
    run reads the shards in about the order the cold run wrote them). A damaged shard is
    discarded with a warning (by the shard store) and its rows are computed again.

    Args:
        teacher: a saved teacher directory or hub id (loaded with ``teacher_loader`` on the
            first miss and moved to ``device``), or a model object (run where it is).
        outputs, max_length, cache_dir, teacher_loader, teacher_dtype,
            tokenizer_name_or_path, batch_size: as for :func:`attach_teacher_outputs`.
        device: where a loaded teacher runs: a device, or a callable giving it (resolved at
            the first miss); ``None``: where the loader puts it.
    """

    def __init__(self, teacher, *, outputs: Union[str, Sequence[str]] = ("logits",),
                 max_length: Optional[int] = None, cache_dir: Optional[str] = None,
                 teacher_loader: Optional[Callable[[str], Any]] = None,
                 teacher_dtype: Optional[str] = None, tokenizer_name_or_path: Any = None,
                 device: Any = None, batch_size: int = 64, flush_rows: int = 1024,
                 keep_shards: int = 8):
        for name, v in (("batch_size", batch_size), ("flush_rows", flush_rows),
                        ("keep_shards", keep_shards)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: {v!r} must be a whole number >= 1")
        self.outputs = _check_outputs(outputs)
        self.cache = TeacherCache(cache_dir)
        self.cache.check_writable()
        self._teacher, self._loader, self._device = teacher, teacher_loader, device
        self._path, self.compute_dtype, self.fingerprint = _namespace_of(
            teacher, teacher_dtype, tokenizer_name_or_path, max_length, self.outputs)
        self.namespace = self.cache.namespace_dir(self.fingerprint)
        self.batch_size, self.flush_rows, self.keep_shards = batch_size, flush_rows, keep_shards
        self._model = None
        self.teacher_loaded = False
        self.hits = self.computed = 0
        self._shard_paths: list[str] = []
        self._where: dict[bytes, tuple[int, int]] = {}   # key -> (shard number, row)
        self._arrays: "OrderedDict[int, dict]" = OrderedDict()  # the shards kept in memory
        self._dead: set[int] = set()                    # shards found damaged on a re-read
        self._pending: dict[bytes, dict[str, np.ndarray]] = {}
        for shard in self.cache._shards(self.namespace):
            self._add_shard(shard, self.cache._read_shard(shard))

    def _add_shard(self, shard: str, arrays: Optional[dict]) -> None:
        """Index the rows of a shard read whole (``None``: damaged, already discarded); where
        several shards hold a key the oldest wins, as in :meth:`ShardStore.lookup`."""
        if arrays is None or any(n not in arrays for n in self.outputs):
            return
        n = len(self._shard_paths)
        self._shard_paths.append(shard)
        for row, k in enumerate(arrays[KEYS]):
            k = k.tobytes()
            if k not in self._where or self._where[k][0] in self._dead:
                self._where[k] = (n, row)
        self._keep(n, arrays)

    def _keep(self, n: int, arrays: dict) -> None:
        self._arrays[n] = {k: arrays[k] for k in self.outputs}
        self._arrays.move_to_end(n)
        while len(self._arrays) > self.keep_shards:
            self._arrays.popitem(last=False)

    def _cached(self, key: bytes) -> Optional[dict[str, np.ndarray]]:
        if key in self._pending:
            return self._pending[key]
        where = self._where.get(key)
        if where is None or where[0] in self._dead:
            return None
        n, row = where
        if n not in self._arrays:
            arrays = self.cache._read_shard(self._shard_paths[n])
            if arrays is None:  # damaged since the index was read: its rows are computed again
                self._dead.add(n)
                return None
            self._keep(n, arrays)
        self._arrays.move_to_end(n)
        return {k: v[row] for k, v in self._arrays[n].items()}

    def _computing_model(self):
        if self._model is None:
            self._model = _computing_model(self._teacher, self._path, self._loader,
                                           self.compute_dtype)
            self.teacher_loaded = self._path is not None
            device = self._device() if callable(self._device) else self._device
            if self.teacher_loaded and device is not None:
                self._model.to(device)
        return self._model

    def outputs_for(self, rows: Sequence[dict]) -> dict[str, np.ndarray]:
        """The outputs of ``rows`` (tokenized rows: ``input_ids`` and, where the teacher reads
        them, ``token_type_ids`` / ``attention_mask``, as the stream gives them), one float32
        array per output kind with one row per row, in order."""
        from datasets import Dataset

        if not rows:
            raise ValueError("a batch of a stream has no rows")
        cols = [c for c in _TOKEN_COLUMNS if c in rows[0]]
        if "input_ids" not in cols:
            raise ValueError(f"the teacher cache needs tokenized rows with 'input_ids'; the "
                             f"stream's rows have {sorted(rows[0])}")
        ds = Dataset.from_dict({c: [list(r[c]) for r in rows] for c in cols})
        keys = example_keys(ds, cols)
        got = [self._cached(k) for k in keys]
        found = np.array([g is not None for g in got])
        self.hits += int(found.sum())
        uniq = distinct_missing(keys, found)
        if uniq:
            computed = compute_teacher_outputs(self._computing_model(), ds.select(uniq), cols,
                                               self.outputs, self.batch_size)
            self.computed += len(uniq)
            for j, i in enumerate(uniq):
                self._pending[keys[i]] = {k: computed[k][j] for k in self.outputs}
            got = [g if g is not None else self._pending[k] for g, k in zip(got, keys)]
            if len(self._pending) >= self.flush_rows:
                self.flush()
        return {k: np.stack([g[k] for g in got]).astype(np.float32, copy=False)
                for k in self.outputs}

    def flush(self) -> Optional[str]:
        """Write the computed rows not yet cached as one shard; returns its directory (``None``
        when there were none)."""
        if not self._pending:
            return None
        keys = list(self._pending)
        arrays = {k: np.stack([self._pending[key][k] for key in keys]) for k in self.outputs}
        shard = self.cache.store(self.fingerprint, keys, arrays)
        self._add_shard(shard, {KEYS: np.frombuffer(b"".join(keys), np.uint8).reshape(
            len(keys), -1), **arrays})
        self._pending = {}
        return shard
