"""``distilkit export --format onnx [--int8] [--4bit]`` for seq2seq students: the encoder,
first-step decoder and decoder-with-past graphs, and :class:`OnnxSeq2SeqGenerator`'s greedy
and beam search loops over them, which must give ``model.generate``'s tokens for BART, T5
(relative position bias with a past) and Marian (sinusoidal positions), layer-dropped and
4-bit packed students, at batch sizes and source lengths other than the traced example's, rows
finishing at different steps; the beam bookkeeping (:mod:`distilkit.export.beam`) on its own;
the exported model measured with the recipe's beam width."""
import json
import os

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer
from conftest import tiny_bart, tiny_marian, tiny_t5, tiny_tokenizer

from distilkit.cli import main
from distilkit.compress import (CompressionContext, compress_, config_from_dict, finalize_,
                                load_compressed, save_compressed)
from distilkit.export import export_onnx, format_export
from distilkit.export import beam as bm
from distilkit.seq2seq.generate_eval import cache_kwargs
from distilkit.export.seq2seq import GRAPHS, OnnxSeq2SeqGenerator, export_seq2seq, graph_files
from distilkit.students.init import student_from_teacher

# Sources over the tiny vocabulary, of different lengths.
TEXTS = ["the film is great", "a boring dull mess", "not very good but fun",
         "the plot and the acting and the story were brilliant and charming and funny",
         "awful", "slow movie", "the acting was very good and the story was fun"]
