"""evaluate_model / evaluate_dir: metrics, counts, size on disk of the real files, latency and
memory figures, and clear errors for directories without a model."""
import json
import os

import numpy as np
import pytest
import torch
from conftest import tiny_bert
from tiny_text import tiny_dataset, tiny_tokenizer, tokenized

from distilkit.evaluate import evaluate_model, inference_peak_bytes, model_files
from distilkit.evaluate_run import evaluate_dir, run_evaluate


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("model")
    tiny_bert(seed=0).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


def manual_predictions(model, tok, ds):
    preds = []
    with torch.no_grad():
        for text in ds["text"]:
            enc = tok(text, return_tensors="pt")
            preds.append(int(model(**enc).logits.argmax(-1)))
    return np.array(preds)


def test_figures_on_a_tiny_model(saved, tok):
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(saved).eval()
    ds = tiny_dataset(30)
    res = evaluate_model(model, tok, ds, max_length=16, model_dir=saved, latency_runs=(3, 2))
    preds, labels = manual_predictions(model, tok, ds), np.array(ds["label"])
    assert res["accuracy"] == pytest.approx(float((preds == labels).mean()))
    assert 0 <= res["macro_f1"] <= 1 and res["examples"] == 30
    assert res["parameters"] == sum(p.numel() for p in model.parameters())
    assert res["nonzero_parameters"] <= res["parameters"]
    # Size on disk is the bytes of the model files actually there (not the tokenizer's).
    expected = {n: os.path.getsize(os.path.join(saved, n)) for n in os.listdir(saved)
                if n.endswith(".safetensors") or n in ("config.json", "generation_config.json")}
    assert res["size_files"] == expected
    assert res["size_on_disk_bytes"] == sum(expected.values())
    assert res["bits_per_weight"] == pytest.approx(8 * res["size_on_disk_bytes"] / res["parameters"],
                                                   rel=1e-4)
    assert 32 <= res["bits_per_weight"] < 40  # fp32 weights plus a small header and config
    assert res["latency_ms_batch1"] > 0 and res["latency_ms_batch32"] > 0
    assert res["model_memory_mb"] * 2**20 >= 4 * res["parameters"]
    assert res["peak_memory_mb"] >= res["model_memory_mb"]
    assert res["max_length"] == 16 and res["threads"] >= 1


def test_tokenized_input_and_no_model_dir_agree(saved, tok):
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(saved).eval()
    raw = tiny_dataset(30)
    a = evaluate_model(model, tok, raw, max_length=16, model_dir=saved, latency=False)
    b = evaluate_model(model, tok, tokenized(raw, tok, 16), max_length=16, latency=False)
    assert (a["accuracy"], a["macro_f1"]) == (b["accuracy"], b["macro_f1"])
    # Without a directory the model is saved to a temporary one: same files, same bytes.
    assert b["size_on_disk_bytes"] == a["size_on_disk_bytes"]
    assert b["latency_ms_batch32"] is None


def test_nonzero_count_and_compressed_size():
    from distilkit.compress.base import compress_, config_from_dict, finalize_

    tok = tiny_tokenizer()
    model = tiny_bert(seed=0, hidden=64, inter=128, layers=2)
    with torch.no_grad():
        model.bert.encoder.layer[0].intermediate.dense.weight[:10].zero_()
    dense = evaluate_model(model, tok, tiny_dataset(8), max_length=8, latency=False)
    assert dense["parameters"] - dense["nonzero_parameters"] >= 10 * 64
    compress_(model, config_from_dict({"method": "ptq", "bits": 4, "bucket_size": 64}))
    finalize_(model)
    quant = evaluate_model(model, tok, tiny_dataset(8), max_length=8, latency=False)
    # Packed weights count as their logical shape; the files shrink.
    assert quant["parameters"] == dense["parameters"]
    assert quant["size_on_disk_bytes"] < 0.6 * dense["size_on_disk_bytes"]
    assert quant["bits_per_weight"] < 0.6 * dense["bits_per_weight"]


def test_peak_memory_sees_activations():
    big = torch.nn.Sequential(torch.nn.Linear(64, 4096), torch.nn.ReLU())

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = big

        def forward(self, input_ids):
            return {"logits": self.net(input_ids.float().unsqueeze(-1).expand(-1, -1, 64))}

    # One forward at (32, 64) makes two 32 MiB tensors (linear output, relu output).
    peak, method = inference_peak_bytes(Wrap(), {"input_ids": torch.ones(32, 64, dtype=torch.long)})
    assert peak >= 48 * 2**20, (peak, method)


