"""Step time of quantized distillation against plain fp32 distillation, measured side by side.

    OMP_NUM_THREADS=2 python scripts/bench_quant.py                  # real MiniLM teacher
    OMP_NUM_THREADS=1 python scripts/bench_quant.py --teacher tiny --steps 6   # smoke test

One teacher, two copies of the same student (3 layers taken from the teacher): one fp32, one
prepared for quantized distillation (``compress_(student, QuantizeConfig(bits, bucket_size))``).
Each timed step is a full distillation step (teacher forward without grad, student forward,
``T^2``-scaled KL to the teacher plus CE, backward, AdamW step) on the same batch of real
sentences; the two students alternate step by step so that machine noise hits both alike.
The figure is the ratio of the medians (the issue's bar: at most 1.25 on CPU). The last line
of output is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _teacher_and_batch(kind: str, batch_size: int, seq_len: int):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if kind == "tiny":
        from transformers import BertConfig, BertForSequenceClassification

        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=6,
                         num_attention_heads=4, intermediate_size=256, num_labels=2)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(5, 500, (batch_size, seq_len), generator=g)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                 "labels": torch.randint(0, 2, (batch_size,), generator=g)}
        return BertForSequenceClassification(cfg).eval(), batch, "tiny 6-layer BERT (random)"
    from distilkit.data import builtin_dataset
    from distilkit.finetune import builtin_teacher
    from distilkit.teachers import minilm_path

    path = builtin_teacher() if kind == "builtin" else minilm_path()
    teacher = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    tok = AutoTokenizer.from_pretrained(path)
    train = builtin_dataset()["train"].select(range(batch_size))
    enc = tok(list(train["text"]), padding="max_length", truncation=True, max_length=seq_len,
              return_tensors="pt")
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
             "labels": torch.tensor(list(train["label"]))}
    name = "built-in MiniLM-L6 teacher" if kind == "builtin" else "all-MiniLM-L6-v2 (timing only)"
    return teacher, batch, name


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", choices=["builtin", "minilm", "tiny"], default="builtin",
                   help="builtin: MiniLM-L6 fine-tuned on the built-in data (trained once, "
                        "cached); minilm: the same architecture un-fine-tuned (same cost); "
                        "tiny: a random 6-layer toy, for a smoke test")
    p.add_argument("--student-layers", type=int, default=3)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--bucket-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="timed steps per student")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--temperature", type=float, default=2.0)
    args = p.parse_args(argv)

    import torch

    from distilkit.compress import compress_
    from distilkit.compress.quantize import QuantizeConfig
    from distilkit.losses import hard_ce, soft_target_kl
    from distilkit.students.init import student_from_teacher

    teacher, batch, teacher_name = _teacher_and_batch(args.teacher, args.batch_size, args.seq_len)
    teacher.requires_grad_(False)
    fp = student_from_teacher(teacher, num_layers=args.student_layers).train()
    qd = student_from_teacher(teacher, num_layers=args.student_layers).train()
    rec = compress_(qd, QuantizeConfig(bits=args.bits, bucket_size=args.bucket_size))
    opts = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in
            (("kd", fp), ("qd", qd))}
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def step(name: str, student) -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            t_logits = teacher(**inputs).logits
        s_logits = student(**inputs).logits
        loss = 0.5 * soft_target_kl(s_logits, t_logits, args.temperature) \
            + 0.5 * hard_ce(s_logits, batch["labels"])
        opts[name].zero_grad(set_to_none=True)
        loss.backward()
        opts[name].step()
        return time.perf_counter() - t0

    times: dict[str, list] = {"kd": [], "qd": []}
    for i in range(args.warmup + args.steps):
        # Alternate which student goes first, so neither always follows the other.
        order = (("kd", fp), ("qd", qd)) if i % 2 == 0 else (("qd", qd), ("kd", fp))
        for name, student in order:
            t = step(name, student)
            if i >= args.warmup:
                times[name].append(t)
    kd, q = statistics.median(times["kd"]), statistics.median(times["qd"])
    result = {"qd_step_ratio": round(q / kd, 4), "kd_step_ms": round(kd * 1000, 1),
              "qd_step_ms": round(q * 1000, 1), "teacher": teacher_name,
              "student_layers": args.student_layers, "bits": args.bits,
              "bucket_size": args.bucket_size, "quantized_modules": len(rec["layers"]),
              "batch_size": args.batch_size, "seq_len": args.seq_len, "steps": args.steps,
              "threads": torch.get_num_threads()}
    print(f"| | median step (ms) |\n|---|---|\n| fp32 KD | {result['kd_step_ms']} |\n"
          f"| {args.bits}-bit quantized distillation (k={args.bucket_size}) | "
          f"{result['qd_step_ms']} |\n\nratio: {result['qd_step_ratio']}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
