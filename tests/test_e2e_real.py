"""One short end-to-end run on the real teacher and the real sentences, so that a break in
the real path (data download, teacher fine-tune and cache, tokenizer, pipeline, evaluation)
shows up in CI. The first run on a machine fine-tunes the built-in teacher (minutes); later
runs reuse it from the distilkit cache."""
import json
import os

import pytest

pytestmark = pytest.mark.slow


def test_quickstart_recipe_on_real_teacher_and_data(tmp_path):
    from distilkit.cli import main

    out = tmp_path / "run"
    rc = main(["distill", os.path.join(os.path.dirname(__file__), "..", "recipes", "quickstart.yaml"),
               "--no-progress", "--max_steps", "40", "--max_train_samples", "1280", "--max_eval_samples", "256",
               "--output_dir", str(out), "--cache_dir", str(tmp_path / "cache")])
    assert rc == 0
    res = json.load(open(out / "results.json"))
    t, s = res["teacher"], res["student"]
    assert t["accuracy"] > 0.75, t          # a real fine-tuned teacher, not a random head
    assert s["accuracy"] > 0.6, s           # 40 distillation steps already learn the task
    assert s["parameters"] < t["parameters"]
    assert res["speedup_batch32"] > 1.2
    assert os.path.isfile(out / "student" / "README.md")
    assert os.listdir(tmp_path / "cache")   # teacher logits went through the on-disk cache
