"""What distilkit keeps on disk, and how to bound it: ``distilkit cache list|prune|clear``.

Where distilkit writes
    Everything has one default root, ``$DISTILKIT_CACHE`` (``~/.cache/distilkit``,
    :func:`distilkit.data.cache_root`):

    * ``teacher_outputs/<namespace>/``: teacher logits / [CLS] states
      (:class:`~distilkit.teacher_cache.TeacherCache`; a recipe's ``cache_dir`` moves it:
      the namespaces then sit directly in ``cache_dir``);
    * ``seq2seq/generations/<namespace>/``: teacher generations for sequence-level KD
      (:class:`~distilkit.seq2seq.sequence_kd.GenerationCache`; with a recipe's ``cache_dir``,
      ``cache_dir/generations``);
    * ``seq2seq/topk/<namespace>/``: the teacher's top-k distribution of every target token
      (:mod:`distilkit.seq2seq.topk_cache`; with a recipe's ``cache_dir``, ``cache_dir/topk``);
    * ``seq2seq/tokenizer-<name>-<key>/``: tokenizers trained here for the seq2seq task;
    * ``teachers/<name>-<key>/``: fine-tuned (:mod:`distilkit.finetune`, the built-in teacher
      included) and trained (:mod:`distilkit.seq2seq.teacher`) teachers;
    * ``downloads/`` and ``data/``: the built-in dataset's source, fetched once.

    A root is scanned (a few levels deep, links not followed) for what distilkit recognises:
    a directory holding ``namespace.json`` (one namespace of a
    :class:`~distilkit.shard_store.ShardStore`), ``teacher_info.json`` (a teacher) or
    ``distilkit_tokenizer.json`` (a tokenizer), the two data directories of the default root,
    and ``.tmp-*`` leftovers of killed writers beside them. Anything else under a root is not
    distilkit's and is never listed or removed, so a mistaken ``--cache-dir`` cannot delete
    other files.

Last use
    Namespaces and teachers record no reads, so an entry's age is its *last use as the
    filesystem records it*: the latest modification of any of its files and directories and
    the latest access of its data files (a lookup reads ``outputs.safetensors``; a teacher's
    use hashes or loads its weights). Linux's default ``relatime`` mounts update access times
    at most daily, enough for ``--older-than`` in days; on a ``noatime`` mount the age is the
    last write. Listing reads only the metadata files (``manifest.json``...), which do not
    count, and puts back the access times of the teacher weights it hashes to name a
    namespace's teacher, so ``list`` never makes an entry look used.

Removal
    An entry is first renamed to ``.tmp-distilkit-trash-*`` beside it (one atomic step: a
    reader sees the whole namespace or none of it; a lookup that starts after the rename finds
    nothing and recomputes, one that already opened a file keeps reading it), then deleted.
    A deletion interrupted half-way leaves a ``.tmp-`` directory that readers ignore and the
    next prune removes. A namespace with a ``.tmp-*`` directory younger than an hour inside is
    being written to and is left alone by ``prune``.

Repeated augmented runs
    Augmented sentences are keyed by their token ids inside the teacher's namespace, so a run
    with new augmentation settings adds a shard to the same namespace rather than a new
    namespace. ``--older-than`` therefore keeps a namespace that is still in use, however
    large; ``--max-size`` bounds it (the oldest namespaces go first; one alone above the limit
    goes whole, and its examples are recomputed on their next use).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Iterable, Optional, Sequence

NAMESPACE_FILE = "namespace.json"    # distilkit.shard_store.NAMESPACE_FILE
MANIFEST = "manifest.json"           # distilkit.shard_store.MANIFEST
TEACHER_INFO = "teacher_info.json"   # distilkit.teachers.INFO_FILE
TOKENIZER_MARKER = "distilkit_tokenizer.json"  # distilkit.seq2seq.tokenizer.cached_tokenizer
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".tmp-distilkit-trash-"
# Directories distilkit names itself: a leftover .tmp-* directly inside one is a partial write.
KNOWN_DIRS = ("teacher_outputs", "generations", "topk", "teachers", "seq2seq", "downloads",
              "data")
DATA_DIRS = ("downloads", "data")    # inputs fetched once, in the default root only
# Metadata files ``list`` reads: their access times say nothing about use.
META_FILES = (NAMESPACE_FILE, MANIFEST, TEACHER_INFO, TOKENIZER_MARKER)
MAX_DEPTH = 4
PARTIAL_MAX_AGE_S = 3600.0           # a younger .tmp-* may belong to a writer at work
# Kinds, for the output and for what prune may remove.
OUTPUTS, GENERATIONS, SHARDS = "teacher outputs", "generations", "cached outputs"
TOPK = "top-k token outputs"
FINETUNED, TRAINED, TOKENIZER = "fine-tuned teacher", "trained teacher", "tokenizer"
DATA, PARTIAL = "downloaded data", "partial"
NAMESPACE_KINDS = (OUTPUTS, TOPK, GENERATIONS, SHARDS)
PRUNABLE = NAMESPACE_KINDS + (FINETUNED, TRAINED, TOKENIZER)


@dataclass
class Entry:
    """One thing distilkit keeps on disk (a namespace, a teacher, a tokenizer, the downloaded
    data, or a partial write), with what ``list`` shows of it."""

    path: str
    kind: str
    root: str
    size: int                         # bytes of its files (a namespace's partials excluded)
    last_used: float                  # epoch seconds (module docstring: "Last use")
    teacher: Optional[str] = None     # a namespace's teacher, a teacher's base
    examples: Optional[int] = None    # rows over a namespace's shards
    shards: Optional[int] = None
    busy: bool = False                # holds a .tmp-* younger than an hour: being written
    fingerprint: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------
# Values of the flags
# ---------------------------------------------------------------------------------------

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
# Two-letter units are decimal (as disks are sold), "i" units and single letters binary
# (as du -h and ls -h print them).
_SIZE_UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
               "k": 2 ** 10, "m": 2 ** 20, "g": 2 ** 30, "t": 2 ** 40, "kib": 2 ** 10,
               "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def parse_duration(text: str, flag: str = "--older-than") -> float:
    """Seconds in ``text``: a number and one unit of s, m, h, d, w (``"7d"``, ``"1.5h"``)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _DURATION_UNITS:
        raise ValueError(f"{flag}: {text!r} is not a duration; give a number and a unit of "
                         "s, m, h, d or w, e.g. 7d or 12h")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2).lower()]


