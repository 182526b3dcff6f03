"""One distillation run from a recipe, for every task: the order of a run and its guarantees.

    validate -> data -> teachers -> student -> teacher outputs / training data ->
    compression (prepare) -> DistilTrainer -> compression (finalize) -> save -> evaluate ->
    [export + every runtime measured] -> results.json, recipe.yaml, model card -> push

What differs between tasks (how data, teachers and students are loaded, what the trainer
reads, how a model is scored) comes from the task plug-in (:mod:`distilkit.tasks`); this
module owns what every run promises:

* everything that can be checked without training is checked first (recipe keys and values,
  compression order, output and cache directories, teacher path, columns and splits, label
  counts), so bad input fails in seconds with one line;
* the student is written to a temporary directory renamed into place only when complete, and
  every other output file atomically, so a failed run leaves nothing half-written;
* under ``accelerate launch`` every process trains and only the main process evaluates and
  writes.
"""
from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import yaml

from distilkit.hub import EXPORT_DIR  # the export's place in the student directory
from distilkit.recipe import ExportSettings, Recipe, export_settings
from distilkit.tasks import get_task

STUDENT_DIR = "student"
RESULTS_FILE = "results.json"
CHECK_ROWS = 32      # sentences of the evaluation split the export is checked on


def _preflight(recipe: Recipe, args, create: bool = True) -> None:
    """What the run will need at its end, checked at its start: writable output and cache
    directories, and a Hub token when the student is to be pushed."""
    from distilkit.files import check_writable

    # One process: what the check makes is removed again (a refused run leaves nothing).
    # Several (a launch): each checks the same directory at once, and one removing it while
    # another writes its probe would fail that one; there it stays.
    alone = int(os.environ.get("WORLD_SIZE", "1")) <= 1
    check_writable(args.output_dir, "output_dir", create=create, keep=not alone)
    if recipe.keys.cache_dir and recipe.keys.teacher_cache:
        check_writable(recipe.keys.cache_dir, "cache_dir", "choose another directory, fix its "
                       "permissions, or turn the cache off with teacher_cache: false",
                       create=create)
    if recipe.keys.export:
        from distilkit.export.runtime import require_onnx

        require_onnx()  # an ImportError naming the extra to install
    if recipe.keys.push_to_hub:
        from huggingface_hub import get_token

        if not get_token():
            raise ValueError("push_to_hub: true needs a Hugging Face token; run `hf auth login` "
                             "or set HF_TOKEN, or set push_to_hub: false")


@dataclass
class RunParts:
    """A run up to its training, as :func:`prepare_run` leaves it: the task, the training
    arguments, the data, the teachers, the (uncompressed) student with its tokenizer and what
    the trainer trains on. The budget search (:mod:`distilkit.search`) starts from these too."""

    task: Any
    args: Any
    raw: Any
    teachers: Any
    student: Any
    tokenizer: Any
    prep: Any

    def context(self, max_batches: int = 16, dataset=None, loss_fn=None):
        """The compression context of the run: importance batches of the training split
        (or of ``dataset``), scored against the task loss (or ``loss_fn``)."""
        from distilkit.compress.base import CompressionContext

        ds = self.prep.importance_dataset if dataset is None else dataset
        return CompressionContext(dataloader=_loader(ds, self.prep.collator,
                                                     self.args.per_device_train_batch_size),
                                  loss_fn=loss_fn or (lambda m, b: m(**b).loss),
                                  max_batches=max_batches, tokenizer=self.tokenizer)

    def trainer(self, student, args=None, callbacks=(), **kwargs):
        """A :class:`~distilkit.trainer.DistilTrainer` of ``student`` on the run's data, with
        the run's teacher (none when every term reads cached outputs) and loss."""
        from distilkit.trainer import DistilTrainer

        teacher_model = None
        if not self.prep.teacher_cached:
            models = self.teachers.models()
            teacher_model = models if len(models) > 1 else models[0]
        return DistilTrainer(model=student, teacher_model=teacher_model,
                             teacher_config=self.teachers.config, args=args or self.args,
                             train_dataset=self.prep.train_dataset,
                             eval_dataset=self.prep.eval_dataset,
                             data_collator=self.prep.collator, processing_class=self.tokenizer,
                             callbacks=list(self.prep.callbacks) + list(callbacks),
                             compute_metrics=self.prep.compute_metrics, **kwargs)


