"""Mixed precision on CPU: the teacher's ``teacher_dtype``, a bf16 student through the usual
``TrainingArguments`` flag, fp32 losses whatever the logits' dtype, and the teacher-output
cache keyed by the dtype the teacher computed in."""
import json
import os

import numpy as np
import pytest
import torch
from datasets import Dataset

from conftest import tiny_bert
from distilkit import DistilConfig, DistilTrainer, losses
from distilkit.shard_store import NAMESPACE_FILE
from distilkit.teacher_cache import attach_teacher_outputs


def _ds(n=32, vocab=120, seq=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (n, seq), generator=g)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * seq] * n,
                              "labels": (ids[:, 1] > vocab // 2).long().tolist()})


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=3,
                report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                learning_rate=1e-3, seed=0, logging_steps=1)
    return DistilConfig(**{**base, **kw})


def _dtypes(model):
    return {p.dtype for p in model.parameters()}


@pytest.mark.parametrize("bad", ["fp8", "bf16", "float64", 16])
def test_teacher_dtype_is_validated_in_one_line(tmp_path, bad):
    with pytest.raises(ValueError, match=r"^teacher_dtype: .* use one of float32, bfloat16, "
                                         r"float16") as e:
        _args(tmp_path, teacher_dtype=bad)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name,dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16),
                                        ("float32", torch.float32)])
def test_trainer_runs_the_teacher_in_teacher_dtype(tmp_path, name, dtype):
    tr = DistilTrainer(model=tiny_bert(), teacher_model=tiny_bert(seed=1),
                       args=_args(tmp_path, teacher_dtype=name), train_dataset=_ds())
    assert _dtypes(tr.teachers[0]) == {dtype}
    assert _dtypes(tr.model) == {torch.float32}  # the student is the Trainer's business


def test_teacher_dtype_none_keeps_the_teacher_as_loaded(tmp_path):
    teacher = tiny_bert(seed=1).to(torch.bfloat16)
    tr = DistilTrainer(model=tiny_bert(), teacher_model=teacher, args=_args(tmp_path),
                       train_dataset=_ds())
    assert _dtypes(tr.teachers[0]) == {torch.bfloat16}


def _spy_kd(monkeypatch):
    calls = []
    real = losses.soft_target_kl

    def spy(student_logits, teacher_logits, *a, **kw):
        out = real(student_logits, teacher_logits, *a, **kw)
        calls.append({"student": student_logits.dtype, "out": out.dtype})
        return out

    monkeypatch.setattr(losses, "soft_target_kl", spy)
    return calls


def test_bf16_student_with_bf16_teacher_trains_on_cpu_with_fp32_kd(tmp_path, monkeypatch):
    calls = _spy_kd(monkeypatch)
    student, teacher = tiny_bert(), tiny_bert(seed=1)
    before = [p.detach().clone() for p in student.parameters()]
    seen = {"student": [], "teacher": []}
    for name, m in (("student", student), ("teacher", teacher)):
        m.classifier.register_forward_hook(
            lambda mod, i, o, name=name: seen[name].append(o.dtype))
    tr = DistilTrainer(model=student, teacher_model=teacher,
                       args=_args(tmp_path, bf16=True, teacher_dtype="bfloat16",
                                  alpha_kd=1.0, alpha_ce=0.5), train_dataset=_ds())
    tr.train()
    logged = [h for h in tr.state.log_history if "loss" in h]
    assert len(logged) == 3
    for h in logged:
        for k in ("loss", "loss_kd", "loss_ce"):
            assert np.isfinite(h[k]) and h[k] > 0, (k, h)
    assert len(calls) == 3
    # Both forwards ran in bf16; the KD term is fp32 whatever the logits' dtype.
    assert all(c["out"] == torch.float32 for c in calls), calls
    assert set(seen["student"]) == {torch.bfloat16}, seen  # autocast: bf16 matmuls
    assert set(seen["teacher"]) == {torch.bfloat16}, seen  # a bf16 teacher
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, student.parameters()))


