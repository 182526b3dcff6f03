"""distilkit.search: exact parameter counts of pruned structures (structure.py) and the measured
latency table (latency.py): its predictions against measured pruned models, its cache, its
refusals."""
import dataclasses
import statistics

import pytest
import torch
from transformers import (BertConfig, BertForSequenceClassification, DistilBertConfig,
                          DistilBertForSequenceClassification, ElectraConfig,
                          ElectraForSequenceClassification)

from distilkit.compress import compress_
from distilkit.compress.prune import PruneFFNConfig, PruneHeadsConfig, PruneLayersConfig
from distilkit.search.structure import (BaseShape, Structure, base_shape_of, parameters,
                                        size_mb, structure_of)


def _numel(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _tiny_bert(**kw):
    cfg = dict(vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
               intermediate_size=64, max_position_embeddings=40, num_labels=3)
    cfg.update(kw)
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(**cfg)).eval()


def _tiny(family: str):
    torch.manual_seed(0)
    if family == "distilbert":
        return DistilBertForSequenceClassification(DistilBertConfig(
            vocab_size=120, dim=32, n_layers=3, n_heads=4, hidden_dim=64,
            max_position_embeddings=40, num_labels=3)).eval()
    if family == "electra":  # a word table narrower than the model (its own projection)
        return ElectraForSequenceClassification(ElectraConfig(
            vocab_size=120, embedding_size=16, hidden_size=32, num_hidden_layers=3,
            num_attention_heads=4, intermediate_size=64, max_position_embeddings=40,
            num_labels=3)).eval()
    return _tiny_bert()


@pytest.mark.parametrize("family", ["bert", "distilbert", "electra"])
def test_parameters_equal_the_pruned_models_numel(family):
    model = _tiny(family)
    shape = base_shape_of(model)
    assert structure_of(model) == shape.full_structure(3)
    assert parameters(structure_of(model), shape) == _numel(model)
    compress_(model, PruneHeadsConfig(heads={0: [1, 2], 2: [0, 1, 3]}))
    assert structure_of(model).heads == (2, 4, 1)
    assert parameters(structure_of(model), shape) == _numel(model)
    compress_(model, PruneFFNConfig(neurons={1: list(range(0, 64, 3)), 2: [5]}))
    assert structure_of(model).ffn == (64, 42, 63)
    assert parameters(structure_of(model), shape) == _numel(model)
    compress_(model, PruneLayersConfig(layers=[0]))
    s = structure_of(model)
    assert s == Structure((4, 1), (42, 63), 120)
    # the config still names the unpruned widths: the shape a table is keyed by is unchanged
    assert base_shape_of(model) == shape
    assert parameters(s, shape) == _numel(model)
    assert size_mb(s, shape) == pytest.approx(4 * _numel(model) / 1e6)
    assert size_mb(s, shape, 1.0) == pytest.approx(_numel(model) / 1e6)


def test_default_other_params_is_berts():
    model = _tiny_bert()
    shape = base_shape_of(model)
    plain = BaseShape(**{**shape.key(), "other_params": None})
    assert plain.other() == shape.other()


def test_structure_refuses_what_pruning_cannot_make():
    with pytest.raises(ValueError, match="heads has 2 layers but ffn has 1"):
        Structure((1, 2), (4,), 10)
    with pytest.raises(ValueError, match="at least 1 head"):
        Structure((0,), (4,), 10)
    with pytest.raises(ValueError, match="vocab"):
        Structure((1,), (4,), 0)
    with pytest.raises(ValueError, match="bytes_per_param"):
        size_mb(Structure((1,), (4,), 10), base_shape_of(_tiny_bert()), 0)


def test_an_encoder_decoder_is_counted_but_not_timed():
    """A BART (here with a classification head) is a structure with two stacks, counted
    exactly, but the latency table, which times one encoder's forward pass, refuses it."""
    from transformers import BartConfig, BartForSequenceClassification

    m = BartForSequenceClassification(BartConfig(vocab_size=50, d_model=16, encoder_layers=1,
                                                 decoder_layers=1, encoder_attention_heads=2,
                                                 decoder_attention_heads=2,
                                                 encoder_ffn_dim=16, decoder_ffn_dim=16))
    st = structure_of(m)
    assert st.stacks == (1, 1)
    assert parameters(st, base_shape_of(m)) == sum(p.numel() for p in m.parameters())
    with pytest.raises(ValueError, match="encoder-decoder \\(seq2seq\\) model, timed generating new_tokens"):
        LatencyTable.for_model(m, RuntimeSpec("pytorch", 2, 8, 1, "cpu"))


