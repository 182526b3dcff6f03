"""Seq2seq distillation and compression on tiny T5, BART and Marian configs (offline)."""
import copy
import math
import os
import warnings

import pytest
import torch
from torch import nn

from conftest import ForbiddenTeacher, tiny_bart, tiny_marian, tiny_t5
from distilkit import losses as L
from distilkit.config import DistilConfig
from distilkit.seq2seq.data import (Seq2SeqCollator, strip_case_and_punct, tokenize_seq2seq)
from distilkit.seq2seq.generate_eval import (GenerationSettings, compute_metrics_for_generate,
                                             evaluate_generation, generate_texts, score_texts)
from distilkit.seq2seq.sequence_kd import (SHARD_FILE, SequenceKDSettings, sequence_kd_dataset,
                                           sequence_kd_settings, teacher_generations)
from distilkit.seq2seq.tokenizer import TokenizerSettings, build_tokenizer
from distilkit.students.init import student_from_teacher
from distilkit.trainer import DistilTrainer

FAMILIES = {"t5": tiny_t5, "bart": tiny_bart, "marian": tiny_marian}
SENTENCES = [
    "Effective but too tepid biopic.",
    "If you sometimes like to go to the movies to have fun, Wasabi is a good place to start.",
    "Offers that rare combination of entertainment and education.",
    "Emerges as something rare, an issue movie that's so honest and keenly observed.",
    "Perhaps no picture ever made has more literally showed that the road to hell is paved.",
    "Steers turns in a snappy screenplay that curls at the edges.",
    "The Rock is destined to be the 21st Century's new Conan.",
    "A thoughtful, provocative, insistently humanizing film.",
]


def _no_dropout(model: nn.Module) -> nn.Module:
    """Training mode (the trainer's distillation path) without randomness."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        for attr in ("dropout", "activation_dropout", "attention_dropout"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)
    return model.train()


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), report_to=[], save_strategy="no",
                per_device_train_batch_size=4, max_steps=2, learning_rate=1e-3,
                logging_steps=1, disable_tqdm=True, use_cpu=True)
    base.update(kw)
    return DistilConfig(**base)


def _s2s_batch(vocab=120, batch=3, src=9, tgt=7, seed=0, pad_id=0):
    """Random ids with a padded source row and labels padded with -100 in two rows."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, src), generator=g)
    mask = torch.ones_like(ids)
    ids[0, src - 3:], mask[0, src - 3:] = pad_id, 0
    labels = torch.randint(5, vocab, (batch, tgt), generator=g)
    labels[1, tgt - 3:] = -100
    labels[2, tgt - 1:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(SENTENCES + [strip_case_and_punct(s) for s in SENTENCES],
                           TokenizerSettings(vocab_size=300, min_frequency=1))


# ------------------------------------------------------------------ students from teachers
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_student_keeps_copied_weights(family):
    teacher = FAMILIES[family]()
    student = student_from_teacher(teacher, num_layers=1, keep_decoder_layers=[1])
    assert student.config.distilkit_init == {"encoder": [1], "decoder": [1]}
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    stacks = {"encoder": ("encoder.block." if family == "t5" else "model.encoder.layers."),
              "decoder": ("decoder.block." if family == "t5" else "model.decoder.layers.")}
    n_layer_tensors = 0
    for key, value in s_sd.items():
        src = key
        for prefix in stacks.values():
            if key.startswith(prefix + "0."):
                src = prefix + "1." + key[len(prefix) + 2:]
                if src not in t_sd:  # T5's relative bias lives only in layer 0
                    src = key
                n_layer_tensors += 1
        assert torch.equal(value, t_sd[src]), key
    assert n_layer_tensors > 0
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters())
    ids = torch.randint(5, 120, (2, 6))
    assert student.generate(ids, max_new_tokens=4).shape[0] == 2


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_student_with_all_layers_predicts_like_the_teacher(family):
    teacher = FAMILIES[family]()
    student = student_from_teacher(teacher, num_layers=2, num_decoder_layers=2).eval()
    b = _s2s_batch()
    with torch.no_grad():
        assert torch.allclose(student(**b).logits, teacher(**b).logits, atol=1e-6)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fresh_smaller_student_from_config(family):
    from distilkit.students.init import student_from_config
    teacher = FAMILIES[family]()
    depth = {"t5": {"num_decoder_layers": 1}, "bart": {"decoder_layers": 1},
             "marian": {"decoder_layers": 1}}[family]
    student = student_from_config(teacher, d_model=16, **depth)
    assert type(student) is type(teacher) and student.config.d_model == 16
    assert len(student.get_decoder().block if family == "t5" else student.get_decoder().layers) == 1
    assert student(**_s2s_batch()).logits.shape == (3, 7, 120)
    with pytest.raises(ValueError, match="unknown field"):
        student_from_config(teacher, decoder_depth=1)


