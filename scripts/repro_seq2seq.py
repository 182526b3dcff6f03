"""Seq2seq distillation and quantized distillation on the offline truecasing task.

    python scripts/repro_seq2seq.py            # full: the figures of docs/RESULTS.md (~15 min, 2 cores)
    python scripts/repro_seq2seq.py --quick    # tiny settings, checks the pipeline (~2 min)

Task: restore the casing and punctuation of real Rotten Tomatoes sentences (input lower-cased
without punctuation; target the original), built by :mod:`distilkit.seq2seq.data`. A BART
teacher is trained here from a config (cached), then one student shape (the teacher's
encoder, every other decoder layer: "shrink and fine-tune") is trained five ways with the same
initialisation, steps and seed:

1. on the references only (cross-entropy; the teacher is not run);
2. token-level KD: soft targets of the teacher's decoder logits at T=2 (x T^2), mixed with CE;
3. sequence-level KD: CE on the teacher's greedy outputs for the training inputs (cached);
4. 4-bit quantized distillation (Polino et al. 2018): fake-quantized weights (buckets of 256,
   straight-through) trained with the token-KD loss, then converted to packed 4-bit weights;
5. for reference, 4-bit post-training quantization of student 2 (no training after
   quantizing: Polino's "PM" baseline).

Each row: BLEU, chrF, exact match on the test split, parameters, size of the saved files,
median latency of generating one sentence (batch 1, greedy) and the time to produce it. The
script prints a markdown table and then one JSON line.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny settings: checks that everything runs")
    p.add_argument("--out", default=None, help="where students are saved (default: a temp dir)")
    p.add_argument("--student-steps", type=int, default=None, help="training steps per student")
    p.add_argument("--eval-samples", type=int, default=None, help="test sentences scored")
    p.add_argument("--latency-samples", type=int, default=None, help="sentences timed at batch 1")
    p.add_argument("--seed", type=int, default=42)
    return p.parse_args(argv)


def settings(quick: bool):
    from distilkit.seq2seq.teacher import Seq2SeqTeacherSettings, builtin_truecase_settings

    if quick:
        teacher = Seq2SeqTeacherSettings(d_model=64, num_layers=2, num_decoder_layers=2,
                                         num_heads=4, d_ff=128, max_steps=30, warmup_steps=5,
                                         max_words=8, vocab_size=500, max_length=32)
        return teacher, {"steps": 15, "eval": 24, "latency": 3, "max_new_tokens": 24,
                         "train": 1000}
    return builtin_truecase_settings(), {"steps": 500, "eval": 400, "latency": 24,
                                         "max_new_tokens": 64, "train": None}


def train_student(student, teacher, tok, train_ds, out_dir, steps, seed, alpha_kd, alpha_ce,
                  callbacks=None):
    from distilkit.config import DistilConfig
    from distilkit.seq2seq.data import seq2seq_collator
    from distilkit.trainer import DistilTrainer

    args = DistilConfig(output_dir=out_dir, max_steps=steps, per_device_train_batch_size=32,
                        learning_rate=5e-4, warmup_steps=min(50, steps // 10), weight_decay=0.01,
                        temperature=2.0, alpha_kd=alpha_kd, alpha_ce=alpha_ce, seed=seed,
                        logging_steps=max(steps // 5, 1), save_strategy="no", report_to=[],
                        disable_tqdm=True, train_sampling_strategy="group_by_length",
                        use_cpu=True)
    tr = DistilTrainer(model=student, teacher_model=teacher, args=args, train_dataset=train_ds,
                       data_collator=seq2seq_collator(tok), processing_class=tok,
                       callbacks=callbacks)
    tr.train()
    return tr


def main(argv=None) -> int:
    a = parse_args(argv)
    import torch
    from transformers import AutoModelForSeq2SeqLM

    from distilkit.compress.base import (compress_, config_from_dict, finalize_, load_compressed,
                                         save_compressed)
    from distilkit.seq2seq.data import tokenize_seq2seq, truecase_dataset
    from distilkit.tasks.seq2seq import evaluate_seq2seq_model
    from distilkit.seq2seq.sequence_kd import SequenceKDSettings, sequence_kd_dataset
    from distilkit.seq2seq.teacher import load_seq2seq_teacher, truecase_teacher
    from distilkit.students.init import student_from_teacher

    t_start = time.time()
    t_set, run = settings(a.quick)
    steps = a.student_steps or run["steps"]
    n_eval = a.eval_samples or run["eval"]
    n_lat = a.latency_samples or run["latency"]
    gen = {"num_beams": 1, "max_new_tokens": run["max_new_tokens"], "batch_size": 64}
    out = a.out or tempfile.mkdtemp(prefix="repro_seq2seq_")
    cmd = "python scripts/repro_seq2seq.py" + (" --quick" if a.quick else "")
    rows, timings = [], {}

    t0 = time.time()
    t_dir = truecase_teacher(t_set, progress=False)
    teacher, tok = load_seq2seq_teacher(t_dir)
    timings["teacher"] = time.time() - t0
    ds = truecase_dataset(max_words=t_set.max_words, train_windows=t_set.train_windows)
    if run["train"]:  # --quick: students see (and the teacher decodes) a subset only
        ds["train"] = ds["train"].select(range(min(run["train"], len(ds["train"]))))
    n = t_set.max_length
    train_ref = tokenize_seq2seq(ds["train"], tok, max_source_length=n, max_target_length=n)
    test = ds["test"].select(range(min(n_eval, len(ds["test"]))))

    def evaluate(name, model, model_dir, how, seconds):
        m = evaluate_seq2seq_model(model, tok, test, model_dir, generation=gen,
                                   latency_samples=n_lat)
        rows.append({"model": name, "how": how, "bleu": round(m["bleu"], 2),
                     "chrf": round(m["chrf"], 2), "exact_match": round(m["exact_match"], 4),
                     "parameters": m["parameters"], "size_mb": round(m["size_on_disk_bytes"] / 1e6, 3),
                     "latency_ms": round(m["latency_ms"], 1), "seconds": round(seconds, 1)})
        print(f"[repro_seq2seq] {name}: BLEU {m['bleu']:.2f}  exact {m['exact_match']:.3f}  "
              f"({time.time() - t_start:.0f}s)", flush=True)

    evaluate("teacher", teacher, t_dir, f"{t_set.arch.upper()} {t_set.num_layers}+{t_set.num_decoder_layers} "
             f"layers, d_model {t_set.d_model}, {t_set.max_steps} steps on references",
             timings["teacher"])

    torch.manual_seed(a.seed)
    init = student_from_teacher(teacher, num_decoder_layers=max(1, t_set.num_decoder_layers // 2))
    shape = (f"{t_set.num_layers}+{len(init.config.distilkit_init['decoder'])} layers "
             f"(decoder layers {init.config.distilkit_init['decoder']} of the teacher)")

    def fresh():
        return copy.deepcopy(init).train()

    def save_eval(name, model, how, seconds):
        d = os.path.join(out, name)
        save_compressed(model, d)
        tok.save_pretrained(d)
        loaded = load_compressed(d, auto_cls=AutoModelForSeq2SeqLM).eval()
        evaluate(name, loaded, d, how, seconds)

    t0 = time.time()
    s_ref = fresh()
    train_student(s_ref, teacher, tok, train_ref, os.path.join(out, "work"), steps, a.seed, 0.0, 1.0)
    save_eval("student_references", s_ref, f"{shape}; CE on references, {steps} steps", time.time() - t0)

    t0 = time.time()
    s_kd = fresh()
    train_student(s_kd, teacher, tok, train_ref, os.path.join(out, "work"), steps, a.seed, 0.5, 0.5)
    save_eval("student_token_kd", s_kd, f"{shape}; 0.5 KD (T=2) + 0.5 CE, {steps} steps", time.time() - t0)

    t0 = time.time()
    stats: dict = {}
    train_seq = sequence_kd_dataset(teacher, tok, ds["train"],
                                    SequenceKDSettings(max_new_tokens=n, batch_size=64),
                                    max_source_length=n, max_target_length=n, stats=stats)
    timings["teacher_generations"] = stats["seconds"]
    s_seq = fresh()
    train_student(s_seq, teacher, tok, train_seq, os.path.join(out, "work"), steps, a.seed, 0.0, 1.0)
    save_eval("student_sequence_kd", s_seq, f"{shape}; CE on teacher's greedy outputs "
              f"({stats['computed']} decoded, {stats['hits']} cached), {steps} steps", time.time() - t0)

    t0 = time.time()
    s_q = fresh()
    qcfg = config_from_dict({"method": "quantize", "bits": 4, "bucket_size": 256})
    compress_(s_q, qcfg)
    train_student(s_q, teacher, tok, train_ref, os.path.join(out, "work"), steps, a.seed, 0.5, 0.5)
    finalize_(s_q)
    save_eval("student_4bit_quantized_distilled", s_q, f"{shape}; 4-bit buckets of 256, "
              f"fake-quant + 0.5 KD + 0.5 CE, {steps} steps", time.time() - t0)

    t0 = time.time()
    s_ptq = copy.deepcopy(s_kd).eval()
    compress_(s_ptq, config_from_dict({"method": "ptq", "bits": 4, "bucket_size": 256}))
    finalize_(s_ptq)
    save_eval("student_token_kd_4bit_ptq", s_ptq, "student_token_kd quantized to 4 bits after "
              "training (buckets of 256, no retraining)", time.time() - t0)

    total = time.time() - t_start
    print()
    print(f"Truecasing + punctuation restoration (builtin Rotten Tomatoes sentences of at most "
          f"{t_set.max_words} words), test sentences: {len(test)}, greedy decoding. Command: `{cmd}`")
    print()
    print("| model | BLEU | chrF | exact match | parameters | size (MB) | latency (ms, batch 1) | time (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['bleu']:.2f} | {r['chrf']:.2f} | {r['exact_match']:.3f} | "
              f"{r['parameters']:,} | {r['size_mb']:.2f} | {r['latency_ms']:.1f} | {r['seconds']:.0f} |")
    print()
    for r in rows:
        print(f"- {r['model']}: {r['how']}")
    print()
    print(json.dumps({"bench": "repro_seq2seq", "command": cmd, "quick": a.quick,
                      "test_sentences": len(test), "max_words": t_set.max_words,
                      "teacher_settings": t_set.__dict__, "student_steps": steps,
                      "generation": gen, "timings_s": {k: round(v, 1) for k, v in timings.items()},
                      "total_seconds": round(total, 1), "torch_threads": torch.get_num_threads(),
                      "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
