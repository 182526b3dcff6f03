"""What the teacher-output cache saves, and what a KD step from the cache costs.

    python scripts/bench_cache.py            # the quickstart recipe (built-in MiniLM-L6 teacher)
    python scripts/bench_cache.py --quick    # a tiny teacher and 256 sentences: checks it runs

Part 1, cold vs warm: ``distilkit distill recipes/quickstart.yaml`` run twice, each in a fresh
process, with one fresh cache directory: the first run computes and stores the teacher's
logits, the second reads them. Prints each run's wall time, its teacher-output phase (from the
cache's own log line) and the warm/cold ratio.

Part 2, step cost, side by side in one process: a DistilTrainer step reading cached teacher
logits (KD at T=2 + CE) against a plain transformers ``Trainer`` cross-entropy step of the same
student (same initial weights, same batches, collation included), interleaved step by step
with the order alternating, so machine noise hits both alike; medians. Target: KD / CE <= 1.05.

Ends with one JSON line of the figures.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "recipes", "quickstart.yaml")
CACHE_LINE = re.compile(r"teacher cache: (\d+)/(\d+) examples cached, (\d+) computed, ([\d.]+)s")


def tiny_teacher(out: str) -> str:
    """A small random BERT classifier with the MiniLM tokenizer (quick mode only)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from distilkit.teachers import minilm_path

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=128, num_labels=2)
    BertForSequenceClassification(cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(out)
    return out


def distill_once(overrides: list[str], log_path: str) -> dict:
    """One ``distilkit distill`` in a fresh process; wall time and the cache's log line."""
    # With progress on, the pipeline prints the cache's summary line that is parsed below.
    cmd = [sys.executable, "-m", "distilkit", "distill", RECIPE, *overrides]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    with open(log_path, "w") as f:
        f.write(proc.stdout + proc.stderr)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}); log: {log_path}\n"
                         f"{proc.stderr[-2000:]}")
    m = CACHE_LINE.search(proc.stdout + proc.stderr)
    if not m:
        raise SystemExit(f"no teacher-cache line in the run's output (is teacher_cache on?); "
                         f"log: {log_path}")
    hits, n, computed, secs = m.groups()
    return {"wall_s": round(wall, 1), "cached": int(hits), "examples": int(n),
            "computed": int(computed), "teacher_outputs_s": float(secs)}


