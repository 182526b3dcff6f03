"""A teacher fine-tuned from a base model (distilkit.finetune): named classes, sentence pairs,
seq2seq, the cache (hit, key), early stopping with the best weights kept and no checkpoint
left, and the one-line errors of bad settings. Bases are tiny models saved offline."""
import dataclasses
import json
import os
import random

import pytest
import torch
from conftest import tiny_bert, tiny_bert_config, tiny_tokenizer

import distilkit.finetune as ft
from distilkit.data import DataSpec
from distilkit.finetune import FinetuneConfig, finetune_teacher, validation_scores

CLASSES = {"boring": ["boring", "dull", "slow"], "negative": ["bad", "awful", "mess"],
           "positive": ["great", "good", "brilliant"]}
FILLER = ["the", "film", "movie", "is", "was", "plot", "acting", "story", "very", "and"]
# Learns the tiny sentences within a few dozen steps.
FAST = dict(learning_rate=1e-2, batch_size=16, max_length=16, seed=0)


def sentence(rng, cls):
    words = rng.sample(FILLER, 4) + rng.sample(CLASSES[cls], 2)
    rng.shuffle(words)
    return " ".join(words)


def three_class_data(n_train=96, n_val=30, seed=0):
    """Splits whose string-named class is given by its class words."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    rng, names = random.Random(seed), sorted(CLASSES)
    feats = Features({"text": Value("string"), "label": ClassLabel(names=names)})

    def split(n):
        labels = [i % 3 for i in range(n)]
        return Dataset.from_dict({"text": [sentence(rng, names[y]) for y in labels],
                                  "label": labels}, features=feats)

    return DatasetDict({"train": split(n_train), "validation": split(n_val)})


def pair_data(n_train=128, n_val=32, seed=0):
    """Sentence pairs whose label is the sentiment of the *second* sentence only: a model
    that does not read ``text_pair`` is at chance."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    rng = random.Random(seed)
    feats = Features({"premise": Value("string"), "hypothesis": Value("string"),
                      "label": ClassLabel(names=["negative", "positive"])})

    def split(n):
        labels = [i % 2 for i in range(n)]
        return Dataset.from_dict({
            "premise": [sentence(rng, rng.choice(["negative", "positive"])) for _ in labels],
            "hypothesis": [sentence(rng, ["negative", "positive"][y]) for y in labels],
            "label": labels}, features=feats)

    return DatasetDict({"train": split(n_train), "validation": split(n_val)})


