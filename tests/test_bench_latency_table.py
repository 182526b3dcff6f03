"""scripts/bench_latency_table.py's pieces on tiny models (no timing here): the students it
predicts are the units the search removes, in both stacks of an encoder-decoder, and a head's
share of a layer is read off the table's fitted law."""
import pytest

from conftest import load_script, tiny_bart
from distilkit.search.structure import structure_of


def _script():
    return load_script("bench_latency_table")


def test_the_students_halve_heads_and_neurons_and_drop_a_layer_of_each_stack():
    bench = _script()
    model = tiny_bart()
    full = structure_of(model)
    n = full.num_layers()
    got = {k: structure_of(m) for k, m in bench.students(model).items()}
    assert structure_of(model) == full   # pruned copies, the model left whole
    assert got["half_heads"].heads == tuple(h - h // 2 for h in full.heads)
    assert got["half_ffn"].ffn == tuple(f - f // 2 for f in full.ffn)
    assert got["one_layer_each_stack"].stacks == tuple(s - 1 for s in full.stacks)
    mixed = got["mixed"]
    assert mixed.num_layers() == n - 1 and mixed.stacks[-1] == full.stacks[-1] - 1
    assert mixed.heads[0] == full.heads[0] - full.heads[0] // 2
    assert mixed.ffn[1] == full.ffn[1] - full.ffn[1] // 2


def test_a_heads_share_is_its_price_over_the_whole_layers():
    bench = _script()

    class Table:
        class shape:
            num_heads, intermediate = 4, 100
        fit = (2.0, 1.0, 0.02)   # fixed, per head, per neuron: a layer 2 + 4 + 2 ms
        decoder_fit = (0.0, 0.0, 0.0)

    assert bench.head_share(Table) == pytest.approx(0.5)
    assert bench.head_share(Table, stack=1) == 0.0   # a layer priced at nothing


def test_a_quiet_machine_starts_no_other_process(monkeypatch):
    bench = _script()
    monkeypatch.setattr(bench.subprocess, "Popen", lambda *a, **k: pytest.fail("started"))
    with bench.load_coming_and_going(0.0):
        pass


def test_an_int8_table_of_the_bench_keeps_its_fused_attention_law(monkeypatch):
    """--runtime onnx_int8: the bench's table is built from the measured figures with the law
    of the students that keep every head (fake timing: no export, no clock)."""
    from test_latency_table import INT8, _fake_int8_ms, _fake_timing, _timing_bert

    bench = _script()
    _fake_timing(monkeypatch, _fake_int8_ms)
    model = _timing_bert()
    t, _ = bench.table(model, INT8, paired=True)
    assert t.fused_fit is not None
    assert t.predict_ms(structure_of(model)) == pytest.approx(_fake_int8_ms(model, INT8))
    with pytest.raises(SystemExit):
        bench.main(["--model", "bart", "--runtime", "onnx_int8"])
