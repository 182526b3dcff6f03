"""DistilTrainer on tiny models: learning, accumulation invariance, resume, teachers."""
import os

import pytest
import torch
from datasets import Dataset

from conftest import tiny_bert, tiny_sentences, tiny_tokenizer
from distilkit import DistilConfig, DistilTrainer, student_from_teacher
from distilkit.collate import DistilCollator


def _ds(n=64, vocab=120, seq=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (n, seq), generator=g)
    labels = (ids[:, 1] > vocab // 2).long()
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * seq] * n,
                              "labels": labels.tolist()})


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=4,
                report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                learning_rate=1e-3, seed=0, data_seed=0)
    base.update(kw)
    return DistilConfig(**base)


def _trained_params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_each_term_is_logged(tmp_path):
    t = tiny_bert(layers=4)
    s = student_from_teacher(t, num_layers=2)
    args = _args(tmp_path, alpha_kd=1, alpha_ce=1, alpha_mse=1, alpha_hidden=1, alpha_patient=1,
                 alpha_attention=1, alpha_cosine=1, logging_steps=2)
    tr = DistilTrainer(model=s, teacher_model=t, args=args, train_dataset=_ds())
    tr.train()
    logged = tr.state.log_history[0]
    for k in ("loss_kd", "loss_ce", "loss_mse", "loss_hidden", "loss_patient", "loss_attention", "loss_cosine"):
        assert k in logged and logged[k] >= 0, k
    # the teacher stays frozen and in eval mode
    assert all(not p.requires_grad for p in t.parameters()) and not t.training


def test_student_improves_on_a_learnable_task(tmp_path):
    from distilkit.metrics import accuracy_f1

    tok = tiny_tokenizer(str(tmp_path / "tok"))
    rows = tiny_sentences(192)
    enc = tok([r[0] for r in rows], truncation=True, max_length=16)
    ds = Dataset.from_dict({**enc, "labels": [r[1] for r in rows]})
    torch.manual_seed(0)
    teacher = tiny_bert(vocab=tok.vocab_size, layers=2)
    # a teacher that knows the task: train it briefly with plain CE through the same trainer
    DistilTrainer(model=teacher, teacher_model=tiny_bert(vocab=tok.vocab_size, layers=2),
                  args=_args(tmp_path, alpha_kd=0, alpha_ce=1, max_steps=60, per_device_train_batch_size=16),
                  train_dataset=ds, data_collator=DistilCollator(tok)).train()
    teacher.eval()
    student = tiny_bert(vocab=tok.vocab_size, layers=1, seed=3)
    batch = DistilCollator(tok)([ds[i] for i in range(len(ds))])

    def acc(m):
        m.eval()
        with torch.no_grad():
            logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return accuracy_f1(logits.argmax(-1), batch["labels"])["accuracy"]

    before = acc(student)
    tr = DistilTrainer(model=student, teacher_model=teacher,
                       args=_args(tmp_path, temperature=2.0, alpha_kd=0.5, alpha_ce=0.5, max_steps=60,
                                  per_device_train_batch_size=16),
                       train_dataset=ds, data_collator=DistilCollator(tok))
    tr.train()
    after = acc(student)
    assert acc(teacher) > 0.9
    assert after > before + 0.2 and after > 0.85, (before, after)


def _accumulated_alike(tmp_path, ds):
    """The weights of one student after a batch-8 step and after 8 accumulated batches of 1."""
    t = tiny_bert(layers=2)
    results = []
    for bs, acc in ((8, 1), (1, 8)):
        s = tiny_bert(layers=1, seed=5)
        s.config.hidden_dropout_prob = s.config.attention_probs_dropout_prob = 0
        for m in s.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        args = _args(tmp_path, per_device_train_batch_size=bs, gradient_accumulation_steps=acc,
                     max_steps=1, alpha_kd=0.7, alpha_ce=0.3, alpha_patient=2.0, layer_map=[[1, 2]],
                     learning_rate=1e-2, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0)
        DistilTrainer(model=s, teacher_model=t, args=args, train_dataset=ds).train()
        results.append(_trained_params(s))
    return results


def test_accumulation_equals_large_batch(tmp_path):
    big, accumulated = _accumulated_alike(tmp_path, _ds(8))
    assert torch.allclose(big, accumulated, atol=1e-6)


def test_accumulation_equals_large_batch_with_label_less_rows(tmp_path):
    """Augmented rows (labels -100) count for the soft-target and layer terms but not for the
    cross-entropy, which averages over the labelled rows: each term is weighted by its own
    items, so accumulating batches of 1 equals one batch of 8."""
    ds = _ds(8)
    labels = list(ds["labels"])
    for i in (1, 4, 5):
        labels[i] = -100
    big, accumulated = _accumulated_alike(tmp_path, ds.remove_columns("labels").add_column("labels", labels))
    assert torch.allclose(big, accumulated, atol=1e-6)


