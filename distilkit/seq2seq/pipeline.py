"""``task: seq2seq`` recipes: one encoder-decoder distillation run, end to end.

data -> teacher (a saved T5/BART/Marian directory, or the built-in truecasing teacher) ->
student (``student:`` as for classification: ``from_teacher`` with ``num_layers`` /
``num_decoder_layers`` / ``keep_decoder_layers``, ``config`` or ``pretrained``) ->
optional sequence-level KD (``sequence_kd:``: the teacher decodes the training inputs, cached)
-> compression (prepare) -> :class:`~distilkit.DistilTrainer` (token-level KD on decoder
logits, label CE, hidden-state / Patient-KD losses with ``layer_map`` and
``decoder_layer_map``) -> compression (finalize) -> save -> evaluation by generation of teacher
and student (BLEU, chrF, exact match, parameters, size on disk, latency) -> ``results.json``.

The recipe's ``text_column`` is the source and ``label_column`` the target; the built-in task
is ``dataset: builtin:truecase`` (``text_column: source``, ``label_column: target``). With
``label_column: null`` the student can only learn from the teacher's generations, so
``sequence_kd`` is then required.
"""
from __future__ import annotations

import os
import time
from typing import Optional

BUILTIN_TRUECASE = "builtin:truecase"
BUILTIN_S2S_TEACHER = "builtin:truecase-bart"


def load_seq2seq_raw(spec, max_words: Optional[int] = None, train_windows: bool = False):
    """The recipe's splits, with the source and target columns checked before any model is
    loaded (the target only where it is needed: evaluation splits, and training unless
    ``label_column`` is null)."""
    from distilkit.data import DataSpec, load_raw
    from distilkit.seq2seq.data import check_seq2seq_columns, truecase_dataset

    if spec.dataset == BUILTIN_TRUECASE:
        if spec.dataset_config is not None:
            raise ValueError(f"dataset_config: {spec.dataset_config!r}; {BUILTIN_TRUECASE} has "
                             "no configurations (set it to null)")
        ds = truecase_dataset(max_words=max_words, train_windows=train_windows)
        for split in (spec.train_split, spec.eval_split, spec.test_split):
            if split and split not in ds:
                raise ValueError(f"split {split!r} is not in {BUILTIN_TRUECASE}; it has {sorted(ds)}")
        if spec.max_train_samples:
            ds[spec.train_split] = ds[spec.train_split].select(
                range(min(spec.max_train_samples, len(ds[spec.train_split]))))
        if spec.max_eval_samples:
            for split in (spec.eval_split, spec.test_split):
                if split:
                    ds[split] = ds[split].select(range(min(spec.max_eval_samples, len(ds[split]))))
    else:
        ds = load_raw(DataSpec(**{**spec.__dict__}))
    check_seq2seq_columns({spec.train_split: ds[spec.train_split]}, spec.text_column,
                          spec.label_column)
    for split in (spec.eval_split, spec.test_split):
        if split:
            if not spec.label_column:
                raise ValueError("label_column: null leaves the evaluation splits without "
                                 "targets; name the target column (seq2seq evaluation scores "
                                 "generations against it)")
            check_seq2seq_columns({split: ds[split]}, spec.text_column, spec.label_column)
    return ds


def resolve_seq2seq_teacher(spec, progress: bool = True):
    """``(teacher model, tokenizer, directory)`` for a teacher path or the built-in one."""
    from distilkit.seq2seq.teacher import (builtin_truecase_settings, load_seq2seq_teacher,
                                           truecase_teacher)

    if spec == BUILTIN_S2S_TEACHER:
        path = truecase_teacher(builtin_truecase_settings(), progress=progress)
    elif isinstance(spec, str):
        path = os.path.expanduser(spec)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"teacher: {spec!r} does not exist; a seq2seq recipe needs a "
                                    "directory saved with save_pretrained (model and tokenizer) "
                                    f"or '{BUILTIN_S2S_TEACHER}'")
    else:
        raise ValueError(f"teacher: {spec!r}; a seq2seq recipe takes one teacher (a directory "
                         f"or '{BUILTIN_S2S_TEACHER}')")
    model, tok = load_seq2seq_teacher(path)
    if not getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(f"teacher: {path!r} is a {type(model).__name__}, not an "
                         "encoder-decoder model; use task: classification for it")
    return model, tok, path


