"""``distilkit export --4bit``: a 4-bit quantized student's packed linears become onnxruntime
MatMulNBits nodes and its packed embeddings GatherBlockQuantized nodes, fed with the student's
own packed bytes and bucket scales, and the file predicts what the PyTorch quantized student
predicts, at batch sizes and lengths the trace never saw; no fp32 copy of a packed table is
left in the file; models the operators cannot take are refused before any work, with the
bucket sizes that would work."""
import json
import os

import numpy as np
import onnx
import pytest
import torch
from conftest import tiny_batch, tiny_bert, tiny_tokenizer
from onnx import numpy_helper
from test_export import PAIRS, TEXTS, encode, ort_logits
from torch import nn

from distilkit import export as ex
from distilkit.cli import main
from distilkit.compress import (CompressionContext, compress_, config_from_dict, finalize_,
                                load_compressed, save_compressed)
from distilkit.compress import packing
from distilkit.export import nbits


def q(bucket, bits=4, **kw):
    return {"method": "quantize", "bits": bits, "bucket_size": bucket, **kw}


# tiny_bert: hidden 32 (4 heads of 8), intermediate 64.
KINDS = {
    "bucket16": [q(16)],
    "bucket32": [q(32)],
    # Layers keep 2, 4, 2, 4 heads (in_features 16 or 32) and 16 of 64 FFN units.
    "heads_ffn_bucket16": [{"method": "prune_heads", "heads": {0: [0, 1], 2: [1, 3]}},
                           {"method": "prune_ffn", "fraction": 0.75, "importance": "l1"},
                           q(16)],
    "ffn_bucket32": [{"method": "prune_ffn", "fraction": 0.5, "importance": "l1"}, q(32)],
    # The packed word, position and token-type embeddings in GatherBlockQuantized.
    "embeddings_bucket16": [q(16, quantize_embeddings=True)],
    # The vocabulary pruned first (the id map stays a plain Gather in front), then the kept
    # rows packed: the recipes/deploy/quant4_vocab.yaml composition.
    "vocab_embeddings_bucket32": [{"method": "prune_vocab"}, q(32, quantize_embeddings=True)],
    # Only the word embedding packed: no MatMulNBits at all, one GatherBlockQuantized.
    "word_embedding_only": [q(16, quantize_embeddings=True, include=["*word_embeddings*"])],
    # A sentence-pair BiLSTM: its MLP (in_features 8 x hidden 8 = 64) in MatMulNBits, its
    # embedding (dim 16) in GatherBlockQuantized, the packed LSTM matrices as their fp32 copy.
    "bilstm_pair": [q(16, quantize_lstm=True, quantize_embeddings=True)],
}


def student(tmp_path, kind, entries=None):
    """A tiny saved student of ``kind`` (compressed by ``KINDS[kind]``, or by ``entries``)
    with its tokenizer; returns its directory."""
    path = str(tmp_path / kind)
    if kind.startswith("bilstm"):
        from distilkit.students.bilstm import build_bilstm_student

        model, tok = build_bilstm_student(None, None, TEXTS, embedding_init="random", seed=0,
                                          embedding_dim=16, hidden_size=8, mlp_hidden_size=16,
                                          dropout=0.0, sentence_pair=True)
        ctx = CompressionContext()
    else:
        tok = tiny_tokenizer(path)
        model = tiny_bert(vocab=tok.vocab_size)
        ctx = CompressionContext(dataloader=[tiny_batch(vocab=tok.vocab_size)], tokenizer=tok)
    for entry in KINDS[kind] if entries is None else entries:
        compress_(model, config_from_dict(entry), ctx)
    finalize_(model)
    save_compressed(model, path)
    tok.save_pretrained(path)
    return path


def initializers(path):
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(path).graph.initializer}


