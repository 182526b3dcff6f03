"""The generic checksummed shard store: fixed and ragged arrays of any dtype, hits and misses,
damaged shards, killed writes, permissions and housekeeping."""
import json
import os
import stat

import numpy as np
import pytest

from distilkit.shard_store import MANIFEST, NAMESPACE_FILE, SHARD_FILE, ShardStore

FP = {"model": "abc", "settings": {"beams": 2}}


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


@pytest.fixture
def store(tmp_path):
    return ShardStore(str(tmp_path / "store"), version=1, label="test store")


def shards(store, fp=FP):
    ns = store.namespace_dir(fp)
    return sorted(os.path.join(ns, n) for n in os.listdir(ns) if n.startswith("shard-"))


def test_fixed_and_ragged_arrays_round_trip_with_their_dtypes(store):
    logits = np.arange(6, dtype=np.float32).reshape(3, 2)
    ids = [np.array([5, 6, 1], np.int32), np.array([1], np.int32), np.zeros(0, np.int32)]
    text = [np.frombuffer(t.encode(), np.uint8) for t in ("héllo", "", "a b")]
    store.store(FP, [key(0), key(1), key(2)], {"logits": logits, "ids": ids, "text": text})

    got, found = store.lookup(FP, [key(2), key(9), key(0), key(2)], ["logits", "ids", "text"])
    assert found.tolist() == [True, False, True, True]
    assert got["logits"].dtype == np.float32
    np.testing.assert_array_equal(got["logits"], [[4, 5], [0, 0], [0, 1], [4, 5]])
    assert [None if a is None else a.tolist() for a in got["ids"]] == [[], None, [5, 6, 1], []]
    assert got["ids"][0].dtype == np.int32
    assert bytes(got["text"][2]).decode() == "héllo" and got["text"][1] is None

    manifest = json.load(open(os.path.join(shards(store)[0], MANIFEST)))
    assert manifest["rows"] == 3
    assert manifest["arrays"]["ids"] == {"dtype": "int32", "shape": [4], "ragged": True}
    assert manifest["files"][SHARD_FILE]["bytes"] == os.path.getsize(
        os.path.join(shards(store)[0], SHARD_FILE))
    ns_info = json.load(open(os.path.join(store.namespace_dir(FP), NAMESPACE_FILE)))
    assert ns_info == {"format": 1, **FP}


def test_namespaces_follow_the_fingerprint_and_the_version(store, tmp_path):
    store.store(FP, [key(0)], {"x": np.ones((1, 2), np.float32)})
    assert store.lookup({**FP, "model": "other"}, [key(0)], ["x"])[1].tolist() == [False]
    v2 = ShardStore(store.root, version=2)
    assert v2.namespace_dir(FP) != store.namespace_dir(FP)
    assert not v2.lookup(FP, [key(0)], ["x"])[1].any()
    # A shard lacking a requested array does not count.
    assert not store.lookup(FP, [key(0)], ["x", "y"])[1].any()


def test_later_shards_add_keys_and_the_oldest_value_wins(store):
    store.store(FP, [key(0), key(1)], {"x": np.array([[1.0], [2.0]], np.float32)})
    store.store(FP, [key(1), key(2)], {"x": np.array([[20.0], [30.0]], np.float32)})
    got, found = store.lookup(FP, [key(0), key(1), key(2)], ["x"])
    assert found.all() and got["x"].ravel().tolist() == [1.0, 2.0, 30.0]