# ------------------------------------------------------------------ token-level KD
IDENTITY_CASES = {  # weights -> the terms computed (each must be zero), tolerance
    "token_kd_and_hidden": (dict(alpha_kd=1.0, alpha_ce=0.0, temperature=3.0, alpha_hidden=1.0,
                                 layer_map=[[1, 1], [2, 2]], decoder_layer_map=[[1, 1], [2, 2]]),
                            {"kd", "hidden"}, 1e-5),
    "patient_both_stacks": (dict(alpha_kd=0.0, alpha_ce=0.0, alpha_patient=1.0,
                                 layer_map=[[1, 1]], decoder_layer_map=[[1, 1], [2, 2]]),
                            {"patient"}, 1e-6),
}


@pytest.mark.parametrize("case", sorted(IDENTITY_CASES))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_seq2seq_losses_are_zero_at_identity(family, case, tmp_path):
    """Token-level KD, hidden-state and Patient-KD losses on encoder and decoder layers are
    zero when the student is the teacher."""
    weights, terms, tol = IDENTITY_CASES[case]
    student = _no_dropout(FAMILIES[family]())
    teacher = copy.deepcopy(student).eval()
    tr = DistilTrainer(model=student, teacher_model=teacher, train_dataset=[],
                       args=_args(tmp_path, **weights))
    loss = tr.compute_loss(student, _s2s_batch(pad_id=student.config.pad_token_id))
    assert abs(float(loss.detach())) < tol
    assert set(tr._term_totals) == terms


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_token_kd_ignores_padding(family, tmp_path):
    """The KD term of a padded batch equals the token-weighted mean of each example's KD
    computed alone, without padding: padded label positions and padded inputs never count."""
    student = _no_dropout(FAMILIES[family](seed=1))
    teacher = FAMILIES[family](seed=2).eval()
    tr = DistilTrainer(model=student, teacher_model=teacher, train_dataset=[],
                       args=_args(tmp_path, alpha_kd=1.0, alpha_ce=0.0, temperature=2.0))
    b = _s2s_batch(pad_id=student.config.pad_token_id)
    batch_kd = float(tr.compute_loss(student, b))
    total, count = 0.0, 0
    for i in range(3):
        n_src = int(b["attention_mask"][i].sum())
        n_tgt = int((b["labels"][i] != -100).sum())
        one = {"input_ids": b["input_ids"][i:i + 1, :n_src],
               "attention_mask": b["attention_mask"][i:i + 1, :n_src],
               "labels": b["labels"][i:i + 1, :n_tgt]}
        total += float(tr.compute_loss(student, one)) * n_tgt
        count += n_tgt
    assert batch_kd == pytest.approx(total / count, rel=1e-4)


def _decoder_grad_norms(family, tmp_path, **maps):
    """Gradient norms reaching each decoder layer from the Patient-KD term alone."""
    student = _no_dropout(FAMILIES[family](seed=1))
    teacher = FAMILIES[family](seed=2).eval()
    tr = DistilTrainer(model=student, teacher_model=teacher, train_dataset=[],
                       args=_args(tmp_path, alpha_kd=0.0, alpha_ce=0.0, alpha_patient=1.0, **maps))
    loss = tr.compute_loss(student, _s2s_batch(pad_id=student.config.pad_token_id))
    assert float(loss) > 0
    loss.backward()
    layers = student.get_decoder().block if family == "t5" else student.get_decoder().layers
    return [sum(float(p.grad.norm()) for p in layer.parameters() if p.grad is not None)
            for layer in layers]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_decoder_patient_kd_trains_the_decoder_up_to_the_mapped_layer(family, tmp_path):
    # Decoder pair (1, 1): layer 1's output depends on decoder layer 0 (index 0) only.
    grads = _decoder_grad_norms(family, tmp_path, layer_map=None, decoder_layer_map=[[1, 1]])
    assert grads[0] > 0 and grads[1] == 0
    # Encoder pairs only: the decoder gets no gradient.
    grads = _decoder_grad_norms(family, tmp_path, layer_map=[[1, 1]])
    assert grads == [0, 0]


def test_soft_target_kl_mask_ignores_padded_positions():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    ref = L.soft_target_kl(s, t, 2.0, mask)
    s2 = s.clone()
    s2[0, 3:] = torch.randn(2, 11) * 50  # garbage where the mask is 0
    assert torch.allclose(L.soft_target_kl(s2, t, 2.0, mask), ref)
    assert torch.allclose(L.soft_target_kl(t, t, 2.0, mask), torch.tensor(0.0), atol=1e-6)
    per = [L.soft_target_kl(s[i, mask[i]], t[i, mask[i]], 2.0) * mask[i].sum() for i in range(2)]
    assert torch.allclose(ref, sum(per) / mask.sum(), atol=1e-6)


