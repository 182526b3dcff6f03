"""Deployment latency of the quickstart-sized student, side by side: PyTorch fp32, ONNX Runtime
fp32 and ONNX Runtime int8 (``distilkit export --int8``), against the teacher in PyTorch fp32.

    OMP_NUM_THREADS=2 python scripts/bench_deploy.py            # batch 32, length 64, 2 threads

The student is the 3-layer copy of the built-in teacher that the quickstart starts from
(``student_from_teacher(builtin_teacher(), num_layers=3)``, not fine-tuned: latency and size
do not depend on the weights' values). It is saved, exported with
:func:`distilkit.export.export_onnx` (which checks the fp32 export against PyTorch), and each
runtime runs the same batch of real built-in sentences padded to the length; the runtimes
alternate repeat by repeat so machine noise hits all alike, and the figure is each one's
median. The last line of output is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--num-layers", type=int, default=3)
    args = p.parse_args(argv)

    import numpy as np
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from distilkit.data import builtin_dataset
    from distilkit.export import export_onnx
    from distilkit.finetune import builtin_teacher
    from distilkit.students.init import student_from_teacher

    torch.set_num_threads(args.threads)
    teacher_dir = builtin_teacher()
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir).eval()
    student = student_from_teacher(teacher_dir, num_layers=args.num_layers).eval()
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    texts = list(builtin_dataset()["test"]["text"][: args.batch_size])
    enc = tok(texts, padding="max_length", truncation=True, max_length=args.seq_len,
              return_tensors="np")

    work = tempfile.mkdtemp(prefix="bench-deploy-")
    student_dir = os.path.join(work, "student")
    student.save_pretrained(student_dir)
    tok.save_pretrained(student_dir)
    exported = export_onnx(student_dir, os.path.join(work, "onnx"), int8=True)

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = args.threads, 1
    sessions = {kind: ort.InferenceSession(os.path.join(exported["out_dir"], f["file"]), opts,
                                           providers=["CPUExecutionProvider"])
                for kind, f in exported["files"].items()}
    pt_batch = {k: torch.from_numpy(v) for k, v in enc.items()}

    def torch_run(model):
        with torch.no_grad():
            return model(**pt_batch).logits.numpy()

    def ort_run(session):
        return session.run(None, {i.name: enc[i.name].astype(np.int64)
                                  for i in session.get_inputs()})[0]

    runs = {"teacher_pytorch_fp32": lambda: torch_run(teacher),
            "student_pytorch_fp32": lambda: torch_run(student),
            "student_ort_fp32": lambda: ort_run(sessions["fp32"]),
            "student_ort_int8": lambda: ort_run(sessions["int8"])}
    outputs = {name: fn() for name, fn in runs.items()}  # warm-up, and the predictions
    times = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
    base = ms["teacher_pytorch_fp32"]

    def size(d, name):
        return os.path.getsize(os.path.join(d, name))

    sizes = {"teacher_pytorch_fp32": size(teacher_dir, "model.safetensors"),
             "student_pytorch_fp32": size(student_dir, "model.safetensors"),
             "student_ort_fp32": exported["files"]["fp32"]["bytes"],
             "student_ort_int8": exported["files"]["int8"]["bytes"]}
    ref = outputs["student_pytorch_fp32"].argmax(-1)
    print(f"batch {args.batch_size}, length {args.seq_len}, {args.threads} threads, "
          f"median of {args.repeats}")
    print(f"{'runtime':<22} {'ms':>9} {'speed-up':>9} {'MB':>8}  argmax = student PyTorch")
    for name in runs:
        agree = float((outputs[name].argmax(-1) == ref).mean())
        print(f"{name:<22} {ms[name]:9.1f} {base / ms[name]:8.2f}x {sizes[name] / 1e6:8.2f}  "
              f"{agree:.3f}")
    res = {"batch_size": args.batch_size, "seq_len": args.seq_len, "threads": args.threads,
           "repeats": args.repeats, "student_layers": args.num_layers, "latency_ms": ms,
           "speedup_vs_teacher": {k: base / v for k, v in ms.items()}, "size_bytes": sizes,
           "int8_argmax_agreement_with_student": float(
               (outputs["student_ort_int8"].argmax(-1) == ref).mean()),
           "export_check": {k: {m: f[m] for m in ("max_abs_diff", "argmax_agreement")}
                            for k, f in exported["files"].items()}}
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
