"""The recipe pipeline and CLI on a tiny offline task: outputs, overrides, bad input,
and a real two-process ``accelerate launch``."""
import json
import os
import subprocess
import sys

import pytest
import yaml

from distilkit.cli import main


def _recipe(tiny_task, **kw):
    r = {
        "name": "tiny", "teacher": tiny_task["teacher"],
        "student": {"type": "from_teacher", "num_layers": 2},
        "dataset": None, "data_files": tiny_task["data_files"], "max_length": 16,
        "alpha_kd": 0.5, "alpha_ce": 0.5, "temperature": 2.0, "max_steps": 4,
        "per_device_train_batch_size": 8, "learning_rate": 1e-3,
        "output_dir": str(tiny_task["tmp"] / "run"), "use_cpu": True,
    }
    r.update(kw)
    path = tiny_task["tmp"] / "recipe.yaml"
    path.write_text(yaml.safe_dump(r))
    return str(path), r["output_dir"]


def test_distill_writes_student_results_recipe_and_card(tiny_task, capsys):
    from transformers import AutoModelForSequenceClassification

    import distilkit

    # teacher_cache with a hidden-state loss: the cache is skipped with a note, not a crash.
    path, out = _recipe(tiny_task, alpha_patient=10.0, alpha_hidden=1.0, teacher_cache=True,
                        cache_dir=str(tiny_task["tmp"] / "cache"), compression=[])
    assert main(["distill", path, "--no-progress", "--max_steps", "3", "--student.num_layers", "1"]) == 0
    printed = capsys.readouterr()
    assert "teacher_cache: not used" in printed.err and "retention" in printed.out
    # --no-progress hides the libraries' bars as well (tokenizing, loading, saving)
    assert "examples/s" not in printed.err and "it/s]" not in printed.err
    res = json.load(open(os.path.join(out, "results.json")))
    for who in ("teacher", "student"):
        for k in ("accuracy", "macro_f1", "parameters", "size_on_disk_bytes", "latency_ms_batch32"):
            assert k in res[who], (who, k)
    assert res["student"]["parameters"] < res["teacher"]["parameters"]
    resolved = yaml.safe_load(open(os.path.join(out, "recipe.yaml")))
    assert resolved["max_steps"] == 3 and resolved["student"]["num_layers"] == 1
    student_dir = os.path.join(out, "student")
    assert os.path.isfile(os.path.join(student_dir, "README.md"))
    m = AutoModelForSequenceClassification.from_pretrained(student_dir)
    assert m.config.num_hidden_layers == 1
    assert distilkit.from_pretrained(student_dir).config.num_hidden_layers == 1