# ------------------------------------------------------------------ sequence-level KD
def test_sequence_kd_through_the_cache(tok, tmp_path):
    teacher = tiny_t5(seed=3, vocab=len(tok))
    sources = [strip_case_and_punct(s) for s in SENTENCES]
    from datasets import Dataset
    raw = Dataset.from_dict({"source": sources, "target": SENTENCES})
    settings = SequenceKDSettings(max_new_tokens=6, batch_size=3)
    stats = {}
    gens = teacher_generations(teacher, tok, sources, settings, cache_dir=str(tmp_path), stats=stats)
    assert stats["computed"] == len(set(sources)) and stats["hits"] == 0
    direct = generate_texts(teacher, tok, sources, settings.generation())
    assert [g["ids"] for g in gens] == direct.ids
    assert all(0 < len(g["ids"]) <= 6 for g in gens)

    stats2 = {}
    again = teacher_generations(teacher, tok, sources, settings, cache_dir=str(tmp_path), stats=stats2)
    assert again == gens and stats2["computed"] == 0 and stats2["hits"] == len(sources)
    # Another decoding setting or other teacher weights is another namespace: recomputed.
    stats3 = {}
    teacher_generations(teacher, tok, sources[:2], SequenceKDSettings(max_new_tokens=5),
                        cache_dir=str(tmp_path), stats=stats3)
    assert stats3["computed"] == 2
    # A damaged shard is discarded with a warning and its outputs decoded again.
    shard = next(os.path.join(r, f) for r, _, fs in os.walk(stats["namespace"])
                 for f in fs if f == SHARD_FILE)
    with open(shard, "a") as f:
        f.write("garbage\n")
    with pytest.warns(RuntimeWarning, match="damaged shard"):
        stats4 = {}
        healed = teacher_generations(teacher, tok, sources, settings, cache_dir=str(tmp_path), stats=stats4)
    assert healed == gens and stats4["computed"] == len(sources)

    ds = sequence_kd_dataset(teacher, tok, raw, settings, cache_dir=str(tmp_path))
    assert ds["labels"] == [g["ids"] for g in gens]
    both = sequence_kd_dataset(teacher, tok, raw, sequence_kd_settings(
        {"max_new_tokens": 6, "batch_size": 3, "include_references": True}), cache_dir=str(tmp_path))
    assert len(both) == 2 * len(raw)




def test_student_trains_on_teacher_generations(tok, tmp_path):
    teacher = tiny_t5(seed=3, vocab=len(tok))
    from datasets import Dataset
    raw = Dataset.from_dict({"source": [strip_case_and_punct(s) for s in SENTENCES]})
    ds = sequence_kd_dataset(teacher, tok, raw, SequenceKDSettings(max_new_tokens=6),
                             target_column=None, cache_dir=str(tmp_path))
    student = student_from_teacher(teacher, num_decoder_layers=1)
    collate = Seq2SeqCollator(pad_token_id=tok.pad_token_id)
    # Sequence-level KD alone: cross-entropy on the generations, the teacher is never run.
    tr = DistilTrainer(model=student, teacher_model=ForbiddenTeacher(teacher.config), train_dataset=ds,
                       data_collator=collate, args=_args(tmp_path, alpha_kd=0.0, alpha_ce=1.0))
    tr.train()
    assert any("loss_ce" in h for h in tr.state.log_history)
    # Seq-KD + word-KD: the teacher is forced on its own outputs for soft targets.
    tr = DistilTrainer(model=student, teacher_model=teacher, train_dataset=ds, data_collator=collate,
                       args=_args(tmp_path, alpha_kd=0.5, alpha_ce=0.5))
    tr.train()
    logged = [h for h in tr.state.log_history if "loss_kd" in h]
    assert logged and all(math.isfinite(h["loss_kd"]) for h in logged)


# ------------------------------------------------------------------ generation metrics
def test_generation_metrics_on_known_strings():
    refs = ["the cat sat on the warm red mat", "Hello, World."]
    m = score_texts(refs, refs)
    assert m == {"bleu": pytest.approx(100.0), "chrf": pytest.approx(100.0), "exact_match": 1.0, "n": 2}
    # One substituted word in eight: n-gram precisions 7/8, 6/7, 5/6, 4/5, no brevity penalty.
    one = score_texts(["the cat sat on the warm red rug"], ["the cat sat on the warm red mat"])
    assert one["bleu"] == pytest.approx(100 * 0.5 ** 0.25, abs=1e-6)
    assert one["exact_match"] == 0.0 and 0 < one["chrf"] < 100
    # Exact match normalises whitespace only: casing and punctuation count.
    em = score_texts(["Hello,  World.", "hello, world."], ["Hello, World.", "Hello, World."])
    assert em["exact_match"] == 0.5
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        score_texts(["a", "b"], ["a"])


