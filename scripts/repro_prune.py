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


def _finished_run(recipe):
    """The results of an earlier run of exactly this recipe in its output_dir, else None: a
    rerun of the script redoes only what is missing."""
    path = os.path.join(recipe.training["output_dir"], "results.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        res = json.load(f)
    same = res.get("recipe") == json.loads(json.dumps(recipe.to_dict(), default=str))
    return res if same and os.path.isdir(os.path.join(recipe.training["output_dir"], "student")) else None


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
    from distilkit.compress import load_compressed
    from distilkit.evaluate import evaluate_model, fixed_length_batch, interleaved_latency_ms
    from distilkit.pipeline import run_recipe
    from distilkit.recipe import Recipe

    hf_logging.set_verbosity_error()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    t_start = time.time()
    if args.teacher is None:
        from distilkit.finetune import builtin_teacher
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
    runs = (3, 1) if args.quick else (9, 2)  # (timed runs, warm-up runs) per model

    def measure(model, model_dir=None):
        # Latency is timed below, all models side by side; here only what the weights score.
        return evaluate_model(model, tok, test, max_length=64, model_dir=model_dir, latency=False)

    rows = {"teacher": measure(teacher, args.teacher)}
    models = {"teacher": teacher}
    for frac in (0.25, 0.5, 0.75):
        m = copy.deepcopy(teacher)
        compress_(m, config_from_dict({"method": "prune_heads", "fraction": frac}), ctx)
        label = f"heads -{int(frac * 100)}%, no fine-tuning"
        rows[label], models[label] = measure(m), m
    m = copy.deepcopy(teacher)
    compress_(m, config_from_dict({"method": "low_rank", "param_fraction": 0.5}))
    rows["low-rank 50%, no fine-tuning"], models["low-rank 50%, no fine-tuning"] = measure(m), m

    distilled = [(f"heads -{int(f * 100)}% + KD", f"prune_heads_{int(f * 100)}",
                  [{"method": "prune_heads", "fraction": f}]) for f in (0.25, 0.5, 0.75)]
    distilled.append(("low-rank 50% + KD", "low_rank_50",
                      [{"method": "low_rank", "param_fraction": 0.5}]))
    if "quantize" in method_names():
        distilled.append(("heads -50% + KD + 4-bit (b=256)", "prune50_quant4",
                          [{"method": "prune_heads", "fraction": 0.5},
                           {"method": "quantize", "bits": 4, "bucket_size": 256}]))
    for label, name, comp in distilled:
        recipe = Recipe.from_dict(_recipe(name, args.teacher, comp, args, args.out))
        res = _finished_run(recipe) or run_recipe(recipe, progress=False)
        rows[label] = res["student"]
        models[label] = load_compressed(os.path.join(recipe.training["output_dir"], "student"))

    # Speed-ups from one side-by-side pass over every model (runs interleaved), at sequence
    # length 64 with real token ids: per-run timings taken minutes apart are too noisy here.
    tok_rows = [{k: r[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in r}
                for r in ds[spec.test_split].select(range(min(64, len(test))))]
    lat = {}
    for b in (1, 32):
        batch = fixed_length_batch(tok_rows, b, 64)
        lat[b] = interleaved_latency_ms({k: (lambda m=m, x=batch: m(**x)) for k, m in models.items()},
                                        *runs)

    print(f"\nBuilt-in data ({len(test)} test sentences), seq 64, "
          f"{args.steps} distillation steps per distilled row\n")
    print("| model | accuracy | params | size MB | speed-up b1 | speed-up b32 |")
    print("|---|---|---|---|---|---|")
    table = []
    for label, r in rows.items():
        s1 = lat[1]["teacher"] / lat[1][label]
        s32 = lat[32]["teacher"] / lat[32][label]
        table.append({"model": label, "accuracy": round(r["accuracy"], 4),
                      "parameters": r["parameters"], "size_bytes": r["size_on_disk_bytes"],
                      "ms_b1": round(lat[1][label], 2), "ms_b32": round(lat[32][label], 2),
                      "speedup_b1": round(s1, 3), "speedup_b32": round(s32, 3)})
        print(f"| {label} | {r['accuracy']:.4f} | {r['parameters']:,} | "
              f"{r['size_on_disk_bytes'] / 1e6:.2f} | {s1:.2f}x | {s32:.2f}x |")
    out = {"repro": "prune", "quick": args.quick, "steps": args.steps,
           "test_examples": len(test), "seconds": round(time.time() - t_start, 1), "rows": table}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