def test_directory_without_a_model_names_what_is_missing(tmp_path, saved):
    with pytest.raises(FileNotFoundError, match="config.json and model weights"):
        model_files(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"missing model weights .*config.json"):
        evaluate_dir(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not a directory"):
        evaluate_dir(str(tmp_path / "nope"))


def test_evaluate_dir_on_a_run_with_local_data(tmp_path, saved):
    import shutil

    from distilkit.data import DataSpec

    run = tmp_path / "run"
    shutil.copytree(saved, run / "student")
    ds = tiny_dataset(20)
    csv = tmp_path / "test.csv"
    ds.to_csv(str(csv))
    spec = DataSpec(dataset=None, data_files={"train": str(csv), "test": str(csv)},
                    eval_split="test", test_split="test")
    res = evaluate_dir(str(run), spec, max_length=16, latency=False)
    assert res["examples"] == 20 and res["split"] == "test"
    written = json.load(open(run / "student" / "evaluation.json"))
    assert written["accuracy"] == res["accuracy"]
    # evaluation.json is not a model file: the size does not change after writing it.
    assert model_files(str(run / "student")) == res["size_files"]
    # With no data given, the recipe distilkit distill wrote beside the model is used.
    import yaml

    (run / "recipe.yaml").write_text(yaml.safe_dump({
        "name": "t", "dataset": None, "data_files": {"train": str(csv), "test": str(csv)},
        "eval_split": "test", "test_split": "test", "max_length": 12, "max_eval_samples": 7}))
    res = evaluate_dir(str(run / "student"), latency=False)
    assert (res["examples"], res["max_length"], res["split"]) == (7, 12, "test")


def test_cli_entry(tmp_path, saved, capsys):
    import argparse

    from distilkit.evaluate_run import add_evaluate_arguments

    csv = tmp_path / "d.csv"
    tiny_dataset(12).to_csv(str(csv))
    p = argparse.ArgumentParser()
    add_evaluate_arguments(p)
    out = tmp_path / "eval.json"
    args = p.parse_args([saved, "--data-files", f"test={csv}", "--split", "test",
                         "--max-length", "16", "--output", str(out), "--no-latency"])
    assert run_evaluate(args) == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "size_on_disk_bytes" in printed
    assert json.load(open(out))["examples"] == 12


def test_evaluation_feeds_the_model_on_its_own_device(saved, tok):
    """A model that lives on another device (as one accelerate put on a GPU does) is fed there
    by prediction, latency and memory measurement alike; before the fix every batch was built
    on the CPU and given to the model as it was."""
    from fake_device import FakeDeviceModel
    from transformers import BertForSequenceClassification

    model = FakeDeviceModel(BertForSequenceClassification.from_pretrained(saved).eval())
    res = evaluate_model(model, tok, tiny_dataset(12), max_length=8, model_dir=saved,
                         latency_runs=(1, 1), warmup=0, batch_size=5)
    assert res["examples"] == 12 and res["latency_ms_batch32"] > 0
    assert model.calls == 3 + 2 + 1   # 3 prediction batches, 2 timed runs, 1 memory pass


def test_interleaved_timing_varies_who_runs_after_whom():
    """Each callable is timed after every other one (a fixed order timed the model after a
    PyTorch forward always on cores its OpenMP threads were still spinning on)."""
    from distilkit.evaluate import interleaved_latency_ms

    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in "abc"}
    out = interleaved_latency_ms(fns, runs=40, warmup=0)
    assert set(out) == set("abc")
    follows = {(calls[i - 1], calls[i]) for i in range(1, len(calls))}
    assert {(x, y) for x in "abc" for y in "abc" if x != y} <= follows


def test_blocks_time_each_model_as_serving_leaves_it():
    """With ``block`` a turn runs its callable that many times and times all but the first, so
    a model is not timed cold after another one (a small student after the teacher: its
    weights out of the caches); run by run every timing here is the cold one."""
    import time as _time

    from distilkit.evaluate import interleaved_latency_ms

    state, calls = {"last": None}, []

    def make(k):
        def fn():
            cold = state["last"] != k
            state["last"] = k
            calls.append(k)
            _time.sleep(0.03 if cold else 0.002)
        return fn

    fns = {k: make(k) for k in "abc"}
    run_by_run = interleaved_latency_ms(fns, runs=6, warmup=0)
    assert all(v >= 25 for v in run_by_run.values()), run_by_run
    calls.clear()
    warm = interleaved_latency_ms(fns, runs=6, warmup=1, block=3)
    assert all(v < 20 for v in warm.values()), warm
    assert len(calls) == 3 * 7 * 3
    with pytest.raises(ValueError, match="block=0"):
        interleaved_latency_ms(fns, block=0)
