"""Top-k token-level teacher cache (#17 item 1): the (k+1)-way KD loss against the full one,
the cache's round trip and corruption handling, the trainer reading it, and the recipe."""
import copy
import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import ForbiddenTeacher, tiny_bart, tiny_t5
from distilkit import losses as L
from distilkit.config import DistilConfig
from distilkit.loss_terms import TOPK_COLUMNS
from distilkit.seq2seq.data import Seq2SeqCollator
from distilkit.seq2seq.topk_cache import (SHARD_FILE, attach_topk, bytes_per_token,
                                          compute_topk)
from distilkit.shard_store import SHARD_FILE as STORE_SHARD_FILE
from distilkit.trainer import DistilTrainer

T = 2.0


def _logits(shape, seed, scale=3.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _topk_loss(s, t, k, temperature=T, mask=None, **kw):
    return L.topk_soft_target_kl(s, *L.topk_soft_targets(t, k, temperature), temperature,
                                 mask, **kw)


# ------------------------------------------------------------------ the loss
def test_topk_kd_equals_full_kd_when_k_is_the_vocabulary():
    s, t = _logits((3, 5, 40), 0), _logits((3, 5, 40), 1)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[0, 3:] = False
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    full = L.soft_target_kl(s1, t, T, mask)
    top = _topk_loss(s2, t, 40, mask=mask)
    assert float(top) == pytest.approx(float(full), rel=1e-5, abs=1e-6)
    full.backward()
    top.backward()
    assert torch.allclose(s1.grad, s2.grad, atol=1e-6)
    # The teacher's tail is exactly 0 when every token is kept.
    assert float(L.topk_soft_targets(t, 40, T)[2].abs().max()) == 0.0


def test_topk_kd_is_zero_when_the_student_is_the_teacher():
    t = _logits((4, 30), 2)
    for k in (1, 5, 30):
        assert abs(float(_topk_loss(t, t, k))) < 1e-5


def _per_position(s, t, k):
    """Full KD, top-k KD, the exact gap and both stated bounds, per position (flattened)."""
    s, t = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
    V = s.shape[-1]
    full = torch.stack([L.soft_target_kl(s[i:i + 1], t[i:i + 1], T) for i in range(len(s))])
    top = torch.stack([_topk_loss(s[i:i + 1], t[i:i + 1], k) for i in range(len(s))])
    p, q = F.softmax(t / T, -1), F.softmax(s / T, -1)
    _, ids, r = L.topk_soft_targets(t, k, T)
    out = torch.ones_like(p, dtype=torch.bool).scatter(-1, ids, False)  # the tail tokens
    p_tail, q_tail = (p * out).sum(-1), (q * out).sum(-1)
    pt, qt = torch.where(out, p, 0) / p_tail[:, None], torch.where(out, q, 0) / q_tail[:, None]
    kl_tail = torch.where(out, torch.xlogy(pt, pt) - pt * torch.log(qt.clamp_min(1e-38)), 0).sum(-1)
    q_min = torch.where(out, q, torch.inf).min(-1).values
    bound = T ** 2 * r * torch.log(q_tail / q_min)
    loose = T ** 2 * r * (np.log(V - k) + (s.max(-1).values - s.min(-1).values) / T)
    return full, top, T ** 2 * r * kl_tail, bound, loose, r


@pytest.mark.parametrize("k", [1, 4, 16, 64])
def test_topk_gap_to_full_kd_is_the_tail_kl_within_the_stated_bound(k):
    """On a tiny T5 teacher's and a different student's real decoder logits: 0 <= full - top-k
    = T^2 r KL(tail || tail) <= T^2 r log(q_r / min q_tail) <= T^2 r (log(V-k) + range/T)."""
    teacher, student = tiny_t5(seed=2), tiny_t5(seed=1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(5, 120, (3, 8), generator=g), torch.randint(5, 120, (3, 6), generator=g)
    with torch.no_grad():
        t = teacher(input_ids=x, labels=y).logits
        s = student(input_ids=x, labels=y).logits
    full, top, gap, bound, loose, r = _per_position(s, t, k)
    diff = full - top
    assert (diff >= -1e-5).all()
    assert torch.allclose(diff, gap, atol=1e-4, rtol=1e-3)
    assert (diff <= bound + 1e-4).all() and (bound <= loose + 1e-4).all()
    assert float(r.min()) > 0  # a real cut: the bound is not vacuous here
    # The batch mean obeys the mean of the bounds.
    mean_gap = float(L.soft_target_kl(s, t, T) - _topk_loss(s, t, k))
    assert -1e-5 <= mean_gap <= float(bound.mean()) + 1e-4


def test_topk_gap_shrinks_with_k():
    s, t = _logits((6, 50), 3), _logits((6, 50), 4)
    full = float(L.soft_target_kl(s, t, T))
    gaps = [full - float(_topk_loss(s, t, k)) for k in (1, 4, 16, 49, 50)]
    assert all(a >= b - 1e-6 for a, b in zip(gaps, gaps[1:])) and abs(gaps[-1]) < 1e-5


@pytest.mark.parametrize("k", [1, 8, 40])
def test_topk_gradients_are_finite(k):
    s = (_logits((2, 4, 40), 5, scale=200.0)).requires_grad_()  # extreme logits
    t = _logits((2, 4, 40), 6, scale=200.0)
    loss = _topk_loss(s, t, k)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    # Gradient per logit: T (q_i - p_i) in the top-k, T q_j (1 - r / q_r) outside (x 1/N).
    s2 = _logits((1, 40), 7).requires_grad_()
    t2 = _logits((1, 40), 8)
    _topk_loss(s2, t2, k).backward()
    lp, ids, r = L.topk_soft_targets(t2, k, T)
    q = F.softmax(s2.detach() / T, -1)
    inside = torch.zeros(1, 40, dtype=torch.bool).scatter(-1, ids, True)
    q_r = (q * ~inside).sum(-1, keepdim=True)
    want = torch.where(inside, q - torch.zeros_like(q).scatter(-1, ids, lp.exp()),
                       q * (1 - r[:, None] / q_r.clamp_min(1e-38)))
    if k == 40:
        want = q - F.softmax(t2 / T, -1)
    assert torch.allclose(s2.grad, T * want, atol=1e-5)


def test_topk_padding_positions_are_ignored():
    s, t = _logits((2, 5, 30), 9), _logits((2, 5, 30), 10)
    labels = torch.randint(0, 30, (2, 5))
    labels[0, 3:] = -100
    mask = labels != -100
    lp, ids, r = L.topk_soft_targets(t, 6, T)
    ref = L.topk_soft_target_kl(s, lp, ids, r, T, mask)
    s2, lp2, ids2, r2 = s.clone(), lp.clone(), ids.clone(), r.clone()
    s2[0, 3:] = _logits((2, 30), 11, scale=80.0)  # garbage where labels are -100
    lp2[0, 3:], ids2[0, 3:], r2[0, 3:] = 0.0, 0, 0.0  # what the collator pads with
    assert torch.allclose(L.topk_soft_target_kl(s2, lp2, ids2, r2, T, mask), ref)
    per = [L.topk_soft_target_kl(s[i, mask[i]], lp[i, mask[i]], ids[i, mask[i]], r[i, mask[i]], T)
           * mask[i].sum() for i in range(2)]
    assert torch.allclose(ref, sum(per) / mask.sum(), atol=1e-6)


def test_topk_loss_refuses_bad_shapes_and_temperature():
    s, t = _logits((2, 3, 20), 0), _logits((2, 3, 20), 1)
    lp, ids, r = L.topk_soft_targets(t, 4, T)
    with pytest.raises(ValueError, match="do not match the student's logits"):
        L.topk_soft_target_kl(s[:, :2], lp, ids, r, T)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        L.topk_soft_target_kl(s, lp, ids, r, 0.0)
    with pytest.raises(ValueError, match="top_k: 21 must be between 1 and the vocabulary size 20"):
        L.topk_soft_targets(t, 21, T)


# ------------------------------------------------------------------ the cache
def _s2s_dataset(n=7, vocab=120, seed=0):
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    for i in range(n):
        src, tgt = 4 + i % 5, 2 + (i * 3) % 6
        rows["input_ids"].append(torch.randint(5, vocab, (src,), generator=g).tolist())
        rows["attention_mask"].append([1] * src)
        rows["labels"].append(torch.randint(5, vocab, (tgt,), generator=g).tolist())
    return Dataset.from_dict(rows)


def _columns(ds):
    return [[np.asarray(x) for x in ds[TOPK_COLUMNS[a]]] for a in ("log_probs", "ids", "tail")]


def test_cache_holds_the_teachers_topk_on_each_target_token(tmp_path):
    teacher = tiny_bart(seed=3)
    ds = _s2s_dataset()
    stats = {}
    out = attach_topk(ds, teacher, top_k=8, temperature=T, cache_dir=str(tmp_path), stats=stats,
                      progress=False)
    assert stats["computed"] == len(ds) and stats["hits"] == 0 and not stats["teacher_loaded"]
    assert stats["bytes_per_token"] == bytes_per_token(8) == 8 * 2 + 8 * 4 + 4
    assert stats["tokens"] == sum(len(x) for x in ds["labels"])
    lp, ids, tail = _columns(out)
    for i in range(len(ds)):  # each example alone, unpadded, teacher-forced on its labels
        y = torch.tensor([ds[i]["labels"]])
        with torch.no_grad():
            z = teacher(input_ids=torch.tensor([ds[i]["input_ids"]]), labels=y).logits[0]
        want = L.topk_soft_targets(z, 8, T)
        assert lp[i].dtype == np.float32 or lp[i].dtype == np.float16
        assert lp[i].shape == (y.shape[1], 8) and tail[i].shape == (y.shape[1],)
        assert np.array_equal(ids[i], want[1].numpy())
        assert np.allclose(lp[i], want[0].numpy(), atol=2e-2, rtol=1e-3)  # fp16 storage
        assert np.allclose(tail[i], want[2].numpy(), rtol=1e-5, atol=1e-7)


def test_cache_round_trips_and_keys(tmp_path):
    teacher_dir = tmp_path / "teacher"
    tiny_t5(seed=4).save_pretrained(teacher_dir)
    ds = _s2s_dataset()
    loads = []

    def loader(p):
        loads.append(p)
        from transformers import AutoModelForSeq2SeqLM
        return AutoModelForSeq2SeqLM.from_pretrained(p).eval()

    kw = dict(top_k=16, temperature=T, cache_dir=str(tmp_path / "c"), teacher_loader=loader,
              progress=False)
    first, again = {}, {}
    a = attach_topk(ds, str(teacher_dir), stats=first, **kw)
    b = attach_topk(ds, str(teacher_dir), stats=again, **kw)
    assert first["teacher_loaded"] and first["computed"] == len(ds)
    assert again["hits"] == len(ds) and again["computed"] == 0 and not again["teacher_loaded"]
    assert len(loads) == 1
    for x, y in zip(_columns(a), _columns(b)):
        assert all(np.array_equal(u, v) for u, v in zip(x, y))
    # Reordered rows hit; an edited example misses alone.
    rev = attach_topk(ds.select(range(len(ds) - 1, -1, -1)), str(teacher_dir), stats=(s := {}), **kw)
    assert s["computed"] == 0
    assert np.array_equal(_columns(rev)[1][0], _columns(a)[1][-1])
    edited = ds.map(lambda r, i: {"labels": r["labels"][:-1] + [7]} if i == 2 else r, with_indices=True)
    attach_topk(edited, str(teacher_dir), stats=(s := {}), **kw)
    assert s["computed"] == 1
    # Temperature and k are part of the key: the tail mass depends on them.
    attach_topk(ds, str(teacher_dir), stats=(s := {}), **{**kw, "temperature": 1.0})
    assert s["computed"] == len(ds)
    attach_topk(ds, str(teacher_dir), stats=(s := {}), **{**kw, "top_k": 8})
    assert s["computed"] == len(ds)


def test_a_damaged_shard_is_discarded_and_recomputed(tmp_path):
    teacher = tiny_t5(seed=5)
    ds = _s2s_dataset()
    kw = dict(top_k=8, temperature=T, cache_dir=str(tmp_path), progress=False)
    good = attach_topk(ds, teacher, stats=(first := {}), **kw)
    shard = next(os.path.join(r, f) for r, _, fs in os.walk(first["namespace"])
                 for f in fs if f == SHARD_FILE == STORE_SHARD_FILE)
    data = bytearray(open(shard, "rb").read())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the stored arrays
    open(shard, "wb").write(bytes(data))
    with pytest.warns(RuntimeWarning, match="damaged shard"):
        healed = attach_topk(ds, teacher, stats=(s := {}), **kw)
    assert s["computed"] == len(ds) and s["hits"] == 0
    for x, y in zip(_columns(good), _columns(healed)):
        assert all(np.array_equal(u, v) for u, v in zip(x, y))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attach_topk(ds, teacher, stats=(s := {}), **kw)  # the rewritten shard is sound
    assert s["hits"] == len(ds)


def test_cache_refuses_bad_settings(tmp_path):
    ds = _s2s_dataset()
    with pytest.raises(ValueError, match="more than the teacher's vocabulary"):
        attach_topk(ds, tiny_t5(), top_k=121, temperature=T, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="top_k: 0 must be a whole number >= 1"):
        attach_topk(ds, tiny_t5(), top_k=0, temperature=T, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="needs a tokenized seq2seq dataset"):
        attach_topk(ds.remove_columns("labels"), tiny_t5(), top_k=4, temperature=T,
                    cache_dir=str(tmp_path))


def test_values_do_not_depend_on_batching(tmp_path):
    teacher = tiny_t5(seed=6)
    ds = _s2s_dataset(n=9)
    one = compute_topk(teacher, ds, 8, T, batch_size=1)
    many = compute_topk(teacher, ds, 8, T, batch_size=4)
    for a, b in zip(one, many):
        assert np.array_equal(a["ids"], b["ids"])
        assert np.allclose(a["log_probs"].astype(np.float32), b["log_probs"].astype(np.float32),
                           atol=2e-3)
        assert np.allclose(a["tail"], b["tail"], rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------ the trainer


def _no_dropout(model):
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model.train()


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), report_to=[], save_strategy="no",
                per_device_train_batch_size=4, max_steps=2, learning_rate=1e-3,
                logging_steps=1, disable_tqdm=True, use_cpu=True, temperature=T)
    base.update(kw)
    return DistilConfig(**base)


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_trainer_reads_the_cache_instead_of_the_teacher(family, tmp_path):
    make = {"t5": tiny_t5, "bart": tiny_bart}[family]
    teacher, student = make(seed=2), _no_dropout(make(seed=1))
    ds = _s2s_dataset(n=5)
    collate = Seq2SeqCollator(pad_token_id=student.config.pad_token_id)
    plain = collate([ds[i] for i in range(5)])
    args = _args(tmp_path, alpha_kd=1.0, alpha_ce=0.5)
    live_tr = DistilTrainer(model=student, teacher_model=teacher, train_dataset=ds, args=args)
    live = float(live_tr.compute_loss(student, dict(plain)))
    for k, tol in ((120, 2e-4), (16, None)):
        cached_ds = attach_topk(ds, teacher, top_k=k, temperature=T, cache_dir=str(tmp_path),
                                progress=False)
        batch = collate([cached_ds[i] for i in range(5)])
        assert batch[TOPK_COLUMNS["ids"]].shape == (*plain["labels"].shape, k)
        forbidden = ForbiddenTeacher(teacher.config, "its top-k outputs are cached")
        tr = DistilTrainer(model=student, teacher_model=forbidden,
                           train_dataset=cached_ds, args=args)
        got = tr.compute_loss(student, dict(batch))
        assert torch.isfinite(got)
        if tol:  # k = vocabulary: the live loss, to fp16 storage precision
            assert float(got) == pytest.approx(live, rel=tol)
        else:  # a real cut lowers the KL (the tail gap >= 0), never the CE
            assert float(got) <= live + 1e-4
        # No teacher at all: the cache serves the KD term, CE reads the labels.
        DistilTrainer(model=student, teacher_model=None, teacher_config=teacher.config,
                      train_dataset=cached_ds, args=args)
    # A term the top-k cache cannot serve (logit MSE) runs the live teacher, or says why not.
    with pytest.raises(ValueError, match="alpha_mse reads the teacher's logits"):
        DistilTrainer(model=student, teacher_model=None, teacher_config=teacher.config,
                      train_dataset=cached_ds, args=_args(tmp_path, alpha_kd=1.0, alpha_mse=1.0))
    mixed = DistilTrainer(model=student, teacher_model=teacher, train_dataset=cached_ds,
                          args=_args(tmp_path, alpha_kd=1.0, alpha_ce=0.5, alpha_mse=1.0))
    both = float(mixed.compute_loss(student, dict(batch)))
    assert both == pytest.approx(float(DistilTrainer(
        model=student, teacher_model=teacher, train_dataset=ds,
        args=_args(tmp_path, alpha_kd=1.0, alpha_ce=0.5, alpha_mse=1.0)).compute_loss(
            student, dict(plain))), rel=1e-5)


def test_student_trains_from_the_cache_without_a_teacher(tmp_path):
    teacher, student = tiny_t5(seed=2), tiny_t5(seed=1)
    ds = attach_topk(_s2s_dataset(n=8), teacher, top_k=8, temperature=T,
                     cache_dir=str(tmp_path), progress=False)
    tr = DistilTrainer(model=student, teacher_model=None, teacher_config=teacher.config,
                       train_dataset=ds, data_collator=Seq2SeqCollator(pad_token_id=0),
                       args=_args(tmp_path, alpha_kd=1.0, alpha_ce=0.5, max_steps=3))
    before = copy.deepcopy(student.state_dict())
    tr.train()
    logs = [h for h in tr.state.log_history if "loss_kd" in h]
    assert len(logs) == 3 and all(np.isfinite(h["loss_kd"]) for h in logs)
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())


