"""Write a user-style CSV from the built-in sentences: one file, string labels, three classes,
a few empty cells. The task the built-in data was not made for, to run distilkit the way a user
with their own data would (README "Your own CSV"; docs/RESULTS.md).

    python scripts/make_user_csv.py --out /tmp/reviews.csv

Labels come from the mean human rating (-4..+4): ``negative`` below -1.5, ``positive`` above
+1.5, ``neutral`` in between (3,451 / 3,526 / 3,628 rows: balanced). Every 997th review is left
empty, as exports of real spreadsheets have; distilkit drops those rows with a count.
"""
from __future__ import annotations

import argparse
import csv
import json
import random


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="the CSV to write")
    p.add_argument("--threshold", type=float, default=1.5, help="|rating| below it is neutral")
    p.add_argument("--seed", type=int, default=0, help="row order")
    a = p.parse_args(argv)
    from distilkit.data import builtin_sentences

    rows = []
    for text, score in builtin_sentences():
        label = "negative" if score <= -a.threshold else "positive" if score >= a.threshold else "neutral"
        rows.append((text, label))
    random.Random(a.seed).shuffle(rows)
    rows = [("" if i % 997 == 0 else t, y) for i, (t, y) in enumerate(rows)]
    with open(a.out, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["review", "sentiment"])
        w.writerows(rows)
    counts = {y: sum(1 for _, l in rows if l == y) for y in ("negative", "neutral", "positive")}
    figures = {"rows": len(rows), "empty_reviews": sum(1 for t, _ in rows if not t), **counts}
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
