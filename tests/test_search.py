"""Compression to a budget (#16): the recipe's ``{method: auto, target: {...}}`` entry, the
NetAdapt-style search (greedy selection, bookkeeping in the original student's indices, the
explicit prune_ffn option it writes), the search run end to end on tiny models (a parameters
target and a pytorch speed-up target met; an unreachable target refused before training;
the written recipe reproducing the structure), and ``distilkit search``'s Pareto report."""
import copy
import dataclasses
import json
import os

import pytest
import torch
import yaml

from conftest import tiny_batch, tiny_bert
from distilkit.cli import main
from test_cli import _recipe


def _auto(**kw):
    return {"method": "auto", **kw}


# ---------------------------------------------------------------------------------------
# The recipe entry
# ---------------------------------------------------------------------------------------

BAD = [
    ("two_targets", [_auto(target={"speedup": 4, "size_mb": 3})], "give exactly one of"),
    ("negative", [_auto(target={"speedup": -2})], "target.speedup: -2 must be a number > 0"),
    ("no_target", [_auto()], "needs a target"),
    ("unknown_target", [_auto(target={"sped": 2})], "did you mean 'speedup'"),
    ("unknown_key", [_auto(target={"speedup": 2}, step_fractoin=0.1)],
     "did you mean 'step_fraction'"),
    ("runtime", [_auto(target={"speedup": 2}, runtime="onnx8")], "runtime: 'onnx8'"),
    ("unit", [_auto(target={"speedup": 2}, units=["head"])], "did you mean 'heads'"),
    ("step_fraction", [_auto(target={"speedup": 2}, step_fraction=1.5)], "step_fraction: 1.5"),
    ("batch", [_auto(target={"latency_ms": 5}, batch=0)], "batch: 0"),
    ("auto_not_first", [{"method": "quantize", "bits": 8}, _auto(target={"speedup": 2})],
     "must be the first compression entry"),
    ("structural_after", [_auto(target={"speedup": 2}), {"method": "prune_heads",
                                                          "fraction": 0.5}],
     "prune_heads after method auto cannot work"),
    ("twice", [_auto(target={"speedup": 2}), _auto(target={"speedup": 3})], "given twice"),
    ("tolerance", [_auto(target={"speedup": 2}, tolerance=1.5)], "tolerance: 1.5 must be in"),
    ("choose", [_auto(target={"speedup": 2}, choose="best")], "choose: 'best' must be one of"),
]


