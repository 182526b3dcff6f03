"""The budget search on encoder-decoder students (T5, BART, Marian): size targets, counted
exactly over both stacks, searched over each layer's self-attention heads, FFN neurons and
layers (each stack keeping one), written as ordinary compression entries that reproduce the
structure; latency targets and the encoder-only units refused in one line."""
import json
import os

import pytest
import torch
import yaml
from transformers import T5Config, T5ForConditionalGeneration

from conftest import tiny_bart, tiny_marian, tiny_t5
from distilkit.compress.base import compress_
from distilkit.compress.families import get_adapter
from distilkit.compress.prune import PruneFFNConfig, PruneHeadsConfig, PruneLayersConfig
from distilkit.search.netadapt import (Removal, Scores, Tracker, after_removal, plan_step,
                                       smallest_structure)
from distilkit.search.structure import Structure, base_shape_of, parameters, structure_of


def _gated_t5():
    """T5 v1.1's form: a gated FFN (two up projections), an untied output layer, 3 + 2 layers."""
    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(
        vocab_size=120, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_decoder_layers=2,
        num_heads=4, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
        decoder_start_token_id=0)).eval()


FAMILIES = {"t5": tiny_t5, "t5_gated": _gated_t5, "bart": tiny_bart, "marian": tiny_marian}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_count_of_a_pruned_encoder_decoder_is_its_parameters(family):
    """Heads of the first encoder layer and the last decoder layer, FFN neurons of two layers
    and the first encoder layer (T5: the one holding the position table) cut out: the
    structure read off the model, counted with the unpruned model's shape, is exactly its
    parameter count; so is the unpruned one."""
    model = FAMILIES[family]()
    shape, full = base_shape_of(model), structure_of(model)
    assert full.stacks == (len(model.get_encoder().block if "t5" in family
                               else model.get_encoder().layers), 2)
    assert parameters(full, shape) == sum(p.numel() for p in model.parameters())
    adapter = get_adapter(model)
    holders = [b.holder for b in adapter.attention_blocks() if b.kind == "self"]
    ffns = [b.name for b in adapter.ffn_blocks()]
    compress_(model, PruneHeadsConfig(heads={holders[0]: [1, 2], holders[-1]: [0]}))
    compress_(model, PruneFFNConfig(neurons={ffns[1]: list(range(10)), ffns[-1]: [3, 4]}))
    compress_(model, PruneLayersConfig(layers=[0]))
    st = structure_of(model)
    assert st.stacks == (full.stacks[0] - 1, 2) and st.heads[-1] == 3
    assert parameters(st, shape) == sum(p.numel() for p in model.parameters())
    # a decoder layer costs its cross-attention too: with the same heads and neurons, one
    # decoder layer fewer saves cross_params more than one encoder layer fewer
    n = full.num_layers()
    fewer_enc = Structure(full.heads[1:], full.ffn[1:], full.vocab,
                          stacks=(full.stacks[0] - 1, 2))
    fewer_dec = Structure(full.heads[1:], full.ffn[1:], full.vocab,
                          stacks=(full.stacks[0], 1))
    assert n == sum(full.stacks) and shape.cross_params > 0
    assert parameters(fewer_enc, shape) - parameters(fewer_dec, shape) == shape.cross_params


def test_an_encoder_keeps_its_shape_key():
    """The new shape fields (bias, norm, FFN form, cross-attention) leave an encoder's key as
    it was: latency tables cached before them are still found."""
    from conftest import tiny_bert

    key = base_shape_of(tiny_bert()).key()
    assert not {"bias", "norm", "ups", "cross_params"} & set(key)
    t5 = base_shape_of(tiny_t5()).key()
    assert t5["bias"] is False and t5["norm"] == 1 and t5["cross_params"] > 0


def _scores(st, layer_first=True):
    """Scores under which whole layers are the cheapest units to lose."""
    n = st.num_layers()
    return Scores(heads=[[1.0] * h for h in st.heads], neurons=[[1.0] * f for f in st.ffn],
                  layers=[0.0 if layer_first else 9.0] * n)


def test_the_plan_keeps_a_layer_in_each_stack():
    """With layers free to lose, a plan that must cut almost everything drops layers of both
    stacks but never the last of either; the smallest structure is one layer per stack."""
    model = tiny_bart()
    shape, st = base_shape_of(model), structure_of(model)
    cost = lambda s: parameters(s, shape)   # noqa: E731
    r = plan_step(st, _scores(st), cost, cut=cost(st), units=("layers",))
    after = after_removal(st, r)
    assert len(r.layers) == 2 and after.stacks == (1, 1) and after.num_layers() == 2
    small = smallest_structure(st, ("heads", "ffn", "layers"), ffn_block=16)
    assert small.stacks == (1, 1) and small.heads == (1, 1) and small.ffn == (16, 16)