@pytest.mark.parametrize("kind", list(KINDS))
def test_4bit_file_is_the_quantized_student(tmp_path, kind):
    from transformers import AutoTokenizer

    path = student(tmp_path, kind)
    data = PAIRS if kind == "bilstm_pair" else TEXTS
    out = tmp_path / "onnx"
    res = ex.export_onnx(path, str(out), four_bit=True, check_data=data)
    assert json.load(open(out / "export.json")) == json.loads(json.dumps(res))
    four = res["files"]["4bit"]
    model = load_compressed(path).eval()
    layers = nbits.packed_linears(model)
    tables = nbits.packed_embeddings(model)
    assert four["matmulnbits_nodes"] == len(layers) and bool(layers) == (kind != "word_embedding_only")
    # The pair BiLSTM looks its one table up twice (each sentence), so two nodes share it.
    lookups = len(tables) * (2 if kind == "bilstm_pair" else 1)
    assert four["gatherblockquantized_nodes"] == lookups
    assert len(tables) == {"embeddings_bucket16": 3, "vocab_embeddings_bucket32": 3,
                           "word_embedding_only": 1, "bilstm_pair": 1}.get(kind, 0)
    assert four["argmax_agreement"] == 1.0 and four["max_abs_diff"] <= ex.TOLERANCE
    assert four["bucket_sizes"] == sorted({m.packed_specs["weight"]["bucket_size"]
                                           for _, m in layers + tables})
    assert four["accuracy_level"] == 0 and four["file"] == "model_4bit.onnx"
    assert res["serve"] == "model_4bit.onnx" and "model_4bit.onnx" in res["serve_rule"]
    assert os.path.getsize(out / "model_4bit.onnx") == four["bytes"] < res["files"]["fp32"]["bytes"]
    dequantized = (sorted(f"lstm.{w}" for w in model.lstm.packed_specs)
                   if kind == "bilstm_pair" else [])
    assert sorted(four["dequantized_in_graph"]) == dequantized
    # The terminal line counts both 4-bit operators (the packed embeddings too).
    line = next(x for x in ex.format_export(res).splitlines() if x.startswith("4bit"))
    assert (f"({len(layers)} MatMulNBits, {lookups} GatherBlockQuantized, bucket "
            f"{'/'.join(map(str, four['bucket_sizes']))}, accuracy_level 0)") in line, line

    # The operator is fed the student's own bytes: codes, alpha / 15, zero points 0, and
    # the offsets beta for the bucket-sum term; nothing re-quantized.
    graph = onnx.load(str(out / "model_4bit.onnx")).graph
    nodes = [n for n in graph.node if n.op_type == "MatMulNBits"]
    inits = initializers(str(out / "model_4bit.onnx"))
    assert len(nodes) == len(layers)
    for name, mod in layers:
        k = mod.packed_specs["weight"]["bucket_size"]
        nb = mod.in_features // k
        b = inits[f"{name}.weight_packed"]
        assert b.dtype == np.uint8 and b.shape == (mod.out_features, nb, k // 2)
        assert b.tobytes() == mod.weight_packed.numpy().tobytes()
        assert inits[f"{name}.weight_scales"].tobytes() == \
            (mod.weight_scale / 15).numpy().tobytes()
        assert not inits[f"{name}.weight_zero_points"].any()
        np.testing.assert_array_equal(inits[f"{name}.weight_offsets_t"],
                                      mod.weight_offset.view(-1, nb).t().numpy())
        node = next(n for n in nodes if n.input[1] == f"{name}.weight_packed")
        attrs = {a.name: a.i for a in node.attribute}
        assert attrs == {"K": mod.in_features, "N": mod.out_features, "bits": 4,
                         "block_size": k, "accuracy_level": 0}
    # The embeddings' GatherBlockQuantized: the packed bytes as [V, D/2], alpha / 15, zero
    # points 0 (given: the operator's default is 8), and beta for the second gather.
    gathers = [n for n in graph.node if n.op_type == "GatherBlockQuantized"]
    assert len(gathers) == lookups
    assert {n.input[0] for n in gathers} == {f"{name}.weight_packed" for name, _ in tables}
    for name, mod in tables:
        k = mod.packed_specs["weight"]["bucket_size"]
        v, d = mod.weight.shape
        codes = inits[f"{name}.weight_packed"]
        assert codes.dtype == np.uint8 and codes.shape == (v, d // 2)
        assert codes.tobytes() == mod.weight_packed.numpy().tobytes()
        assert inits[f"{name}.weight_scales"].tobytes() == \
            (mod.weight_scale / 15).numpy().tobytes()
        assert inits[f"{name}.weight_scales"].shape == (v, d // k)
        zp = inits[f"{name}.weight_zero_points"]
        assert zp.shape == (v, -(-(d // k) // 2)) and not zp.any()
        np.testing.assert_array_equal(inits[f"{name}.weight_offsets"],
                                      mod.weight_offset.view(v, d // k).numpy())
        node = next(n for n in gathers if n.input[0] == f"{name}.weight_packed")
        attrs = {a.name: a.i for a in node.attribute}
        assert attrs == {"gather_axis": 0, "quantize_axis": 1, "block_size": k, "bits": 4}
    # No fp32 copy of a quantized linear's weight or embedding table is left in the file.
    assert not any(v.dtype == np.float32 and v.shape == tuple(mod.weight.shape)
                   and np.array_equal(v, mod.weight.numpy())
                   for v in inits.values() for _, mod in layers + tables)

    # Batch sizes and padded lengths the trace never saw, the tokenizer saved beside the file.
    tok = AutoTokenizer.from_pretrained(str(out))
    for texts in (data[:3], data[3:4], data, data * 3):
        enc = encode(tok, texts, 27)
        with torch.no_grad():
            ref = model(**{k: torch.from_numpy(v) for k, v in enc.items()
                           if k in res["inputs"]}).logits.numpy()
        got = ort_logits(str(out / "model_4bit.onnx"), enc)
        assert (got.argmax(-1) == ref.argmax(-1)).all()
        np.testing.assert_allclose(got, ref, rtol=0, atol=ex.TOLERANCE)


# A table of VOCAB x 32 is most of this tiny student, as the word embedding is of MiniLM-sized
# ones (the tiny tokenizer uses its first rows; the rest are the table's weight, not its use).
VOCAB, HIDDEN, BUCKET = 3000, 32, 16


def table_student(tmp_path, quantize_embeddings):
    """A tiny 4-bit student (bucket 16) over a VOCAB-row table, its embeddings packed or not,
    with logits of order 1 (the classifier scaled up), so that 1e-5 is a tight tolerance."""
    path = str(tmp_path / f"table_{quantize_embeddings}")
    tok = tiny_tokenizer(path)
    model = tiny_bert(vocab=VOCAB)
    with torch.no_grad():
        model.classifier.weight.mul_(100)
    compress_(model, config_from_dict(q(BUCKET, quantize_embeddings=quantize_embeddings)),
              CompressionContext())
    finalize_(model)
    save_compressed(model, path)
    tok.save_pretrained(path)
    return path


def test_a_packed_embedding_is_exact_and_leaves_no_fp32_table(tmp_path):
    """With quantize_embeddings the 4-bit file predicts what the PyTorch quantized student
    predicts (logits within 1e-5, at shapes the trace never saw) and holds no fp32 table of
    VOCAB x HIDDEN; without it (the same check, which can fail) the table is there. The
    stored tensors shrink by exactly each table's fp32 bytes less its 4-bit form."""
    from transformers import AutoTokenizer

    tables, sizes = {}, {}
    for packed in (False, True):
        path = table_student(tmp_path, packed)
        out = tmp_path / f"onnx_{packed}"
        res = ex.export_onnx(path, str(out), four_bit=True, check_data=TEXTS, tolerance=1e-5)
        four = res["files"]["4bit"]
        assert four["gatherblockquantized_nodes"] == (3 if packed else 0)
        assert four["dequantized_in_graph"] == []
        model = load_compressed(path).eval()
        tok = AutoTokenizer.from_pretrained(str(out))
        scale = 0.0
        for texts in (TEXTS[:3], TEXTS[3:4], TEXTS * 3):
            enc = encode(tok, texts, 23)
            with torch.no_grad():
                ref = model(**{k: torch.from_numpy(v) for k, v in enc.items()
                               if k in res["inputs"]}).logits.numpy()
            got = ort_logits(str(out / "model_4bit.onnx"), enc)
            np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
            assert (got.argmax(-1) == ref.argmax(-1)).all()
            scale = max(scale, float(np.abs(ref).max()))
        assert scale > 0.1  # logits large enough for 1e-5 to be a real test
        inits = initializers(str(out / "model_4bit.onnx"))
        tables[packed] = [v.shape for v in inits.values()
                          if v.dtype == np.float32 and v.size >= VOCAB * HIDDEN]
        sizes[packed] = (four["bytes"], sum(v.nbytes for v in inits.values()))
        rows = [m.num_embeddings for _, m in nbits.packed_embeddings(model)]
    assert tables == {False: [(VOCAB, HIDDEN)], True: []}
    # Per row of each table (word, position, token type): HIDDEN fp32 values against
    # HIDDEN / 2 bytes of codes, alpha / 15 and beta (4 bytes each) per bucket, and one byte
    # of zero points per two buckets.
    nb = HIDDEN // BUCKET
    assert sorted(rows) == sorted([VOCAB, 64, 2])
    saved = sum(rows) * (HIDDEN * 4 - (HIDDEN // 2 + 2 * 4 * nb + -(-nb // 2)))
    assert sizes[False][1] - sizes[True][1] == saved
    assert sizes[True][0] < sizes[False][0] / 1.9


@pytest.mark.parametrize("wrong", ["offsets", "zero_points"])
def test_a_wrong_embedding_mapping_fails_the_check(tmp_path, monkeypatch, wrong):
    """The embedding's beta dropped, or zero points of 8 (the operator's default when none
    are given): the check against the PyTorch student refuses the file, nothing is written."""
    path = table_student(tmp_path, True)
    real = nbits.gather_tensors

    def broken(module):
        t = real(module)
        if wrong == "offsets":
            return {**t, "weight_offsets": torch.zeros_like(t["weight_offsets"])}
        return {**t, "weight_zero_points": torch.full_like(t["weight_zero_points"], 0x88)}

    monkeypatch.setattr(nbits, "gather_tensors", broken)
    out = tmp_path / "onnx"
    with pytest.raises(RuntimeError, match=r"the 4-bit \(MatMulNBits\) export does not compute"):
        ex.export_onnx(path, str(out), four_bit=True, check_data=TEXTS)
    assert not out.exists()


def test_constant_buckets_and_any_input_rank_are_exact(tmp_path):
    """Model-agnostic entry point on a bare module: a constant bucket (alpha = 0) whose
    codes are not 0 still decodes to beta (a float zero point could not express it), a
    bias-less layer, inputs of rank 2 and 3, a dynamic leading axis."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 16, bias=False))
    for lin in (model[0], model[2]):
        spec = packing.weight_spec(lin.weight.shape, 4, 16, "uniform")
        packing.to_packed(lin, {"weight": spec})
        nb = lin.weight.numel() // 16
        codes = torch.randint(0, 16, (nb, 16), dtype=torch.uint8)
        alpha, beta = torch.rand(nb) * 0.2, torch.randn(nb) * 0.1
        alpha[[0, 5]] = 0.0  # constant buckets, codes left non-zero
        lin.set_packed("weight", codes, alpha, beta)
    model.eval()
    path = str(tmp_path / "m.onnx")
    x = torch.randn(3, 5, 32)
    info = nbits.export_four_bit(model, model, (x,), path, input_names=["x"],
                                 output_names=["y"], dynamic_axes={"x": {0: "b", 1: "t"}})
    assert info["matmulnbits_nodes"] == 2 and info["bucket_sizes"] == [16]
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for shape in ((3, 5, 32), (1, 9, 32), (7, 1, 32)):
        x = torch.randn(*shape)
        with torch.no_grad():
            ref = model(x).numpy()
        np.testing.assert_allclose(sess.run(None, {"x": x.numpy()})[0], ref, rtol=0, atol=1e-5)
    assert model[0].forward.__func__ is packing.PackedLinear.forward  # forwards restored
    # Rank 2: the same layers on [batch, features].
    path2 = str(tmp_path / "m2.onnx")
    nbits.export_four_bit(model, model, (torch.randn(4, 32),), path2, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "b"}})
    x = torch.randn(6, 32)
    with torch.no_grad():
        ref = model(x).numpy()
    got = ort.InferenceSession(path2, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)


def test_the_graph_is_checked_against_the_packed_bytes(tmp_path):
    """finish_graph refuses a graph whose MatMulNBits B is not the layer's packed bytes."""
    path = student(tmp_path, "bucket16")
    model = load_compressed(path).eval()
    from distilkit.export.classifier import _LogitsOnly

    module = _LogitsOnly(model, ["input_ids", "attention_mask"]).eval()
    ids = torch.randint(1, 20, (2, 6))
    onnx_file = str(tmp_path / "m.onnx")
    with nbits.nbits_forwards(model) as calls:
        torch.onnx.export(module, (ids, torch.ones_like(ids)), onnx_file,
                          input_names=["input_ids", "attention_mask"], output_names=["logits"],
                          opset_version=17, custom_opsets={"com.microsoft": 1}, dynamo=False)
    name, mod = nbits.packed_linears(model)[3]
    with torch.no_grad():
        mod.weight_packed[0] ^= 0x11
    with pytest.raises(RuntimeError, match=rf"\(weight_packed\) differs from the packed buffers of layer '{name}'"):
        nbits.finish_graph(onnx_file, model, list(calls))


def test_a_wrong_mapping_fails_the_check_and_writes_nothing(tmp_path, monkeypatch):
    """Dropping the offsets (beta) from the graph changes the function: the check against the
    PyTorch quantized student catches it, and nothing is written."""
    path = student(tmp_path, "bucket16")
    real = nbits.nbits_tensors

    def no_offsets(module):
        t = real(module)
        return {**t, "offsets_t": torch.zeros_like(t["offsets_t"])}

    monkeypatch.setattr(nbits, "nbits_tensors", no_offsets)
    out = tmp_path / "onnx"
    with pytest.raises(RuntimeError, match=r"the 4-bit \(MatMulNBits\) export does not compute"):
        ex.export_onnx(path, str(out), int8=True, four_bit=True, check_data=TEXTS)
    assert not out.exists() and [n for n in os.listdir(tmp_path) if n.startswith(".tmp")] == []


def test_refusals_are_one_clear_error_before_any_work(tmp_path, monkeypatch):
    # Any work at all (the fp32 trace) would call torch.onnx.export.
    def no_export(*a, **k):
        raise AssertionError("exported before refusing")

    cases = [
        # bucket 64 on in_features 32: a bucket straddles two rows.
        ([q(64)], r"layer 'bert\.encoder\.layer\.0\.attention\.self\.query' has bucket_size 64 "
                  r"and in_features 32.*one of bucket_size \[16, 32\]"),
        # bucket 24: not a power of two.
        ([q(24)], r"bucket_size 24.*power of two >= 16"),
        # three heads of 8 left: in_features 24, no bucket size fits every layer.
        ([{"method": "prune_heads", "heads": {0: [0]}}, q(16)],
         r"in_features 24.*no bucket size works for every layer.*\[24, 32, 64\]"),
        ([q(16, bits=2)], r"packed with bits=2.*4-bit students only"),
        ([q(16, scheme="nonuniform")], r"'nonuniform' scheme"),
        ([], r"no packed 4-bit linear layer or embedding.*method: quantize, bits: 4"),
        # The BiLSTM's linears take bucket 32, its 16-wide embedding does not.
        ([q(32, quantize_embeddings=True)],
         r"layer 'embeddings' has bucket_size 32 and embedding_dim 16; GatherBlockQuantized "
         r"needs a power of two >= 16 that divides embedding_dim.*one of bucket_size \[16\]"),
    ]
    for i, (entries, pattern) in enumerate(cases):
        kind = "bilstm_refused" if i == len(cases) - 1 else f"refused{i}"
        path = student(tmp_path, kind, entries)
        monkeypatch.setattr(torch.onnx, "export", no_export)
        out = tmp_path / f"out{i}"
        with pytest.raises(ValueError, match=pattern) as e:
            ex.export_onnx(path, str(out), four_bit=True)
        monkeypatch.undo()
        assert "\n" not in str(e.value) and str(e.value).startswith("--4bit:")
        assert not out.exists()
    # The same rule before training, from the prepared student's compression records.
    from distilkit.pipeline import check_four_bit_export
    from distilkit.students.bilstm import build_bilstm_student

    prepared, _ = build_bilstm_student(None, None, TEXTS, embedding_init="random", seed=0,
                                       embedding_dim=16, hidden_size=8, mlp_hidden_size=16,
                                       dropout=0.0, sentence_pair=True)
    compress_(prepared, config_from_dict(q(32, quantize_embeddings=True)), CompressionContext())
    with pytest.raises(ValueError, match=r"^export\.four_bit: layer 'embeddings' has bucket_size "
                                         r"32 and embedding_dim 16.*one of bucket_size \[16\]"):
        check_four_bit_export(prepared)
    with pytest.raises(ValueError, match="accuracy_level=7"):
        with nbits.nbits_forwards(load_compressed(student(tmp_path, "bucket16")), 7):
            pass


def test_quantized_ops_sums_a_seq2seq_exports_graphs():
    """A seq2seq 4-bit entry keeps its figures per graph (``nbits``): the line sums them."""
    per = {"encoder": {"matmulnbits_nodes": 8, "gatherblockquantized_nodes": 1,
                       "bucket_sizes": [32], "accuracy_level": 0},
           "decoder": {"matmulnbits_nodes": 9, "gatherblockquantized_nodes": 2,
                       "bucket_sizes": [16, 32], "accuracy_level": 0}}
    assert ex.quantized_ops({"nbits": per}) == {
        "matmulnbits_nodes": 17, "gatherblockquantized_nodes": 3, "bucket_sizes": [16, 32],
        "accuracy_level": 0}
    assert ex.quantized_ops({"file": "model_int8.onnx"}) is None


def test_block_sizes_for():
    assert nbits.block_sizes_for([32, 64]) == [16, 32]
    assert nbits.block_sizes_for([384, 1536]) == [16, 32, 64, 128]
    assert nbits.block_sizes_for([24]) == [] and nbits.block_sizes_for([8]) == []
    assert nbits.block_sizes_for([]) == []


def test_cli_4bit_on_a_quantized_distilled_run(tiny_task, capsys):
    from test_cli import _recipe

    path, run = _recipe(tiny_task, compression=[q(16)])
    assert main(["distill", path, "--no-progress"]) == 0
    capsys.readouterr()
    out = os.path.join(str(tiny_task["tmp"]), "exported")
    assert main(["export", run, "--format", "onnx", "--int8", "--4bit", "--out", out]) == 0
    printed = capsys.readouterr().out
    res = json.load(open(os.path.join(out, "export.json")))
    n = len(nbits.packed_linears(load_compressed(os.path.join(run, "student"))))
    assert f"{n} MatMulNBits, 0 GatherBlockQuantized, bucket 16, accuracy_level 0" in printed
    assert "serve: model_4bit.onnx" in printed and res["serve"] == "model_4bit.onnx"
    assert sorted(res["files"]) == ["4bit", "fp32", "int8"]
    # A run without quantization: --4bit is one error line, nothing written.
    plain, run2 = _recipe(tiny_task, output_dir=str(tiny_task["tmp"] / "run2"), compression=[])
    assert main(["distill", plain, "--no-progress", "--max_steps", "1"]) == 0
    capsys.readouterr()
    assert main(["export", run2, "--4bit", "--out", out + "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("distilkit export: error: --4bit:") and len(err.strip().splitlines()) == 1
    assert not os.path.exists(out + "2")