# ---------------------------------------------------------------------------------------
# The latency table
# ---------------------------------------------------------------------------------------

import copy  # noqa: E402
import json  # noqa: E402

from distilkit.search import latency  # noqa: E402
from distilkit.search.latency import (RUNTIMES, LatencyTable, RuntimeSpec,  # noqa: E402
                                      measure_model_ms)

# Timed on the process's CPU clock with one thread: other people's work on this shared 2-core
# machine does not inflate it (a wall clock under their load varied 40x from run to run).
SPEC = RuntimeSpec("pytorch", batch=8, seq_len=32, threads=1, clock="cpu")


def _timing_bert(intermediate: int = 512):
    return _tiny_bert(vocab_size=1000, hidden_size=256, num_hidden_layers=4,
                      num_attention_heads=4, intermediate_size=intermediate,
                      max_position_embeddings=64, num_labels=2)


def _pruned_models(model) -> dict:
    out = {"full": model}
    m = copy.deepcopy(model)
    compress_(m, PruneHeadsConfig(heads={0: [0, 1], 1: [3], 3: [1, 2, 3]}))
    out["heads"] = m
    m = copy.deepcopy(model)
    compress_(m, PruneFFNConfig(neurons={0: list(range(300)), 2: list(range(100))}))
    out["ffn"] = m
    m = copy.deepcopy(model)
    compress_(m, PruneLayersConfig(layers=[1, 2]))
    out["layers"] = m
    m = copy.deepcopy(out["ffn"])
    compress_(m, PruneHeadsConfig(heads={0: [0, 1, 2], 2: [0]}))
    compress_(m, PruneLayersConfig(layers=[3]))
    out["mixed"] = m  # heads (1, 4, 3), neurons (212, 512, 412): off the grid
    return out


@pytest.fixture(scope="module")
def timed(tmp_path_factory):
    model = _timing_bert()
    cache = str(tmp_path_factory.mktemp("latency"))
    return model, LatencyTable.for_model(model, SPEC, cache_dir=cache, progress=False), cache


def _ratio_errors(table, full, models: dict, repeats: int = latency.MEASURE_REPEATS,
                  pairings: int = 1) -> dict:
    """Each model's predicted speed-up over ``full`` against the one measured side by side with
    it (:func:`measure_pair_ms`): ``name -> (predicted ratio, measured ratio, relative error)``.
    A speed-up target uses the table this way, and a ratio timed in alternating turns is the
    figure the machine's drift leaves alone: the CPU ran 15% faster or slower from one second
    to the next on the AMD 2-core machines (2026-12-03, CPU clock too), so a table measured in
    a slow moment read 30-57% above models timed later, one after the other (CI, 2026-12-03).
    ``pairings``: the measured ratio is the median of that many pairings (as the search's
    final check takes three)."""
    from distilkit.search.latency import measure_pair_ms

    predicted_full = table.predict_ms(structure_of(full))
    errors = {}
    for name, m in models.items():
        measured = statistics.median(
            a / b for a, b in (measure_pair_ms(m, full, table.spec, repeats)
                               for _ in range(pairings)))
        predicted = table.predict_ms(structure_of(m)) / predicted_full
        errors[name] = (round(predicted, 3), round(measured, 3), predicted / measured - 1)
    return errors


def _absolute_error(table, model) -> float:
    """The full model's predicted ms against a median of its measured ones, as a factor."""
    measured = sorted(table.measure_ms(model) for _ in range(3))[1]
    return max(table.predict_ms(structure_of(model)) / measured,
               measured / table.predict_ms(structure_of(model)))


# The CPU's drift between the table's minute and the model's (see _ratio_errors) is bounded
# by this, not by the tolerance: the absolute figure is only held to the right scale.
ABSOLUTE_FACTOR = 2.0


