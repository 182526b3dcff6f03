"""Teacher-output cache: hit, miss, stale teacher/data, corruption, killed writes, and a
training run from a full cache that never constructs the teacher."""
import json
import os

import numpy as np
import pytest
import torch
from conftest import tiny_bert
from tiny_text import tiny_dataset, tiny_tokenizer, tokenized

from distilkit.teacher_cache import (MANIFEST, SHARD_FILE, TeacherCache, attach_ensemble_logits,
                                     attach_teacher_outputs, example_keys, teacher_fingerprint)


@pytest.fixture
def tok():
    return tiny_tokenizer()


@pytest.fixture
def data(tok):
    return tokenized(tiny_dataset(24), tok)


@pytest.fixture
def teacher_dir(tmp_path):
    d = tmp_path / "teacher"
    tiny_bert(seed=0).save_pretrained(d)
    return str(d)


class CountingLoader:
    """A teacher loader that records every construction."""

    def __init__(self):
        self.calls = 0

    def __call__(self, path):
        from transformers import BertForSequenceClassification

        self.calls += 1
        return BertForSequenceClassification.from_pretrained(path).eval()


def attach(data, teacher, cache, loader=None, **kw):
    stats = {}
    out = attach_teacher_outputs(data, teacher, max_length=32, cache_dir=str(cache),
                                 teacher_loader=loader, progress=False, stats=stats, **kw)
    return out, stats


def reference(teacher_dir, ds, hidden=False):
    """The teacher run on each example alone, unpadded."""
    from transformers import BertForSequenceClassification

    m = BertForSequenceClassification.from_pretrained(teacher_dir).eval()
    logits, cls = [], []
    with torch.no_grad():
        for ex in ds:
            out = m(input_ids=torch.tensor([ex["input_ids"]]), output_hidden_states=True)
            logits.append(out.logits[0].numpy())
            cls.append(torch.stack([h[0, 0] for h in out.hidden_states]).numpy())
    return np.stack(logits), np.stack(cls)


def shards(cache):
    return sorted(str(p) for p in cache.glob("*/shard-*"))


def test_miss_then_hit_matches_the_teacher(tmp_path, data, teacher_dir):
    cache, loader = tmp_path / "cache", CountingLoader()
    out, st = attach(data, teacher_dir, cache, loader)
    assert (st["hits"], st["computed"], st["teacher_loaded"], loader.calls) == (0, 24, True, 1)
    ref, _ = reference(teacher_dir, data)
    got = np.array(out["teacher_logits"], dtype=np.float32)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    assert out.column_names == data.column_names + ["teacher_logits"]

    out2, st2 = attach(data, teacher_dir, cache, loader)
    assert (st2["hits"], st2["computed"], st2["teacher_loaded"], loader.calls) == (24, 0, False, 1)
    np.testing.assert_array_equal(np.array(out2["teacher_logits"], dtype=np.float32), got)
    manifest = json.load(open(os.path.join(shards(cache)[0], MANIFEST)))
    assert manifest["rows"] == 24
    assert manifest["files"][SHARD_FILE]["bytes"] == os.path.getsize(
        os.path.join(shards(cache)[0], SHARD_FILE))


def test_cls_hidden_is_the_cls_vector_of_every_layer(tmp_path, data, teacher_dir):
    out, st = attach(data, teacher_dir, tmp_path / "c", CountingLoader(),
                     outputs=("logits", "cls_hidden"))
    _, ref = reference(teacher_dir, data)
    got = np.array(out["teacher_cls_hidden"], dtype=np.float32)
    assert got.shape == (24, 5, 32)  # 4 layers + embeddings, hidden 32
    np.testing.assert_allclose(got, ref, atol=1e-5)
    # A namespace per set of outputs: logits alone is a different entry.
    _, st2 = attach(data, teacher_dir, tmp_path / "c", CountingLoader())
    assert st2["computed"] == 24 and st2["namespace"] != st["namespace"]


def test_stale_teacher_is_never_used(tmp_path, data, teacher_dir):
    cache, loader = tmp_path / "cache", CountingLoader()
    first, _ = attach(data, teacher_dir, cache, loader)
    tiny_bert(seed=7).save_pretrained(teacher_dir)  # retrained in place: same path
    out, st = attach(data, teacher_dir, cache, loader)
    assert st["computed"] == 24 and loader.calls == 2
    ref, _ = reference(teacher_dir, data)
    np.testing.assert_allclose(np.array(out["teacher_logits"], dtype=np.float32), ref, atol=1e-5)
    assert not np.allclose(np.array(first["teacher_logits"]), ref)


