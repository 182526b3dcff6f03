"""The ``distilkit`` command line: ``distilkit distill RECIPE.yaml [--field value ...]``.

Subcommands are entries of :data:`COMMANDS`: a name mapped to ``(add_arguments, run)``, so
each command's logic lives in its own module and the CLI only wires it. Works the same under
``accelerate launch -m distilkit distill ...``.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# peft imports bitsandbytes whenever it is installed (the [gpu] extra), and on AVX512 CPUs
# bitsandbytes then warns that an optional hub-downloaded kernel is missing. distilkit's CPU
# path never uses it, so the warning would only mislead.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def _parse_overrides(rest: list[str]) -> dict:
    """``--field value`` / ``--field=value`` pairs after the recipe, values read as YAML."""
    from distilkit.recipe import parse_value

    out, i = {}, 0
    while i < len(rest):
        tok = rest[i]
        if not tok.startswith("--") or len(tok) < 3:
            raise SystemExit(f"distilkit distill: expected --field value, got {tok!r}")
        if "=" in tok:
            key, val = tok[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(rest):
                raise SystemExit(f"distilkit distill: {tok} needs a value")
            key, val = tok[2:], rest[i + 1]
            i += 2
        out[key.replace("-", "_") if "." not in key else key] = parse_value(val)
    return out


def _distill_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="a YAML recipe (see recipes/)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--dry-run", action="store_true",
                   help="run every check and print the plan (teacher, student, data, labels, "
                        "steps, compression, resolved recipe) without training")


def _distill_run(args, rest) -> int:
    from distilkit.pipeline import format_plan, plan, run_recipe
    from distilkit.recipe import Recipe

    recipe = Recipe.load(args.recipe, _parse_overrides(rest))
    if args.dry_run:
        print(format_plan(plan(recipe)))
        return 0
    if args.no_progress:
        _hide_library_progress()
    run_recipe(recipe, progress=not args.no_progress)
    return 0


def _hide_library_progress() -> None:
    """``--no-progress`` hides the libraries' bars too (datasets' tokenizing, transformers'
    loading and saving), not only distilkit's own."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def _finetune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="a recipe whose teacher is {base: PATH_OR_HUB_ID, finetune: {...}}")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--force", action="store_true", help="fine-tune again even when cached")


def _finetune_run(args, rest) -> int:
    """``distilkit finetune RECIPE``: the teacher step alone (fine-tuned on the recipe's own
    training split, cached), with its validation figures."""
    import json

    from distilkit.finetune import finetune_teacher, parse_teacher_spec
    from distilkit.recipe import Recipe
    from distilkit.tasks import get_task
    from distilkit.teachers import read_teacher_info

    recipe = Recipe.load(args.recipe, _parse_overrides(rest))
    parsed = parse_teacher_spec(recipe.keys.teacher)
    if parsed is None:
        raise ValueError(f"teacher: {recipe.keys.teacher!r}; distilkit finetune needs "
                         "teacher: {base: PATH_OR_HUB_ID, finetune: {...}}")
    if args.no_progress:
        _hide_library_progress()
    task = get_task(recipe.keys.task)
    raw = task.load_data(recipe)
    path = finetune_teacher(parsed[0], raw, recipe.data, parsed[1], task=task.name,
                            progress=not args.no_progress, force=args.force)
    info = read_teacher_info(path) or {}
    print(f"teacher: {path}")
    print(json.dumps(info.get("validation"), indent=2))
    return 0


def _search_run(args, rest) -> int:
    """``distilkit search RECIPE [--target K=V ...] [--compare RUN_DIR ...] [--field value]``."""
    from distilkit.search.pareto import run_search_command

    if args.no_progress:
        _hide_library_progress()
    return run_search_command(args, _parse_overrides(rest))


def _lazy(module: str, name: str) -> Callable:
    """``module.name``, imported when called (each command's own module stays unloaded)."""
    def call(*args, **kwargs):
        import importlib
        return getattr(importlib.import_module(module), name)(*args, **kwargs)
    return call


COMMANDS: dict[str, tuple[Callable, Callable]] = {
    "distill": (_distill_args, _distill_run),
    "finetune": (_finetune_args, _finetune_run),
    "evaluate": (_lazy("distilkit.evaluate_run", "add_evaluate_arguments"),
                 _lazy("distilkit.evaluate_run", "run_evaluate")),
    "report": (_lazy("distilkit.report", "add_report_arguments"),
               _lazy("distilkit.report", "run_report")),
    "push": (_lazy("distilkit.hub", "add_push_arguments"), _lazy("distilkit.hub", "run_push")),
    "export": (_lazy("distilkit.export", "add_export_arguments"),
               _lazy("distilkit.export", "run_export")),
    "cache": (_lazy("distilkit.cache_admin", "add_cache_arguments"),
              _lazy("distilkit.cache_admin", "run_cache")),
    "search": (_lazy("distilkit.search.pareto", "add_search_arguments"), _search_run),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="distilkit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_args, _) in COMMANDS.items():
        add_args(sub.add_parser(name))
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in ("distill", "finetune", "search"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return COMMANDS[args.command][1](args, rest) or 0
    except _expected_errors() as e:
        # Bad input or a fault of the environment (a missing file, a full disk, a damaged
        # model file, a failed download): one clear line, no traceback (DISTILKIT_DEBUG=1
        # shows it).
        if os.environ.get("DISTILKIT_DEBUG"):
            raise
        print(f"distilkit {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    finally:
        from distilkit.device import end_process_group

        end_process_group()   # a launch's processes end their group before they exit


def _expected_errors() -> tuple:
    errors = [ValueError, OSError, ImportError, RuntimeError]
    try:  # a truncated or damaged .safetensors file
        from safetensors import SafetensorError
        errors.append(SafetensorError)
    except ImportError:
        pass
    import pickle
    errors.append(pickle.UnpicklingError)  # a pickle where safetensors belong (weights_only)
    return tuple(errors)


def one_line(e: BaseException, limit: int = 600) -> str:
    """The error's message on one line (white space folded); the error's type is named, except
    for distilkit's own bad-input errors, whose message already says what and how to fix."""
    text = " ".join(str(e).split()) or type(e).__name__
    if type(e) not in (ValueError, FileNotFoundError, PermissionError):
        text = f"{type(e).__name__}: {text}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


if __name__ == "__main__":
    sys.exit(main())