def evaluate_seq2seq_model(model, tokenizer, dataset, model_dir: Optional[str] = None,
                           source_column: str = "source", target_column: str = "target",
                           generation: Optional[dict] = None, max_samples: Optional[int] = None,
                           latency_samples: int = 16) -> dict:
    """Generation scores, parameters, size of the saved files and latency of one model."""
    from distilkit.evaluate import count_parameters, model_files
    from distilkit.seq2seq.generate_eval import GenerationSettings, evaluate_generation

    gen = GenerationSettings(**(generation or {}))
    out = evaluate_generation(model, tokenizer, dataset, source_column, target_column, gen,
                              max_samples, latency_samples)
    params, nonzero = count_parameters(model)
    out.update(parameters=params, nonzero_parameters=nonzero)
    if model_dir:
        out["size_on_disk_bytes"] = sum(model_files(model_dir).values())
    return out


def default_seq2seq_spec():
    """The data a seq2seq model is evaluated on when nothing names any: the built-in task."""
    from distilkit.data import DataSpec

    return DataSpec(dataset=BUILTIN_TRUECASE, text_column="source", label_column="target")


def evaluate_seq2seq_dir(model_dir: str, recipe=None, spec=None, split: Optional[str] = None,
                         latency: bool = True) -> dict:
    """``distilkit evaluate`` for an encoder-decoder model directory: generate over ``split``
    of ``spec`` (default: the recipe's data, else the built-in truecasing task) with the
    recipe's generation settings and score it (BLEU, chrF, exact match, size, latency)."""
    from transformers import AutoTokenizer

    from distilkit.compress.base import load_compressed
    from distilkit.seq2seq.teacher import builtin_truecase_settings

    spec = spec or (recipe.data if recipe else default_seq2seq_spec())
    builtin = (builtin_truecase_settings()
               if recipe is None or recipe.keys.teacher == BUILTIN_S2S_TEACHER else None)
    split = split or spec.test_split or spec.eval_split
    raw = load_seq2seq_raw(spec, builtin.max_words if builtin else None)
    if split not in raw:
        raise ValueError(f"split {split!r} is not in the dataset; it has {sorted(raw)}")
    model = load_compressed(model_dir)
    res = evaluate_seq2seq_model(model, AutoTokenizer.from_pretrained(model_dir), raw[split],
                                 model_dir, spec.text_column, spec.label_column,
                                 recipe.keys.generation if recipe else None,
                                 latency_samples=16 if latency else 0)
    res.update(split=split, task="seq2seq")
    return res


