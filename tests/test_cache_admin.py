"""distilkit cache list|prune|clear over real caches written by distilkit's own code (teacher
outputs of tiny BERTs, generations of a tiny T5, a saved teacher, a trained tokenizer): what
list shows, prune by age and by size (oldest first, the rest still readable), removal racing a
reader or interrupted half-way, clear, and the command line's errors."""
import json
import os
import shutil
import time

import numpy as np
import pytest
from conftest import tiny_bert, tiny_t5
from tiny_text import tiny_dataset, tiny_tokenizer, tokenized

from distilkit import cache_admin as ca
from distilkit.cli import main
from distilkit.teacher_cache import (SHARD_FILE, TeacherCache, attach_teacher_outputs,
                                     example_keys, teacher_fingerprint)

DAY = 86400.0


@pytest.fixture
def root(tmp_path, monkeypatch):
    """An empty ``$DISTILKIT_CACHE``."""
    r = tmp_path / "dk"
    monkeypatch.setenv("DISTILKIT_CACHE", str(r))
    assert ca.default_roots() == [str(r)]  # never the real cache
    return r


@pytest.fixture
def tok():
    return tiny_tokenizer()


def data(tok, n=24, seed=0):
    return tokenized(tiny_dataset(n, seed), tok)


def saved_teacher(root, tok, seed=0):
    """A teacher as distilkit's fine-tuning leaves it under ``teachers/``."""
    from distilkit.teachers import save_teacher_dir

    out = str(root / "teachers" / f"tiny-bert-{seed}")
    save_teacher_dir(out, tiny_bert(seed=seed), tok, {"base": "org/tiny-bert",
                                                      "task": "classification"})
    return out


def attach(ds, teacher, cache_dir=None):
    stats = {}
    out = attach_teacher_outputs(ds, teacher, max_length=32, cache_dir=cache_dir,
                                 progress=False, stats=stats)
    return out, stats


