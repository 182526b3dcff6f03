"""distilkit.files: atomic writes of a file and of a directory, SHA-256 of a file, and the
writability probe."""
import hashlib
import json
import os
import stat

import pytest

from distilkit.files import (atomic_dir, atomic_write_bytes, atomic_write_json, atomic_write_text,
                             check_writable, sha256_file)


def leftovers(d):
    return [n for n in os.listdir(d) if n.startswith(".tmp-")]


def test_atomic_writes_replace_the_file_whole(tmp_path):
    p = tmp_path / "sub" / "f.json"
    atomic_write_json(str(p), {"a": 1, "when": tmp_path})  # non-JSON values as str
    assert json.loads(p.read_text()) == {"a": 1, "when": str(tmp_path)}
    atomic_write_text(str(p), "héllo", fsync=True)
    assert p.read_text(encoding="utf-8") == "héllo"
    atomic_write_bytes(str(p), b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01" and leftovers(p.parent) == []


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    p = tmp_path / "f.txt"
    p.write_text("old")

    def dies(*a, **k):
        raise KeyboardInterrupt("killed before the rename")

    monkeypatch.setattr(os, "replace", dies)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(str(p), "new")
    monkeypatch.undo()
    assert p.read_text() == "old" and leftovers(tmp_path) == []


@pytest.mark.parametrize("umask,dir_mode,file_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
def test_modes_follow_the_umask(tmp_path, umask, dir_mode, file_mode):
    old = os.umask(umask)
    try:
        atomic_write_text(str(tmp_path / "f"), "x")
        atomic_dir(str(tmp_path / "d"), lambda d: None)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "f").st_mode) == file_mode
    assert stat.S_IMODE(os.stat(tmp_path / "d").st_mode) == dir_mode


def test_atomic_dir_replaces_the_old_directory_only_when_complete(tmp_path):
    out = tmp_path / "model"

    def fill(version):
        def f(d):
            open(os.path.join(d, "weights"), "w").write(version)
        return f

    atomic_dir(str(out), fill("v1"))
    atomic_dir(str(out), fill("v2"))
    assert os.listdir(out) == ["weights"] and (out / "weights").read_text() == "v2"

    def half_then_fail(d):
        open(os.path.join(d, "weights"), "w").write("v3-partial")
        raise RuntimeError("training crashed")

    with pytest.raises(RuntimeError, match="crashed"):
        atomic_dir(str(out), half_then_fail)
    assert (out / "weights").read_text() == "v2" and leftovers(tmp_path) == []


def test_sha256_file_hashes_every_byte(tmp_path):
    p = tmp_path / "w.bin"
    data = bytearray(os.urandom(1 << 10)) * (5 << 10)  # 5 MiB: more than one read block
    p.write_bytes(data)
    assert sha256_file(str(p)) == hashlib.sha256(data).hexdigest()
    data[-1] ^= 1  # the last byte of the last block counts
    p.write_bytes(data)
    assert sha256_file(str(p)) == hashlib.sha256(data).hexdigest()
    h = hashlib.sha256(b"prefix")
    assert sha256_file(str(p), h) == hashlib.sha256(b"prefix" + bytes(data)).hexdigest()


def test_check_writable_names_the_field_the_path_and_the_fix(tmp_path):
    # Checked by making it and writing in it; what the check made is removed again (a run
    # refused later leaves no empty output_dir), what was there stays.
    (tmp_path / "there").mkdir()
    check_writable(str(tmp_path / "there" / "new" / "dir"), "output_dir", keep=False)
    assert os.listdir(tmp_path / "there") == []
    check_writable(str(tmp_path / "made" / "dir"), "cache_dir")  # kept: the caller writes
    assert os.listdir(tmp_path / "made" / "dir") == []
    check_writable(str(tmp_path / "there"), "output_dir", keep=False)
    assert os.listdir(tmp_path / "there") == []
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match=r"output_dir: '.*a_file' is a file, not a directory; "
                                         r"choose another"):
        check_writable(str(blocker), "output_dir")
    with pytest.raises(PermissionError, match=r"cache_dir: '.*a_file/c' is not writable "
                                              r"\(.*\); use another"):
        check_writable(str(blocker / "c"), "cache_dir", fix="use another")
