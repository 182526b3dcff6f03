"""``distilkit export --format onnx [--int8]``: every classification student kind distilkit makes
runs in onnxruntime with the PyTorch model's logits and argmax, at batch sizes and sequence
lengths other than the traced example's; bad input is one clear error, and a failed check
leaves nothing behind."""
import json
import os

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import WORDS, tiny_batch, tiny_bert, tiny_tokenizer

from distilkit import export as ex
from distilkit.cli import main
from distilkit.compress import (CompressionContext, compress_, config_from_dict, finalize_,
                                load_compressed, save_compressed)

KINDS = {
    "plain": [],
    "prune_layers": [{"method": "prune_layers", "count": 2}],
    # The layers keep 4, 3, 1 and 2 heads of 4 (checked in the test).
    "prune_heads": [{"method": "prune_heads", "heads": {1: [0], 2: [0, 2, 3], 3: [1, 2]}}],
    "prune_ffn": [{"method": "prune_ffn", "fraction": 0.5, "importance": "l1"}],
    "low_rank": [{"method": "low_rank", "param_fraction": 0.5}],
    "quantize_4bit": [{"method": "quantize", "bits": 4, "bucket_size": 64}],
    "magnitude": [{"method": "magnitude", "final_sparsity": 0.5}],
    "composed": [{"method": "prune_heads", "fraction": 0.25, "importance": "weight"},
                 {"method": "prune_ffn", "fraction": 0.5, "importance": "l1"},
                 {"method": "quantize", "bits": 4, "bucket_size": 32}],
    "bilstm": None,
}
# Sentences over the tiny vocabulary (plus unknown words), of different lengths.
TEXTS = ["the film is great", "a boring , dull mess", "not very good but fun",
         "the plot and the acting and the story were brilliant and charming and funny",
         "awful", "slow movie", "was it good ? no", "the story is a mess but the acting is great"]


def student(tmp_path, kind):
    """A tiny saved student of ``kind`` with its tokenizer; returns its directory."""
    path = str(tmp_path / kind)
    if kind == "bilstm":
        from distilkit.students.bilstm import build_bilstm_student

        model, tok = build_bilstm_student(None, None, TEXTS + [" ".join(WORDS)],
                                          embedding_init="random", seed=0, embedding_dim=12,
                                          hidden_size=10, mlp_hidden_size=8, dropout=0.0)
        model.eval().save_pretrained(path)
        tok.save_pretrained(path)
        return path
    tok = tiny_tokenizer(path)
    model = tiny_bert(vocab=tok.vocab_size)
    ctx = CompressionContext(dataloader=[tiny_batch(vocab=tok.vocab_size)])
    for entry in KINDS[kind]:
        compress_(model, config_from_dict(entry), ctx)
    finalize_(model)
    save_compressed(model, path)
    return path


def ort_logits(onnx_file, enc):
    s = ort.InferenceSession(onnx_file, providers=["CPUExecutionProvider"])
    return s.run(None, {i.name: enc[i.name].astype(np.int64) for i in s.get_inputs()})[0]