def test_compute_metrics_for_generate_decodes_ids_and_ignores_label_padding(tok):
    from transformers import EvalPrediction
    texts = SENTENCES[:2]
    enc = tok(texts, padding=True)["input_ids"]
    labels = [[i if i != tok.pad_token_id else -100 for i in row] for row in enc]
    m = compute_metrics_for_generate(tok)(EvalPrediction(predictions=enc, label_ids=labels))
    assert m["exact_match"] == 1.0 and m["bleu"] == pytest.approx(100.0)


def test_evaluate_generation_scores_what_generate_texts_outputs(tok):
    from datasets import Dataset
    model = tiny_t5(seed=4, vocab=len(tok))
    settings = GenerationSettings(max_new_tokens=5, batch_size=3)
    ds = Dataset.from_dict({"source": SENTENCES[:5], "target": SENTENCES[:5]})
    out = evaluate_generation(model, tok, ds, settings=settings, latency_samples=2,
                              return_predictions=True)
    assert out["predictions"] == generate_texts(model, tok, SENTENCES[:5], settings).texts
    assert out["n"] == 5 and out["latency_ms"] > 0 and out["gen_ms_per_sentence"] > 0
    assert out["bleu"] == pytest.approx(score_texts(out["predictions"], SENTENCES[:5])["bleu"])


def test_task_text_and_tokenizer(tok):
    assert strip_case_and_punct("The Rock is destined to be the 21st Century's new ''Conan''.") == \
        "the rock is destined to be the 21st centurys new conan"
    assert strip_case_and_punct("co writer/director -- J.R.R. Tolkien") == "co writer director j r r tolkien"
    for s in SENTENCES:
        ids = tok(s)["input_ids"]
        assert ids[-1] == tok.eos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == s
    again = build_tokenizer(SENTENCES + [strip_case_and_punct(s) for s in SENTENCES],
                            TokenizerSettings(vocab_size=300, min_frequency=1))
    assert again.get_vocab() == tok.get_vocab()
    with pytest.raises(ValueError, match="vocab_size"):
        TokenizerSettings(vocab_size=10)


def test_word_windows_cover_the_text_with_overlap():
    from distilkit.seq2seq.data import word_windows
    words = [f"w{i}" for i in range(11)]
    wins = word_windows(" ".join(words), 4)
    assert wins == ["w0 w1 w2 w3", "w2 w3 w4 w5", "w4 w5 w6 w7", "w6 w7 w8 w9", "w7 w8 w9 w10"]
    assert word_windows("Short one.", 4) == ["Short one."]


def test_collator_pads_labels_with_ignore_index(tok):
    from datasets import Dataset
    ds = tokenize_seq2seq(Dataset.from_dict({"source": ["a b", "a b c d e"], "target": ["A b.", "A"]}), tok)
    b = Seq2SeqCollator(pad_token_id=tok.pad_token_id)([ds[0], ds[1]])
    assert b["input_ids"].shape == b["attention_mask"].shape
    assert (b["attention_mask"][0] == (b["input_ids"][0] != tok.pad_token_id)).all()
    n1 = len(ds[1]["labels"])
    assert (b["labels"][1, n1:] == -100).all() and (b["labels"][1, :n1] >= 0).all()


# ------------------------------------------------------------------ bad input
def test_different_vocabularies_need_sequence_level_kd(tmp_path):
    student, teacher = tiny_t5(vocab=120), tiny_t5(vocab=130)
    with pytest.raises(ValueError, match="sequence-level distillation"):
        DistilTrainer(model=student, teacher_model=teacher, train_dataset=[],
                      args=_args(tmp_path, alpha_kd=0.5, alpha_ce=0.5))
    # Label loss only (sequence-level KD) is allowed across vocabularies.
    DistilTrainer(model=student, teacher_model=teacher, train_dataset=[],
                  args=_args(tmp_path, alpha_kd=0.0, alpha_ce=1.0))


def test_decoder_layer_map_out_of_range(tmp_path):
    teacher = tiny_bart()
    student = student_from_teacher(teacher, num_decoder_layers=1)
    with pytest.raises(ValueError, match=r"decoder_layer_map: student layer 2 .* depth 0\.\.1"):
        DistilTrainer(model=student, teacher_model=teacher, train_dataset=[],
                      args=_args(tmp_path, alpha_hidden=1.0, decoder_layer_map=[[2, 2]]))
    with pytest.raises(ValueError, match=r"decoder_layer_map: teacher layer 5"):
        DistilTrainer(model=student, teacher_model=teacher, train_dataset=[],
                      args=_args(tmp_path, alpha_hidden=1.0, decoder_layer_map=[[1, 5]]))
    with pytest.raises(ValueError, match=r"keep_decoder_layers: \[3\] .* 0\.\.1"):
        student_from_teacher(teacher, keep_decoder_layers=[3])


