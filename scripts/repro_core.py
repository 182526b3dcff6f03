"""Issue #2's table: the built-in teacher, and a 3-layer student trained on labels only,
distilled (KD), and distilled with Patient-KD, over several seeds, on the built-in data.

    python scripts/repro_core.py                       # 3 seeds, the quickstart recipe
    python scripts/repro_core.py --seeds 0 --max-steps 20 --max-eval 200   # a quick check

Each row is a real run of ``recipes/quickstart.yaml`` through the pipeline with the overrides
shown, so the figures are what ``distilkit distill`` produces. Prints a markdown table (mean
and standard deviation over seeds) and ends with one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROWS = {
    "labels only (CE)": {"alpha_kd": 0.0, "alpha_ce": 1.0},
    "KD (T=2, alpha=0.5)": {"alpha_kd": 0.5, "alpha_ce": 0.5, "temperature": 2.0},
    "KD + Patient-KD (beta=100, skip)": {"alpha_kd": 0.5, "alpha_ce": 0.5, "temperature": 2.0,
                                          "alpha_patient": 100.0, "layer_map": "skip"},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default=os.path.join(os.path.dirname(__file__), "..", "recipes", "quickstart.yaml"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--max-eval", type=int, default=None, help="cap on evaluation examples")
    p.add_argument("--out", default="runs/repro_core")
    p.add_argument("--report-only", action="store_true", help="tabulate the runs already on disk")
    a = p.parse_args()

    from distilkit.pipeline import run_recipe
    from distilkit.recipe import Recipe

    results: dict[str, list] = {name: [] for name in ROWS}
    teacher = None
    # Seed-major order, and runs already on disk are reused: an interrupted reproduction
    # resumes, and --report-only tabulates the complete seeds it has.
    for seed in a.seeds:
        for name, over in ROWS.items():
            tag = name.split(" (")[0].replace(" ", "_").replace("+", "plus").lower()
            run_dir = os.path.join(a.out, f"{tag}-s{seed}")
            done = os.path.join(run_dir, "results.json")
            if os.path.isfile(done):
                with open(done) as f:
                    res = json.load(f)
            elif a.report_only:
                continue
            else:
                o = dict(over, seed=seed, output_dir=run_dir, name=f"{tag}-s{seed}")
                if a.max_steps:
                    o["max_steps"] = a.max_steps
                if a.max_eval:
                    o["max_eval_samples"] = a.max_eval
                res = run_recipe(Recipe.load(a.recipe, o), progress=False)
            results[name].append(res)
            teacher = res["teacher"]
    if teacher is None:
        raise SystemExit(f"no finished runs under {a.out}")

    def ms(vals):
        return (statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0)

    lines = ["| model | test accuracy (mean ± sd) | macro-F1 | parameters | speed-up (batch 32) | runs |",
             "|---|---|---|---|---|---|",
             f"| teacher: MiniLM-L6 fine-tuned | {teacher['accuracy']:.4f} | {teacher['macro_f1']:.4f} | "
             f"{teacher['parameters']:,} | 1.00x | - |"]
    fig = {"teacher_accuracy": round(teacher["accuracy"], 4)}
    for name, runs in results.items():
        acc = ms([r["student"]["accuracy"] for r in runs])
        f1 = ms([r["student"]["macro_f1"] for r in runs])
        sp = ms([r["speedup_batch32"] for r in runs])
        lines.append(f"| 3-layer student, {name} | {acc[0]:.4f} ± {acc[1]:.4f} | {f1[0]:.4f} | "
                     f"{runs[0]['student']['parameters']:,} | {sp[0]:.2f}x | {len(runs)} |")
        key = name.split(" (")[0].replace(" ", "_").replace("+", "plus").lower()
        fig[f"{key}_accuracy"] = round(acc[0], 4)
        fig[f"{key}_accuracy_sd"] = round(acc[1], 4)
        fig[f"{key}_speedup"] = round(sp[0], 2)
    print("\n".join(lines))
    print(json.dumps(fig))


if __name__ == "__main__":
    main()