def du(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def age(path, seconds, now=None):
    """Set every access and modification time under ``path`` to ``seconds`` ago."""
    t = (now or time.time()) - seconds
    for d, dirs, files in os.walk(path):
        for n in files + dirs:
            os.utime(os.path.join(d, n), (t, t))
    os.utime(path, (t, t))


def by_path(entries):
    return {e.path: e for e in entries}


def generations(root):
    """A generation cache of a tiny T5, written by sequence-level KD's own code."""
    from distilkit.seq2seq.sequence_kd import SequenceKDSettings, teacher_generations
    from distilkit.seq2seq.tokenizer import TokenizerSettings, build_tokenizer

    sources = ["the film is good", "a dull plot", "the cast was warm", "its pace is slow"]
    s2s_tok = build_tokenizer(sources, TokenizerSettings(vocab_size=300, min_frequency=1))
    stats = {}
    teacher_generations(tiny_t5(seed=1, vocab=len(s2s_tok)), s2s_tok, sources,
                        SequenceKDSettings(max_new_tokens=4, batch_size=2), stats=stats)
    return stats["namespace"], len(set(sources))


def test_list_shows_each_cache_with_its_teacher_counts_and_size(root, tok):
    teacher = saved_teacher(root, tok)
    _, st = attach(data(tok, 24), teacher)
    _, st2 = attach(data(tok, 30), teacher)  # 6 new examples: a second shard
    assert st2["namespace"] == st["namespace"] and st2["hits"] == 24
    other = tiny_bert(seed=5)  # a model object: no cached teacher has its fingerprint
    _, st3 = attach(data(tok, 10, seed=3), other)
    gen_ns, n_sources = generations(root)
    # What a writer killed before its rename leaves: a complete-looking temporary directory.
    shard = next(p for p in sorted(os.listdir(st["namespace"])) if p.startswith("shard-"))
    partial = os.path.join(st["namespace"], ".tmp-shard-killed")
    shutil.copytree(os.path.join(st["namespace"], shard), partial)

    entries = by_path(ca.scan())
    ns = entries[st["namespace"]]
    assert (ns.kind, ns.teacher, ns.shards) == ("teacher outputs", "tiny-bert-0", 2)
    assert ns.examples == len(set(example_keys(data(tok, 30))))
    assert ns.size == du(st["namespace"]) - du(partial)  # its partial is listed on its own
    assert entries[partial].kind == "partial" and entries[partial].size == du(partial)
    unknown = entries[st3["namespace"]]
    assert unknown.teacher == f"weights {teacher_fingerprint(other)[:12]}"
    assert unknown.examples == len(set(example_keys(data(tok, 10, seed=3))))
    gen = entries[gen_ns]
    assert (gen.kind, gen.examples, gen.shards, gen.size) == ("generations", n_sources, 1,
                                                              du(gen_ns))
    t = entries[teacher]
    assert (t.kind, t.teacher, t.size) == ("fine-tuned teacher", "from org/tiny-bert", du(teacher))
    assert len(entries) == 5
    totals = ca.totals(entries.values())
    assert totals["bytes"] == du(root) and totals["partials"] == 1
    assert totals["examples"] == ns.examples + unknown.examples + n_sources

    # The text and JSON forms say the same.
    now = time.time()
    text = ca.format_table(list(entries.values()), [str(root)], now)
    line = next(x for x in text.splitlines() if x.endswith(os.path.relpath(st["namespace"], root)))
    assert "tiny-bert-0" in line and f" {ns.examples} " in line and ca.format_size(ns.size) in line
    assert text.splitlines()[-1].startswith(f"total: 5 entries, {ca.format_size(du(root))}")


def test_listing_does_not_make_anything_look_used(root, tok):
    teacher = saved_teacher(root, tok)
    _, st = attach(data(tok), teacher)
    age(str(root), 10 * DAY)
    # The metadata files list reads do not count as use; every other file's access time must
    # stay as it was.
    before = {os.path.join(d, f): os.stat(os.path.join(d, f)).st_atime_ns
              for d, _, fs in os.walk(root) for f in fs if f not in ca.META_FILES}
    assert any(p.endswith(SHARD_FILE) for p in before)
    assert any(p.endswith("model.safetensors") for p in before)
    entries = by_path(ca.scan())
    assert entries[st["namespace"]].teacher == "tiny-bert-0"  # the teacher was hashed...
    after = {p: os.stat(p).st_atime_ns for p in before}
    assert after == before  # ... and its access times put back
    assert all(time.time() - e.last_used > 9 * DAY for e in entries.values())


def test_a_cache_hit_counts_as_use(root, tok):
    teacher = saved_teacher(root, tok)
    _, a = attach(data(tok), teacher)
    _, b = attach(data(tok, 12, seed=7), tiny_bert(seed=2))
    age(str(root), 10 * DAY)
    _, again = attach(data(tok), teacher)  # all hits: reads the shard, writes nothing
    assert again["computed"] == 0
    entries = by_path(ca.scan())
    assert time.time() - entries[a["namespace"]].last_used < 3600
    assert time.time() - entries[b["namespace"]].last_used > 9 * DAY
    out = ca.prune(older_than=7 * DAY)
    assert {e.path for e, _ in out["removed"]} == {b["namespace"]}


def test_prune_by_age(root, tok):
    teacher, old_teacher = saved_teacher(root, tok), tiny_bert(seed=6)
    _, old = attach(data(tok), old_teacher)
    _, new = attach(data(tok, 12, seed=4), teacher)
    _, busy = attach(data(tok, 8, seed=5), tiny_bert(seed=3))
    # A writer at work in the oldest namespace (a fresh temporary dir), and one killed two
    # hours ago in another.
    writing = os.path.join(busy["namespace"], ".tmp-shard-writing")
    os.makedirs(writing)
    stale = os.path.join(new["namespace"], ".tmp-shard-killed")
    shutil.copytree(os.path.join(new["namespace"], next(
        n for n in os.listdir(new["namespace"]) if n.startswith("shard-"))), stale)
    now = time.time()
    age(old["namespace"], 10 * DAY, now)
    age(new["namespace"], 3 * DAY, now)
    age(busy["namespace"], 20 * DAY, now)
    age(teacher, 2 * DAY, now)
    age(writing, 60, now)
    age(stale, 2 * 3600, now)
    assert by_path(ca.scan(now=now))[busy["namespace"]].busy
    sizes = {e.path: e.size for e in ca.scan()}

    plan = ca.prune(older_than=7 * DAY, dry_run=True, now=now)
    assert [e.path for e, _ in plan["removed"]] == [stale, old["namespace"]]
    assert os.path.isdir(old["namespace"]) and os.path.isdir(stale)  # dry run: nothing gone
    out = ca.prune(older_than=7 * DAY, now=now)
    assert [e.path for e, _ in out["removed"]] == [stale, old["namespace"]]
    assert out["freed"] == sizes[stale] + sizes[old["namespace"]]
    assert not os.path.exists(old["namespace"]) and not os.path.exists(stale)
    assert os.path.isdir(busy["namespace"]) and os.path.isdir(teacher)
    assert not any(n.startswith(ca.TRASH_PREFIX) for n in os.listdir(os.path.dirname(stale)))
    # What is left is read back whole; what went is recomputed, to the same values.
    _, st = attach(data(tok, 12, seed=4), teacher)
    assert st["hits"] == st["examples"]
    _, st = attach(data(tok), old_teacher)
    assert st["hits"] == 0 and st["namespace"] == old["namespace"]


def test_prune_by_size_removes_the_oldest_first(root, tok):
    teacher = saved_teacher(root, tok)
    made = [attach(data(tok, 8 + 4 * i, seed=10 + i), tiny_bert(seed=10 + i))[1]["namespace"]
            for i in range(3)]
    now = time.time()
    for i, ns in enumerate(made):  # made[0] is the oldest
        age(ns, (5 - i) * DAY, now)
    age(teacher, 1 * DAY, now)
    sizes = {e.path: e.size for e in ca.scan()}
    total = sum(sizes.values())
    out = ca.prune(max_size=total - sizes[made[0]], now=now)
    assert [e.path for e, _ in out["removed"]] == [made[0]]
    assert out["freed"] == sizes[made[0]] and out["left"] == total - sizes[made[0]] == du(root)
    out = ca.prune(max_size=sizes[teacher] + sizes[made[2]] - 1, now=now)
    assert [e.path for e, _ in out["removed"]] == [made[1], made[2]]
    assert du(root) == sizes[teacher] < sizes[teacher] + sizes[made[2]] - 1
    assert [e.path for e in ca.scan()] == [teacher]


def test_repeated_augmented_runs_grow_one_namespace_and_max_size_bounds_it(root, tok):
    """Augmented examples join the teacher's namespace (a shard per run with new settings),
    so it is --max-size that keeps repeated augmented runs bounded."""
    from datasets import Dataset

    from distilkit.augment import AugmentConfig, augment_texts

    teacher = saved_teacher(root, tok)
    texts = tiny_dataset(16)["text"]
    runs = []
    for seed in (0, 1, 2):
        new = augment_texts(texts, AugmentConfig(n_iter=2, seed=seed), tagger="lexicon")
        ds = Dataset.from_dict({"text": list(texts) + new, "label": [0] * (len(texts) + len(new))})
        runs.append(attach(tokenized(ds, tok), teacher)[1])
    namespaces = [e for e in ca.scan() if e.kind in ca.NAMESPACE_KINDS]
    assert len(namespaces) == 1 and namespaces[0].shards == 3
    assert {r["namespace"] for r in runs} == {namespaces[0].path}
    assert runs[1]["hits"] >= len(set(texts)) and runs[1]["computed"] > 0
    # Still in use, so --older-than keeps it; --max-size removes it (teacher used later).
    assert ca.prune(older_than=DAY)["removed"] == []
    os.utime(os.path.join(teacher, "model.safetensors"))
    out = ca.prune(max_size=ca.totals(ca.scan())["bytes"] - 1)
    assert [e.path for e, _ in out["removed"]] == [namespaces[0].path]


def test_removal_is_safe_for_a_reader_and_an_interrupted_one_is_finished_later(root, tok,
                                                                                monkeypatch):
    teacher = saved_teacher(root, tok)
    want, st = attach(data(tok), teacher)
    ns = st["namespace"]
    cache = TeacherCache()
    shard = cache._shards(ns)[0]
    with open(os.path.join(shard, SHARD_FILE), "rb") as reading:  # a reader mid-way
        age(ns, 10 * DAY)
        # The deletion dies after the rename (the process killed mid-rmtree).
        with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
            m.setattr(ca.shutil, "rmtree", lambda p: (_ for _ in ()).throw(
                KeyboardInterrupt("killed while deleting")))
            ca.prune(older_than=7 * DAY)
        assert len(reading.read()) == os.fstat(reading.fileno()).st_size  # still readable
    assert not os.path.exists(ns)  # gone from readers at once, whole
    trash = [e for e in ca.scan() if e.kind == "partial"]
    assert len(trash) == 1 and os.path.basename(trash[0].path).startswith(ca.TRASH_PREFIX)
    # A lookup after the rename finds nothing and recomputes the same outputs.
    again, st = attach(data(tok), teacher)
    assert st["computed"] == st["examples"]
    np.testing.assert_allclose(np.array(again["teacher_logits"]), np.array(want["teacher_logits"]),
                               atol=1e-6)
    # An hour after the reader, the leftover goes (the namespace rebuilt above stays).
    out = ca.prune(now=time.time() + 2 * 3600)
    assert [e.path for e, _ in out["removed"]] == [trash[0].path]
    assert not os.path.exists(trash[0].path) and os.path.isdir(ns)


def test_clear_refuses_without_yes_and_keeps_what_is_not_distilkits(root, tok):
    from distilkit.seq2seq.tokenizer import TokenizerSettings, cached_tokenizer

    teacher = saved_teacher(root, tok)
    attach(data(tok), teacher)
    _, tok_dir = cached_tokenizer(["the film is good", "a dull plot"],
                                  TokenizerSettings(vocab_size=300, min_frequency=1))
    os.makedirs(root / "data")
    (root / "data" / "corpus.txt").write_text("built-in data")
    (root / "notes.txt").write_text("mine")
    os.makedirs(root / "mine" / ".tmp-keep")
    entries = by_path(ca.scan())
    assert entries[tok_dir].kind == "tokenizer"
    assert entries[str(root / "data")].kind == "downloaded data"
    assert not any("mine" in p or "notes" in p for p in entries)
    # prune never takes the downloaded data, however small the limit
    kept = ca.prune(max_size=0)
    assert os.path.isdir(root / "data") and not os.path.exists(teacher)
    assert str(root / "data") not in {e.path for e, _ in kept["removed"]}
    attach(data(tok), saved_teacher(root, tok))
    with pytest.raises(ValueError, match=r"--yes: not given.*add --yes"):
        ca.clear()
    assert len(ca.scan()) == 3
    out = ca.clear(yes=True)
    assert len(out["removed"]) == 3 and ca.scan() == []
    assert (root / "notes.txt").read_text() == "mine" and os.path.isdir(root / "mine" / ".tmp-keep")


def test_cli_list_prune_clear(root, tok, capsys):
    teacher = saved_teacher(root, tok)
    _, st = attach(data(tok), teacher)
    other = str(root.parent / "recipe_cache")  # a recipe's cache_dir: namespaces directly in it
    _, st2 = attach(data(tok, 10, seed=2), teacher, cache_dir=other)
    capsys.readouterr()
    assert main(["cache", "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"cache: {root}" and out[1].split()[:2] == ["KIND", "TEACHER"]
    assert len(out) == 5 and out[-1].startswith("total: 2 entries")
    assert main(["cache", "list", "--json", "--cache-dir", other, "--cache-dir", str(root)]) == 0
    listed = json.loads(capsys.readouterr().out)
    kinds = {e["path"]: (e["kind"], e["teacher"], e["examples"]) for e in listed["entries"]}
    assert kinds[st2["namespace"]] == ("teacher outputs", "tiny-bert-0",
                                       len(set(example_keys(data(tok, 10, seed=2)))))
    assert listed["totals"]["entries"] == 3 and listed["totals"]["bytes"] == du(root) + du(other)

    age(st["namespace"], 9 * DAY)
    assert main(["cache", "prune", "--older-than", "1w", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"would remove teacher outputs {st['namespace']}")
    assert lines[-1].startswith("would free") and os.path.isdir(st["namespace"])
    assert main(["cache", "prune", "--older-than", "7d", "--max-size", "10GB"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("removed teacher outputs") and not os.path.exists(st["namespace"])
    assert lines[-1].startswith("freed ")

    assert main(["cache", "clear", "--cache-dir", other]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("distilkit cache: error: --yes: not given") and "\n" not in err
    assert os.path.isdir(st2["namespace"])
    assert main(["cache", "clear", "--cache-dir", other, "--yes"]) == 0
    assert capsys.readouterr().out.startswith("removed 1 entries")
    assert not os.path.exists(st2["namespace"]) and os.path.isdir(teacher)

    os.makedirs(root / "data")
    (root / "data" / "corpus.txt").write_text("built-in data")
    assert main(["cache", "prune", "--max-size", "0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("removed fine-tuned teacher") and not os.path.exists(teacher)
    assert lines[-1].startswith("still above --max-size 0 B: what is left is downloaded data")


@pytest.mark.parametrize("argv, flag, value, fix", [
    (["prune", "--older-than", "7x"], "--older-than", "'7x'", "e.g. 7d"),
    (["prune", "--older-than=-1d"], "--older-than", "'-1d'", "e.g. 7d"),
    (["prune", "--max-size", "lots"], "--max-size", "'lots'", "e.g. 2GB"),
    (["list", "--cache-dir", "FILE"], "--cache-dir", "is a file", "give the cache's directory"),
    (["prune", "--cache-dir", "FILE"], "--cache-dir", "is a file", "give the cache's directory"),
])
def test_cli_bad_values_are_one_line(root, tmp_path, capsys, argv, flag, value, fix):
    f = tmp_path / "a_file"
    f.write_text("not a cache")
    argv = [str(f) if a == "FILE" else a for a in argv]
    assert main(["cache", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"distilkit cache: error: {flag}: ")
    assert value in err and fix in err and f.read_text() == "not a cache"


@pytest.mark.parametrize("text, seconds", [("7d", 7 * DAY), ("12h", 43200), ("30m", 1800),
                                           ("90s", 90), ("2w", 14 * DAY), ("1.5d", 1.5 * DAY),
                                           (" 0D ", 0)])
def test_parse_duration(text, seconds):
    assert ca.parse_duration(text) == seconds


@pytest.mark.parametrize("text, size", [("2GB", 2 * 10 ** 9), ("500MB", 5 * 10 ** 8),
                                        ("2GiB", 2 << 30), ("2G", 2 << 30), ("1.5k", 1536),
                                        ("4096", 4096), ("10 kb", 10 ** 4), ("0", 0)])
def test_parse_size(text, size):
    assert ca.parse_size(text) == size


@pytest.mark.parametrize("bad", ["7", "7x", "d", "", "7 days", "1e3s"])
def test_parse_duration_refuses(bad):
    with pytest.raises(ValueError, match=r"--older-than: .* e\.g\. 7d"):
        ca.parse_duration(bad)


@pytest.mark.parametrize("bad", ["lots", "2XB", "GB", "-5MB", "1,000"])
def test_parse_size_refuses(bad):
    with pytest.raises(ValueError, match=r"--max-size: .* e\.g\. 2GB"):
        ca.parse_size(bad)


@pytest.mark.parametrize("n, text", [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"),
                                     (87 * 2 ** 20 + 2 ** 19, "87.5 MiB"), (3 << 40, "3.0 TiB")])
def test_format_size(n, text):
    assert ca.format_size(n) == text


@pytest.mark.parametrize("s, text", [(5, "just now"), (300, "5m"), (3 * 3600 + 1200, "3h 20m"),
                                     (7200, "2h"), (4 * DAY + 7200, "4d 2h"), (2 * DAY, "2d")])
def test_format_age(s, text):
    assert ca.format_age(s) == text


def test_the_file_names_are_the_writers():
    """cache_admin names the layout's files without importing the writers (the CLI builds
    every subcommand's parser at start, so it must stay light): they must agree."""
    from distilkit import shard_store, teachers

    assert (ca.NAMESPACE_FILE, ca.MANIFEST) == (shard_store.NAMESPACE_FILE, shard_store.MANIFEST)
    assert ca.TEACHER_INFO == teachers.INFO_FILE