def test_table_predicts_measured_latency_of_pruned_models(timed, tmp_path):
    model, table, _ = timed
    assert table.measured and table.tolerance == latency.TOLERANCE
    assert table.heads == [1, 2, 3, 4] and table.ffn[0] == 1 and table.ffn[-1] == 512
    assert table.base_ms() > 0
    pruned = {k: v for k, v in _pruned_models(model).items() if k != "full"}
    errors = _ratio_errors(table, model, pruned)
    if not all(abs(e) <= table.tolerance for _, _, e in errors.values()):
        # A table whose grid was measured across a change of the CPU's speed mispredicts
        # every model after it; the search measures its table again when it mispredicts its
        # student by more than the tolerance; so does this test, once.
        table = LatencyTable.for_model(model, SPEC, cache_dir=str(tmp_path), progress=False)
        errors = _ratio_errors(table, model, pruned)
    assert all(abs(e) <= table.tolerance for _, _, e in errors.values()), errors
    assert _absolute_error(table, model) <= ABSOLUTE_FACTOR
    # and the figures order the structures as their sizes do
    assert errors["layers"][0] < 1 and errors["mixed"][0] < 1


def test_onnx_int8_table_predicts_a_pruned_model(tmp_path):
    model = _timing_bert()
    # batch 32: int8 layers of this width take ~1 ms at batch 8, mostly per-op overhead
    spec = RuntimeSpec("onnx_int8", batch=32, seq_len=32, threads=1, clock="cpu")
    table = LatencyTable.for_model(model, spec, cache_dir=str(tmp_path), progress=False, grid=2)
    mixed = {"mixed": _pruned_models(model)["mixed"]}
    # One export of each model, timed in alternating turns, the median of three pairings.
    # The mixed student is exported without fused attention (a head is pruned) and the full
    # model with it: a version-2 table, which priced both in one (unfused) graph, predicted
    # 0.57-0.58 where an AMD 2-core machine measured 0.45-0.52 (CI failed at 27%, 2026-12-07)
    # and an Intel one 0.55; version 3 predicts 0.538 against 0.546 (Intel, 2026-12-08).
    errors = _ratio_errors(table, model, mixed, pairings=3)
    if abs(errors["mixed"][2]) > table.tolerance:
        # as the search does when its table mispredicts its student: measure it again, once
        table = LatencyTable.for_model(model, spec, cache_dir=str(tmp_path / "again"),
                                       progress=False, grid=2)
        errors = _ratio_errors(table, model, mixed, pairings=3)
    assert abs(errors["mixed"][2]) <= table.tolerance, errors
    assert _absolute_error(table, model) <= ABSOLUTE_FACTOR


def _fake_ms(model, spec, repeats=latency.MEASURE_REPEATS):
    """A latency linear in heads and neurons per layer: bilinear interpolation is exact on it."""
    s = structure_of(model)
    return 1.0 + spec.batch + sum(0.5 * h + 0.01 * f for h, f in zip(s.heads, s.ffn))


def _fake_timing(monkeypatch, cost=_fake_ms, load=lambda seconds: 1.0) -> list:
    """Time every run on a fake clock: a run of a model takes ``cost(model, spec)`` ms times
    the machine's ``load`` at that moment (seconds of the fake clock); a runner opened without
    fused attention asks ``cost(model, spec, attention=False)``. Returns the list of models
    whose runner was opened, in order."""
    import contextlib

    now, opened = [0.0], []

    @contextlib.contextmanager
    def runner(model, spec, attention=True):
        opened.append(model)
        ms = cost(model, spec) if attention else cost(model, spec, attention=False)

        def run():
            now[0] += ms * load(now[0]) / 1000

        yield run

    monkeypatch.setattr(latency, "_runner", runner)
    monkeypatch.setitem(latency.CLOCKS, SPEC.clock, lambda: now[0])
    return opened


def test_table_adds_base_and_interpolated_layers(tmp_path, monkeypatch):
    _fake_timing(monkeypatch)
    model = _timing_bert()
    table = LatencyTable.for_model(model, SPEC, cache_dir=str(tmp_path), progress=False, grid=3)
    assert table.heads == [1, 3, 4] and table.ffn == [1, 257, 512]
    assert table.base_ms() == pytest.approx(1.0 + SPEC.batch)
    assert table.layer_ms(2, 300) == pytest.approx(0.5 * 2 + 0.01 * 300)
    for m in _pruned_models(model).values():
        assert table.predict_ms(structure_of(m)) == pytest.approx(_fake_ms(m, SPEC))
    with pytest.raises(ValueError, match="heads=5, ffn=10 outside this table's shape"):
        table.layer_ms(5, 10)