NEW = 12  # new tokens per output, in the export's check and here
FAMILIES = {"bart": tiny_bart, "t5": tiny_t5, "marian": tiny_marian}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The PyTorch references (generate on tiny models: thousands of small matmuls) run
    several times faster on one thread than on two cores shared with other processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def lively(model, std=None, seed=1):
    """``model`` with its decoder's weight matrices redrawn at a large ``std``: a fresh tiny
    model repeats one token, this one's greedy tokens change from step to step and with the
    source, so a graph that mishandled the past (or the positions) would give other tokens.
    T5 gets less (0.5), BART 0.7: at 1.0 their residual streams grow so large that fp32
    rounding alone moves their logits by ~1e-4 (BART's by 1.02e-4 on an AVX-512 machine, over
    the export's tolerance; 5.6e-6 at 0.7, with rows still ending at five different steps)."""
    std = std or {"t5": 0.5, "bart": 0.7}.get(model.config.model_type, 1.0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1 and "decoder" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def encode(tok, texts):
    enc = tok(list(texts), padding=True, return_tensors="np")
    return {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask")}


def reference(model, batch, new=NEW, num_beams=1, **beam):
    """``model.generate``'s greedy (or ``num_beams``) output (with a cache that grows with the
    decoder, which generate's default cannot for a decoder deeper than the encoder)."""
    with torch.no_grad():
        return model.generate(**{k: torch.from_numpy(v) for k, v in batch.items()},
                              max_new_tokens=new, num_beams=num_beams, do_sample=False,
                              **beam, **cache_kwargs(model.config)).numpy()


def first_at(row, token):
    return next((j for j, t in enumerate(row[1:], 1) if t == token), None)


def pick_eos(model, batch):
    """Make the token of the model's greedy outputs whose first occurrence is at the most
    different steps across the rows the end-of-sequence token (tokens before it do not
    change), so rows finish at different steps and some never."""
    g = model.generation_config
    rows = reference(model, batch).tolist()
    taken = {g.pad_token_id, g.decoder_start_token_id, g.forced_eos_token_id}
    candidates = sorted({t for r in rows for t in r[1:]} - taken)
    g.eos_token_id = max(candidates, key=lambda t: len({first_at(r, t) for r in rows}))
    return model


def save(model, path):
    """``model`` saved with the tiny tokenizer in ``path``; its end-of-sequence token picked so
    its rows finish at different steps."""
    tok = tiny_tokenizer(path)
    pick_eos(model, encode(tok, TEXTS))
    save_compressed(model, path)
    return path


def batches(tok):
    """The sources in batches of several sizes and lengths: all, batch 1 (long and short),
    a mixed three."""
    return [encode(tok, TEXTS), encode(tok, TEXTS[3:4]), encode(tok, TEXTS[4:5]),
            encode(tok, [TEXTS[0], TEXTS[3], TEXTS[5]])]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One fp32 + int8 export per family: ``{family: (model_dir, result)}``."""
    out = {}
    for fam, build in FAMILIES.items():
        d = save(lively(build()), str(tmp_path_factory.mktemp(fam) / "student"))
        out[fam] = d, export_seq2seq(d, int8=True, check_data=TEXTS, max_new_tokens=NEW)
    return out


def assert_generates_like_pytorch(model_dir, onnx_dir, variant="fp32", num_beams=1, **beam):
    """The generator's outputs (greedy, or ``num_beams`` with the ``beam`` settings) equal
    ``model.generate``'s, array for array, on every batch; returns the reference outputs."""
    model = load_compressed(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    gen = OnnxSeq2SeqGenerator(onnx_dir, variant=variant)
    refs = []
    for b in batches(tok):
        ref = reference(model, b, num_beams=num_beams, **beam)
        got = gen.generate(b["input_ids"], b["attention_mask"], max_new_tokens=NEW,
                           num_beams=num_beams, **beam)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, ref)
        refs.append(ref)
    return refs


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_generator_equals_pytorch_greedy(exported, family):
    model_dir, res = exported[family]
    refs = assert_generates_like_pytorch(model_dir, res["out_dir"])
    # The test sees what it claims: rows ending at different steps, one running to the end,
    # tokens that change within a row.
    eos = load_compressed(model_dir).generation_config.eos_token_id
    ends = {first_at(r, eos) for r in refs[0].tolist()}
    assert len(ends) >= 3 and None in ends, ends
    assert max(len(set(r[1:])) for r in refs[0].tolist()) >= 4, refs[0]
    assert res["task"] == "seq2seq" and res["files"]["fp32"]["identical"]
    assert res["files"]["fp32"]["max_abs_diff"] <= res["tolerance"]


def test_bart_forced_eos_and_forced_bos(tmp_path):
    """BART's forced_eos_token_id (the last token at max_new_tokens) and a forced_bos_token_id
    (the first new token) are followed as generate follows them."""
    model = lively(tiny_bart())
    assert model.generation_config.forced_eos_token_id is not None
    model.generation_config.forced_bos_token_id = 7
    d = save(model, str(tmp_path / "m"))
    res = export_seq2seq(d, check_data=TEXTS, max_new_tokens=NEW)
    refs = assert_generates_like_pytorch(d, res["out_dir"])
    g = load_compressed(d).generation_config
    full = [r for r in refs[0].tolist()
            if len(r) == NEW + 1 and first_at(r, g.eos_token_id) is None]
    assert full and all(r[NEW] == g.forced_eos_token_id for r in full)
    assert all(r[1] == 7 for r in refs[0].tolist())
    # The same under beam search, where the forcing acts on the log-probs of every beam.
    beams = assert_generates_like_pytorch(d, res["out_dir"], num_beams=3)
    assert all(r[1] == 7 for r in beams[0].tolist())
    assert all(r[NEW] == g.forced_eos_token_id for r in beams[0].tolist()
               if len(r) == NEW + 1 and first_at(r, g.eos_token_id) is None)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_past_graph_is_used_one_token_a_step(exported, family):
    model_dir, res = exported[family]
    decoder = load_compressed(model_dir).get_decoder()
    layers = len(decoder.block if family == "t5" else decoder.layers)
    gen = OnnxSeq2SeqGenerator(res["out_dir"])
    past = {f"past_key_values.{i}.{k}.{kv}" for i in range(layers)
            for k in ("decoder", "encoder") for kv in ("key", "value")}
    assert {i.name for i in gen.decoder_with_past.get_inputs()} == \
        past | {"decoder_input_ids", "encoder_attention_mask"}
    assert [o.name for o in gen.decoder_with_past.get_outputs()] == ["logits"] + [
        f"present.{i}.decoder.{kv}" for i in range(layers) for kv in ("key", "value")]

    calls = []

    class Recorder:
        def __init__(self, sess):
            self.sess = sess

        def run(self, names, feeds):
            calls.append(feeds)
            return self.sess.run(names, feeds)

        def __getattr__(self, name):
            return getattr(self.sess, name)

    gen.decoder_with_past = Recorder(gen.decoder_with_past)
    tok = AutoTokenizer.from_pretrained(model_dir)
    b = encode(tok, TEXTS)
    out = gen.generate(b["input_ids"], b["attention_mask"], max_new_tokens=NEW)
    assert len(calls) == out.shape[1] - 2  # every step after the first
    for j, feeds in enumerate(calls):
        assert feeds["decoder_input_ids"].shape == (len(TEXTS), 1)
        np.testing.assert_array_equal(feeds["decoder_input_ids"][:, 0], out[:, j + 1])
        assert feeds["past_key_values.0.decoder.key"].shape[2] == j + 1
        assert feeds["past_key_values.0.encoder.key"].shape[2] == b["input_ids"].shape[1]
    # The graph reads its past: without it (zeros) the logits change.
    feeds = calls[-1]
    zeroed = {k: (np.zeros_like(v) if ".decoder." in k else v) for k, v in feeds.items()}
    sess = gen.decoder_with_past.sess
    assert not np.allclose(sess.run(None, feeds)[0], sess.run(None, zeroed)[0], atol=1e-3)


@pytest.mark.parametrize("num_beams", [2, 4])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_beam_search_equals_pytorch_beam_search(exported, family, num_beams):
    """``generate(num_beams=k)`` token for token, padding and length included, at batch 7, 1
    (long and short source) and 3 (padded), with the generation config's length penalty and
    early stopping (transformers' defaults here: 1.0, False)."""
    model_dir, res = exported[family]
    refs = assert_generates_like_pytorch(model_dir, res["out_dir"], num_beams=num_beams)
    eos = load_compressed(model_dir).generation_config.eos_token_id
    assert len({first_at(r, eos) for ref in refs for r in ref.tolist()}) >= 2


def test_beam_settings_of_the_generation_config_and_of_the_call(tmp_path):
    """The saved generation config's num_beams, length_penalty and early_stopping are
    generate's defaults, in the ONNX loop too; a call's own values override them. On this
    Marian, each of these settings gives other outputs than greedy decoding."""
    model = lively(tiny_marian())
    d = save(model, str(tmp_path / "m"))
    m = load_compressed(d)
    g = m.generation_config
    g.num_beams, g.length_penalty, g.early_stopping = 4, 2.0, True
    m.save_pretrained(d)  # pick_eos's end token kept, the beam settings added
    res = export_seq2seq(d, check_data=TEXTS, max_new_tokens=NEW)
    assert {k: res["generation"][k] for k in ("num_beams", "length_penalty", "early_stopping")} \
        == {"num_beams": 4, "length_penalty": 2.0, "early_stopping": True}
    greedy = assert_generates_like_pytorch(d, res["out_dir"])
    for beam in ({}, {"length_penalty": 0.5, "early_stopping": "never"},
                 {"length_penalty": -1.0, "early_stopping": False}):
        refs = assert_generates_like_pytorch(d, res["out_dir"], num_beams=4, **beam)
        assert any(r.shape != g.shape or (r != g).any() for r, g in zip(refs, greedy)), beam
    # Nothing given: the config's 4 beams, length penalty and early stopping, as generate
    # (which reads the same config), and not what transformers' own defaults give.
    tok = AutoTokenizer.from_pretrained(d)
    gen = OnnxSeq2SeqGenerator(res["out_dir"])
    b = encode(tok, TEXTS)
    a = gen.generate(b["input_ids"], b["attention_mask"], max_new_tokens=NEW)
    with torch.no_grad():
        want = m.generate(**{k: torch.from_numpy(v) for k, v in b.items()},
                          max_new_tokens=NEW).numpy()
    np.testing.assert_array_equal(a, want)
    c = gen.generate(b["input_ids"], b["attention_mask"], max_new_tokens=NEW, num_beams=4,
                     length_penalty=1.0, early_stopping=False)
    assert a.shape != c.shape or (a != c).any()


def test_beam_search_takes_each_beams_past_from_the_beam_it_continues(exported, monkeypatch):
    """Without the take of the past between steps (each beam keeping its own row's past),
    beam search gives other tokens than generate's: the reorder is what the equality rests
    on."""
    model_dir, res = exported["bart"]
    model = load_compressed(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    b = encode(tok, TEXTS)
    gen = OnnxSeq2SeqGenerator(res["out_dir"])
    ref = reference(model, b, num_beams=4)
    np.testing.assert_array_equal(gen.generate(b["input_ids"], b["attention_mask"], NEW,
                                               num_beams=4), ref)
    monkeypatch.setattr(bm.Beams, "reorder_index",
                        lambda self: np.arange(self.source.size))
    got = gen.generate(b["input_ids"], b["attention_mask"], NEW, num_beams=4)
    assert got.shape != ref.shape or (got != ref).any()


# ---------------------------------------------------------------------------------------
# The beam bookkeeping alone (distilkit.export.beam)
# ---------------------------------------------------------------------------------------

def probs(*rows):
    return np.log(np.array(rows, dtype=np.float32))


@pytest.mark.parametrize("length_penalty", [1.0, 0.0])
def test_beam_step_by_hand(length_penalty):
    """One row, 2 beams, vocabulary 4, end token 3. Step 1: the end token is the best
    continuation ([s, 3] finishes at log 0.4 / 1), tokens 1 and 0 stay live. Step 2: beam
    [s, 1] ends at (log 0.3 + log 0.7) / 2 ** length_penalty. With length_penalty 1 that
    (-0.780) beats -0.916 and the longer hypothesis wins; with 0 (-1.561) it does not. Both
    hypotheses finished and early_stopping=True: the search stops."""
    s = bm.init_beams(np.array([[9]]), 2, max_length=6, fill=5)
    assert s.running_scores.tolist() == [[0.0, np.float32(-1e9)]]
    first = probs([0.2, 0.3, 0.1, 0.4])
    s = bm.beam_step(s, np.repeat(first, 2, axis=0), [3], length_penalty, True)
    assert s.going and s.cur_len == 2
    assert s.running[0, :, :2].tolist() == [[9, 1], [9, 0]]
    assert s.is_finished.tolist() == [[True, False]]
    assert s.finished[0, 0, :3].tolist() == [9, 3, 5] and s.finished_len[0, 0] == 1
    np.testing.assert_allclose(s.finished_scores[0, 0], np.log(0.4), rtol=1e-6)
    np.testing.assert_array_equal(s.last_tokens(), [[1], [0]])
    np.testing.assert_array_equal(s.reorder_index(), [0, 0])  # both continue beam 0

    s = bm.beam_step(s, probs([0.1, 0.1, 0.1, 0.7], [0.6, 0.2, 0.1, 0.1]), [3],
                     length_penalty, True)
    longer = (np.log(0.3) + np.log(0.7)) / 2 ** length_penalty
    assert not s.going and s.is_finished.all()
    if length_penalty == 1.0:
        assert longer > np.log(0.4)
        np.testing.assert_array_equal(bm.best_sequences(s), [[9, 1, 3]])
        np.testing.assert_allclose(s.finished_scores[0], [longer, np.log(0.4)], rtol=1e-6)
    else:
        assert longer < np.log(0.4)
        np.testing.assert_array_equal(bm.best_sequences(s), [[9, 3]])
        np.testing.assert_allclose(s.finished_scores[0], [np.log(0.4), longer], rtol=1e-6)


@pytest.mark.parametrize("early_stopping", [True, False, "never"])
def test_beam_step_early_stopping_and_the_maximum_length(early_stopping):
    """Two rows, after two steps both with two finished hypotheses ([s, 3] at log 0.4 = -0.916,
    [s, 1, 3] at -0.780) and a best live beam [s, 0, 0] at log 0.2 + log 0.9 = -1.715.
    True stops (every row full); False goes on, as -1.715 / 2 (the current length) beats
    -0.916; "never" too (-1.715 / 3, the maximum length). At the maximum length every
    continuation ends and the search stops."""
    s = bm.init_beams(np.array([[9], [9]]), 2, max_length=4, fill=5)
    lp = probs(*[[0.2, 0.3, 0.1, 0.4]] * 4)
    s = bm.beam_step(s, lp, [3], 1.0, early_stopping)
    assert s.running[:, :, 1].tolist() == [[1, 0], [1, 0]]
    s = bm.beam_step(s, probs([0.1, 0.1, 0.1, 0.7], [0.9, 0.05, 0.04, 0.01],
                              [0.1, 0.1, 0.1, 0.7], [0.9, 0.05, 0.04, 0.01]), [3], 1.0,
                     early_stopping)
    assert s.is_finished.all()
    np.testing.assert_allclose(s.running_scores[:, 0], np.log(0.2) + np.log(0.9), rtol=1e-6)
    assert s.going == (early_stopping is not True)
    if s.going:
        s = bm.beam_step(s, lp, [3], 1.0, early_stopping)
        assert not s.going and s.cur_len == 4 and s.finished_len[:, 0].max() <= 3


def test_can_improve_is_transformers_early_stop_heuristic():
    """The early-stop rule equals transformers' own on random states, for every
    early_stopping value and length penalties of both signs."""
    from transformers.generation.utils import GenerationMixin

    rng = np.random.default_rng(0)
    for _ in range(200):
        b, k = rng.integers(1, 4), rng.integers(1, 5)
        running = -rng.random((b, k)).astype(np.float32) * 10
        finished = -rng.random((b, k)).astype(np.float32) * 10
        is_finished = rng.random((b, k)) < 0.7
        cur, prompt, max_len = int(rng.integers(2, 9)), 1, 10
        lp = float(rng.choice([-1.0, 0.0, 0.5, 1.0, 2.0]))
        for es in (True, False, "never"):
            want = GenerationMixin._check_early_stop_heuristic(
                torch.ones((b, 1), dtype=torch.bool), torch.from_numpy(running),
                torch.from_numpy(finished), torch.from_numpy(is_finished), cur, max_len,
                prompt, es, lp).numpy()
            got = bm.can_improve(running, finished, is_finished, cur - prompt,
                                 max_len - prompt, lp, es)
            np.testing.assert_array_equal(got, want)


def test_fill_id_and_bad_beam_settings():
    assert bm.fill_id(1, [2]) == 1 and bm.fill_id(0, [2]) == 2  # T5's pad 0: generate fills eos
    for args, msg in (((0, 1.0, False), "num_beams: 0"), ((True, 1.0, False), "num_beams: True"),
                      ((2, "long", False), "length_penalty: 'long'"),
                      ((2, float("nan"), False), "length_penalty: nan"),
                      ((2, 1.0, "sometimes"), "early_stopping: 'sometimes'"),
                      ((2, 1.0, 1), "early_stopping: 1")):
        with pytest.raises(ValueError, match=msg):
            bm.check_beam_settings(*args)


def test_measured_with_the_recipes_beam_width(exported):
    """evaluate_seq2seq_export (distilkit evaluate, the recipe's export: step) decodes every
    runtime with the recipe's generation settings, num_beams included: the ONNX runtime
    generates what PyTorch generates with 3 beams. Sampling is refused in one line."""
    from datasets import Dataset

    from distilkit.export.measure import OrtSeq2Seq, evaluate_seq2seq_export, format_runtimes

    model_dir, res = exported["t5"]
    data = Dataset.from_dict({"source": TEXTS, "target": TEXTS})
    out = evaluate_seq2seq_export(res["out_dir"], data, latency=False, progress=False,
                                  generation={"num_beams": 3, "max_new_tokens": NEW,
                                              "batch_size": 4})
    assert out["generation"]["num_beams"] == 3
    rt = out["runtimes"]
    assert rt["onnx-fp32"]["agreement"] == 1.0
    assert rt["onnx-fp32"]["bleu"] == rt["pytorch-fp32"]["bleu"]
    assert "beam 3, length_penalty 1, at most 12 new tokens" in format_runtimes(out)
    model = load_compressed(model_dir)
    ort = OrtSeq2Seq(res["out_dir"], "fp32", model.config, model.generation_config)
    with pytest.raises(ValueError, match="do_sample: True; .*greedily or by beam search"):
        ort.generate(torch.tensor([[5, 6, 7]]), do_sample=True)


def test_int8_exports_and_runs(exported):
    model_dir, res = exported["bart"]
    fp32, q = res["files"]["fp32"], res["files"]["int8"]
    assert q["graphs"] == graph_files("int8") and fp32["graphs"] == graph_files("fp32")
    for g in GRAPHS:
        assert os.path.getsize(os.path.join(res["out_dir"], q["graphs"][g])) == q["graph_bytes"][g]
    # (tiny graphs: their nodes outweigh their weights, so only the weights are compared)
    assert q["weights_bytes"] < fp32["weights_bytes"]
    assert 0.0 <= q["argmax_agreement"] <= 1.0 and 0.0 <= q["sequence_agreement"] <= 1.0
    assert res["serve_variant"] == ("int8" if q["sequence_agreement"] == 1.0 else "fp32")
    with open(os.path.join(res["out_dir"], "export.json")) as f:
        assert json.load(f) == res
    gen = OnnxSeq2SeqGenerator(res["out_dir"], variant="int8", threads=1)
    b = encode(AutoTokenizer.from_pretrained(model_dir), TEXTS)
    out = gen.generate(b["input_ids"], b["attention_mask"], max_new_tokens=NEW)
    assert out.dtype == np.int64 and out.shape[0] == len(TEXTS) and 2 <= out.shape[1] <= NEW + 1
    assert (out[:, 0] == res["generation"]["decoder_start_token_id"]).all()


def test_the_graphs_keep_one_copy_of_the_weights_they_share(exported):
    """The two decoder graphs hold the same decoder: each variant's graphs keep their weights
    in one file, each tensor once, about the size of the safetensors file (traced apart the
    three graphs held ~2.7x it), and every large initializer reads from the variant's own
    weights file."""
    import onnx

    from distilkit.export.seq2seq import weights_file
    from distilkit.export.shared_weights import MIN_BYTES

    model_dir, res = exported["bart"]
    st = os.path.getsize(os.path.join(model_dir, "model.safetensors"))
    for variant in ("fp32", "int8"):
        f = res["files"][variant]
        assert f["weights_file"] == weights_file(variant)
        assert f["shared_tensors"] > 0
        on_disk = sum(f["graph_bytes"].values()) + os.path.getsize(
            os.path.join(res["out_dir"], f["weights_file"]))
        assert f["bytes"] == on_disk
        for g in GRAPHS:
            graph = onnx.load(os.path.join(res["out_dir"], f["graphs"][g]),
                              load_external_data=False).graph
            big = [t for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
            assert big and all(next(e.value for e in t.external_data if e.key == "location")
                               == f["weights_file"] for t in big)
            inline = [t for t in graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
            assert all(len(t.raw_data) < MIN_BYTES for t in inline)
    # (a tiny model's graph structure outweighs its weights: the weights file is compared)
    assert res["files"]["fp32"]["weights_bytes"] < 1.3 * st, (res["files"]["fp32"], st)


def students(tmp_path):
    """A BART student with one of two decoder layers; a T5 student with one encoder layer
    under two decoder layers (a decoder deeper than the encoder); a 4-bit packed BART."""
    bart_half = lively(student_from_teacher(tiny_bart(), num_decoder_layers=1))
    t5_shallow = lively(student_from_teacher(tiny_t5(), num_layers=1))
    # Gentler weights here: at std 1.0 the residual stream is so large that MatMulNBits' fp32
    # rounding, other than PyTorch's, moves the logits by ~1e-4.
    packed = lively(tiny_bart(), std=0.3)
    compress_(packed, config_from_dict({"method": "quantize", "bits": 4, "bucket_size": 32}),
              CompressionContext())
    finalize_(packed)
    return {"bart_1_decoder_layer": bart_half, "t5_1_encoder_layer": t5_shallow,
            "bart_4bit_packed": packed}


def test_students_export_their_function(tmp_path):
    for name, model in students(tmp_path).items():
        d = save(model, str(tmp_path / name))
        packed = name.endswith("packed")
        res = export_onnx(d, check_data=TEXTS, four_bit=packed)  # distilkit export's dispatch
        assert res["task"] == "seq2seq", name
        assert_generates_like_pytorch(d, res["out_dir"])
        if packed:
            # The packed codes as MatMulNBits in every graph, generating PyTorch's tokens.
            assert_generates_like_pytorch(d, res["out_dir"], variant="4bit")
            nbits = res["files"]["4bit"]["nbits"]
            assert all(nbits[g]["matmulnbits_nodes"] > 0 for g in GRAPHS), nbits
            assert res["serve_variant"] == "4bit"
            assert res["files"]["4bit"]["bytes"] < res["files"]["fp32"]["bytes"]
            # The terminal line sums the three graphs' 4-bit operators.
            line = next(x for x in format_export(res).splitlines() if x.startswith("4bit"))
            total = sum(nbits[g]["matmulnbits_nodes"] for g in GRAPHS)
            assert f"({total} MatMulNBits, 0 GatherBlockQuantized, bucket 32," in line, line


def test_failed_check_writes_nothing(tmp_path, monkeypatch):
    """A with-past graph that loses the self-attention past fails the check: RuntimeError,
    and no output directory."""
    from distilkit.export import seq2seq as sx

    d = save(lively(tiny_t5()), str(tmp_path / "m"))
    forward = sx._NextStep.forward

    def forgetful(self, ids, mask, *past):
        return forward(self, ids, mask, *[torch.zeros_like(p) if i % 4 < 2 else p
                                          for i, p in enumerate(past)])

    monkeypatch.setattr(sx._NextStep, "forward", forgetful)
    out = str(tmp_path / "onnx")
    with pytest.raises(RuntimeError, match="nothing was written"):
        export_seq2seq(d, out, check_data=TEXTS, max_new_tokens=NEW)
    assert not os.path.exists(out)
    assert sorted(os.listdir(tmp_path)) == ["m"]


def test_bad_input_is_one_clear_error(exported, tmp_path):
    model_dir, res = exported["t5"]
    with pytest.raises(ValueError, match="--4bit: the model has no packed 4-bit linear"):
        export_seq2seq(model_dir, str(tmp_path / "x"), four_bit=True)
    assert not os.path.exists(str(tmp_path / "x"))
    with pytest.raises(ValueError, match="check_data: .*source sentences.*no 'first<TAB>"):
        export_seq2seq(model_dir, str(tmp_path / "x"), check_data=[("the film", "is great")])
    with pytest.raises(ValueError, match="check_data: 1 sentence; give at least 2"):
        export_seq2seq(model_dir, str(tmp_path / "x"), check_data=["the film is great"])
    gen = OnnxSeq2SeqGenerator(res["out_dir"])
    ids = np.array([[5, 6, 7]])
    with pytest.raises(ValueError, match="num_beams: 0 must be an integer >= 1"):
        gen.generate(ids, max_new_tokens=3, num_beams=0)
    with pytest.raises(ValueError, match="early_stopping: 'sometimes'"):
        gen.generate(ids, max_new_tokens=3, num_beams=2, early_stopping="sometimes")
    with pytest.raises(ValueError, match="max_new_tokens: 0"):
        gen.generate(ids, max_new_tokens=0, num_beams=2)
    with pytest.raises(ValueError, match="max_new_tokens: 0"):
        gen.generate(ids, max_new_tokens=0)
    with pytest.raises(ValueError, match="attention_mask: shape"):
        gen.generate(ids, np.ones((1, 2)), max_new_tokens=3)
    with pytest.raises(FileNotFoundError, match="export.json"):
        OnnxSeq2SeqGenerator(str(tmp_path))
    only_fp32 = str(tmp_path / "fp32_only")
    export_seq2seq(model_dir, only_fp32, check_data=TEXTS[:2], max_new_tokens=3)
    with pytest.raises(ValueError, match="variant: 'int8' was not exported.*--int8"):
        OnnxSeq2SeqGenerator(only_fp32, variant="int8")
    # A generation setting the loop does not implement: refused, the setting named. Sampling
    # and several outputs per source too: generate would sample (or return k rows) by default.
    for name, value in (("no_repeat_ngram_size", 2), ("do_sample", True),
                        ("num_return_sequences", 2)):
        m = load_compressed(model_dir)
        setattr(m.generation_config, name, value)
        if name == "num_return_sequences":
            m.generation_config.num_beams = 2  # what saving it needs
        d = str(tmp_path / name)
        m.save_pretrained(d)
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(d)
        with pytest.raises(ValueError, match=f"generation_config.{name}: {value}"):
            export_seq2seq(d)
        assert not os.path.exists(os.path.join(d, "onnx"))


def test_decode_and_saved_files(exported):
    model_dir, res = exported["bart"]
    gen = OnnxSeq2SeqGenerator(res["out_dir"])
    tok = AutoTokenizer.from_pretrained(model_dir)
    b = encode(tok, TEXTS[:3])
    out = gen.generate(b["input_ids"], b["attention_mask"], max_new_tokens=NEW)
    eos = res["generation"]["eos_token_id"]
    want = []
    for row in out.tolist():
        row = row[1:]
        cut = next((j for j, t in enumerate(row) if t in eos), len(row))
        want.append(tok.decode(row[:cut + 1], skip_special_tokens=True))
    assert gen.decode(out) == want
    for f in ("config.json", "generation_config.json", "tokenizer.json", "export.json"):
        assert os.path.isfile(os.path.join(res["out_dir"], f)), f


def test_cli_export_prints_its_lines(tmp_path, capsys):
    d = save(lively(tiny_t5()), str(tmp_path / "run" / "student"))
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n")
    assert main(["export", str(tmp_path / "run"), "--int8", "--texts", str(texts)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith(f"exported {os.path.abspath(d)} -> ")
    assert "input_ids, attention_mask" in lines[0]
    assert lines[1].startswith("fp32") and "{encoder,decoder,decoder_with_past}.onnx" in lines[1]
    assert lines[2].startswith("int8") and "_int8.onnx" in lines[2]
    assert lines[3].startswith("serve: ")
    assert os.path.isfile(os.path.join(d, "onnx", "decoder_with_past_int8.onnx"))
