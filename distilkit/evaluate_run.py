"""``distilkit evaluate MODEL_OR_RUN_DIR``: evaluate a saved model with its own task.

The task is the model's (encoder-decoder configs are seq2seq, evaluated by generation; the
rest classification); the data is the one named by flags, else that of the recipe given, else
that of the ``recipe.yaml`` that ``distilkit distill`` wrote beside the model, else the
task's built-in data. The figures are printed and written as JSON.

``distilkit evaluate EXPORT_DIR`` (a directory ``distilkit export`` wrote, with
``export.json``), or ``distilkit evaluate MODEL_OR_RUN_DIR --runtimes`` (its export in
``MODEL_DIR/onnx``), measures the student in every runtime of the export instead, side by
side: PyTorch fp32 and each ONNX file (:mod:`distilkit.export.measure`), on the same data,
written to ``EXPORT_DIR/evaluation.json``.
"""
from __future__ import annotations

import os
from typing import Optional

from distilkit.evaluate import find_model_dir


def _recipe_near(model_dir: str) -> Optional[str]:
    for d in (model_dir, os.path.dirname(os.path.abspath(model_dir))):
        f = os.path.join(d, "recipe.yaml")
        if os.path.isfile(f):
            return f
    return None


def _load_recipe(path: Optional[str]):
    if not path:
        return None
    from distilkit.recipe import Recipe

    return Recipe.load(path)


def _task_of(model_dir: str):
    from transformers import AutoConfig

    from distilkit.modeling import ensure_registered
    from distilkit.tasks import task_for_config

    ensure_registered()
    return task_for_config(AutoConfig.from_pretrained(model_dir))


def default_spec(model_dir: str, recipe=None):
    """The data to evaluate on when no flag names any: the recipe's, else the built-in task
    that matches the model (truecasing for seq2seq, sentiment otherwise)."""
    return recipe.data if recipe is not None else _task_of(model_dir).default_spec()


def evaluate_dir(model_dir: str, data=None, *, recipe: Optional[str] = None,
                 split: Optional[str] = None, max_length: Optional[int] = None,
                 out_file: Optional[str] = None, latency: bool = True) -> dict:
    """Load the model saved in ``model_dir`` (any distilkit output, compressed or not, or a
    plain ``save_pretrained`` directory) with its tokenizer and evaluate it.

    The data is ``data`` (a :class:`~distilkit.data.DataSpec`), else that of ``recipe``, else
    that of the ``recipe.yaml`` beside the model, else the task's built-in data; ``max_length``
    likewise comes from the argument, else the recipe, else 128. The split defaults to the
    spec's test split (else its eval split). The figures are written to ``out_file`` (default
    ``MODEL_DIR/evaluation.json``) and returned.
    """
    from distilkit.files import atomic_write_json

    model_dir = find_model_dir(model_dir)
    r = _load_recipe(recipe or _recipe_near(model_dir))
    spec = data or default_spec(model_dir, r)
    res = _task_of(model_dir).evaluate_dir(model_dir, r, spec, split, max_length, latency)
    atomic_write_json(out_file or os.path.join(model_dir, "evaluation.json"), res)
    return res


def export_dir_of(path: str) -> str:
    """``path`` itself when it is an export directory, else the export of the model it holds
    (``MODEL_DIR/onnx``, the default of ``distilkit export``); FileNotFoundError with the
    command that makes one when there is none."""
    from distilkit.export.measure import is_export_dir

    if is_export_dir(path):
        return path
    out = os.path.join(find_model_dir(path), "onnx")
    if not is_export_dir(out):
        raise FileNotFoundError(f"--runtimes: {path!r} holds no ONNX export ({out} has no "
                                f"export.json); run `distilkit export {path} --format onnx "
                                "--int8` first, or give the export directory")
    return out


def evaluate_runtimes(export_dir: str, data=None, *, recipe: Optional[str] = None,
                      split: Optional[str] = None, max_length: Optional[int] = None,
                      out_file: Optional[str] = None, latency: bool = True,
                      progress: bool = True) -> dict:
    """Every runtime of the export in ``export_dir``, on the data chosen as for
    :func:`evaluate_dir` (flags, else the recipe, else the ``recipe.yaml`` beside the exported
    model, else the built-in data). The figures
    (:func:`~distilkit.export.measure.evaluate_export`, plus ``split``) are written to
    ``out_file`` (default ``EXPORT_DIR/evaluation.json``) and returned."""
    from distilkit.data import label_names, load_raw
    from distilkit.export.measure import (evaluate_export, evaluate_seq2seq_export,
                                          export_model_dir, is_seq2seq, read_export)
    from distilkit.files import atomic_write_json

    export = read_export(export_dir)
    model_dir = export_model_dir(export_dir, export)
    r = _load_recipe(recipe or _recipe_near(model_dir))
    spec = data or default_spec(model_dir, r)
    split = split or spec.test_split or spec.eval_split
    if is_seq2seq(export):
        from distilkit.seq2seq.data import load_seq2seq_data
        from distilkit.tasks.seq2seq import _builtin_settings

        b = _builtin_settings(r)  # the built-in task's sentence-length limit, as evaluate_dir
        raw = load_seq2seq_data(spec, b.max_words if b else None)
    else:
        raw = load_raw(spec, classes=True)
    if split not in raw:
        raise ValueError(f"split {split!r} is not in the dataset; it has {sorted(raw)}")
    if is_seq2seq(export):
        res = evaluate_seq2seq_export(export_dir, raw[split], source_column=spec.text_column,
                                      target_column=spec.label_column,
                                      generation=r.keys.generation if r else None,
                                      latency=latency, progress=progress)
    else:
        res = evaluate_export(export_dir, raw[split], text_column=spec.text_column,
                              text_pair_column=spec.text_pair_column,
                              label_column=spec.label_column, label_names=label_names(raw, spec),
                              max_length=max_length or (r.keys.max_length if r else None) or 128,
                              latency=latency, progress=progress)
    res["split"] = split
    atomic_write_json(out_file or os.path.join(export_dir, "evaluation.json"), res)
    return res