def test_dataset_without_target_column(tok):
    from datasets import Dataset
    ds = Dataset.from_dict({"source": ["a b c"], "text": ["A b c."]})
    with pytest.raises(ValueError, match=r"target_column: column 'target' is not in split .*'source', 'text'"):
        tokenize_seq2seq(ds, tok)
    with pytest.raises(ValueError, match="target_column"):
        evaluate_generation(tiny_t5(vocab=len(tok)), tok, ds)
    with pytest.raises(ValueError, match="source_column: column 'src'"):
        tokenize_seq2seq(ds, tok, source_column="src")
    with pytest.raises(ValueError, match="num_beams"):
        GenerationSettings(num_beams=0)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['beams'\]"):
        sequence_kd_settings({"beams": 4})


# ------------------------------------------------------------------ compression round trips
COMPRESSION = {
    "quantize": {"method": "quantize", "bits": 4, "bucket_size": 256},
    "prune_heads": {"method": "prune_heads", "count": 2},
    "low_rank": {"method": "low_rank", "rank_fraction": 0.5},
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("method", sorted(COMPRESSION))
def test_compressed_seq2seq_round_trips_through_save_load(method, family, tmp_path):
    """Each method on each family: the reloaded model's logits and greedy generations equal
    the compressed model's."""
    from transformers import AutoModelForSeq2SeqLM

    from distilkit.compress.base import (CompressionContext, compress_, config_from_dict,
                                         finalize_, load_compressed, save_compressed)

    model = FAMILIES[family]()
    b = _s2s_batch()
    batch = {**b, "labels": b["labels"].clamp_min(5)}
    ctx = CompressionContext(dataloader=[batch], loss_fn=lambda m, x: m(**x).loss)
    compress_(model, config_from_dict(COMPRESSION[method]), ctx)
    finalize_(model)
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits
        gen = model.generate(batch["input_ids"], attention_mask=batch["attention_mask"],
                             max_new_tokens=5, do_sample=False)
    save_compressed(model, str(tmp_path / "m"))
    loaded = load_compressed(str(tmp_path / "m"), auto_cls=AutoModelForSeq2SeqLM).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, logits, rtol=0, atol=1e-5)
        assert torch.equal(loaded.generate(batch["input_ids"], attention_mask=batch["attention_mask"],
                                           max_new_tokens=5, do_sample=False), gen)


# ------------------------------------------------------------------ a task: seq2seq recipe
def _truecase_files(tmp_path) -> dict:
    """Train / validation / test jsonl files of (src, tgt) truecasing pairs."""
    import json as _json

    files = {}
    for split, rows in {"train": SENTENCES, "validation": SENTENCES[:3], "test": SENTENCES[3:6]}.items():
        files[split] = str(tmp_path / f"{split}.jsonl")
        with open(files[split], "w") as f:
            for s in rows:
                f.write(_json.dumps({"src": strip_case_and_punct(s), "tgt": s}) + "\n")
    return files


def test_a_seq2seq_speedup_is_timed_beside_the_student_not_read_from_cached_figures(
        tok, tmp_path):
    """The teacher's figures are cached with its top-k outputs, and a fully cached rerun does
    not load it. Its latency is timed again all the same, in turns with the student: read
    from the cache, a busy hour's figure (here 50x the truth) made the speed-up 50x. Not
    loaded, a stand-in of its architecture with random weights is timed writing the tokens
    it wrote (cached with its figures)."""
    import glob
    import json as _json

    from distilkit.pipeline import run_recipe
    from distilkit.recipe import Recipe

    teacher_dir = tmp_path / "teacher"
    tiny_t5(seed=5, vocab=len(tok)).save_pretrained(teacher_dir)
    tok.save_pretrained(teacher_dir)
    cache = tmp_path / "cache"
    raw = {"name": "s2s-lat", "task": "seq2seq", "teacher": str(teacher_dir),
           "student": {"type": "from_teacher", "num_decoder_layers": 1}, "dataset": None,
           "data_files": _truecase_files(tmp_path), "text_column": "src",
           "label_column": "tgt", "max_length": 24, "generation": {"max_new_tokens": 5},
           "teacher_cache": {"top_k": 8}, "cache_dir": str(cache), "alpha_kd": 0.5,
           "alpha_ce": 0.5, "max_steps": 1, "per_device_train_batch_size": 4, "use_cpu": True}
    first = run_recipe(Recipe.from_dict({**raw, "output_dir": str(tmp_path / "run0")}),
                       progress=False)
    assert first["teacher_loaded"] and "in turns" in first["teacher"]["latency_method"]
    assert "random" not in first["teacher"]["latency_method"]
    [figs] = glob.glob(str(cache / "**" / "teacher_figures-*.json"), recursive=True)
    stale = _json.load(open(figs))
    assert len(stale["latency_tokens"]) == 3 and all(1 <= n <= 5 for n in stale["latency_tokens"])
    stale["latency_ms"] = first["teacher"]["latency_ms"] * 50
    _json.dump(stale, open(figs, "w"))
    second = run_recipe(Recipe.from_dict({**raw, "output_dir": str(tmp_path / "run1")}),
                        progress=False)
    assert not second["teacher_loaded"]
    assert "cached" in second["teacher"]["figures_source"]
    assert second["teacher"]["bleu"] == first["teacher"]["bleu"]
    assert second["teacher"]["latency_ms"] < stale["latency_ms"] / 5
    assert "in turns" in second["teacher"]["latency_method"]
    assert "random weights" in second["teacher"]["latency_method"]
    assert "in turns" in second["student"]["latency_method"]
    assert second["speedup_batch1"] == pytest.approx(
        second["teacher"]["latency_ms"] / second["student"]["latency_ms"])
    assert 0.2 < second["speedup_batch1"] < 10, second["speedup_batch1"]