def prepare_run(recipe: Recipe, progress: bool = True, args=None) -> RunParts:
    """The start of every run: the checks that need no data, then data, teachers, student and
    training data (teacher outputs attached or cached), in this order."""
    task = get_task(recipe.keys.task)
    args = args if args is not None else recipe.distil_config(disable_tqdm=not progress)
    task.validate(recipe)
    _preflight(recipe, args)
    raw = task.load_data(recipe)
    teachers = task.load_teachers(recipe, raw, progress)
    student, tokenizer = task.build_student(recipe, raw, teachers)
    prep = task.prepare(recipe, args, raw, teachers, student, tokenizer, progress)
    return RunParts(task, args, raw, teachers, student, tokenizer, prep)


def run_recipe(recipe: Recipe, progress: bool = True,
               extra: Optional[Callable[[str], dict]] = None) -> dict:
    """Run one recipe end to end and return its results (also written to ``results.json``).
    A recipe whose compression starts with ``{method: auto, ...}`` is searched first
    (:func:`distilkit.search.run.search_and_run`). ``extra(student_dir)``, when given, adds its
    figures of the saved student to the results (and the card)."""
    from distilkit.budget import is_auto

    if recipe.keys.compression and is_auto(recipe.keys.compression[0]):
        from distilkit.search.run import search_and_run

        return search_and_run(recipe, progress)
    from distilkit.card import model_card
    from distilkit.compress.base import compress_, config_from_dict, get_method
    from distilkit.files import atomic_write_text
    from distilkit.teachers import read_teacher_info

    t0 = time.time()
    args = recipe.distil_config(disable_tqdm=not progress)
    comp_cfgs = [config_from_dict(e) for e in recipe.keys.compression]
    export = export_settings(recipe.keys.export, recipe.keys.compression, recipe.keys.task)
    parts = prepare_run(recipe, progress, args)
    task, raw, teachers, student, tokenizer, prep = (parts.task, parts.raw, parts.teachers,
                                                     parts.student, parts.tokenizer, parts.prep)
    ctx = parts.context()
    callbacks = []
    # Post-training methods (ptq) quantize the trained student: applied after training, in
    # their order (a method after one in the list is one the order checks let follow it,
    # prune_vocab, which commutes with it).
    post = [c for c in comp_cfgs if get_method(c).post_training]
    for cfg in comp_cfgs:
        if get_method(cfg).post_training:
            continue
        compress_(student, cfg, ctx)
        callbacks += get_method(cfg).callbacks(student, cfg, ctx)
    if export is not None and export.four_bit:
        # post-training methods: what the trained student will be packed as, on a copy now
        probe = copy.deepcopy(student) if post else student
        for cfg in post:
            compress_(probe, cfg, ctx)
        check_four_bit_export(probe)
    trainer = parts.trainer(student, callbacks=callbacks)
    if post and (trainer.is_fsdp_enabled or _zero_stage(trainer) == 3):
        raise ValueError(f"compression: {get_method(post[0]).name} quantizes the trained "
                         "student, which a sharded (FSDP / ZeRO-3) run never holds whole in "
                         "one process: train without it, then quantize the saved student "
                         "(distilkit.compress.compress_ on from_pretrained(run/student))")
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    for cfg in post:
        compress_(trainer.model, cfg, ctx)
    results: dict = {}
    # A sharded student (FSDP, DeepSpeed ZeRO-3) is gathered whole by all processes together
    # (a collective), for the main process to save; a replicated one is saved as it is.
    # (under DeepSpeed accelerate gathers from the engine, the Trainer's model_wrapped)
    full_state = (trainer.accelerator.get_state_dict(trainer.model) if trainer.is_fsdp_enabled
                  else trainer.accelerator.get_state_dict(trainer.model_wrapped)
                  if _zero_stage(trainer) == 3 else None)
    teacher_m = None
    if trainer.teacher_sharded:
        # A sharded teacher's every forward is a collective: evaluated by the main process
        # alone it would wait for the others for ever. Every process evaluates it together
        # (the same batches in the same order; each checks the figures' cache after the
        # barrier, before any of them can write it), and the main process keeps the figures.
        trainer.accelerator.wait_for_everyone()
        teacher_m = task.evaluate_teacher(recipe, raw, teachers)
    if trainer.is_world_process_zero():
        out_dir = os.path.join(args.output_dir, STUDENT_DIR)

        def evaluate_and_card(tmp: str) -> None:
            # The student is scored and carded while still in its temporary directory, so a
            # failure here leaves no student without figures.
            t_m, s_m, split = task.evaluate(recipe, raw, teachers, tmp, progress, teacher_m)
            if "size_source" in s_m:
                s_m["size_source"] = os.path.abspath(out_dir)
            results.update({
                "name": recipe.keys.name, "task": task.name, "split": split,
                "teacher": t_m, "student": s_m, **task.compare(t_m, s_m), **prep.stats,
                "teacher_loaded": teachers.loaded,
                "teacher_finetune": (read_teacher_info(teachers.first_dir)
                                     if teachers.first_dir else None),
                "train_seconds": round(time.time() - t0, 1),
                "processes": args.world_size,
                "global_steps": trainer.state.global_step,
                "train_log": [h for h in trainer.state.log_history if "loss" in h][-3:],
                "recipe": recipe.to_dict(),
            })
            if export is not None:
                results.update(export_and_measure(recipe, export, raw, split, tmp, out_dir,
                                                  t_m, progress))
            if extra is not None:
                results.update(extra(tmp))
            atomic_write_text(os.path.join(tmp, "README.md"), model_card(results, recipe.to_dict()))

        from distilkit.sharding import loading_whole_models

        with loading_whole_models():  # the saved student is scored by this process alone
            save_student(trainer.model, tokenizer, args.output_dir,
                         recipe.keys.save_merged_adapter, then=evaluate_and_card,
                         state_dict=full_state)
        write_run_outputs(recipe, results, args.output_dir, out_dir)
        print(task.summary(results))
        if results.get("runtimes"):
            from distilkit.report import runtime_rows, runtimes_table

            print(runtimes_table(runtime_rows([results])))
    trainer.accelerator.wait_for_everyone()
    return results