def parse_size(text: str, flag: str = "--max-size") -> int:
    """Bytes in ``text``: a number and an optional unit (``"2GB"`` = 2e9, ``"2GiB"`` and
    ``"2G"`` = 2 * 2**30, ``"500MB"``, a bare number is bytes)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"{flag}: {text!r} is not a size; give a number and an optional unit "
                         "of B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (K, M, G, "
                         "T: powers of 1024), e.g. 2GB or 500MiB")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def format_size(n: int) -> str:
    """``n`` bytes for people: ``"512 B"``, ``"1.5 KiB"``, ``"87.6 MiB"``."""
    units, v, i = ("B", "KiB", "MiB", "GiB", "TiB"), float(n), 0
    while abs(v) >= 1024 and i < len(units) - 1:
        v, i = v / 1024, i + 1
    return f"{v:.0f} B" if i == 0 else f"{v:.1f} {units[i]}"


def format_age(seconds: float) -> str:
    """An age for people: ``"just now"``, ``"5m"``, ``"3h 20m"``, ``"4d 2h"``."""
    s = max(0, int(seconds))
    if s < 60:
        return "just now"
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m = s // 60
    if d:
        return f"{d}d {h}h" if h else f"{d}d"
    if h:
        return f"{h}h {m}m" if m else f"{h}h"
    return f"{m}m"


# ---------------------------------------------------------------------------------------
# Finding what is there
# ---------------------------------------------------------------------------------------

def default_roots() -> list[str]:
    from distilkit.data import cache_root

    return [cache_root()]


def check_roots(roots: Optional[Sequence[str]]) -> list[str]:
    """Absolute cache roots (the default root when none is given); a root that exists and is
    not a directory is an error naming ``--cache-dir``. A missing one is an empty cache."""
    out = []
    for r in roots or default_roots():
        path = os.path.abspath(os.path.expanduser(os.fspath(r)))
        if os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f"--cache-dir: {r!r} is a file, not a directory; give the cache's "
                             "directory (the default is $DISTILKIT_CACHE, ~/.cache/distilkit; "
                             "a recipe's cache_dir for its teacher outputs)")
        out.append(path)
    return out


def _walk_stats(path: str, skip_tmp: bool = False) -> tuple[int, float]:
    """``(bytes of every file, last use)`` under ``path`` (a file or a directory; links are
    not followed; ``skip_tmp``: leave out ``.tmp-*`` children of ``path``)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return 0, 0.0
    if not os.path.isdir(path) or os.path.islink(path):
        return st.st_size, max(st.st_mtime, st.st_atime)
    size, last = 0, st.st_mtime
    for d, dirs, files in os.walk(path):
        if skip_tmp and d == path:
            dirs[:] = [n for n in dirs if not n.startswith(TMP_PREFIX)]
            files = [n for n in files if not n.startswith(TMP_PREFIX)]
        for n in dirs:
            try:
                last = max(last, os.lstat(os.path.join(d, n)).st_mtime)
            except FileNotFoundError:
                pass
        for n in files:
            try:
                fs = os.lstat(os.path.join(d, n))
            except FileNotFoundError:  # removed meanwhile by a concurrent writer or prune
                continue
            size += fs.st_size
            last = max(last, fs.st_mtime if n in META_FILES else max(fs.st_mtime, fs.st_atime))
    return size, last


