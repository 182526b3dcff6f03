"""One distillation run from a recipe: data -> teacher -> student -> compression (prepare) ->
DistilTrainer -> compression (finalize) -> save -> evaluate -> results.json, card, push.

Everything that can be checked without training is checked first (recipe keys and values,
teacher path, dataset columns and splits, label counts), and the student is written to a
temporary directory that is renamed into place only when complete, so a failed run leaves no
half-written model. Under ``accelerate launch`` with several processes every process trains;
the main process evaluates and writes the outputs.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from typing import Any, Optional

import yaml

from distilkit.recipe import Recipe

STUDENT_DIR = "student"
RESULTS_FILE = "results.json"


def _resolve_teacher(spec: Any) -> Any:
    from distilkit.teachers import BUILTIN_TEACHER, _looks_local, builtin_teacher

    if isinstance(spec, list):
        return [_resolve_teacher(s) for s in spec]
    if spec == BUILTIN_TEACHER:
        return builtin_teacher()
    if not isinstance(spec, str):
        raise ValueError(f"teacher: {spec!r} must be a path, a hub id, a list of them, or "
                         f"'{BUILTIN_TEACHER}'")
    path = os.path.expanduser(spec)
    if _looks_local(path) and not os.path.isdir(path):
        raise FileNotFoundError(f"teacher: {spec!r} does not exist; give a directory saved with "
                                f"save_pretrained, a hub id like 'org/name', or '{BUILTIN_TEACHER}'")
    return path


def build_student(recipe: Recipe, teacher, tokenizer, train_texts=None):
    """The student the recipe asks for, and the tokenizer it reads with."""
    from distilkit.students.init import student_from_config, student_from_teacher

    spec = dict(recipe.keys.student)
    kind = spec.pop("type", "from_teacher")
    lora = spec.pop("lora", None)
    if kind == "from_teacher":
        allowed = {"num_layers", "keep_layers", "num_decoder_layers", "keep_decoder_layers", "strategy"}
        _check_keys("student", spec, allowed)
        student = student_from_teacher(teacher, **spec)
    elif kind == "config":
        student = student_from_config(teacher, **spec.get("config", {}),
                                      **({k: v for k, v in spec.items() if k != "config"}))
    elif kind == "pretrained":
        _check_keys("student", spec, {"path"})
        from transformers import AutoTokenizer

        from distilkit.compress.base import load_compressed
        path = os.path.expanduser(spec["path"])
        student = load_compressed(path)
        if os.path.isfile(os.path.join(path, "tokenizer_config.json")):
            tokenizer = AutoTokenizer.from_pretrained(path)  # e.g. a BiLSTM's word vocabulary
    else:  # bilstm
        from distilkit.students.bilstm import build_bilstm_student
        student, tokenizer = build_bilstm_student(teacher, tokenizer, train_texts, **spec)
    if lora:
        from peft import LoraConfig, get_peft_model
        student = get_peft_model(student, LoraConfig(**lora))
    return student, tokenizer


def _check_keys(field: str, spec: dict, allowed: set) -> None:
    bad = sorted(set(spec) - allowed)
    if bad:
        raise ValueError(f"{field}: unknown key(s) {bad}; allowed here: {sorted(allowed)}")


def _atomic_save_dir(out_dir: str, save_fn) -> None:
    """Write a directory through ``save_fn(tmp)`` and rename it into place."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".partial-{os.path.basename(out_dir)}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_fn(tmp)
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def run_recipe(recipe: Recipe, progress: bool = True) -> dict:
    """Run one recipe end to end and return its results (also written to ``results.json``)."""
    if recipe.keys.task == "seq2seq":
        from distilkit.seq2seq.pipeline import run_seq2seq_recipe
        return run_seq2seq_recipe(recipe, progress=progress)
    from transformers import AutoTokenizer

    from distilkit.collate import DistilCollator
    from distilkit.compress.base import (CompressionContext, compress_, config_from_dict,
                                         get_method)
    from distilkit.data import load_raw, num_labels_of, tokenize
    from distilkit.teachers import load_teacher
    from distilkit.trainer import DistilTrainer

    t0 = time.time()
    k, spec = recipe.keys, recipe.data
    args = recipe.distil_config(disable_tqdm=not progress)
    comp_cfgs = [config_from_dict(e) for e in k.compression]
    if k.cache_dir and k.teacher_cache:
        _check_writable(k.cache_dir)
    raw = load_raw(spec)                      # columns and splits checked here
    teacher_spec = _resolve_teacher(k.teacher)
    first = teacher_spec[0] if isinstance(teacher_spec, list) else teacher_spec
    tokenizer = AutoTokenizer.from_pretrained(first)
    teachers = [load_teacher(t, adapter=k.teacher_adapter)
                for t in (teacher_spec if isinstance(teacher_spec, list) else [teacher_spec])]
    n_labels = num_labels_of(raw, spec)
    if n_labels is not None and teachers[0].config.num_labels != n_labels:
        raise ValueError(f"the teacher predicts {teachers[0].config.num_labels} labels but "
                         f"label_column {spec.label_column!r} has {n_labels} classes: fine-tune "
                         "a teacher on this task first")
    texts = list(raw[spec.train_split][spec.text_column])
    if spec.text_pair_column:
        texts += list(raw[spec.train_split][spec.text_pair_column])
    student, s_tok = build_student(recipe, teachers[0], tokenizer, texts)
    if getattr(student.config, "model_type", "") == "distilkit-bilstm":
        from distilkit.students.bilstm import check_pair_data
        check_pair_data(student.config, spec.text_pair_column)
    train_raw = raw[spec.train_split]
    if k.augment:
        from distilkit.augment import augment_dataset
        train_raw = augment_dataset(train_raw, k.augment, spec, seed=args.seed)
    ds = tokenize(raw, s_tok, spec, max_length=k.max_length)
    train_ds = (tokenize({"train": train_raw}, s_tok, spec, max_length=k.max_length)["train"]
                if k.augment else ds[spec.train_split])
    if k.teacher_cache and args.needs_token_states:
        print("[distilkit] teacher_cache: not used, because alpha_hidden / alpha_attention / "
              "alpha_cosine read the teacher's per-token states, which are not cached; the "
              "teacher runs every step", file=sys.stderr)
    if s_tok is not tokenizer or (k.teacher_cache and not args.needs_token_states):
        from distilkit.teacher_cache import attach_teacher_outputs
        outputs = ("logits", "cls_hidden") if args.alpha_patient else ("logits",)
        t_train = tokenize({"t": train_raw}, tokenizer, spec, max_length=k.max_length)["t"]
        cache_kw = dict(teacher_dataset=t_train, max_length=k.max_length, cache_dir=k.cache_dir,
                        progress=progress)
        # With an adapter the teacher is the merged model, not the files at its path: key
        # the cache by (and compute with) the loaded weights.
        members = teachers if k.teacher_adapter else (
            teacher_spec if isinstance(teacher_spec, list) else [teacher_spec])
        train_ds = attach_teacher_outputs(train_ds, members[0], outputs=outputs, **cache_kw)
        if len(members) > 1:  # every member's logits, averaged per step like a live ensemble
            from distilkit.teacher_cache import attach_ensemble_logits
            train_ds = attach_ensemble_logits(train_ds, members, **cache_kw)
    collator = DistilCollator(s_tok)
    ctx = CompressionContext(
        dataloader=_loader(ds[spec.train_split], collator, args.per_device_train_batch_size),
        loss_fn=lambda m, b: m(**b).loss, teacher=teachers[0], max_batches=16)
    callbacks = []
    for cfg in comp_cfgs:
        compress_(student, cfg, ctx)
        callbacks += get_method(cfg).callbacks(student, cfg, ctx)
    trainer = DistilTrainer(model=student, teacher_model=teachers if len(teachers) > 1 else teachers[0],
                            args=args, train_dataset=train_ds, eval_dataset=ds[spec.eval_split],
                            data_collator=collator, processing_class=s_tok, callbacks=callbacks,
                            compute_metrics=_metrics())
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    results: dict = {}
    if trainer.is_world_process_zero():
        out_dir = save_student(trainer.model, s_tok, args.output_dir, k.save_merged_adapter)
        results = _evaluate_and_report(recipe, raw, spec, teachers[0], tokenizer, first, out_dir,
                                       args, time.time() - t0, trainer)
    trainer.accelerator.wait_for_everyone()
    return results