def save_bert_base(path, head_labels=None, seed=0):
    """A tiny BERT saved with its tokenizer: a bare encoder (no head, the usual base) or,
    with ``head_labels``, a classifier with that many labels."""
    from transformers import BertModel

    tok = tiny_tokenizer(str(path))
    torch.manual_seed(seed)
    if head_labels:
        model = tiny_bert(seed=seed, vocab=tok.vocab_size, layers=2, num_labels=head_labels)
    else:
        model = BertModel(tiny_bert_config(vocab=tok.vocab_size, layers=2))
    model.save_pretrained(str(path))
    return str(path)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Models this small train several times faster on one thread, and far faster when other
    processes share the cores (threads of a parallel op then wait for each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def base(tmp_path):
    return save_bert_base(tmp_path / "base")


def leftovers(root):
    """Anything a finished fine-tune must not leave: checkpoints, scratch or temp dirs."""
    found = []
    for d, dirs, _ in os.walk(root):
        found += [os.path.join(d, x) for x in dirs if x.startswith(("checkpoint", ".tmp"))]
    return found


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    """One 3-class teacher fine-tuned from a bare tiny BERT (shared by the cache tests)."""
    tmp = tmp_path_factory.mktemp("ft")
    base_dir = save_bert_base(tmp / "base")
    raw, spec = three_class_data(), DataSpec(dataset=None)
    config = FinetuneConfig(max_steps=40, **FAST)
    out = finetune_teacher(base_dir, raw, spec, config, progress=False,
                           cache_dir=str(tmp / "cache"))
    return {"out": out, "base": base_dir, "raw": raw, "spec": spec, "config": config,
            "cache": str(tmp / "cache")}


def test_three_named_classes_fine_tune_from_a_bare_encoder(trained):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    from distilkit.data import tokenize

    out = trained["out"]
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.id2label == {0: "boring", 1: "negative", 2: "positive"}
    assert model.config.label2id == {"boring": 0, "negative": 1, "positive": 2}
    info = json.load(open(os.path.join(out, "teacher_info.json")))
    assert info["labels"] == ["boring", "negative", "positive"] and info["steps"] == 40
    assert info["settings"] == dataclasses.asdict(trained["config"])
    assert info["data"]["rows"] == {"train": 96, "validation": 30}
    val = info["validation"]
    assert val["accuracy"] >= 0.9 and val["macro_f1"] >= 0.9, val
    # The recorded figures are those of the saved teacher.
    tok = AutoTokenizer.from_pretrained(out)
    data = tokenize(trained["raw"], tok, trained["spec"], max_length=16)["validation"]
    again = validation_scores(model, data, DataCollatorWithPadding(tok), "classification")
    assert again["accuracy"] == val["accuracy"] and again["loss"] == pytest.approx(val["loss"])
    assert leftovers(trained["cache"]) == [] and os.listdir(trained["cache"]) == [os.path.basename(out)]


def test_second_call_is_a_cache_hit_that_trains_and_loads_nothing(trained, monkeypatch):
    import transformers

    def refuse(*a, **k):
        raise AssertionError("a cache hit must not train or load a model")

    monkeypatch.setattr(transformers.Trainer, "train", refuse)
    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", refuse)
    again = finetune_teacher(trained["base"], trained["raw"], trained["spec"], trained["config"],
                             progress=False, cache_dir=trained["cache"])
    assert again == trained["out"]


def test_plan_says_what_would_be_trained_without_training(trained, tmp_path, monkeypatch):
    import transformers

    def refuse(*a, **k):
        raise AssertionError("a plan must not train")

    monkeypatch.setattr(transformers.Trainer, "train", refuse)
    plan = ft.plan_finetune(trained["base"], trained["raw"], trained["spec"], trained["config"],
                            cache_dir=trained["cache"])
    assert plan.cached and plan.out == trained["out"] and plan.steps == 40
    assert plan.labels == ["boring", "negative", "positive"]
    # Epochs and a warm-up fraction become steps; the default max_length is the base's 64
    # positions (below the default 128).
    other = ft.plan_finetune(trained["base"], trained["raw"], trained["spec"],
                             FinetuneConfig(num_train_epochs=2, batch_size=16, warmup_ratio=0.25),
                             cache_dir=str(tmp_path / "cache"))
    assert not other.cached and other.steps == 2 * 6 and other.config.warmup(other.steps) == 3
    assert other.config.max_length == 64
    assert not os.path.exists(tmp_path / "cache")


def test_sentence_pairs_read_the_second_text(tmp_path, base):
    spec = DataSpec(dataset=None, text_column="premise", text_pair_column="hypothesis")
    out = finetune_teacher(base, pair_data(), spec, FinetuneConfig(max_steps=40, **FAST),
                           progress=False, cache_dir=str(tmp_path / "cache"))
    info = json.load(open(os.path.join(out, "teacher_info.json")))
    assert info["data"]["columns"] == {"text": "premise", "text_pair": "hypothesis",
                                       "label": "label"}
    assert info["validation"]["accuracy"] >= 0.85, info["validation"]


def test_a_classifier_base_with_another_number_of_labels_gets_a_new_head(tmp_path):
    from transformers import AutoModelForSequenceClassification

    base_dir = save_bert_base(tmp_path / "two-label-classifier", head_labels=2)
    out = finetune_teacher(base_dir, three_class_data(24, 6), DataSpec(dataset=None),
                           FinetuneConfig(max_steps=2, **FAST), progress=False,
                           cache_dir=str(tmp_path / "cache"))
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 3 and model.classifier.out_features == 3


# ------------------------------------------------------------------ the key
@pytest.fixture
def keyed(monkeypatch):
    """finetune_teacher with the training replaced by a recorder: returns the directory
    each call would train into (nothing is written, so every call 'trains')."""
    calls = []
    monkeypatch.setattr(ft, "_fine_tune", lambda plan, progress: calls.append(plan.out))
    return calls


def test_the_key_follows_contents_not_paths(tmp_path, base, keyed):
    import shutil

    from datasets import DatasetDict

    raw, spec = three_class_data(24, 6), DataSpec(dataset=None)
    config = FinetuneConfig(max_steps=5, **FAST)
    kw = dict(progress=False, cache_dir=str(tmp_path / "cache"))

    def key(base_dir=base, data=raw, cfg=config, task="classification"):
        return os.path.basename(finetune_teacher(base_dir, data, spec, cfg, task=task, **kw)).rsplit("-", 1)[1]

    first = key()
    assert key() == first
    moved = shutil.copytree(base, tmp_path / "elsewhere" / "base")
    assert key(base_dir=str(moved)) == first  # the base's bytes, not its path

    def edit(split, i, text):
        d = raw[split].to_dict()
        d["text"][i] = text
        return DatasetDict({**raw, split: type(raw[split]).from_dict(d, features=raw[split].features)})

    changed = {
        "train row": key(data=edit("train", 5, "the film was good")),
        "validation row": key(data=edit("validation", 0, "the film was good")),
        "row order": key(data=DatasetDict({**raw, "train": raw["train"].select(
            list(range(1, 24)) + [0])})),
        "setting": key(cfg=dataclasses.replace(config, learning_rate=1e-3)),
        "seed": key(cfg=dataclasses.replace(config, seed=1)),
    }
    weights = os.path.join(str(moved), "model.safetensors")
    blob = bytearray(open(weights, "rb").read())
    blob[-100] ^= 0x01
    open(weights, "wb").write(bytes(blob))
    changed["base weight byte"] = key(base_dir=str(moved))
    assert len(set(changed.values()) | {first}) == len(changed) + 1, changed


def test_builtin_teacher_key_hashes_the_whole_weight_file(tmp_path, monkeypatch, keyed):
    """A change anywhere in the base weights (here after the first MiB) is another teacher;
    the built-in teacher is fine-tuned with its fixed settings (moved here from
    test_teacher_cache when builtin_teacher moved to distilkit.finetune)."""
    base_dir = tmp_path / "minilm"
    base_dir.mkdir()
    tiny_bert_config().save_pretrained(base_dir)
    weights = base_dir / "model.safetensors"
    weights.write_bytes(bytes(range(256)) * (3 << 12))  # 3 MiB
    monkeypatch.setenv("DISTILKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(ft, "minilm_path", lambda: str(base_dir))
    monkeypatch.setattr(ft, "load_raw", lambda spec: three_class_data(24, 6))

    first = ft.builtin_teacher(progress=False)
    assert ft.builtin_teacher(progress=False) == first  # same bytes: same key
    raw = bytearray(weights.read_bytes())
    raw[(1 << 20) + 12345] ^= 0x01
    weights.write_bytes(raw)
    second = ft.builtin_teacher(progress=False)
    assert second != first and keyed == [first, first, second]
    assert os.path.basename(first).startswith("minilm-rt-")
    assert ft.BUILTIN_FINETUNE == FinetuneConfig(max_steps=200, learning_rate=5e-5, batch_size=32,
                                                 warmup_steps=20, max_length=64, seed=42)


def test_a_hub_id_base_is_downloaded_and_keyed_by_its_files(tmp_path, base, keyed, monkeypatch):
    import huggingface_hub

    asked = []

    def snapshot(repo_id, allow_patterns=None):
        asked.append((repo_id, allow_patterns))
        return base

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    raw, spec, config = three_class_data(24, 6), DataSpec(dataset=None), FinetuneConfig(max_steps=5)
    kw = dict(progress=False, cache_dir=str(tmp_path / "cache"))
    hub = finetune_teacher("org/tiny-base", raw, spec, config, **kw)
    local = finetune_teacher(base, raw, spec, config, **kw)
    assert asked[0][0] == "org/tiny-base" and "*.safetensors" in asked[0][1]
    assert "*.bin" not in asked[0][1]  # one weight format, not every file of the repo
    assert hub.rsplit("-", 1)[1] == local.rsplit("-", 1)[1]
    assert os.path.basename(hub).startswith("tiny-base-")


def test_resolve_teacher_reads_every_spec(tmp_path, base, keyed):
    from distilkit import teachers
    from distilkit.teachers import BUILTIN_TEACHER

    with pytest.raises(ValueError, match="builtin_teacher"):
        teachers.resolve_teacher(BUILTIN_TEACHER)
    assert ft.resolve_teacher(base) == base
    raw, spec = three_class_data(24, 6), DataSpec(dataset=None)
    got = ft.resolve_teacher({"base": base, "finetune": {"max_steps": 3}}, raw=raw, data=spec,
                             progress=False)
    assert keyed == [got]
    assert ft.parse_teacher_spec({"base": base}) == (base, FinetuneConfig())
    assert ft.parse_teacher_spec(base) is None


# ------------------------------------------------------------------ early stopping
def test_early_stopping_stops_and_keeps_the_best_weights(tmp_path, base):
    """Accuracy reaches its best early and stops improving, so training stops after
    ``patience`` more evaluations; the saved teacher is the best one, not the last."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    from distilkit.data import tokenize

    raw, spec = three_class_data(), DataSpec(dataset=None)
    config = FinetuneConfig(max_steps=200, early_stopping_patience=2, eval_steps=5,
                            early_stopping_metric="accuracy", **FAST)
    cache = str(tmp_path / "cache")
    out = finetune_teacher(base, raw, spec, config, progress=False, cache_dir=cache)
    es = json.load(open(os.path.join(out, "teacher_info.json")))["early_stopping"]
    steps = [e["step"] for e in es["evaluations"]]
    assert steps == list(range(5, es["trained_steps"] + 1, 5)) and es["trained_steps"] < 200
    assert es["best_step"] == es["trained_steps"] - 2 * 5
    best = next(e for e in es["evaluations"] if e["step"] == es["best_step"])
    last = es["evaluations"][-1]
    assert best["accuracy"] == es["best"] == max(e["accuracy"] for e in es["evaluations"])
    assert last["loss"] != best["loss"]  # training went on after the best step
    model = AutoModelForSequenceClassification.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    data = tokenize(raw, tok, spec, max_length=16)["validation"]
    saved = validation_scores(model, data, DataCollatorWithPadding(tok), "classification")
    assert saved["loss"] == pytest.approx(best["loss"], rel=1e-5)
    assert leftovers(cache) == []


def test_an_interrupted_fine_tune_leaves_nothing_that_looks_finished(tmp_path, base, monkeypatch):
    import transformers

    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.Trainer, "train", crash)
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        finetune_teacher(base, three_class_data(24, 6), DataSpec(dataset=None),
                         FinetuneConfig(max_steps=3), progress=False, cache_dir=str(cache))
    assert os.listdir(cache) == []


# ------------------------------------------------------------------ seq2seq
def test_seq2seq_fine_tune_from_a_tiny_t5_base(tmp_path):
    """Sentence -> "this film is <its class>", from a tiny T5 base saved with its tokenizer:
    the teacher learns (its validation loss falls far below the base's, its outputs are
    right), has BLEU figures, and loads as a seq2seq teacher."""
    from datasets import Dataset, DatasetDict

    from distilkit.seq2seq.data import seq2seq_collator, tokenize_seq2seq
    from distilkit.seq2seq.teacher import (Seq2SeqTeacherSettings, build_seq2seq_model,
                                           load_seq2seq_teacher)
    from distilkit.seq2seq.tokenizer import TokenizerSettings, build_tokenizer

    rng = random.Random(0)
    names = sorted(CLASSES) * 40
    pairs = [(sentence(rng, c), f"this film is {c}") for c in names]
    tok = build_tokenizer([t for p in pairs for t in p], TokenizerSettings(vocab_size=256))
    base_model = build_seq2seq_model(Seq2SeqTeacherSettings(
        arch="t5", d_model=32, num_layers=1, num_decoder_layers=1, num_heads=4, d_ff=64, vocab_size=256,
        max_length=16), tok)
    base_dir = str(tmp_path / "t5-base")
    base_model.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)

    def split(rows):
        return Dataset.from_dict({"src": [p[0] for p in rows], "tgt": [p[1] for p in rows]})

    raw = DatasetDict({"train": split(pairs[:96]), "validation": split(pairs[96:120])})
    spec = DataSpec(dataset=None, text_column="src", label_column="tgt")
    out = finetune_teacher(base_dir, raw, spec, FinetuneConfig(
        max_steps=40, learning_rate=1e-2, batch_size=16, warmup_steps=4, max_length=16),
        task="seq2seq", progress=False, cache_dir=str(tmp_path / "cache"))
    info = json.load(open(os.path.join(out, "teacher_info.json")))
    val = info["validation"]
    assert {"loss", "bleu", "chrf", "exact_match"} <= set(val) and info["task"] == "seq2seq"
    data = tokenize_seq2seq(raw["validation"], tok, "src", "tgt", 16, 16)
    before = validation_scores(base_model, data, seq2seq_collator(tok), "seq2seq")["loss"]
    assert val["loss"] < 0.25 * before and val["exact_match"] >= 0.9 and val["bleu"] > 90, (val, before)
    model, loaded_tok = load_seq2seq_teacher(out)
    assert model.config.is_encoder_decoder and len(loaded_tok) == len(tok)
    assert validation_scores(model, data, seq2seq_collator(tok), "seq2seq")["loss"] == \
        pytest.approx(val["loss"], rel=1e-5)
    assert leftovers(str(tmp_path / "cache")) == []


# ------------------------------------------------------------------ bad settings
@pytest.mark.parametrize("kwargs, field", [
    ({"max_steps": 0}, "max_steps"),
    ({"max_steps": 2.5}, "max_steps"),
    ({"max_steps": True}, "max_steps"),
    ({"num_train_epochs": 0}, "num_train_epochs"),
    ({"num_train_epochs": float("nan")}, "num_train_epochs"),
    ({"max_steps": 10, "num_train_epochs": 2}, "num_train_epochs"),
    ({"learning_rate": 0}, "learning_rate"),
    ({"learning_rate": float("inf")}, "learning_rate"),
    ({"learning_rate": "abc"}, "learning_rate"),
    ({"batch_size": 0}, "batch_size"),
    ({"warmup_steps": -1}, "warmup_steps"),
    ({"warmup_ratio": 1.0}, "warmup_ratio"),
    ({"warmup_ratio": 0.1, "warmup_steps": 5}, "warmup_ratio"),
    ({"max_length": 1}, "max_length"),
    ({"seed": "x"}, "seed"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"early_stopping_patience": 0}, "early_stopping_patience"),
    ({"eval_steps": 10}, "eval_steps"),
    ({"early_stopping_metric": "bleu"}, "early_stopping_metric"),
])
def test_bad_settings_fail_in_one_line_naming_the_field(kwargs, field):
    with pytest.raises(ValueError) as e:
        FinetuneConfig(**kwargs)
    assert str(e.value).startswith(f"{field}: ") and "\n" not in str(e.value)
    with pytest.raises(ValueError) as e:
        FinetuneConfig.from_dict(kwargs)
    assert str(e.value).startswith(f"teacher.finetune.{field}: ")


@pytest.mark.parametrize("spec, message", [
    ({"base": "org/name", "finetune": {"steps": 5}}, "teacher.finetune.steps: unknown setting"),
    ({"base": "org/name", "finetune": [5]}, "teacher.finetune: [5] must be a mapping"),
    ({"base": "org/name", "fine_tune": {}}, "teacher.fine_tune: unknown key"),
    ({"finetune": {}}, "teacher.base: None must name the base model"),
    ({"base": "/no/such/base"}, "teacher.base: '/no/such/base' does not exist"),
])
def test_bad_teacher_specs_fail_in_one_line(spec, message):
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        ft.parse_teacher_spec(spec)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_bad_data_and_bases_fail_before_training(tmp_path, base, monkeypatch):
    """Every check that needs no training runs first: nothing is trained or written."""
    from datasets import Dataset, DatasetDict

    import transformers

    def refuse(*a, **k):
        raise AssertionError("must fail before training")

    monkeypatch.setattr(transformers.Trainer, "train", refuse)
    raw, spec = three_class_data(24, 6), DataSpec(dataset=None)
    cache = tmp_path / "cache"

    def fails(message, b=base, data=raw, s=spec, cfg=FinetuneConfig(max_steps=2), task="classification"):
        with pytest.raises((ValueError, FileNotFoundError)) as e:
            finetune_teacher(b, data, s, cfg, task=task, progress=False, cache_dir=str(cache))
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)

    strings = DatasetDict({"train": Dataset.from_dict({"text": ["a", "b"], "label": ["x", "y"]})})
    no_config = tmp_path / "weights-only"
    no_config.mkdir()
    (no_config / "model.safetensors").write_bytes(b"0")
    fails("task: 'ner' cannot fine-tune", task="ner")
    fails("text_column: column 'sentence' is not in split 'train'",
          s=DataSpec(dataset=None, text_column="sentence"))
    fails("label_column: fine-tuning a teacher needs", s=DataSpec(dataset=None, label_column=None))
    fails("label_column: column 'label' holds string, not class ids", data=strings)
    fails("teacher.base: '/no/such/dir' does not exist", b="/no/such/dir")
    fails("is not a model directory (no config.json)", b=str(no_config))
    fails("teacher.finetune.max_length: 100000 is beyond the base model's 64 positions",
          cfg=FinetuneConfig(max_length=100000))
    fails("not an encoder-decoder model", task="seq2seq",
          s=DataSpec(dataset=None, label_column="text"))
    fails("early stopping needs a validation split",
          data=DatasetDict({"train": raw["train"]}),
          cfg=FinetuneConfig(max_steps=2, early_stopping_patience=1))
    assert not cache.exists() or os.listdir(cache) == []