def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def _namespace_kind(fp: dict, parent: str) -> str:
    """The cache a namespace belongs to, from the fields its writer keys it by (or, for a
    namespace.json that cannot be read, the store directory's default name)."""
    if "top_k" in fp and "temperature" in fp or parent == "topk":
        return TOPK
    if "outputs" in fp and "compute_dtype" in fp or parent == "teacher_outputs":
        return OUTPUTS
    if "settings" in fp and "max_source_length" in fp or parent == "generations":
        return GENERATIONS
    return SHARDS


def _namespace(path: str, root: str, now: float) -> Entry:
    fp = _read_json(os.path.join(path, NAMESPACE_FILE)) or {}
    examples = shards = 0
    busy = False
    for n in sorted(os.listdir(path)):
        if n.startswith("shard-"):
            shards += 1
            manifest = _read_json(os.path.join(path, n, MANIFEST)) or {}
            rows = manifest.get("rows")
            examples += rows if isinstance(rows, int) else 0
        elif n.startswith(TMP_PREFIX):
            busy |= _is_young(os.path.join(path, n), now)
    size, last = _walk_stats(path, skip_tmp=True)
    return Entry(path, _namespace_kind(fp, os.path.basename(os.path.dirname(path))), root, size,
                 last, teacher=fp.get("teacher") if isinstance(fp.get("teacher"), str) else None,
                 examples=examples, shards=shards, busy=busy, fingerprint=fp)


def _is_young(path: str, now: float) -> bool:
    """Whether anything in ``path`` changed within the hour (a writer may be at work)."""
    return now - _walk_stats(path)[1] <= PARTIAL_MAX_AGE_S


def _leaf(path: str, root: str, kind: str, teacher: Optional[str] = None) -> Entry:
    size, last = _walk_stats(path)
    return Entry(path, kind, root, size, last, teacher=teacher)


def _teacher(path: str, root: str) -> Entry:
    info = _read_json(os.path.join(path, TEACHER_INFO)) or {}
    if info.get("base"):
        base = str(info["base"])
        if os.path.isabs(base):  # a local base: its last two names say enough
            base = os.path.join(*os.path.normpath(base).split(os.sep)[-2:])
        return _leaf(path, root, FINETUNED, f"from {base}")
    return _leaf(path, root, TRAINED, str(info["task"]) if info.get("task") else None)


