"""``streaming: true`` with ``teacher_cache``: each batch's teacher outputs are read from the
teacher cache or computed and cached (the first run fills it, the next is all hits and never
loads the teacher); ``shuffle_buffer`` shuffles the stream, seeded."""
import glob
import os

import numpy as np
import pytest
import torch

from conftest import ForbiddenTeacher, tiny_sentences
from test_streaming import _distill_in_two_processes, _losses, _recipe, _student, _write_csv, stream_task  # noqa: F401

from distilkit.cli import main
from distilkit.data import DataSpec, train_stream
from distilkit.teacher_cache import COLUMN, StreamTeacherOutputs, attach_teacher_outputs


def _cached(task, name, **kw):
    return _recipe(task, name, **{"teacher_cache": True, "cache_dir": str(task["tmp"] / "cache"),
                                  **kw})


def _forbid_teacher(monkeypatch):
    """Any teacher the run loads fails the test when it is run."""
    import distilkit.teachers as teachers_mod

    load = teachers_mod.load_teacher

    def forbidden(spec, **kw):
        return ForbiddenTeacher(load(spec, **kw).config, "every row's outputs are cached")
    monkeypatch.setattr(teachers_mod, "load_teacher", forbidden)


def test_a_second_streamed_run_is_all_hits_and_trains_without_the_teacher(stream_task,
                                                                          monkeypatch):
    """The first run computes every row's logits and caches them; the second reads them all
    and trains the same student with the same losses, its teacher never loaded (a loaded
    teacher would fail the test when run); both agree with a run whose teacher is live."""
    path, cold = _cached(stream_task, "cold")
    assert main(["distill", path, "--no-progress"]) == 0
    res, cold_losses = _losses(cold)
    got = res["streaming"]["teacher_cache"]
    # 6 steps of 8 rows, plus the batch accelerate's data loader reads ahead of the last step.
    assert got["hits"] == 0 and got["computed"] == 56 and got["teacher_loaded"]
    shards = glob.glob(os.path.join(got["namespace"], "shard-*"))
    assert len(shards) == 1

    _forbid_teacher(monkeypatch)
    path, warm = _cached(stream_task, "warm")
    assert main(["distill", path, "--no-progress"]) == 0
    res2, warm_losses = _losses(warm)
    assert res2["streaming"]["teacher_cache"] == {**got, "hits": got["computed"], "computed": 0,
                                                  "teacher_loaded": False}
    assert res2["teacher_loaded"] is False
    assert warm_losses == cold_losses
    assert torch.equal(_student(cold), _student(warm))
    assert glob.glob(os.path.join(got["namespace"], "shard-*")) == shards  # nothing new
    monkeypatch.undo()

    path, live = _recipe(stream_task, "live")
    assert main(["distill", path, "--no-progress"]) == 0
    res3, live_losses = _losses(live)
    assert "teacher_cache" not in res3["streaming"] and res3["teacher_loaded"]
    assert live_losses == pytest.approx(cold_losses, rel=1e-5)


def _stream_rows(task, n=None):
    """Tokenized rows of the stream task's transfer set, as the collator gets them."""
    from transformers import AutoTokenizer

    spec = DataSpec(dataset=None, data_files=task["data_files"], label_column=None,
                    streaming=True)
    tok = AutoTokenizer.from_pretrained(task["teacher"])
    rows = [tok(r["text"], truncation=True, max_length=16) for r in train_stream(spec)]
    return [dict(r) for r in rows[:n]]


