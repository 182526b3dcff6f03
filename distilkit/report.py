"""Reports over several distillation runs: a markdown table and a trade-off plot.

Each run directory (written by ``distilkit distill``) holds ``results.json``::

    {"name": str, "teacher": {...}, "student": {...}, "recipe": {...}}

where ``teacher`` and ``student`` are :func:`distilkit.evaluate.evaluate_model` figures.
:func:`write_report` turns a list of runs into

* ``report.md``: one row for the teacher and one per student, with the task metric, its
  retention (student / teacher, %), parameters, size on disk, bits per weight, size ratio
  (teacher bytes on disk / student bytes on disk), latency and speed-up (teacher latency /
  student latency, at batch 1 and 32), peak memory; then how each student was made;
* ``report.png``: accuracy against size on disk and against batch-32 latency, one point per
  run, the teacher marked with a star (log-scale x axes: the runs span orders of magnitude);
* ``report.json``: the rows as data.

Runs whose recipe had an ``export:`` step also carry ``runtimes`` (the student in PyTorch fp32
and in onnxruntime on each exported file, :mod:`distilkit.export.measure`): the report then
adds a "Runtimes" table (:func:`runtime_rows`) with every run's every runtime side by side and
the teacher in PyTorch fp32 as 1.00x, and ``report_runtimes.png``, the speed-ups as bars.

Retention, compression and speed-up are relative to each run's own teacher; when the runs do
not share one teacher the report says so.
"""
from __future__ import annotations

import io
import json
import os
from typing import Optional, Sequence

from distilkit.files import atomic_write_bytes, atomic_write_json, atomic_write_text

RESULTS_FILE = "results.json"
MB = 1e6


def load_results(run_dir: str) -> dict:
    """The ``results.json`` of a run directory (or the file itself), checked for the keys a
    report needs. A directory without one is an error naming what is missing."""
    path = run_dir
    if os.path.isdir(run_dir):
        path = os.path.join(run_dir, RESULTS_FILE)
        if not os.path.isfile(path):
            parent = os.path.join(os.path.dirname(os.path.abspath(run_dir)), RESULTS_FILE)
            if os.path.isfile(parent):
                path = parent  # a run's student/ directory
            else:
                files = sorted(os.listdir(run_dir))
                what = ("it holds a saved model but no results: run `distilkit evaluate` on it, "
                        "or give the run directory that `distilkit distill` wrote"
                        if "config.json" in files else
                        "it holds neither a run's results nor a model")
                raise FileNotFoundError(f"{run_dir!r}: missing {RESULTS_FILE}; {what} "
                                        f"(files there: {files or 'none'})")
    elif not os.path.isfile(run_dir):
        raise FileNotFoundError(f"{run_dir!r} does not exist; give a run directory written by "
                                "`distilkit distill` (it holds results.json)")
    with open(path) as f:
        try:
            res = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
    for part in ("teacher", "student"):
        if not isinstance(res.get(part), dict):
            raise ValueError(f"{path}: no {part!r} figures; expected the results.json schema "
                             "{name, teacher, student, recipe}")
        for k in ("parameters", "size_on_disk_bytes"):
            if k not in res[part]:
                raise ValueError(f"{path}: {part} figures lack {k!r}")
    res.setdefault("name", os.path.basename(os.path.dirname(os.path.abspath(path))))
    res["_path"] = path
    return res


def default_metric(results: Sequence[dict]) -> str:
    """BLEU when every run is a seq2seq run (scored by generation), accuracy otherwise."""
    return "bleu" if results and all(r.get("task") == "seq2seq" for r in results) else "accuracy"


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def build_rows(results: Sequence[dict], metric: str = "accuracy") -> list[dict]:
    """Teacher row first, then one row per student, with derived ratios."""
    if not results:
        raise ValueError("no runs to report on")
    t = results[0]["teacher"]
    spec = (results[0].get("recipe") or {}).get("teacher")
    name = os.path.basename(str(spec).rstrip("/")) if isinstance(spec, str) and spec else "teacher"
    rows = [_row(name, t, t, metric, is_teacher=True)]
    rows += [_row(r["name"], r["student"], r["teacher"], metric) for r in results]
    return rows