def test_the_tracker_keeps_the_stacks_of_the_layers_it_keeps():
    st = Structure((4, 4, 4, 4, 4), (64,) * 5, 120, stacks=(3, 2))
    tracker = Tracker.of(st)
    tracker.apply(Removal(layers=[1, 3], heads={0: [2]}))
    now = tracker.structure(st)
    assert now.stacks == (2, 1) and now.heads == (3, 4, 4)
    assert now == after_removal(st, Removal(layers=[1, 3], heads={0: [2]}))
    tracker.apply(Removal(layers=[0]))
    assert tracker.structure(st).stacks == (1, 1)


@pytest.mark.parametrize("auto, after, match", [
    ({"target": {"speedup": 2}, "runtime": "onnx"}, [],
     "runtime: onnx for a seq2seq student: its generation is timed in pytorch"),
    ({"target": {"parameters": 1000}, "units": ["heads", "ranks"]}, [],
     "units: ranks for a seq2seq student"),
    ({"target": {"size_mb": 1}}, [{"method": "ptq", "bits": 4}],
     r"compression\[1\]: ptq after auto with a seq2seq student"),
    ({"target": {"parameters": 1000}}, [{"method": "prune_vocab"}],
     r"compression\[1\]: prune_vocab after auto"),
])
def test_what_the_seq2seq_search_does_not_model_is_refused_in_one_line(auto, after, match):
    from distilkit.budget import split_auto

    with pytest.raises(ValueError, match=match) as e:
        split_auto([{"method": "auto", **auto}, *after], 32, task="seq2seq")
    assert "\n" not in str(e.value)


def test_new_tokens_is_a_seq2seq_latencys_and_an_encoders_keys_stay_as_they_were():
    """A seq2seq latency target times new_tokens generated tokens (32 unless given); an
    encoder classifier's entry may not name it, and its budget entry and runtime-spec key
    leave it out (latency tables cached before it are still found)."""
    from distilkit.budget import split_auto
    from distilkit.search.latency import RuntimeSpec

    budget, _ = split_auto([{"method": "auto", "target": {"speedup": 2}}], 32, task="seq2seq")
    assert budget.new_tokens == 32 and "32 tokens generated" in budget.describe()
    budget, _ = split_auto([{"method": "auto", "target": {"speedup": 2}, "new_tokens": 8}], 32,
                           task="seq2seq")
    assert budget.new_tokens == 8 and budget.to_entry()["new_tokens"] == 8
    with pytest.raises(ValueError, match="new_tokens: 8 is the tokens a seq2seq student "
                                         "generates when timed; an encoder classifier"):
        split_auto([{"method": "auto", "target": {"speedup": 2}, "new_tokens": 8}], 32)
    budget, _ = split_auto([{"method": "auto", "target": {"speedup": 2}}], 32)
    assert "new_tokens" not in budget.to_entry()
    assert "new_tokens" not in RuntimeSpec(threads=1).key()
    assert RuntimeSpec(threads=1, new_tokens=4).key()["new_tokens"] == 4


def test_a_parameters_target_with_ptq_after_auto_is_accepted():
    from distilkit.budget import split_auto

    budget, rest = split_auto([{"method": "auto", "target": {"parameters": 1000}},
                               {"method": "ptq", "bits": 4}], 32, task="seq2seq")
    assert budget.target == "parameters" and rest == [{"method": "ptq", "bits": 4}]


def test_an_encoder_decoder_is_timed_generating_its_new_tokens_only():
    from distilkit.search.latency import LatencyTable, RuntimeSpec, measure_model_ms

    with pytest.raises(ValueError, match="encoder-decoder \\(seq2seq\\) model, timed "
                                         "generating new_tokens"):
        LatencyTable.for_model(tiny_t5(), RuntimeSpec("pytorch", 2, 8, 1, "cpu"))
    with pytest.raises(ValueError, match="new_tokens=4 is for encoder-decoder models"):
        from conftest import tiny_bert
        measure_model_ms(tiny_bert(), RuntimeSpec("pytorch", 2, 8, 1, "cpu", new_tokens=4))
    with pytest.raises(ValueError, match="ranks=True: the factorized layers are timed for "
                                         "encoder classifiers only"):
        LatencyTable.for_model(tiny_bart(), RuntimeSpec("pytorch", 2, 8, 1, "cpu", 4),
                               ranks=True)
    # the runner generates exactly new_tokens tokens, whatever the model would stop at
    from distilkit.search.latency import _runner

    with _runner(tiny_bart(), RuntimeSpec("pytorch", 3, 8, 1, "cpu", new_tokens=5)) as run:
        out = run()
    assert tuple(out.shape) == (3, 6)   # the decoder start token and the 5 generated


