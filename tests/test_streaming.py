"""``streaming: true``: the training split read as a stream (datasets' IterableDataset),
cleaned and tokenized on the fly, the teacher run live every step, ``max_steps`` required.
One process trains the same student from the stream as in memory (same batches in the same
order), and two gloo processes train the same student as one. A stream with the teacher
cache and the shuffle buffer: tests/test_streaming_cache.py."""
import csv
import json
import os
import subprocess
import sys

import pytest
import yaml

from conftest import tiny_bert, tiny_sentences, tiny_tokenizer

from distilkit.cli import main
from distilkit.data import STREAM_HEAD, DataSpec, load_raw, train_stream

REPO = os.path.join(os.path.dirname(__file__), "..")


def _write_csv(path, rows, header=("text", "label")):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


@pytest.fixture
def stream_task(tmp_path):
    """A tiny teacher without dropout (so runs that see the same batches train the same
    student, up to float summation order), an unlabelled transfer set (no label column: KD
    terms only) and labelled evaluation splits."""
    tok = tiny_tokenizer(str(tmp_path / "teacher"))
    teacher = tiny_bert(vocab=tok.vocab_size, layers=4, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    # A random classifier's logits are nearly equal, and a student from its layers would
    # match them from the start: sharpen them so the KD loss has something to learn.
    teacher.classifier.weight.data *= 40
    teacher.save_pretrained(str(tmp_path / "teacher"))
    # Sentences of different lengths: each process pads its own micro-batch to its own
    # longest sentence (batches that process 0 read and sent would not concatenate).
    transfer = _write_csv(tmp_path / "transfer.csv",
                          [(t + " very" * (i % 5),) for i, (t, _) in
                           enumerate(tiny_sentences(64, seed=5))], header=("text",))
    labelled = _write_csv(tmp_path / "train.csv", tiny_sentences(64, seed=0))
    files = {"train": transfer,
             "validation": _write_csv(tmp_path / "validation.csv", tiny_sentences(16, seed=1)),
             "test": _write_csv(tmp_path / "test.csv", tiny_sentences(16, seed=2))}
    return {"teacher": str(tmp_path / "teacher"), "data_files": files, "tmp": tmp_path,
            "labelled": labelled}


def _recipe(task, name="run", **kw):
    r = {"name": "stream", "teacher": task["teacher"],
         "student": {"type": "from_teacher", "num_layers": 2},
         "dataset": None, "data_files": task["data_files"],
         "streaming": True, "max_length": 16, "alpha_kd": 1.0, "alpha_ce": 0.0,
         "temperature": 2.0, "max_steps": 6, "per_device_train_batch_size": 8,
         "learning_rate": 1e-3, "logging_steps": 1, "seed": 0,
         "output_dir": str(task["tmp"] / name), "use_cpu": True}
    r.update(kw)
    path = task["tmp"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump(r))
    return str(path), r["output_dir"]


def _distill_in_two_processes(path: str) -> None:
    """``distilkit distill path`` launched by accelerate as two gloo processes on CPU."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    config = os.path.join(REPO, "recipes", "accelerate", "cpu_2proc.yaml")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config,
           "-m", "distilkit", "distill", path, "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _losses(run_dir):
    res = json.load(open(os.path.join(run_dir, "results.json")))
    return res, [h["loss"] for h in res["train_log"]]


def _student(run_dir):
    import torch
    from transformers import AutoModelForSequenceClassification

    m = AutoModelForSequenceClassification.from_pretrained(os.path.join(run_dir, "student"))
    return torch.cat([p.detach().flatten() for p in m.parameters()])


def test_a_stream_trains_the_student_a_loaded_split_trains(stream_task):
    """The same labelled training split, streamed and tokenized on the fly vs loaded and
    tokenized up front (sequential order, so the batches are the same): the same losses,
    both terms, and the same student."""
    import torch

    files = {**stream_task["data_files"], "train": stream_task["labelled"]}
    common = dict(max_steps=3, data_files=files, alpha_kd=0.5, alpha_ce=0.5)
    path, streamed = _recipe(stream_task, "streamed", **common)
    assert main(["distill", path, "--no-progress"]) == 0
    path, loaded = _recipe(stream_task, "loaded", streaming=False,
                           train_sampling_strategy="sequential", **common)
    assert main(["distill", path, "--no-progress"]) == 0
    res, s_losses = _losses(streamed)
    _, l_losses = _losses(loaded)
    assert res["streaming"] == {"head_rows": 64} and res["teacher_loaded"]
    assert res["global_steps"] == 3 and len(s_losses) == 3
    assert s_losses == pytest.approx(l_losses, rel=1e-5)
    assert torch.allclose(_student(streamed), _student(loaded), atol=1e-6)


def test_two_processes_train_the_student_one_process_trains(stream_task):
    """Two gloo processes of 4 examples each read the stream as one process of 8 does: each
    keeps its half of every global batch of 8, so the per-step losses (averaged over the
    processes) and the student agree to float summation order (tolerance 1e-4)."""
    import torch

    path, one = _recipe(stream_task, "one", per_device_train_batch_size=8)
    assert main(["distill", path, "--no-progress"]) == 0
    path, two = _recipe(stream_task, "two", per_device_train_batch_size=4)
    _distill_in_two_processes(path)
    res1, l1 = _losses(one)
    res2, l2 = _losses(two)
    assert res2["processes"] == 2 and res1["processes"] == 1
    # 6 steps of 8 rows: 48 of the 64 rows; the train log keeps the last three steps.
    assert res2["global_steps"] == res1["global_steps"] == 6 and len(l2) == 3
    assert l2 == pytest.approx(l1, rel=1e-4)
    assert torch.allclose(_student(one), _student(two), atol=1e-4)


def test_streaming_needs_max_steps_and_a_real_evaluation_split(stream_task, capsys):
    path, out = _recipe(stream_task, max_steps=-1)
    assert main(["distill", path, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "max_steps: -1" in err[0] and "streaming: true" in err[0]
    files = dict(stream_task["data_files"])
    del files["validation"]
    path, out = _recipe(stream_task, data_files=files, validation_fraction=0.1)
    assert main(["distill", path, "--no-progress"]) == 2
    assert "validation_fraction: 0.1" in capsys.readouterr().err
    path, out = _recipe(stream_task, data_files=files, test_split=None)
    assert main(["distill", path, "--no-progress"]) == 2
    assert "eval_split: split 'validation' is not in the dataset" in capsys.readouterr().err
    path, out = _recipe(stream_task, augment={"n_iter": 2})
    assert main(["distill", path, "--no-progress"]) == 2
    assert "augment:" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(out, "student"))


def test_stream_rows_are_cleaned_and_labelled_on_the_fly(tmp_path):
    rows = [("a good film", "pos"), ("", "neg"), ("a bad film", None), ("dull", "neg")]
    rows += [(f"film {i}", "pos" if i % 2 else "neg") for i in range(STREAM_HEAD + 4)]
    files = {"train": _write_csv(tmp_path / "train.csv", rows),
             "validation": _write_csv(tmp_path / "v.csv", [("good", "pos"), ("bad", "neg")])}
    spec = DataSpec(dataset=None, data_files=files, test_split=None, streaming=True)
    notes = []
    raw = load_raw(spec, notes, classes=True)
    # Only the first rows are read up front, and said so.
    assert len(raw["train"]) == STREAM_HEAD - 2 and "read as a stream" in " ".join(notes)
    got = list(train_stream(spec, ["neg", "pos"]))
    assert len(got) == len(rows) - 2 and got[0] == {"text": "a good film", "label": 1}
    assert got[1] == {"text": "dull", "label": 0}
    with pytest.raises(ValueError, match=r"text_column: row 2 of split 'train'"):
        list(train_stream(DataSpec(dataset=None, data_files=files, test_split=None,
                                   streaming=True, bad_rows="error"), ["neg", "pos"]))
    # A class the first rows and the evaluation split never showed cannot join mid-run.
    _write_csv(tmp_path / "train.csv", rows + [("odd one", "meh")])
    with pytest.raises(ValueError, match=r"label 'meh', which is not among the classes"):
        list(train_stream(spec, ["neg", "pos"]))
    assert len(list(train_stream(DataSpec(dataset=None, data_files=files, test_split=None,
                                          streaming=True, max_train_samples=5)))) == 5


def test_a_dataset_directory_streams_like_a_hub_dataset(stream_task):
    """``dataset:`` a name load_dataset resolves (here a local directory of split files, as
    a hub dataset's repository is): its training split streams, the others load."""
    d = stream_task["tmp"] / "hubby"
    d.mkdir()
    # (a dataset directory's splits share their columns: the labelled training file here)
    for split, f in {**stream_task["data_files"], "train": stream_task["labelled"]}.items():
        os.link(f, d / f"{split}.csv")
    spec = DataSpec(dataset=str(d), streaming=True)
    raw = load_raw(spec, classes=True)
    assert len(raw["validation"]) == 16 and len(raw["train"]) == 64
    rows = list(train_stream(spec, ["0", "1"]))
    assert len(rows) == 64 and {r["label"] for r in rows} == {0, 1}
    with pytest.raises(ValueError, match=r"train_split: split 'big' is not in"):
        load_raw(DataSpec(dataset=str(d), streaming=True, train_split="big"), classes=True)
    path, out = _recipe(stream_task, dataset=str(d), data_files=None, max_steps=2)
    assert main(["distill", path, "--no-progress"]) == 0
    res, losses = _losses(out)
    assert res["global_steps"] == 2 and "accuracy" in res["student"]


def test_streaming_is_refused_for_seq2seq():
    with pytest.raises(ValueError, match="streaming: true applies to task: classification"):
        load_raw(DataSpec(streaming=True))


def test_the_dry_run_does_not_count_the_stream_as_its_first_rows(stream_task, capsys):
    """Was: the dry run printed the rows read up front (64 here) as the training split's size."""
    path, out = _recipe(stream_task)
    assert main(["distill", path, "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "train: streamed (first 64 rows read to check it)" in printed
    assert "validation: 16" in printed and "6 steps of 8 examples" in printed
    assert not os.path.exists(out)