def test_transfer_set_without_labels_uses_soft_targets_only(tmp_path):
    t = tiny_bert(layers=2)
    ds = _ds(16).remove_columns(["labels"])
    s = tiny_bert(layers=1, seed=1)
    before = _trained_params(s).clone()
    tr = DistilTrainer(model=s, teacher_model=t, args=_args(tmp_path, logging_steps=1), train_dataset=ds)
    tr.train()
    assert "loss_kd" in tr.state.log_history[0] and "loss_ce" not in tr.state.log_history[0]
    assert not torch.equal(before, _trained_params(s))


def test_ensemble_of_teachers(tmp_path):
    teachers = [tiny_bert(layers=2, seed=1), tiny_bert(layers=2, seed=2)]
    s = tiny_bert(layers=1)
    tr = DistilTrainer(model=s, teacher_model=teachers, args=_args(tmp_path, ensemble_weights=[1, 2]),
                       train_dataset=_ds())
    tr.train()
    assert len(tr.teachers) == 2


def _with_cached(ds, teachers, column="teacher_logits"):
    """``ds`` plus the teachers' logits as a cache column: ``(C)`` for one teacher, ``(K, C)``
    for ``teacher_ensemble_logits``."""
    ids, mask = torch.tensor(ds["input_ids"]), torch.tensor(ds["attention_mask"])
    with torch.no_grad():
        logits = [t(input_ids=ids, attention_mask=mask).logits for t in teachers]
    value = torch.stack(logits, 1) if column == "teacher_ensemble_logits" else logits[0]
    return ds.add_column(column, value.tolist())


def _trained_alike(tmp_path, runs, **args):
    """The final weights of identical students, one trained per ``(trainer kwargs, data)``."""
    out = []
    for kw, d in runs:
        s = tiny_bert(layers=1, seed=4)
        DistilTrainer(model=s, args=_args(tmp_path, max_steps=2, **args), train_dataset=d,
                      data_collator=DistilCollator(pad_token_id=0), **kw).train()
        out.append(_trained_params(s))
    return out


def test_cached_teacher_logits_replace_the_teacher(tmp_path):
    t, ds = tiny_bert(layers=2), _ds(16)
    live, cached = _trained_alike(tmp_path, [({"teacher_model": t}, ds),
                                             ({"teacher_config": t.config}, _with_cached(ds, [t]))])
    assert torch.allclose(live, cached, atol=1e-5)


def test_cached_ensemble_logits_replace_the_teachers(tmp_path):
    teachers, ds = [tiny_bert(layers=2, seed=1), tiny_bert(layers=2, seed=2)], _ds(16)
    ds_cached = _with_cached(ds, teachers, "teacher_ensemble_logits")
    live, cached = _trained_alike(
        tmp_path, [({"teacher_model": teachers}, ds), ({"teacher_config": teachers[0].config}, ds_cached)],
        ensemble_weights=[1, 3], alpha_mse=0.5)
    assert torch.allclose(live, cached, atol=1e-5)


def test_layer_losses_run_the_teacher_even_when_logits_are_cached(tmp_path):
    """Cached logits hold no per-token states: with alpha_hidden the teacher runs, and the
    run equals one without the cache; with no teacher to run it is a clear error, at init."""
    t, ds = tiny_bert(layers=2), _ds(16)
    ds_cached = _with_cached(ds, [t])
    kw = dict(alpha_hidden=1.0, layer_map=[[1, 2]])
    live, cached = _trained_alike(tmp_path, [({"teacher_model": t}, ds), ({"teacher_model": t}, ds_cached)], **kw)
    assert torch.allclose(live, cached, atol=1e-5)
    with pytest.raises(ValueError, match="teacher-output cache does not hold"):
        DistilTrainer(model=tiny_bert(layers=1), teacher_config=t.config, train_dataset=ds_cached,
                      args=_args(tmp_path, max_steps=2, **kw), data_collator=DistilCollator(pad_token_id=0))