def format_metrics(res: dict) -> str:
    """The figures as aligned ``name: value`` lines, for the terminal."""
    keys = ["accuracy", "macro_f1", "examples", "bleu", "chrf", "exact_match", "n",
            "parameters", "nonzero_parameters", "sparsity", "size_on_disk_bytes", "bits_per_weight",
            "latency_ms", "gen_ms_per_sentence", "latency_ms_batch1", "latency_ms_batch32",
            "peak_memory_mb", "model_memory_mb", "activation_peak_mb", "threads", "max_length"]
    width = max(len(k) for k in keys)
    return "\n".join(f"{k:<{width}}  {res[k]:.4f}" if isinstance(res.get(k), float)
                     else f"{k:<{width}}  {res.get(k)}" for k in keys if k in res)


def add_evaluate_arguments(p) -> None:
    """Arguments of ``distilkit evaluate`` (wired by :mod:`distilkit.cli`)."""
    p.add_argument("model_dir", help="a saved model directory, a run directory with student/, "
                                      "or an export directory (with export.json: every runtime "
                                      "of the export is measured, as with --runtimes)")
    p.add_argument("--runtimes", action="store_true",
                   help="measure the model in every runtime of its ONNX export (MODEL_DIR/onnx, "
                        "from `distilkit export`): PyTorch fp32 and each ONNX file side by side "
                        "(accuracy, macro-F1, agreement with PyTorch, latency at batch 1 and 32, "
                        "size); written to EXPORT_DIR/evaluation.json")
    p.add_argument("--recipe", help="take the dataset and max_length from this recipe")
    p.add_argument("--dataset", help="hub dataset name or builtin:rotten_tomatoes")
    p.add_argument("--dataset-config", help="hub dataset configuration name")
    p.add_argument("--data-files", nargs="+", metavar="SPLIT=FILE",
                   help="local csv/json/jsonl/parquet/tsv files, e.g. test=test.csv")
    p.add_argument("--split", help="split to evaluate (default: test, else validation)")
    p.add_argument("--text-column", default=None)
    p.add_argument("--text-pair-column", default=None)
    p.add_argument("--label-column", default=None)
    p.add_argument("--max-length", type=int, default=None,
                   help="truncation and latency sequence length (default: recipe's, else 128)")
    p.add_argument("--max-samples", type=int, default=None, help="evaluate the first N examples")
    p.add_argument("--output", help="where to write the JSON (default MODEL_DIR/evaluation.json, "
                                    "or EXPORT_DIR/evaluation.json for runtimes)")
    p.add_argument("--no-latency", action="store_true", help="skip latency and memory")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _spec_from_args(args, base):
    """``base`` (a DataSpec) with the data flags applied."""
    spec = base
    if args.data_files:
        files = {}
        for item in args.data_files:
            if "=" not in item:
                raise ValueError(f"--data-files: {item!r} must be SPLIT=FILE, e.g. test=test.csv")
            split, f = item.split("=", 1)
            files[split] = f
        # New data: the recipe's carving of its own training file does not apply to it.
        spec.validation_fraction = spec.test_fraction = None
        spec.dataset, spec.data_files = None, files
        spec.train_split = spec.train_split if spec.train_split in files else next(iter(files))
        spec.eval_split = spec.eval_split if spec.eval_split in files else args.split or next(iter(files))
        spec.test_split = spec.test_split if spec.test_split in files else None
    elif args.dataset:
        spec.validation_fraction = spec.test_fraction = None
        spec.dataset, spec.dataset_config, spec.data_files = args.dataset, args.dataset_config, None
    for name in ("text_column", "text_pair_column", "label_column"):
        if getattr(args, name):
            setattr(spec, name, getattr(args, name))
    if args.max_samples:
        spec.max_eval_samples = args.max_samples
    return spec


def run_evaluate(args, rest=None) -> int:
    """``distilkit evaluate``: evaluate, print the figures, write them as JSON."""
    from distilkit.export.measure import export_model_dir, is_export_dir, read_export

    if args.runtimes or is_export_dir(args.model_dir):
        from distilkit.export.measure import format_runtimes

        export_dir = export_dir_of(args.model_dir)
        model_dir = export_model_dir(export_dir, read_export(export_dir))
        recipe = args.recipe or _recipe_near(model_dir)
        spec = _spec_from_args(args, default_spec(model_dir, _load_recipe(recipe)))
        res = evaluate_runtimes(export_dir, spec, recipe=recipe, split=args.split,
                                max_length=args.max_length, out_file=args.output,
                                latency=not args.no_latency, progress=not args.no_progress)
        print(format_runtimes(res))
        print(f"(written to {args.output or os.path.join(export_dir, 'evaluation.json')})")
        return 0
    model_dir = find_model_dir(args.model_dir)
    recipe = args.recipe or _recipe_near(model_dir)
    spec = _spec_from_args(args, default_spec(model_dir, _load_recipe(recipe)))
    res = evaluate_dir(args.model_dir, spec, recipe=recipe, split=args.split,
                       max_length=args.max_length, out_file=args.output,
                       latency=not args.no_latency)
    print(format_metrics(res))
    print(f"(written to {args.output or os.path.join(model_dir, 'evaluation.json')})")
    return 0
