"""``distilkit export --format onnx [--int8]``: every classification student kind distilkit makes
(the sentence-pair BiLSTM included, checked on pairs) runs in onnxruntime with the PyTorch
model's logits and argmax, at batch sizes and sequence lengths other than the traced
example's; bad input is one clear error, and a failed check leaves nothing behind. The 4-bit
MatMulNBits export has its own file, test_export_nbits.py."""
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
    "bilstm_pair": None,
}
# Sentences over the tiny vocabulary (plus unknown words), of different lengths.
TEXTS = ["the film is great", "a boring , dull mess", "not very good but fun",
         "the plot and the acting and the story were brilliant and charming and funny",
         "awful", "slow movie", "was it good ? no", "the story is a mess but the acting is great"]
# Sentence pairs of different lengths on both sides.
PAIRS = list(zip(TEXTS, TEXTS[2:] + TEXTS[:2]))


def student(tmp_path, kind):
    """A tiny saved student of ``kind`` with its tokenizer; returns its directory."""
    path = str(tmp_path / kind)
    if kind in ("bilstm", "bilstm_pair"):
        from distilkit.students.bilstm import build_bilstm_student

        model, tok = build_bilstm_student(None, None, TEXTS + [" ".join(WORDS)],
                                          embedding_init="random", seed=0, embedding_dim=12,
                                          hidden_size=10, mlp_hidden_size=8, dropout=0.0,
                                          sentence_pair=kind == "bilstm_pair")
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


def encode(tok, texts, length):
    """``texts`` padded to ``length`` as a user feeds the exported file: sentences as one
    encoding, pairs each side on its own (``input_ids_b`` / ``attention_mask_b`` for the
    second sentences, as a sentence-pair BiLSTM's file takes them)."""
    if isinstance(texts[0], str):
        return dict(tok(texts, padding="max_length", max_length=length, return_tensors="np"))
    first = tok([a for a, _ in texts], padding="max_length", max_length=length,
                return_tensors="np")
    # The second sentences at another padded width: the two sequence axes are independent.
    second = tok([b for _, b in texts], padding="max_length", max_length=length + 5,
                 return_tensors="np")
    return {**first, **{f"{k}_b": v for k, v in second.items()}}


