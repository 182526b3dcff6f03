"""write_report: the markdown table (teacher row, retention, compression, speed-up), a
non-empty PNG, and clear errors for directories without results."""
import json
import os

import pytest
from conftest import tiny_bert
from tiny_text import tiny_dataset, tiny_tokenizer

from distilkit.report import build_rows, load_results, write_report

TEACHER = {"accuracy": 0.80, "macro_f1": 0.79, "parameters": 22_700_000, "nonzero_parameters": 22_700_000,
           "size_on_disk_bytes": 90_000_000, "bits_per_weight": 31.7, "latency_ms_batch1": 10.0,
           "latency_ms_batch32": 480.0, "peak_memory_mb": 180.0}


def run_dir(tmp_path, name, student, recipe=None, teacher=TEACHER):
    d = tmp_path / name
    d.mkdir()
    (d / "results.json").write_text(json.dumps(
        {"name": name, "teacher": teacher, "student": student, "recipe": recipe or {}}))
    return str(d)


def test_table_ratios_and_plot(tmp_path):
    a = run_dir(tmp_path, "kd-3layer", {**TEACHER, "accuracy": 0.76, "parameters": 11_000_000,
                                        "size_on_disk_bytes": 45_000_000, "latency_ms_batch1": 5.0,
                                        "latency_ms_batch32": 240.0},
                {"student": {"type": "from_teacher", "num_layers": 3}, "alpha_kd": 0.5,
                 "alpha_ce": 0.5, "temperature": 2.0,
                 "compression": [{"method": "quantize", "bits": 4, "bucket_size": 256}],
                 "teacher": "/models/minilm/"})
    b = run_dir(tmp_path, "bilstm", {**TEACHER, "accuracy": 0.72, "parameters": 3_000_000,
                                     "size_on_disk_bytes": 3_000_000, "latency_ms_batch1": 2.0,
                                     "latency_ms_batch32": 60.0})
    out = write_report([a, b], str(tmp_path / "report"))
    md = open(out["markdown"]).read()
    lines = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert len(lines) == 4  # header, teacher, two students
    assert "**minilm** (teacher)" in lines[1] and "100.0 %" in lines[1]
    kd = next(ln for ln in lines if ln.startswith("| kd-3layer"))
    assert "95.0 %" in kd and "2.00x" in kd and "11,000,000" in kd and "45.00" in kd
    bl = next(ln for ln in lines if ln.startswith("| bilstm"))
    assert "90.0 %" in bl and "30.00x" in bl and "8.00x" in bl  # size 90/3, b32 480/60
    assert "quantize(bits=4, bucket_size=256)" in md and "loss kd=0.5, ce=0.5" in md
    assert "![accuracy vs size and latency](report.png)" in md
    png = open(out["plot"], "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    rows = json.load(open(out["json"]))["rows"]
    assert [r["name"] for r in rows] == ["minilm", "kd-3layer", "bilstm"]
    assert rows[2]["size_ratio"] == pytest.approx(30.0)


def test_report_from_real_evaluations(tmp_path):
    from distilkit.evaluate import evaluate_model

    tok, ds = tiny_tokenizer(), tiny_dataset(16)
    figs = {}
    for name, layers in (("teacher", 4), ("student", 1)):
        figs[name] = evaluate_model(tiny_bert(layers=layers), tok, ds, max_length=16,
                                    latency_runs=(2, 1), warmup=1)
    d = run_dir(tmp_path, "tiny", figs["student"], teacher=figs["teacher"])
    out = write_report([d], str(tmp_path / "r"), title="Tiny")
    rows = out["rows"]
    assert rows[1]["size_ratio"] > 1.5 and rows[1]["parameters"] < rows[0]["parameters"]
    assert open(out["markdown"]).read().startswith("# Tiny")
    assert os.path.getsize(out["plot"]) > 10_000


def test_different_teachers_are_flagged(tmp_path):
    a = run_dir(tmp_path, "a", {**TEACHER, "accuracy": 0.7})
    b = run_dir(tmp_path, "b", {**TEACHER, "accuracy": 0.7},
                teacher={**TEACHER, "parameters": 5, "accuracy": 0.9})
    md = open(write_report([a, b], str(tmp_path / "r"))["markdown"]).read()
    assert "do not share one teacher" in md
    rows = build_rows([load_results(a), load_results(b)])
    assert rows[2]["retention_pct"] == pytest.approx(100 * 0.7 / 0.9)


def test_missing_results_are_named(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="missing results.json; it holds neither"):
        write_report([str(empty)], str(tmp_path / "r"))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="saved model but no results"):
        write_report([str(model)], str(tmp_path / "r"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_results(str(tmp_path / "nowhere"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "results.json").write_text(json.dumps({"name": "x", "teacher": TEACHER}))
    with pytest.raises(ValueError, match="no 'student' figures"):
        load_results(str(bad))
    # A run's student/ directory finds the run's results.
    good = run_dir(tmp_path, "good", TEACHER)
    os.makedirs(os.path.join(good, "student"))
    assert load_results(os.path.join(good, "student"))["name"] == "good"