def test_a_stand_in_is_timed_writing_exactly_the_tokens_it_is_given(tok):
    """side_by_side_latency_ms with ``lengths`` makes that model write exactly the given
    number of tokens per source, even a model whose every step's likeliest token is the end of
    sequence its generation config names (a BART's): the stand-in's generation costs what the
    teacher's did; a bad count is refused."""
    from distilkit.seq2seq.generate_eval import GenerationSettings, side_by_side_latency_ms

    model = tiny_bart(seed=1, vocab=len(tok))
    model.generation_config.eos_token_id = model.config.eos_token_id = tok.eos_token_id
    with torch.no_grad():
        model.final_logits_bias[0, tok.eos_token_id] = 1e4   # it would stop at once
    written = []
    orig = model.generate

    def spy(**kw):   # the decoder steps run (the output less its start token), and asked
        out = orig(**kw)
        written.append((out.shape[1] - 1, kw["max_new_tokens"]))
        return out
    model.generate = spy
    out = side_by_side_latency_ms({"a": model, "b": tiny_t5(seed=2, vocab=len(tok))}, tok,
                                  SENTENCES[:3], GenerationSettings(max_new_tokens=6),
                                  lengths={"a": [2, 5, 3]})
    assert model.generation_config.eos_token_id == tok.eos_token_id   # left as it was
    assert set(out) == {"a", "b"} and all(v > 0 for v in out.values())
    assert written and all(n == k for n, k in written), written
    assert {k for _, k in written} == {2, 3, 5}
    with pytest.raises(ValueError, match=r"lengths\['a'\]: give one token count >= 1 per source"):
        side_by_side_latency_ms({"a": model}, tok, SENTENCES[:2], lengths={"a": [0, 2]})


