"""Cost of a distillation step against its parts, measured side by side in one run.

    python scripts/bench_kd_step.py                 # real MiniLM-L6 teacher, 3-layer student
    python scripts/bench_kd_step.py --quick         # tiny models, to check that it runs
    python scripts/bench_kd_step.py --device cuda --bf16 --teacher-dtype bfloat16

Times (median over interleaved repetitions, so machine noise hits every mode alike):
  kd      one DistilTrainer.training_step with KD + CE (teacher forward + student step)
  student one plain student training step (CE only)
  teacher one teacher forward under no_grad
and peak memory above the idle baseline for the same three: on CPU the process RSS, each in a
fresh subprocess; on CUDA the allocator's peak counter (``torch.cuda.max_memory_allocated``),
with every timed call synchronised. ``--device`` defaults to CUDA when it is available.
Targets (issue #2): kd / (student + teacher) <= 1.10 for both time and memory.
Ends with one JSON line of the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _models(quick: bool):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from distilkit.students import student_from_teacher

    if quick:
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
        from conftest import tiny_bert
        teacher = tiny_bert(layers=4, vocab=30522)
        tok = None
    else:
        from distilkit.finetune import builtin_teacher
        path = builtin_teacher()
        teacher = AutoModelForSequenceClassification.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
    teacher.eval().requires_grad_(False)
    student = student_from_teacher(teacher, num_layers=3 if not quick else 2)
    torch.manual_seed(0)
    return teacher, student, tok


def _batch(tok, batch_size: int, seq: int):
    import torch

    if tok is None:
        ids = torch.randint(1000, 30000, (batch_size, seq))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "labels": torch.randint(0, 2, (batch_size,))}
    from distilkit.data import builtin_dataset
    d = builtin_dataset()["train"].select(range(batch_size))
    enc = tok(list(d["text"]), padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
    enc["labels"] = torch.tensor(list(d["label"]))
    return dict(enc)


def _steppers(teacher, student, batch, tmp, device="cpu", bf16=False, teacher_dtype=None):
    """Callables for the three modes; the KD step goes through DistilTrainer itself. The
    student and teacher steps run as the trainer runs them: same device, bf16 autocast for
    the student when ``bf16``, the teacher in ``teacher_dtype``."""
    import contextlib

    import torch

    from distilkit import DistilConfig, DistilTrainer
    from distilkit.device import to_device

    args = DistilConfig(output_dir=tmp, report_to=[], use_cpu=device == "cpu", alpha_kd=0.5,
                        alpha_ce=0.5, temperature=2.0, bf16=bf16, teacher_dtype=teacher_dtype,
                        per_device_train_batch_size=len(batch["labels"]),
                        disable_tqdm=True, save_strategy="no")
    trainer = DistilTrainer(model=student, teacher_model=teacher, args=args)
    trainer.create_optimizer_and_scheduler(num_training_steps=1000)
    opt = trainer.optimizer
    batch = to_device(batch, trainer.args.device)
    n = torch.tensor(len(batch["labels"]), device=trainer.args.device)
    model = trainer.model  # the student, placed by the trainer
    amp = (lambda: torch.autocast(trainer.args.device.type, dtype=torch.bfloat16)) if bf16 \
        else contextlib.nullcontext

    def kd():
        model.train()
        trainer.training_step(model, dict(batch), num_items_in_batch=n)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def student_only():
        model.train()
        with amp():
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def teacher_only():
        with torch.no_grad():
            trainer.teachers[0](**{k: v for k, v in batch.items() if k != "labels"})

    return {"kd": kd, "student": student_only, "teacher": teacher_only}


def _cuda_peak_mb(fn, reps: int) -> float:
    """Peak CUDA allocator memory above the level just before ``fn`` runs."""
    import torch

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return max(torch.cuda.max_memory_allocated() - base, 0) / 2**20


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_of(fn, reps: int) -> float:
    """Peak RSS above the level just before ``fn`` runs, sampled every 2 ms."""
    import gc
    gc.collect()
    base, peak, stop = _rss_mb(), [0.0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.002)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    for _ in range(reps):
        fn()
    stop.set()
    th.join()
    return max(peak[0] - base, 0.0)


def memory_child(mode: str, quick: bool, batch_size: int, seq: int) -> None:
    import tempfile

    import torch
    torch.set_num_threads(2)
    teacher, student, tok = _models(quick)
    batch = _batch(tok, batch_size, seq)
    with tempfile.TemporaryDirectory() as tmp:
        fns = _steppers(teacher, student, batch, tmp)
        if mode in ("kd", "student"):
            # the optimizer's state exists after the first step in both modes alike
            fns["student"]()
        print(json.dumps({"peak_mb": _peak_of(fns[mode], 2)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="auto: cuda when torch.cuda.is_available()")
    p.add_argument("--bf16", action="store_true", help="bf16 student (TrainingArguments.bf16)")
    p.add_argument("--teacher-dtype", default=None, help="DistilConfig.teacher_dtype")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.memory_child:
        return memory_child(a.memory_child, a.quick, a.batch_size, a.seq)
    import tempfile

    import torch
    torch.set_num_threads(2)
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False")
    device = "cuda" if a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available()) \
        else "cpu"
    if device == "cpu" and (a.bf16 or a.teacher_dtype):
        raise SystemExit("--bf16 / --teacher-dtype are measured on CUDA only (--device cuda)")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    teacher, student, tok = _models(a.quick)
    batch = _batch(tok, a.batch_size, a.seq)
    times: dict[str, list] = {"kd": [], "student": [], "teacher": []}
    mem = {}
    with tempfile.TemporaryDirectory() as tmp:
        fns = _steppers(teacher, student, batch, tmp, device, a.bf16, a.teacher_dtype)
        for fn in fns.values():  # warm-up
            fn()
        for _ in range(a.reps):
            for name, fn in fns.items():
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                times[name].append(time.perf_counter() - t0)
        if device == "cuda":  # the optimizer's state already exists (warm-up)
            mem = {mode: _cuda_peak_mb(fns[mode], 2) for mode in ("kd", "student", "teacher")}
    med = {k: statistics.median(v) for k, v in times.items()}
    for mode in ("kd", "student", "teacher") if device == "cpu" else ():
        cmd = [sys.executable, __file__, "--memory-child", mode, "--batch-size", str(a.batch_size),
               "--seq", str(a.seq)] + (["--quick"] if a.quick else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        mem[mode] = json.loads(out.strip().splitlines()[-1])["peak_mb"]
    fig = {
        "kd_step_s": round(med["kd"], 4), "student_step_s": round(med["student"], 4),
        "teacher_forward_s": round(med["teacher"], 4),
        "kd_step_ratio": round(med["kd"] / (med["student"] + med["teacher"]), 3),
        "kd_peak_mb": round(mem["kd"], 1), "student_peak_mb": round(mem["student"], 1),
        "teacher_peak_mb": round(mem["teacher"], 1),
        "kd_memory_ratio": round(mem["kd"] / max(mem["student"] + mem["teacher"], 1e-6), 3),
        "batch_size": a.batch_size, "seq_len": a.seq, "quick": a.quick, "device": device,
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None, "bf16": a.bf16,
        "teacher_dtype": a.teacher_dtype,
    }
    print(f"KD step {fig['kd_step_s']}s vs student step {fig['student_step_s']}s + teacher "
          f"forward {fig['teacher_forward_s']}s -> ratio {fig['kd_step_ratio']} (target <= 1.10)")
    print(f"peak memory KD {fig['kd_peak_mb']} MB vs {fig['student_peak_mb']} + "
          f"{fig['teacher_peak_mb']} MB -> ratio {fig['kd_memory_ratio']} (target <= 1.10)")
    print(json.dumps(fig))


if __name__ == "__main__":
    main()
