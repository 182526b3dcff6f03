"""Reproduce Tang et al. (2019) on the built-in data: distil the MiniLM teacher into a BiLSTM.

    OMP_NUM_THREADS=2 python scripts/repro_bilstm.py                 # full (lead runs this)
    OMP_NUM_THREADS=2 python scripts/repro_bilstm.py --quick         # tiny settings, minutes

Rows, each over ``--seeds`` (default 3): a BiLSTM trained on the labels only; distilled
(logit MSE against the teacher); distilled on the augmented transfer set (masking, POS-guided
replacement, n-gram sampling; the teacher labels the new sentences); that model factorized by
``lstm_projection`` and distilled again to recover; and that model quantized to 4 bits by
quantized distillation (``quantize`` with ``quantize_lstm``). Columns: test accuracy, parameters,
CPU latency at batch 1 and 32 (fp32, median) and speed-up over the teacher at batch 32.
As in Tang et al., each of the first three models is selected on the validation split: it is
scored there after every epoch's worth of steps (one pass over the labelled sentences) and
the best weights are kept (``--no-select`` keeps the last weights instead).
Prints a markdown table and one JSON line (prefix ``RESULT_JSON``).
Targets: augmentation >= 2 points above labels-only; >= 15x faster than the teacher at 32.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny settings to check the script runs")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--teacher", default="builtin:minilm-rt", help="teacher directory or builtin")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--hidden-size", type=int, default=150)
    p.add_argument("--embedding-dim", type=int, default=300)
    p.add_argument("--n-iter", type=int, default=4, help="augmented copies per sentence")
    p.add_argument("--epochs", type=float, default=10.0, help="epochs over the labelled set")
    p.add_argument("--aug-epochs", type=float, default=4.0, help="epochs over the augmented set")
    p.add_argument("--no-select", dest="select", action="store_false",
                   help="keep the last weights instead of the best on the validation split")
    p.add_argument("--recover-steps", type=int, default=600,
                   help="distillation steps after factorizing / while quantizing")
    p.add_argument("--rank", type=float, default=0.5, help="lstm_projection rank (fraction)")
    p.add_argument("--embedding-init", choices=["teacher", "random"], default="teacher",
                   help="word embeddings from the teacher's (averaged word pieces) or random; "
                        "Tang et al. used pretrained word2vec")
    p.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "repro_bilstm"))
    a = p.parse_args(argv)
    if a.quick:
        a.seeds, a.n_iter, a.epochs, a.aug_epochs, a.recover_steps = a.seeds[:2], 1, 1.0, 0.5, 20
    return a


def tokenized(texts, labels, s_tok, t_tok, max_length):
    """Student-tokenized rows (with ``labels`` when given) and the same rows for the teacher."""
    from datasets import Dataset

    s, t = s_tok(texts, truncation=True, max_length=max_length), \
        t_tok(texts, truncation=True, max_length=max_length)
    cols = {"input_ids": s["input_ids"], "attention_mask": s["attention_mask"]}
    if labels is not None:
        cols["labels"] = labels
    t_cols = {k: t[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in t}
    return Dataset.from_dict(cols), Dataset.from_dict(t_cols)


def best_on_validation(score, every: int):
    """A callback that scores the model every ``every`` steps (and at the last step) and keeps
    the weights that scored best; ``restore(model)`` loads them back after training."""
    from transformers import TrainerCallback

    class BestOnValidation(TrainerCallback):
        best, step, weights = -1.0, 0, None

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % every and state.global_step != state.max_steps:
                return
            acc = score(model)
            model.train()
            if acc > self.best:
                self.best, self.step = acc, state.global_step
                self.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}

        def restore(self, model):
            model.load_state_dict(self.weights)
            print(f"  selected step {self.step} (validation accuracy {self.best:.4f})", flush=True)

    return BestOnValidation()


def train(student, s_tok, t_tok, teacher, ds, args, seed, steps, lr, alpha_mse, alpha_ce, out,
          callbacks=(), select=None):
    """Distil (or train on labels) for ``steps`` steps; ``select`` is a best_on_validation
    callback whose best weights are restored at the end."""
    from distilkit.collate import DistilCollator
    from distilkit.config import DistilConfig
    from distilkit.trainer import DistilTrainer

    cfg = DistilConfig(output_dir=out, max_steps=max(1, int(steps)), learning_rate=lr,
                       per_device_train_batch_size=32, alpha_mse=alpha_mse, alpha_kd=0.0,
                       alpha_ce=alpha_ce, warmup_steps=int(0.05 * steps), lr_scheduler_type="linear",
                       weight_decay=0.0, report_to=[], save_strategy="no", logging_steps=10 ** 6,
                       use_cpu=True, seed=seed, disable_tqdm=True)
    DistilTrainer(model=student, teacher_model=teacher, args=cfg, train_dataset=ds,
                  data_collator=DistilCollator(s_tok, teacher_pad_token_id=t_tok.pad_token_id),
                  callbacks=list(callbacks) + ([select] if select else [])).train()
    if select:
        select.restore(student)
    return student.eval()


def accuracy(model, tok, texts, labels, max_length, bs=128):
    import torch

    correct = 0
    with torch.no_grad():
        for i in range(0, len(texts), bs):
            enc = tok(texts[i:i + bs], truncation=True, max_length=max_length, padding=True,
                      return_tensors="pt")
            pred = model(**enc).logits.argmax(-1)
            correct += int((pred == torch.tensor(labels[i:i + bs])).sum())
    return correct / len(texts)


def latency_ms(model, tok, texts, batch, max_length, reps):
    """Median forward time (ms) of one batch, tokenization excluded."""
    import torch

    batches = [tok(texts[i:i + batch], truncation=True, max_length=max_length, padding=True,
                   return_tensors="pt") for i in range(0, batch * reps, batch)]
    times = []
    with torch.inference_mode():
        model(**batches[0])  # warm-up
        for enc in batches:
            t0 = time.perf_counter()
            model(**enc)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def main(argv=None):
    import torch
    from transformers import AutoTokenizer

    from distilkit.augment import AugmentConfig, augment_texts
    from distilkit.compress.base import CompressionContext, compress_, finalize_, get_method
    from distilkit.compress.lstm_projection import LSTMProjectionConfig
    from distilkit.compress.quantize import QuantizeConfig
    from distilkit.data import builtin_dataset
    from distilkit.students.bilstm import build_bilstm_student
    from distilkit.teacher_cache import attach_teacher_outputs
    from distilkit.finetune import builtin_teacher
    from distilkit.teachers import BUILTIN_TEACHER, load_teacher

    a = parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    ds = builtin_dataset()
    # Plain lists: datasets 5 returns lazy Column objects, which do not support * or +.
    train_x, train_y = list(ds["train"]["text"]), list(ds["train"]["label"])
    test_x, test_y = list(ds["test"]["text"]), list(ds["test"]["label"])
    val_x, val_y = list(ds["validation"]["text"]), list(ds["validation"]["label"])
    if a.quick:
        train_x, train_y, test_x, test_y = train_x[:600], train_y[:600], test_x[:200], test_y[:200]
        val_x, val_y = val_x[:200], val_y[:200]
    t_path = builtin_teacher() if a.teacher == BUILTIN_TEACHER else a.teacher
    teacher, t_tok = load_teacher(t_path), AutoTokenizer.from_pretrained(t_path)
    reps1, reps32 = (20, 4) if a.quick else (100, 20)
    lat_texts = (test_x * 40)[: 32 * reps32 + 32]
    rows: dict[str, list[dict]] = {}
    t_row = {"accuracy": accuracy(teacher, t_tok, test_x, test_y, a.max_length),
             "params": n_params(teacher),
             "lat1": latency_ms(teacher, t_tok, lat_texts, 1, a.max_length, reps1),
             "lat32": latency_ms(teacher, t_tok, lat_texts, 32, a.max_length, reps32)}

    def with_teacher(texts, labels, s_tok):
        # Labels only where the hard-label loss uses them: the trainer counts labelled rows
        # as the loss's items, so unlabelled augmented rows must not carry a labels column.
        d, t_d = tokenized(texts, labels, s_tok, t_tok, a.max_length)
        return attach_teacher_outputs(d, teacher, teacher_dataset=t_d,
                                      tokenizer_name_or_path=t_path, max_length=a.max_length,
                                      progress=False)

    def record(name, model, s_tok):
        rows.setdefault(name, []).append({
            "accuracy": accuracy(model, s_tok, test_x, test_y, a.max_length),
            "params": n_params(model),
            "lat1": latency_ms(model, s_tok, lat_texts, 1, a.max_length, reps1),
            "lat32": latency_ms(model, s_tok, lat_texts, 32, a.max_length, reps32)})
        print(name, rows[name][-1], flush=True)

    size = dict(embedding_dim=a.embedding_dim, hidden_size=a.hidden_size, mlp_hidden_size=200,
                dropout=0.1, embedding_init=a.embedding_init)
    aug_cache: dict = {}
    epoch_steps = max(1, len(train_x) // 32)

    def select(s_tok):
        if not a.select:
            return None
        return best_on_validation(
            lambda m: accuracy(m.eval(), s_tok, val_x, val_y, a.max_length), epoch_steps)

    for seed in a.seeds:
        out = os.path.join(a.out, f"seed{seed}")
        steps = a.epochs * len(train_x) / 32

        def fresh():
            return build_bilstm_student(teacher, t_tok, train_x, seed=seed, **size)

        student, s_tok = fresh()
        labelled = with_teacher(train_x, train_y, s_tok)
        train(student, s_tok, t_tok, teacher, labelled, a, seed, steps, 1e-3, 0.0, 1.0, out,
              select=select(s_tok))
        record("BiLSTM, labels only", student, s_tok)

        student, s_tok = fresh()
        base = with_teacher(train_x, None, s_tok)
        train(student, s_tok, t_tok, teacher, base, a, seed, steps, 1e-3, 1.0, 0.0, out,
              select=select(s_tok))
        record("BiLSTM, distilled", student, s_tok)

        if seed not in aug_cache:
            aug_cache[seed] = augment_texts(train_x, AugmentConfig(n_iter=a.n_iter, seed=seed))
        new = aug_cache[seed]
        aug = with_teacher(list(train_x) + new, None, s_tok)
        student, s_tok = fresh()
        train(student, s_tok, t_tok, teacher, aug, a, seed, a.aug_epochs * len(aug) / 32, 1e-3,
              1.0, 0.0, out, select=select(s_tok))
        record("BiLSTM, distilled + augmentation", student, s_tok)
        state = {k: v.clone() for k, v in student.state_dict().items()}

        compress_(student, LSTMProjectionConfig(rank=a.rank))
        train(student, s_tok, t_tok, teacher, aug, a, seed, a.recover_steps, 5e-4, 1.0, 0.0, out)
        record(f"+ lstm_projection (rank {a.rank:g}), re-distilled", student, s_tok)

        student, s_tok = fresh()
        student.load_state_dict(state)
        qcfg = QuantizeConfig(bits=4, bucket_size=256, quantize_lstm=True)
        compress_(student, qcfg)
        cbs = get_method(qcfg).callbacks(student, qcfg, CompressionContext())
        train(student, s_tok, t_tok, teacher, aug, a, seed, a.recover_steps, 5e-4, 1.0, 0.0, out,
              callbacks=cbs)
        finalize_(student)
        record("+ 4-bit quantized distillation", student, s_tok)

    def mean_sd(vals):
        return (statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0)

    print(f"\n| model | test accuracy (mean ± sd, {len(a.seeds)} seeds) | parameters | "
          "latency b=1 (ms) | latency b=32 (ms) | speed-up b=32 |\n|---|---|---|---|---|---|")
    print(f"| teacher (MiniLM-L6) | {100 * t_row['accuracy']:.2f} | {t_row['params']:,} | "
          f"{t_row['lat1']:.2f} | {t_row['lat32']:.1f} | 1.0x |")
    summary = {"teacher": t_row, "seeds": a.seeds, "quick": a.quick, "rows": {}}
    for name, rs in rows.items():
        acc_m, acc_sd = mean_sd([r["accuracy"] for r in rs])
        l1, l32 = statistics.median(r["lat1"] for r in rs), statistics.median(r["lat32"] for r in rs)
        print(f"| {name} | {100 * acc_m:.2f} ± {100 * acc_sd:.2f} | {rs[0]['params']:,} | "
              f"{l1:.2f} | {l32:.2f} | {t_row['lat32'] / l32:.1f}x |")
        summary["rows"][name] = {"accuracy_mean": acc_m, "accuracy_sd": acc_sd,
                                 "accuracies": [r["accuracy"] for r in rs],
                                 "params": rs[0]["params"], "lat1_ms": l1, "lat32_ms": l32,
                                 "speedup32": t_row["lat32"] / l32}
    print("RESULT_JSON " + json.dumps(summary))


if __name__ == "__main__":
    main()
