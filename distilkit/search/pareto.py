"""``distilkit search RECIPE [--target speedup=2 --target speedup=4 ...] [--compare RUN_DIR ...]``:
one budget search plus distillation per target, then a Pareto report.

Each target runs :func:`distilkit.search.run.search_and_run` on the recipe with its ``auto``
entry's target replaced, into ``output_dir/<target>/`` (e.g. ``runs/search/speedup_4``). Then
every student (each searched one, and the student of each ``--compare`` run directory, e.g. a
hand-designed 3-layer student) and the teacher are measured side by side in the recipe's
runtime spec (runtime, batch, length, threads), and

* ``output_dir/pareto.md``: one row per model: accuracy on its run's test split, measured
  latency, speed-up over the teacher, size on disk, parameters, the target and whether it was
  met and within its tolerance (a latency or speed-up target by this measurement: each student
  timed in turns with the teacher, the median of the runs' verdict pairings; each run's own
  verdict is listed under the table, and kept as ``met_in_run``, ``within_in_run`` and
  ``speedup_in_run`` in pareto.json), and whether the model is on the accuracy/latency
  Pareto front (no other model is at least as accurate and at least as fast, one of them
  strictly);
* ``output_dir/pareto.png``: accuracy against measured latency and against size, searched
  students, compared students and the teacher marked apart;
* ``output_dir/pareto.json``, and one JSON line of the figures printed last.

A seq2seq recipe's report scores BLEU where an encoder's scores accuracy, and times
generation of the search's ``new_tokens`` tokens (32 after a size search, which timed none).
"""
from __future__ import annotations

import json
import os
import statistics
import sys
from typing import Sequence

PARETO = "pareto"


def parse_target(text: str) -> dict:
    """``speedup=4`` -> ``{"speedup": 4.0}`` (checked later with the recipe's entry)."""
    from distilkit.budget import TARGETS
    from distilkit.recipe import parse_value

    kind, sep, value = str(text).partition("=")
    if not sep or kind not in TARGETS:
        raise ValueError(f"--target {text!r}: give KIND=VALUE with KIND one of "
                         f"{', '.join(TARGETS)}, e.g. --target speedup=4")
    return {kind: parse_value(value)}


def _with_target(raw: dict, target: dict, out_dir: str) -> dict:
    entry = dict(raw["compression"][0], target=target)
    return {**raw, "compression": [entry, *raw["compression"][1:]], "output_dir": out_dir}


def on_front(rows: Sequence[dict], x: str = "latency_ms", y: str = "accuracy") -> list[bool]:
    """Per row: no other row has ``y`` at least as high and ``x`` at least as low, one of the
    two strictly (rows without both figures are never on it)."""
    def has(r):
        return r.get(x) is not None and r.get(y) is not None

    out = []
    for r in rows:
        out.append(has(r) and not any(
            has(o) and o is not r and o[y] >= r[y] and o[x] <= r[x]
            and (o[y] > r[y] or o[x] < r[x]) for o in rows))
    return out


