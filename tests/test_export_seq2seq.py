"""``distilkit export --format onnx [--int8] [--4bit]`` for seq2seq students: the encoder,
first-step decoder and decoder-with-past graphs, and :class:`OnnxSeq2SeqGenerator`'s greedy
loop over them, which must give ``model.generate``'s tokens for BART, T5 (relative position
bias with a past) and Marian (sinusoidal positions), layer-dropped and 4-bit packed students,
at batch sizes and source lengths other than the traced example's, rows finishing at
different steps."""
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
from distilkit.export import export_onnx
from distilkit.seq2seq.generate_eval import _cache_kwargs
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
    T5 gets less (0.5): at 1.0 its unnormalised residual stream grows so large that fp32
    rounding alone moves its logits by ~1e-4."""
    std = std or (0.5 if model.config.model_type == "t5" else 1.0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1 and "decoder" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def encode(tok, texts):
    enc = tok(list(texts), padding=True, return_tensors="np")
    return {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask")}


def reference(model, batch, new=NEW):
    """``model.generate``'s greedy output (with a cache that grows with the decoder, which
    generate's default cannot for a decoder deeper than the encoder)."""
    with torch.no_grad():
        return model.generate(**{k: torch.from_numpy(v) for k, v in batch.items()},
                              max_new_tokens=new, num_beams=1, do_sample=False,
                              **_cache_kwargs(model.config)).numpy()


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


def assert_generates_like_pytorch(model_dir, onnx_dir, variant="fp32"):
    """The generator's outputs equal ``model.generate``'s, array for array, on every batch;
    returns the reference outputs."""
    model = load_compressed(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    gen = OnnxSeq2SeqGenerator(onnx_dir, variant=variant)
    refs = []
    for b in batches(tok):
        ref = reference(model, b)
        got = gen.generate(b["input_ids"], b["attention_mask"], max_new_tokens=NEW)
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


def test_int8_exports_and_runs(exported):
    model_dir, res = exported["bart"]
    fp32, q = res["files"]["fp32"], res["files"]["int8"]
    assert q["graphs"] == graph_files("int8") and fp32["graphs"] == graph_files("fp32")
    for g in GRAPHS:
        assert os.path.getsize(os.path.join(res["out_dir"], q["graphs"][g])) == q["graph_bytes"][g]
        assert q["graph_bytes"][g] < fp32["graph_bytes"][g]
    assert 0.0 <= q["argmax_agreement"] <= 1.0 and 0.0 <= q["sequence_agreement"] <= 1.0
    assert res["serve_variant"] == ("int8" if q["sequence_agreement"] == 1.0 else "fp32")
    with open(os.path.join(res["out_dir"], "export.json")) as f:
        assert json.load(f) == res
    gen = OnnxSeq2SeqGenerator(res["out_dir"], variant="int8", threads=1)
    b = encode(AutoTokenizer.from_pretrained(model_dir), TEXTS)
    out = gen.generate(b["input_ids"], b["attention_mask"], max_new_tokens=NEW)
    assert out.dtype == np.int64 and out.shape[0] == len(TEXTS) and 2 <= out.shape[1] <= NEW + 1
    assert (out[:, 0] == res["generation"]["decoder_start_token_id"]).all()


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
    with pytest.raises(ValueError, match="num_beams: 2.*greedy"):
        gen.generate(ids, max_new_tokens=3, num_beams=2)
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
    # A generation setting the loop does not implement: refused, the setting named.
    m = load_compressed(model_dir)
    m.generation_config.no_repeat_ngram_size = 2
    d = str(tmp_path / "ngram")
    m.save_pretrained(d)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(d)
    with pytest.raises(ValueError, match="no_repeat_ngram_size: 2"):
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
