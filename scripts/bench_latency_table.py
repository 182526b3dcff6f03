"""The latency table's protocol (#16) on a machine whose load comes and goes: each pruned
student's predicted speed-up over the unpruned one against the one measured in turns with it,
for a table measured the way distilkit measures it now (every model in turns with one
stopwatch model, shuffled) and the way it did before 2026-12-07 (each model alone, grid row by
row), each once on a quiet machine and once while another process (one thread of matrix
products) starts and stops every ``--period`` seconds.

    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_latency_table.py \
        --model bart          # the built-in truecasing BART, timed generating (~6 min)
    ... --model minilm        # the built-in MiniLM classifier (~10 min)
    ... --model minilm --runtime onnx_int8 --quiet-only   # its int8 files, stopwatch protocol

The students (whole-model speed-ups measured on a quiet machine, the median of three
pairings) are the units the search removes: half the heads of every layer, half the FFN
neurons, one layer of each stack, and a mix. The last line is JSON: per protocol and
condition, the median and largest relative error of the predicted speed-ups, and what the
table prices a head at, as a share of a whole layer.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import subprocess
import sys
import time

# one thread of matrix products: another user's job on the shared machine
HOG = ("import torch\ntorch.set_num_threads(1)\na = torch.randn(384, 384)\n"
       "while True:\n    a = torch.tanh(a @ a)\n")


@contextlib.contextmanager
def load_coming_and_going(period: float):
    """A process that runs ``period`` seconds, then pauses ``period`` seconds, and so on,
    until the block ends (``period`` 0: a quiet machine)."""
    if not period:
        yield
        return
    import threading

    stop, proc = threading.Event(), [None]

    def cycle():
        while not stop.is_set():
            proc[0] = subprocess.Popen([sys.executable, "-c", HOG])
            stop.wait(period)
            proc[0].kill()
            proc[0].wait()
            stop.wait(period)

    t = threading.Thread(target=cycle, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()


def _model(name: str):
    from distilkit.teachers import load_teacher

    if name == "bart":
        from transformers import AutoConfig

        from distilkit.seq2seq.teacher import truecase_teacher

        path = truecase_teacher(progress=False)
        return load_teacher(path, like=AutoConfig.from_pretrained(path))
    from distilkit.finetune import builtin_teacher

    return load_teacher(builtin_teacher(progress=False))


def students(model) -> dict:
    """The pruned students whose speed-ups the tables predict (positions: every layer of the
    encoder, then the decoder's)."""
    from distilkit.compress.families import get_adapter
    from distilkit.search.netadapt import Removal
    from distilkit.search.run import prune_removal
    from distilkit.search.structure import base_shape_of, structure_of

    shape, n = base_shape_of(model), structure_of(model).num_layers()
    stacks = structure_of(model).stacks or (n,)
    half_heads = list(range(shape.num_heads // 2))
    half_ffn = list(range(shape.intermediate // 2))
    last_of_each = [sum(stacks[: i + 1]) - 1 for i in range(len(stacks))]
    plans = {
        "half_heads": Removal(heads={p: half_heads for p in range(n)}),
        "half_ffn": Removal(neurons={p: half_ffn for p in range(n)}),
        "one_layer_each_stack": Removal(layers=last_of_each),
        "mixed": Removal(heads={0: half_heads}, neurons={1: half_ffn},
                         layers=[last_of_each[-1]]),
    }
    get_adapter(model, "bench")   # a family the search can prune
    return {k: prune_removal(copy.deepcopy(model), r) for k, r in plans.items()}


def measured_speedups(model, pruned: dict, spec) -> dict:
    from distilkit.search.latency import measure_pair_ms

    out = {}
    for name, m in pruned.items():
        ratios = sorted(a / b for a, b in (measure_pair_ms(m, model, spec) for _ in range(3)))
        out[name] = 1.0 / ratios[1]
    return out


def table(model, spec, paired: bool):
    from distilkit.search import latency
    from distilkit.search.structure import base_shape_of, is_seq2seq

    shape = base_shape_of(model)
    heads = latency.grid_points(shape.num_heads, shape.num_heads)
    ffn = latency.grid_points(shape.intermediate, latency.DEFAULT_GRID)
    t0 = time.perf_counter()
    fig = latency._measure_table(model, shape, spec, heads, ffn, progress=False, paired=paired)
    t = latency.LatencyTable(shape, spec, heads, ffn, fig["base_ms"], fig["layer_ms"],
                             decoder_layer_ms=fig.get("decoder_layer_ms") if is_seq2seq(model)
                             else None, fused_base_ms=fig.get("fused_base_ms"),
                             fused_layer_ms=fig.get("fused_layer_ms"))
    return t, round(time.perf_counter() - t0, 1)


def head_share(t, stack: int = 0) -> float:
    """What the table prices all of a layer's heads at, as a share of the whole layer (0 when
    the layer is priced at nothing: its grid measured no cost above the base)."""
    fixed, per_head, per_neuron = t.decoder_fit if stack else t.fit
    h, f = t.shape.num_heads, t.shape.intermediate
    layer = fixed + per_head * h + per_neuron * f
    return per_head * h / layer if layer > 0 else 0.0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("bart", "minilm"), default="bart")
    ap.add_argument("--period", type=float, default=4.0,
                    help="seconds the other process runs, then pauses (the noisy condition)")
    ap.add_argument("--runtime", choices=("pytorch", "onnx_int8"), default="pytorch",
                    help="onnx_int8: the classifier's int8 files (not for bart, timed generating)")
    ap.add_argument("--quiet-only", action="store_true",
                    help="only the quiet machine and the stopwatch protocol: one table")
    args = ap.parse_args(argv)
    if args.model == "bart" and args.runtime != "pytorch":
        ap.error("--runtime onnx_int8 is for --model minilm: bart is timed generating")

    import torch
    from transformers.utils import logging as hf_logging

    from distilkit.search.latency import RuntimeSpec
    from distilkit.search.structure import structure_of

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    model = _model(args.model).float().eval()
    # the specs of recipes/search_seq2seq_speed.yaml and recipes/search_budget.yaml
    spec = RuntimeSpec("pytorch", 32, 32, 2, "wall", new_tokens=32) if args.model == "bart" \
        else RuntimeSpec(args.runtime, 32, 64, 2, "wall")
    pruned = students(model)
    figures = {"model": args.model, "spec": spec.key(), "period_s": args.period}
    truth = None
    conditions = (("quiet", 0.0),) + ((("noisy", args.period),) if not args.quiet_only else ())
    protocols = (("paired", True),) + ((("sequential", False),) if not args.quiet_only else ())
    for condition, period in conditions:
        for protocol, paired in protocols:
            with load_coming_and_going(period):
                t, seconds = table(model, spec, paired)
            if truth is None:   # measured on the quiet machine, once
                truth = measured_speedups(model, pruned, spec)
                figures["measured_speedup"] = {k: round(v, 3) for k, v in truth.items()}
            full = t.predict_ms(structure_of(model))
            errors = {k: full / t.predict_ms(structure_of(m)) / truth[k] - 1
                      for k, m in pruned.items()}
            key = f"{protocol}_{condition}"
            figures[f"{key}_error_median"] = round(statistics.median(map(abs, errors.values())), 4)
            figures[f"{key}_error_max"] = round(max(map(abs, errors.values())), 4)
            figures[f"{key}_head_share"] = round(head_share(t), 3)
            if t.decoder_fit is not None:
                figures[f"{key}_decoder_head_share"] = round(head_share(t, 1), 3)
            figures[f"{key}_seconds"] = seconds
            print(f"{key}: {seconds} s; predicted/measured - 1: "
                  + ", ".join(f"{k} {v:+.3f}" for k, v in errors.items()), file=sys.stderr,
                  flush=True)
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