# ------------------------------------------------------------------ the recipe
S2S = {"task": "seq2seq", "teacher": "builtin:truecase-bart", "dataset": "builtin:truecase",
       "text_column": "source", "label_column": "target"}


@pytest.mark.parametrize("value, message", [
    ({"top_k": 0}, r"teacher_cache\.top_k: 0 must be a whole number >= 1"),
    ({"top_k": "many"}, r"teacher_cache\.top_k: 'many' must be a whole number"),
    ({"top_k": 2.5}, r"teacher_cache\.top_k: 2\.5 must be a whole number"),
    ({"topk": 64}, r"teacher_cache: \{'topk': 64\} must be a mapping with one key, top_k"),
    (True, r"teacher_cache: true applies to task: classification .* \{top_k: 64\}"),
    ("perhaps", r"teacher_cache: 'perhaps' must be true or false"),
])
def test_recipe_refuses_a_bad_top_k(value, message):
    from distilkit.recipe import Recipe

    with pytest.raises(ValueError, match=message):
        Recipe.from_dict({**S2S, "teacher_cache": value})


def test_recipe_top_k_field():
    from distilkit.recipe import Recipe

    assert Recipe.from_dict({**S2S, "teacher_cache": {"top_k": "64"}}).keys.teacher_cache == {"top_k": 64}
    assert Recipe.from_dict({**S2S, "teacher_cache": False}).keys.teacher_cache is False
    assert Recipe.from_dict({"teacher_cache": "yes"}).keys.teacher_cache is True
    with pytest.raises(ValueError, match=r"top_k is the token-level cache of task: seq2seq; a "
                                         r"classification recipe caches the full logits with "
                                         r"teacher_cache: true"):
        Recipe.from_dict({"teacher_cache": {"top_k": 64}})


