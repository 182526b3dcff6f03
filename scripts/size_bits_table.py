"""The table and JSON line of scripts/bench_size_bits.sh and scripts/bench_size_ranks.sh: test
accuracy, size (saved tensors) and structure of the hand-designed students and of the searched
ones (structure only, with bits, with word rows, with ranks: those that ran), read from their
results.json and search.json."""
import json
import os
import sys


def tensor_mb(student_dir: str) -> float:
    """MB of the saved student's tensors (packed codes, scales, fp32 rest, id map)."""
    from distilkit.compress.base import from_pretrained
    from distilkit.compress.packing import size_report

    return round(size_report(from_pretrained(student_dir))["total_bytes"] / 1e6, 4)


def _default_bits(r: dict) -> str:
    """What a student without a searched or per-pattern histogram stores: fp32, or the
    benchmark's 4 bits everywhere."""
    return "fp32" if r["bits_per_weight"] is None or r["bits_per_weight"] >= 31 else \
        "4 everywhere"


def row(out: str, name: str) -> dict:
    res = json.load(open(os.path.join(out, name, "results.json")))
    st = res["student"]
    r = {"name": name, "accuracy": round(100 * st["accuracy"], 2),
         "size_mb": tensor_mb(os.path.join(out, name, "student")),
         "dir_mb": round(st["size_on_disk_bytes"] / 1e6, 3),
         "bits_per_weight": st.get("bits_per_weight"), "parameters": st["parameters"],
         "teacher_accuracy": round(100 * res["teacher"]["accuracy"], 2)}
    path = os.path.join(out, name, "search.json")
    if os.path.exists(path):
        s = json.load(open(path))
        r["layers"] = len(s["structure"]["heads"])
        r["heads"] = s["structure"]["heads"]
        r["ffn"] = s["structure"]["ffn"]
        bits = s["structure"].get("bits")
        if bits:
            flat = [b for row_ in bits for b in row_ if b]
            r["bits_histogram"] = {b: flat.count(b) for b in sorted(set(flat))}
        else:   # the entry's own bits: the layers at bits, its globs (the word table) apart
            q = [e for e in s["compression"] if e.get("method") in ("ptq", "quantize")]
            if q and q[-1].get("bits_per_pattern"):
                r["bits_histogram"] = f"{q[-1]['bits']} in the layers, " + ", ".join(
                    f"{b} for {p}" for p, b in q[-1]["bits_per_pattern"].items())
        ranks = s["structure"].get("ranks")
        if ranks:
            flat = [r for row_ in ranks for r in row_]
            r["ranks_histogram"] = {k: flat.count(k) for k in sorted(set(flat))}
        if "vocab" in s["structure"]:
            r["word_rows"] = s["structure"]["vocab"]
        r["search_seconds"] = s.get("search_seconds")
        r["steps"] = len(s["history"]) - 1
        r["chosen"] = [h.get("chosen", "mixed") for h in s["history"][1:]]
        r["met"] = (s.get("final") or {}).get("met")
    return r


def main(out: str, target: float) -> None:
    names = [n for n in ("hand_L3", "hand_L3_lowrank", "structure", "bits", "vocab", "ranks",
                          "structure8", "bits8", "hand_L3_quantize", "structure_quantize",
                          "bits8_quantize")
             if os.path.exists(os.path.join(out, n, "results.json"))]
    rows = [row(out, n) for n in names]
    print(f"| student (size target {target} MB) | test accuracy | MB of tensors | MB of the "
          "directory | bits/weight | layers | heads | FFN | stored bits | word rows | ranks "
          "(0: dense) | proposals chosen |")
    print("|---|---:|---:|---:|---:|---:|---|---|---|---:|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['accuracy']:.2f} | {r['size_mb']:.3f} | {r['dir_mb']:.3f} | "
              f"{r['bits_per_weight']} | {r.get('layers', 3)} | {r.get('heads', '12 each')} | "
              f"{r.get('ffn', '1536 each')} | {r.get('bits_histogram', _default_bits(r))} | "
              f"{r.get('word_rows', 'all of the data')} | {r.get('ranks_histogram', '-')} | "
              f"{', '.join(r.get('chosen', [])) or '-'} |")
    by = {r["name"]: r for r in rows}
    line = {"size_target_mb": target, **{f"{n}_accuracy": by[n]["accuracy"] for n in by},
            **{f"{n}_size_mb": by[n]["size_mb"] for n in by}}
    for n in by:
        if n != "hand_L3" and "hand_L3" in by:
            line[f"{n}_minus_hand"] = round(by[n]["accuracy"] - by["hand_L3"]["accuracy"], 2)
        if n not in ("hand_L3", "structure") and "structure" in by:
            line[f"{n}_minus_structure"] = round(by[n]["accuracy"] - by["structure"]["accuracy"], 2)
    for n in ("structure_quantize", "bits8_quantize"):
        if n in by and "hand_L3_quantize" in by:
            line[f"{n}_minus_hand_quantize"] = round(by[n]["accuracy"]
                                                     - by["hand_L3_quantize"]["accuracy"], 2)
    if "bits8" in by and "structure8" in by:
        line["bits8_minus_structure8"] = round(by["bits8"]["accuracy"]
                                               - by["structure8"]["accuracy"], 2)
    print(json.dumps(line))


if __name__ == "__main__":
    if sys.argv[1] == "--tensor-mb":
        print(tensor_mb(sys.argv[2]))
    else:
        main(sys.argv[1], float(sys.argv[2]))