def _scan_dir(d: str, root: str, depth: int, is_default: bool, now: float,
              out: list[Entry]) -> bool:
    """Add the entries under ``d`` to ``out``; ``True`` when ``d`` held any (so its ``.tmp-*``
    children are distilkit's partial writes)."""
    try:
        names = sorted(os.listdir(d))
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return False
    found, tmps = False, []
    for n in names:
        p = os.path.join(d, n)
        if os.path.islink(p):
            continue
        if n.startswith(TMP_PREFIX):
            tmps.append(p)
        elif not os.path.isdir(p):
            continue
        elif os.path.isfile(os.path.join(p, NAMESPACE_FILE)):
            out.append(_namespace(p, root, now))
            # A namespace's own partial writes are entries of their own.
            out.extend(_leaf(os.path.join(p, t), root, PARTIAL) for t in os.listdir(p)
                       if t.startswith(TMP_PREFIX))
            found = True
        elif os.path.isfile(os.path.join(p, TEACHER_INFO)):
            out.append(_teacher(p, root))
            found = True
        elif os.path.isfile(os.path.join(p, TOKENIZER_MARKER)):
            out.append(_leaf(p, root, TOKENIZER))
            found = True
        elif is_default and depth == 0 and n in DATA_DIRS:
            out.append(_leaf(p, root, DATA))
            found = True
        elif depth + 1 < MAX_DEPTH:
            found |= _scan_dir(p, root, depth + 1, is_default, now, out)
    ours = found or os.path.basename(d) in KNOWN_DIRS or (is_default and depth == 0)
    out.extend(_leaf(t, root, PARTIAL) for t in tmps
               if ours or os.path.basename(t).startswith(TRASH_PREFIX))
    return found


def scan(roots: Optional[Sequence[str]] = None, now: Optional[float] = None) -> list[Entry]:
    """Every entry under ``roots`` (default: ``$DISTILKIT_CACHE``), each once however the
    roots nest, with each namespace's teacher named where a teacher under the roots matches
    its fingerprint."""
    now = time.time() if now is None else now
    default = {os.path.abspath(os.path.expanduser(r)) for r in default_roots()}
    entries: list[Entry] = []
    for root in check_roots(roots):
        _scan_dir(root, root, 0, root in default, now, entries)
    seen, unique = set(), []
    for e in entries:
        key = os.path.realpath(e.path)
        if key not in seen:
            seen.add(key)
            unique.append(e)
    _name_teachers(unique)
    return unique


def _name_teachers(entries: list[Entry]) -> None:
    """Replace each namespace's teacher hash by the name of the cached teacher with that
    fingerprint (or a short ``weights <hash>`` when none under the roots has it)."""
    wanted = {e.teacher for e in entries if e.kind in NAMESPACE_KINDS and e.teacher}
    names: dict[str, str] = {}
    if wanted:
        from distilkit.teacher_cache import teacher_fingerprint

        for t in entries:
            if t.kind in (FINETUNED, TRAINED):
                try:
                    with _atimes_kept(t.path):
                        names[teacher_fingerprint(t.path)] = os.path.basename(t.path)
                except (OSError, ValueError):  # removed meanwhile, or not a loadable teacher
                    continue
    for e in entries:
        if e.kind in NAMESPACE_KINDS and e.teacher:
            e.teacher = names.get(e.teacher, f"weights {e.teacher[:12]}")


class _atimes_kept:
    """Put back the access times of the files under a directory (best effort: only an owner
    may), so hashing a teacher to name it does not make it look used."""

    def __init__(self, path: str):
        self.times = {}
        for d, _, files in os.walk(path):
            for n in files:
                st = os.lstat(os.path.join(d, n))
                self.times[os.path.join(d, n)] = (st.st_atime_ns, st.st_mtime_ns)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for p, t in self.times.items():
            try:
                os.utime(p, ns=t, follow_symlinks=False)
            except OSError:
                pass
        return False


# ---------------------------------------------------------------------------------------
# Deciding and removing
# ---------------------------------------------------------------------------------------

def plan_prune(entries: Sequence[Entry], now: float, older_than: Optional[float] = None,
               max_size: Optional[int] = None) -> list[tuple[Entry, str]]:
    """What a prune removes, as ``(entry, reason)`` in removal order: partial writes older
    than an hour always; then namespaces, teachers and tokenizers unused for ``older_than``
    seconds; then, oldest first, more of them until everything left fits in ``max_size``
    bytes. Entries being written to (``busy``) and the downloaded data are kept."""
    gone: list[tuple[Entry, str]] = []
    removed: set[str] = set()

    def take(e: Entry, why: str) -> None:
        gone.append((e, why))
        removed.add(e.path)

    for e in entries:
        if e.kind == PARTIAL and now - e.last_used > PARTIAL_MAX_AGE_S:
            take(e, f"partial write, untouched for {format_age(now - e.last_used)}")
    candidates = sorted((e for e in entries if e.kind in PRUNABLE and not e.busy),
                        key=lambda e: e.last_used)
    if older_than is not None:
        for e in candidates:
            if now - e.last_used > older_than:
                take(e, f"unused for {format_age(now - e.last_used)}")
    if max_size is not None:
        def inside(e: Entry) -> bool:  # a partial inside a removed namespace goes with it
            return any(e.path.startswith(r + os.sep) for r in removed)

        total = sum(e.size for e in entries if e.path not in removed and not inside(e))
        for e in candidates:
            if total <= max_size:
                break
            if e.path not in removed:
                total -= e.size + sum(p.size for p in entries if p.kind == PARTIAL
                                      and p.path.startswith(e.path + os.sep)
                                      and p.path not in removed)
                take(e, f"oldest while the cache is above {format_size(max_size)}")
    # A partial inside a namespace removed above is removed with it, not on its own.
    whole = {e.path for e, _ in gone if e.kind != PARTIAL}
    return [(e, why) for e, why in gone
            if not any(e.path.startswith(w + os.sep) for w in whole)]