def step_benchmark(teacher_dir: str, cache_dir: str, quick: bool, steps: int, batch_size: int,
                   max_length: int, tmp: str) -> dict:
    """Median seconds of a KD-from-cache step and of a plain CE step (interleaved)."""
    import torch
    from transformers import AutoTokenizer, Trainer, TrainingArguments

    from distilkit import DistilConfig, DistilTrainer
    from distilkit.collate import DistilCollator
    from distilkit.data import DataSpec, load_raw, tokenize
    from distilkit.students.init import student_from_teacher
    from distilkit.teacher_cache import attach_teacher_outputs
    from distilkit.teachers import load_teacher

    warmup = 3
    n = batch_size * (steps + warmup)
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    spec = DataSpec(max_train_samples=n)
    train = tokenize({"train": load_raw(spec)["train"]}, tok, spec, max_length)["train"]
    stats: dict = {}
    # Same key as the pipeline's (teacher, max_length, outputs): part 1's cache is reused.
    cached = attach_teacher_outputs(train, teacher_dir, max_length=max_length,
                                    cache_dir=cache_dir, progress=False, stats=stats)
    # Only the student is needed to train from the cache; the teacher is read to build the
    # quickstart's student (its layers are the student's initialisation), then dropped.
    teacher = load_teacher(teacher_dir)
    torch.manual_seed(0)
    student = student_from_teacher(teacher, num_layers=1 if quick else 3)
    t_config = teacher.config
    del teacher
    plain = train
    collator = DistilCollator(tok)
    common = dict(report_to=[], use_cpu=True, learning_rate=1e-4, save_strategy="no",
                  per_device_train_batch_size=batch_size, disable_tqdm=True)
    kd_tr = DistilTrainer(model=copy.deepcopy(student), teacher_model=None, teacher_config=t_config,
                          args=DistilConfig(output_dir=os.path.join(tmp, "kd"), alpha_kd=0.5,
                                            alpha_ce=0.5, temperature=2.0, **common),
                          data_collator=collator)
    ce_tr = Trainer(model=copy.deepcopy(student), args=TrainingArguments(
        output_dir=os.path.join(tmp, "ce"), **common), data_collator=collator)
    modes = {"kd": (kd_tr, cached), "ce": (ce_tr, plain)}
    for tr, _ in modes.values():
        tr.create_optimizer_and_scheduler(num_training_steps=steps + warmup)

    def step(name: str, i: int) -> float:
        tr, ds = modes[name]
        t0 = time.perf_counter()
        batch = collator(ds.__getitems__(list(range(i * batch_size, (i + 1) * batch_size))))
        tr.training_step(tr.model, batch, num_items_in_batch=torch.tensor(batch_size))
        tr.optimizer.step()
        tr.lr_scheduler.step()
        tr.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    times: dict[str, list] = {"kd": [], "ce": []}
    for i in range(steps + warmup):
        order = ("kd", "ce") if i % 2 == 0 else ("ce", "kd")
        for name in order:
            dt = step(name, i)
            if i >= warmup:
                times[name].append(dt)
    kd, ce = statistics.median(times["kd"]), statistics.median(times["ce"])
    return {"kd_step_s": round(kd, 4), "ce_step_s": round(ce, 4),
            "kd_over_ce": round(kd / ce, 3), "step_cache_hits": stats["hits"],
            "steps_timed": steps, "batch_size": batch_size}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny teacher, 256 sentences, a few steps")
    p.add_argument("--steps", type=int, default=None, help="timed steps in part 2 (default 30; quick 20)")
    p.add_argument("--keep", default=None, help="keep the runs and cache in this directory")
    a = p.parse_args()
    steps = a.steps or (20 if a.quick else 30)
    work = a.keep or tempfile.mkdtemp(prefix="distilkit-bench-cache-")
    os.makedirs(work, exist_ok=True)
    cache = os.path.join(work, "cache")
    if a.quick:
        teacher = tiny_teacher(os.path.join(work, "tiny-teacher"))
        extra = ["--teacher", teacher, "--student.num_layers", "1", "--max_train_samples", "256",
                 "--max_eval_samples", "64", "--max_steps", "5", "--logging_steps", "5"]
    else:
        from distilkit.finetune import builtin_teacher

        teacher = builtin_teacher()  # fine-tuned once and cached: not part of either run
        extra = []
    runs = {}
    for name in ("cold", "warm"):
        runs[name] = distill_once(["--cache_dir", cache, "--output_dir",
                                   os.path.join(work, f"run-{name}"), *extra],
                                  os.path.join(work, f"{name}.log"))
        r = runs[name]
        print(f"{name}: {r['wall_s']:.1f}s wall, teacher outputs {r['teacher_outputs_s']:.1f}s "
              f"({r['cached']}/{r['examples']} cached, {r['computed']} computed)")
    ratio = runs["warm"]["wall_s"] / runs["cold"]["wall_s"]
    print(f"warm / cold run time: {ratio:.3f} ({1 / ratio:.2f}x faster with a warm cache)")
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        st = step_benchmark(teacher, cache, a.quick, steps, 32 if not a.quick else 16, 64, tmp)
    ok = st["kd_over_ce"] <= 1.05
    print(f"KD step from cache {st['kd_step_s'] * 1000:.1f} ms vs plain CE step "
          f"{st['ce_step_s'] * 1000:.1f} ms -> {st['kd_over_ce']:.3f} (target <= 1.05: "
          f"{'met' if ok else 'NOT met'})")
    fig = {"cold_run_s": runs["cold"]["wall_s"], "warm_run_s": runs["warm"]["wall_s"],
           "warm_over_cold": round(ratio, 3),
           "cold_teacher_outputs_s": runs["cold"]["teacher_outputs_s"],
           "warm_teacher_outputs_s": runs["warm"]["teacher_outputs_s"],
           "warm_cached": runs["warm"]["cached"], "examples": runs["warm"]["examples"],
           **st, "kd_over_ce_target_met": ok, "quick": a.quick, "work_dir": a.keep}
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(fig))


if __name__ == "__main__":
    main()