def _row(name: str, m: dict, t: dict, metric: str, is_teacher: bool = False) -> dict:
    # Seq2seq runs time one generated sentence (batch 1) as ``latency_ms``.
    m = {"latency_ms_batch1": m.get("latency_ms"), **m}
    t = {"latency_ms_batch1": t.get("latency_ms"), **t}
    if metric not in m:
        raise ValueError(f"metric: {metric!r} is not among the figures "
                         f"({', '.join(sorted(k for k, v in m.items() if isinstance(v, float)))})")
    return {
        "name": name, "is_teacher": is_teacher, metric: m[metric],
        "macro_f1": m.get("macro_f1"),
        "retention_pct": 100 * _ratio(m[metric], t[metric]) if t[metric] else None,
        "parameters": m["parameters"], "nonzero_parameters": m.get("nonzero_parameters"),
        "size_mb": m["size_on_disk_bytes"] / MB, "bits_per_weight": m.get("bits_per_weight"),
        "size_ratio": _ratio(t["size_on_disk_bytes"], m["size_on_disk_bytes"]),
        "latency_ms_batch1": m.get("latency_ms_batch1"),
        "latency_ms_batch32": m.get("latency_ms_batch32"),
        "speedup_batch1": _ratio(t.get("latency_ms_batch1"), m.get("latency_ms_batch1")),
        "speedup_batch32": _ratio(t.get("latency_ms_batch32"), m.get("latency_ms_batch32")),
        "peak_memory_mb": m.get("peak_memory_mb"),
    }


def _fmt(v, spec: str = ".2f", suffix: str = "") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, int) and spec == ",":
        return f"{v:,}"
    return f"{v:{spec}}{suffix}"


