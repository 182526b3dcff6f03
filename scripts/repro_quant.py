"""Polino et al. (2018) on the built-in data: quantized distillation vs post-training quantization.

    OMP_NUM_THREADS=2 python scripts/repro_quant.py                 # real teacher (~1 hour)
    OMP_NUM_THREADS=1 python scripts/repro_quant.py --quick         # tiny smoke run (~2 min)

Rows, each evaluated on the test split *after* ``save_compressed`` + ``load_compressed``
(so the figures are those of the exported low-bit files):

1. fp32 distilled student (``--student-layers`` layers copied from the teacher, KD + CE);
2. 4-bit and 2-bit PM (post-training) quantization of that student, with buckets
   (k = ``--bucket-size``) and without (one min/max per tensor);
3. 4-bit and 2-bit quantized distillation (same student init and steps as row 1, trained
   with fake-quantized weights, then converted), with buckets and without;
4. 2-bit differentiable quantization: starting from row 1, only the quantization points
   (non-uniform, one set per layer) are learned against the distillation loss;
5. quantized distillation continued from the fp32 distilled student (row 1) for
   ``--continue-steps`` more steps, 4 and 2 bits, with and without buckets: at step 0 this
   student *is* the PM-quantized one, so the rows show what distillation adds to PM. Their
   references have had as many steps: row 1 distilled ``--continue-steps`` more steps in
   fp32 (``fp32 distilled + N steps``) and the PM quantization of that model.

``--only`` computes just the rows whose label contains one of the given strings (the fp32
student is always made), e.g. ``--only "4-bit" --seed 43`` for a second seed of the 4-bit rows.

Columns: test accuracy, bits per quantized weight (codes + 64 bits a bucket), average bits
per parameter over the whole file, size on disk of ``model.safetensors``, and the size with
the codes Huffman-coded. The teacher is the built-in MiniLM-L6 fine-tuned on the built-in
data; ``--quick`` replaces it by a small BERT trained for a few steps on a word-level
tokenizer, and uses a few hundred sentences, to check that everything runs. Ends with one
JSON line.
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
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _quick_teacher(train, tok, steps: int, seed: int):
    """A 4-layer BERT trained with cross-entropy for ``steps`` steps (the --quick teacher)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from distilkit.collate import DistilCollator

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=4,
                     num_attention_heads=4, intermediate_size=128, num_labels=2,
                     pad_token_id=tok.pad_token_id or 0)
    model = BertForSequenceClassification(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(train, batch_size=32, shuffle=True,
                                         collate_fn=DistilCollator(tok))
    done = 0
    while done < steps:
        for batch in loader:
            opt.zero_grad()
            model(**batch).loss.backward()
            opt.step()
            done += 1
            if done >= steps:
                break
    return model.eval()


def accuracy(model, ds, tok, batch_size: int = 64) -> float:
    import torch

    from distilkit.collate import DistilCollator

    keep = [c for c in ("input_ids", "attention_mask", "token_type_ids", "labels")
            if c in ds.column_names]
    loader = torch.utils.data.DataLoader(ds.select_columns(keep), batch_size=batch_size,
                                         collate_fn=DistilCollator(tok))
    model.eval()
    right = total = 0
    with torch.no_grad():
        for batch in loader:
            labels = batch.pop("labels")
            pred = model(**batch).logits.argmax(-1)
            right += int((pred == labels).sum())
            total += labels.numel()
    return right / max(total, 1)


def distil(student, teacher, train_ds, tok, steps: int, lr: float, args, out_dir: str):
    from distilkit.collate import DistilCollator
    from distilkit.config import DistilConfig
    from distilkit.trainer import DistilTrainer

    cfg = DistilConfig(output_dir=out_dir, temperature=args.temperature, alpha_kd=0.5,
                       alpha_ce=0.5, learning_rate=lr, max_steps=steps,
                       warmup_steps=min(25, steps // 10), per_device_train_batch_size=32,
                       logging_steps=max(1, steps // 5), save_strategy="no", report_to=[],
                       seed=args.seed, disable_tqdm=True, use_cpu=True)
    trainer = DistilTrainer(model=student, teacher_model=teacher, args=cfg,
                            train_dataset=train_ds, data_collator=DistilCollator(tok),
                            processing_class=tok)
    trainer.train()
    return trainer.model


def row_dir(work: str, name: str) -> str:
    """Where a row's model is exported."""
    return os.path.join(work, name.replace(" ", "_").replace("/", "-"))


def measure(name: str, model, test_ds, tok, work: str, auto_cls) -> dict:
    """Finalize, export, reload and evaluate: the row of the table."""
    from distilkit.compress import finalize_, load_compressed, save_compressed
    from distilkit.compress.base import compression_records
    from distilkit.compress.packing import safetensors_payload_bytes, size_report

    if compression_records(model):
        finalize_(model)
    out = row_dir(work, name)
    save_compressed(model, out)
    loaded = load_compressed(out, auto_cls=auto_cls)
    rep = size_report(loaded, huffman=True)
    file_bytes, header = safetensors_payload_bytes(os.path.join(out, "model.safetensors"))
    n_params = sum(p.numel() for p in model.parameters())
    bpw = rep["bits_per_quantized_weight"]
    return {"model": name, "accuracy": round(accuracy(loaded, test_ds, tok), 4),
            "bits_per_quantized_weight": round(bpw, 3) if bpw else 32.0,
            "bits_per_parameter": round(rep["total_bytes"] * 8 / n_params, 3),
            "size_mb": round(file_bytes / 1e6, 3),
            "huffman_size_mb": round((rep["huffman_total_bytes"] + header) / 1e6, 3),
            "compression_x": round(rep["compression"], 2)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny teacher and data: smoke test")
    p.add_argument("--student-layers", type=int, default=3)
    p.add_argument("--steps", type=int, default=400, help="distillation steps (rows 1 and 3)")
    p.add_argument("--diff-steps", type=int, default=200, help="steps learning the points")
    p.add_argument("--continue-steps", type=int, default=200,
                   help="quantized-distillation steps after the fp32 student (rows 5)")
    p.add_argument("--only", nargs="+", default=None, metavar="TEXT",
                   help="compute only the rows whose label contains one of these strings")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--diff-lr", type=float, default=1e-3, help="learning rate of the points")
    p.add_argument("--bucket-size", type=int, default=256)
    p.add_argument("--points-init", default="kmeans", choices=["uniform", "quantile", "kmeans"])
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--work-dir", default=None, help="where the exported students go")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.diff_steps = min(args.steps, 8), min(args.diff_steps, 4)
        args.continue_steps = min(args.continue_steps, 4)
        args.student_layers = min(args.student_layers, 2)
        args.max_length = 32

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from distilkit.compress import compress_
    from distilkit.compress.quantize import PTQConfig, QuantizeConfig
    from distilkit.data import DataSpec, builtin_dataset, tokenize
    from distilkit.students.init import student_from_teacher

    t0 = time.time()
    torch.manual_seed(args.seed)
    raw = builtin_dataset()
    if args.quick:
        from distilkit.students.word_vocab import build_word_tokenizer

        raw = {"train": raw["train"].select(range(512)), "test": raw["test"].select(range(128))}
        tok = build_word_tokenizer(raw["train"]["text"])
        ds = tokenize(raw, tok, DataSpec(), max_length=args.max_length)
        teacher = _quick_teacher(ds["train"], tok, steps=30, seed=args.seed)
        teacher_name = "quick: 4-layer BERT, 30 CE steps, word tokenizer"
    else:
        from distilkit.finetune import builtin_teacher

        path = builtin_teacher()
        tok = AutoTokenizer.from_pretrained(path)
        teacher = AutoModelForSequenceClassification.from_pretrained(path).eval()
        ds = tokenize({"train": raw["train"], "test": raw["test"]}, tok, DataSpec(),
                      max_length=args.max_length)
        teacher_name = "built-in MiniLM-L6 (fine-tuned on the built-in train split)"
    train_ds, test_ds = ds["train"], ds["test"]
    auto = AutoModelForSequenceClassification
    work = args.work_dir or tempfile.mkdtemp(prefix="repro_quant_")
    k = args.bucket_size
    rows = []

    def new_student():
        torch.manual_seed(args.seed)
        return student_from_teacher(teacher, num_layers=args.student_layers).train()

    # Finished rows are kept in WORK/rows.json (with the settings that made them), so a rerun
    # with the same --work-dir and settings computes only the rows still missing.
    settings = {k2: v for k2, v in vars(args).items() if k2 not in ("work_dir", "only")}
    done_file = os.path.join(work, "rows.json")
    done = {}
    if os.path.isfile(done_file):
        with open(done_file) as f:
            saved = json.load(f)
        done = saved["rows"] if saved.get("settings") == settings else {}

    def row(label, make):
        if args.only and label != fp32_label and not any(o in label for o in args.only):
            return
        if label not in done:
            done[label] = measure(label, make(), test_ds, tok, work, auto)
            tmp = f"{done_file}.tmp"
            with open(tmp, "w") as f:
                json.dump({"settings": settings, "rows": done}, f, indent=1)
            os.replace(tmp, done_file)
        rows.append(done[label])
        print(label, done[label], flush=True)

    trained_models = {}

    def trained(label, train_fn):
        """A copy of the fp32 model of row ``label``: trained once, or reloaded from its export."""
        if label not in trained_models:
            saved = row_dir(work, label)
            trained_models[label] = (auto.from_pretrained(saved)
                                     if label in done and os.path.isdir(saved) else train_fn())
        return copy.deepcopy(trained_models[label])

    fp32_label, more_label = "fp32 distilled", f"fp32 distilled + {args.continue_steps} steps"

    def fp32():
        return trained(fp32_label, lambda: distil(new_student(), teacher, train_ds, tok,
                                                  args.steps, args.lr, args,
                                                  os.path.join(work, "run_fp32")))

    def fp32_more():
        return trained(more_label, lambda: distil(fp32(), teacher, train_ds, tok,
                                                  args.continue_steps, args.lr, args,
                                                  os.path.join(work, "run_fp32_continued")))

    def pm(bits, bucket, base=fp32):
        m = base()
        compress_(m, PTQConfig(bits=bits, bucket_size=bucket))
        return m

    def qd(bits, bucket):
        m = new_student()
        compress_(m, QuantizeConfig(bits=bits, bucket_size=bucket))
        return distil(m, teacher, train_ds, tok, args.steps, args.lr, args,
                      os.path.join(work, f"run_qd{bits}_{bucket}"))

    def qd_continued(bits, bucket):
        m = fp32()
        compress_(m, QuantizeConfig(bits=bits, bucket_size=bucket))
        return distil(m, teacher, train_ds, tok, args.continue_steps, args.lr, args,
                      os.path.join(work, f"run_qd{bits}_{bucket}_continued"))

    def differentiable():
        m = fp32()
        compress_(m, QuantizeConfig(bits=2, bucket_size=k, scheme="nonuniform",
                                    points_init=args.points_init, differentiable=True))
        # Algorithm 2 of the paper: the points learn, everything else stays as distilled.
        for n, prm in m.named_parameters():
            prm.requires_grad_(n.endswith(".points"))
        return distil(m, teacher, train_ds, tok, args.diff_steps, args.diff_lr, args,
                      os.path.join(work, "run_diff2"))

    def buckets(bucket):
        return f"buckets k={k}" if bucket else "no buckets"

    row(fp32_label, fp32)
    for bits in (4, 2):
        for bucket in (k, None):
            row(f"{bits}-bit PM quantization, {buckets(bucket)}", lambda: pm(bits, bucket))
    for bits in (4, 2):
        row(f"{bits}-bit quantized distillation, k={k}", lambda: qd(bits, k))
    for bits in (4, 2):
        row(f"{bits}-bit quantized distillation, no buckets", lambda: qd(bits, None))
    row(f"2-bit differentiable quantization, k={k}", differentiable)
    # Rows 5, against the fp32 student and its PM quantization after as many steps.
    row(more_label, fp32_more)
    for bits in (4, 2):
        for bucket in (k, None):
            row(f"{bits}-bit PM quantization of the {more_label}, {buckets(bucket)}",
                lambda: pm(bits, bucket, base=fp32_more))
            row(f"{bits}-bit quantized distillation from the fp32 student, {buckets(bucket)}",
                lambda: qd_continued(bits, bucket))

    teacher_acc = accuracy(teacher, test_ds, tok)
    print(f"\nTeacher: {teacher_name}, test accuracy {teacher_acc:.4f}\n")
    print("| model | accuracy | bits / quantized weight | bits / parameter | size on disk (MB) "
          "| Huffman-coded (MB) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['accuracy'] * 100:.2f} | {r['bits_per_quantized_weight']} "
              f"| {r['bits_per_parameter']} | {r['size_mb']} | {r['huffman_size_mb']} |")
    result = {"teacher": teacher_name, "teacher_accuracy": round(teacher_acc, 4),
              "rows": rows, "settings": {k2: v for k2, v in vars(args).items()},
              "test_examples": len(test_ds), "seconds": round(time.time() - t0, 1),
              "work_dir": work}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