def run_seq2seq_recipe(recipe, progress: bool = True) -> dict:
    """Run a ``task: seq2seq`` recipe and return its results (also in ``results.json``)."""
    import torch

    from distilkit.compress.base import (CompressionContext, compress_, config_from_dict,
                                         get_method, load_compressed)
    from distilkit.pipeline import build_student, save_student, write_run_outputs
    from distilkit.seq2seq.data import seq2seq_collator, tokenize_seq2seq
    from distilkit.seq2seq.generate_eval import GenerationEvalCallback, GenerationSettings
    from distilkit.seq2seq.sequence_kd import sequence_kd_dataset, sequence_kd_settings
    from distilkit.seq2seq.teacher import builtin_truecase_settings
    from distilkit.trainer import DistilTrainer

    t0 = time.time()
    k, spec = recipe.keys, recipe.data
    args = recipe.distil_config(disable_tqdm=not progress)
    comp_cfgs = [config_from_dict(e) for e in k.compression]
    gen = GenerationSettings(**(k.generation or {}))
    skd = sequence_kd_settings(k.sequence_kd) if k.sequence_kd else None
    if not spec.label_column and skd is None:
        raise ValueError("label_column: null (no targets) needs sequence_kd: {...}, so the "
                         "student trains on the teacher's generations")
    # The built-in teacher's data: its sentence length limit and training windows.
    builtin = builtin_truecase_settings() if k.teacher == BUILTIN_S2S_TEACHER else None
    raw = load_seq2seq_raw(spec, builtin.max_words if builtin else None,
                           builtin.train_windows if builtin else False)
    teacher, tok, teacher_dir = resolve_seq2seq_teacher(k.teacher, progress)
    student, _ = build_student(recipe, teacher, tok)
    if not getattr(student.config, "is_encoder_decoder", False):
        raise ValueError(f"student: {type(student).__name__} is not an encoder-decoder model")
    src, tgt, n = spec.text_column, spec.label_column, k.max_length
    evals = {s: raw[s] for s in (spec.eval_split, spec.test_split) if s}
    data = tokenize_seq2seq(evals, tok, src, tgt, n, n) if evals else {}
    seq_stats: dict = {}
    if skd is not None:
        cache = os.path.join(k.cache_dir, "generations") if k.cache_dir else None
        train_ds = sequence_kd_dataset(teacher, tok, raw[spec.train_split], skd, src, tgt,
                                       cache_dir=cache, max_source_length=n,
                                       max_target_length=n, stats=seq_stats, progress=progress)
    else:
        train_ds = tokenize_seq2seq(raw[spec.train_split], tok, src, tgt, n, n)
    collator = seq2seq_collator(tok)
    ctx = CompressionContext(
        dataloader=torch.utils.data.DataLoader(train_ds, batch_size=args.per_device_train_batch_size,
                                               collate_fn=collator),
        loss_fn=lambda m, b: m(**b).loss, teacher=teacher, max_batches=16)
    callbacks = []
    for cfg in comp_cfgs:
        compress_(student, cfg, ctx)
        callbacks += get_method(cfg).callbacks(student, cfg, ctx)
    if spec.eval_split and args.eval_strategy != "no":
        callbacks.append(GenerationEvalCallback(tok, raw[spec.eval_split], src, tgt, gen,
                                                spec.max_eval_samples or 200))
    trainer = DistilTrainer(model=student, teacher_model=teacher, args=args, train_dataset=train_ds,
                            eval_dataset=data.get(spec.eval_split), data_collator=collator,
                            processing_class=tok, callbacks=callbacks)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    results: dict = {}
    if trainer.is_world_process_zero():
        out_dir = save_student(trainer.model, tok, args.output_dir, k.save_merged_adapter)
        split = spec.test_split or spec.eval_split
        common = dict(source_column=src, target_column=tgt, generation=k.generation,
                      max_samples=spec.max_eval_samples)
        t_m = evaluate_seq2seq_model(teacher, tok, raw[split], teacher_dir, **common)
        loaded = load_compressed(out_dir)
        s_m = evaluate_seq2seq_model(loaded, tok, raw[split], out_dir, **common)
        results = {
            "name": k.name, "task": "seq2seq", "split": split, "teacher": t_m, "student": s_m,
            "bleu_retention": s_m["bleu"] / max(t_m["bleu"], 1e-9),
            "compression_x": t_m["size_on_disk_bytes"] / max(s_m["size_on_disk_bytes"], 1),
            "speedup_batch1": t_m["latency_ms"] / max(s_m["latency_ms"], 1e-9),
            "sequence_kd": seq_stats or None, "train_seconds": round(time.time() - t0, 1),
            "train_log": [h for h in trainer.state.log_history if "loss" in h][-3:],
            "recipe": recipe.to_dict(),
        }
        write_run_outputs(recipe, results, args.output_dir, out_dir)
        if progress:
            print(summary(results))
    trainer.accelerator.wait_for_everyone()
    return results


def summary(results: dict) -> str:
    """A short human summary of a seq2seq run."""
    t, s = results["teacher"], results["student"]
    row = ("{:8} BLEU {bleu:6.2f}  chrF {chrf:6.2f}  exact {exact_match:.3f}  params "
           "{parameters:,}  size {mb:.2f} MB  latency {latency_ms:.1f} ms")
    return "\n".join([
        f"== distilkit: {results['name']} (seq2seq, split: {results['split']}) ==",
        row.format("teacher", mb=t["size_on_disk_bytes"] / 1e6, **t),
        row.format("student", mb=s["size_on_disk_bytes"] / 1e6, **s),
        f"BLEU retention {100 * results['bleu_retention']:.1f}%   size {results['compression_x']:.2f}x "
        f"smaller   speed-up (batch 1) {results['speedup_batch1']:.2f}x   "
        f"time {results['train_seconds']:.0f}s"])
