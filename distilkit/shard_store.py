"""A checksummed store of per-example arrays on disk, shared by every cache of model outputs
(teacher logits and [CLS] states, teacher generations, later top-k tokens).

Layout
    ``root/<namespace>/`` holds everything computed under one *fingerprint* (a JSON-able dict
    naming what produced the values: model weights, tokenizer, settings, the client's storage
    format), recorded in ``namespace.json``. Each write adds one *shard* directory:
    ``outputs.safetensors`` with the example keys (``keys``, ``(rows, key_bytes)`` uint8) and
    the named arrays, and ``manifest.json`` with the row count, each array's dtype and shape,
    and each file's size and SHA-256.

What an array may hold
    Any dtype safetensors stores (float32 logits, int32 token ids, uint8 text bytes). A numpy
    array is *fixed-shape*: one row per key. A list of arrays (one per key, same dtype and
    trailing dimensions, any first dimension) is *ragged*: stored as their concatenation plus
    ``<name>.offsets`` (``rows + 1`` int64), and given back as a list.

Guarantees
    A shard is assembled in a ``.tmp-*`` directory and renamed into place
    (:func:`distilkit.files.atomic_dir`), so a process killed mid-write leaves only a
    temporary directory, which readers ignore. A shard that fails its size, checksum or shape
    checks is deleted with a warning and its examples count as missing, so the caller
    recomputes them. Files and directories get the permissions the umask gives, so a cache
    shared by a team stays readable to it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
import warnings
from typing import Optional, Sequence, Union

import numpy as np

from distilkit.files import atomic_dir, atomic_write_json, check_writable, sha256_file

SHARD_FILE = "outputs.safetensors"
MANIFEST = "manifest.json"
NAMESPACE_FILE = "namespace.json"
KEYS = "keys"
_OFFSETS = ".offsets"

ArrayValue = Union[np.ndarray, Sequence[np.ndarray]]


class ShardStore:
    """Per-example arrays under ``root``, keyed by a fingerprint dict and an example key
    (layout and guarantees: module docstring).

    Args:
        root: the store's directory.
        version: the client's storage format; part of every namespace key, so a client that
            changes what it stores bumps it and never reads the old layout.
        label: how warnings and errors name this store (e.g. ``"teacher cache"``).
    """

    def __init__(self, root: str, version: int, label: str = "cache"):
        self.root = os.path.abspath(os.path.expanduser(root))
        self.version = version
        self.label = label

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.root!r})"

    def check_writable(self, field: str = "cache_dir", fix: Optional[str] = None) -> None:
        """Fail now, before any expensive work, when the store cannot be written; the error
        names the recipe ``field`` the root came from and the ``fix``."""
        fix = fix or f"set {field} to a writable directory or fix its permissions"
        check_writable(self.root, field, f"the {self.label} is written there: {fix}")

    # ------------------------------------------------------------------ namespaces
    def namespace_key(self, fingerprint: dict) -> str:
        blob = json.dumps({"format": self.version, **fingerprint}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    def namespace_dir(self, fingerprint: dict) -> str:
        """The directory holding every shard computed under ``fingerprint``."""
        return os.path.join(self.root, self.namespace_key(fingerprint))

    def _shards(self, ns: str) -> list[str]:
        if not os.path.isdir(ns):
            return []
        return sorted(os.path.join(ns, n) for n in os.listdir(ns) if n.startswith("shard-"))

    # ------------------------------------------------------------------ reading
    def _read_shard(self, shard: str) -> Optional[dict[str, ArrayValue]]:
        """``keys`` and every array of the shard (ragged ones as lists), or ``None`` (after
        deleting the shard) when it fails a check."""
        from safetensors.numpy import load_file

        try:
            with open(os.path.join(shard, MANIFEST)) as f:
                manifest = json.load(f)
            for name, meta in manifest["files"].items():
                path = os.path.join(shard, name)
                size = os.path.getsize(path)
                if size != meta["bytes"]:
                    raise ValueError(f"{name} has {size} bytes, the manifest says {meta['bytes']}")
                if sha256_file(path) != meta["sha256"]:
                    raise ValueError(f"{name} fails its SHA-256 checksum")
            raw = load_file(os.path.join(shard, SHARD_FILE))
            return _unpack(raw, int(manifest["rows"]),
                           {n for n, m in manifest.get("arrays", {}).items() if m.get("ragged")})
        except Exception as e:  # unreadable, truncated, wrong shape: all mean "recompute"
            warnings.warn(f"{self.label}: discarding damaged shard {shard} ({e}); its examples "
                          "will be recomputed", RuntimeWarning, stacklevel=3)
            shutil.rmtree(shard, ignore_errors=True)
            return None

    def lookup(self, fingerprint: dict, keys: Sequence[bytes], names: Sequence[str]
               ) -> tuple[dict[str, ArrayValue], np.ndarray]:
        """Stored values of ``names`` for ``keys``: ``(arrays, found)``, ``found`` a boolean
        mask over ``keys``. A fixed-shape array has one row per key (zeros where not found),
        a ragged one is a list (``None`` where not found). Only shards holding every name
        count; where several hold a key, the oldest wins. ``arrays`` is empty when no shard
        holds any key."""
        keys = [bytes(k) for k in keys]
        pos: dict[bytes, list[int]] = {}
        for i, k in enumerate(keys):
            pos.setdefault(k, []).append(i)
        found = np.zeros(len(keys), dtype=bool)
        result: dict[str, ArrayValue] = {}
        for shard in self._shards(self.namespace_dir(fingerprint)):
            if found.all():
                break
            arrays = self._read_shard(shard)
            if arrays is None or any(n not in arrays for n in names):
                continue
            want, rows = [], []
            for row, k in enumerate(arrays[KEYS]):
                for i in pos.get(k.tobytes(), ()):
                    if not found[i]:
                        want.append(i)
                        rows.append(row)
            if not want:
                continue
            for n in names:
                v = arrays[n]
                if isinstance(v, np.ndarray):
                    if n not in result:
                        result[n] = np.zeros((len(keys), *v.shape[1:]), dtype=v.dtype)
                    result[n][want] = v[rows]
                else:
                    out = result.setdefault(n, [None] * len(keys))
                    for i, r in zip(want, rows):
                        out[i] = v[r]
            found[want] = True
        return result, found

    # ------------------------------------------------------------------ writing
    def store(self, fingerprint: dict, keys: Sequence[bytes], arrays: dict[str, ArrayValue]
              ) -> str:
        """Write one shard of ``arrays`` (one row per key) atomically; returns its directory."""
        from safetensors import numpy as st_numpy

        tensors, meta = _pack([bytes(k) for k in keys], arrays)
        ns = self.namespace_dir(fingerprint)
        os.makedirs(ns, exist_ok=True)
        if not os.path.isfile(os.path.join(ns, NAMESPACE_FILE)):
            atomic_write_json(os.path.join(ns, NAMESPACE_FILE),
                              {"format": self.version, **fingerprint})

        def fill(tmp: str) -> None:
            path = os.path.join(tmp, SHARD_FILE)
            st_numpy.save_file(tensors, path)
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            # save_file makes the file 0600; it gets the umask's mode, as ``tmp`` did
            # (atomic_dir), less the execute bits, so a cache shared by a team stays readable.
            os.chmod(path, os.stat(tmp).st_mode & 0o666)
            atomic_write_json(os.path.join(tmp, MANIFEST), {
                "format": self.version, "rows": len(keys), "arrays": meta,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "files": {SHARD_FILE: {"bytes": os.path.getsize(path),
                                       "sha256": sha256_file(path)}}}, fsync=True)

        final = os.path.join(ns, f"shard-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}")
        atomic_dir(final, fill)
        return final

    # ------------------------------------------------------------------ housekeeping
    def remove_partial(self, older_than_s: float = 3600.0) -> int:
        """Delete temporary files and directories left by killed writers (older than
        ``older_than_s``, so a concurrent writer's work is left alone); returns how many were
        removed."""
        n, now = 0, time.time()
        if not os.path.isdir(self.root):
            return 0
        for ns in os.listdir(self.root):
            d = os.path.join(self.root, ns)
            if not os.path.isdir(d):
                continue
            for name in os.listdir(d):
                p = os.path.join(d, name)
                if name.startswith(".tmp-") and now - os.path.getmtime(p) > older_than_s:
                    if os.path.isdir(p):
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        os.remove(p)
                    n += 1
        return n

    def size_bytes(self) -> int:
        """Bytes of every file under the store's root."""
        total = 0
        for d, _, files in os.walk(self.root):
            total += sum(os.path.getsize(os.path.join(d, f)) for f in files)
        return total


def distinct_missing(keys: Sequence[bytes], found: np.ndarray) -> list[int]:
    """The index of the first occurrence of each distinct key that ``lookup`` did not find:
    what a client computes (once per example, however often it repeats) and then stores."""
    first: dict[bytes, int] = {}
    for i in np.flatnonzero(~found):
        first.setdefault(keys[i], int(i))
    return list(first.values())


def _pack(keys: list[bytes], arrays: dict[str, ArrayValue]
          ) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """The safetensors dict of one shard and the manifest's description of each array."""
    n = len(keys)
    if n == 0:
        raise ValueError("a shard needs at least one example key")
    if len({len(k) for k in keys}) != 1 or not keys[0]:
        raise ValueError("example keys must be non-empty bytes, all of one length")
    tensors = {KEYS: np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(n, len(keys[0]))}
    meta: dict[str, dict] = {}
    for name, v in arrays.items():
        if name == KEYS or name.endswith(_OFFSETS):
            raise ValueError(f"array name {name!r} is reserved by the shard store")
        if isinstance(v, np.ndarray):
            if v.ndim == 0 or v.shape[0] != n:
                raise ValueError(f"array {name!r} has shape {v.shape}; it needs {n} rows, one "
                                 "per key")
            tensors[name] = np.ascontiguousarray(v)
        else:
            parts = [np.asarray(p) for p in v]
            if len(parts) != n:
                raise ValueError(f"ragged array {name!r} has {len(parts)} rows; it needs {n}")
            kinds = {(p.dtype, p.shape[1:]) for p in parts}
            if len(kinds) != 1 or parts[0].ndim == 0:
                raise ValueError(f"ragged array {name!r} mixes dtypes or trailing shapes "
                                 f"{sorted(map(str, kinds))}; give every row the same")
            lengths = np.array([len(p) for p in parts], dtype=np.int64)
            tensors[name] = np.ascontiguousarray(np.concatenate(parts))
            tensors[name + _OFFSETS] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        t = tensors[name]
        meta[name] = {"dtype": str(t.dtype), "shape": list(t.shape),
                      "ragged": not isinstance(v, np.ndarray)}
    return tensors, meta


def _unpack(raw: dict[str, np.ndarray], rows: int, ragged: set[str]) -> dict[str, ArrayValue]:
    """The inverse of :func:`_pack`, checking every array against the manifest's row count."""
    if KEYS not in raw or raw[KEYS].shape[0] != rows:
        raise ValueError(f"the keys do not have the manifest's {rows} rows")
    out: dict[str, ArrayValue] = {KEYS: raw[KEYS]}
    for name, v in raw.items():
        if name == KEYS or name.endswith(_OFFSETS):
            continue
        if name not in ragged:
            if v.shape[0] != rows:
                raise ValueError(f"{name} has {v.shape[0]} rows, the manifest says {rows}")
            out[name] = v
            continue
        off = raw.get(name + _OFFSETS)
        if (off is None or off.shape != (rows + 1,) or off[0] != 0 or off[-1] != len(v)
                or np.any(np.diff(off) < 0)):
            raise ValueError(f"{name}'s offsets do not describe {rows} rows of its values")
        out[name] = [v[off[i]:off[i + 1]] for i in range(rows)]
    return out