def remove_entry(path: str) -> bool:
    """Remove ``path`` safely for a concurrent reader: renamed to a ``.tmp-distilkit-trash-*``
    name beside it first (atomic), then deleted. ``False`` when it was already gone."""
    trash = os.path.join(os.path.dirname(path),
                         f"{TRASH_PREFIX}{os.path.basename(path)}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return False
    if os.path.isdir(trash) and not os.path.islink(trash):
        shutil.rmtree(trash)
    else:
        os.remove(trash)
    return True


def prune(roots: Optional[Sequence[str]] = None, older_than: Optional[float] = None,
          max_size: Optional[int] = None, dry_run: bool = False,
          now: Optional[float] = None) -> dict:
    """Apply :func:`plan_prune` to the cache under ``roots``. Returns ``removed`` (the
    entries and why), ``freed`` (bytes), ``left`` (bytes still there) and ``dry_run``."""
    if older_than is not None and older_than < 0:
        raise ValueError(f"--older-than: {older_than!r} is negative; give an age like 7d")
    if max_size is not None and max_size < 0:
        raise ValueError(f"--max-size: {max_size!r} is negative; give a size like 2GB")
    now = time.time() if now is None else now
    entries = scan(roots, now)
    removed, freed = [], 0
    for e, why in plan_prune(entries, now, older_than, max_size):
        size = e.size + (sum(p.size for p in entries if p.kind == PARTIAL
                             and p.path.startswith(e.path + os.sep)) if e.kind != PARTIAL else 0)
        if dry_run or remove_entry(e.path):
            removed.append((e, why))
            freed += size
    total = sum(e.size for e in entries)
    return {"removed": removed, "freed": freed, "left": total - freed, "dry_run": dry_run}


def clear(roots: Optional[Sequence[str]] = None, yes: bool = False) -> dict:
    """Remove every entry under ``roots`` (partial writes and downloaded data included; files
    that are not distilkit's stay). Refuses without ``yes``."""
    entries = scan(roots)
    top = [e for e in entries if not any(e.path.startswith(o.path + os.sep) for o in entries)]
    total = sum(e.size for e in entries)
    if not yes:
        where = ", ".join(check_roots(roots))
        raise ValueError(f"--yes: not given, and clear removes all {len(top)} entries "
                         f"({format_size(total)}) under {where}; add --yes to confirm")
    freed = 0
    for e in top:
        if remove_entry(e.path):
            freed += sum(x.size for x in entries if x.path == e.path
                         or x.path.startswith(e.path + os.sep))
    return {"removed": top, "freed": freed}


# ---------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------

def totals(entries: Iterable[Entry]) -> dict:
    entries = list(entries)
    return {"entries": len(entries), "bytes": sum(e.size for e in entries),
            "namespaces": sum(e.kind in NAMESPACE_KINDS for e in entries),
            "teachers": sum(e.kind in (FINETUNED, TRAINED) for e in entries),
            "partials": sum(e.kind == PARTIAL for e in entries),
            "partial_bytes": sum(e.size for e in entries if e.kind == PARTIAL),
            "examples": sum(e.examples or 0 for e in entries),
            "shards": sum(e.shards or 0 for e in entries)}


def entry_json(e: Entry, now: float) -> dict:
    d = asdict(e)
    d["age_s"] = round(now - e.last_used, 1)
    return d


def _ago(seconds: float) -> str:
    age = format_age(seconds)
    return age if age == "just now" else f"{age} ago"


def format_table(entries: Sequence[Entry], roots: Sequence[str], now: float) -> str:
    """The text of ``distilkit cache list``: one line per entry, oldest use last, then the
    totals."""
    def rel(e: Entry) -> str:
        return os.path.relpath(e.path, e.root)

    lines = [f"cache: {', '.join(roots)}"]
    if not entries:
        missing = [r for r in roots if not os.path.isdir(r)]
        lines.append("(empty" + (f"; {', '.join(missing)} does not exist" if missing else "")
                     + ")")
        return "\n".join(lines)
    rows = [("KIND", "TEACHER", "SIZE", "LAST USED", "EXAMPLES", "SHARDS", "PATH")]
    for e in sorted(entries, key=lambda e: -e.last_used):
        rows.append((e.kind + (" (being written)" if e.busy else ""), e.teacher or "-",
                     format_size(e.size), _ago(now - e.last_used),
                     "-" if e.examples is None else f"{e.examples:,}",
                     "-" if e.shards is None else str(e.shards),
                     rel(e) if len(roots) == 1 else e.path))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    right = {2, 4, 5}
    for r in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells + [r[-1]]))
    t = totals(entries)
    lines.append(f"total: {t['entries']} entries, {format_size(t['bytes'])}; namespaces: "
                 f"{t['namespaces']} ({t['examples']:,} examples, {t['shards']} shards); "
                 f"teachers: {t['teachers']}; partial writes: {t['partials']} "
                 f"({format_size(t['partial_bytes'])})")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# The command line (wired by distilkit.cli)