def test_a_machine_getting_busier_while_the_table_is_measured_moves_no_unit_s_price(
        tmp_path, monkeypatch):
    """The machine's load tripling while the table is measured (another job starting) slows
    every model alike: its relative prices stay the law's. Timed one model after the other,
    row by row, the later rows (more heads) read dearer and a head was priced 2-3x its cost
    (a seq2seq search then took heads where a decoder layer was the saving: BLEU 2.77,
    2026-12-07); timed in turns with one stopwatch model, each price is its ratio to it."""
    _fake_timing(monkeypatch, load=lambda seconds: 1.0 + 2.0 * min(seconds / 8.0, 1.0))
    model = _timing_bert()
    table = LatencyTable.for_model(model, SPEC, cache_dir=str(tmp_path), progress=False, grid=3)
    fixed, per_head, per_neuron = table.fit
    # the law (_fake_ms): a layer costs 0.5 ms a head and 0.01 a neuron, nothing fixed;
    # the scale is the stopwatch's median load, the same for every price
    scale = per_neuron / 0.01
    assert per_head / scale == pytest.approx(0.5, rel=0.05)
    assert fixed / scale == pytest.approx(0.0, abs=0.1)
    full = table.predict_ms(structure_of(model))
    for name, m in _pruned_models(model).items():
        truth = _fake_ms(m, SPEC) / _fake_ms(model, SPEC)
        assert table.predict_ms(structure_of(m)) / full == pytest.approx(truth, rel=0.03), name


INT8 = RuntimeSpec("onnx_int8", batch=8, seq_len=32, threads=1, clock="cpu")


def _fake_int8_ms(model, spec, attention=True):
    """A model's int8 graph as the export makes it: with fused attention when asked and no
    head is pruned (then the embeddings cost 0.25 ms less and every layer 1 ms more), else
    without: the plain law of :func:`_fake_ms`."""
    s = structure_of(model)
    fused = attention and all(h == base_shape_of(model).num_heads for h in s.heads)
    return _fake_ms(model, spec) + (len(s.heads) - 0.25 if fused else 0.0)


def test_an_int8_table_prices_each_structure_in_the_graph_its_export_gets(tmp_path,
                                                                         monkeypatch):
    """onnxruntime fuses attention with one head count for the whole model, so a student with
    a head pruned anywhere is exported without the fused attention, and one keeping every
    head with it. The int8 table has a law for each; a version-2 table priced both with one
    (and, its grid layers not reaching the export's switch to eager attention, with none
    fused), which put a pruned student's speed-up 7% (Intel) to 27% (AMD CI) off."""
    opened = _fake_timing(monkeypatch, _fake_int8_ms)
    model = _timing_bert()
    table = LatencyTable.for_model(model, INT8, cache_dir=str(tmp_path), progress=False,
                                   grid=3)
    # the stopwatch, the base and the 3 x 3 grid, then the fused base and 3 fused layers
    assert len(opened) == 1 + 1 + 9 + 1 + 3 and table.fused_fit is not None
    for name, m in _pruned_models(model).items():
        assert table.predict_ms(structure_of(m)) == pytest.approx(
            _fake_int8_ms(m, INT8), rel=1e-6), name
    assert table.fused_layers(structure_of(model)) == [True] * 4
    assert table.fused_layers(structure_of(_pruned_models(model)["heads"])) == [False] * 4
    # a factorized attention weight breaks the fused pattern of its own layer only
    ranked = Structure((4, 4), (512, 512), 1000, ranks=((0,) * 6, (8, 0, 0, 0, 0, 0)))
    assert table.fused_layers(ranked) == [True, False]
    with pytest.raises(ValueError, match="fused=True is for an int8 table's layers keeping"):
        table.layer_ms(3, 100, fused=True)
    # the cached table reads back with its fused law
    monkeypatch.setattr(latency, "_runner", lambda *a, **k: pytest.fail("measured again"))
    again = LatencyTable.for_model(model, INT8, cache_dir=str(tmp_path), progress=False, grid=3)
    assert not again.measured and again.fused_fit == pytest.approx(table.fused_fit)
    assert again.predict_ms(structure_of(model)) == pytest.approx(
        table.predict_ms(structure_of(model)))
    # pytorch and fp32 onnx have no fused graphs: one law
    _fake_timing(monkeypatch, _fake_int8_ms)
    assert LatencyTable.for_model(model, SPEC, cache_dir=str(tmp_path / "pt"), progress=False,
                                  grid=2).fused_fit is None