@pytest.mark.parametrize("fn,shapes", [
    (losses.hard_ce, None), (losses.logit_mse, [(8, 5), (8, 5)]),
    (losses.hidden_mse, [(4, 6, 16), (4, 6, 16)]), (losses.cosine_loss, [(4, 6, 16), (4, 6, 16)]),
    (losses.attention_loss, [(2, 4, 6, 6), (2, 4, 6, 6)]),
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_loss_is_fp32_and_equals_the_fp32_loss_of_half_inputs(fn, shapes, dtype):
    torch.manual_seed(0)
    if fn is losses.hard_ce:
        args = [torch.randn(8, 5).to(dtype), torch.randint(0, 5, (8,))]
        ref = [args[0].float(), args[1]]
    else:
        if fn is losses.attention_loss:
            args = [torch.softmax(torch.randn(s), -1).to(dtype) for s in shapes]
        else:
            args = [torch.randn(s).to(dtype) for s in shapes]
        ref = [a.float() for a in args]
    out = fn(*args)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, fn(*ref), rtol=1e-5, atol=1e-6)


def test_patient_loss_is_fp32_for_half_inputs():
    s = [torch.randn(4, 16).bfloat16() for _ in range(2)]
    t = [torch.randn(4, 16).bfloat16() for _ in range(2)]
    out = losses.patient_loss(s, t)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, losses.patient_loss([x.float() for x in s],
                                                        [x.float() for x in t]))


def _namespace_info(stats):
    with open(os.path.join(stats["namespace"], NAMESPACE_FILE)) as f:
        return json.load(f)


def test_cache_keys_outputs_by_the_teachers_compute_dtype(tmp_path):
    ds, teacher = _ds(), tiny_bert(seed=1)
    kw = dict(cache_dir=str(tmp_path / "cache"), progress=False, max_length=10)
    fp32, bf16, again = {}, {}, {}
    out32 = attach_teacher_outputs(ds, teacher, stats=fp32, **kw)
    out16 = attach_teacher_outputs(ds, teacher, stats=bf16, teacher_dtype="bfloat16", **kw)
    # A bf16 teacher's logits never hit the fp32 entry: a namespace of their own.
    assert bf16["hits"] == 0 and bf16["computed"] == len(ds)
    assert bf16["namespace"] != fp32["namespace"]
    assert (fp32["compute_dtype"], bf16["compute_dtype"]) == ("float32", "bfloat16")
    assert _namespace_info(fp32)["compute_dtype"] == "float32"
    assert _namespace_info(bf16)["compute_dtype"] == "bfloat16"
    # Stored and attached as float32; the bf16 values really are the bf16 teacher's.
    assert str(out16.features["teacher_logits"].feature.dtype) == "float32"
    a32, a16 = (np.asarray(o["teacher_logits"], dtype=np.float32) for o in (out32, out16))
    assert not np.array_equal(a16, a32)
    np.testing.assert_allclose(a16, a32, atol=0.05)
    with torch.no_grad():
        ids = torch.tensor(ds["input_ids"][:4])
        want = tiny_bert(seed=1).bfloat16()(input_ids=ids, attention_mask=torch.ones_like(ids))
    np.testing.assert_allclose(a16[:4], want.logits.float().numpy(), rtol=1e-6, atol=1e-6)
    # The caller's fp32 teacher was cast as a copy, not in place; a rerun hits.
    assert _dtypes(teacher) == {torch.float32}
    attach_teacher_outputs(ds, teacher, stats=again, teacher_dtype="bfloat16", **kw)
    assert again["hits"] == len(ds) and again["namespace"] == bf16["namespace"]


def test_cache_of_a_bf16_model_object_is_keyed_bf16_without_teacher_dtype(tmp_path):
    stats = {}
    attach_teacher_outputs(_ds(), tiny_bert(seed=1).bfloat16(), stats=stats, progress=False,
                           cache_dir=str(tmp_path / "cache"))
    assert stats["compute_dtype"] == "bfloat16"


def test_cache_rejects_a_bad_teacher_dtype_in_one_line(tmp_path):
    with pytest.raises(ValueError, match="^teacher_dtype: 'half' is not a teacher dtype"):
        attach_teacher_outputs(_ds(), tiny_bert(), teacher_dtype="half", progress=False,
                               cache_dir=str(tmp_path / "cache"))