def save_student(model, tokenizer, run_dir: str, merge_adapter: bool = True) -> str:
    """Finalize every applied compression method (e.g. convert to packed low-bit weights),
    merge a LoRA adapter when asked, and write the student with its tokenizer to
    ``run_dir/student`` atomically. Returns that directory."""
    from distilkit.compress.base import compression_records, finalize_, save_compressed

    if hasattr(model, "merge_and_unload") and merge_adapter:
        model = model.merge_and_unload()
    if compression_records(model):
        finalize_(model)
    out_dir = os.path.join(run_dir, STUDENT_DIR)

    def save(tmp):
        save_compressed(model, tmp)
        tokenizer.save_pretrained(tmp)
    _atomic_save_dir(out_dir, save)
    return out_dir


def _loader(ds, collator, batch_size):
    import torch
    return torch.utils.data.DataLoader(ds.with_format(None), batch_size=batch_size, shuffle=False,
                                       collate_fn=collator)


def _metrics():
    from distilkit.metrics import classification_metrics
    return classification_metrics


def _check_writable(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise PermissionError(f"cache_dir: {path!r} is not writable ({e}); choose another "
                              "directory or fix its permissions") from e


def _evaluate_and_report(recipe, raw, spec, teacher, tokenizer, teacher_path, out_dir, args,
                         elapsed, trainer) -> dict:
    from distilkit.compress.base import load_compressed
    from distilkit.evaluate import evaluate_model

    split = spec.test_split or spec.eval_split
    k = recipe.keys
    common = dict(text_column=spec.text_column, text_pair_column=spec.text_pair_column,
                  label_column=spec.label_column, max_length=k.max_length)
    t_dir = teacher_path if isinstance(teacher_path, str) and os.path.isdir(teacher_path) else None
    t_metrics = evaluate_model(teacher, tokenizer, raw[split], model_dir=t_dir, **common)
    from transformers import AutoTokenizer
    student = load_compressed(out_dir)
    s_metrics = evaluate_model(student, AutoTokenizer.from_pretrained(out_dir), raw[split],
                               model_dir=out_dir, **common)
    results = {
        "name": k.name, "split": split, "teacher": t_metrics, "student": s_metrics,
        "retention": s_metrics["accuracy"] / max(t_metrics["accuracy"], 1e-9),
        "compression_x": t_metrics["parameters"] / max(s_metrics["parameters"], 1),
        "speedup_batch32": t_metrics["latency_ms_batch32"] / max(s_metrics["latency_ms_batch32"], 1e-9),
        "train_seconds": round(elapsed, 1),
        "processes": args.world_size,
        "global_steps": trainer.state.global_step,
        "train_log": [h for h in trainer.state.log_history if "loss" in h][-3:],
        "recipe": recipe.to_dict(),
    }
    write_run_outputs(recipe, results, args.output_dir, out_dir)
    print(summary(results))
    return results


def write_run_outputs(recipe: Recipe, results: dict, run_dir: str, model_dir: str) -> None:
    """What every finished run leaves (each file written atomically): ``results.json`` and the
    resolved ``recipe.yaml`` in the run directory, the model card as the student's
    ``README.md``; then the push to the Hub when the recipe asks for it."""
    from distilkit.card import model_card

    os.makedirs(run_dir, exist_ok=True)
    _atomic_write(os.path.join(run_dir, RESULTS_FILE), json.dumps(results, indent=2, default=str))
    _atomic_write(os.path.join(run_dir, "recipe.yaml"), yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    _atomic_write(os.path.join(model_dir, "README.md"), model_card(results, recipe.to_dict()))
    if recipe.keys.push_to_hub:
        from distilkit.hub import push_to_hub
        push_to_hub(model_dir, recipe.keys.hub_repo_id)


def summary(results: dict) -> str:
    """A short human summary of a run's results."""
    t, s = results["teacher"], results["student"]
    lines = [
        f"== distilkit: {results['name']} (split: {results['split']}) ==",
        f"teacher  accuracy {t['accuracy']:.4f}  params {t['parameters']:,}",
        f"student  accuracy {s['accuracy']:.4f}  params {s['parameters']:,}  "
        f"size {s['size_on_disk_bytes'] / 1e6:.2f} MB",
        f"retention {100 * results['retention']:.1f}%   compression {results['compression_x']:.2f}x   "
        f"speed-up (batch 32) {results['speedup_batch32']:.2f}x   time {results['train_seconds']:.0f}s",
    ]
    return "\n".join(lines)
