"""The loss-term registry is the one place a term is declared: DistilConfig's weight fields,
its needs_* properties, the teacher-cache outputs and the trainer's terms all follow it, and a
new term is one registration."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest

from distilkit import loss_terms as LT
from distilkit.config import LOSS_WEIGHTS, DistilConfig


def _cfg(tmp_path, **kw):
    return DistilConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, **kw)


def test_config_has_one_weight_field_per_term_with_its_default_and_help():
    fields = {f.name: f for f in dataclasses.fields(DistilConfig)}
    assert LOSS_WEIGHTS == tuple(t.weight for t in LT.loss_terms())
    assert [t.name for t in LT.loss_terms()] == ["kd", "ce", "mse", "hidden", "patient",
                                                  "attention", "cosine"]
    for t in LT.loss_terms():
        assert fields[t.weight].default == t.default and fields[t.weight].metadata["help"] == t.help
        assert t.weight == f"alpha_{t.name}" and t.title and t.matches
    assert (fields["alpha_kd"].default, fields["alpha_ce"].default) == (0.5, 0.5)


@pytest.mark.parametrize("weights, hidden, attn, token, cached", [
    (dict(), False, False, False, ("logits",)),
    (dict(alpha_kd=0, alpha_ce=1.0), False, False, False, ("logits",)),
    (dict(alpha_patient=1.0), True, False, False, ("logits", "cls_hidden")),
    (dict(alpha_hidden=1.0), True, False, True, ("logits",)),
    (dict(alpha_cosine=1.0, alpha_patient=1.0), True, False, True, ("logits", "cls_hidden")),
    (dict(alpha_attention=1.0), False, True, True, ("logits",)),
])
def test_what_the_teacher_must_give_follows_the_positive_weights(tmp_path, weights, hidden, attn,
                                                                  token, cached):
    c = _cfg(tmp_path, **weights)
    assert (c.needs_hidden_states, c.needs_attentions, c.needs_token_states) == (hidden, attn, token)
    assert LT.needs_live_teacher(c) is token
    assert LT.cached_outputs_needed(c) == cached
    assert LT.cached_outputs_needed({**weights, "alpha_kd": 0.5}) == cached  # a recipe mapping
    assert (LT.teacher_needs(c) == frozenset()) == (weights == dict(alpha_kd=0, alpha_ce=1.0))


def test_a_weight_must_be_unique_and_needs_known():
    with pytest.raises(ValueError, match="already registered"):
        LT.register("kd2", weight="alpha_kd", title="t", matches="m", help="h")(lambda s: None)
    with pytest.raises(ValueError, match="needs must be some of"):
        LT.register("x", weight="alpha_x", needs=("logit",), title="t", matches="m", help="h")(
            lambda s: None)
    with pytest.raises(ValueError, match="before distilkit.config"):
        LT.register("late", weight="alpha_late", title="t", matches="m", help="h")(lambda s: None)
    assert "late" not in {t.name for t in LT.loss_terms()}


NEW_TERM = r'''
import json, sys, torch
from distilkit import loss_terms as LT

@LT.register("l1", weight="alpha_l1", needs=("logits",), title="logit L1",
             matches="teacher's logits", citations=("A. Newcomer. Logit L1. 2030.",),
             help="Weight of the logit L1 loss.")
def _l1(step):
    return (step.student_logits - step.teacher_logits[0]).abs().mean()

sys.path.insert(0, sys.argv[2])
from conftest import tiny_batch, tiny_bert
from distilkit import DistilConfig, DistilTrainer
from distilkit.card import model_card

args = DistilConfig(output_dir=sys.argv[1], report_to=[], use_cpu=True, alpha_kd=0, alpha_ce=0,
                    alpha_l1=2.0)
student = tiny_bert(layers=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).train()
teacher, b = tiny_bert(layers=2, seed=1), tiny_batch()
tr = DistilTrainer(model=student, teacher_model=teacher, args=args, train_dataset=[])
loss = tr.compute_loss(student, b)
with torch.no_grad():
    expected = 2.0 * (student(**b).logits - teacher(**b).logits).abs().mean()
card = model_card({}, {"alpha_l1": 2.0})
print(json.dumps({"loss": float(loss), "expected": float(expected), "terms": sorted(tr._term_totals),
                  "row": "| logit L1 | 2.0 | teacher's logits | [" in card,
                  "ref": "A. Newcomer. Logit L1. 2030." in card}))
'''


def test_a_new_term_is_one_registration(tmp_path):
    """Registered before DistilConfig is built, a term gets its weight field, is computed and
    logged by the trainer and listed on the card, with no other file touched."""
    tests = os.path.dirname(__file__)
    env = {**os.environ, "PYTHONPATH": os.path.join(tests, "..")}
    out = subprocess.run([sys.executable, "-c", NEW_TERM, str(tmp_path), tests], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["terms"] == ["l1"] and got["row"] and got["ref"]
    assert got["loss"] == pytest.approx(got["expected"], rel=1e-5)
