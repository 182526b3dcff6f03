"""``load_compressed`` keyword arguments on a directory with compression records: ``dtype``
and ``device_map`` are honoured, anything it cannot honour is an error (it used to drop them)."""
import json

import pytest
import torch
from conftest import tiny_batch, tiny_bert

from distilkit.compress import (compress_, config_from_dict, finalize_, load_compressed,
                                save_compressed)
from distilkit.compress.packing import PackedMixin

ENTRIES = {
    "quantize": [{"method": "quantize", "bits": 4, "bucket_size": 64}],
    "prune_low_rank_magnitude": [{"method": "prune_heads", "fraction": 0.25, "importance": "weight"},
                                 {"method": "low_rank", "rank": 4},
                                 {"method": "magnitude", "final_sparsity": 0.5}],
}


def inputs():
    return {k: v for k, v in tiny_batch().items() if k != "labels"}


def saved(tmp_path, entries):
    model = tiny_bert()
    for e in entries:
        compress_(model, config_from_dict(e))
    finalize_(model)
    with torch.no_grad():
        expected = model(**inputs()).logits
    save_compressed(model, str(tmp_path / "m"))
    return str(tmp_path / "m"), expected


@pytest.mark.parametrize("key", ["dtype", "torch_dtype"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("which", sorted(ENTRIES))
def test_dtype_casts_floating_tensors_and_keeps_packed_codes(tmp_path, which, dtype, key):
    path, expected = saved(tmp_path, ENTRIES[which])
    model = load_compressed(path, **{key: dtype})
    params = list(model.parameters())
    assert params and all(p.dtype == dtype for p in params if p.is_floating_point())
    packed = [m for m in model.modules() if isinstance(m, PackedMixin)]
    for m in packed:
        for name in m.packed_specs:
            assert getattr(m, f"{name}_packed").dtype == torch.uint8
            assert getattr(m, f"{name}_scale").dtype == torch.float32  # the stored format
            assert getattr(m, name).dtype == dtype  # what it computes with
    assert bool(packed) == (which == "quantize")
    with torch.no_grad():
        got = model(**inputs()).logits
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), expected, rtol=0, atol=0.05)


def test_dtype_by_name_and_auto(tmp_path):
    path, _ = saved(tmp_path, ENTRIES["quantize"])
    assert next(load_compressed(path, dtype="bfloat16").parameters()).dtype == torch.bfloat16
    assert next(load_compressed(path, dtype="auto").parameters()).dtype == torch.float32


def test_a_half_precision_model_saves_and_reloads(tmp_path):
    path, _ = saved(tmp_path, ENTRIES["quantize"])
    half = load_compressed(path, dtype=torch.float16)
    with torch.no_grad():
        expected = half(**inputs()).logits
    save_compressed(half, str(tmp_path / "half"))
    again = load_compressed(str(tmp_path / "half"), dtype=torch.float16)
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs()).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("device_map", ["cpu", torch.device("cpu"), {"": "cpu"}, {"": torch.device("cpu")}])
def test_device_map_to_one_device(tmp_path, device_map):
    path, expected = saved(tmp_path, ENTRIES["quantize"])
    model = load_compressed(path, device_map=device_map)
    assert {t.device.type for t in (*model.parameters(), *model.buffers())} == {"cpu"}
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs()).logits, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    ({"device_map": "auto"}, r"device_map='auto'.*one device"),
    ({"device_map": {"bert": "cpu", "classifier": "cpu"}}, "device_map=.*one device"),
    ({"device_map": "nowhere"}, "device_map='nowhere'"),
    ({"dtype": "float17"}, "dtype='float17'"),
    ({"dtype": torch.int8}, "dtype=torch.int8.*floating"),
    ({"dtype": torch.float16, "torch_dtype": torch.float16}, "dtype and torch_dtype"),
    ({"revision": "main"}, r"revision.*compression records.*dtype, device_map"),
])
def test_what_cannot_be_honoured_is_an_error(tmp_path, kwargs, match):
    path, _ = saved(tmp_path, ENTRIES["quantize"])
    with pytest.raises(ValueError, match=match):
        load_compressed(path, **kwargs)


def test_directory_without_records_passes_kwargs_to_from_pretrained(tmp_path):
    tiny_bert().save_pretrained(str(tmp_path))
    assert not (tmp_path / "compression_config.json").exists()
    model = load_compressed(str(tmp_path), dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["model_type"] == "bert"
