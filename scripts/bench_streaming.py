"""Throughput of streaming runs of the built-in data against the in-memory run (issue #17).

recipes/quickstart.yaml's settings (its teacher, student, batch size, max length, loss
weights), ``--steps`` steps, six ways:

* ``memory+cache``: as shipped: the split loaded and tokenized up front, the teacher's
  logits read from the on-disk cache (filled on the first run, a hit afterwards);
* ``memory+live``: the same with ``teacher_cache: false``: the teacher runs every step;
* ``stream``: ``streaming: true``: the built-in training split streamed, tokenized on the
  fly, the teacher run every step;
* ``stream-file``: the same rows written to a jsonl file first and streamed from it by
  datasets' reader (what a corpus too large to load goes through);
* ``stream+cache-cold``: ``streaming: true`` with ``teacher_cache: true`` and an empty cache
  (a fresh ``cache_dir``): each batch's rows miss, are run through the teacher in the
  collator and written to the cache;
* ``stream+cache-warm``: the same run again: every row hits, the teacher is never loaded.

Timed is ``trainer.train()`` alone (loading, evaluation and a loaded split's caching
excluded; a stream's teacher outputs, cached or computed, are read or computed inside it),
so examples/s is steps x batch / that time. ``cache_hits`` / ``cache_computed`` are the
stream's rows read from the cache / computed by the teacher. One JSON line per run, then a table. The figures are one run
each on whatever machine this is; on a shared machine they move by 10-20 % between runs.

    python scripts/bench_streaming.py --steps 60
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RECIPE = os.path.join(HERE, "..", "recipes", "quickstart.yaml")


def _write_split_files(tmp: str) -> dict:
    from distilkit.data import builtin_dataset

    ds = builtin_dataset()
    files = {}
    for split in ("train", "validation", "test"):
        files[split] = os.path.join(tmp, f"{split}.jsonl")
        names = ds[split].features["label"].names
        with open(files[split], "w", encoding="utf-8") as f:
            for row in ds[split]:
                f.write(json.dumps({"text": row["text"], "label": names[row["label"]]}) + "\n")
    return files


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--runs", nargs="+", default=["memory+cache", "memory+live", "stream",
                                                  "stream-file", "stream+cache-cold",
                                                  "stream+cache-warm"])
    a = ap.parse_args(argv)

    import torch

    import distilkit.trainer as trainer_mod
    from distilkit.pipeline import run_recipe
    from distilkit.recipe import Recipe

    timed: list = []
    train = trainer_mod.DistilTrainer.train

    def timed_train(self, *args, **kw):  # trainer.train() alone, not loading or evaluation
        t0 = time.perf_counter()
        out = train(self, *args, **kw)
        timed.append(time.perf_counter() - t0)
        return out
    trainer_mod.DistilTrainer.train = timed_train

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files = _write_split_files(tmp) if "stream-file" in a.runs else None
        for name in a.runs:
            over = {"max_steps": a.steps, "output_dir": os.path.join(tmp, name),
                    "logging_steps": max(1, a.steps // 3)}
            if name.startswith("stream+cache"):  # cold then warm: one cache of their own
                over["cache_dir"] = os.path.join(tmp, "stream_cache")
            elif name != "memory+cache":
                over["teacher_cache"] = False
            if name.startswith("stream"):
                over["streaming"] = True
            if name == "stream-file":
                over.update(dataset=None, data_files=files)
            recipe = Recipe.load(RECIPE, over)
            res = run_recipe(recipe, progress=False)
            batch = recipe.distil_config().per_device_train_batch_size
            row = {"run": name, "steps": res["global_steps"], "train_s": round(timed[-1], 2),
                   "examples_per_s": round(res["global_steps"] * batch / timed[-1], 1),
                   "final_loss": res["train_log"][-1]["loss"],
                   "test_accuracy": round(res["student"]["accuracy"], 4),
                   "threads": torch.get_num_threads()}
            cache = res.get("streaming", {}).get("teacher_cache")
            if cache:
                row.update(cache_hits=cache["hits"], cache_computed=cache["computed"],
                           teacher_loaded=res["teacher_loaded"])
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{'run':<19}{'steps':>6}{'train s':>9}{'examples/s':>12}{'final loss':>12}"
          f"{'test acc':>10}")
    for r in rows:
        print(f"{r['run']:<19}{r['steps']:>6}{r['train_s']:>9.1f}{r['examples_per_s']:>12.1f}"
              f"{r['final_loss']:>12.4f}{r['test_accuracy']:>10.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