def markdown_table(rows: Sequence[dict], metric: str = "accuracy") -> str:
    """The figures table (GitHub markdown)."""
    head = ["Model", metric.replace("_", " ").capitalize(), "Macro-F1", "Retention",
            "Parameters", "Size (MB)", "Bits/weight", "Size ratio", "Latency b1 (ms)",
            "Latency b32 (ms)", "Speed-up b1", "Speed-up b32", "Peak mem (MB)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in rows:
        name = f"**{r['name']}** (teacher)" if r["is_teacher"] else r["name"]
        cells = [name, _fmt(r[metric], ".4f"), _fmt(r["macro_f1"], ".4f"),
                 _fmt(r["retention_pct"], ".1f", " %"), _fmt(r["parameters"], ","),
                 _fmt(r["size_mb"], ".2f"), _fmt(r["bits_per_weight"], ".2f"),
                 _fmt(r["size_ratio"], ".2f", "x"), _fmt(r["latency_ms_batch1"], ".2f"),
                 _fmt(r["latency_ms_batch32"], ".1f"), _fmt(r["speedup_batch1"], ".2f", "x"),
                 _fmt(r["speedup_batch32"], ".2f", "x"), _fmt(r["peak_memory_mb"], ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


PYTORCH = "pytorch-fp32"  # the runtime name distilkit.export.measure gives PyTorch


# The two scores the runtime table shows: classification, seq2seq (scored by generation).
RUNTIME_SCORES = {"accuracy": ("accuracy", "f1", "Macro-F1"), "bleu": ("bleu", "chrf", "chrF")}


def _teacher_runtime(res: dict) -> dict:
    """A run's teacher in PyTorch fp32, in the runtimes' keys: what the export step stored
    (``export.teacher``), else converted from the run's teacher figures (a seq2seq run's
    ``latency_ms`` is its batch-1 generation time)."""
    stored = (res.get("export") or {}).get("teacher")
    if stored:
        return stored
    t = res["teacher"]
    return {"runtime_title": "PyTorch fp32", "accuracy": t.get("accuracy"),
            "f1": t.get("macro_f1"), "bleu": t.get("bleu"), "chrf": t.get("chrf"),
            "latency_b1_ms": t.get("latency_ms_batch1", t.get("latency_ms")),
            "latency_b32_ms": t.get("latency_ms_batch32"),
            "size_mb": t["size_on_disk_bytes"] / MB}


def runtime_rows(results: Sequence[dict], metric: Optional[str] = None) -> list[dict]:
    """The teacher in PyTorch fp32 first (every ratio 1.00x), then each run's student in each
    runtime it was measured in (a run without an export: its PyTorch figures), with the
    ``metric``'s retention (default :func:`default_metric`: BLEU for seq2seq runs, else
    accuracy), size ratio and speed-ups against that run's own teacher; ``serve`` marks the
    file the run's export says to serve."""
    if not results:
        raise ValueError("no runs to report on")
    metric = metric or default_metric(results)
    if metric not in RUNTIME_SCORES:
        raise ValueError(f"metric: {metric!r}; the runtime table shows "
                         f"{' or '.join(RUNTIME_SCORES)}")
    spec = (results[0].get("recipe") or {}).get("teacher")
    teacher_name = os.path.basename(str(spec).rstrip("/")) if isinstance(spec, str) and spec \
        else "teacher"
    rows = [_runtime_row(teacher_name, PYTORCH, _teacher_runtime(results[0]),
                         _teacher_runtime(results[0]), metric, is_teacher=True)]
    for res in results:
        t = _teacher_runtime(res)
        runtimes = res.get("runtimes") or {PYTORCH: {**_teacher_runtime({"teacher": res["student"]}),
                                                     "agreement": 1.0}}
        serve = (res.get("export") or {}).get("serve")
        for name, m in runtimes.items():
            rows.append(_runtime_row(res["name"], name, m, t, metric,
                                     serve=bool(serve) and m.get("file") == serve))
    return rows


def _runtime_row(name: str, runtime: str, m: dict, t: dict, metric: str,
                 is_teacher: bool = False, serve: bool = False) -> dict:
    score, second, _ = RUNTIME_SCORES[metric]
    return {
        "name": name, "runtime": runtime, "runtime_title": m.get("runtime_title", runtime),
        "file": m.get("file"), "is_teacher": is_teacher, "serve": serve, "metric": score,
        score: m.get(score), second: m.get(second),
        "agreement": m.get("agreement"),
        "retention_pct": (100 * _ratio(m.get(score), t.get(score))
                          if m.get(score) is not None and t.get(score) else None),
        "size_mb": m.get("size_mb"), "size_ratio": _ratio(t.get("size_mb"), m.get("size_mb")),
        "latency_b1_ms": m.get("latency_b1_ms"), "latency_b32_ms": m.get("latency_b32_ms"),
        "speedup_b1": _ratio(t.get("latency_b1_ms"), m.get("latency_b1_ms")),
        "speedup_b32": _ratio(t.get("latency_b32_ms"), m.get("latency_b32_ms")),
    }


def runtimes_table(rows: Sequence[dict]) -> str:
    """The runtime rows as a GitHub markdown table; the file to serve is marked."""
    score, second, title = RUNTIME_SCORES[rows[0]["metric"] if rows else "accuracy"]
    fmt = ".2f" if score == "bleu" else ".4f"
    head = ["Model", "Runtime", "File", score.upper() if score == "bleu" else "Accuracy", title,
            "Agreement", "Retention",
            "Size (MB)", "Size ratio", "Latency b1 (ms)", "Latency b32 (ms)", "Speed-up b1",
            "Speed-up b32"]
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + "|"]
    for r in rows:
        name = f"**{r['name']}** (teacher)" if r["is_teacher"] else r["name"]
        file = f"`{r['file']}`" if r["file"] else "-"
        cells = [name, r["runtime_title"], file + (" (serve)" if r["serve"] else ""),
                 _fmt(r[score], fmt), _fmt(r[second], fmt), _fmt(r["agreement"], ".4f"),
                 _fmt(r["retention_pct"], ".1f", " %"), _fmt(r["size_mb"], ".2f"),
                 _fmt(r["size_ratio"], ".2f", "x"), _fmt(r["latency_b1_ms"], ".2f"),
                 _fmt(r["latency_b32_ms"], ".1f"), _fmt(r["speedup_b1"], ".2f", "x"),
                 _fmt(r["speedup_b32"], ".2f", "x")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_runtimes(rows: Sequence[dict], path: str, title: Optional[str] = None) -> str:
    """Write a PNG of each row's speed-up over the teacher at batch 1 and 32 (bars, the
    teacher's 1.00x as a line), labelled with accuracy and size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['name']} / {r['runtime_title']}" for r in rows]
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(rows) + 1.4))
    y = list(range(len(rows)))[::-1]
    for off, key, color in ((-0.2, "speedup_b1", "tab:orange"), (0.2, "speedup_b32", "tab:blue")):
        ax.barh([v + off for v in y], [r[key] or 0 for r in rows], height=0.38, color=color,
                label=f"batch {key[len('speedup_b'):]}")
    for v, r in zip(y, rows):
        score = r["metric"]
        ax.annotate(f"{'acc' if score == 'accuracy' else score} {_fmt(r[score], '.3f')}, "
                    f"{_fmt(r['size_mb'], '.2f')} MB",
                    (max(r["speedup_b1"] or 0, r["speedup_b32"] or 0), v),
                    textcoords="offset points", xytext=(4, -3), fontsize=7)
    ax.axvline(1.0, color="tab:red", lw=1, ls="--", label="teacher (1.00x)")
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlabel("speed-up over the teacher in PyTorch fp32 (CPU latency ratio)")
    ax.margins(x=0.25)
    ax.legend(loc="best", fontsize=8)
    ax.set_title(title or "every runtime against the teacher", fontsize=10)
    return _save_png(fig, path)


def _recipe_line(res: dict) -> str:
    r = res.get("recipe") or {}
    parts = []
    if r.get("student"):
        parts.append(f"student `{json.dumps(r['student'], sort_keys=True)}`")
    from distilkit.config import LOSS_WEIGHTS

    weights = {k: r[k] for k in LOSS_WEIGHTS if r.get(k)}
    if weights:
        parts.append("loss " + ", ".join(f"{k[6:]}={v}" for k, v in weights.items()))
    if r.get("temperature") is not None and r.get("alpha_kd"):
        parts.append(f"T={r['temperature']}")
    comp = r.get("compression") or []
    if comp:
        parts.append("compression " + "; ".join(
            e.get("method", "?") + "(" + ", ".join(f"{k}={v}" for k, v in e.items()
                                                  if k != "method") + ")" for e in comp))
    if r.get("augment"):
        parts.append(f"augment `{json.dumps(r['augment'], sort_keys=True)}`")
    for k in ("max_steps", "num_train_epochs", "learning_rate", "max_length"):
        if r.get(k) is not None:
            parts.append(f"{k}={r[k]}")
    return f"- **{res['name']}**: " + ("; ".join(parts) if parts else "(no recipe recorded)")


def plot_tradeoffs(rows: Sequence[dict], path: str, metric: str = "accuracy",
                   title: Optional[str] = None) -> str:
    """Write the two-panel PNG (metric vs size, metric vs batch-32 latency)."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    lat = 32 if any(r.get("latency_ms_batch32") for r in rows) else 1
    panels = [("size_mb", "size on disk (MB, log)"),
              (f"latency_ms_batch{lat}", f"CPU latency, batch {lat} (ms, log)")]
    for ax, (key, label) in zip(axes, panels):
        pts = [r for r in rows if r.get(key)]
        for r in pts:
            if r["is_teacher"]:
                ax.scatter(r[key], r[metric], marker="*", s=260, color="tab:red", zorder=3,
                           label="teacher")
            else:
                ax.scatter(r[key], r[metric], s=55, color="tab:blue", zorder=2)
            ax.annotate(r["name"], (r[key], r[metric]), textcoords="offset points",
                        xytext=(6, 5), fontsize=8)
        ax.set_xscale("log")
        ax.margins(x=0.2, y=0.12)  # room for the labels at the edges
        plain = FuncFormatter(lambda v, _: f"{v:g}")
        ax.xaxis.set_major_formatter(plain)
        # Within one decade the log axis has no major tick to read: label the minor ones.
        narrow = pts and max(r[key] for r in pts) < 10 * min(r[key] for r in pts)
        ax.xaxis.set_minor_formatter(plain if narrow else FuncFormatter(lambda v, _: ""))
        ax.set_xlabel(label)
        ax.set_ylabel(metric.replace("_", " "))
        ax.grid(True, which="both", alpha=0.3)
        if any(r["is_teacher"] for r in pts):
            ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(title or f"{metric.replace('_', ' ')} trade-offs", fontsize=11)
    return _save_png(fig, path)


def write_report(run_dirs: Sequence[str], out_dir: str, *, metric: Optional[str] = None,
                 title: Optional[str] = None) -> dict:
    """Write ``report.md``, ``report.png`` and ``report.json`` for ``run_dirs`` into
    ``out_dir``; returns ``{"markdown": path, "plot": path, "json": path, "rows": rows,
    "metric": metric}``. ``metric`` defaults to :func:`default_metric` of the runs."""
    if not run_dirs:
        raise ValueError("give at least one run directory")
    results = [load_results(d) for d in run_dirs]
    metric = metric or default_metric(results)
    rows = build_rows(results, metric)
    os.makedirs(out_dir, exist_ok=True)
    png = plot_tradeoffs(rows, os.path.join(out_dir, "report.png"), metric, title)
    teachers = {(r["teacher"]["parameters"], round(r["teacher"][metric], 6)) for r in results}
    lines = [f"# {title or 'Distillation report'}", "",
             markdown_table(rows, metric), ""]
    if len(teachers) > 1:
        lines += ["Note: the runs do not share one teacher (different sizes or scores); the "
                  "teacher row is the first run's, and each student's retention, size ratio "
                  "and speed-up are relative to its own teacher.", ""]
    lines += ["Retention = student / teacher " + metric.replace("_", " ") + ". Size ratio = "
              "teacher bytes on disk / student bytes on disk (the saved model files, tokenizer "
              "excluded). Speed-up = teacher latency / student latency (CPU, median after "
              "warm-up, sequence length = max_length). Peak memory = model tensors + peak "
              "resident growth during one batch-32 forward pass.", "",
              f"![{metric} vs size and latency]({os.path.basename(png)})", "",
              "## Runs", ""]
    lines += [_recipe_line(r) for r in results]
    runtime = (runtime_rows(results, metric if metric in RUNTIME_SCORES else None)
               if any(r.get("runtimes") for r in results) else None)
    if runtime:
        rt_png = plot_runtimes(runtime, os.path.join(out_dir, "report_runtimes.png"), title)
        lines += ["", "## Runtimes", "",
                  "Each student in every runtime it was exported to, on its run's test split, "
                  "against the teacher in PyTorch fp32 (1.00x). Agreement = share of rows on "
                  "which the runtime predicts what the student in PyTorch predicts; (serve) = "
                  "the file the run's export says to serve.", "",
                  runtimes_table(runtime), "",
                  f"![speed-up of every runtime]({os.path.basename(rt_png)})"]
    md = os.path.join(out_dir, "report.md")
    atomic_write_text(md, "\n".join(lines) + "\n")
    js = os.path.join(out_dir, "report.json")
    atomic_write_json(js, {"metric": metric, "rows": rows, "runtime_rows": runtime,
                           "runs": [r["_path"] for r in results]})
    return {"markdown": md, "plot": png, "json": js, "rows": rows, "metric": metric,
            "runtime_rows": runtime, "runtime_plot": rt_png if runtime else None}


# ---------------------------------------------------------------------------------------
# Command line: ``distilkit report RUN_DIR...``
# ---------------------------------------------------------------------------------------

def add_report_arguments(p) -> None:
    """Arguments of ``distilkit report`` (wired by :mod:`distilkit.cli`)."""
    p.add_argument("run_dirs", nargs="+", help="run directories written by distilkit distill")
    p.add_argument("--out", default="report", help="output directory (default: ./report)")
    p.add_argument("--metric", default=None,
                   help="the task metric to compare (default: bleu for seq2seq runs, else accuracy)")
    p.add_argument("--title", default=None)


def run_report(args, rest=None) -> int:
    """``distilkit report``: write the table and plot, print the table."""
    out = write_report(args.run_dirs, args.out, metric=args.metric, title=args.title)
    print(markdown_table(out["rows"], out["metric"]))
    if out["runtime_rows"]:
        print()
        print(runtimes_table(out["runtime_rows"]))
    print(f"(written: {out['markdown']}, {out['plot']})")
    return 0


def _save_png(fig, path: str) -> str:
    """Write matplotlib figure ``fig`` to ``path`` as a PNG, atomically, and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path