# Timed on the process's CPU clock with one thread (as the encoder tables' tests): other
# people's work on this shared 2-core machine does not inflate it.
GEN_SPEC = dict(runtime="pytorch", batch=4, seq_len=16, threads=1, clock="cpu", new_tokens=8)


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_the_generation_table_predicts_pruned_students_within_its_tolerance(family, tmp_path):
    """The table (one grid per stack, a decoder layer timed generating) predicts the speed-up
    of students with encoder or decoder layers dropped, heads and FFN neurons cut, within
    the table's tolerance of the speed-up measured beside the unpruned model; a decoder layer
    costs more than an encoder layer (it runs once per generated token)."""
    import copy

    from distilkit.search.latency import TOLERANCE, LatencyTable, RuntimeSpec, measure_pair_ms

    spec = RuntimeSpec(**GEN_SPEC)
    model = FAMILIES[family]()
    table = LatencyTable.for_model(model, spec, cache_dir=str(tmp_path), progress=False)
    assert table.layer_ms(4, 64, stack=1) > table.layer_ms(4, 64, stack=0)
    again = LatencyTable.for_model(model, spec, cache_dir=str(tmp_path), progress=False)
    assert not again.measured and again.decoder_fit == table.decoder_fit   # from the cache
    adapter = get_adapter(model)
    holders = [b.holder for b in adapter.attention_blocks() if b.kind == "self"]
    ffns = [b.name for b in adapter.ffn_blocks()]
    cases = [PruneLayersConfig(layers=[2]), PruneLayersConfig(layers=[0, 2]),
             PruneHeadsConfig(heads={holders[2]: [0, 1, 2], holders[3]: [0, 1, 2]}),
             PruneFFNConfig(neurons={ffns[2]: list(range(56)), ffns[3]: list(range(56))})]
    for cfg in cases:
        pruned = copy.deepcopy(model)
        compress_(pruned, cfg)
        predicted = table.predict_ms(structure_of(model)) / table.predict_ms(structure_of(pruned))
        ms, ref = measure_pair_ms(pruned, model, spec)
        assert abs(predicted / (ref / ms) - 1) <= TOLERANCE, (cfg, predicted, ref / ms)


def _tok():
    from test_seq2seq import SENTENCES
    from distilkit.seq2seq.data import strip_case_and_punct
    from distilkit.seq2seq.tokenizer import TokenizerSettings, build_tokenizer

    return build_tokenizer(SENTENCES + [strip_case_and_punct(s) for s in SENTENCES],
                           TokenizerSettings(vocab_size=300, min_frequency=1))


def _s2s_recipe(tmp_path, family, auto):
    """A truecasing recipe on a tiny teacher of ``family`` with ``auto``'s settings (or
    ``auto(teacher)``'s)."""
    from test_seq2seq import _truecase_files

    tok = _tok()
    teacher = (tiny_bart if family == "bart" else tiny_t5)(seed=5, vocab=len(tok))
    teacher.save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    out = str(tmp_path / "run")
    raw = {"name": "s2s", "task": "seq2seq", "teacher": str(tmp_path / "teacher"),
           "student": {"type": "from_teacher"}, "dataset": None,
           "data_files": _truecase_files(tmp_path), "text_column": "src",
           "label_column": "tgt", "max_length": 24, "generation": {"max_new_tokens": 5},
           "cache_dir": str(tmp_path / "cache"), "output_dir": out, "alpha_kd": 0.5,
           "alpha_ce": 0.5, "max_steps": 2, "per_device_train_batch_size": 4, "use_cpu": True,
           "compression": [{"method": "auto", "steps_between": 2, "ffn_block": 16,
                            "eval_examples": 3, "importance_batches": 1, "max_iterations": 12,
                            "step_fraction": 0.3,
                            **(auto(teacher) if callable(auto) else auto)}]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path), out, teacher


def test_a_seq2seq_speedup_target_is_met_by_generation_timed_beside_the_teacher(tmp_path,
                                                                                 capsys):
    """A 1.15x generation speed-up on a tiny BART (batch 4, 16 source tokens, 8 generated,
    CPU clock, 1 thread): the search's own last reading meets it, and the final student,
    measured again beside the teacher, is within the table's tolerance of it."""
    from distilkit.cli import main
    from distilkit.search.latency import TOLERANCE

    timing = {k: GEN_SPEC[k] for k in ("batch", "seq_len", "threads", "clock", "new_tokens")}
    path, out, _ = _s2s_recipe(tmp_path, "bart", {"target": {"speedup": 1.15}, **timing})
    assert main(["distill", path, "--no-progress"]) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "8 tokens generated" in err
    record = json.load(open(os.path.join(out, "search.json")))
    assert record["met"] and record["spec"]["new_tokens"] == 8
    assert record["history"][-1]["measured"] <= record["limit"]
    s = json.load(open(os.path.join(out, "results.json")))["search"]
    assert s["speedup"] >= 1.15 * (1 - TOLERANCE) and s["measured_ms"] > 0
    assert len(record["history"]) >= 2 and record["history"][-1]["stacks"][0] >= 1