# ---------------------------------------------------------------------------------------

def add_cache_arguments(p) -> None:
    """Arguments of ``distilkit cache list|prune|clear``."""
    sub = p.add_subparsers(dest="cache_command", required=True)
    roots_help = ("a cache root (repeat for several; default $DISTILKIT_CACHE, "
                  "~/.cache/distilkit; a recipe's cache_dir when it sets one)")
    ls = sub.add_parser("list", help="what is cached: kind, teacher, size, last use, examples")
    pr = sub.add_parser("prune", help="remove the least recently used entries")
    cl = sub.add_parser("clear", help="remove everything distilkit cached")
    for q in (ls, pr, cl):
        q.add_argument("--cache-dir", action="append", default=None, metavar="DIR",
                       help=roots_help)
    ls.add_argument("--json", action="store_true", help="print JSON (bytes, seconds)")
    pr.add_argument("--older-than", default=None, metavar="AGE",
                    help="remove what was not used for AGE (e.g. 7d, 12h; units s m h d w)")
    pr.add_argument("--max-size", default=None, metavar="SIZE",
                    help="then remove the least recently used until the cache fits in SIZE "
                         "(e.g. 2GB, 500MiB)")
    pr.add_argument("--dry-run", action="store_true", help="print what would go, remove nothing")
    cl.add_argument("--yes", action="store_true", help="confirm: remove everything")


def run_cache(args, rest=None) -> int:
    """``distilkit cache list|prune|clear``."""
    now = time.time()
    if args.cache_command == "list":
        roots = check_roots(args.cache_dir)
        entries = scan(roots, now)
        if args.json:
            print(json.dumps({"roots": roots, "entries": [entry_json(e, now) for e in entries],
                              "totals": totals(entries)}, indent=2, default=str))
        else:
            print(format_table(entries, roots, now))
        return 0
    if args.cache_command == "prune":
        older = None if args.older_than is None else parse_duration(args.older_than)
        size = None if args.max_size is None else parse_size(args.max_size)
        out = prune(args.cache_dir, older, size, args.dry_run, now)
        verb = "would remove" if args.dry_run else "removed"
        for e, why in out["removed"]:
            print(f"{verb} {e.kind} {e.path} ({format_size(e.size)}): {why}")
        print(f"{'would free' if args.dry_run else 'freed'} {format_size(out['freed'])} in "
              f"{len(out['removed'])} entries; {format_size(out['left'])} left")
        if size is not None and out["left"] > size:
            print(f"still above --max-size {format_size(size)}: what is left is downloaded "
                  "data or being written, which prune keeps")
        if older is None and size is None:
            print("(no --older-than or --max-size: only partial writes older than an hour go)")
        return 0
    out = clear(args.cache_dir, args.yes)
    print(f"removed {len(out['removed'])} entries, freed {format_size(out['freed'])}")
    return 0
