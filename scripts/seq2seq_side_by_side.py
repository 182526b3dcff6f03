"""Seq2seq students side by side: each run's test scores (from its results.json) and the
batch-1 generation latency of the teacher and every student measured in turns, sentence by
sentence (one busy moment of the shared machine slows all of them alike, so the ratios hold;
each run's own latency figure was timed minutes apart from the others').

    python scripts/seq2seq_side_by_side.py RUN_DIR [RUN_DIR ...] [--sentences 60]
        [--spec BATCH,SOURCE_LEN,NEW_TOKENS]

With ``--spec``, each student is also timed as the budget search times it: generating
exactly NEW_TOKENS tokens for BATCH random sources of SOURCE_LEN tokens, in turns with the
teacher, the median of five pairings (``verdict_pair_ms``): the speed-up a search's target
is judged by. Ends with one JSON line: per run its BLEU, chrF, parameters, batch-1 latency
and speed-up over the teacher measured here (and ``spec_speedup``)."""
import argparse
import json
import os
import statistics
import sys

import torch


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("runs", nargs="+")
    p.add_argument("--sentences", type=int, default=60)
    p.add_argument("--spec", default=None, help="BATCH,SOURCE_LEN,NEW_TOKENS")
    a = p.parse_args()
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from distilkit.compress.base import load_compressed
    from distilkit.recipe import Recipe
    from distilkit.seq2seq.generate_eval import GenerationSettings, generate_texts
    from distilkit.tasks import get_task

    results = {r: json.load(open(os.path.join(r, "results.json"))) for r in a.runs}
    recipe = Recipe.load(os.path.join(a.runs[0], "recipe.yaml"))
    task = get_task("seq2seq")
    raw = task.load_data(recipe)
    spec = recipe.data
    sources = list(raw[spec.test_split][spec.text_column])[:a.sentences]
    teacher_dir = results[a.runs[0]]["teacher"].get("model_dir") or \
        task.load_teachers(recipe, raw, progress=False).first_dir
    tok = AutoTokenizer.from_pretrained(os.path.join(a.runs[0], "student"))
    models = {"teacher": load_compressed(teacher_dir, auto_cls=AutoModelForSeq2SeqLM).eval()}
    for r in a.runs:
        models[r] = load_compressed(os.path.join(r, "student"),
                                    auto_cls=AutoModelForSeq2SeqLM).eval()
    g = GenerationSettings(**{**(recipe.keys.generation or {}), "batch_size": 1})
    times = {k: [] for k in models}
    with torch.inference_mode():
        for i, src in enumerate(sources):
            order = list(models) if i % 2 == 0 else list(models)[::-1]
            for k in order:
                t = generate_texts(models[k], tok, [src], g).seconds * 1000
                if i >= 2:   # the first two sentences warm up
                    times[k].append(t)
    t_ms = statistics.median(times["teacher"])
    rows = {"teacher": {"latency_ms": round(t_ms, 3),
                        "bleu": results[a.runs[0]]["teacher"].get("bleu"),
                        "parameters": results[a.runs[0]]["teacher"].get("parameters")}}
    for r in a.runs:
        s = results[r]["student"]
        # the per-sentence ratio to the teacher, its median: what a busy moment leaves alone
        ratio = statistics.median(x / y for x, y in zip(times[r], times["teacher"]))
        rows[os.path.basename(os.path.abspath(r))] = {
            "bleu": round(s.get("bleu"), 2), "chrf": round(s.get("chrf"), 2),
            "exact_match": round(s.get("exact_match"), 4), "parameters": s.get("parameters"),
            "size_mb": round(s["size_on_disk_bytes"] / 1e6, 3),
            "latency_ms": round(ratio * t_ms, 3), "speedup": round(1 / ratio, 3)}
    if a.spec:
        from distilkit.search.latency import RuntimeSpec, verdict_pair_ms

        b, n, t = (int(x) for x in a.spec.split(","))
        spec = RuntimeSpec("pytorch", batch=b, seq_len=n, new_tokens=t)
        for r in a.runs:
            ms, ref = verdict_pair_ms(models[r], models["teacher"], spec)
            rows[os.path.basename(os.path.abspath(r))]["spec_speedup"] = round(ref / ms, 3)
        rows["spec"] = {"batch": b, "seq_len": n, "new_tokens": t}
    print(f"{'run':<22} {'BLEU':>6} {'chrF':>6} {'params':>9} {'ms':>7} {'speed-up':>8}"
          + (f" {'spec x':>7}" if a.spec else ""), file=sys.stderr)
    for k, v in rows.items():
        if k == "spec":
            continue
        print(f"{k:<22} {v.get('bleu') or 0:>6.2f} {v.get('chrf') or 0:>6.2f} "
              f"{v.get('parameters') or 0:>9,} {v['latency_ms']:>7.2f} "
              f"{v.get('speedup', 1.0):>8.2f}"
              + (f" {v.get('spec_speedup', 1.0):>7.2f}" if a.spec else ""), file=sys.stderr)
    print(json.dumps({"seq2seq_side_by_side": rows, "sentences": len(sources) - 2}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
