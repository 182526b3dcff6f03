"""Bad recipes and bad data files, as users write them: each fails before any training with
exit code 2 and one line that names the field (no traceback), and leaves no student, results
or cache shard behind that could pass for a finished run."""
import csv
import os

import pytest

from distilkit.cli import main
from test_cli import _recipe


def _write(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def _files(tmp, kind):
    """Bad data files, by kind."""
    good = [("a good film", 1), ("a dull film", 0)] * 8
    if kind == "missing_file":
        return {"train": str(tmp / "nope.csv"), "validation": str(tmp / "nope.csv")}
    if kind == "header_only":
        return {"train": _write(tmp / "t.csv", ["text", "label"], good),
                "validation": _write(tmp / "v.csv", ["text", "label"], [])}
    if kind == "columns_differ":
        return {"train": [_write(tmp / "a.csv", ["text", "label"], good),
                          _write(tmp / "b.csv", ["sentence", "label"], good)],
                "validation": _write(tmp / "v.csv", ["text", "label"], good)}
    if kind == "single_file":
        return _write(tmp / "all.csv", ["text", "label"], good)
    if kind == "unknown_eval_label":
        v = _write(tmp / "v.csv", ["text", "label"], [("odd", 7)] + good)
        return {"train": _write(tmp / "t.csv", ["text", "label"], good), "validation": v,
                "test": v}
    if kind == "empty_cell":
        return {"train": _write(tmp / "t.csv", ["text", "label"], [("", 1)] + good),
                "validation": _write(tmp / "v.csv", ["text", "label"], good)}
    if kind == "mixed_types":
        return {"train": _write(tmp / "t.csv", ["text", "label"], good),
                "validation": _write(tmp / "v.json", ["text", "label"], good)}
    raise KeyError(kind)


# (case id, recipe changes (callables get the tiny_task dict), text the error must contain)
CASES = [
    ("unknown_key", {"alpha_kd_weight": 1.0}, "unknown key 'alpha_kd_weight'"),
    ("negative_temperature", {"temperature": -1}, "temperature"),
    ("nan_temperature", {"temperature": float("nan")}, "temperature: nan"),
    ("inf_weight", {"alpha_ce": float("inf")}, "alpha_ce: inf"),
    ("all_weights_zero", {"alpha_kd": 0, "alpha_ce": 0}, "all loss weights are zero"),
    ("negative_weight", {"alpha_kd": -0.5}, "alpha_kd"),
    ("text_column", {"text_column": "sentence"}, "text_column"),
    ("label_column", {"label_column": "y"}, "label_column"),
    ("teacher_missing", {"teacher": "/nonexistent/teacher"}, "teacher"),
    ("teacher_not_a_model", lambda t: {"teacher": str(t["tmp"] / "not_a_model")}, "teacher"),
    ("teacher_wrong_type", {"teacher": 3}, "teacher"),
    ("teacher_adapter_missing", {"teacher_adapter": "/nonexistent/adapter"}, "teacher_adapter"),
    ("quant_bits", {"compression": [{"method": "quantize", "bits": 12}]}, "bits"),
    ("unknown_method", {"compression": [{"method": "shrink"}]}, "unknown"),
    ("method_field", {"compression": [{"method": "quantize", "bitz": 4}]}, "bitz"),
    ("compression_order", {"compression": [{"method": "quantize", "bits": 4},
                                           {"method": "prune_heads", "fraction": 0.5}]},
     "prune_heads after quantize"),
    ("compression_not_a_list", {"compression": {"method": "quantize"}}, "compression"),
    ("bucket_nan", {"compression": [{"method": "quantize", "bucket_size": float("nan")}]},
     "bucket_size"),
    ("seq2seq_key", {"sequence_kd": {"num_beams": 2}}, "sequence_kd"),
    ("cache_in_seq2seq", {"task": "seq2seq", "teacher_cache": True}, "teacher_cache"),
    ("unknown_task", {"task": "regression"}, "task"),
    ("learning_rate_text", {"learning_rate": "abc"}, "learning_rate"),
    ("max_steps_text", {"max_steps": "ten"}, "max_steps"),
    ("save_strategy_word", {"save_strategy": "sometimes"}, "save_strategy"),
    ("bool_field", {"teacher_cache": "perhaps"}, "teacher_cache"),
    ("max_length_too_long", {"max_length": 100000}, "max_length"),
    ("max_length_tiny", {"max_length": 1}, "max_length"),
    ("layer_map_outside", {"alpha_patient": 1.0, "layer_map": [[1, 7]]}, "teacher layer 7"),
    ("layer_map_shape", {"alpha_patient": 1.0, "layer_map": "every"}, "layer_map"),
    ("student_type", {"student": {"type": "tiny"}}, "student"),
    ("student_key", {"student": {"type": "from_teacher", "layers": 2}}, "student"),
    ("output_dir_is_a_file", lambda t: {"output_dir": str(t["tmp"] / "a_file")}, "output_dir"),
    ("cache_dir_is_a_file", lambda t: {"teacher_cache": True,
                                       "cache_dir": str(t["tmp"] / "a_file")}, "cache_dir"),
    ("push_without_repo", {"push_to_hub": True}, "hub_repo_id"),
    ("push_without_token", {"push_to_hub": True, "hub_repo_id": "me/student"}, "push_to_hub"),
    ("lora_unmerged", {"student": {"type": "from_teacher", "num_layers": 2,
                                   "lora": {"r": 2, "target_modules": ["query"]}},
                       "compression": [{"method": "quantize", "bits": 4}],
                       "save_merged_adapter": False}, "save_merged_adapter"),
    ("data_file_missing", lambda t: {"data_files": _files(t["tmp"], "missing_file")}, "data_files"),
    ("empty_split", lambda t: {"data_files": _files(t["tmp"], "header_only")}, "empty"),
    ("columns_differ", lambda t: {"data_files": _files(t["tmp"], "columns_differ")}, "columns"),
    ("no_validation_split", lambda t: {"data_files": _files(t["tmp"], "single_file")},
     "validation_fraction"),
    ("fraction_out_of_range", lambda t: {"data_files": _files(t["tmp"], "single_file"),
                                         "validation_fraction": 1.5}, "validation_fraction"),
    ("unknown_eval_label", lambda t: {"data_files": _files(t["tmp"], "unknown_eval_label")},
     "label"),
    ("bad_rows_error", lambda t: {"data_files": _files(t["tmp"], "empty_cell"),
                                  "bad_rows": "error"}, "bad_rows"),
    ("bad_rows_value", {"bad_rows": "ignore"}, "bad_rows"),
    ("mixed_file_types", lambda t: {"data_files": _files(t["tmp"], "mixed_types")}, "data_files"),
]


@pytest.mark.parametrize("name, change, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_before_any_work(tiny_task, capsys, monkeypatch, name, change,
                                               message):
    tmp = tiny_task["tmp"]
    (tmp / "a_file").write_text("not a directory")
    (tmp / "not_a_model").mkdir()
    (tmp / "not_a_model" / "notes.txt").write_text("no config.json here")
    monkeypatch.setenv("HF_HOME", str(tmp / "hf_home"))   # no Hub token anywhere
    monkeypatch.delenv("HF_TOKEN", raising=False)
    change = change(tiny_task) if callable(change) else change
    change = {"cache_dir": str(tmp / "cache"), **change}
    path, out = _recipe(tiny_task, **change)
    assert main(["distill", path, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [ln for ln in err.splitlines() if ln.startswith("distilkit distill: error:")]
    assert len(errors) == 1, err
    assert message in errors[0], errors[0]
    assert not os.path.exists(os.path.join(out, "student"))
    assert not os.path.exists(os.path.join(out, "results.json"))
    cache = tmp / "cache"
    shards = [d for _, dirs, _ in os.walk(cache) for d in dirs if d.startswith("shard-")] \
        if cache.is_dir() else []
    assert not shards



def _saved_student(tiny_task, tmp):
    """A finished run (the tiny recipe) and its student directory."""
    path, out = _recipe(tiny_task, output_dir=str(tmp / "run_ok"), compression=[])
    assert main(["distill", path, "--no-progress"]) == 0
    return os.path.join(out, "student")


@pytest.mark.parametrize("fault", ["truncated_weights", "pickle_weights"])
def test_damaged_model_files_are_one_line_in_evaluate(tiny_task, capsys, fault):
    """Was: a SafetensorError / an UnpicklingError traceback."""
    import shutil

    tmp = tiny_task["tmp"]
    student = _saved_student(tiny_task, tmp)
    broken = str(tmp / "broken")
    shutil.copytree(student, broken)
    weights = os.path.join(broken, "model.safetensors")
    if fault == "truncated_weights":
        data = open(weights, "rb").read()
        open(weights, "wb").write(data[: len(data) // 2])
    else:
        import pickle
        os.remove(weights)
        with open(os.path.join(broken, "pytorch_model.bin"), "wb") as f:
            pickle.dump({"not": "tensors"}, f)
    capsys.readouterr()
    assert main(["evaluate", broken, "--no-latency", "--data-files",
                 f"test={tiny_task['data_files']['test']}"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert len([ln for ln in err.splitlines() if ln.startswith("distilkit evaluate: error:")]) == 1


def test_a_full_disk_while_saving_leaves_no_student(tiny_task, capsys, monkeypatch):
    """Was: `No space left on device` as a traceback, after training. Now one line, and the
    half-written student directory is removed (written aside, renamed only when complete)."""
    import errno

    import distilkit.compress.base as cb

    real = cb.save_compressed

    def full_disk(model, out_dir, **kw):
        real(model, out_dir, **kw)        # some files written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", out_dir)
    monkeypatch.setattr(cb, "save_compressed", full_disk)
    path, out = _recipe(tiny_task, compression=[])
    assert main(["distill", path, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err
    assert not os.path.exists(os.path.join(out, "student"))
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]


def test_a_failure_in_the_final_evaluation_leaves_no_student(tiny_task, capsys, monkeypatch):
    """Was: the student was put in place before its evaluation, so a crash there (for
    instance max_length beyond the positions) left a student and no results."""
    from distilkit.tasks.classification import ClassificationTask

    def broken(self, *a, **k):
        raise RuntimeError("evaluation failed")
    monkeypatch.setattr(ClassificationTask, "evaluate", broken)
    path, out = _recipe(tiny_task, compression=[])
    assert main(["distill", path, "--no-progress"]) == 2
    assert "evaluation failed" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(out, "student"))
    assert not os.path.exists(os.path.join(out, "results.json"))
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]