@pytest.mark.parametrize("damage", ["flip", "truncate", "manifest", "offsets"])
def test_a_damaged_shard_is_discarded_with_a_warning(store, damage):
    good = store.store(FP, [key(0), key(1)], {"x": np.ones((2, 3), np.float32),
                                              "ids": [np.array([1, 2], np.int32),
                                                      np.array([3], np.int32)]})
    f, m = os.path.join(good, SHARD_FILE), os.path.join(good, MANIFEST)
    raw = bytearray(open(f, "rb").read())
    if damage == "flip":
        raw[-3] ^= 0xFF
        open(f, "wb").write(raw)
    elif damage == "truncate":
        open(f, "wb").write(raw[: len(raw) // 2])
    elif damage == "manifest":
        open(m, "w").write("{not json")
    else:  # consistent checksums, but the manifest's rows disagree with the offsets
        man = json.load(open(m))
        man["rows"] = 3
        json.dump(man, open(m, "w"))
    with pytest.warns(RuntimeWarning, match="test store: discarding damaged shard"):
        got, found = store.lookup(FP, [key(0), key(1)], ["x", "ids"])
    assert not found.any() and got == {} and not os.path.exists(good)


def test_a_killed_write_leaves_no_shard_and_no_temp_dir(store, monkeypatch):
    import safetensors.numpy

    def dies_midway(tensors, path, *a, **k):
        open(path, "wb").write(b"partial")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(safetensors.numpy, "save_file", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        store.store(FP, [key(0)], {"x": np.ones((1, 1), np.float32)})
    ns = store.namespace_dir(FP)
    assert [n for n in os.listdir(ns) if n.startswith(("shard-", ".tmp-"))] == []


@pytest.mark.parametrize("umask,dir_mode,file_mode", [(0o002, 0o775, 0o664), (0o077, 0o700, 0o600)])
def test_permissions_follow_the_umask(store, umask, dir_mode, file_mode):
    old = os.umask(umask)
    try:
        shard = store.store(FP, [key(0)], {"x": np.ones((1, 1), np.float32)})
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(shard).st_mode) == dir_mode
    for name in (SHARD_FILE, MANIFEST):
        assert stat.S_IMODE(os.stat(os.path.join(shard, name)).st_mode) == file_mode
    info = os.path.join(store.namespace_dir(FP), NAMESPACE_FILE)
    assert stat.S_IMODE(os.stat(info).st_mode) == file_mode


def test_remove_partial_and_size_bytes(store):
    shard = store.store(FP, [key(0)], {"x": np.ones((1, 4), np.float32)})
    ns = store.namespace_dir(FP)
    stale, fresh = os.path.join(ns, ".tmp-stale"), os.path.join(ns, ".tmp-fresh")
    os.makedirs(stale)
    os.makedirs(fresh)
    os.utime(stale, (0, 0))
    assert store.remove_partial() == 1 and not os.path.exists(stale) and os.path.exists(fresh)
    expected = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(store.root)
                   for f in fs)
    assert store.size_bytes() == expected > os.path.getsize(os.path.join(shard, SHARD_FILE))


@pytest.mark.parametrize("keys,arrays,match", [
    ([key(0), key(1)], {"x": np.ones((3, 2))}, "needs 2 rows"),
    ([key(0), b"short"], {"x": np.ones((2, 2))}, "all of one length"),
    ([], {"x": np.ones((0, 2))}, "at least one"),
    ([key(0)], {"keys": np.ones((1, 2))}, "reserved"),
    ([key(0), key(1)], {"ids": [np.ones(2, np.int32), np.ones(1, np.int64)]}, "mixes dtypes"),
    ([key(0), key(1)], {"ids": [np.ones(2, np.int32)]}, "has 1 rows; it needs 2"),
])
def test_bad_writes_are_refused_before_anything_is_written(store, keys, arrays, match):
    with pytest.raises(ValueError, match=match):
        store.store(FP, keys, arrays)
    assert not os.path.exists(store.root)


def test_check_writable_names_the_field_and_the_store(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    s = ShardStore(str(blocker / "sub"), version=1, label="test store")
    with pytest.raises(PermissionError, match=r"gen_dir: .*not writable.*test store.*set gen_dir"):
        s.check_writable("gen_dir")
    ShardStore(str(tmp_path / "ok"), version=1).check_writable()
    assert os.listdir(tmp_path / "ok") == []
