"""What DistilTrainer feeds its models and what it accepts at init: no ``labels`` reach the
student or the teacher in a training step (distilkit computes every term itself), the
loss is the hand-computed one, evaluation still reports ``eval_loss``; bad cached-output
columns and a trainer with nothing to read the teacher from fail at init; the collator
stacks tensor-valued cached outputs; ``ensemble_weights`` weight the logit MSE."""
import functools

import pytest
import torch
from datasets import Dataset

from conftest import tiny_bart, tiny_bert, tiny_bert_config, tiny_t5
from distilkit import DistilTrainer
from distilkit import losses as L
from distilkit.collate import DistilCollator
from test_seq2seq import _no_dropout
from test_trainer import _args as trainer_args
from test_trainer import _trained_params

FAMILIES = {"bert": tiny_bert, "t5": tiny_t5, "bart": tiny_bart}


def _args(tmp_path, **kw):
    return trainer_args(tmp_path, **{"per_device_train_batch_size": 4, "max_steps": 1, **kw})


def _rows(family, n=4, seed=0):
    """Rows of equal length: class labels for BERT, label tokens (some -100) for seq2seq."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 120, (n, 8), generator=g)
    if family == "bert":
        labels = torch.randint(0, 2, (n,), generator=g)
    else:
        labels = torch.randint(5, 120, (n, 6), generator=g)
        labels[1, 4:] = -100
        labels[3, 2:] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _spy(model, calls):
    """Record the keyword names of every forward call (the signature stays the model's, so
    Trainer keeps the dataset columns the model takes)."""
    forward = model.forward

    @functools.wraps(forward)
    def spy(*a, **kw):
        calls.append(set(kw))
        return forward(*a, **kw)

    model.forward = spy


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_no_labels_reach_student_or_teacher_and_eval_loss_stays(family, tmp_path):
    make = FAMILIES[family]
    student, teacher = _no_dropout(make(seed=1)), make(seed=2)
    rows = _rows(family)
    ds = Dataset.from_dict({k: v.tolist() for k, v in rows.items()})
    kw = dict(alpha_hidden=1.0, layer_map=[[1, 2]]) if family == "bert" else {}
    tr = DistilTrainer(model=student, teacher_model=teacher, train_dataset=ds, eval_dataset=ds,
                       args=_args(tmp_path, alpha_kd=0.7, alpha_ce=0.3, **kw),
                       data_collator=DistilCollator(pad_token_id=0))
    s_calls, t_calls = [], []
    _spy(student, s_calls)
    _spy(tr.teachers[0], t_calls)
    tr.train()
    assert s_calls and t_calls
    for call in s_calls + t_calls:
        assert "labels" not in call, call
        if family != "bert":  # both decoders are fed the shifted labels, derived once
            assert "decoder_input_ids" in call, call
    # Evaluation still reports the student's own task loss on the labels.
    student.eval()
    with torch.no_grad():
        own = student(**rows).loss
    assert tr.evaluate()["eval_loss"] == pytest.approx(float(own), rel=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_step_loss_equals_the_hand_computed_terms(family, tmp_path):
    """The loss is the weighted sum of distilkit's own terms, on the logits the models gave
    when they were handed the labels (the old behaviour): nothing changes but the work."""
    make = FAMILIES[family]
    student, teacher = _no_dropout(make(seed=1)), make(seed=2)
    b = _rows(family)
    tr = DistilTrainer(model=student, teacher_model=teacher, train_dataset=[],
                       args=_args(tmp_path, alpha_kd=0.7, alpha_ce=0.3, temperature=3.0))
    loss = tr.compute_loss(student, b)
    with torch.no_grad():
        s_out, t_out = student(**b), teacher(**b)
    mask = (b["labels"] != -100) if family != "bert" else None
    ce = L.hard_ce(s_out.logits, b["labels"])
    expected = 0.7 * L.soft_target_kl(s_out.logits, t_out.logits, 3.0, mask) + 0.3 * ce
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert float(ce) == pytest.approx(float(s_out.loss), rel=1e-5)  # the built-in loss, redone


def test_ensemble_weights_weight_the_logit_mse(tmp_path):
    teachers = [tiny_bert(layers=2, seed=1), tiny_bert(layers=2, seed=2)]
    student = _no_dropout(tiny_bert(layers=1, seed=3))
    b = _rows("bert")
    tr = DistilTrainer(model=student, teacher_model=teachers, train_dataset=[],
                       args=_args(tmp_path, alpha_kd=0, alpha_ce=0, alpha_mse=1.0,
                                  ensemble_weights=[1, 3]))
    loss = tr.compute_loss(student, b)
    x = {k: b[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        s, t1, t2 = student(**x).logits, teachers[0](**x).logits, teachers[1](**x).logits
    assert float(loss) == pytest.approx(float(L.logit_mse(s, 0.25 * t1 + 0.75 * t2)), rel=1e-5)
    assert float(loss) != pytest.approx(float(L.logit_mse(s, (t1 + t2) / 2)), rel=1e-3)


# ------------------------------------------------------------------ checks at init
def _ds_with(column=None, n=8):
    """Labelled rows, plus a column of cached-output-like values when ``column`` is named."""
    cols = {k: v.tolist() for k, v in _rows("bert", n).items()}
    if column:
        cols[column] = torch.randn(n, 2).tolist()
    return Dataset.from_dict(cols)


def test_a_misnamed_cached_column_is_an_error_at_init(tmp_path):
    with pytest.raises(ValueError, match=r"'teacher_logit'.*teacher_logits"):
        DistilTrainer(model=tiny_bert(layers=1), teacher_model=tiny_bert(layers=2),
                      train_dataset=_ds_with("teacher_logit"), args=_args(tmp_path))


@pytest.mark.parametrize("kw, match", [
    (dict(), "alpha_kd"),
    (dict(alpha_kd=0, alpha_mse=1.0), "alpha_mse"),
    (dict(alpha_patient=1.0, layer_map=[[1, 1]]), "alpha_patient"),
])
def test_no_teacher_and_no_cached_outputs_is_an_error_at_init(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match) as e:
        DistilTrainer(model=tiny_bert(layers=1), teacher_config=tiny_bert_config(layers=2),
                      train_dataset=_ds_with(), args=_args(tmp_path, **kw))
    assert "\n" not in str(e.value)


def test_cached_outputs_or_labels_only_need_no_teacher(tmp_path):
    DistilTrainer(model=tiny_bert(layers=1), train_dataset=_ds_with("teacher_logits"),
                  args=_args(tmp_path))
    DistilTrainer(model=tiny_bert(layers=1), train_dataset=_ds_with(),
                  args=_args(tmp_path, alpha_kd=0, alpha_ce=1.0))


# ------------------------------------------------------------------ collation
@pytest.mark.parametrize("kind", ["tensor", "numpy"])
def test_collator_stacks_tensor_valued_cached_outputs(kind):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, generator=g, dtype=torch.float64)
    cls = torch.randn(3, 2, 5, generator=g)
    conv = (lambda t: t) if kind == "tensor" else (lambda t: t.numpy())
    feats = [{"input_ids": [5, 6, 7][: i + 1], "labels": conv(torch.tensor(i % 2)),
              "teacher_logits": conv(logits[i]), "teacher_cls_hidden": conv(cls[i])}
             for i in range(3)]
    batch = DistilCollator(pad_token_id=0)(feats)
    assert batch["teacher_logits"].dtype == torch.float32
    assert torch.allclose(batch["teacher_logits"], logits.float())
    assert torch.equal(batch["teacher_cls_hidden"], cls)
    assert batch["labels"].tolist() == [0, 1, 0] and batch["labels"].dtype == torch.long
    assert batch["input_ids"].tolist() == [[5, 0, 0], [5, 6, 0], [5, 6, 7]]


def test_a_torch_formatted_cache_trains_like_lists(tmp_path):
    t = tiny_bert(layers=2)
    rows = _rows("bert", 8)
    with torch.no_grad():
        logits = t(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits
    ds = Dataset.from_dict({**{k: v.tolist() for k, v in rows.items()}, "teacher_logits": logits.tolist()})
    out = []
    for d in (ds, ds.with_format("torch")):
        s = tiny_bert(layers=1, seed=4)
        DistilTrainer(model=s, train_dataset=d, args=_args(tmp_path, max_steps=2),
                      teacher_config=t.config, data_collator=DistilCollator(pad_token_id=0)).train()
        out.append(_trained_params(s))
    assert torch.equal(out[0], out[1])


# ------------------------------------------------------------------ devices
def test_teachers_are_fed_on_their_own_device(tmp_path):
    """A teacher elsewhere than the student (here one that says it lives on ``meta`` and
    refuses other inputs) gets its inputs on its device; its outputs come back to the
    student's, for the logit and the layer terms."""
    from fake_device import FakeDeviceModel

    teacher = FakeDeviceModel(tiny_bert(layers=2))
    tr = DistilTrainer(model=tiny_bert(layers=1), teacher_model=teacher, train_dataset=_ds_with(),
                       args=_args(tmp_path, max_steps=2, alpha_patient=1.0, alpha_hidden=1.0,
                                  layer_map=[[1, 2]], logging_steps=1),
                       data_collator=DistilCollator(pad_token_id=0))
    tr.train()
    assert teacher.calls == 2
    assert {"loss_kd", "loss_patient", "loss_hidden"} <= set(tr.state.log_history[0])
