"""Token-level KD from the top-k teacher cache against live token-level KD, on the built-in
seq2seq task (recipes/seq2seq_truecase.yaml: truecasing, BART teacher, sequence-level KD +
token-level KD at T=2, alpha_kd = alpha_ce = 0.5).

    python scripts/bench_topk.py                   # the recipe's settings, --max-steps steps
    python scripts/bench_topk.py --quick           # 64 training sentences, a few steps: checks it runs
    python scripts/bench_topk.py --teacher-steps 300 --train-samples 2000 --eval-samples 100 \
        --max-steps 100                            # what fits a loaded 2-core machine

``--teacher-steps`` trains the built-in truecasing teacher for fewer steps than its 2000 (a
weaker teacher, cached under its own key); ``--train-samples`` / ``--eval-samples`` cut the
training windows / test sentences (max_train_samples / max_eval_samples);
``--no-sequence-kd`` trains on the references (a weak teacher's generations can be empty).

Part 1, quality: the recipe run end to end (``distilkit.pipeline.run_recipe``) once with the
live teacher and once per k (``teacher_cache: {top_k: k}``, k = 8, 32, 128), every run with
the same seed, steps and one fresh cache directory (the teacher's generations are decoded
once and shared). Reports the student's BLEU / chrF / exact match on the test split, the
training wall time per step, the cache's bytes per cached token, its size on disk and the
time it took to build (the teacher's one-off forward pass over the training set).

Part 2, step time, side by side in one process: one training step (collation, student
forward, the KD + CE loss, backward, AdamW) of the same student for each configuration (live:
the teacher runs in the step; k: the cached columns are read), on the same batches, the
configurations interleaved step by step with a rotating order so machine noise hits all
alike; medians and ratios to live.

Ends with one JSON line of the figures.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "recipes", "seq2seq_truecase.yaml")
KS = (8, 32, 128)


def _overrides(args, work: str, name: str, top_k) -> dict:
    o = {"name": f"bench_topk_{name}", "max_steps": args.max_steps,
         "output_dir": os.path.join(work, "runs", name), "cache_dir": os.path.join(work, "cache"),
         "teacher_cache": {"top_k": top_k} if top_k else False, "logging_steps": 50}
    if args.no_sequence_kd:
        o["sequence_kd"] = None
    if args.train_samples:
        o["max_train_samples"] = args.train_samples
    if args.eval_samples:
        o["max_eval_samples"] = args.eval_samples
    if args.quick:
        o.update(max_train_samples=64, max_eval_samples=16, per_device_train_batch_size=8,
                 warmup_steps=0)
    return o


def _use_teacher_steps(steps: int) -> None:
    """Make ``builtin:truecase-bart`` the built-in teacher trained for ``steps`` steps (its
    settings key its cache directory, so it never replaces the 2000-step one)."""
    import dataclasses

    from distilkit.seq2seq import teacher as t

    default = t.builtin_truecase_settings()
    t.builtin_truecase_settings = lambda: dataclasses.replace(
        default, max_steps=steps, warmup_steps=min(default.warmup_steps, steps // 10))


def quality_runs(args, work: str) -> dict:
    """Part 1: each configuration trained end to end; the figures of its results.json."""
    from distilkit.pipeline import run_recipe
    from distilkit.recipe import Recipe
    from distilkit.trainer import DistilTrainer

    runtimes = []
    train = DistilTrainer.train

    def timed_train(self, *a, **kw):  # the Trainer's own training wall time, per run
        out = train(self, *a, **kw)
        runtimes.append(out.metrics["train_runtime"])
        return out

    DistilTrainer.train = timed_train
    out = {}
    try:
        for name, k in [("live", None)] + [(f"k{k}", k) for k in KS]:
            t0 = time.perf_counter()
            res = run_recipe(Recipe.load(RECIPE, _overrides(args, work, name, k)), progress=False)
            s = res["student"]
            row = {"bleu": round(s["bleu"], 2), "chrf": round(s["chrf"], 2),
                   "exact_match": round(s["exact_match"], 4),
                   "train_s_per_step": round(runtimes[-1] / res["global_steps"], 4),
                   # the last logged label CE: a quality signal where BLEU is still 0
                   "final_loss_ce": (res["train_log"] or [{}])[-1].get("loss_ce"),
                   "run_seconds": round(time.perf_counter() - t0, 1)}
            if k:
                c = res["topk_cache"]
                row.update(bytes_per_token=c["bytes_per_token"], tokens=c["tokens"],
                           cache_mb=round(c["namespace_bytes"] / 1e6, 1),
                           cache_build_seconds=c["seconds"], cache_computed=c["computed"])
            out[name] = row
            out.setdefault("teacher_bleu", round(res["teacher"]["bleu"], 2))
            print(f"[bench_topk] {name}: {json.dumps(row)}", flush=True)
    finally:
        DistilTrainer.train = train
    return out


def step_times(args, work: str) -> dict:
    """Part 2: interleaved training steps of the same student, live vs each k (medians)."""
    import numpy as np
    import torch

    from distilkit.recipe import Recipe
    from distilkit.seq2seq.topk_cache import attach_topk
    from distilkit.tasks import get_task
    from distilkit.trainer import DistilTrainer

    recipe = Recipe.load(RECIPE, _overrides(args, work, "steps", None))
    task = get_task("seq2seq")
    targs = recipe.distil_config(disable_tqdm=True)
    raw = task.load_data(recipe)
    teachers = task.load_teachers(recipe, raw, progress=False)
    student, tok = task.build_student(recipe, raw, teachers)
    prep = task.prepare(recipe, targs, raw, teachers, student, tok, progress=False)
    k_sets = {k: attach_topk(prep.train_dataset, teachers.first_dir, top_k=k,
                             temperature=targs.temperature,
                             tokenizer_name_or_path=teachers.first_dir,
                             max_length=recipe.keys.max_length,
                             cache_dir=os.path.join(recipe.keys.cache_dir, "topk"),
                             progress=False) for k in KS}  # Part 1 built these: all hits
    configs = {"live": (prep.train_dataset, teachers.models()[0])}
    configs.update({f"k{k}": (ds, None) for k, ds in k_sets.items()})
    runners = {}
    for name, (ds, teacher) in configs.items():
        model = copy.deepcopy(student).train()
        tr = DistilTrainer(model=model, teacher_model=teacher, teacher_config=teachers.config,
                           args=targs, train_dataset=ds, data_collator=prep.collator)
        opt = torch.optim.AdamW(model.parameters(), lr=targs.learning_rate)
        runners[name] = (tr, model, opt, ds)
    rng = np.random.default_rng(0)
    bs = targs.per_device_train_batch_size
    n = len(prep.train_dataset)
    times = {name: [] for name in runners}
    names = list(runners)
    for step in range(args.timed_steps + 2):  # the first 2 rounds warm up
        rows = rng.choice(n, size=min(bs, n), replace=False).tolist()
        order = names[step % len(names):] + names[:step % len(names)]
        for name in order:
            tr, model, opt, ds = runners[name]
            t0 = time.perf_counter()
            batch = prep.collator([ds[i] for i in rows])
            loss = tr.compute_loss(model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step >= 2:
                times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(v) * 1e3 for name, v in times.items()}
    return {"timed_steps": args.timed_steps, "batch_size": bs,
            "step_ms": {k: round(v, 1) for k, v in med.items()},
            "step_ratio_to_live": {k: round(v / med["live"], 3) for k, v in med.items()}}


def main() -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-steps", type=int, default=300, help="training steps per run (the "
                   "recipe has 500)")
    p.add_argument("--timed-steps", type=int, default=30, help="interleaved steps per "
                   "configuration in part 2")
    p.add_argument("--teacher-steps", type=int, default=None, help="train the built-in teacher "
                   "for this many steps instead of 2000")
    p.add_argument("--train-samples", type=int, default=None, help="training windows used")
    p.add_argument("--eval-samples", type=int, default=None, help="test sentences scored "
                   "(the recipe: 400)")
    p.add_argument("--no-sequence-kd", action="store_true", help="token-level KD on the "
                   "references (sequence_kd: null) instead of on the teacher's generations")
    p.add_argument("--quick", action="store_true", help="64 sentences, a few steps")
    p.add_argument("--keep", default=None, help="keep the runs and caches in this directory")
    args = p.parse_args()
    if args.quick:
        args.max_steps, args.timed_steps = min(args.max_steps, 4), min(args.timed_steps, 3)
    if args.teacher_steps:
        _use_teacher_steps(args.teacher_steps)
    work = args.keep or tempfile.mkdtemp(prefix="bench_topk-")
    os.makedirs(work, exist_ok=True)
    try:
        fig = {"recipe": os.path.relpath(RECIPE, ROOT), "max_steps": args.max_steps,
               "teacher_steps": args.teacher_steps or 2000, "train_samples": args.train_samples,
               "eval_samples": args.eval_samples, "sequence_kd": not args.no_sequence_kd,
               "threads": torch.get_num_threads(), "quick": args.quick}
        fig["runs"] = quality_runs(args, work)
        fig.update(step_times(args, work))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(fig))
    return 0


if __name__ == "__main__":
    sys.exit(main())