def check_four_bit_export(student) -> None:
    """What ``export.four_bit`` needs of the student, checked before training from the
    compression records of the prepared student (the packed layers they will become): linears
    and embeddings packed at 4 bits with the uniform scheme, in buckets onnxruntime's
    MatMulNBits and GatherBlockQuantized take for their widths
    (:func:`distilkit.export.nbits.check_layer_specs`, which the export applies
    again to the packed student). A bucket size that does not fit the model fails now,
    in one line with the sizes that do, not after training. (The prepared student cannot
    simply be finalized on a copy: a copy shares its parametrized classes.)"""
    from distilkit.compress.base import compression_records
    from distilkit.export.nbits import check_layer_specs
    from distilkit.recipe import QUANTIZE_METHODS

    def packed(kind: str) -> list:
        return [(name, layer["weights"]["weight"])
                for rec in compression_records(student) if rec["method"] in QUANTIZE_METHODS
                for name, layer in rec.get("layers", {}).items()
                if layer.get("kind") == kind and "weight" in layer.get("weights", {})]

    check_layer_specs(packed("linear"), field="export.four_bit", off="set four_bit: false",
                      embeddings=packed("embedding"))


def export_and_measure(recipe: Recipe, settings: ExportSettings, raw, split: str,
                       tmp: str, out_dir: str, teacher: dict, progress: bool) -> dict:
    """The recipe's ``export:`` step on the saved student in ``tmp`` (its temporary
    directory, later renamed to ``out_dir``): ``distilkit export`` into ``tmp/onnx``, checked
    on the first sentences (or pairs, or sources) of the evaluation split; then, with
    ``settings.evaluate``, every runtime measured on ``split``
    (:func:`distilkit.export.measure.evaluate_export`; a seq2seq student by generation with the recipe's settings,
    :func:`~distilkit.export.measure.evaluate_seq2seq_export`, against the teacher's batch-1
    generation time).

    Returns what goes into ``results.json``: ``export`` (the export's directory relative to
    the run, ``serve``: the file to serve relative to the student directory, the measurement's
    split, threads and protocol, and ``teacher``: the teacher's PyTorch fp32 figures in the
    runtimes' keys, the reference of every ratio) and ``runtimes`` (per runtime: ``file``
    relative to the student directory, accuracy, f1, agreement, latencies, size)."""
    from distilkit.export import REPORT_FILE, export_onnx
    from distilkit.export.measure import (PYTORCH, RUNTIME_TITLES, evaluate_export,
                                          evaluate_seq2seq_export)
    from distilkit.files import atomic_write_json

    spec = recipe.data
    onnx_dir = os.path.join(tmp, EXPORT_DIR)
    # Real inputs of the evaluation split (pairs for sentence-pair data) to check the export on.
    cols = [raw[split][c][:CHECK_ROWS] for c in (spec.text_column, spec.text_pair_column) if c]
    texts = [t if len(t) > 1 else t[0] for t in zip(*cols)
             if all(isinstance(x, str) and x.strip() for x in t)]
    made = export_onnx(tmp, onnx_dir, int8=settings.int8, four_bit=settings.four_bit,
                       check_data=texts or None)
    if settings.serve and settings.serve in made["files"]:
        # The recipe names the file (a budget search in an ONNX runtime names that runtime's:
        # the student meets its budget there), whatever the export's own rule would pick.
        f = made["files"][settings.serve]
        made["serve"] = f["file"]
        made["serve_rule"] = (f"export.serve: {settings.serve} in the recipe (its argmax "
                              f"agreed with PyTorch on {f['argmax_agreement']:.1%} of the "
                              "check rows)")
    info: dict = {"dir": f"{STUDENT_DIR}/{EXPORT_DIR}", "format": settings.format,
                  "serve": f"{EXPORT_DIR}/{made['serve']}", "serve_rule": made.get("serve_rule"),
                  "files": {k: f"{EXPORT_DIR}/{f['file']}" for k, f in made["files"].items()}}
    out: dict = {"export": info}
    if made.get("serve_variant"):  # seq2seq: the variant to give OnnxSeq2SeqGenerator
        info["serve_variant"] = made["serve_variant"]
    if made.get("disabled_optimizers"):  # the session options to serve the file with
        info["disabled_optimizers"] = made["disabled_optimizers"]
    if settings.evaluate:
        size = teacher.get("size_on_disk_bytes")
        t_fig = {"runtime_title": RUNTIME_TITLES[PYTORCH],
                 "size_mb": round(size / 1e6, 3) if size else None, "size_bytes": size}
        if recipe.keys.task == "seq2seq":
            m = evaluate_seq2seq_export(onnx_dir, raw[split], source_column=spec.text_column,
                                        target_column=spec.label_column,
                                        generation=recipe.keys.generation, progress=progress)
            # The teacher was timed generating one sentence at a time (batch 1 only).
            t_fig.update({k: teacher.get(k) for k in ("bleu", "chrf", "exact_match")},
                         latency_b1_ms=teacher.get("latency_ms"), latency_b32_ms=None)
            info["generation"] = m["generation"]
        else:
            m = evaluate_export(onnx_dir, raw[split], text_column=spec.text_column,
                                text_pair_column=spec.text_pair_column,
                                label_column=spec.label_column,
                                max_length=recipe.keys.max_length, progress=progress)
            t_fig.update(accuracy=teacher.get("accuracy"), f1=teacher.get("macro_f1"),
                         latency_b1_ms=teacher.get("latency_ms_batch1"),
                         latency_b32_ms=teacher.get("latency_ms_batch32"),
                         threads=teacher.get("threads"))
            info["max_length"] = m["max_length"]
        for name, r in m["runtimes"].items():
            if name != PYTORCH:
                r["file"] = f"{EXPORT_DIR}/{r['file']}"
        info.update(split=split, examples=m["examples"], threads=m["threads"],
                    latency_protocol=m["latency_protocol"], teacher=t_fig)
        out["runtimes"] = m["runtimes"]
    # export.json names the directories it was made in and from; those are temporary here.
    made.update(model_dir=os.path.abspath(out_dir),
                out_dir=os.path.abspath(os.path.join(out_dir, EXPORT_DIR)))
    atomic_write_json(os.path.join(onnx_dir, REPORT_FILE), made)
    return out