@pytest.mark.parametrize("case,compression,expected", BAD, ids=[c[0] for c in BAD])
def test_bad_auto_entries_fail_in_one_line_with_exit_2(tiny_task, capsys, case, compression,
                                                      expected):
    path, out = _recipe(tiny_task, compression=compression)
    assert main(["distill", path, "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1, err
    assert not os.path.exists(os.path.join(out, "student"))


def test_auto_then_quantize_is_accepted_and_the_dry_run_shows_the_plan(tiny_task, capsys):
    path, out = _recipe(tiny_task, compression=[
        _auto(target={"speedup": 3}, steps_between=5), {"method": "quantize", "bits": 8}])
    assert main(["distill", path, "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "compress auto -> quantize" in printed
    assert "search   speed-up >= 3x over the teacher (pytorch, batch 32, length 16" in printed
    assert "5 distillation steps after each" in printed
    assert not os.path.exists(out)


def test_budget_runtimes_match_the_latency_tables():
    from distilkit.budget import CHOICES, CLOCKS, RUNTIMES
    from distilkit.search import latency, netadapt

    assert RUNTIMES == latency.RUNTIMES and set(CLOCKS) == set(latency.CLOCKS)
    assert CHOICES == netadapt.CHOICES


# ---------------------------------------------------------------------------------------
# Greedy selection and bookkeeping (pure)
# ---------------------------------------------------------------------------------------

def _shape_and_structure(model):
    from distilkit.search.structure import base_shape_of, structure_of

    return base_shape_of(model), structure_of(model)


def test_plan_step_takes_the_least_importance_per_saving_and_respects_the_floors():
    from distilkit.search.netadapt import Scores, plan_step
    from distilkit.search.structure import parameters

    shape, st = _shape_and_structure(tiny_bert(layers=3, heads=4, inter=64))
    cost = lambda s: parameters(s, shape)  # noqa: E731
    # Layer 1's heads are worthless, everything else matters: a small cut takes its heads.
    scores = Scores(heads=[[5.0] * 4, [0.0, 0.0, 0.0, 0.0], [5.0] * 4],
                    neurons=[[5.0] * 64] * 3, layers=[50.0, 50.0, 50.0])
    r = plan_step(st, scores, cost, cut=2000, ffn_block=16)
    assert r.heads == {1: [0, 1]} and not r.neurons and not r.layers  # 2 heads of 1056 each
    # A huge cut: never below 1 layer, 1 head and one FFN block per layer.
    r = plan_step(st, scores, cost, cut=10 ** 9, ffn_block=16)
    kept = len(st.heads) - len(r.layers)
    assert kept == 1 and not r.empty()
    # Worthless FFN neurons go before heads of equal saving-per-importance ratio.
    scores = Scores(heads=[[5.0] * 4] * 3, neurons=[[0.0] * 64, [9.0] * 64, [9.0] * 64],
                    layers=[50.0] * 3)
    r = plan_step(st, scores, cost, cut=2000, ffn_block=16)  # two blocks of 1040
    assert list(r.neurons) == [0] and len(r.neurons[0]) == 32 and not r.heads
    r = plan_step(st, scores, cost, cut=5000, ffn_block=16)  # layer 0 keeps one block
    assert len(r.neurons[0]) == 48 and r.heads
    # Units that may not go are never proposed.
    r = plan_step(st, scores, cost, cut=10 ** 9, units=("heads",), ffn_block=16)
    assert not r.neurons and not r.layers and all(len(v) == 3 for v in r.heads.values())


def test_plan_step_near_the_target_does_not_overshoot_with_a_whole_layer():
    """The 4x budget's last step went from 2 layers (3.6x) to 1 (6.55x): a whole layer, cheap
    per ms when its saving is capped at what the step needs, was taken where heads would land
    within 5%. With the floor (limit / 1.05 in predicted terms), picks that stay above it
    come first; with no floor the plan is the old one."""
    from distilkit.search.netadapt import Scores, landing_band, plan_step, step_floor
    from distilkit.search.structure import parameters

    shape, st = _shape_and_structure(tiny_bert(layers=2, heads=4, inter=64))
    cost = lambda s: parameters(s, shape)  # noqa: E731
    start = cost(st)
    # Heads matter a little, the second layer hardly at all (per saved unit).
    scores = Scores(heads=[[1.0] * 4, [1.0] * 4], neurons=[[9.0] * 64] * 2, layers=[9.0, 0.5])
    cut = 2000  # two heads' worth (1056 each)
    old = plan_step(st, scores, cost, cut=cut, ffn_block=16)
    assert old.layers == [1]  # the old plan: a layer, far past the goal
    floor = step_floor(start, start, landing_band(start - cut, 0.05, exact=True)[2],
                       exact=True)
    assert floor == pytest.approx((start - cut) / 1.05)
    new = plan_step(st, scores, cost, cut=cut, ffn_block=16, floor=floor)
    assert not new.layers and new.counts()["heads"] == 2
    after = cost(__import__("dataclasses").replace(
        st, heads=tuple(h - len(new.heads.get(i, [])) for i, h in enumerate(st.heads))))
    assert floor <= after <= start - cut
    # Where only an overshooting pick is left, it is still made (the target comes first).
    only = plan_step(st, scores, cost, cut=cut, units=("layers",), floor=floor)
    assert only.layers == [1]


def test_proposals_reach_the_same_cut_one_per_kind_beside_the_mixed_plan():
    from distilkit.search.netadapt import Scores, after_removal, plan_proposals
    from distilkit.search.structure import parameters

    shape, st = _shape_and_structure(tiny_bert(layers=3, heads=4, inter=64))
    cost = lambda s: parameters(s, shape)  # noqa: E731
    start = cost(st)
    # Layers look free to the gradient: the mixed plan takes one; heads and FFN blocks of
    # the same total saving are the other proposals.
    scores = Scores(heads=[[1.0] * 4] * 3, neurons=[[1.0] * 64] * 3, layers=[0.0, 0.0, 0.0])
    cut = 2000
    props = dict(plan_proposals(st, scores, cost, cut, ffn_block=16))
    assert list(props) == ["mixed", "heads", "ffn"]   # "layers" is the mixed plan itself
    assert props["mixed"].layers and not props["heads"].layers and not props["ffn"].layers
    for r in props.values():
        assert start - cost(after_removal(st, r)) >= cut
    assert not props["heads"].neurons and not props["ffn"].heads
    # A kind that cannot reach the cut is no proposal: heads alone save at most 3 x 3 heads.
    big = start - cost(after_removal(st, props["mixed"])) + 30000
    names = [n for n, _ in plan_proposals(st, scores, cost, big, ffn_block=16)]
    assert "heads" not in names and names[0] == "mixed"
    # Near the target, a proposal past the floor goes while another stays above it: a whole
    # layer (the layers-only plan) would land far below it; the mixed plan then avoids it.
    floor = start - 1.3 * cut
    props = plan_proposals(st, scores, cost, cut, ffn_block=16, floor=floor)
    assert [n for n, _ in props] == ["mixed", "ffn"] and not props[0][1].layers
    assert all(cost(after_removal(st, r)) >= floor for _, r in props)
    # When every proposal lands past the floor, the one that overshoots least is the only
    # one: a floor just under the start leaves the smallest plan, never a whole layer.
    floor = start - 1
    props = plan_proposals(st, scores, cost, cut, ffn_block=16, floor=floor)
    assert len(props) == 1 and not props[0][1].layers
    least = max(cost(after_removal(st, r))
                for _, r in plan_proposals(st, scores, cost, cut, ffn_block=16))
    assert cost(after_removal(st, props[0][1])) == least
    # One kind of unit: one proposal.
    assert [n for n, _ in plan_proposals(st, scores, cost, cut, ("heads",), 16)] == ["mixed"]


def test_measured_choice_keeps_the_proposal_distillation_repairs_best():
    """The gradient says a whole layer costs nothing, short distillation says it costs most:
    with ``choose: measured`` the search keeps the heads-and-FFN proposals and never drops a
    layer; with ``importance`` it drops layers as the scores say (the old behaviour)."""
    from distilkit.search.netadapt import Goal, Scores, after_removal, search
    from distilkit.search.structure import parameters

    shape, st = _shape_and_structure(tiny_bert(layers=3, heads=4, inter=64))
    cost = lambda s: parameters(s, shape)  # noqa: E731

    class Fake:   # a student that is its structure, and what was removed from it
        def __init__(self, structure, layers_gone=0):
            self.structure, self.layers_gone = structure, layers_gone

    def prune(m, removal):
        m.structure = after_removal(m.structure, removal)
        m.layers_gone += len(removal.layers)
        return m

    def distil(m, step, structure=None):   # validation loss: a dropped layer hurts, other cuts a little
        return {"eval_loss": 1.0 + m.layers_gone + 0.01 * (cost(st) - cost(m.structure)) / 1e4}

    def score(m):
        n = m.structure.num_layers()
        return Scores(heads=[[1.0] * h for h in m.structure.heads],
                      neurons=[[1.0] * f for f in m.structure.ffn], layers=[0.0] * n)

    limit = cost(st) - 12000
    goal = Goal(limit, "parameters", figure=lambda m: cost(m.structure), cost=cost, exact=True)
    calls = []
    found = search(Fake(st), st, goal, score=score, prune=prune,
                   distil=lambda m, i, s: calls.append(i) or distil(m, i), ffn_block=16,
                   step_fraction=0.2, progress=False)
    assert found["met"] and found["model"].layers_gone == 0
    assert found["structure"].num_layers() == 3 and found["tracker"].layers == [0, 1, 2]
    steps = found["history"][1:]
    assert all(r["chosen"] != "mixed" for r in steps)
    assert all(any(p["proposal"] == "mixed" and p["layers"] for p in r["proposals"])
               for r in steps)
    assert len(calls) == sum(len(r["proposals"]) for r in steps)   # each one distilled
    old = search(Fake(st), st, goal, score=score, prune=prune, distil=distil, ffn_block=16,
                 step_fraction=0.2, progress=False, choose="importance")
    assert old["met"] and old["model"].layers_gone >= 1
    assert "proposals" not in old["history"][1]


def _heads_and_ffn_student():
    """A stand-in student that is its structure: ``(Fake, prune, score)`` for
    :func:`~distilkit.search.netadapt.search`, scoring every head and neuron alike and every
    layer as too important to go."""
    from distilkit.search.netadapt import Scores, after_removal

    class Fake:
        def __init__(self, structure):
            self.structure = structure

    def prune(m, removal):
        m.structure = after_removal(m.structure, removal)
        return m

    def score(m):
        return Scores(heads=[[1.0] * h for h in m.structure.heads],
                      neurons=[[1.0] * f for f in m.structure.ffn],
                      layers=[99.0] * m.structure.num_layers())
    return Fake, prune, score


def test_a_measured_target_is_aimed_at_the_middle_of_the_tolerance_band():
    """A latency read just inside its limit reads outside it as often as not a few minutes
    later (the 8x budget: 8.0x in the search, 7.88x in its own check): a measured goal stops
    in the middle half of the band, at most limit / (1 + tolerance / 4), not at the limit; an
    exact (size) goal at the limit."""
    from distilkit.search.netadapt import Goal, search
    from distilkit.search.structure import parameters

    # Heads of 0.6% of the model each: fine enough to land inside a 2.5% band.
    shape, st = _shape_and_structure(tiny_bert(layers=2, heads=16, hidden=64, inter=512))
    cost = lambda s: parameters(s, shape)  # noqa: E731

    Fake, prune, score = _heads_and_ffn_student()

    limit = cost(st) * 0.9
    for exact, top in ((False, limit / 1.0125), (True, limit)):
        goal = Goal(limit, "ms", figure=lambda m: cost(m.structure), cost=cost, exact=exact)
        found = search(Fake(st), st, goal, score=score, prune=prune,
                       distil=lambda m, i, s: {"eval_loss": 1.0}, ffn_block=16,
                       step_fraction=0.02, progress=False, choose="importance")
        assert len(found["history"]) > 3   # several steps of 2%
        last = found["history"][-1]["measured"]
        assert found["met"] and last <= top
    # Aimed at the limit itself (no tolerance: the old rule), the same search stops above
    # that aim: this is the case the aim changes.
    found = search(Fake(st), st, Goal(limit, "ms", figure=lambda m: cost(m.structure),
                                      cost=cost), score=score, prune=prune,
                   distil=lambda m, i, s: {"eval_loss": 1.0}, ffn_block=16, step_fraction=0.02,
                   progress=False, choose="importance", tolerance=0.0)
    assert limit / 1.0125 < found["history"][-1]["measured"] <= limit


def test_a_measured_step_at_the_fast_edge_of_the_band_is_made_again_nearer_its_middle():
    """The 2x and 8x searches of 2026-12-03 stopped at the fast edge of their band (2.09x, and
    21.5 ms in 21.4-22.4), and their side-by-side readings minutes later fell past it (2.12x,
    8.55x). Here the table over-predicts by 5% of the start, so the scaled cut lands at about
    limit / 1.044: inside the band, where the old rule stopped; now it is below the band's
    middle half, so the step is made again with the cut read off, and lands inside it."""
    from distilkit.search.netadapt import Goal, landing_band, search
    from distilkit.search.structure import parameters

    shape, st = _shape_and_structure(tiny_bert(layers=2, heads=16, hidden=64, inter=512))
    cost = lambda s: parameters(s, shape)  # noqa: E731
    full = cost(st)
    Fake, prune, score = _heads_and_ffn_student()
    goal = Goal(0.72 * full, "ms", figure=lambda m: cost(m.structure) - 0.05 * full, cost=cost)
    stop, aim, bottom = landing_band(goal.limit, 0.05, exact=False)
    assert (stop, aim, bottom) == pytest.approx(
        (goal.limit / 1.0125, goal.limit / 1.025, goal.limit / 1.0375))
    found = search(Fake(st), st, goal, score=score, prune=prune,
                   distil=lambda m, i, s: {"eval_loss": 1.0}, ffn_block=16,
                   step_fraction=0.5, progress=False, choose="importance")
    row = found["history"][1]
    first = row["retried"]["measured"]
    assert goal.limit / 1.05 <= first < bottom   # where the old rule stopped, within 5%
    assert bottom <= row["measured"] <= stop     # made again: in the middle half
    assert len(found["history"]) == 2 and found["met"] and found["within_tolerance"]


def test_a_step_that_lands_past_the_band_is_undone_and_made_again_with_the_cut_read_off():
    """The 2x search of 2026-12-03 went from 2% short of its limit to 9% past it in one step:
    the measured/predicted ratio the cut is scaled by fell as the student shrank. Here the
    table over-predicts by a fixed amount (measured = predicted - 0.2 of the start), so the
    scaled cut lands past the band; the step is undone once and made again with the cut its
    two readings call for, which lands inside the band."""
    from distilkit.search.netadapt import Goal, search
    from distilkit.search.structure import parameters

    shape, st = _shape_and_structure(tiny_bert(layers=2, heads=16, hidden=64, inter=512))
    cost = lambda s: parameters(s, shape)  # noqa: E731
    full = cost(st)

    Fake, prune, score = _heads_and_ffn_student()

    distilled = []
    goal = Goal(0.72 * full, "ms", figure=lambda m: cost(m.structure) - 0.2 * full, cost=cost)
    found = search(Fake(st), st, goal, score=score, prune=prune,
                   distil=lambda m, i, s: distilled.append(i) or {"eval_loss": 1.0},
                   ffn_block=16, step_fraction=0.5, progress=False, choose="importance")
    row = found["history"][1]
    assert row["retried"]["measured"] < goal.limit / 1.05   # the first try overshot
    assert goal.limit / 1.05 <= row["measured"] <= goal.limit   # the second, inside the band
    assert distilled[:2] == [1, 1]   # the first step distilled twice
    assert found["met"] and found["within_tolerance"]
    # the student, its bookkeeping and the row agree on what the retried step removed
    assert found["model"].structure == found["structure"]
    assert found["history"][-1]["heads"] == list(found["structure"].heads)
    assert sum(st.heads) - sum(row["heads"]) == row["removed"]["heads"]
    assert row["proposals"][-1]["retry"] and row["removed"] == {
        k: row["proposals"][-1][k] for k in ("heads", "ffn_neurons", "layers")}


def test_near_its_target_a_student_is_measured_three_times_and_the_median_decides():
    """The 4x budget read 45.9 ms, then 42.9 ms one head later: one noisy reading decided
    where the search stopped. Near the aim the median of three readings does; far from it
    one reading is enough; a size (exact) is never measured twice."""
    from distilkit.search.netadapt import NEAR_REPEATS, Goal, _measure

    readings = iter([44.0, 47.5, 46.8, 200.0])
    goal = Goal(46.0, "ms", figure=lambda m: next(readings), cost=lambda s: 0.0)
    aim = 46.0 / 1.025
    assert NEAR_REPEATS == 3
    assert _measure(goal, None, aim, 0.05) == 46.8        # median of 44.0, 47.5, 46.8
    assert _measure(goal, None, aim, 0.05) == 200.0       # far: one reading
    calls = []
    exact = Goal(46.0, "MB", figure=lambda m: calls.append(1) or 45.0, cost=lambda s: 0.0,
                 exact=True)
    assert _measure(exact, None, 46.0, 0.05) == 45.0 and len(calls) == 1


def test_step_cut_calibrates_the_goal_by_the_tables_error():
    from distilkit.search.netadapt import step_cut

    # Predicted 100, measured 200 (the table says half): a 150 ms goal is 75 predicted.
    assert step_cut(100, 200, 150, 0.1, exact=False) == pytest.approx(10)
    assert step_cut(100, 200, 190, 0.1, exact=False) == pytest.approx(5)
    assert step_cut(100, 100, 95, 0.5, exact=True) == pytest.approx(5)
    assert step_cut(100, 120, 130, 0.1, exact=False) == pytest.approx(2.5)  # noise: go on


def test_tracked_entries_cut_the_same_units_out_of_a_fresh_student():
    """Several steps of removals by current positions, then the entries in the original
    indices applied to a fresh copy: the same structure, the same weights, equal logits."""
    from distilkit.compress.base import compress_, config_from_dict
    from distilkit.search.netadapt import Removal, Tracker
    from distilkit.search.run import prune_removal
    from distilkit.search.structure import structure_of

    fresh = tiny_bert(layers=4, heads=4, inter=64)
    model = copy.deepcopy(fresh)
    tracker = Tracker.of(structure_of(model))
    steps = [Removal(heads={0: [1], 2: [0, 3]}, neurons={1: [0, 5, 63]}),
             Removal(heads={2: [1]}, neurons={0: list(range(10, 30))}, layers=[1]),
             Removal(heads={0: [0, 2]}, neurons={2: [1, 2]}, layers=[0])]
    for r in steps:
        prune_removal(model, r)
        tracker.apply(r)
        assert structure_of(model) == tracker.structure(structure_of(model))
    entries = tracker.entries()
    assert [e["method"] for e in entries] == ["prune_heads", "prune_ffn", "prune_layers"]
    assert entries[2]["layers"] == [0, 1]
    for e in entries:
        compress_(fresh, config_from_dict(e))
    assert structure_of(fresh) == structure_of(model)
    b = tiny_batch()
    b.pop("labels")
    with torch.no_grad():
        assert torch.allclose(fresh(**b).logits, model(**b).logits, atol=1e-6)


def test_prune_ffn_explicit_neurons_restore_and_refusals(tmp_path):
    from distilkit.compress.base import compress_, from_pretrained, save_compressed
    from distilkit.compress.prune import PruneFFNConfig

    model = tiny_bert(layers=2, inter=64)
    ref = copy.deepcopy(model)
    compress_(model, PruneFFNConfig(neurons={0: [0, 1, 2], "bert.encoder.layer.1.intermediate":
                                             list(range(40))}))
    ffn = [layer.output.dense.in_features for layer in model.bert.encoder.layer]
    assert ffn == [61, 24]
    # The kept neurons are exactly the others: the same rows of the up projection.
    assert torch.equal(model.bert.encoder.layer[0].intermediate.dense.weight,
                       ref.bert.encoder.layer[0].intermediate.dense.weight[3:])
    save_compressed(model, str(tmp_path / "m"))
    back = from_pretrained(str(tmp_path / "m"))
    b = tiny_batch()
    b.pop("labels")
    with torch.no_grad():
        assert torch.allclose(back(**b).logits, model.eval()(**b).logits, atol=1e-6)
    with pytest.raises(ValueError, match="neurons 0..63"):
        compress_(tiny_bert(layers=2), PruneFFNConfig(neurons={0: [64]}))
    with pytest.raises(ValueError, match="removing every one of the 64 neurons"):
        compress_(tiny_bert(layers=2), PruneFFNConfig(neurons={1: list(range(64))}))
    with pytest.raises(ValueError, match="exactly one of fraction, count or neurons"):
        PruneFFNConfig(fraction=0.5, neurons={0: [1]})


# ---------------------------------------------------------------------------------------
# End to end on tiny models
# ---------------------------------------------------------------------------------------

@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _search_recipe(tiny_task, target, **kw):
    settings = dict(target=target, steps_between=3, ffn_block=16, eval_examples=16,
                    importance_batches=2, max_iterations=12, step_fraction=0.3)
    settings.update(kw.pop("auto", {}))
    return _recipe(tiny_task, student={"type": "from_teacher", "num_layers": 4},
                   compression=[_auto(**settings), *kw.pop("after", [])], max_steps=6,
                   teacher_cache=True,
                   cache_dir=str(tiny_task["tmp"] / "tcache"), **kw)


def test_parameters_target_met_recipe_reproduces_the_structure(tiny_task, cache, capsys):
    from distilkit.compress.base import from_pretrained
    from distilkit.search.structure import structure_of

    path, out = _search_recipe(tiny_task, {"parameters": 22000})
    assert main(["distill", path, "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "search step 1/12" not in err  # --no-progress: no step lines
    # ... but the verdict, always, in one line
    assert "[distilkit] search: target parameters 22000: the final student has " in err
    assert err.strip().splitlines()[-1].endswith(": met (within the tolerance)") or \
        ": met (more than 5% past it)" in err
    res = json.load(open(os.path.join(out, "results.json")))
    s = res["search"]
    assert s["met"] and s["parameters"] <= 22000
    assert s["parameters"] == res["student"]["parameters"]  # counted exactly
    record = json.load(open(os.path.join(out, "search.json")))
    assert record["met"] and record["history"][-1]["measured"] <= 22000
    assert record["history"][0]["measured"] > 22000 and len(record["history"]) >= 2
    assert "accuracy" in record["history"][-1] and "train_loss" in record["history"][-1]
    resolved = yaml.safe_load(open(os.path.join(out, "recipe.yaml")))
    methods = [e["method"] for e in resolved["compression"]]
    assert "auto" not in methods and methods and set(methods) <= {
        "prune_heads", "prune_ffn", "prune_layers"}
    student = from_pretrained(os.path.join(out, "student"))
    found = structure_of(student)
    assert list(found.heads) == record["structure"]["heads"]
    # The resolved recipe, run again, gives the same structure without searching.
    resolved["output_dir"] = os.path.join(tiny_task["tmp"], "again")
    again = tiny_task["tmp"] / "again.yaml"
    again.write_text(yaml.safe_dump(resolved))
    assert main(["distill", str(again), "--no-progress"]) == 0
    assert not os.path.exists(os.path.join(tiny_task["tmp"], "again", "search.json"))
    assert structure_of(from_pretrained(os.path.join(tiny_task["tmp"], "again", "student"))) \
        == found


def test_a_size_target_counts_the_rows_a_later_prune_vocab_keeps(tiny_task, cache, capsys):
    """A teacher whose word table is mostly tokens the data never uses (200 of 230 rows): a
    parameters target the whole table puts out of reach is refused without prune_vocab (the
    line says to add it), and met with prune_vocab after auto, the search counting the 27 rows
    the training data and the specials use. (The search before this counted the whole
    table, so it refused the target with prune_vocab too.)"""
    from transformers import BertTokenizerFast

    from conftest import WORDS
    from distilkit.compress.base import from_pretrained

    tdir = tiny_task["tmp"] / "bigvocab"
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + \
        [f"unused{i}" for i in range(200)]
    BertTokenizerFast(vocab={w: i for i, w in enumerate(words)},
                      do_lower_case=True).save_pretrained(str(tdir))
    tiny_bert(vocab=len(words), layers=4).save_pretrained(str(tdir))
    target = {"parameters": 10000}
    path, out = _search_recipe(tiny_task, target, teacher=str(tdir))
    assert main(["distill", path, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "cannot be reached" in err and "{method: prune_vocab} after auto" in err, err
    path, out = _search_recipe(tiny_task, target, teacher=str(tdir),
                               after=[{"method": "prune_vocab"}],
                               output_dir=str(tiny_task["tmp"] / "vocab"))
    assert main(["distill", path, "--no-progress"]) == 0, capsys.readouterr().err
    record = json.load(open(os.path.join(out, "search.json")))
    assert record["vocab_counted"] == 5 + len(set(WORDS) - {"a", "but", "not"})
    res = json.load(open(os.path.join(out, "results.json")))
    assert res["search"]["met"] and res["search"]["parameters"] <= 10000
    student = from_pretrained(os.path.join(out, "student"))
    assert student.get_input_embeddings().weight.shape[0] == record["vocab_counted"]
    assert sum(p.numel() for p in student.parameters()) == res["search"]["parameters"]


def test_a_size_target_counts_the_weights_as_a_later_quantization_stores_them(
        tiny_task, cache, capsys):
    """``size_mb`` with ``ptq`` 4 bits after auto: the search counts the packed codes and
    bucket scales the quantization will save (exactly: the final student's saved tensors
    weigh what the search counted), so a target 10% under the unpruned student's stored size
    costs about 10%, where counting fp32 (as before) pruned the student to a third of its
    fp32 size, then quantized it to far below the target."""
    from transformers import AutoModelForSequenceClassification

    from distilkit.compress.base import compress_, config_from_dict, finalize_, from_pretrained
    from distilkit.compress.packing import size_report
    from distilkit.search.storage import storage_of
    from distilkit.search.structure import base_shape_of, size_mb, structure_of

    ptq = {"method": "ptq", "bits": 4, "bucket_size": 64}
    full = AutoModelForSequenceClassification.from_pretrained(tiny_task["teacher"])
    shape, st = base_shape_of(full), structure_of(full)
    stored = size_mb(st, shape, storage=storage_of(full, config_from_dict(ptq)))
    compress_(full, config_from_dict(ptq))
    finalize_(full)
    assert stored == size_report(full)["total_bytes"] / 1e6   # the count is the file
    fp32 = size_mb(st, shape)
    assert fp32 > 2.5 * stored
    target = round(0.9 * stored, 6)
    path, out = _search_recipe(tiny_task, {"size_mb": target}, after=[ptq])
    assert main(["distill", path, "--no-progress"]) == 0, capsys.readouterr().err
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "MB of weights as stored: met" in err, err
    s = json.load(open(os.path.join(out, "results.json")))["search"]
    assert s["met"] and s["within_tolerance"] and s["storage"] == "4-bit weights as packed codes"
    student = from_pretrained(os.path.join(out, "student"))
    assert s["size_mb"] == pytest.approx(size_report(student)["total_bytes"] / 1e6, abs=1e-4)
    assert structure_of(student).num_layers() == 4           # a tenth: no layer went
    assert size_mb(structure_of(student), shape) > 2 * target  # its fp32 weights: not counted
    record = json.load(open(os.path.join(out, "search.json")))
    assert record["storage_counted"]["attention"][0] == [4, 4, 4, 4]


def test_unreachable_target_refused_before_training(tiny_task, cache, capsys, monkeypatch):
    from distilkit.trainer import DistilTrainer

    def no_training(self, *a, **kw):
        raise AssertionError("a student was trained before the target was checked")
    monkeypatch.setattr(DistilTrainer, "train", no_training)
    path, out = _search_recipe(tiny_task, {"parameters": 1000})
    assert main(["distill", path, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "target.parameters: 1000 cannot be reached: the smallest student (1 layer, 1 head, " \
           "16 FFN neurons) has" in err and "ask for at least" in err
    path, out = _search_recipe(tiny_task, {"speedup": 500}, auto={"batch": 8})
    assert main(["distill", path, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "target.speedup: 500 cannot be reached: the smallest student (1 layer, 1 head, 16 " \
           "FFN neurons) is" in err and "x the teacher (" in err and "ask for at most" in err
    assert not os.path.exists(out)  # nothing written, not even an empty output_dir
    # A latency in ms, judged like a speed-up: against the teacher timed in turns with it.
    path, out = _search_recipe(tiny_task, {"latency_ms": 0.01}, auto={"batch": 8})
    assert main(["distill", path, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "target.latency_ms: 0.01 cannot be reached: the smallest student (1 layer, 1 head, " \
           "16 FFN neurons) takes" in err and "ask for at least" in err
    assert not os.path.exists(out)


def test_speedup_target_met_in_pytorch_and_the_pareto_report(tiny_task, cache, capsys):
    """A tiny student whose latency is dominated by its layers (width 128, batch 32, length
    32), 2x faster than the teacher in eager PyTorch, timed on one thread by CPU clock (the
    machine is shared: wall time would measure the neighbours); ``distilkit search`` with a
    size target beside it and the hand-designed 2-layer student compared."""
    from distilkit.search.structure import structure_of
    from conftest import tiny_bert as make, tiny_tokenizer

    # A wider teacher than conftest's, so that its layers, not Python, dominate the time.
    tdir = str(tiny_task["tmp"] / "wide")
    tok = tiny_tokenizer(tdir)
    make(vocab=tok.vocab_size, layers=4, hidden=128, heads=4, inter=256).save_pretrained(tdir)
    hand, _ = _recipe(tiny_task, teacher=tdir, student={"type": "from_teacher", "num_layers": 2},
                      output_dir=str(tiny_task["tmp"] / "hand"), max_steps=6)
    assert main(["distill", hand, "--no-progress"]) == 0
    path, out = _search_recipe(tiny_task, {"speedup": 2}, teacher=tdir,
                               auto={"batch": 32, "seq_len": 32, "ffn_block": 32,
                                     "threads": 1, "clock": "cpu"},
                               output_dir=str(tiny_task["tmp"] / "search"))
    capsys.readouterr()
    assert main(["search", path, "--no-progress", "--target", "speedup=2", "--target",
                 "parameters=200000", "--compare", str(tiny_task["tmp"] / "hand")]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    line = json.loads(printed[-1])["pareto"]
    names = [r["name"] for r in line]
    assert names == ["speedup_2", "parameters_200000", "hand", "teacher"]
    res = json.load(open(os.path.join(out, "speedup_2", "results.json")))
    s = res["search"]
    record = json.load(open(os.path.join(out, "speedup_2", "search.json")))
    # The search stops on its own measurement; the final student, measured again, is within
    # the latency table's stated tolerance of the limit.
    assert record["met"] and record["history"][-1]["measured"] <= record["limit"]
    assert s["measured_ms"] <= record["limit"] * (1 + record["table_tolerance"])
    assert s["speedup"] >= 2 * (1 - record["table_tolerance"])
    assert structure_of(__import__("distilkit").from_pretrained(
        os.path.join(out, "speedup_2", "student"))).num_layers() >= 1
    for f in ("pareto.md", "pareto.png", "pareto.json"):
        assert os.path.getsize(os.path.join(out, f)) > 0
    md = open(os.path.join(out, "pareto.md")).read()
    assert "| hand | compared |" in md and "| teacher | teacher |" in md
    # The table judges the speed-up by its own verdict, in the tolerance band as the run does,
    # and lists the run's own verdict beside it.
    rows = json.load(open(os.path.join(out, "pareto.json")))["rows"]
    first = line[0]
    assert first["within"] == (first["met"] and first["speedup"] <= 2 * 1.05 + 1e-3)
    assert first["speedup_in_run"] == s["speedup"] and \
        rows[0]["within_in_run"] == s["within_tolerance"]
    assert f"speedup_2 {s['speedup']:.2f}x (met: " in md
    assert line[1]["speedup_in_run"] is None and rows[1]["within"] is not None
    teacher = line[-1]
    assert teacher["latency_ms"] > 0 and all(r["latency_ms"] > 0 for r in line)
    assert line[1]["met"] and line[1]["parameters"] <= 200000


def test_an_int8_budget_needs_the_int8_file_and_is_served_by_it(tiny_task, cache, capsys):
    """A latency budget met in onnx_int8 is met by model_int8.onnx: an export without it is
    refused before any work, and the run serves that file (results.json, export.json, the
    card, and the written recipe's ``export.serve``), even where the export's own rule would
    pick the fp32 file (here forced: int8 said to disagree on a check row)."""
    from distilkit.budget import budget_export_file
    from distilkit.export import classifier

    assert budget_export_file([_auto(target={"speedup": 2}, runtime="onnx_int8")]) == \
        ("onnx_int8", "int8")
    assert budget_export_file([_auto(target={"latency_ms": 9}, runtime="onnx")]) == \
        ("onnx", "fp32")
    assert budget_export_file([_auto(target={"size_mb": 9}, runtime="onnx_int8")]) is None
    assert budget_export_file([_auto(target={"speedup": 2})]) is None
    assert budget_export_file([{"method": "quantize", "bits": 8}]) is None

    auto = {"runtime": "onnx_int8", "batch": 4, "seq_len": 16, "threads": 1, "clock": "cpu"}
    path, out = _search_recipe(tiny_task, {"speedup": 0.5}, auto=auto,
                               export={"format": "onnx", "int8": False})
    assert main(["distill", path, "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "export.int8: false" in err and "onnx_int8" in err
    assert not os.path.exists(out)

    real = classifier.compare

    def int8_disagrees(sess, *a, **k):
        check = real(sess, *a, **k)
        if sess._model_path.endswith("model_int8.onnx"):
            check["argmax_agreement"] = 0.75
        return check

    path, out = _search_recipe(tiny_task, {"speedup": 0.5}, auto=auto,
                               export={"format": "onnx", "int8": True, "evaluate": False})
    mp = pytest.MonkeyPatch()
    mp.setattr(classifier, "compare", int8_disagrees)
    try:
        assert main(["distill", path, "--no-progress"]) == 0
    finally:
        mp.undo()
    res = json.load(open(os.path.join(out, "results.json")))
    assert res["export"]["serve"] == "onnx/model_int8.onnx"
    assert res["export"]["serve_rule"].startswith("export.serve: int8") and \
        "75.0%" in res["export"]["serve_rule"]
    # The written recipe (no search) serves the same file.
    written = yaml.safe_load(open(os.path.join(out, "recipe.yaml")))
    assert written["export"]["serve"] == "int8"
    assert all(e["method"] != "auto" for e in written["compression"])
    made = json.load(open(os.path.join(out, "student", "onnx", "export.json")))
    assert made["serve"] == "model_int8.onnx"
    card = open(os.path.join(out, "student", "README.md")).read()
    assert "Serve: `onnx/model_int8.onnx`" in card


@pytest.mark.parametrize("export,expected", [
    ({"serve": "int4"}, "export.serve: 'int4' is not an exported file; use one of fp32, int8, 4bit"),
    ({"int8": False, "serve": "int8"}, "export.serve: int8 names a file this export does not write"),
    ({"serve": "4bit"}, "set four_bit: true"),
])
def test_bad_export_serve_is_one_line(tiny_task, capsys, export, expected):
    path, out = _recipe(tiny_task, export=export)
    assert main(["distill", path, "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1, err


def test_the_verdict_line_says_how_far_a_missed_target_is():
    from distilkit.budget import budget_from_entry
    from distilkit.search.run import final_line

    budget = budget_from_entry(_auto(target={"speedup": 8}), 64, 0)
    s = {"met": False, "within_tolerance": False, "limit": 24.0, "reference_ms": 24.36,
         "speedup": 7.88, "measured_ms": 24.4, "teacher_ms": 192.3}
    line = final_line(s, budget)
    assert line.endswith("NOT met (1.5% over the limit)"), line
    s.update(met=True, within_tolerance=True, reference_ms=23.5)
    assert final_line(s, budget).endswith(": met (within the tolerance)")


# ---------------------------------------------------------------------------------------
# Bits as a search unit (size targets followed by quantize / ptq)
# ---------------------------------------------------------------------------------------

def _bits_setting():
    """Two layers of 4 heads (width 8 each) and 32 FFN neurons, every weight at 4 bits; a
    size counted as the storage would save it."""
    from distilkit.search.storage import Storage
    from distilkit.search.structure import BaseShape, Structure, size_mb

    shape = BaseShape(family="bert", hidden=32, num_heads=4, head_dim=8, intermediate=32,
                      vocab=50, num_labels=2, max_positions=16)
    storage = Storage(attention=((4,) * 4,) * 2, ffn=((4, 4),) * 2, word=0, bucket_size=16,
                      scheme="uniform")
    st = Structure((4, 4), (32, 32), 50, bits=storage.rows())
    return shape, storage, st, (lambda s: size_mb(s, shape, storage=storage))


def test_plan_bits_lowers_the_least_fisher_loss_per_byte_first_and_never_below_min_bits():
    """Layer 1's FFN down projection loses least from each bit (Fisher error 0.1 a bit, the
    others 1.0): it goes from 4 to 3 bits, then to 2 (min_bits), and only then does a second
    weight lose a bit; the plan reaches the cut, counted exactly."""
    from distilkit.search.netadapt import Scores, after_removal, plan_bits

    shape, storage, st, cost = _bits_setting()
    cheap = {2: 0.2, 3: 0.1, 4: 0.0}
    dear = {2: 2.0, 3: 1.0, 4: 0.0}
    bits = [[dict(dear) for _ in range(6)] for _ in range(2)]
    bits[1][5] = dict(cheap)
    scores = Scores(heads=[[0.0] * 4] * 2, neurons=[[0.0] * 32] * 2, layers=[0.0, 0.0],
                    bits=bits)
    one_bit = cost(st) - cost(after_removal(st, type(plan_bits(st, scores, cost, 0))(
        bits={1: {5: 3}})))
    r = plan_bits(st, scores, cost, 0.5 * one_bit, min_bits=2)
    assert r.bits == {1: {5: 3}}
    r = plan_bits(st, scores, cost, 2.5 * one_bit, min_bits=2)
    new = after_removal(st, r)
    assert new.bits[1][5] == 2                        # at min_bits, not below
    assert sum(4 - b for row in new.bits for b in row) == 3
    assert cost(st) - cost(new) >= 2.5 * one_bit - 1e-12
    assert new.heads == st.heads and new.ffn == st.ffn   # bits move no structure
    # nothing above min_bits: nothing to plan
    low = dataclasses.replace(st, bits=((2,) * 6,) * 2)
    assert plan_bits(low, scores, cost, one_bit, min_bits=2).empty()


def test_bits_proposal_stands_beside_the_structural_ones_and_follows_dropped_layers():
    """With bits among the units, a step proposes the bits plan beside the mixed and
    per-kind plans at the same cut; with bits alone, only it. The bookkeeping keeps each
    layer's bits with it when an earlier layer is dropped."""
    from distilkit.search.netadapt import (Removal, Scores, Tracker, after_removal,
                                           plan_proposals)

    shape, storage, st, cost = _bits_setting()
    scores = Scores(heads=[[0.1, 0.2, 0.3, 0.4]] * 2, neurons=[list(range(32))] * 2,
                    layers=[5.0, 5.0], bits=[[{2: 1.0, 3: 0.5, 4: 0.0}] * 6] * 2)
    cut = 0.05 * cost(st)
    names = [n for n, _ in plan_proposals(st, scores, cost, cut, ("heads", "ffn", "bits"),
                                          ffn_block=8)]
    assert names[0] == "mixed" and "bits" in names
    only = plan_proposals(st, scores, cost, cut, ("bits",), ffn_block=8)
    assert [n for n, _ in only] == ["bits"] and only[0][1].bits
    # layer 0 dropped, then layer 1 (now position 0) stores its q at 2 bits
    stepped = dataclasses.replace(st, bits=((4, 4, 4, 4, 4, 4), (3, 4, 4, 4, 4, 4)))
    tr = Tracker.of(stepped)
    tr.apply(Removal(layers=[0]))
    tr.apply(Removal(bits={0: {0: 2}}))
    after = tr.structure(stepped)
    assert after.bits == ((2, 4, 4, 4, 4, 4),)
    assert after == after_removal(after_removal(stepped, Removal(layers=[0])),
                                  Removal(bits={0: {0: 2}}))


def test_fisher_errors_grow_as_bits_fall_and_quantized_weights_put_the_weights_back():
    """The Fisher-weighted error of storing a weight at b bits is >= 0 and does not fall as
    b falls (on the same gradients); the evaluation view quantizes exactly as ptq stores and
    leaves the full-precision weights as they were, also when the block raises."""
    from distilkit.compress import quant_math as qm
    from distilkit.compress.base import CompressionContext
    from distilkit.compress.quantize import fisher_errors, quantized_weights

    torch.manual_seed(0)
    model = tiny_bert(layers=2)
    batch = tiny_batch()
    ctx = CompressionContext(dataloader=[batch, batch],
                             loss_fn=lambda m, b: m(**b).logits.logsumexp(-1).mean())
    names = ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.output.dense"]
    errs = fisher_errors(model, names, ctx, 2, [2, 3, 4, 8], 16)
    for e in errs:
        assert e[2] >= e[3] >= e[4] >= e[8] >= 0.0 and e[2] > 0.0
    w = model.get_submodule(names[0]).weight
    before = w.detach().clone()
    with quantized_weights(model, {names[0]: 2}, 16):
        assert torch.equal(w, qm.quantize_uniform(before, 2, 16))
    assert torch.equal(w, before)
    with pytest.raises(RuntimeError):
        with quantized_weights(model, {names[0]: 3}, 16):
            raise RuntimeError("evaluation failed")
    assert torch.equal(w, before)


def test_ptq_takes_bits_per_pattern_and_stores_each_weight_at_its_bits():
    from distilkit.compress.base import compress_, config_from_dict, finalize_
    from distilkit.compress.packing import size_report
    from distilkit.search.storage import storage_of
    from distilkit.search.structure import base_shape_of, size_mb, structure_of

    model = tiny_bert(layers=2)
    cfg = {"method": "ptq", "bits": 4, "bucket_size": 16,
           "bits_per_pattern": {"bert.encoder.layer.1.output.dense": 2}}
    storage = storage_of(model, config_from_dict(cfg))
    assert storage.rows()[1][-1] == 2 and storage.rows()[0][-1] == 4
    counted = size_mb(structure_of(model), base_shape_of(model), storage=storage)
    record = compress_(model, config_from_dict(cfg))
    finalize_(model)
    assert counted == size_report(model)["total_bytes"] / 1e6
    layers = record["layers"] if "layers" in record else record[-1]["layers"]
    assert layers["bert.encoder.layer.1.output.dense"]["bits"] == 2
    assert layers["bert.encoder.layer.0.output.dense"]["bits"] == 4


@pytest.mark.parametrize("auto,after,expected", [
    ({"target": {"speedup": 2}}, [{"method": "ptq", "bits": 4}], "use it with a size_mb target"),
    ({}, [], "there is none: add {method: ptq, bits: 4}"),
    ({}, [{"method": "quantize", "bits": 4, "target_bits": 3}], "target_bits with units: bits"),
    ({}, [{"method": "quantize", "bits": 4, "scheme": "nonuniform"}], "use scheme: uniform"),
    ({"min_bits": 5}, [{"method": "ptq", "bits": 4}], "must be between 1 and the ptq entry's"),
    ({"choose": "importance"}, [{"method": "ptq", "bits": 4}], "needs choose: measured"),
])
def test_bad_bits_unit_settings_fail_in_one_line(tiny_task, capsys, auto, after, expected):
    entry = _auto(**{"target": {"size_mb": 1}, "units": ["heads", "bits"], **auto})
    path, _ = _recipe(tiny_task, student={"type": "from_teacher", "num_layers": 2},
                      compression=[entry, *after])
    assert main(["distill", path, "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err


@pytest.mark.parametrize("units", [["bits"], ["heads", "ffn", "layers", "bits"]])
def test_a_size_target_with_bits_stores_weights_at_the_bits_it_chose(tiny_task, cache, capsys,
                                                                     units):
    """ptq 4 bits after auto and a size 15% under the student's stored size: with ``bits``
    among the units the search may store weights at fewer bits instead of removing units
    (with bits alone, it must). Whatever it chose, the bits go into the resolved recipe's ptq
    entry as bits_per_pattern, the saved student weighs exactly what the search counted, and
    no weight is below min_bits."""
    from transformers import AutoModelForSequenceClassification

    from distilkit.compress.base import config_from_dict, from_pretrained
    from distilkit.compress.packing import size_report
    from distilkit.search.storage import storage_of
    from distilkit.search.structure import base_shape_of, size_mb, structure_of

    ptq = {"method": "ptq", "bits": 4, "bucket_size": 64}
    full = AutoModelForSequenceClassification.from_pretrained(tiny_task["teacher"])
    stored = size_mb(structure_of(full), base_shape_of(full),
                     storage=storage_of(full, config_from_dict(ptq)))
    path, out = _search_recipe(tiny_task, {"size_mb": round(0.85 * stored, 6)}, after=[ptq],
                               auto={"units": units, "min_bits": 2})
    assert main(["distill", path, "--no-progress"]) == 0, capsys.readouterr().err
    s = json.load(open(os.path.join(out, "results.json")))["search"]
    assert s["met"] and s["size_mb"] <= 0.85 * stored
    student = from_pretrained(os.path.join(out, "student"))
    assert s["size_mb"] == pytest.approx(size_report(student)["total_bytes"] / 1e6, abs=1e-4)
    record = json.load(open(os.path.join(out, "search.json")))
    bits = record["structure"]["bits"]
    assert min(b for row in bits for b in row if b) >= 2
    lowered = {b for row in bits for b in row if 0 < b < 4}
    resolved = yaml.safe_load(open(os.path.join(out, "recipe.yaml")))
    entry = [e for e in resolved["compression"] if e["method"] == "ptq"][0]
    assert set(entry.get("bits_per_pattern", {}).values()) == lowered
    if units == ["bits"]:
        assert lowered and structure_of(student).num_layers() == 4   # nothing else moved
        assert all(len(r["removed"]) == 4 for r in record["history"][1:])   # bits only


def test_a_size_target_counts_the_id_map_prune_vocab_saves_beside_a_packed_table():
    """prune_vocab keeps its id-map form (an int32 per original token) when a later ptq packs
    the kept table or the tokenizer is kept: a size target counts those bytes (122 KB on
    MiniLM), and counts none when the shrunk tokenizer makes the table plain."""
    from distilkit.compress.base import config_from_dict
    from distilkit.search.run import later_id_map_bytes
    from distilkit.search.storage import storage_of

    model = tiny_bert(layers=2)
    vocab = model.get_input_embeddings().num_embeddings
    packed = {"method": "ptq", "bits": 4, "bucket_size": 16, "quantize_embeddings": True}
    plain = {"method": "ptq", "bits": 4, "bucket_size": 16}
    for rest, expected in (([{"method": "prune_vocab"}, packed], 4 * vocab),
                           ([{"method": "prune_vocab"}, plain], 0),
                           ([{"method": "prune_vocab", "tokenizer": "keep"}], 4 * vocab),
                           ([packed], 0)):
        q = [e for e in rest if e["method"] == "ptq"]
        storage = storage_of(model, config_from_dict(q[0])) if q else None
        assert later_id_map_bytes(rest, model, storage) == expected, rest


# ---------------------------------------------------------------------------------------
# The word table's rows as a unit (units: [.., vocab])
# ---------------------------------------------------------------------------------------

def _vocab_setting():
    from distilkit.search.structure import Structure, base_shape_of, size_mb

    model = tiny_bert(layers=2)
    shape = base_shape_of(model)
    return shape, Structure((4, 4), (64, 64), 90), (lambda s: size_mb(s, shape))


def test_plan_vocab_drops_the_fewest_rows_that_reach_the_cut_and_never_below_the_floor():
    from distilkit.search.netadapt import after_removal, plan_vocab

    shape, st, cost = _vocab_setting()
    row = cost(st) - cost(dataclasses.replace(st, vocab=st.vocab - 1))
    assert row == pytest.approx(4 * shape.hidden / 1e6)
    r = plan_vocab(st, cost, 2.5 * row, min_vocab=10)
    assert r.vocab == 3 and not r.heads and not r.neurons and not r.layers
    assert after_removal(st, r).vocab == 87 and after_removal(st, r).heads == st.heads
    assert plan_vocab(st, cost, 80 * row, min_vocab=10).vocab == 80   # down to the floor
    assert plan_vocab(st, cost, 81 * row, min_vocab=10).empty()      # it cannot reach the cut
    assert plan_vocab(dataclasses.replace(st, vocab=10), cost, row, min_vocab=10).empty()


def test_vocab_proposal_stands_beside_the_others_and_the_tracker_counts_the_rows():
    from distilkit.search.netadapt import Removal, Scores, Tracker, plan_proposals, \
        smallest_structure

    shape, st, cost = _vocab_setting()
    scores = Scores(heads=[[1.0] * 4] * 2, neurons=[[1.0] * 64] * 2, layers=[5.0, 5.0])
    cut = 0.1 * cost(st)
    props = dict(plan_proposals(st, scores, cost, cut, ("heads", "ffn", "vocab"), ffn_block=16,
                                min_vocab=10))
    assert "mixed" in props and props["vocab"].vocab > 0 and not props["mixed"].vocab
    only = plan_proposals(st, scores, cost, cut, ("vocab",), min_vocab=10)
    assert [n for n, _ in only] == ["vocab"]
    assert smallest_structure(st, ("heads", "vocab"), min_vocab=10).vocab == 10
    assert smallest_structure(st, ("heads",), min_vocab=10).vocab == 90
    tr = Tracker.of(st)
    tr.apply(Removal(vocab=30))
    tr.apply(Removal(layers=[0], vocab=5))
    assert tr.structure(st).vocab == 55 and tr.structure(st).num_layers() == 1
    assert Removal(vocab=5).counts()["vocab_rows"] == 5 and not Removal(vocab=5).empty()
    assert "vocab_rows" not in Removal(layers=[1]).counts()


def test_the_vocab_mask_computes_what_prune_vocab_at_those_rows_computes():
    """The search trains and scores its student with the ids the later prune_vocab will not
    keep reading [UNK] (VocabMask); after dropping k rows that is the student prune_vocab with
    max_tokens = (data tokens - k) makes, and a deep copy's mask is its own."""
    from distilkit.compress import CompressionContext, compress_, config_from_dict
    from distilkit.compress.vocab import droppable_ids
    from distilkit.search.run import VocabMask

    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(5, 60, (4, 12), generator=g),
                "attention_mask": torch.ones(4, 12, dtype=torch.long)} for _ in range(3)]
    ctx = CompressionContext(dataloader=batches)
    model = tiny_bert(layers=2)
    kept, data, unk = droppable_ids(model, config_from_dict({"method": "prune_vocab"}), ctx)
    VocabMask.install(model, kept, data, unk)
    clone = copy.deepcopy(model)
    VocabMask.of(clone).drop(20)
    assert VocabMask.of(model).kept_data == len(data)   # the original's mask is untouched
    x = torch.randint(0, 120, (6, 12), generator=g)   # ids the data holds and ids it lacks
    for m, n in ((model, len(data)), (clone, len(data) - 20)):
        ref = tiny_bert(layers=2)
        compress_(ref, config_from_dict({"method": "prune_vocab", "max_tokens": n}), ctx)
        with torch.no_grad():
            torch.testing.assert_close(m(input_ids=x).logits, ref(input_ids=x).logits)
    with pytest.raises(ValueError, match="data tokens are kept"):
        VocabMask.of(clone).drop(len(data))


@pytest.mark.parametrize("auto,after,expected", [
    ({"target": {"speedup": 2}}, [{"method": "prune_vocab"}], "use it with a size_mb or "
                                                             "parameters target"),
    ({}, [], "there is none: add {method: prune_vocab}"),
    ({}, [{"method": "prune_vocab", "max_tokens": 10}], "max_tokens with units: vocab"),
    ({"choose": "importance"}, [{"method": "prune_vocab"}], "needs choose: measured"),
])
def test_bad_vocab_unit_settings_fail_in_one_line(tiny_task, capsys, auto, after, expected):
    entry = _auto(**{"target": {"size_mb": 1}, "units": ["heads", "vocab"], **auto})
    path, _ = _recipe(tiny_task, student={"type": "from_teacher", "num_layers": 2},
                      compression=[entry, *after])
    assert main(["distill", path, "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err


@pytest.mark.parametrize("units", [["vocab"], ["heads", "ffn", "vocab"]])
def test_a_size_target_with_vocab_keeps_the_rows_it_chose(tiny_task, cache, capsys, units):
    """prune_vocab after auto and a parameters target six word rows under the student's
    counted size: with vocab alone the search drops at least six of the rarest training
    tokens' rows and nothing else; either way the resolved recipe's prune_vocab keeps the
    max_tokens the search chose, and the saved student has exactly the rows it counted."""
    from transformers import AutoModelForSequenceClassification

    from distilkit.compress.base import from_pretrained
    from distilkit.search.structure import structure_of

    from conftest import WORDS
    from distilkit.search.structure import base_shape_of, parameters

    full = AutoModelForSequenceClassification.from_pretrained(tiny_task["teacher"])
    hidden = full.config.hidden_size
    pv = {"method": "prune_vocab"}
    # the counted size of the 4-layer student with the rows prune_vocab keeps (the specials
    # and the words tiny_sentences uses)
    kept = 5 + len(set(WORDS) - {"a", "but", "not"})
    st = dataclasses.replace(structure_of(full), vocab=kept)
    target = parameters(st, base_shape_of(full)) - 6 * hidden
    path, out = _search_recipe(tiny_task, {"parameters": target}, after=[pv],
                               auto={"units": units})
    assert main(["distill", path, "--no-progress"]) == 0, capsys.readouterr().err
    res = json.load(open(os.path.join(out, "results.json")))
    record = json.load(open(os.path.join(out, "search.json")))
    assert record["vocab_counted"] == kept and res["search"]["met"]
    rows = record["structure"]["vocab"]
    assert rows == record["structure"]["max_tokens"] + 5   # the 5 specials stay
    resolved = yaml.safe_load(open(os.path.join(out, "recipe.yaml")))
    entry = [e for e in resolved["compression"] if e["method"] == "prune_vocab"][0]
    assert entry["max_tokens"] == record["structure"]["max_tokens"]
    student = from_pretrained(os.path.join(out, "student"))
    assert student.get_input_embeddings().weight.shape[0] == rows
    assert sum(p.numel() for p in student.parameters()) == res["search"]["parameters"] <= target
    if units == ["vocab"]:
        assert rows <= kept - 6 and structure_of(student).num_layers() == 4
        assert list(structure_of(student).heads) == [4] * 4
        assert all(set(r["removed"]) >= {"vocab_rows"} for r in record["history"][1:])


def test_bits_searched_from_an_entrys_own_bits_per_pattern_keep_its_globs_outside_the_layers():
    """units: bits may start from the entry's own bits_per_pattern (layers at 8 bits, the word
    table, which is not searched, at 4): the search starts at those bits, and the resolved
    entry stores every layer weight at its searched bits and the table at the glob's 4."""
    from distilkit.compress.base import config_from_dict
    from distilkit.compress.quantize import bits_for, select_targets
    from distilkit.search.run import with_bits
    from distilkit.search.storage import role_names, storage_of

    model = tiny_bert(layers=2)
    entry = {"method": "ptq", "bits": 8, "bucket_size": 16, "quantize_embeddings": True,
             "bits_per_pattern": {"*word_embeddings*": 4, "*.layer.1.output.dense": 6}}
    storage = storage_of(model, config_from_dict(entry))
    assert storage.word == 4 and storage.rows()[0] == (8,) * 6
    assert storage.rows()[1] == (8,) * 5 + (6,)
    searched = ((8, 5, 8, 8, 8, 8), (8, 8, 8, 8, 7, 6))
    [resolved] = with_bits([entry], model, searched)
    cfg = config_from_dict(resolved)
    names = [n for n, _ in select_targets(model, cfg)]
    got = bits_for(names, cfg)
    assert got["bert.embeddings.word_embeddings"] == 4
    for row, layer_names in zip(searched, role_names(model)):
        assert [got[n] for n in layer_names] == list(row)


def test_an_unreachable_target_with_vocab_names_the_rows_the_smallest_student_keeps(
        tiny_task, cache, capsys):
    """With vocab a unit, the smallest student keeps only the 5 special rows: the refusal's
    figure and its words count those, not the 27 rows of the data."""
    path, _ = _search_recipe(tiny_task, {"parameters": 100}, after=[{"method": "prune_vocab"}],
                             auto={"units": ["heads", "ffn", "layers", "vocab"]})
    assert main(["distill", path, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "cannot be reached" in err and "with the 5 word rows" in err, err


def test_the_starting_students_reading_is_the_median_of_three():
    """The starting reading scales every cut (the table's error on this model): the 1.3x
    seq2seq search of 2026-12-07 read its starting student (the teacher's copy) at 1.15x
    the teacher in one timing, cut past its band and ended at 1.48x. One wild reading
    among three no longer sets the scale."""
    from distilkit.search.netadapt import NEAR_REPEATS, Goal, search
    from distilkit.search.structure import parameters

    shape, st = _shape_and_structure(tiny_bert(layers=2, heads=16, hidden=64, inter=512))
    cost = lambda s: parameters(s, shape)  # noqa: E731
    full = cost(st)
    Fake, prune, score = _heads_and_ffn_student()
    wild = iter([1.4 * full])   # the first timing of the run reads 40% slow
    goal = Goal(0.72 * full, "ms", cost=cost,
                figure=lambda m: next(wild, None) or cost(m.structure))
    found = search(Fake(st), st, goal, score=score, prune=prune,
                   distil=lambda m, i, s: {"eval_loss": 1.0}, ffn_block=16,
                   step_fraction=0.5, progress=False, choose="importance")
    assert NEAR_REPEATS == 3 and found["history"][0]["measured"] == full
    assert found["met"] and found["within_tolerance"]


def test_a_pick_a_later_larger_one_made_redundant_is_given_back():
    """The 1.35x truecasing search of 2026-12-07 planned an encoder layer (cheap per ms),
    then the decoder layer the cut needed anyway, and landed at 1.51x where the decoder
    layer alone was enough. Here layer 0 is cheap to lose but saves too little alone; the
    cut then needs layer 1, which saves it by itself: layer 0 is given back."""
    import dataclasses

    from distilkit.search.netadapt import Removal, Scores, after_removal, plan_step
    from distilkit.search.structure import parameters

    shape, st = _shape_and_structure(tiny_bert(layers=3, heads=4, inter=64))
    st = dataclasses.replace(st, heads=(2, 4, 4), ffn=(32, 64, 64))   # layer 0 is smaller
    cost = lambda s: parameters(s, shape)  # noqa: E731
    start = cost(st)
    saves = [start - cost(after_removal(st, Removal(layers=[i]))) for i in (0, 1)]
    assert saves[0] < saves[1]
    cut = saves[1] - 1   # more than layer 0 saves, less than layer 1 does
    scores = Scores(heads=[[9.0] * 2, [9.0] * 4, [9.0] * 4],
                    neurons=[[9.0] * 32] + [[9.0] * 64] * 2, layers=[0.01, 1.0, 50.0])
    r = plan_step(st, scores, cost, cut=cut, units=("layers",), ffn_block=16)
    assert r.layers == [1] and not r.heads and not r.neurons
    assert start - cost(after_removal(st, r)) >= cut
    # the mixed plan (heads and FFN blocks worth more than layer 1) ends the same way
    assert plan_step(st, scores, cost, cut=cut, ffn_block=16).layers == [1]