def test_resume_from_checkpoint(tmp_path):
    t = tiny_bert(layers=2)
    args = _args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2, alpha_hidden=1.0)
    s_full = tiny_bert(layers=1, seed=7, hidden=16, heads=2, inter=32)
    DistilTrainer(model=s_full, teacher_model=t, args=args, train_dataset=_ds()).train()
    ckpt = os.path.join(args.output_dir, "checkpoint-2")
    assert os.path.isfile(os.path.join(ckpt, "distil_projections.safetensors"))
    s_res = tiny_bert(layers=1, seed=99, hidden=16, heads=2, inter=32)
    tr = DistilTrainer(model=s_res, teacher_model=t, args=args, train_dataset=_ds())
    tr.train(resume_from_checkpoint=ckpt)
    assert tr.state.global_step == 4
    assert torch.allclose(_trained_params(s_full), _trained_params(s_res), atol=1e-5)


def test_peft_student_and_adapter_teacher(tmp_path):
    from peft import LoraConfig, get_peft_model

    base = tiny_bert(layers=2)
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    adapter_model = get_peft_model(tiny_bert(layers=2), LoraConfig(r=2, target_modules=["query", "value"]))
    with torch.no_grad():
        for n, p in adapter_model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.1)
    adapter_model.save_pretrained(tmp_path / "adapter")
    student = get_peft_model(tiny_bert(layers=1), LoraConfig(r=2, target_modules=["query", "value"],
                                                             modules_to_save=["classifier"]))
    args = _args(tmp_path, teacher_model_name_or_path=str(base_dir), teacher_adapter=str(tmp_path / "adapter"))
    tr = DistilTrainer(model=student, args=args, train_dataset=_ds())
    tr.train()
    # the adapter was merged into the teacher: its query weights differ from the base's
    q = tr.teachers[0].bert.encoder.layer[0].attention.self.query.weight
    assert not torch.allclose(q, base.bert.encoder.layer[0].attention.self.query.weight)
    merged = student.merge_and_unload()
    assert not any("lora" in n for n, _ in merged.named_parameters())


@pytest.mark.parametrize("kw, match", [
    (dict(temperature=0), "temperature"),
    (dict(alpha_kd=-1), "alpha_kd"),
    (dict(alpha_kd=0, alpha_ce=0), "all loss weights are zero"),
    (dict(layer_map="middle"), "layer_map"),
])
def test_bad_config_values(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        _args(tmp_path, **kw)


def test_layer_map_out_of_range_and_label_mismatch(tmp_path):
    t = tiny_bert(layers=4)
    with pytest.raises(ValueError, match="teacher layer 9"):
        DistilTrainer(model=tiny_bert(layers=2), teacher_model=t,
                      args=_args(tmp_path, alpha_patient=1, layer_map=[[1, 9]]), train_dataset=_ds())
    with pytest.raises(ValueError, match="student layer 3"):
        DistilTrainer(model=tiny_bert(layers=2), teacher_model=t,
                      args=_args(tmp_path, alpha_hidden=1, layer_map=[[3, 1]]), train_dataset=_ds())
    with pytest.raises(ValueError, match="labels"):
        DistilTrainer(model=tiny_bert(layers=2, num_labels=3), teacher_model=t, args=_args(tmp_path),
                      train_dataset=_ds())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DistilTrainer(model=tiny_bert(layers=2), teacher_model=str(tmp_path / "nope"), args=_args(tmp_path))


def test_layer_strategies():
    from distilkit.config import resolve_layer_map

    assert resolve_layer_map("skip", 6, 12) == [(1, 2), (2, 4), (3, 6), (4, 8), (5, 10)]
    assert resolve_layer_map("last", 6, 12) == [(1, 7), (2, 8), (3, 9), (4, 10), (5, 11)]
    assert resolve_layer_map("skip", 3, 6) == [(1, 2), (2, 4)]
    # i * n_t // n_s spreads the pairs over the whole teacher, also when n_s does not divide
    # n_t (i * (n_t // n_s) would give (1, 1), (2, 2), (3, 3)).
    assert resolve_layer_map("skip", 4, 6) == [(1, 1), (2, 3), (3, 4)]
    assert resolve_layer_map("skip", 3, 8) == [(1, 2), (2, 5)]
    assert resolve_layer_map([[0, 0], [3, 6]], 3, 6) == [(0, 0), (3, 6)]


def test_student_from_teacher_copies_layers():
    t = tiny_bert(layers=4)
    s = student_from_teacher(t, keep_layers=[1, 3])
    assert s.config.num_hidden_layers == 2
    for si, ti in ((0, 1), (1, 3)):
        assert torch.equal(s.bert.encoder.layer[si].output.dense.weight, t.bert.encoder.layer[ti].output.dense.weight)
    assert torch.equal(s.bert.embeddings.word_embeddings.weight, t.bert.embeddings.word_embeddings.weight)
    assert torch.equal(s.classifier.weight, t.classifier.weight)
    with pytest.raises(ValueError, match="keep_layers"):
        student_from_teacher(t, keep_layers=[0, 4])