def test_seq2seq_recipe_end_to_end(tok, tmp_path):
    """A recipe with sequence-level + token-level KD and 4-bit quantized distillation runs
    end to end and reports generation scores for teacher and student."""
    import json as _json

    from distilkit.pipeline import run_recipe
    from distilkit.recipe import Recipe

    teacher_dir = tmp_path / "teacher"
    tiny_t5(seed=5, vocab=len(tok)).save_pretrained(teacher_dir)
    tok.save_pretrained(teacher_dir)
    files = _truecase_files(tmp_path)
    raw = {"name": "s2s", "task": "seq2seq", "teacher": str(teacher_dir),
           "student": {"type": "from_teacher", "num_decoder_layers": 1}, "dataset": None,
           "data_files": files, "text_column": "src", "label_column": "tgt", "max_length": 24,
           "sequence_kd": {"max_new_tokens": 5}, "generation": {"max_new_tokens": 5},
           "cache_dir": str(tmp_path / "cache"), "output_dir": str(tmp_path / "run"),
           "alpha_kd": 0.5, "alpha_ce": 0.5, "alpha_patient": 1.0, "decoder_layer_map": [[1, 2]],
           "logging_steps": 1, "max_steps": 2, "per_device_train_batch_size": 4,
           "use_cpu": True, "compression": [{"method": "quantize", "bits": 4, "bucket_size": 256}]}
    res = run_recipe(Recipe.from_dict(raw), progress=False)
    assert res["task"] == "seq2seq" and res["split"] == "test"
    for who in ("teacher", "student"):
        assert res[who]["n"] == 3 and 0 <= res[who]["bleu"] <= 100 and res[who]["latency_ms"] > 0
    assert res["student"]["size_on_disk_bytes"] < res["teacher"]["size_on_disk_bytes"]
    assert res["sequence_kd"]["computed"] == len(SENTENCES)
    assert os.path.isfile(tmp_path / "run" / "results.json")
    assert os.path.isfile(tmp_path / "run" / "student" / "compression_config.json")
    assert {"loss_kd", "loss_ce", "loss_patient"} <= set(res["train_log"][-1])
    # The model card speaks of generation, not classification, and carries the figures.
    card = (tmp_path / "run" / "student" / "README.md").read_text()
    assert "pipeline_tag: text2text-generation" in card and "- bleu" in card
    assert "Sequence-level distillation" in card and "AutoModelForSeq2SeqLM" in card
    assert f"{res['student']['bleu']:.2f}" in card and "decoder layer map `[[1, 2]]`" in card
    assert "accuracy" not in card.lower()
    # `distilkit evaluate` on the run directory generates again with the recipe beside it.
    from distilkit.cli import main
    assert main(["evaluate", str(tmp_path / "run"), "--no-latency"]) == 0
    ev = _json.loads((tmp_path / "run" / "student" / "evaluation.json").read_text())
    assert ev["task"] == "seq2seq" and ev["split"] == "test" and ev["n"] == 3
    assert ev["bleu"] == pytest.approx(res["student"]["bleu"])
    assert ev["size_on_disk_bytes"] == res["student"]["size_on_disk_bytes"]
    # `distilkit report` compares seq2seq runs by BLEU, with generation latency.
    from distilkit.report import write_report
    rep = write_report([str(tmp_path / "run")], str(tmp_path / "report"))
    assert rep["metric"] == "bleu" and rep["rows"][1]["bleu"] == res["student"]["bleu"]
    assert rep["rows"][1]["speedup_batch1"] == pytest.approx(
        res["teacher"]["latency_ms"] / res["student"]["latency_ms"])
    assert os.path.getsize(rep["plot"]) > 0
    # Bad input is caught before training: no target column in an evaluation split.
    bad = {**raw, "label_column": "missing"}
    with pytest.raises(ValueError, match="label_column: column 'missing'"):
        run_recipe(Recipe.from_dict(bad), progress=False)


# ------------------------------------------------------------------ device placement (bug 1)
def test_generation_feeds_the_model_on_its_own_device(tok):
    """Generation, scoring, latency and the evaluation callback send every batch to the
    model's device (a wrapper that says it is on ``meta`` refuses anything else), in batches."""
    from datasets import Dataset
    from fake_device import FakeDeviceModel
    from transformers import TrainerControl, TrainerState

    from distilkit.seq2seq.generate_eval import GenerationEvalCallback, latency_ms

    model = FakeDeviceModel(tiny_t5(seed=4, vocab=len(tok)))
    settings = GenerationSettings(max_new_tokens=4, batch_size=3)
    res = generate_texts(model, tok, SENTENCES[:5], settings)
    assert len(res.texts) == 5 and all(isinstance(t, str) for t in res.texts)
    assert model.calls == 2  # 5 sentences in batches of 3
    ds = Dataset.from_dict({"source": SENTENCES[:5], "target": SENTENCES[:5]})
    out = evaluate_generation(model, tok, ds, settings=settings, latency_samples=2)
    assert out["n"] == 5 and out["latency_ms"] > 0
    assert latency_ms(model, tok, SENTENCES[:2], settings) > 0
    metrics = {}
    GenerationEvalCallback(tok, ds, settings=settings).on_evaluate(
        None, TrainerState(), TrainerControl(), model=model, metrics=metrics)
    assert {"eval_bleu", "eval_chrf", "eval_exact_match"} <= set(metrics)


def test_generation_timing_synchronises_cuda_only(tok, monkeypatch):
    """The generation clock waits for queued CUDA work before it is read, and the CPU path
    never touches CUDA."""
    from distilkit.seq2seq import generate_eval as G

    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    G.generate_texts(tiny_t5(seed=4, vocab=len(tok)), tok, SENTENCES[:2],
                     GenerationSettings(max_new_tokens=3))
    assert synced == []
    cuda = torch.device("cuda", 0)
    assert G.device_clock(cuda) > 0 and synced == [cuda]
    assert G.device_clock(torch.device("cpu")) > 0 and synced == [cuda]