def test_an_unreachable_seq2seq_speedup_is_refused_naming_the_smallest_student(tmp_path,
                                                                               capsys):
    from distilkit.cli import main

    timing = {k: GEN_SPEC[k] for k in ("batch", "seq_len", "threads", "clock", "new_tokens")}
    path, out, _ = _s2s_recipe(tmp_path, "bart", {"target": {"speedup": 50}, **timing})
    assert main(["distill", path, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "target.speedup: 50 cannot be reached: the smallest student (2 layers (1 encoder " \
           "+ 1 decoder), 1 head and 16 FFN neurons each) is" in err
    assert "8 tokens generated" in err and "ask for at most" in err
    assert not os.path.exists(os.path.join(out, "student"))


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_a_seq2seq_parameters_target_is_met_and_the_recipe_reproduces_it(family, tmp_path,
                                                                         capsys):
    """A truecasing recipe on a tiny teacher with a parameters target 40% under the student:
    the search meets it, the final student has exactly the parameters it counted, the
    resolved recipe names the pruned heads by their self-attention (prune_heads' indices
    would count the cross attentions too), and run again it gives the same structure."""
    from distilkit.cli import main
    from distilkit.compress.base import from_pretrained

    def auto(teacher):
        return {"target": {"parameters": int(0.6 * sum(p.numel()
                                                       for p in teacher.parameters()))}}
    path, out, teacher = _s2s_recipe(tmp_path, family, auto)
    target = auto(teacher)["target"]["parameters"]
    assert main(["distill", path, "--no-progress"]) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert f"[distilkit] search: target parameters {target}: the final student has " in err
    res = json.load(open(os.path.join(out, "results.json")))
    s = res["search"]
    assert s["met"] and s["parameters"] <= target and s["measured_ms"] is None
    student = from_pretrained(os.path.join(out, "student"))
    assert sum(p.numel() for p in student.parameters()) == s["parameters"]
    record = json.load(open(os.path.join(out, "search.json")))
    assert record["history"][0]["measured"] > target >= record["history"][-1]["measured"]
    assert "eval_loss" in record["history"][-1]
    found = structure_of(student)
    assert list(found.heads) == record["structure"]["heads"]
    assert list(found.ffn) == record["structure"]["ffn"] and len(found.stacks) == 2
    resolved = yaml.safe_load(open(os.path.join(out, "recipe.yaml")))
    heads = [e for e in resolved["compression"] if e["method"] == "prune_heads"]
    self_name = "SelfAttention" if family == "t5" else "self_attn"
    assert all(k.endswith(self_name) for e in heads for k in e["heads"])
    resolved["output_dir"] = str(tmp_path / "again")
    (tmp_path / "again.yaml").write_text(yaml.safe_dump(resolved))
    assert main(["distill", str(tmp_path / "again.yaml"), "--no-progress"]) == 0
    again = structure_of(from_pretrained(str(tmp_path / "again" / "student")))
    assert again == found


def test_distilkit_search_reports_a_seq2seq_recipe_by_bleu_and_generation_latency(tmp_path,
                                                                                  capsys):
    """Two size targets on a tiny BART: `distilkit search` runs both and reports each
    student's BLEU against its generation latency (new_tokens tokens, timed beside the
    teacher) and size."""
    from distilkit.cli import main

    numel = sum(p.numel() for p in tiny_bart(seed=5, vocab=len(_tok())).parameters())
    timing = {k: GEN_SPEC[k] for k in ("batch", "seq_len", "threads", "clock", "new_tokens")}
    path, out, _ = _s2s_recipe(tmp_path, "bart", {"target": {"parameters": numel}, **timing})
    targets = [int(0.8 * numel), int(0.6 * numel)]
    assert main(["search", path, "--no-progress", *[a for t in targets for a in
                                                    ("--target", f"parameters={t}")]]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    line = json.loads(printed[-1])["pareto"]
    assert [r["kind"] for r in line] == ["searched", "searched", "teacher"]
    assert all(r["bleu"] is not None and r["latency_ms"] > 0 for r in line)
    assert [r["met"] for r in line[:2]] == [True, True]
    assert line[1]["parameters"] <= targets[1] < line[0]["parameters"] <= targets[0]
    report = json.load(open(os.path.join(out, "pareto.json")))
    assert report["metric"] == "bleu" and "8 tokens generated" in report["spec"]
    md = open(os.path.join(out, "pareto.md")).read()
    assert "| bleu | latency ms |" in md and "BLEU on each run's test split" in md