def test_stale_data_recomputes_only_changed_examples(tmp_path, data, tok, teacher_dir):
    cache, loader = tmp_path / "cache", CountingLoader()
    attach(data, teacher_dir, cache, loader)
    # Same contents in another order and from another object: every example hits.
    shuffled = data.shuffle(seed=3).flatten_indices()
    _, st = attach(shuffled, teacher_dir, cache, loader)
    assert st["hits"] == 24 and loader.calls == 1
    # One example edited: only that one is computed.
    edited = data.map(lambda ex, i: {"input_ids": ex["input_ids"][:-2] + [7, 3]} if i == 5 else {},
                      with_indices=True)
    out, st = attach(edited, teacher_dir, cache, loader)
    assert (st["hits"], st["computed"], loader.calls) == (23, 1, 2)
    ref, _ = reference(teacher_dir, edited)
    np.testing.assert_allclose(np.array(out["teacher_logits"], dtype=np.float32), ref, atol=1e-5)
    # A transfer set (no labels) = the training examples plus new ones: only the new ones
    # are computed.
    from datasets import concatenate_datasets

    new = tokenized(tiny_dataset(10, seed=9), tok)
    transfer = concatenate_datasets([edited, new]).remove_columns("labels")
    fresh = set(example_keys(new)) - set(example_keys(edited))
    _, st = attach(transfer, teacher_dir, cache, loader)
    assert len(fresh) > 0 and (st["hits"], st["computed"]) == (34 - len(fresh), len(fresh))