@pytest.mark.parametrize("kind", list(KINDS))
def test_export_matrix_fp32_equal_int8_agrees(tmp_path, kind):
    path = student(tmp_path, kind)
    if kind == "prune_heads":
        layers = load_compressed(path).bert.encoder.layer
        assert [l.attention.self.query.out_features // 8 for l in layers] == [4, 3, 1, 2]
    res = ex.export_onnx(path, str(tmp_path / "onnx"), int8=True, check_data=TEXTS)
    out = tmp_path / "onnx"
    assert json.load(open(out / "export.json")) == json.loads(json.dumps(res))
    fp32, int8 = res["files"]["fp32"], res["files"]["int8"]
    assert fp32["max_abs_diff"] <= ex.TOLERANCE and fp32["argmax_agreement"] == 1.0
    assert int8["argmax_agreement"] >= 0.75 and np.isfinite(int8["max_abs_diff"])
    assert res["serve"] in ("model.onnx", "model_int8.onnx")
    assert os.path.getsize(out / "model.onnx") == fp32["bytes"]
    assert os.path.getsize(out / "model_int8.onnx") == int8["bytes"]
    assert os.path.isfile(out / "config.json")
    # Checked here too, independently of the export's own check: the tokenizer saved beside
    # the ONNX file, a batch size and a padded length the trace never saw, the PyTorch model
    # loaded as a user loads it.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    model = load_compressed(path).eval()
    for texts in (TEXTS[:3], TEXTS[3:4], TEXTS):
        enc = tok(texts, padding="max_length", max_length=24, return_tensors="np")
        with torch.no_grad():
            ref = model(**{k: torch.from_numpy(v) for k, v in enc.items()
                           if k in res["inputs"]}).logits.numpy()
        got = ort_logits(str(out / "model.onnx"), enc)
        np.testing.assert_allclose(got, ref, rtol=0, atol=ex.TOLERANCE)
        assert (got.argmax(-1) == ref.argmax(-1)).all()
        q = ort_logits(str(out / "model_int8.onnx"), enc)
        assert q.shape == ref.shape and np.isfinite(q).all()


def test_fp32_only_and_default_out_dir(tmp_path):
    path = student(tmp_path, "plain")
    res = ex.export_onnx(path)
    out = os.path.join(path, "onnx")
    assert sorted(res["files"]) == ["fp32"] and res["serve"] == "model.onnx"
    assert not os.path.exists(os.path.join(out, "model_int8.onnx"))
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))
    assert res["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]


def test_a_failed_check_writes_nothing_and_keeps_the_old_export(tmp_path, monkeypatch):
    path = student(tmp_path, "plain")
    out = str(tmp_path / "out")
    ex.export_onnx(path, out)
    before = open(os.path.join(out, "export.json")).read()
    real = ex.compare
    monkeypatch.setattr(ex.classifier, "compare", lambda *a: {**real(*a), "max_abs_diff": 1.0})
    with pytest.raises(RuntimeError, match="does not compute the PyTorch model's function"):
        ex.export_onnx(path, out)
    assert open(os.path.join(out, "export.json")).read() == before
    assert [n for n in os.listdir(tmp_path) if n.startswith(".tmp")] == []


def test_bad_inputs_are_one_clear_error(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="holds no saved model"):
        ex.export_onnx(str(tmp_path))
    from distilkit.students.bilstm import build_bilstm_student

    pair = str(tmp_path / "pair")
    model, tok = build_bilstm_student(None, None, TEXTS, embedding_init="random", seed=0,
                                      embedding_dim=8, hidden_size=4, mlp_hidden_size=4,
                                      sentence_pair=True)
    model.save_pretrained(pair)
    tok.save_pretrained(pair)
    with pytest.raises(ValueError, match="sentence-pair BiLSTM student cannot be exported"):
        ex.export_onnx(pair)
    plain = student(tmp_path, "plain")
    with pytest.raises(ValueError, match="check_data"):
        ex.export_onnx(plain, check_data=["", "x"])
    with pytest.raises(ValueError, match="tolerance=0"):
        ex.export_onnx(plain, tolerance=0)
    import builtins

    real_import = builtins.__import__

    def no_onnxruntime(name, *a, **k):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_onnxruntime)
    with pytest.raises(ImportError, match=r"pip install 'distilkit\[onnx\]'"):
        ex.export_onnx(plain)


def test_cli_exports_a_distilled_run(tiny_task, capsys):
    from test_cli import _recipe

    path, run = _recipe(tiny_task, compression=[{"method": "prune_heads", "fraction": 0.5,
                                                 "importance": "weight"}])
    assert main(["distill", path, "--no-progress"]) == 0
    capsys.readouterr()
    out = os.path.join(str(tiny_task["tmp"]), "exported")
    texts = tiny_task["tmp"] / "texts.txt"
    texts.write_text("\n".join(TEXTS[:5]) + "\n\n")
    assert main(["export", run, "--format", "onnx", "--int8", "--out", out,
                 "--texts", str(texts)]) == 0
    printed = capsys.readouterr().out
    res = json.load(open(os.path.join(out, "export.json")))
    # 5 sentences together, the first 2, the shortest and the longest alone
    assert res["check_rows"] == 5 + 2 + 1 + 1
    assert res["model_dir"] == os.path.abspath(os.path.join(run, "student"))
    assert "model.onnx" in printed and "model_int8.onnx" in printed and "serve:" in printed
    assert os.path.isfile(os.path.join(out, "model_int8.onnx"))
    for argv in ([str(tiny_task["tmp"] / "nowhere")], [run, "--texts", str(tiny_task["tmp"])]):
        assert main(["export", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("distilkit export: error:") and len(err.strip().splitlines()) == 1
