"""Exported students measured in every runtime: ``distilkit evaluate EXPORT_DIR`` (PyTorch fp32
and each ONNX file side by side, on real data), the recipe's ``export:`` step (results.json
``runtimes``, the card's Runtimes table and Serve line, the report's runtime table and plot),
and bad ``export:`` values refused before any training."""
import csv
import json
import os

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_sentences
from test_cli import _recipe

from distilkit import export as ex
from distilkit.cli import main
from distilkit.export.measure import PYTORCH, evaluate_export

RUNTIME_KEYS = {"file", "accuracy", "f1", "agreement", "latency_b1_ms", "latency_b32_ms",
                "size_mb", "size_bytes", "runtime_title"}


def _dataset(n=32, seed=2):
    from datasets import Dataset

    rows = tiny_sentences(n, seed)
    return Dataset.from_dict({"text": [r[0] for r in rows], "label": [r[1] for r in rows]})


def test_every_runtime_of_an_export_scored_as_pytorch_scores_it(tiny_task):
    """onnx-fp32 predicts what PyTorch predicts on every row of the split, so its accuracy and
    F1 are PyTorch's, and those are what evaluate_model gives the PyTorch model; every file
    has its figures and its size on disk."""
    from transformers import AutoTokenizer

    from distilkit.compress import load_compressed
    from distilkit.evaluate import evaluate_model

    model_dir = tiny_task["teacher"]
    made = ex.export_onnx(model_dir, int8=True)
    export_dir = os.path.join(model_dir, "onnx")
    ds = _dataset()
    res = evaluate_export(export_dir, ds, max_length=16, progress=False, threads=1)
    rt = res["runtimes"]
    assert list(rt) == [PYTORCH, "onnx-fp32", "onnx-int8"]
    for r in rt.values():
        assert set(r) == RUNTIME_KEYS
        assert r["latency_b1_ms"] > 0 and r["latency_b32_ms"] > 0 and 0 <= r["agreement"] <= 1
    ref = evaluate_model(load_compressed(model_dir), AutoTokenizer.from_pretrained(model_dir), ds,
                         max_length=16, latency=False)
    assert rt[PYTORCH]["accuracy"] == ref["accuracy"] and rt[PYTORCH]["f1"] == ref["macro_f1"]
    assert rt["onnx-fp32"]["agreement"] == 1.0
    assert rt["onnx-fp32"]["accuracy"] == ref["accuracy"] and rt["onnx-fp32"]["f1"] == ref["macro_f1"]
    for kind, f in made["files"].items():
        assert rt[f"onnx-{kind}"]["file"] == f["file"]
        assert rt[f"onnx-{kind}"]["size_bytes"] == os.path.getsize(os.path.join(export_dir, f["file"]))
    assert rt[PYTORCH]["file"] == "model.safetensors"
    assert res["serve"] == made["serve"] and res["threads"] == 1 and res["examples"] == len(ds)
    assert res["model_dir"] == os.path.abspath(model_dir)


def test_timed_sessions_spin_briefly_and_served_ones_as_onnxruntime_does(tiny_task):
    """A session timed side by side spins at most TIMING_SPIN_US (onnxruntime's default kept
    the cores busy after a run, for the model timed next; none slowed the run itself);
    ``spin_us=0`` turns spinning off; a session made for serving keeps onnxruntime's default;
    the report times its ONNX runtimes the side-by-side way."""
    from distilkit.export import measure
    from distilkit.export.runtime import TIMING_SPIN_US, session

    path = os.path.join(tiny_task["teacher"], "onnx", "model.onnx")
    if not os.path.exists(path):
        ex.export_onnx(tiny_task["teacher"])

    def entry(options, key):
        try:
            return options.get_session_config_entry(key)
        except RuntimeError:  # onnxruntime's answer for a key never set
            return None

    def entries(s):
        o = s.get_session_options()
        return (entry(o, "session.intra_op.allow_spinning"),
                entry(o, "session.intra_op.spin_duration_us"))

    assert entries(session(path, 1, spin_us=TIMING_SPIN_US)) == ("1", str(TIMING_SPIN_US))
    assert entries(session(path, 1, spin_us=0)) == ("0", None)
    assert entries(session(path, 1)) == (None, None)
    made = []
    real = measure.OrtClassifier.__init__

    def spy(self, *a, **k):
        made.append(k.get("spin_us"))
        real(self, *a, **k)

    measure.OrtClassifier.__init__ = spy
    try:
        evaluate_export(os.path.dirname(path), _dataset(8), max_length=16, progress=False,
                        threads=1, latency=False)
    finally:
        measure.OrtClassifier.__init__ = real
    assert made and set(made) == {TIMING_SPIN_US}