@pytest.mark.parametrize("damage", ["flip", "truncate", "manifest"])
def test_corrupt_cache_is_detected_and_rebuilt(tmp_path, data, teacher_dir, damage):
    cache, loader = tmp_path / "cache", CountingLoader()
    good, _ = attach(data, teacher_dir, cache, loader)
    shard = shards(cache)[0]
    f = os.path.join(shard, SHARD_FILE)
    raw = bytearray(open(f, "rb").read())
    if damage == "flip":
        raw[-5] ^= 0xFF  # a float's bytes: same size, wrong checksum
        open(f, "wb").write(raw)
    elif damage == "truncate":
        open(f, "wb").write(raw[: len(raw) // 2])
    else:
        open(os.path.join(shard, MANIFEST), "w").write("{not json")
    with pytest.warns(RuntimeWarning, match="damaged shard"):
        out, st = attach(data, teacher_dir, cache, loader)
    assert st["computed"] == 24 and loader.calls == 2
    np.testing.assert_allclose(np.array(out["teacher_logits"]), np.array(good["teacher_logits"]),
                               atol=1e-6)
    assert shard not in shards(cache) and len(shards(cache)) == 1
    _, st = attach(data, teacher_dir, cache, loader)  # the rebuilt shard is valid
    assert st["hits"] == 24 and loader.calls == 2


def test_write_killed_by_an_exception_leaves_nothing_valid(tmp_path, data, teacher_dir, monkeypatch):
    import safetensors.numpy

    cache, loader = tmp_path / "cache", CountingLoader()

    def dies_midway(tensors, path, *a, **k):
        with open(path, "wb") as fh:
            fh.write(b"\x10\x00\x00\x00partial")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(safetensors.numpy, "save_file", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        attach(data, teacher_dir, cache, loader)
    monkeypatch.undo()
    assert shards(cache) == [] and list(cache.glob("*/.tmp-*")) == []
    _, st = attach(data, teacher_dir, cache, loader)
    assert st["computed"] == 24 and loader.calls == 2


def test_write_killed_by_a_signal_leaves_an_ignored_temp_dir(tmp_path, data, teacher_dir):
    cache, loader = tmp_path / "cache", CountingLoader()
    _, st = attach(data, teacher_dir, cache, loader)
    ns = st["namespace"]
    # What SIGKILL after the shard file but before the rename leaves: a complete-looking
    # temp dir. It must not count as cache.
    import shutil
    leftover = os.path.join(ns, ".tmp-killed")
    shutil.move(shards(cache)[0], leftover)
    _, st = attach(data, teacher_dir, cache, loader)
    assert st["computed"] == 24 and loader.calls == 2
    os.utime(leftover, (0, 0))
    assert TeacherCache(str(cache)).remove_partial() == 1 and not os.path.exists(leftover)


def test_unwritable_cache_fails_before_the_teacher_is_loaded(tmp_path, data, teacher_dir):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    loader = CountingLoader()
    with pytest.raises(PermissionError, match="cache_dir: .*not writable"):
        attach(data, teacher_dir, blocker / "cache", loader)
    assert loader.calls == 0


def test_in_memory_teacher_fingerprint_follows_the_weights(tmp_path, data):
    t = tiny_bert(seed=0)
    fp = teacher_fingerprint(t)
    assert teacher_fingerprint(tiny_bert(seed=0)) == fp
    with torch.no_grad():
        t.classifier.bias.add_(0.1)
    assert teacher_fingerprint(t) != fp
    out, st = attach(data, t, tmp_path / "c")
    assert st["computed"] == 24 and not st["teacher_loaded"]
    _, st = attach(data, t, tmp_path / "c")
    assert st["hits"] == 24


def test_teacher_dataset_must_align_and_keys_ignore_labels(tmp_path, data, teacher_dir):
    with pytest.raises(ValueError, match="row for row"):
        attach(data, teacher_dir, tmp_path / "c", teacher_dataset=data.select(range(5)))
    with pytest.raises(ValueError, match="outputs: .*logits"):
        attach(data, teacher_dir, tmp_path / "c", outputs=("attentions",))
    assert example_keys(data) == example_keys(data.map(lambda ex: {"labels": 1 - ex["labels"]}))


def test_training_from_a_full_cache_never_constructs_the_teacher(tmp_path, data, tok, teacher_dir):
    from transformers import AutoConfig

    from distilkit import DistilConfig, DistilTrainer
    from distilkit.collate import DistilCollator

    cache, loader = tmp_path / "cache", CountingLoader()
    attach(data, teacher_dir, cache, loader, outputs=("logits", "cls_hidden"))
    assert loader.calls == 1
    train, st = attach(data, teacher_dir, cache, loader, outputs=("logits", "cls_hidden"))
    assert st["teacher_loaded"] is False and loader.calls == 1
    args = DistilConfig(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=8,
                        learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True,
                        alpha_kd=0.5, alpha_ce=0.5, alpha_patient=1.0, layer_map="skip",
                        logging_steps=1, disable_tqdm=True)
    student = tiny_bert(seed=1, layers=2)
    before = student.classifier.weight.detach().clone()
    trainer = DistilTrainer(model=student, teacher_model=None, args=args, train_dataset=train,
                            teacher_config=AutoConfig.from_pretrained(teacher_dir),
                            data_collator=DistilCollator(tok), processing_class=tok)
    trainer.train()
    assert loader.calls == 1
    logged = [h for h in trainer.state.log_history if "loss_kd" in h]
    assert logged and all(k in logged[0] for k in ("loss_kd", "loss_ce", "loss_patient"))
    assert not torch.equal(before, student.classifier.weight)


def test_ensemble_logits_stack_each_teacher_and_hit_the_cache(tmp_path, data, teacher_dir):
    other = tmp_path / "teacher2"
    tiny_bert(seed=7).save_pretrained(other)
    cache, loader = tmp_path / "cache", CountingLoader()
    kw = dict(max_length=32, cache_dir=str(cache), teacher_loader=loader, progress=False)
    out = attach_ensemble_logits(data, [teacher_dir, str(other)], **kw)
    got = np.asarray(out["teacher_ensemble_logits"])
    assert got.shape == (len(data), 2, 2) and loader.calls == 2
    for k, d in enumerate((teacher_dir, str(other))):
        np.testing.assert_allclose(got[:, k], reference(d, data)[0], atol=1e-5)
    again = attach_ensemble_logits(data, [teacher_dir, str(other)], **kw)
    assert loader.calls == 2  # both members read from the cache
    np.testing.assert_array_equal(np.asarray(again["teacher_ensemble_logits"]), got)
    with pytest.raises(ValueError, match="at least 2 teachers"):
        attach_ensemble_logits(data, [teacher_dir], **kw)


# ------------------------------------------------------------------ the teacher's own device
def test_teacher_outputs_feed_the_teacher_on_its_own_device(data):
    """Every batch goes to the teacher's device (a wrapper that says it is on ``meta``
    refuses anything else) and comes back as host arrays."""
    from fake_device import FakeDeviceModel

    from distilkit.teacher_cache import _input_columns, compute_teacher_outputs

    teacher = FakeDeviceModel(tiny_bert(seed=0))
    out = compute_teacher_outputs(teacher, data, _input_columns(data), ("logits", "cls_hidden"),
                                  batch_size=10)
    assert teacher.calls == 3  # 24 examples, batches of 10
    assert out["logits"].shape == (24, 2) and out["cls_hidden"].shape == (24, 5, 32)
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in out.values())


# ------------------------------------------------------------------ logits the user already has
def test_attach_logits_adds_the_columns_the_trainer_reads(data):
    from distilkit.teacher_cache import attach_logits

    z = np.random.default_rng(0).normal(size=(24, 2)).astype(np.float32)
    for given in (z, torch.from_numpy(z), z.tolist()):
        out = attach_logits(data, given)
        assert out.column_names == data.column_names + ["teacher_logits"]
        np.testing.assert_array_equal(np.asarray(out["teacher_logits"], np.float32), z)
    ens = np.stack([z, -z], axis=1)
    out = attach_logits(data, torch.from_numpy(ens), ensemble=True)
    np.testing.assert_array_equal(np.asarray(out["teacher_ensemble_logits"], np.float32), ens)
    # Attaching again replaces the column.
    again = attach_logits(out, ens[:, ::-1].copy(), ensemble=True)
    assert again.column_names == out.column_names
    np.testing.assert_array_equal(np.asarray(again["teacher_ensemble_logits"]), ens[:, ::-1])


@pytest.mark.parametrize("logits,ensemble,match", [
    (np.zeros((23, 2)), False, r"logits: 23 rows .* 24 rows"),
    (np.zeros((24, 2, 2)), False, r"logits: shape \(24, 2, 2\) .*\(examples, classes\)"),
    (np.zeros((24, 2)), True, r"logits: shape \(24, 2\) .*\(examples, teachers, classes\)"),
    (np.zeros((24, 1, 2)), True, "at least 2 teachers"),
    (np.zeros((24, 0)), False, "no classes"),
    ([[0.0, 1.0]] * 23 + [[1.0]], False, "logits: .*same length"),
    ([["a", "b"]] * 24, False, "logits: .*numbers"),
])
def test_attach_logits_refuses_bad_shapes_and_values(data, logits, ensemble, match):
    from distilkit.teacher_cache import attach_logits

    with pytest.raises(ValueError, match=match):
        attach_logits(data, logits, ensemble=ensemble)


def test_attach_logits_names_the_first_non_finite_row(data):
    from distilkit.teacher_cache import attach_logits

    z = np.zeros((24, 2, 3), np.float32)
    z[17, 1, 2] = np.nan
    z[20, 0, 0] = np.inf
    with pytest.raises(ValueError, match=r"logits: row 17 .*nan"):
        attach_logits(data, z, ensemble=True)


def test_attach_logits_splits_of_a_dataset_dict(data):
    from datasets import DatasetDict

    from distilkit.teacher_cache import attach_logits

    dd = DatasetDict({"train": data, "validation": data.select(range(4))})
    out = attach_logits(dd, {"train": np.ones((24, 2)), "validation": np.zeros((4, 2))})
    assert np.asarray(out["validation"]["teacher_logits"]).shape == (4, 2)
    with pytest.raises(ValueError, match="logits: .*'validation'"):
        attach_logits(dd, {"train": np.ones((24, 2))})


@pytest.mark.parametrize("ensemble", [False, True])
def test_trainer_learns_from_attached_logits_without_a_teacher(tmp_path, data, tok, ensemble):
    from distilkit import DistilConfig, DistilTrainer
    from distilkit.collate import DistilCollator
    from distilkit.teacher_cache import attach_logits

    # Logits that say the opposite of the labels: the student can only learn them from KD.
    labels = np.asarray(data["labels"])
    z = np.where(labels[:, None] == np.arange(2)[None, :], -4.0, 4.0).astype(np.float32)
    train = attach_logits(data.remove_columns("labels"),
                          np.stack([z, z], 1) if ensemble else torch.from_numpy(z),
                          ensemble=ensemble)
    args = DistilConfig(output_dir=str(tmp_path / "run"), max_steps=60,
                        per_device_train_batch_size=8, learning_rate=3e-3, report_to=[],
                        save_strategy="no", use_cpu=True, alpha_kd=1.0, alpha_ce=0.0,
                        temperature=1.0, logging_steps=5, disable_tqdm=True)
    student = tiny_bert(seed=1, layers=2)
    trainer = DistilTrainer(model=student, teacher_model=None, args=args, train_dataset=train,
                            data_collator=DistilCollator(tok), processing_class=tok)
    trainer.train()
    logged = [h["loss_kd"] for h in trainer.state.log_history if "loss_kd" in h]
    assert logged and logged[-1] < logged[0]
    student.eval()
    with torch.no_grad():
        batch = DistilCollator(tok)([{k: ex[k] for k in ("input_ids", "attention_mask")}
                                     for ex in data])
        pred = student(**batch).logits.argmax(-1).numpy()
    assert (pred != labels).mean() > 0.9  # it follows the attached logits, not the labels