def test_stream_outputs_are_the_teachers_and_shared_with_a_loaded_split(stream_task):
    """Computed outputs equal the teacher's own, row by row; a loaded split's cache (same
    rows, keys and namespace) serves a stream without computing anything, and the other way
    round."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification

    rows = _stream_rows(stream_task)
    teacher = AutoModelForSequenceClassification.from_pretrained(stream_task["teacher"]).eval()
    with torch.no_grad():
        want = torch.cat([teacher(**{k: torch.tensor([v]) for k, v in r.items()}).logits
                          for r in rows]).numpy()
    cache = str(stream_task["tmp"] / "c1")
    src = StreamTeacherOutputs(stream_task["teacher"], max_length=16, cache_dir=cache)
    got = np.concatenate([src.outputs_for(rows[i:i + 8])["logits"] for i in range(0, 64, 8)])
    assert src.computed == 64 and src.hits == 0 and src.teacher_loaded
    np.testing.assert_allclose(got, want, atol=1e-5)
    src.flush()
    # A loaded split of the same rows: all hits, the same values.
    ds = Dataset.from_list(rows)
    stats = {}
    out = attach_teacher_outputs(ds, stream_task["teacher"], max_length=16, cache_dir=cache,
                                 progress=False, stats=stats)
    assert stats["hits"] == 64 and not stats["teacher_loaded"]
    np.testing.assert_array_equal(np.asarray(out[COLUMN["logits"]]), got)
    # ... and a loaded split's cache serves a stream.
    other = str(stream_task["tmp"] / "c2")
    loaded = attach_teacher_outputs(ds, stream_task["teacher"], max_length=16, cache_dir=other,
                                    progress=False)
    src2 = StreamTeacherOutputs(stream_task["teacher"], max_length=16, cache_dir=other,
                                teacher_loader=lambda p: pytest.fail("the teacher was loaded"))
    served = src2.outputs_for(rows)["logits"]
    # The values the split stored, exactly; against the stream's own (computed in other
    # batches, so padded to other lengths) only within rounding: some CPUs' kernels round a
    # padded batch differently in the last bits.
    np.testing.assert_array_equal(served, np.asarray(loaded[COLUMN["logits"]]))
    np.testing.assert_allclose(served, got, atol=1e-5)
    assert (src2.hits, src2.computed) == (64, 0) and src2.flush() is None


def test_a_damaged_shard_is_recomputed(stream_task):
    """A shard whose file no longer matches its checksum is discarded with a warning, when
    the index is read or when a row needs it again later, and its rows are computed again,
    to the same values."""
    rows = _stream_rows(stream_task, 32)
    cache = str(stream_task["tmp"] / "c")
    kw = dict(max_length=16, cache_dir=cache, flush_rows=8)
    src = StreamTeacherOutputs(stream_task["teacher"], **kw)
    want = np.concatenate([src.outputs_for(rows[i:i + 8])["logits"] for i in range(0, 32, 8)])
    shards = sorted(glob.glob(os.path.join(src.namespace, "shard-*")))
    assert len(shards) == 4  # one per 8 rows

    def damage(shard):
        with open(os.path.join(shard, "outputs.safetensors"), "r+b") as f:
            f.seek(-4, os.SEEK_END)
            f.write(b"\x00\x01\x02\x03")
    damage(shards[0])
    with pytest.warns(RuntimeWarning, match="discarding damaged shard"):
        src = StreamTeacherOutputs(stream_task["teacher"], **kw)
    np.testing.assert_allclose(src.outputs_for(rows[:8])["logits"], want[:8], atol=1e-6)
    assert (src.hits, src.computed) == (0, 8)
    np.testing.assert_array_equal(src.outputs_for(rows[8:16])["logits"], want[8:16])
    assert (src.hits, src.computed) == (8, 8)
    # Damaged after the index was read, while not kept in memory (keep_shards=1).
    src = StreamTeacherOutputs(stream_task["teacher"], keep_shards=1, **kw)
    damage(shards[2])
    with pytest.warns(RuntimeWarning, match="discarding damaged shard"):
        got = src.outputs_for(rows[16:24])["logits"]
    np.testing.assert_allclose(got, want[16:24], atol=1e-6)
    assert (src.hits, src.computed) == (0, 8)
    src.flush()
    # the recomputed rows are cached again: a fresh reader finds all 32
    src = StreamTeacherOutputs(stream_task["teacher"], teacher_loader=lambda p: pytest.fail(
        "the teacher was loaded"), **kw)
    np.testing.assert_allclose(src.outputs_for(rows)["logits"], want, atol=1e-6)
    assert src.hits == 32


def test_the_shuffle_buffer_orders_the_stream_by_seed(tmp_path):
    rows = [(f"film number {i}", "pos" if i % 2 else "neg") for i in range(60)]
    files = {"train": _write_csv(tmp_path / "train.csv", rows),
             "validation": _write_csv(tmp_path / "v.csv", [("good", "pos"), ("bad", "neg")])}

    def texts(seed, **kw):
        spec = DataSpec(dataset=None, data_files=files, test_split=None, streaming=True, **kw)
        return [r["text"] for r in train_stream(spec, ["neg", "pos"], seed=seed)]
    plain = texts(0)
    assert plain == [t for t, _ in rows]
    a, again, b = texts(0, shuffle_buffer=16), texts(0, shuffle_buffer=16), texts(1, shuffle_buffer=16)
    assert a == again and a != plain and b != a
    assert sorted(a) == sorted(b) == sorted(plain)
    # A buffer of 16 rows: no row moves more than 16 + its place forward.
    assert all(a.index(t) >= i - 16 for i, t in enumerate(plain))
    # max_train_samples keeps the file's first rows, then shuffles them.
    few = texts(0, shuffle_buffer=16, max_train_samples=10)
    assert sorted(few) == sorted(plain[:10]) and few != plain[:10]


@pytest.mark.parametrize("kw, message", [
    ({"shuffle_buffer": -5}, "shuffle_buffer: -5 is not a whole number >= 0"),
    ({"shuffle_buffer": "many"}, "shuffle_buffer: 'many' must be a whole number"),
    ({"shuffle_buffer": 1000, "streaming": False},
     "shuffle_buffer: 1000 shuffles a streamed training split, but streaming is false"),
    ({"teacher_cache": True, "dataloader_num_workers": 2},
     "dataloader_num_workers: 2, but with streaming: true and teacher_cache"),
])
def test_bad_stream_settings_are_refused_in_one_line(stream_task, capsys, kw, message):
    path, out = _recipe(stream_task, **kw)
    assert main(["distill", path, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not os.path.exists(out)
    with pytest.raises(ValueError, match="shuffle_buffer: True is not a whole number"):
        DataSpec(streaming=True, shuffle_buffer=True)


def test_two_processes_fill_the_cache_and_train_as_one_process_does(stream_task):
    """Two gloo processes of 4 rows each, shuffled through a buffer, teacher outputs cached:
    each process computes only the rows of its own batches (together the rows one process
    computes, written to one cache), and the losses and student equal one process's."""
    path, one = _cached(stream_task, "one", shuffle_buffer=32, per_device_train_batch_size=8,
                        cache_dir=str(stream_task["tmp"] / "cache1"))
    assert main(["distill", path, "--no-progress"]) == 0
    path, two = _cached(stream_task, "two", shuffle_buffer=32, per_device_train_batch_size=4,
                        cache_dir=str(stream_task["tmp"] / "cache2"))
    _distill_in_two_processes(path)
    res1, l1 = _losses(one)
    res2, l2 = _losses(two)
    assert res2["processes"] == 2 and res2["global_steps"] == 6
    c1, c2 = res1["streaming"]["teacher_cache"], res2["streaming"]["teacher_cache"]
    assert c1["hits"] == c2["hits"] == 0 and c2["computed"] == c1["computed"] == 56
    assert l2 == pytest.approx(l1, rel=1e-4)
    assert torch.allclose(_student(one), _student(two), atol=1e-4)

    def cached_keys(namespace):
        from safetensors.numpy import load_file
        return sorted(bytes(k) for s in glob.glob(os.path.join(namespace, "shard-*"))
                      for k in load_file(os.path.join(s, "outputs.safetensors"))["keys"])
    # one shard per process, no row computed twice
    assert len(glob.glob(os.path.join(c2["namespace"], "shard-*"))) == 2
    assert cached_keys(c2["namespace"]) == cached_keys(c1["namespace"])