def test_a_grid_layer_is_exported_with_the_fused_graph_a_student_gets(tmp_path):
    """The one-layer model of a grid point shares its config with its layer: a copy of its
    own (deepcopy's default) kept SDPA when the int8 export switched the model to eager
    attention to fuse it, so the table's layers were traced unfused (no QAttention) while a
    student of the same structure ran fused."""
    import collections

    import onnx

    model = _timing_bert()
    one = latency._empty_stack_model(model, 1)
    latency._pruned_layer(one.bert.encoder.layer[0], one, 4, 512)   # as the table does
    assert one.bert.encoder.layer[0].attention.self.config is one.config
    path = latency._onnx_file(one, "onnx_int8", str(tmp_path))
    ops = collections.Counter(n.op_type for n in onnx.load(path).graph.node)
    assert ops["QAttention"] == 1 and ops["QEmbedLayerNormalization"] == 1, ops
    (tmp_path / "plain").mkdir()
    path = latency._onnx_file(one, "onnx_int8", str(tmp_path / "plain"), attention=False)
    ops = collections.Counter(n.op_type for n in onnx.load(path).graph.node)
    assert ops["QAttention"] == 0 and ops["MatMulInteger"] > 0, ops


def test_a_noisy_grid_gives_a_cost_that_falls_with_every_unit_removed():
    """The built-in shape's table as measured on 2026-12-02 (12 heads x 7 FFN widths): noise
    made it non-monotone (at 1,024 neurons, 12 heads 45.2 ms and 11 heads 62.5 ms), so read
    bilinearly a head or a block of neurons "saved" nothing there and the search could only
    drop a whole layer (2x asked, 3.4x got). The fitted law falls with every head and neuron
    removed, holds the grid to its noise, and recovers an exact linear law exactly."""
    from distilkit.search.latency import fit_layer_cost
    from distilkit.search.structure import BaseShape

    heads, ffn = list(range(1, 13)), [1, 257, 513, 769, 1024, 1280, 1536]
    grid = [[7.5, 17.2, 25.0, 31.6, 36.4, 40.9, 46.7], [6.3, 11.5, 27.7, 34.4, 38.7, 43.5, 44.7],
            [7.8, 13.2, 30.0, 33.7, 39.2, 45.6, 51.9], [9.3, 14.7, 36.6, 41.3, 40.9, 49.0, 51.7],
            [10.9, 15.7, 28.4, 37.3, 42.0, 49.0, 52.5], [12.9, 20.3, 30.2, 34.3, 44.1, 52.9, 65.0],
            [18.3, 25.8, 32.4, 42.3, 49.2, 56.5, 62.1], [17.8, 25.4, 31.1, 44.1, 51.7, 56.4, 58.6],
            [22.4, 29.1, 36.7, 48.3, 51.5, 57.0, 76.1], [22.7, 29.1, 35.8, 52.5, 55.0, 63.7, 70.4],
            [24.2, 28.0, 36.4, 40.7, 62.5, 67.3, 65.7], [26.2, 35.9, 43.6, 47.4, 45.2, 50.1, 66.5]]
    shape = BaseShape(family="bert", hidden=384, num_heads=12, head_dim=32, intermediate=1536,
                      vocab=30522, num_labels=2, max_positions=512)
    table = LatencyTable(shape, SPEC, heads, ffn, 1.1, grid)
    for h in range(1, 13):
        for f in range(64, 1537, 64):
            if h > 1:
                assert table.layer_ms(h - 1, f) < table.layer_ms(h, f)
            assert table.layer_ms(h, f - 63) < table.layer_ms(h, f)
    assert table.layer_ms(11, 1024) < table.layer_ms(12, 1024)
    assert table.fit_error < 0.1
    assert abs(table.layer_ms(12, 1536) / statistics.median(row[-1] for row in grid[-3:]) - 1) \
        < 0.1
    exact = [[2.0 + 0.5 * h + 0.01 * f for f in ffn] for h in heads]
    assert fit_layer_cost(heads, ffn, exact) == pytest.approx((2.0, 0.5, 0.01))
    # A figure the noise would make negative is 0 (a cost never grows as units go).
    flat = [[5.0 - 0.001 * f for f in ffn] for _ in heads]
    fixed, per_head, per_neuron = fit_layer_cost(heads, ffn, flat)
    assert per_head >= 0 and per_neuron == 0 and fixed == pytest.approx(
        statistics.mean(v for row in flat for v in row))