def plan(recipe: Recipe) -> dict:
    """``distilkit distill --dry-run``: every check a run makes before training, then what the
    run would do (teacher and student with their sizes, data sizes per split, label map,
    steps, compression steps, the resolved recipe), without training or writing anything.
    The teacher's weights are not loaded where the run itself would not need them."""
    import math

    from distilkit.budget import split_auto
    from distilkit.compress.base import config_from_dict, config_to_dict
    from distilkit.evaluate import count_parameters, saved_parameters

    task = get_task(recipe.keys.task)
    args = recipe.distil_config(disable_tqdm=True)
    budget, rest = split_auto(recipe.keys.compression, recipe.keys.max_length, recipe.keys.task,
                              recipe.keys.student, recipe.data.streaming)
    comp = ([budget.to_entry()] if budget else []) + \
        [config_to_dict(config_from_dict(e)) for e in rest]
    task.validate(recipe)
    _preflight(recipe, args, create=False)
    raw = task.load_data(recipe)
    spec = recipe.data
    finetune = _finetune_plan(recipe, raw, task.name)
    teacher = {"spec": recipe.keys.teacher, "finetune": finetune}
    student_plan = {"spec": recipe.keys.student}
    if finetune is None or finetune["cached"]:
        teachers = task.load_teachers(recipe, raw, progress=True)
        student, _ = task.build_student(recipe, raw, teachers)
        teacher.update(resolved=teachers.specs, architecture=type(teachers.config).__name__,
                       parameters=(saved_parameters(teachers.first_dir)
                                   if teachers.first_dir and not teachers.loaded
                                   else count_parameters(teachers.models()[0])[0]))
        student_plan.update({"class": type(student).__name__,
                             "parameters": count_parameters(student)[0]})
    n_train = len(raw[spec.train_split])
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    steps = args.max_steps if args.max_steps > 0 else \
        math.ceil(args.num_train_epochs * math.ceil(n_train / per_step))
    label = spec.label_column
    feat = raw[spec.train_split].features.get(label) if label else None
    return {
        "name": recipe.keys.name, "task": task.name, "teacher": teacher, "student": student_plan,
        # A streamed training split is not counted: only its first rows were read.
        "data": {split: (f"streamed (first {len(d):,} rows read to check it)"
                         if spec.streaming and split == spec.train_split else len(d))
                 for split, d in raw.items()},
        "labels": list(getattr(feat, "names", None) or []) or None,
        "steps": steps, "examples_per_step": per_step,
        "compression": comp, "output_dir": args.output_dir,
        "search": budget.plan_line() if budget else None,
        "recipe": recipe.to_dict(),
    }