def test_seq2seq_recipe_with_the_topk_cache(tmp_path, capsys):
    """A seq2seq recipe with sequence-level KD and teacher_cache {top_k}: the cache is built on
    the teacher's generations, the trainer never runs the teacher, bytes per cached token are
    in results.json and the printed summary; a second run reads every example from the cache.
    with everything cached, the second run never loads the teacher. alpha_kd 0 with a top-k
    cache is refused before any work."""
    from distilkit.pipeline import run_recipe
    from distilkit.recipe import Recipe
    from distilkit.seq2seq.tokenizer import TokenizerSettings, build_tokenizer
    from test_seq2seq import SENTENCES, _truecase_files

    tok = build_tokenizer(SENTENCES, TokenizerSettings(vocab_size=300, min_frequency=1))
    teacher_dir = tmp_path / "teacher"
    tiny_t5(seed=5, vocab=len(tok)).save_pretrained(teacher_dir)
    tok.save_pretrained(teacher_dir)
    raw = {"name": "s2s-topk", "task": "seq2seq", "teacher": str(teacher_dir),
           "student": {"type": "from_teacher", "num_decoder_layers": 1}, "dataset": None,
           "data_files": _truecase_files(tmp_path), "text_column": "src", "label_column": "tgt",
           "max_length": 24, "sequence_kd": {"max_new_tokens": 5},
           "generation": {"max_new_tokens": 5}, "teacher_cache": {"top_k": 8},
           "cache_dir": str(tmp_path / "cache"), "output_dir": str(tmp_path / "run"),
           "alpha_kd": 0.5, "alpha_ce": 0.5, "logging_steps": 1, "max_steps": 2,
           "per_device_train_batch_size": 4, "use_cpu": True}
    import distilkit.trainer as trainer_mod
    runs = []
    orig = trainer_mod.DistilTrainer._teacher_side

    def spy(self, step, *a, **kw):
        orig(self, step, *a, **kw)
        runs.append(step.teacher_topk is not None and not self.teachers)
    trainer_mod.DistilTrainer._teacher_side = spy
    try:
        res = run_recipe(Recipe.from_dict(raw), progress=False)
    finally:
        trainer_mod.DistilTrainer._teacher_side = orig
    assert runs and all(runs)  # every step read the cache, with no teacher in the trainer
    info = res["topk_cache"]
    assert info["top_k"] == 8 and info["bytes_per_token"] == 52 and info["temperature"] == T
    assert info["computed"] == len(SENTENCES) and info["namespace"].startswith(str(tmp_path / "cache"))
    # The targets it was computed on are the teacher's generations (sequence_kd), <= 5 tokens.
    assert info["tokens"] <= 5 * len(SENTENCES)
    assert "52 bytes per cached token" in capsys.readouterr().out
    assert "loss_kd" in res["train_log"][-1]
    again = run_recipe(Recipe.from_dict({**raw, "output_dir": str(tmp_path / "run2")}),
                       progress=False)
    assert again["topk_cache"]["hits"] == len(SENTENCES) and again["topk_cache"]["computed"] == 0
    # Generations, top-k distributions and the teacher's figures all cached: never loaded.
    assert res["teacher_loaded"] and not again["teacher_loaded"]
    assert again["teacher"]["figures_source"].startswith("cached")
    assert again["teacher"]["bleu"] == res["teacher"]["bleu"]
    assert again["student"]["bleu"] == pytest.approx(res["student"]["bleu"])
    with pytest.raises(ValueError, match="alpha_kd is 0; set alpha_kd > 0 or remove teacher_cache"):
        run_recipe(Recipe.from_dict({**raw, "alpha_kd": 0.0, "output_dir": str(tmp_path / "r3")}),
                   progress=False)
    assert not os.path.exists(tmp_path / "r3")