def test_cache_serves_the_second_call_and_keys_shape_and_spec(tmp_path, monkeypatch):
    calls = _fake_timing(monkeypatch)
    model, cache = _timing_bert(), str(tmp_path)
    first = LatencyTable.for_model(model, SPEC, cache_dir=cache, progress=False, grid=2)
    assert first.measured and len(calls) == 6  # the stopwatch, the base, 2 x 2 one-layer models

    def refuse(*a, **k):
        raise AssertionError("measured although the table is cached")

    monkeypatch.setattr(latency, "_runner", refuse)
    again = LatencyTable.for_model(model, SPEC, cache_dir=cache, progress=False, grid=2)
    assert not again.measured and again.path == first.path
    assert again.predict_ms(Structure((2, 3), (100, 400), 1000)) == \
        first.predict_ms(Structure((2, 3), (100, 400), 1000))
    # a pruned model of the same base shape is served by the same table
    pruned = _pruned_models(model)["mixed"]
    assert LatencyTable.for_model(pruned, SPEC, cache_dir=cache, progress=False,
                                  grid=2).path == first.path

    calls = _fake_timing(monkeypatch)
    other_spec = LatencyTable.for_model(model, RuntimeSpec("pytorch", 4, 32, 1, "cpu"),
                                        cache_dir=cache, progress=False, grid=2)
    other_shape = LatencyTable.for_model(_timing_bert(intermediate=256), SPEC, cache_dir=cache,
                                         progress=False, grid=2)
    assert other_spec.measured and other_shape.measured and len(calls) == 12
    assert len({first.path, other_spec.path, other_shape.path}) == 3
    assert other_spec.base_ms() == pytest.approx(1.0 + 4)


@pytest.mark.parametrize("damage", ["not json {", '{"key": {"other": 1}, "base_ms": 1}',
                                    "truncated"])