def _named_rows():
    """Mostly positive sentences (so reading the classes in the wrong order changes the
    accuracy even of a model that always answers the same)."""
    return [(t, y) for i, (t, y) in enumerate(tiny_sentences(48, 3)) if y == 1 or i % 6 == 0]


def _reversed_labels_csv(tmp):
    """:func:`_named_rows` with string labels, for a model whose id 0 is 'pos' (the data's
    sorted classes are ['neg', 'pos']: the model's answers must be read by name)."""
    path = tmp / "named.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows((t, "pos" if y else "neg") for t, y in _named_rows())
    return str(path)


def test_cli_evaluate_export_dir_and_runtimes_flag(tiny_task, capsys):
    """``distilkit evaluate EXPORT_DIR`` and ``distilkit evaluate MODEL_DIR --runtimes``: the
    same figures, a printed table, evaluation.json; the model's own class order is read by
    name in every runtime, as the PyTorch evaluation reads it."""
    from transformers import AutoTokenizer

    from distilkit.compress import load_compressed, save_compressed

    model = load_compressed(tiny_task["teacher"])
    model.config.id2label, model.config.label2id = {0: "pos", 1: "neg"}, {"pos": 0, "neg": 1}
    model_dir = str(tiny_task["tmp"] / "named")
    save_compressed(model, model_dir)
    AutoTokenizer.from_pretrained(tiny_task["teacher"]).save_pretrained(model_dir)
    out = str(tiny_task["tmp"] / "exported")
    ex.export_onnx(model_dir, out, int8=True)
    data = ["--data-files", f"test={_reversed_labels_csv(tiny_task['tmp'])}", "--max-length", "16"]
    assert main(["evaluate", model_dir, *data, "--no-latency"]) == 0
    capsys.readouterr()
    plain = json.load(open(os.path.join(model_dir, "evaluation.json")))

    assert main(["evaluate", out, *data, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    res = json.load(open(os.path.join(out, "evaluation.json")))
    assert "onnx-int8" in printed and "model_int8.onnx" in printed and "serve:" in printed
    assert res["split"] == "test" and res["examples"] == plain["examples"] == len(_named_rows())
    for name in (PYTORCH, "onnx-fp32"):
        assert res["runtimes"][name]["accuracy"] == plain["accuracy"]
        assert res["runtimes"][name]["f1"] == plain["macro_f1"]
    # Scored by hand: the model's logits read in the data's order (neg = model id 1).
    tok = AutoTokenizer.from_pretrained(model_dir)
    texts, labels = zip(*_named_rows())
    with torch.no_grad():
        logits = model.eval()(**tok(list(texts), padding=True, return_tensors="pt")).logits
    preds = logits[:, [1, 0]].argmax(-1).numpy()
    by_hand = float(np.mean(preds == np.array(labels)))
    assert res["runtimes"]["onnx-fp32"]["accuracy"] == pytest.approx(by_hand)

    # --runtimes on the model directory finds its export (here: none in MODEL_DIR/onnx).
    assert main(["evaluate", model_dir, "--runtimes", *data]) == 2
    err = capsys.readouterr().err
    assert "no ONNX export" in err and "distilkit export" in err and len(err.strip().splitlines()) == 1
    ex.export_onnx(model_dir)
    assert main(["evaluate", model_dir, "--runtimes", *data, "--no-latency", "--no-progress"]) == 0
    capsys.readouterr()
    again = json.load(open(os.path.join(model_dir, "onnx", "evaluation.json")))
    assert list(again["runtimes"]) == [PYTORCH, "onnx-fp32"]
    assert again["runtimes"]["onnx-fp32"]["accuracy"] == plain["accuracy"]
    assert again["runtimes"]["onnx-fp32"]["latency_b1_ms"] is None


def test_recipe_export_step_writes_runtimes_card_and_report(tiny_task, capsys):
    from distilkit.report import write_report

    path, run = _recipe(tiny_task, export={"int8": True}, compression=[])
    assert main(["distill", path, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "ONNX Runtime int8" in printed
    res = json.load(open(os.path.join(run, "results.json")))
    student = os.path.join(run, "student")
    # results.json: every runtime, files relative to the student directory, the teacher's
    # PyTorch fp32 figures beside them.
    rt = res["runtimes"]
    assert list(rt) == [PYTORCH, "onnx-fp32", "onnx-int8"]
    for r in rt.values():
        assert set(r) == RUNTIME_KEYS
        assert os.path.isfile(os.path.join(student, r["file"].split(", ")[0]))
    assert rt["onnx-fp32"]["agreement"] == 1.0
    assert rt["onnx-fp32"]["accuracy"] == rt[PYTORCH]["accuracy"] == res["student"]["accuracy"]
    exp = res["export"]
    assert exp["dir"] == "student/onnx" and exp["split"] == "test" and exp["examples"] == 32
    assert exp["serve"] in (rt["onnx-fp32"]["file"], rt["onnx-int8"]["file"])
    assert exp["teacher"]["accuracy"] == res["teacher"]["accuracy"]
    assert exp["teacher"]["latency_b32_ms"] == res["teacher"]["latency_ms_batch32"]
    # export.json names where the export and its model are now, not the temporary directory.
    made = json.load(open(os.path.join(student, "onnx", "export.json")))
    assert made["model_dir"] == os.path.abspath(student)
    assert made["out_dir"] == os.path.abspath(os.path.join(student, "onnx"))
    assert [n for n in os.listdir(run) if n.startswith(".tmp")] == []
    # The resolved recipe says every export setting.
    resolved = yaml.safe_load(open(os.path.join(run, "recipe.yaml")))
    assert resolved["export"] == {"format": "onnx", "int8": True, "four_bit": False, "serve": None,
                                  "evaluate": True}
    # The card: a Runtimes table and the file to serve.
    card = open(os.path.join(student, "README.md")).read()
    assert "## Runtimes" in card and f"Serve: `{exp['serve']}`" in card
    assert "| ONNX Runtime int8 | `onnx/model_int8.onnx`" in card
    assert (f'ort.InferenceSession("{exp["serve"]}", '
            'disabled_optimizers=["SkipLayerNormFusion"])') in card
    # The report: the teacher at 1.00x, the run in every runtime, a plot.
    out = write_report([run], str(tiny_task["tmp"] / "report"))
    md = open(out["markdown"]).read()
    assert "## Runtimes" in md and "![speed-up of every runtime](report_runtimes.png)" in md
    rows = out["runtime_rows"]
    assert [(r["name"], r["runtime"]) for r in rows] == [
        ("teacher", PYTORCH), ("tiny", PYTORCH), ("tiny", "onnx-fp32"), ("tiny", "onnx-int8")]
    assert rows[0]["speedup_b32"] == rows[0]["size_ratio"] == 1.0
    t = res["export"]["teacher"]
    assert rows[3]["speedup_b32"] == pytest.approx(t["latency_b32_ms"] / rt["onnx-int8"]["latency_b32_ms"])
    assert rows[3]["size_ratio"] == pytest.approx(t["size_mb"] / rt["onnx-int8"]["size_mb"])
    assert sum(r["serve"] for r in rows) == 1
    table = [ln for ln in md.split("## Runtimes")[1].splitlines() if ln.startswith("| ")]
    assert len(table) == 5 and "1.00x" in table[1] and "(serve)" in md
    png = open(out["runtime_plot"], "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    # distilkit evaluate RUN --runtimes finds the export and the run's recipe (its data).
    assert main(["evaluate", run, "--runtimes", "--no-latency", "--no-progress"]) == 0
    again = json.load(open(os.path.join(student, "onnx", "evaluation.json")))
    assert again["runtimes"]["onnx-fp32"]["accuracy"] == rt["onnx-fp32"]["accuracy"]


@pytest.mark.parametrize("export, message", [
    ({"format": "tflite"}, "export.format: 'tflite' is not an export format; use onnx"),
    ({"int8": "maybe"}, "export.int8: 'maybe' must be true or false"),
    ({"fourbit": True}, "export: unknown key 'fourbit'; did you mean 'four_bit'?"),
    ({"four_bit": True}, "export.four_bit: true exports a 4-bit quantized student's packed codes"),
    (3, "export: 3 must be a mapping"),
])
def test_bad_export_values_fail_before_training(tiny_task, capsys, export, message):
    path, run = _recipe(tiny_task, export=export, compression=[])
    assert main(["distill", path, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not os.path.exists(run)


def test_export_settings_resolved_and_four_bit_with_a_4bit_student():
    from distilkit.recipe import Recipe

    base = {"teacher": "t", "dataset": None, "data_files": "x.csv"}
    r = Recipe.from_dict({**base, "export": True})
    assert r.keys.export == {"format": "onnx", "int8": True, "four_bit": False, "serve": None,
                               "evaluate": True}
    r = Recipe.from_dict({**base, "export": {"int8": "false", "four_bit": "yes"},
                          "compression": [{"method": "quantize", "bits": 4, "bucket_size": 64}]})
    assert r.keys.export == {"format": "onnx", "int8": False, "four_bit": True, "serve": None,
                             "evaluate": True}
    assert Recipe.from_dict({**base, "export": None}).keys.export is None
    with pytest.raises(ValueError, match="export.four_bit.*add {method: quantize, bits: 4}"):
        Recipe.from_dict({**base, "export": {"four_bit": True},
                          "compression": [{"method": "quantize", "bits": 2}]})
    with pytest.raises(ValueError, match="export.four_bit: the 4-bit MatMulNBits export is for "
                                         "classification students; set four_bit: false"):
        Recipe.from_dict({**base, "task": "seq2seq", "export": {"four_bit": True},
                          "compression": [{"method": "quantize", "bits": 4}]})


def test_export_step_without_onnxruntime_fails_before_training(tiny_task, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_onnxruntime(name, *a, **k):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real_import(name, *a, **k)

    path, run = _recipe(tiny_task, export=True, compression=[])
    monkeypatch.setattr(builtins, "__import__", no_onnxruntime)
    assert main(["distill", path, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'distilkit[onnx]'" in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(os.path.join(run, "student"))


def test_a_moved_export_finds_its_model_and_a_bad_dir_is_named(tiny_task, capsys):
    import shutil

    ex.export_onnx(tiny_task["teacher"])
    moved = str(tiny_task["tmp"] / "moved")
    shutil.copytree(tiny_task["teacher"], moved)
    shutil.rmtree(tiny_task["teacher"])
    res = evaluate_export(os.path.join(moved, "onnx"), _dataset(8), max_length=16,
                          latency=False, progress=False)
    assert res["model_dir"] == os.path.abspath(moved)
    os.remove(os.path.join(moved, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="the model it was exported from"):
        evaluate_export(os.path.join(moved, "onnx"), _dataset(8), progress=False)
    with pytest.raises(FileNotFoundError, match="holds no export.json"):
        evaluate_export(str(tiny_task["tmp"]), _dataset(8), progress=False)


def test_seq2seq_recipe_export_measures_generation_in_every_runtime(tmp_path, capsys):
    """A seq2seq recipe with ``export:``: the three graphs exported, each variant's generation
    loop scored by generation (BLEU, agreement with PyTorch's outputs) into results.json, the
    card (Serve line with the generator to load it) and the report (BLEU, teacher 1.00x)."""
    from conftest import tiny_t5
    from test_seq2seq import SENTENCES, _truecase_files, strip_case_and_punct

    from distilkit.pipeline import run_recipe
    from distilkit.recipe import Recipe
    from distilkit.report import write_report
    from distilkit.seq2seq.tokenizer import TokenizerSettings, build_tokenizer

    tok = build_tokenizer(SENTENCES + [strip_case_and_punct(x) for x in SENTENCES],
                          TokenizerSettings(vocab_size=300, min_frequency=1))
    teacher_dir = tmp_path / "teacher"
    tiny_t5(seed=5, vocab=len(tok)).save_pretrained(teacher_dir)
    tok.save_pretrained(teacher_dir)
    run = str(tmp_path / "run")
    raw = {"name": "s2s", "task": "seq2seq", "teacher": str(teacher_dir),
           "student": {"type": "from_teacher", "num_decoder_layers": 1}, "dataset": None,
           "data_files": _truecase_files(tmp_path), "text_column": "src", "label_column": "tgt",
           "max_length": 24, "generation": {"max_new_tokens": 6}, "output_dir": run,
           "max_steps": 2, "per_device_train_batch_size": 4, "use_cpu": True,
           "export": {"int8": True}}
    res = run_recipe(Recipe.from_dict(raw), progress=False)
    capsys.readouterr()
    rt = res["runtimes"]
    assert list(rt) == [PYTORCH, "onnx-fp32", "onnx-int8"]
    for r in rt.values():
        assert {"bleu", "chrf", "exact_match", "agreement", "latency_b1_ms", "latency_b32_ms",
                "size_mb", "file"} <= set(r)
        assert r["latency_b1_ms"] > 0 and r["latency_b32_ms"] > 0
    assert rt["onnx-fp32"]["agreement"] == 1.0 and rt["onnx-fp32"]["bleu"] == rt[PYTORCH]["bleu"]
    assert rt[PYTORCH]["bleu"] == pytest.approx(res["student"]["bleu"])
    student = os.path.join(run, "student")
    fp32 = json.load(open(os.path.join(student, "onnx", "export.json")))["files"]["fp32"]
    assert rt["onnx-fp32"]["size_bytes"] == sum(  # the graphs and the weights they share
        os.path.getsize(os.path.join(student, "onnx", f))
        for f in [*fp32["graphs"].values(), fp32["weights_file"]])
    exp = res["export"]
    assert exp["serve_variant"] in ("fp32", "int8") and exp["teacher"]["bleu"] == res["teacher"]["bleu"]
    card = open(os.path.join(student, "README.md")).read()
    assert "## Runtimes" in card and f"Serve: `{exp['serve']}`" in card
    assert f'OnnxSeq2SeqGenerator("onnx", variant="{exp["serve_variant"]}")' in card
    out = write_report([run], str(tmp_path / "report"))
    assert [r["runtime"] for r in out["runtime_rows"]] == [PYTORCH, PYTORCH, "onnx-fp32", "onnx-int8"]
    assert out["runtime_rows"][2]["bleu"] == rt["onnx-fp32"]["bleu"]
    assert "| BLEU | chrF |" in open(out["markdown"]).read()
    assert main(["evaluate", run, "--runtimes", "--no-latency", "--no-progress"]) == 0
    again = json.load(open(os.path.join(student, "onnx", "evaluation.json")))
    assert again["task"] == "seq2seq" and again["runtimes"]["onnx-fp32"]["bleu"] == rt["onnx-fp32"]["bleu"]


def test_recipe_four_bit_export_serves_the_packed_codes(tiny_task, capsys):
    """``export: {four_bit: true}`` on a 4-bit quantized-distilled student: model_4bit.onnx is
    written, measured, predicts what the PyTorch quantized student predicts on the test split,
    and is the file the card says to serve; a bucket size MatMulNBits cannot take for this
    model fails before training, naming the sizes that work."""
    q4 = [{"method": "quantize", "bits": 4, "bucket_size": 16}]
    path, run = _recipe(tiny_task, export={"four_bit": True, "int8": False}, compression=q4)
    assert main(["distill", path, "--no-progress"]) == 0
    capsys.readouterr()
    res = json.load(open(os.path.join(run, "results.json")))
    rt = res["runtimes"]
    assert list(rt) == [PYTORCH, "onnx-fp32", "onnx-4bit"]
    assert rt["onnx-4bit"]["agreement"] == 1.0 and rt["onnx-4bit"]["file"] == "onnx/model_4bit.onnx"
    assert rt["onnx-4bit"]["accuracy"] == rt[PYTORCH]["accuracy"]
    assert rt["onnx-4bit"]["size_bytes"] < rt["onnx-fp32"]["size_bytes"]
    assert res["export"]["serve"] == "onnx/model_4bit.onnx"
    card = open(os.path.join(run, "student", "README.md")).read()
    assert "Serve: `onnx/model_4bit.onnx`" in card and "ONNX Runtime 4-bit" in card

    # 24 is no power of two: refused once the student is built, before training (no student,
    # no run outputs).
    bad = str(tiny_task["tmp"] / "bad")
    path, _ = _recipe(tiny_task, export={"four_bit": True}, output_dir=bad,
                      compression=[{"method": "quantize", "bits": 4, "bucket_size": 24}])
    assert main(["distill", path, "--no-progress"]) == 2
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("distilkit distill: error:")]
    assert len(errors) == 1 and "Traceback" not in err
    assert "export.four_bit: layer" in errors[0] and "bucket_size 24" in errors[0]
    assert "one of bucket_size [16, 32]" in errors[0]
    assert not os.path.exists(os.path.join(bad, "student"))
    assert not os.path.exists(os.path.join(bad, "results.json"))


def test_a_sentence_pair_bilstm_export_gets_its_two_sentences(tmp_path):
    """The word tokenizer encodes a pair as one sequence (token_type_ids 1 on the second
    sentence), which the PyTorch BiLSTM cuts in two itself; the ONNX graph takes the two
    sentences as separate inputs, and OrtClassifier cuts them as the model does: the same
    logits, so the same figures."""
    from test_export import TEXTS

    from distilkit.compress import load_compressed
    from distilkit.export.measure import OrtClassifier
    from distilkit.students.bilstm import build_bilstm_student

    pair = str(tmp_path / "pair")
    model, tok = build_bilstm_student(None, None, TEXTS, embedding_init="random", seed=0,
                                      embedding_dim=8, hidden_size=6, mlp_hidden_size=6,
                                      sentence_pair=True, dropout=0.0)
    model.eval().save_pretrained(pair)
    tok.save_pretrained(pair)
    firsts, seconds = TEXTS, TEXTS[::-1]
    ex.export_onnx(pair, check_data=list(zip(firsts, seconds)))
    enc = tok(list(firsts), list(seconds), padding=True, return_tensors="pt")
    reloaded = load_compressed(pair).eval()
    with torch.no_grad():
        ref = reloaded(**enc).logits
    got = OrtClassifier(os.path.join(pair, "onnx", "model.onnx"), reloaded.config)(**enc)["logits"]
    torch.testing.assert_close(got, ref, rtol=0, atol=ex.TOLERANCE)
    from datasets import Dataset

    ds = Dataset.from_dict({"a": firsts * 2, "b": seconds * 2, "label": [0, 1] * len(firsts)})
    res = evaluate_export(os.path.join(pair, "onnx"), ds, text_column="a", text_pair_column="b",
                          max_length=16, latency=False, progress=False)
    assert res["runtimes"]["onnx-fp32"]["agreement"] == 1.0
    assert res["runtimes"]["onnx-fp32"]["accuracy"] == res["runtimes"][PYTORCH]["accuracy"]


def test_dry_run_says_what_the_export_step_will_write(tiny_task, capsys):
    path, run = _recipe(tiny_task, export={"int8": True}, compression=[])
    assert main(["distill", path, "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert ("export   onnx into student/onnx (model.onnx + int8); every runtime measured on the "
            "test split") in printed
    assert not os.path.exists(run)
    path, _ = _recipe(tiny_task, compression=[])
    assert main(["distill", path, "--dry-run"]) == 0
    assert "export   none" in capsys.readouterr().out
