"""Pruning, low-rank and prune + quantize on the built-in data with the real fine-tuned teacher.

    python scripts/repro_prune.py                     # full run (teacher cached: ~1 hour on 2 cores)
    python scripts/repro_prune.py --quick             # smoke test: tiny data, 2 steps per run

Rows (accuracy on the built-in test split, parameters, saved size, latency at seq 64 and
batch 32 as a speed-up over the teacher):

* the teacher (all-MiniLM-L6-v2 fine-tuned on the built-in Rotten Tomatoes sentences);
* the teacher with 25%, 50%, 75% of its heads removed (``prune_heads``, Michel et al. gradient
  importance over ``--importance-batches`` training batches, global ranking), **without**
  fine-tuning, and **with** distillation fine-tuning from the unpruned teacher (a recipe run:
  soft targets at T=2 mixed with the labels, ``--steps`` steps);
* every layer linear factorized to half its parameters (``low_rank``, ``param_fraction=0.5``),
  without and with distillation;
* prune -> distil -> quantize (Deep Compression's order): 50% of heads removed, then
  distillation with 4-bit bucketed quantization (``quantize``, bucket 256) prepared, then
  converted to packed 4-bit weights; its final size on disk.

Distilled rows go through ``distilkit.pipeline.run_recipe`` (the same path as
``distilkit distill recipe.yaml``), so they are saved with ``save_compressed`` and evaluated
after ``load_compressed``. Output: a markdown table, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _recipe(name, teacher, compression, args, out_root):
    r = {
        "name": name, "teacher": teacher,
        "student": {"type": "from_teacher", "keep_layers": [0, 1, 2, 3, 4, 5]},
        "dataset": "builtin:rotten_tomatoes", "max_length": 64, "teacher_cache": True,
        "compression": compression,
        "temperature": 2.0, "alpha_kd": 0.5, "alpha_ce": 0.5, "learning_rate": args.lr,
        "warmup_steps": max(1, args.steps // 10), "per_device_train_batch_size": 32,
        "per_device_eval_batch_size": 64, "max_steps": args.steps, "seed": 42,
        "output_dir": os.path.join(out_root, name),
    }
    if args.quick:
        r.update(max_train_samples=64, max_eval_samples=64)
    return r


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny data and 2 steps (smoke test)")
    p.add_argument("--teacher", default=None, help="teacher directory (default: the built-in)")
    p.add_argument("--steps", type=int, default=300, help="distillation steps per run")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--importance-batches", type=int, default=16)
    p.add_argument("--out", default="runs/repro_prune")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.importance_batches = 2, 1

    import copy

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from distilkit.collate import DistilCollator
    from distilkit.compress import CompressionContext, compress_, config_from_dict, method_names
    from distilkit.data import DataSpec, load_raw, tokenize
    from distilkit.evaluate import evaluate_model
    from distilkit.pipeline import run_recipe
    from distilkit.recipe import Recipe

    hf_logging.set_verbosity_error()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    t_start = time.time()
    if args.teacher is None:
        from distilkit.teachers import builtin_teacher
        args.teacher = builtin_teacher()
    tok = AutoTokenizer.from_pretrained(args.teacher)
    teacher = AutoModelForSequenceClassification.from_pretrained(args.teacher).eval()
    spec = DataSpec(max_train_samples=64 if args.quick else None,
                    max_eval_samples=64 if args.quick else None)
    raw = load_raw(spec)
    test = raw[spec.test_split]
    ds = tokenize(raw, tok, spec, max_length=64)
    collate = DistilCollator(tok)
    train_rows = ds[spec.train_split].shuffle(seed=0)
    batches = [collate([train_rows[j] for j in range(i, min(i + 32, len(train_rows)))])
               for i in range(0, min(len(train_rows), 32 * args.importance_batches), 32)]
    ctx = CompressionContext(dataloader=batches, loss_fn=lambda m, b: m(**b).loss)
    runs = (3, 2) if args.quick else (20, 5)

    def measure(model, model_dir=None):
        return evaluate_model(model, tok, test, max_length=64, model_dir=model_dir,
                              latency_runs=runs)

    rows = {"teacher": measure(teacher, args.teacher)}
    for frac in (0.25, 0.5, 0.75):
        m = copy.deepcopy(teacher)
        compress_(m, config_from_dict({"method": "prune_heads", "fraction": frac}), ctx)
        rows[f"heads -{int(frac * 100)}%, no fine-tuning"] = measure(m)
    m = copy.deepcopy(teacher)
    compress_(m, config_from_dict({"method": "low_rank", "param_fraction": 0.5}))
    rows["low-rank 50%, no fine-tuning"] = measure(m)

    distilled = [(f"heads -{int(f * 100)}% + KD", f"prune_heads_{int(f * 100)}",
                  [{"method": "prune_heads", "fraction": f}]) for f in (0.25, 0.5, 0.75)]
    distilled.append(("low-rank 50% + KD", "low_rank_50",
                      [{"method": "low_rank", "param_fraction": 0.5}]))
    if "quantize" in method_names():
        distilled.append(("heads -50% + KD + 4-bit (b=256)", "prune50_quant4",
                          [{"method": "prune_heads", "fraction": 0.5},
                           {"method": "quantize", "bits": 4, "bucket_size": 256}]))
    for label, name, comp in distilled:
        res = run_recipe(Recipe.from_dict(_recipe(name, args.teacher, comp, args, args.out)),
                         progress=False)
        rows[label] = res["student"]

    t = rows["teacher"]
    print(f"\nBuilt-in data ({len(test)} test sentences), seq 64, "
          f"{args.steps} distillation steps per distilled row\n")
    print("| model | accuracy | params | size MB | speed-up b1 | speed-up b32 |")
    print("|---|---|---|---|---|---|")
    table = []
    for label, r in rows.items():
        s1 = t["latency_ms_batch1"] / r["latency_ms_batch1"]
        s32 = t["latency_ms_batch32"] / r["latency_ms_batch32"]
        table.append({"model": label, "accuracy": round(r["accuracy"], 4),
                      "parameters": r["parameters"], "size_bytes": r["size_on_disk_bytes"],
                      "speedup_b1": round(s1, 3), "speedup_b32": round(s32, 3)})
        print(f"| {label} | {r['accuracy']:.4f} | {r['parameters']:,} | "
              f"{r['size_on_disk_bytes'] / 2**20:.2f} | {s1:.2f}x | {s32:.2f}x |")
    out = {"repro": "prune", "quick": args.quick, "steps": args.steps,
           "test_examples": len(test), "seconds": round(time.time() - t_start, 1), "rows": table}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