@pytest.mark.parametrize("change, message", [
    ({"alpha_kd_weight": 1.0}, "unknown key 'alpha_kd_weight'"),
    ({"temperature": -1}, "temperature"),
    ({"alpha_kd": 0, "alpha_ce": 0}, "all loss weights are zero"),
    ({"text_column": "sentence"}, "columns are"),
    ({"label_column": "y"}, "label_column"),
    ({"teacher": "/nonexistent/teacher"}, "does not exist"),
    ({"compression": [{"method": "quantize", "bits": 12}]}, "bits"),
    ({"compression": [{"method": "shrink"}]}, "unknown"),
    ({"sequence_kd": {"num_beams": 2}}, "sequence_kd: applies to task: seq2seq only"),
    ({"task": "seq2seq", "teacher_cache": True}, "teacher_cache: true applies to task: classification"),
])
def test_bad_input_fails_before_training_and_leaves_no_model(tiny_task, capsys, change, message):
    path, out = _recipe(tiny_task, **change)
    assert main(["distill", path, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not os.path.exists(os.path.join(out, "student"))


def test_empty_split_and_layer_map(tiny_task, capsys):
    empty = tiny_task["tmp"] / "empty.csv"
    empty.write_text("text,label\n")
    files = dict(tiny_task["data_files"], validation=str(empty))
    path, out = _recipe(tiny_task, data_files=files)
    assert main(["distill", path, "--no-progress"]) == 2
    assert "empty" in capsys.readouterr().err
    path, out = _recipe(tiny_task, alpha_patient=1.0, layer_map=[[1, 7]])
    assert main(["distill", path, "--no-progress"]) == 2
    assert "teacher layer 7" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(out, "student"))


def test_two_process_accelerate_launch(tiny_task):
    path, out = _recipe(tiny_task, max_steps=3)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    config = os.path.join(os.path.dirname(__file__), "..", "recipes", "accelerate", "cpu_2proc.yaml")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config,
           "-m", "distilkit", "distill", path, "--no-progress", "--logging_steps", "1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.load(open(os.path.join(out, "results.json")))
    assert res["student"]["parameters"] > 0
    # two real gloo processes trained together (accelerate --cpu alone would start one)
    assert res["processes"] == 2 and res["global_steps"] == 3


RECIPES = os.path.join(os.path.dirname(__file__), "..", "recipes")


@pytest.mark.parametrize("name", sorted(
    os.path.join(d, f) for d in ("", "deploy")
    for f in os.listdir(os.path.join(RECIPES, d)) if f.endswith(".yaml")))
def test_shipped_recipes_are_valid(name):
    """Every recipe in recipes/ parses, passes validation, builds its DistilConfig and its
    compression configs: a typo in a shipped recipe fails here, not in a user's run."""
    from distilkit.compress.base import config_from_dict
    from distilkit.recipe import Recipe

    r = Recipe.load(os.path.join(os.path.dirname(__file__), "..", "recipes", name))
    args = r.distil_config()
    assert (args.max_steps > 0 or args.num_train_epochs > 0) and \
        (args.alpha_kd or args.alpha_ce or args.alpha_mse)
    from distilkit.budget import budget_from_entry, is_auto
    for entry in r.keys.compression:
        # {method: auto, ...} is the budget search's entry (distilkit.budget), not a method
        budget_from_entry(entry, r.keys.max_length) if is_auto(entry) else config_from_dict(entry)


def _student_params(run_dir):
    import torch
    from transformers import AutoModelForSequenceClassification

    m = AutoModelForSequenceClassification.from_pretrained(os.path.join(run_dir, "student"))
    return torch.cat([p.detach().flatten() for p in m.parameters()])


def test_ensemble_and_adapter_teachers_train_the_same_from_the_cache(tiny_task):
    """A recipe trains the same student with the teacher-output cache as without it, for an
    ensemble (every member's logits cached, not only the first's) and for a teacher with a
    peft adapter (the merged teacher's logits, not the base model's)."""
    import shutil

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from conftest import tiny_bert

    tmp, t1 = tiny_task["tmp"], tiny_task["teacher"]
    t2 = str(tmp / "teacher2")
    shutil.copytree(t1, t2)
    vocab = AutoModelForSequenceClassification.from_pretrained(t1).config.vocab_size
    tiny_bert(vocab=vocab, layers=4, seed=9).save_pretrained(t2)
    lora = get_peft_model(AutoModelForSequenceClassification.from_pretrained(t1),
                          LoraConfig(r=2, target_modules=["query", "value"]))
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.fill_(0.2)
    lora.save_pretrained(str(tmp / "adapter"))
    for name, change in (("ens", {"teacher": [t1, t2], "ensemble_weights": [1, 2]}),
                         ("lora", {"teacher_adapter": str(tmp / "adapter")})):
        params = []
        for cached in (False, True):
            out = str(tmp / f"{name}-{cached}")
            path, _ = _recipe(tiny_task, output_dir=out, teacher_cache=cached,
                              cache_dir=str(tmp / f"cache-{name}"), max_steps=3, **change)
            assert main(["distill", path, "--no-progress"]) == 0
            params.append(_student_params(out))
        assert torch.allclose(params[0], params[1], atol=1e-5), name
    assert len(os.listdir(tmp / "cache-ens")) == 2  # one namespace per ensemble member


def test_quantized_distillation_continues_a_pretrained_student(tiny_task):
    """``student: {type: pretrained}`` + ``quantize`` continues a trained fp32 student (the
    continued rows of scripts/repro_quant.py); before any update that student is exactly the
    post-training quantization of the fp32 one."""
    import torch
    from transformers import AutoTokenizer

    from distilkit.compress import compress_, finalize_, load_compressed
    from distilkit.compress.quantize import PTQConfig

    path, out = _recipe(tiny_task, compression=[])
    assert main(["distill", path, "--no-progress"]) == 0
    fp32_dir = os.path.join(out, "student")
    path, out = _recipe(tiny_task, student={"type": "pretrained", "path": fp32_dir},
                        compression=[{"method": "quantize", "bits": 2, "bucket_size": 16}],
                        learning_rate=0.0, max_steps=1,
                        output_dir=str(tiny_task["tmp"] / "run_qd"))
    assert main(["distill", path, "--no-progress"]) == 0
    qd = load_compressed(os.path.join(out, "student")).eval()
    pm = load_compressed(fp32_dir).eval()
    compress_(pm, PTQConfig(bits=2, bucket_size=16))
    finalize_(pm)
    tok = AutoTokenizer.from_pretrained(fp32_dir)
    batch = tok(["a fine film", "dull and long", "not bad at all"], padding=True,
                return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(qd(**batch).logits, pm(**batch).logits)
        assert not torch.allclose(qd(**batch).logits, load_compressed(fp32_dir)(**batch).logits)


def test_a_fully_cached_run_never_loads_the_teacher(tiny_task, monkeypatch):
    """Issue 12 item 5: once the teacher's outputs and figures are cached, a rerun builds the
    student from the teacher's directory (only the kept layers, read lazily), trains from the
    cached logits and reports the cached teacher figures, without loading the teacher model; it
    trains exactly the student the first run trained."""
    import torch

    import distilkit.teachers

    import glob

    cache = str(tiny_task["tmp"] / "cache")
    runs = []
    for i in range(2):
        if i == 1:
            def refuse(*a, **k):
                raise AssertionError("the teacher was loaded on a fully cached run")
            monkeypatch.setattr(distilkit.teachers, "load_teacher", refuse)
            # The cached figures as a busy hour left them: the teacher 50x slower than it is.
            [figs] = glob.glob(os.path.join(cache, "**", "teacher_figures-*.json"),
                               recursive=True)
            stale = json.load(open(figs))
            stale["latency_ms_batch32"] *= 50
            json.dump(stale, open(figs, "w"))
        out = str(tiny_task["tmp"] / f"run{i}")
        path, _ = _recipe(tiny_task, output_dir=out, teacher_cache=True, cache_dir=cache,
                          max_steps=3)
        assert main(["distill", path, "--no-progress"]) == 0
        runs.append((json.load(open(os.path.join(out, "results.json"))), _student_params(out)))
    (first, p0), (second, p1) = runs
    assert first["teacher_loaded"] is True and second["teacher_loaded"] is False
    assert "cached" in second["teacher"]["figures_source"]
    for k in ("accuracy", "macro_f1", "parameters", "size_on_disk_bytes"):
        assert second["teacher"][k] == first["teacher"][k], k
    # The speed-up is timed in turns with the student, not read from the cached figures (the
    # teacher's architecture with random weights stands in: its weights are not read).
    assert second["teacher"]["latency_ms_batch32"] < stale["latency_ms_batch32"] / 5
    assert 0.2 < second["speedup_batch32"] < 10, second["speedup_batch32"]
    assert "in turns" in second["teacher"]["latency_method"]
    assert torch.equal(p0, p1)


def test_dry_run_checks_and_prints_the_plan_without_training(tiny_task, capsys, monkeypatch):
    import distilkit.teachers

    def refuse(*a, **k):
        raise AssertionError("a dry run of a from_teacher student loads no teacher model")
    monkeypatch.setattr(distilkit.teachers, "load_teacher", refuse)
    path, out = _recipe(tiny_task, compression=[{"method": "quantize", "bits": 4}])
    assert main(["distill", path, "--dry-run"]) == 0
    printed = capsys.readouterr().out
    for text in ("dry run: tiny", "38,434 parameters", "train: 96", "validation: 32",
                 "4 steps of 8 examples", "compress quantize", "# resolved recipe", "alpha_kd: 0.5"):
        assert text in printed, (text, printed)
    assert not os.path.exists(out)          # nothing written, not even the output directory
    # and the checks a run makes still fail the dry run, with one line
    path, out = _recipe(tiny_task, text_column="sentence")
    assert main(["distill", path, "--dry-run"]) == 2
    assert "columns are" in capsys.readouterr().err


def test_dry_run_of_the_seq2seq_recipe_trains_no_teacher(capsys, monkeypatch, tmp_path):
    """Was: the dry run of recipes/seq2seq_truecase.yaml trained the built-in BART teacher (a
    long job) when it was not cached yet. Now it says it would, and trains nothing."""
    import distilkit.seq2seq.teacher as st

    def refuse(*a, **k):
        raise AssertionError("a dry run trains no teacher")
    monkeypatch.setattr(st, "_train_and_save", refuse)
    monkeypatch.setattr(st, "is_trained", lambda out: False)
    recipe = os.path.join(RECIPES, "seq2seq_truecase.yaml")
    out = str(tmp_path / "s2s")
    assert main(["distill", recipe, "--dry-run", "--output_dir", out]) == 0
    printed = capsys.readouterr().out
    assert "builtin:truecase-bart (BART from a config)" in printed
    assert "not trained yet (2,000 steps)" in printed and "built from the teacher" in printed
    assert not os.path.exists(out)


def test_a_non_finite_loss_stops_the_run_and_saves_no_student(tiny_task, capsys):
    """Was: Trainer's NaN filter replaced the NaN loss by the running mean, and the run saved
    and reported a student trained on garbage."""
    import torch
    from transformers import AutoModelForSequenceClassification

    bad = str(tiny_task["tmp"] / "nan_teacher")
    t = AutoModelForSequenceClassification.from_pretrained(tiny_task["teacher"])
    with torch.no_grad():
        t.classifier.bias.fill_(float("nan"))
    t.save_pretrained(bad)
    AutoTokenizer = __import__("transformers").AutoTokenizer
    AutoTokenizer.from_pretrained(tiny_task["teacher"]).save_pretrained(bad)
    path, out = _recipe(tiny_task, teacher=bad)
    assert main(["distill", path, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "the loss is nan at step 1" in err and "learning_rate" in err
    assert "Traceback" not in err
    assert len([ln for ln in err.splitlines() if "error" in ln.lower()]) == 1
    assert not os.path.exists(os.path.join(out, "student"))
    assert not os.path.exists(os.path.join(out, "results.json"))


def test_temperature_nan_is_refused_by_the_config():
    from distilkit.config import DistilConfig

    with pytest.raises(ValueError, match="temperature: nan must be a finite number > 0"):
        DistilConfig(output_dir="/tmp/unused", temperature=float("nan"))
    with pytest.raises(ValueError, match="alpha_kd: inf"):
        DistilConfig(output_dir="/tmp/unused", alpha_kd=float("inf"))


def _three_class_csv(tmp, n=90):
    """A user's file: one CSV, string labels, three classes, one empty text cell."""
    import csv

    from conftest import tiny_sentences

    rows = []
    for i, (text, label) in enumerate(tiny_sentences(n, seed=3)):
        name = "neutral" if i % 3 == 0 else ("positive" if label else "negative")
        rows.append((text, name))
    rows[5] = ("", "positive")
    path = tmp / "mine.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["review", "sentiment"])
        w.writerows(rows)
    return str(path)


def test_string_labels_matched_to_the_teacher_by_name(tiny_task, capsys):
    """Labels as users have them: strings in one CSV split by fractions, a teacher whose
    classes are named in another order. The student answers with the data's names, and the
    teacher's figures read its logits by name (the old code crashed on string labels)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from conftest import tiny_bert
    from distilkit.data import DataSpec, load_raw

    tmp = tiny_task["tmp"]
    tdir = str(tmp / "teacher3")
    tok = AutoTokenizer.from_pretrained(tiny_task["teacher"])
    names = {0: "positive", 1: "negative", 2: "neutral"}       # not the data's (sorted) order
    t = tiny_bert(vocab=tok.vocab_size, layers=4, num_labels=3, seed=4,
                  id2label=names, label2id={v: k for k, v in names.items()})
    t.save_pretrained(tdir)
    tok.save_pretrained(tdir)
    csv_path = _three_class_csv(tmp)
    params = []
    for cached in (False, True):   # the live teacher's view and the cache's agree
        path, out = _recipe(tiny_task, teacher=tdir, data_files=csv_path, text_column="review",
                            label_column="sentiment", validation_fraction=0.2, test_fraction=0.2,
                            compression=[], teacher_cache=cached, cache_dir=str(tmp / "cache"),
                            output_dir=str(tmp / f"run-{cached}"))
        assert main(["distill", path, "--no-progress"]) == 0
        err = capsys.readouterr().err
        assert "dropped 1 of 90 rows" in err        # the empty cell, with a count
        params.append(_student_params(out))
    assert torch.allclose(params[0], params[1], atol=1e-5)
    res = json.load(open(os.path.join(out, "results.json")))
    student = AutoModelForSequenceClassification.from_pretrained(os.path.join(out, "student"))
    assert student.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    # The teacher's accuracy, by hand: its argmax class name against the row's name.
    spec = DataSpec(dataset=None, data_files=csv_path, text_column="review",
                    label_column="sentiment", validation_fraction=0.2, test_fraction=0.2)
    test = load_raw(spec, classes=True)["test"]
    data_names = test.features["sentiment"].names
    t.eval()
    with torch.no_grad():
        enc = tok(list(test["review"]), truncation=True, max_length=16, padding=True,
                  return_tensors="pt")
        pred = t(**enc).logits.argmax(-1).tolist()
    truth = [data_names[i] for i in test["sentiment"]]
    expected = sum(names[p] == n for p, n in zip(pred, truth)) / len(truth)
    assert res["teacher"]["accuracy"] == pytest.approx(expected)


def test_my_csv_my_labels_a_base_model(tiny_task, capsys, monkeypatch):
    """The user's run end to end: one CSV with string labels (three classes, an empty cell),
    a base model without a task head; the teacher is fine-tuned by distilkit on the CSV's own
    training split (planned by --dry-run without training, trained by `distilkit finetune`,
    reused by `distilkit distill`), then distilled; its figures reach results.json and the
    card."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertModel

    from conftest import tiny_bert_config

    tmp = tiny_task["tmp"]
    monkeypatch.setenv("DISTILKIT_CACHE", str(tmp / "dk_cache"))
    base = str(tmp / "base")
    tok = AutoTokenizer.from_pretrained(tiny_task["teacher"])
    BertModel(tiny_bert_config(vocab=tok.vocab_size, layers=4)).save_pretrained(base)
    tok.save_pretrained(base)
    path, out = _recipe(tiny_task, data_files=_three_class_csv(tmp), text_column="review",
                        label_column="sentiment", validation_fraction=0.2, test_fraction=0.2,
                        teacher={"base": base, "finetune": {"max_steps": 30, "batch_size": 16,
                                                            "learning_rate": 1e-3}},
                        compression=[])
    assert main(["distill", path, "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "not trained yet (30 steps, labels ['negative', 'neutral', 'positive'])" in printed
    assert not (tmp / "dk_cache" / "teachers").exists() or \
        not os.listdir(tmp / "dk_cache" / "teachers")
    assert main(["finetune", path, "--no-progress"]) == 0
    teacher_dir = capsys.readouterr().out.split("teacher: ", 1)[1].splitlines()[0]
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir)
    assert teacher.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    assert main(["distill", path, "--no-progress"]) == 0
    res = json.load(open(os.path.join(out, "results.json")))
    assert res["teacher_finetune"]["steps"] == 30
    assert res["teacher_finetune"]["base"] == base
    card = open(os.path.join(out, "student", "README.md")).read()
    assert "fine-tuned on the training split by distilkit (30 steps" in card
    student = AutoModelForSequenceClassification.from_pretrained(os.path.join(out, "student"))
    assert student.config.id2label == teacher.config.id2label
    assert student.config.num_hidden_layers == 2


def test_data_with_fewer_classes_than_the_teacher(tiny_task, capsys):
    """A teacher that knows more classes than the data has (3 named ones for 2-class data):
    the student keeps only the data's classes, in the data's order, from the teacher's head
    rows."""
    import csv

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from conftest import tiny_bert, tiny_sentences

    tmp = tiny_task["tmp"]
    files = {}
    for split, n, seed in (("train", 64, 0), ("validation", 16, 1), ("test", 16, 2)):
        files[split] = str(tmp / f"{split}_named.csv")
        with open(files[split], "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            w.writerows((t, "pos" if y else "neg") for t, y in tiny_sentences(n, seed))
    tdir = str(tmp / "teacher3")
    tok = AutoTokenizer.from_pretrained(tiny_task["teacher"])
    names = {0: "maybe", 1: "pos", 2: "neg"}
    t = tiny_bert(vocab=tok.vocab_size, layers=4, num_labels=3, seed=4, id2label=names,
                  label2id={v: k for k, v in names.items()})
    t.save_pretrained(tdir)
    tok.save_pretrained(tdir)
    path, out = _recipe(tiny_task, teacher=tdir, data_files=files, compression=[],
                        learning_rate=0.0, max_steps=1)
    assert main(["distill", path, "--no-progress"]) == 0
    student = AutoModelForSequenceClassification.from_pretrained(os.path.join(out, "student"))
    assert student.config.id2label == {0: "neg", 1: "pos"}
    # learning rate 0: the student's head is the teacher's rows for "neg" then "pos"
    torch.testing.assert_close(student.classifier.weight, t.classifier.weight[[2, 1]])


def test_the_cli_ends_the_process_group_a_launch_made(tmp_path):
    """A launched process leaves distilkit's CLI with its process group destroyed: left to
    the interpreter's exit, a 2-process DeepSpeed ZeRO-2 run on gloo aborted after it had
    succeeded ("terminate called without an active exception")."""
    code = (
        "import os, torch.distributed as dist\n"
        "from distilkit.cli import main\n"
        "dist.init_process_group('gloo', init_method='tcp://127.0.0.1:0', rank=0, world_size=1)\n"
        f"rc = main(['cache', 'list', '--cache-dir', {str(tmp_path)!r}])\n"
        "print('rc', rc, 'initialized', dist.is_initialized())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "rc 0 initialized False" in out.stdout