def test_a_streamed_ensemble_in_another_label_order_is_cached_as_it_runs_live(stream_task,
                                                                              monkeypatch):
    """Two teachers whose classes are the data's in the other order ('pos' first): the
    cached outputs (the teachers' own, keyed by path) are put in the data's order per batch,
    for each member of the ensemble, so the cached run's losses are the live run's; the
    second cached run is all hits (both namespaces) and loads no teacher."""
    import shutil

    from conftest import tiny_bert
    from transformers import AutoConfig

    tmp = stream_task["tmp"]
    dirs = []
    for i, seed in enumerate((None, 3)):
        d = str(tmp / f"teacher{i}")
        shutil.copytree(stream_task["teacher"], d)
        if seed is not None:  # a second, different teacher with the same tokenizer
            t = tiny_bert(seed=seed, vocab=AutoConfig.from_pretrained(d).vocab_size, layers=4,
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
            t.classifier.weight.data *= 40
            t.save_pretrained(d)
        cfg = AutoConfig.from_pretrained(d)
        cfg.id2label, cfg.label2id = {0: "pos", 1: "neg"}, {"pos": 0, "neg": 1}
        cfg.save_pretrained(d)
        dirs.append(d)
    names = ("neg", "pos")
    files = dict(stream_task["data_files"])
    for split, seed in (("validation", 1), ("test", 2)):
        files[split] = _write_csv(tmp / f"{split}_named.csv",
                                  [(t, names[y]) for t, y in tiny_sentences(16, seed=seed)])
    common = dict(teacher=dirs, data_files=files, max_steps=4)
    path, live = _recipe(stream_task, "ens_live", **common)
    assert main(["distill", path, "--no-progress"]) == 0
    path, cold = _cached(stream_task, "ens_cold", **common)
    assert main(["distill", path, "--no-progress"]) == 0
    _, live_losses = _losses(live)
    res, cold_losses = _losses(cold)
    assert res["streaming"]["teacher_cache"]["computed"] == 2 * 40  # 5 batches, 2 teachers
    assert cold_losses == pytest.approx(live_losses, rel=1e-5)
    _forbid_teacher(monkeypatch)
    path, warm = _cached(stream_task, "ens_warm", **common)
    assert main(["distill", path, "--no-progress"]) == 0
    res, warm_losses = _losses(warm)
    assert res["streaming"]["teacher_cache"]["hits"] == 80 and not res["teacher_loaded"]
    assert warm_losses == cold_losses