def _finetune_plan(recipe: Recipe, raw, task: str):
    """What fine-tuning the recipe's teacher would do (the built-in teacher, or ``{base,
    finetune}``), worked out without training; None for a teacher that needs none."""
    from distilkit import finetune as ft
    from distilkit.data import DataSpec, load_raw
    from distilkit.tasks.seq2seq import BUILTIN_S2S_TEACHER
    from distilkit.teachers import BUILTIN_TEACHER, minilm_path

    t = recipe.keys.teacher
    if t == BUILTIN_TEACHER:
        p = ft.plan_finetune(minilm_path(), load_raw(DataSpec()), DataSpec(), ft.BUILTIN_FINETUNE,
                             name="minilm-rt")
    elif ft.parse_teacher_spec(t):
        base, cfg = ft.parse_teacher_spec(t)
        p = ft.plan_finetune(base, raw, recipe.data, cfg, task=task)
    elif task == "seq2seq" and t == BUILTIN_S2S_TEACHER:
        from distilkit.seq2seq.teacher import builtin_truecase_settings, truecase_teacher_dir

        s = builtin_truecase_settings()
        out, cached = truecase_teacher_dir(s)
        return {"base": f"{t} (BART from a config)", "steps": s.max_steps, "labels": None,
                "out": out, "cached": cached}
    else:
        return None
    return {"base": p.base, "steps": p.steps, "labels": p.labels, "out": p.out,
            "cached": p.cached}


