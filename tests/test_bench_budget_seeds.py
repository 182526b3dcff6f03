"""scripts/bench_budget_seeds.py reads the side-by-side tables of runs that exist (no
distillation here): the hand student at the nearest measured latency, and the margin over
seeds."""
import json
from pathlib import Path

from conftest import load_script


def _script():
    return load_script("bench_budget_seeds")


def _row(name, kind, acc, ms, **more):
    return {"name": name, "kind": kind, "accuracy": acc, "latency_ms": ms,
            "speedup": round(250.0 / ms, 3), "parameters": 1000, **more}


def _seed(out: Path, seed: int, searched: float, l3: float, l2: float):
    (out / f"s{seed}" / "hand_L3").mkdir(parents=True)
    (out / f"s{seed}" / "hand_L3" / "results.json").write_text("{}")
    rows = [_row("speedup_2", "searched", searched, 122.0, within=True, within_in_run=False,
                 speedup_in_run=2.11),
            _row("L2", "compared", l2, 83.0),   # faster: not the nearest
            _row("L3", "compared", l3, 126.0),
            _row("teacher", "teacher", 0.82, 250.0)]
    (out / f"s{seed}" / "search").mkdir()
    (out / f"s{seed}" / "search" / "pareto.json").write_text(json.dumps({"rows": rows}))


def test_margin_over_seeds_against_the_nearest_hand_student(tmp_path, capsys):
    _seed(tmp_path, 1, 0.84, 0.82, 0.90)
    _seed(tmp_path, 2, 0.83, 0.82, 0.90)
    _script().main(["--seeds", "1", "2", "--out", str(tmp_path), "--distilkit", "/nonexistent"])
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])
    assert [r["hand"] for r in summary["runs"]] == ["L3", "L3"]
    assert abs(summary["margin_mean"] - 1.5) < 1e-9
    assert abs(summary["margin_sd"] - 0.7071) < 1e-3
    assert summary["margin_min"] == 1.0
    assert summary["within_table"] == 2 and summary["within_run"] == 0
    assert "| 1 | 84.00 | 2.05x (2.11x) | L3 82.00 | 1.98x | +2.00 |" in out