def test_a_damaged_cache_file_is_measured_again(tmp_path, monkeypatch, damage, caplog):
    _fake_timing(monkeypatch)
    model, cache = _timing_bert(), str(tmp_path)
    first = LatencyTable.for_model(model, SPEC, cache_dir=cache, progress=False, grid=2)
    text = open(first.path).read()
    with open(first.path, "w") as f:
        f.write(text[: len(text) // 2] if damage == "truncated" else damage)
    again = LatencyTable.for_model(model, SPEC, cache_dir=cache, progress=False, grid=2)
    assert again.measured and "measuring it again" in caplog.text
    assert json.load(open(first.path))["base_ms"] == pytest.approx(first.base_ms())


def test_bad_input_is_refused_before_any_work(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("measured before refusing")

    monkeypatch.setattr(latency, "_runner", refuse)
    with pytest.raises(ValueError) as e:
        RuntimeSpec(runtime="tensorrt")
    msg = str(e.value)
    assert "runtime='tensorrt'" in msg and all(r in msg for r in RUNTIMES)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="batch="):
            RuntimeSpec(batch=bad)
    with pytest.raises(ValueError, match="seq_len="):
        RuntimeSpec(seq_len=0)
    with pytest.raises(ValueError, match="threads="):
        RuntimeSpec(threads=-1)
    with pytest.raises(ValueError, match="clock='gpu'"):
        RuntimeSpec(clock="gpu")
    model = _tiny_bert()
    with pytest.raises(ValueError, match="seq_len=64 is longer than the model's "
                                         "max_position_embeddings \\(40\\)"):
        LatencyTable.for_model(model, RuntimeSpec(seq_len=64), progress=False)
    with pytest.raises(ValueError, match="grid=1"):
        LatencyTable.for_model(model, RuntimeSpec(seq_len=16), progress=False, grid=1)
    with pytest.raises(ValueError, match="seq2seq"):
        from transformers import BartConfig, BartForSequenceClassification

        measure_model_ms(BartForSequenceClassification(BartConfig(
            vocab_size=50, d_model=16, encoder_layers=1, decoder_layers=1,
            encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=16,
            decoder_ffn_dim=16)), RuntimeSpec(seq_len=8))


def test_spec_key_resolves_threads():
    assert RuntimeSpec().key()["threads"] == torch.get_num_threads()
    assert RuntimeSpec(threads=3).key() == {"runtime": "pytorch", "batch": 32, "seq_len": 64,
                                            "threads": 3, "clock": "wall"}


def test_measuring_leaves_a_training_model_as_it_was():
    model = _tiny_bert().train()
    ms = measure_model_ms(model, RuntimeSpec(batch=2, seq_len=8, threads=1))
    assert ms > 0 and model.training
    half = _tiny_bert().to(torch.bfloat16)
    assert measure_model_ms(half, RuntimeSpec(batch=2, seq_len=8, threads=1)) > 0
    assert next(half.parameters()).dtype == torch.bfloat16


def test_a_cached_table_that_mispredicts_the_model_now_is_measured_again(tmp_path, monkeypatch):
    """The cache key names the machine, not its load: with ``validate`` a table measured while
    the machine was busy (here: every figure 3x what the model now measures) is measured
    again instead of steering the search."""
    from distilkit.search import latency

    _fake_timing(monkeypatch)
    model, cache = _timing_bert(), str(tmp_path)
    first = LatencyTable.for_model(model, SPEC, cache_dir=cache, progress=False, grid=2)
    now = first.predict_ms(structure_of(model))
    assert now == pytest.approx(_fake_ms(model, SPEC))
    with open(first.path) as f:
        data = json.load(f)
    data["base_ms"] *= 3
    data["layer_ms"] = [[3 * v for v in row] for row in data["layer_ms"]]
    with open(first.path, "w") as f:
        json.dump(data, f)
    assert not LatencyTable.for_model(model, SPEC, cache_dir=cache, progress=False,
                                      grid=2).measured  # without validate: the stale table
    again = LatencyTable.for_model(model, SPEC, cache_dir=cache, progress=False, grid=2,
                                   validate=True)
    assert again.measured and again.predict_ms(structure_of(model)) == pytest.approx(now)
    # a table that still predicts the model is kept
    kept = LatencyTable.for_model(model, SPEC, cache_dir=cache, progress=False, grid=2,
                                  validate=True)
    assert not kept.measured


def test_a_pair_is_timed_warm_each_model_after_its_own_run(monkeypatch):
    """In turns with the teacher each model is timed on the last of ``block`` runs of its
    turn: a model whose first run after the other one is slow (its weights out of the caches)
    reads its served time; run by run (``block=1``) it read the cold one."""
    import contextlib
    import time as _time

    from distilkit.search import latency

    state, calls = {"last": None}, []

    @contextlib.contextmanager
    def runner(model, spec):
        def run():
            cold = state["last"] is not model
            state["last"] = model
            calls.append(model)
            _time.sleep(0.02 if cold else 0.005 if model is ref else 0.002)
        yield run

    monkeypatch.setattr(latency, "_runner", runner)
    monkeypatch.setattr(latency, "_check_model", lambda m, s: None)
    ref, model = object(), object()
    spec = RuntimeSpec(batch=2, seq_len=8, threads=1)
    ms, ref_ms = latency.measure_pair_ms(model, ref, spec, repeats=5)
    assert ms < 10 and ref_ms < 15, (ms, ref_ms)
    assert len(calls) == 2 * latency.PAIR_BLOCK * (latency.WARMUP + 5)
    cold, _ = latency.measure_pair_ms(model, ref, spec, repeats=5, block=1)
    assert cold > 15
    with pytest.raises(ValueError, match="block=0"):
        latency.measure_pair_ms(model, ref, spec, block=0)


# ---------------------------------------------------------------------------------------
# Factorized layers (a table with ranks)
# ---------------------------------------------------------------------------------------

PER_WEIGHT, PER_FACTORIZED = 2e-5, 0.05


def _fake_ranked_ms(model, spec, repeats=latency.MEASURE_REPEATS):
    """:func:`_fake_ms`, less ``PER_WEIGHT`` per multiply-add a factorized weight no longer
    does and plus ``PER_FACTORIZED`` per factorized weight: the law the table fits."""
    from distilkit.search.structure import role_shapes

    s = structure_of(model)
    shape = base_shape_of(model)
    ms = _fake_ms(model, spec)
    for h, f, row in zip(s.heads, s.ffn, s.ranks or ()):
        for (m, n), r in zip(role_shapes(h, f, shape, len(row)), row):
            if r:
                ms -= PER_WEIGHT * (m * n - (m + n) * r) - PER_FACTORIZED
    return ms


def _factorized(model, ranks: dict):
    from distilkit.compress.low_rank import LowRankConfig

    m = copy.deepcopy(model)
    compress_(m, LowRankConfig(ranks=ranks))
    return m


def _ranked_models(model) -> dict:
    """The "mixed" pruned model with some of its weights factorized (at their pruned shapes),
    and the full one with every FFN projection at rank 32."""
    mixed = _pruned_models(model)["mixed"]   # heads (1, 4, 3), neurons (212, 512, 412)
    layer = "bert.encoder.layer.{}."
    return {
        "mixed_ranked": _factorized(mixed, {layer.format(1) + "attention.self.query": 32,
                                            layer.format(1) + "attention.self.key": 32,
                                            layer.format(1) + "intermediate.dense": 64,
                                            layer.format(2) + "output.dense": 48}),
        "ffn_rank32": _factorized(model, {"bert.encoder.layer.*.intermediate.dense": 32,
                                          "bert.encoder.layer.*.output.dense": 32}),
    }


def test_a_table_with_ranks_fits_the_factorized_law_and_keys_its_ranks(tmp_path, monkeypatch):
    """On a latency that is the law (fake timings), a table with ranks predicts factorized
    structures exactly; it is another cached table than the one without ranks, which refuses a
    structure with ranks in one line instead of predicting it dense."""
    from distilkit.search.latency import fit_rank_cost, rank_points

    _fake_timing(monkeypatch, _fake_ranked_ms)
    model = _timing_bert()
    plain = LatencyTable.for_model(model, SPEC, cache_dir=str(tmp_path), progress=False, grid=3)
    ranked = LatencyTable.for_model(model, SPEC, cache_dir=str(tmp_path), progress=False, grid=3,
                                    ranks=True)
    assert ranked.path != plain.path and plain.rank_fit is None
    assert ranked.ranks == rank_points(base_shape_of(model)) == [21, 43, 64, 85]
    assert ranked.rank_fit == pytest.approx((PER_WEIGHT, PER_FACTORIZED))
    for name, m in _ranked_models(model).items():
        s = structure_of(m)
        assert s.ranks is not None and any(any(r) for r in s.ranks), name
        assert ranked.predict_ms(s) == pytest.approx(_fake_ranked_ms(m, SPEC)), name
        assert ranked.predict_ms(s) < ranked.predict_ms(dataclasses.replace(s, ranks=None))
        with pytest.raises(ValueError, match="measured without factorized layers"):
            plain.predict_ms(s)
    # read back from the cache, with its factorized timings
    monkeypatch.setattr(latency, "_runner", lambda *a, **k: pytest.fail("measured again"))
    again = LatencyTable.for_model(model, SPEC, cache_dir=str(tmp_path), progress=False, grid=3,
                                   ranks=True)
    assert not again.measured and again.rank_fit == pytest.approx(ranked.rank_fit)
    # the fit itself: exact on the law, never negative
    shapes = [(256, 256)] * 3 + [(256, 256), (512, 256), (256, 512)]
    ranks = [16, 32, 64, 96]
    exact = [PER_WEIGHT * sum(m * n - (m + n) * r for m, n in shapes) - PER_FACTORIZED * 6
             for r in ranks]
    assert fit_rank_cost(shapes, ranks, exact) == pytest.approx((PER_WEIGHT, PER_FACTORIZED))
    assert min(fit_rank_cost(shapes, ranks, [-1.0] * 4)) >= 0


def test_a_table_with_ranks_predicts_measured_factorized_models(tmp_path):
    """Measured, not faked: factorized pruned models' speed-ups over the unpruned one within
    the table's tolerance of their prediction (timed as in
    :func:`test_table_predicts_measured_latency_of_pruned_models`)."""
    model = _timing_bert()
    table = LatencyTable.for_model(model, SPEC, cache_dir=str(tmp_path), progress=False, grid=3,
                                   ranks=True)
    assert table.rank_fit[0] > 0   # factorizing saves time
    models = _ranked_models(model)
    errors = _ratio_errors(table, model, models, pairings=3)
    if not all(abs(e) <= table.tolerance for _, _, e in errors.values()):
        table = LatencyTable.for_model(model, SPEC, cache_dir=str(tmp_path / "again"),
                                       progress=False, grid=3, ranks=True)
        errors = _ratio_errors(table, model, models, pairings=3)
    assert all(abs(e) <= table.tolerance for _, _, e in errors.values()), errors
    assert errors["ffn_rank32"][1] < 1   # the factorized FFNs run faster, measured