def format_plan(p: dict) -> str:
    """The plan as a few lines for the terminal, then the resolved recipe as YAML."""
    t, s, ft = p["teacher"], p["student"], p["teacher"].get("finetune")
    lines = [f"== distilkit dry run: {p['name']} ({p['task']}) =="]
    if ft:
        lines.append(f"finetune {ft['base']} -> {ft['out']}: "
                     + ("cached" if ft["cached"] else f"not trained yet ({ft['steps']:,} steps"
                        + (f", labels {ft['labels']})" if ft["labels"] else ")")))
    if "architecture" in t:
        lines += [f"teacher  {t['spec'] if not ft else 'fine-tuned'} -> "
                  f"{', '.join(map(str, t['resolved']))} ({t['architecture']}, "
                  f"{t['parameters']:,} parameters)",
                  f"student  {json.dumps(s['spec'], sort_keys=True)} -> {s['class']}, "
                  f"{s['parameters']:,} parameters"]
    else:
        lines.append(f"student  {json.dumps(s['spec'], sort_keys=True)}: built from the teacher "
                     "once it is fine-tuned")
    lines += ["data     " + ", ".join(f"{k}: {v:,}" if isinstance(v, int) else f"{k}: {v}"
                                      for k, v in p["data"].items()),
             f"labels   {p['labels'] if p['labels'] else '(as in the data)'}",
             f"training {p['steps']:,} steps of {p['examples_per_step']} examples",
             "compress " + (" -> ".join(c["method"] for c in p["compression"]) or "none"),
             *([f"search   {p['search']}"] if p.get("search") else []),
             "export   " + _export_line(p["recipe"].get("export")),
             f"output   {p['output_dir']} (nothing written: dry run)", "",
             "# resolved recipe",
             yaml.safe_dump(p["recipe"], sort_keys=False).rstrip()]
    return "\n".join(lines)


def _export_line(export: Optional[dict]) -> str:
    """What the recipe's export step will write, for the dry run."""
    if not export:
        return "none"
    files = ["model.onnx"] + (["int8"] if export["int8"] else []) + \
        (["4-bit"] if export["four_bit"] else [])
    return (f"{export['format']} into {STUDENT_DIR}/{EXPORT_DIR} ({' + '.join(files)})"
            + ("; every runtime measured on the test split" if export["evaluate"] else ""))


def _zero_stage(trainer) -> int:
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    return plugin.zero_stage if plugin is not None else 0


def save_student(model, tokenizer, run_dir: str, merge_adapter: bool = True,
                 then: Optional[Callable[[str], None]] = None, state_dict=None) -> str:
    """Finalize every applied compression method (e.g. convert to packed low-bit weights),
    merge a LoRA adapter when asked, and write the student with its tokenizer to
    ``run_dir/student`` atomically; ``then(tmp)`` runs on the complete temporary directory
    before it is put in place (a failure there leaves no student). Returns the directory.
    ``state_dict``: the whole weights of a sharded student, gathered by every process."""
    from distilkit.compress.base import compression_records, finalize_, save_compressed
    from distilkit.files import atomic_dir

    if hasattr(model, "merge_and_unload") and merge_adapter:
        model = model.merge_and_unload()
    if compression_records(model):
        # With the tokenizer: a method that changes the ids the model reads (prune_vocab)
        # returns the tokenizer that matches them.
        tokenizer = finalize_(model, tokenizer)
    out_dir = os.path.join(run_dir, STUDENT_DIR)

    def save(tmp):
        save_compressed(model, tmp, **({} if state_dict is None else {"state_dict": state_dict}))
        tokenizer.save_pretrained(tmp)
        if then is not None:
            then(tmp)
    atomic_dir(out_dir, save)
    return out_dir


def _loader(ds, collator, batch_size):
    import torch
    return torch.utils.data.DataLoader(ds.with_format(None), batch_size=batch_size, shuffle=False,
                                       collate_fn=collator)


def write_run_outputs(recipe: Recipe, results: dict, run_dir: str, model_dir: str) -> None:
    """What every finished run leaves beside its student (whose model card is written with
    it), each file atomically: ``results.json`` and the resolved ``recipe.yaml``; then the
    push to the Hub when the recipe asks for it."""
    from distilkit.files import atomic_write_text

    atomic_write_text(os.path.join(run_dir, RESULTS_FILE), json.dumps(results, indent=2, default=str))
    atomic_write_text(os.path.join(run_dir, "recipe.yaml"),
                      yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    if recipe.keys.push_to_hub:
        from distilkit.hub import push_to_hub
        push_to_hub(model_dir, recipe.keys.hub_repo_id)