# ------------------------------------------------------------------ teacher adapter (bug 6)
def test_seq2seq_teacher_adapter_is_applied_and_merged(tok, tmp_path):
    from peft import LoraConfig, get_peft_model

    from distilkit.seq2seq.teacher import load_seq2seq_teacher

    base_dir, adapter_dir = tmp_path / "teacher", tmp_path / "adapter"
    tiny_bart(seed=6).save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    torch.manual_seed(7)  # init_lora_weights=False: a random, non-identity adapter
    peft_model = get_peft_model(tiny_bart(seed=6), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(adapter_dir)
    merged = peft_model.merge_and_unload().eval()
    base, _ = load_seq2seq_teacher(str(base_dir))
    teacher, teacher_tok = load_seq2seq_teacher(str(base_dir), adapter=str(adapter_dir))
    assert type(teacher).__name__ == "BartForConditionalGeneration" and not teacher.training
    assert len(teacher_tok) == len(tok)
    b = _s2s_batch(pad_id=1)
    with torch.no_grad():
        got, want, plain = teacher(**b).logits, merged(**b).logits, base(**b).logits
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(got, plain, atol=1e-3)
    with pytest.raises(FileNotFoundError, match="teacher_adapter"):
        load_seq2seq_teacher(str(base_dir), adapter=str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        load_seq2seq_teacher(str(tmp_path / "nowhere"))
    from conftest import tiny_bert
    tiny_bert().save_pretrained(tmp_path / "classifier")
    with pytest.raises(ValueError, match="BertConfig, not an encoder-decoder model"):
        load_seq2seq_teacher(str(tmp_path / "classifier"))


def test_generation_with_a_decoder_deeper_than_the_encoder():
    """A T5 whose encoder lost layers (prune_layers, or a student with num_layers <
    num_decoder_layers) generates: transformers sized its default cache by the encoder depth
    and generate failed with an IndexError in the extra decoder layers."""
    from transformers import T5Config, T5ForConditionalGeneration

    from distilkit.seq2seq.data import truecase_tokenizer
    from distilkit.seq2seq.generate_eval import GenerationSettings, generate_texts

    torch.manual_seed(0)
    tok, _ = truecase_tokenizer()
    cfg = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=1,
                   num_decoder_layers=2, num_heads=4, decoder_start_token_id=tok.pad_token_id,
                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    model = T5ForConditionalGeneration(cfg).eval()
    for beams in (1, 2):
        res = generate_texts(model, tok, ["a fine film", "dull"],
                             GenerationSettings(max_new_tokens=4, num_beams=beams))
        assert len(res.texts) == 2


def test_seq2seq_recipe_with_a_teacher_fine_tuned_from_a_base(tok, tmp_path, monkeypatch):
    """teacher: {base, finetune} in a seq2seq recipe: the teacher is fine-tuned from the base
    on the recipe's own training pairs (cached), then distilled."""
    from distilkit.pipeline import run_recipe
    from distilkit.recipe import Recipe

    monkeypatch.setenv("DISTILKIT_CACHE", str(tmp_path / "dk"))
    base = tmp_path / "base"
    tiny_t5(seed=6, vocab=len(tok)).save_pretrained(base)
    tok.save_pretrained(base)
    files = _truecase_files(tmp_path)
    raw = {"name": "s2s_ft", "task": "seq2seq",
           "teacher": {"base": str(base), "finetune": {"max_steps": 4, "batch_size": 4,
                                                       "learning_rate": 1e-3}},
           "student": {"type": "from_teacher", "num_decoder_layers": 1}, "dataset": None,
           "data_files": files, "text_column": "src", "label_column": "tgt", "max_length": 24,
           "generation": {"max_new_tokens": 5}, "output_dir": str(tmp_path / "run"),
           "max_steps": 2, "per_device_train_batch_size": 4, "use_cpu": True}
    res = run_recipe(Recipe.from_dict(raw), progress=False)
    assert res["teacher_finetune"]["steps"] == 4 and res["teacher_finetune"]["task"] == "seq2seq"
    assert res["student"]["n"] == 3 and 0 <= res["student"]["bleu"] <= 100


def test_a_saved_seq2seq_student_generates_with_its_cache(tok, tmp_path):
    """The Trainer leaves use_cache False on the model it trains (transformers 5's default
    argument); saved so, a student generated without its key-value cache, recomputing every
    earlier token. Saved, it is on (config and generation config); the model in memory is
    left as it was; and distilkit's generation asks for the cache whatever the config says."""
    import json as _json

    from distilkit.compress.base import save_compressed

    model = tiny_bart(seed=1)
    trainer = DistilTrainer(model=model, args=_args(tmp_path), train_dataset=[])
    assert model.config.use_cache is False   # what the Trainer did
    model.generation_config.use_cache = False
    save_compressed(model, str(tmp_path / "s"))
    assert _json.loads((tmp_path / "s" / "config.json").read_text())["use_cache"] is True
    gen = _json.loads((tmp_path / "s" / "generation_config.json").read_text())
    assert gen["use_cache"] is True
    assert model.config.use_cache is False and model.generation_config.use_cache is False
    assert GenerationSettings().generate_kwargs()["use_cache"] is True
    del trainer