def write_pareto(rows: list[dict], out_dir: str, spec_line: str,
                 metric: str = "accuracy") -> dict:
    """``pareto.md``, ``pareto.png`` and ``pareto.json`` of measured ``rows`` (each with
    ``name``, ``kind`` (searched / compared / teacher), ``metric`` (``accuracy``, or ``bleu``
    for seq2seq students), ``latency_ms``, ``size_mb``, ``parameters``, and for searched rows
    ``target`` and ``met``)."""
    from distilkit.files import atomic_write_json, atomic_write_text

    teacher = next((r for r in rows if r["kind"] == "teacher"), None)
    for r, front in zip(rows, on_front(rows, y=metric)):
        r["pareto"] = front
        if teacher and teacher.get("latency_ms") and r.get("latency_ms"):
            r["speedup"] = round(teacher["latency_ms"] / r["latency_ms"], 3)
    os.makedirs(out_dir, exist_ok=True)
    png = plot_pareto(rows, os.path.join(out_dir, f"{PARETO}.png"), spec_line, metric)

    def f(v, spec):
        return "-" if v is None else format(v, spec)

    name = {"accuracy": "Accuracy", "bleu": "BLEU"}.get(metric, metric)
    lines = [f"# Compression to a budget: {metric} against measured latency and size", "",
             f"Latency measured side by side in one process: {spec_line}. {name} on each "
             "run's test split. Size = the saved model files. Pareto = no other model scores "
             "at least as high and is at least as fast (one strictly).", "",
             f"| model | kind | target | met | within tolerance | {metric} | latency ms | "
             "speed-up | size MB | parameters | Pareto |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def yes(v):
        return "-" if v is None else ("yes" if v else "no")

    for r in rows:
        lines.append(f"| {r['name']} | {r['kind']} | {r.get('target') or '-'} | "
                     f"{yes(r.get('met'))} | {yes(r.get('within'))} | "
                     f"{f(r.get(metric), '.4f' if metric == 'accuracy' else '.2f')} | "
                     f"{f(r.get('latency_ms'), '.2f')} | "
                     f"{f(r.get('speedup'), '.2f')}x | {f(r.get('size_mb'), '.2f')} | "
                     f"{f(r.get('parameters'), ',')} | {'yes' if r['pareto'] else ''} |")
    runs = [r for r in rows if r.get("speedup_in_run") is not None]
    if runs:
        lines += ["", "Each searched run's own verdict, measured the same way at its end: " +
                  "; ".join(f"{r['name']} {r['speedup_in_run']:.2f}x (met: "
                            f"{yes(r.get('met_in_run'))}, within tolerance: "
                            f"{yes(r.get('within_in_run'))})" for r in runs) + "."]
    lines += ["", f"![{metric} against latency and size]({os.path.basename(png)})", ""]
    md = os.path.join(out_dir, f"{PARETO}.md")
    atomic_write_text(md, "\n".join(lines))
    js = os.path.join(out_dir, f"{PARETO}.json")
    clean = [{k: v for k, v in r.items() if k != "model_dir"} for r in rows]
    atomic_write_json(js, {"spec": spec_line, "metric": metric, "rows": clean})
    return {"markdown": md, "plot": png, "json": js, "rows": clean, "metric": metric}


def plot_pareto(rows: Sequence[dict], path: str, spec_line: str, metric: str = "accuracy") -> str:
    """``metric`` (accuracy, or BLEU) against measured latency (left) and size on disk
    (right)."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    from distilkit.report import _save_png

    style = {"searched": dict(marker="o", color="tab:blue", s=60),
             "compared": dict(marker="s", color="tab:orange", s=60),
             "teacher": dict(marker="*", color="tab:red", s=240)}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (key, label) in zip(axes, (("latency_ms", f"measured latency (ms), {spec_line}"),
                                       ("size_mb", "size on disk (MB)"))):
        seen = set()
        for r in rows:
            if r.get(key) is None or r.get(metric) is None:
                continue
            kind = r["kind"]
            ax.scatter(r[key], r[metric], zorder=3,
                       label=kind if kind not in seen else None, **style[kind])
            seen.add(kind)
            ax.annotate(r["name"], (r[key], r[metric]), textcoords="offset points",
                        xytext=(6, 5), fontsize=8)
        front = sorted((r for r in rows if r.get("pareto") and key == "latency_ms"),
                       key=lambda r: r[key])
        if len(front) > 1:
            ax.plot([r[key] for r in front], [r[metric] for r in front], "--",
                    color="grey", alpha=0.6, zorder=1)
        ax.set_xlabel(label, fontsize=8)
        ax.set_ylabel(metric if metric == "accuracy" else metric.upper())
        ax.margins(x=0.2, y=0.12)
        ax.grid(True, alpha=0.3)
        if seen:
            ax.legend(loc="lower right", fontsize=8)
    fig.suptitle("budget search: searched students, compared students, teacher", fontsize=11)
    return _save_png(fig, path)


def search_targets(recipe_path: str, overrides: dict, targets: Sequence[str],
                   compare: Sequence[str], progress: bool = True) -> dict:
    """The whole ``distilkit search`` (module docstring); returns the Pareto report."""
    from distilkit.budget import is_auto
    from distilkit.evaluate import find_model_dir
    from distilkit.recipe import Recipe
    from distilkit.report import load_results
    from distilkit.search.latency import RuntimeSpec, measure_model_ms, verdict_pair_ms
    from distilkit.search.netadapt import judged
    from distilkit.search.run import SEARCH_FILE, search_and_run

    base = Recipe.load(recipe_path, overrides)
    comp = base.keys.compression
    if not comp or not is_auto(comp[0]):
        raise ValueError(f"{recipe_path}: distilkit search needs compression: [{{method: auto, "
                         "target: {speedup: 4}}, ...}] as the recipe's first entry (see "
                         "recipes/search_budget.yaml)")
    # the task's own score: accuracy, or for a seq2seq student BLEU (timed as generation)
    metric = "bleu" if base.keys.task == "seq2seq" else "accuracy"
    raw = base.to_dict()
    chosen = [parse_target(t) for t in targets] or [comp[0]["target"]]
    root = base.distil_config().output_dir
    for r in compare:  # checked before any search runs
        load_results(r)
        find_model_dir(r)
    # Every recipe checked (the targets with it) before the first search starts.
    recipes = []
    for t in chosen:
        from distilkit.budget import budget_from_entry

        label = budget_from_entry({**comp[0], "target": t}, base.keys.max_length).label()
        recipes.append((label, Recipe.from_dict(_with_target(raw, t, os.path.join(root, label)),
                                                source=recipe_path)))
    rows, spec, teacher_dir, teacher_res = [], None, None, None
    for label, recipe in recipes:
        res = search_and_run(recipe, progress)
        out = recipe.distil_config().output_dir
        with open(os.path.join(out, SEARCH_FILE)) as f:
            record = json.load(f)
        spec = spec or record["spec"]
        teacher_dir = teacher_dir or record.get("teacher_dir")
        teacher_res = teacher_res or res
        s = res.get("search") or {}
        budget_is_latency = bool({"speedup", "latency_ms"} & set(s.get("target") or {}))
        rows.append({"name": label, "kind": "searched", "target": label, "met": s.get("met"),
                     "within": s.get("within_tolerance"), "tolerance": s.get("tolerance"),
                     "met_in_run": s.get("met"), "within_in_run": s.get("within_tolerance"),
                     "speedup_in_run": s.get("speedup") if budget_is_latency else None,
                     "goal": recipe.keys.compression[0]["target"],
                     metric: res["student"].get(metric),
                     "size_mb": round(res["student"]["size_on_disk_bytes"] / 1e6, 4),
                     "parameters": res["student"]["parameters"],
                     "model_dir": os.path.join(out, "student"), "run_dir": out})
    for r in compare:
        res = load_results(r)
        rows.append({"name": os.path.basename(os.path.abspath(r)), "kind": "compared",
                     metric: res["student"].get(metric),
                     "size_mb": round(res["student"]["size_on_disk_bytes"] / 1e6, 4),
                     "parameters": res["student"]["parameters"],
                     "model_dir": find_model_dir(r), "run_dir": r})
    if metric == "bleu" and not spec.get("new_tokens"):
        # a size search timed nothing: the report times generation as a latency search would
        from distilkit.budget import DEFAULT_NEW_TOKENS

        spec = {**spec, "new_tokens": DEFAULT_NEW_TOKENS}
    rspec = RuntimeSpec(**spec)
    t = teacher_res["teacher"]
    teacher = {"name": "teacher", "kind": "teacher", metric: t.get(metric),
               "size_mb": round(t["size_on_disk_bytes"] / 1e6, 4), "parameters": t["parameters"],
               "model_dir": teacher_dir}
    rows.append(teacher)
    from distilkit.compress.base import load_compressed

    if teacher_dir is None:  # a hub teacher: its figure from the last search
        teacher["latency_ms"] = round(record["teacher_ms"], 3)
        for r in rows:
            if r.get("model_dir") and r is not teacher:
                r["latency_ms"] = round(measure_model_ms(load_compressed(r["model_dir"]),
                                                         rspec), 3)
    else:
        # Each student in turns with the teacher (its ratio to the teacher is what a busy
        # moment of the machine leaves alone), the median of the verdict's pairings as in
        # the runs, in the teacher's median milliseconds.
        ref = load_compressed(teacher_dir)
        pairs = {id(r): verdict_pair_ms(load_compressed(r["model_dir"]), ref, rspec)
                 for r in rows if r.get("model_dir") and r is not teacher}
        t_ms = statistics.median(t for _, t in pairs.values()) if pairs else \
            measure_model_ms(ref, rspec)
        teacher["latency_ms"] = round(t_ms, 3)
        for r in rows:
            if id(r) in pairs:
                ms, t = pairs[id(r)]
                r["latency_ms"] = round(ms * t_ms / t, 3)
                # A latency target is judged by this measurement, the one the table shows
                # (the run's own, minutes to an hour apart, is kept as met_in_run).
                goal = r.get("goal") or {}
                if "speedup" in goal:
                    r["met"], r["within"] = judged(ms / t, 1.0 / float(goal["speedup"]),
                                                    r["tolerance"])
                elif "latency_ms" in goal:
                    r["met"], r["within"] = judged(r["latency_ms"],
                                                    float(goal["latency_ms"]), r["tolerance"])
    spec_line = (f"{spec['runtime']}, batch {spec['batch']}, length {spec['seq_len']}, "
                 + (f"{spec['new_tokens']} tokens generated, " if spec.get("new_tokens") else "")
                 + f"{spec['threads'] or 'default'} threads, {spec.get('clock', 'wall')} clock")
    report = write_pareto(rows, root, spec_line, metric)
    return report


def add_search_arguments(p) -> None:
    """Arguments of ``distilkit search`` (wired by :mod:`distilkit.cli`)."""
    p.add_argument("recipe", help="a recipe whose compression starts with {method: auto, ...}")
    p.add_argument("--target", action="append", default=[], metavar="KIND=VALUE",
                   help="a target to search for (repeatable), e.g. speedup=4, latency_ms=20, "
                        "size_mb=30, parameters=10000000; default: the recipe's")
    p.add_argument("--compare", action="append", default=[], metavar="RUN_DIR",
                   help="a run directory whose student joins the report, re-measured in the "
                        "same runtime spec (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run_search_command(args, overrides: dict) -> int:
    """``distilkit search``: the searches, the Pareto report, its table, one JSON line."""
    report = search_targets(args.recipe, overrides, args.target, args.compare,
                            progress=not args.no_progress)
    with open(report["markdown"]) as f:
        print(f.read())
    print(f"(written: {report['markdown']}, {report['plot']})", file=sys.stderr)
    keys = ("name", "kind", "target", "met", "within", "speedup_in_run", report["metric"],
            "latency_ms", "speedup", "size_mb", "parameters", "pareto")
    print(json.dumps({"pareto": [{k: r.get(k) for k in keys} for r in report["rows"]]}))
    return 0
