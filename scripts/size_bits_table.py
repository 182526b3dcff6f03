"""The table and JSON line of scripts/bench_size_bits.sh: test accuracy, size on disk and
structure of the hand-designed student and of the two searched ones (structure only, and
with bits), read from their results.json and search.json."""
import json
import os
import sys


def row(out: str, name: str) -> dict:
    res = json.load(open(os.path.join(out, name, "results.json")))
    st = res["student"]
    r = {"name": name, "accuracy": round(100 * st["accuracy"], 2),
         "size_mb": round(st["size_on_disk_bytes"] / 1e6, 3),
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
        r["search_seconds"] = s.get("search_seconds")
        r["steps"] = len(s["history"]) - 1
        r["chosen"] = [h.get("chosen", "mixed") for h in s["history"][1:]]
        r["met"] = (s.get("final") or {}).get("met")
    return r


def main(out: str, target: float) -> None:
    rows = [row(out, n) for n in ("hand_L3", "structure", "bits")]
    print(f"| student (size target {target} MB) | test accuracy | MB on disk | bits/weight "
          "| layers | heads | FFN | stored bits | proposals chosen |")
    print("|---|---:|---:|---:|---:|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['accuracy']:.2f} | {r['size_mb']:.3f} | "
              f"{r['bits_per_weight']} | {r.get('layers', 3)} | {r.get('heads', '12 each')} | "
              f"{r.get('ffn', '1536 each')} | {r.get('bits_histogram', '4 everywhere')} | "
              f"{', '.join(r.get('chosen', [])) or '-'} |")
    by = {r["name"]: r for r in rows}
    print(json.dumps({"size_target_mb": target,
                      **{f"{n}_accuracy": by[n]["accuracy"] for n in by},
                      **{f"{n}_size_mb": by[n]["size_mb"] for n in by},
                      "bits_minus_structure": round(by["bits"]["accuracy"]
                                                    - by["structure"]["accuracy"], 2),
                      "bits_minus_hand": round(by["bits"]["accuracy"] - by["hand_L3"]["accuracy"], 2)}))


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]))