@pytest.mark.parametrize("kind", list(KINDS))
def test_export_matrix_fp32_equal_int8_agrees(tmp_path, kind):
    path = student(tmp_path, kind)
    if kind == "prune_heads":
        layers = load_compressed(path).bert.encoder.layer
        assert [l.attention.self.query.out_features // 8 for l in layers] == [4, 3, 1, 2]
    data = PAIRS if kind == "bilstm_pair" else TEXTS
    res = ex.export_onnx(path, str(tmp_path / "onnx"), int8=True, check_data=data)
    out = tmp_path / "onnx"
    assert json.load(open(out / "export.json")) == json.loads(json.dumps(res))
    fp32, int8 = res["files"]["fp32"], res["files"]["int8"]
    assert fp32["max_abs_diff"] <= ex.TOLERANCE and fp32["argmax_agreement"] == 1.0
    assert int8["argmax_agreement"] >= 0.75 and np.isfinite(int8["max_abs_diff"])
    assert res["serve"] in ("model.onnx", "model_int8.onnx")
    assert os.path.getsize(out / "model.onnx") == fp32["bytes"]
    assert os.path.getsize(out / "model_int8.onnx") == int8["bytes"]
    assert os.path.isfile(out / "config.json")
    if kind == "bilstm_pair":
        assert res["inputs"] == ["input_ids", "attention_mask", "input_ids_b", "attention_mask_b"]
        sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
        assert [i.shape[1] for i in sess.get_inputs()] == ["sequence"] * 2 + ["sequence_b"] * 2
    # Checked here too, independently of the export's own check: the tokenizer saved beside
    # the ONNX file, a batch size and a padded length the trace never saw, the PyTorch model
    # loaded as a user loads it.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    model = load_compressed(path).eval()
    for texts in (data[:3], data[3:4], data):
        enc = encode(tok, texts, 24)
        with torch.no_grad():
            ref = model(**{k: torch.from_numpy(v) for k, v in enc.items()
                           if k in res["inputs"]}).logits.numpy()
        got = ort_logits(str(out / "model.onnx"), enc)
        np.testing.assert_allclose(got, ref, rtol=0, atol=ex.TOLERANCE)
        assert (got.argmax(-1) == ref.argmax(-1)).all()
        q = ort_logits(str(out / "model_int8.onnx"), enc)
        assert q.shape == ref.shape and np.isfinite(q).all()


def test_pair_bilstm_export_matches_the_concatenated_pair_form(tmp_path):
    """The file's two-input pair form gives the logits the student gives on the same pairs
    fed the other way it accepts them, one concatenated sequence with token_type_ids (what
    training fed it), so the export serves the trained function."""
    from transformers import AutoTokenizer

    path = student(tmp_path, "bilstm_pair")
    ex.export_onnx(path, str(tmp_path / "onnx"), check_data=PAIRS)
    tok = AutoTokenizer.from_pretrained(path)
    model = load_compressed(path).eval()
    joint = tok([a for a, _ in PAIRS], [b for _, b in PAIRS], padding=True, return_tensors="pt")
    assert (joint["token_type_ids"] == 1).any()
    with torch.no_grad():
        ref = model(**joint).logits.numpy()
    got = ort_logits(str(tmp_path / "onnx" / "model.onnx"), encode(tok, PAIRS, 20))
    np.testing.assert_allclose(got, ref, rtol=0, atol=ex.TOLERANCE)


def test_pairs_for_an_encoder_student_go_in_as_one_sequence(tmp_path):
    from transformers import AutoTokenizer

    path = student(tmp_path, "plain")
    batches = ex.check_batches(AutoTokenizer.from_pretrained(path), PAIRS)
    assert (batches[0]["token_type_ids"] == 1).any() and "input_ids_b" not in batches[0]
    res = ex.export_onnx(path, str(tmp_path / "onnx"), check_data=PAIRS)
    assert res["files"]["fp32"]["argmax_agreement"] == 1.0 and res["check_rows"] == 8 + 4 + 1 + 1


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
    pair = student(tmp_path, "bilstm_pair")
    with pytest.raises(ValueError, match="sentence-pair student; give .first, second. pairs"):
        ex.export_onnx(pair, check_data=TEXTS)
    with pytest.raises(ValueError, match="single-sentence BiLSTM student"):
        ex.export_onnx(student(tmp_path, "bilstm"), check_data=PAIRS)
    assert not os.path.exists(os.path.join(pair, "onnx"))
    plain = student(tmp_path, "plain")
    with pytest.raises(ValueError, match="check_data"):
        ex.export_onnx(plain, check_data=["", "x"])
    with pytest.raises(ValueError, match="check_data"):
        ex.export_onnx(plain, check_data=[("a", "b"), "c"])
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


def test_cli_checks_a_pair_student_on_a_pairs_file(tmp_path, capsys):
    path = student(tmp_path, "bilstm_pair")
    texts = tmp_path / "pairs.tsv"
    texts.write_text("".join(f"{a}\t{b}\n" for a, b in PAIRS[:5]) + "\n")
    out = str(tmp_path / "exported")
    assert main(["export", path, "--int8", "--out", out, "--texts", str(texts)]) == 0
    printed = capsys.readouterr().out
    res = json.load(open(os.path.join(out, "export.json")))
    assert res["check_rows"] == 5 + 2 + 1 + 1 and "input_ids_b" in printed
    assert res["files"]["fp32"]["argmax_agreement"] == 1.0
    assert ex.read_texts(str(texts)) == [tuple(p) for p in PAIRS[:5]]
    # A pair with an empty side, pairs mixed with sentences, single sentences for a pair
    # student: one error line each, nothing written.
    for i, body in enumerate(["a fine film\t\n", f"{PAIRS[0][0]}\t{PAIRS[0][1]}\nawful\n",
                              "\n".join(TEXTS[:3]) + "\n"]):
        bad = tmp_path / f"bad{i}.txt"
        bad.write_text(body)
        assert main(["export", path, "--out", str(tmp_path / f"no{i}"), "--texts", str(bad)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("distilkit export: error:") and len(err.strip().splitlines()) == 1
        assert ("line 1" if i == 0 else "line 2" if i == 1 else "pairs") in err
        assert not os.path.exists(tmp_path / f"no{i}")


def test_int8_export_prints_no_onnxruntime_advice(tmp_path, capfd, caplog):
    """The int8 step is silent (onnxruntime's pre-processing advice is not for our graphs) and
    leaves the root logger's level as it found it."""
    import logging

    path = student(tmp_path, "plain")
    level = logging.getLogger().level
    ex.export_onnx(path, str(tmp_path / "onnx"), int8=True, check_data=TEXTS)
    captured = capfd.readouterr()
    assert "pre-processing" not in captured.err + captured.out + caplog.text
    assert logging.getLogger().level == level


def _op_types(path):
    import onnx

    return {n.op_type for n in onnx.load(str(path)).graph.node}


def test_int8_is_made_from_the_fused_graph_with_per_channel_scales(tmp_path):
    """An encoder's int8 file comes from onnxruntime's fused graph (QAttention, the embedding
    LayerNorm fused; not SkipLayerNormalization nor BiasGelu, slower on CPU), checked first
    against PyTorch; head-pruned layers are fused as far as the check allows."""
    res = ex.export_onnx(student(tmp_path, "plain"), str(tmp_path / "plain"), int8=True,
                         check_data=TEXTS)
    assert res["files"]["int8"]["graph"] == "fused" and res["files"]["int8"]["per_channel"]
    ops = _op_types(tmp_path / "plain" / "model_int8.onnx")
    assert {"QAttention", "QEmbedLayerNormalization", "LayerNormalization"} <= ops
    assert not ops & {"SkipLayerNormalization", "BiasGelu"}
    assert "QAttention" not in _op_types(tmp_path / "plain" / "model.onnx")  # fp32 as traced
    assert not (tmp_path / "plain" / ".fused.onnx").exists()
    res = ex.export_onnx(student(tmp_path, "prune_heads"), str(tmp_path / "heads"), int8=True,
                         check_data=TEXTS)
    # (these tiny layers' own head counts happen to fuse; MiniLM's 50%-pruned ones do not,
    # and keep the other fusions: docs/RESULTS.md #15)
    assert res["files"]["int8"]["graph"] in ("fused", "fused except attention")
    ops = _op_types(tmp_path / "heads" / "model_int8.onnx")
    assert "QEmbedLayerNormalization" in ops and not ops & {"SkipLayerNormalization", "BiasGelu"}


def test_a_fused_graph_that_is_wrong_is_not_quantized(tmp_path, monkeypatch):
    """Was possible: a fusion that changes the function would have been quantized silently.
    The fused graph is checked like an export and, when it differs, the traced graph is used."""
    import distilkit.export.int8 as i8

    real = i8.fused_graph

    def wrong(model, wrapper, *a, **k):
        class Off(torch.nn.Module):  # the model's logits shifted: another function
            def __init__(self, m):
                super().__init__()
                self.m = wrapper(m)

            def forward(self, *x):
                return self.m(*x) + 1.0
        return real(model, Off, *a, **k)
    monkeypatch.setattr(i8, "fused_graph", wrong)
    res = ex.export_onnx(student(tmp_path, "plain"), str(tmp_path / "o"), int8=True,
                         check_data=TEXTS)
    assert res["files"]["int8"]["graph"] == "traced"
    assert res["files"]["int8"]["argmax_agreement"] >= 0.75
    # only the attention fusion wrong: the graph with the other fusions is used
    def wrong_attention(model, wrapper, example, names, axes, path, attention=True):
        return (wrong if attention else real)(model, wrapper, example, names, axes, path,
                                              attention)
    monkeypatch.setattr(i8, "fused_graph", wrong_attention)
    res = ex.export_onnx(student(tmp_path, "plain"), str(tmp_path / "o2"), int8=True,
                         check_data=TEXTS)
    assert res["files"]["int8"]["graph"] == "fused except attention"
