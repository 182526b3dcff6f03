"""Throughput of the packed low-bit Triton kernel against an fp16 matmul and bitsandbytes.

    python scripts/bench_kernels.py --device cuda        # on a CUDA GPU (the default there)
    python scripts/bench_kernels.py --shapes 32x1536x384 --bits 4 2 --no-e2e

For each shape ``MxNxK`` (activations ``[M, K]``, weight ``[N, K]``) and bit-width it times
``y = x @ W.T`` four ways on the GPU: the distilkit kernel reading packed bucketed codes
(:mod:`distilkit.kernels.triton_dequant`), ``torch.matmul`` in fp16 with the weight in fp16,
bitsandbytes ``Linear4bit`` (NF4) and ``Linear8bitLt`` (int8). It reports milliseconds,
TFLOP/s and the weight bytes each reads. The default shapes are MiniLM's FFN (384 <-> 1536)
and a bert-base FFN (768 <-> 3072) at 1, 16 and 256 rows. Then (unless ``--no-e2e``) the
end-to-end forward latency of a packed 4-bit MiniLM-sized student (its linear layers through
the kernel, by ``PackedLinear``'s dispatch) against the same student in fp16.
Without a GPU (``--device cpu``, or none found) it prints "no GPU" and still ends with one
JSON line (``{"gpu": null, ...}``): kernel *correctness* is checked on CPU by
``tests/test_kernels.py`` under ``TRITON_INTERPRET=1``; its *speed* can only be measured here.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _time_cuda(fn, warmup: int, iters: int) -> float:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def bench_shape(m: int, n: int, k: int, bits: int, bucket: int, warmup: int, iters: int) -> dict:
    import torch
    from torch import nn

    from distilkit.compress import compress_
    from distilkit.compress.quantize import PTQConfig
    from distilkit.kernels.triton_dequant import matmul_flops, packed_linear_forward, weight_bytes

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(k, n, bias=False))
    compress_(net, PTQConfig(bits=bits, bucket_size=bucket, exclude=[]))
    layer = net.cuda()[0]
    x = torch.randn(m, k, device="cuda")
    flops = matmul_flops(m, n, k)
    row = {"shape": f"{m}x{n}x{k}", "bits": bits, "bucket_size": bucket}

    ref = torch.nn.functional.linear(x, layer.dequantized("weight"))
    out = packed_linear_forward(layer, x)
    row["max_abs_err_vs_reference"] = float((out - ref).abs().max())
    ms = _time_cuda(lambda: packed_linear_forward(layer, x), warmup, iters)
    row["packed_triton"] = {"ms": ms, "tflops": flops / ms / 1e9,
                            "weight_bytes": weight_bytes(n, k, bits, bucket)}

    w16, x16 = layer.weight.detach().half(), x.half()
    ms = _time_cuda(lambda: x16 @ w16.T, warmup, iters)
    row["fp16_matmul"] = {"ms": ms, "tflops": flops / ms / 1e9, "weight_bytes": n * k * 2}
    try:
        from distilkit.kernels.bnb import to_bitsandbytes

        for mode in ("4bit", "8bit"):
            bnet = nn.Sequential(nn.Linear(k, n, bias=False))
            bnet[0].weight.data.copy_(layer.weight.detach().cpu())
            to_bitsandbytes(bnet, mode=mode, quantized_only=False, exclude=[],
                            compute_dtype=torch.float16, device="cuda")
            ms = _time_cuda(lambda: bnet(x16), warmup, iters)
            wb = n * k // 2 if mode == "4bit" else n * k
            row[f"bnb_{mode}"] = {"ms": ms, "tflops": flops / ms / 1e9, "weight_bytes": wb}
    except Exception as e:  # bitsandbytes absent or without a kernel for this GPU
        row["bnb_error"] = f"{type(e).__name__}: {e}"
    return row


def bench_e2e(batch: int, seq: int, warmup: int, iters: int) -> dict:
    """Forward latency of a packed 4-bit MiniLM-sized BERT (random weights: latency does not
    depend on them) against the same model in fp16, on CUDA."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    import distilkit.kernels  # noqa: F401 - registers PackedLinear's CUDA kernel
    from distilkit.compress import compress_, finalize_
    from distilkit.compress.packing import PackedLinear
    from distilkit.compress.quantize import QuantizeConfig

    cfg = BertConfig(hidden_size=384, num_hidden_layers=3, num_attention_heads=12,
                     intermediate_size=1536, num_labels=2)
    torch.manual_seed(0)
    fp16 = BertForSequenceClassification(cfg).eval()
    packed = BertForSequenceClassification(cfg).eval()
    packed.load_state_dict(fp16.state_dict())
    compress_(packed, QuantizeConfig(bits=4, bucket_size=256))
    finalize_(packed)
    n_packed = sum(isinstance(m, PackedLinear) for m in packed.modules())
    fp16 = fp16.half().cuda()
    packed = packed.cuda()
    ids = torch.randint(1000, 30000, (batch, seq), device="cuda")
    mask = torch.ones_like(ids)
    out = {"model": "MiniLM-sized BERT, 3 layers, hidden 384", "batch": batch, "seq_len": seq,
           "packed_linear_layers": n_packed}
    with torch.inference_mode():
        out["fp16_ms"] = _time_cuda(lambda: fp16(input_ids=ids, attention_mask=mask),
                                    warmup, iters)
        out["packed4_ms"] = _time_cuda(lambda: packed(input_ids=ids, attention_mask=mask),
                                       warmup, iters)
    out["packed4_over_fp16"] = out["packed4_ms"] / out["fp16_ms"]
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+",
                   default=[f"{m}x{nk}" for m in (1, 16, 256)
                            for nk in ("1536x384", "384x1536", "3072x768", "768x3072")],
                   help="MxNxK: activations [M, K] times weight [N, K]")
    p.add_argument("--bits", nargs="+", type=int, default=[4])
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="cuda: measure on the GPU (an error if none); auto: cuda when available")
    p.add_argument("--no-e2e", action="store_true", help="skip the end-to-end student latency")
    p.add_argument("--e2e-batch", type=int, default=16)
    p.add_argument("--e2e-seq", type=int, default=64)
    p.add_argument("--bucket-size", type=int, default=256)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=100)
    args = p.parse_args(argv)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False (a CPU-only torch, "
                         "or no usable GPU); run without --device to get the no-GPU line")
    if args.device == "cpu" or not torch.cuda.is_available():
        print("no GPU: the kernel's speed can only be measured on a CUDA GPU (its correctness "
              "is tested on CPU with TRITON_INTERPRET=1: tests/test_kernels.py)")
        result = {"gpu": None, "rows": [], "reason": "no GPU"}
        print(json.dumps(result))
        return result
    rows = []
    for shape in args.shapes:
        m, n, k = (int(v) for v in shape.lower().split("x"))
        for bits in args.bits:
            rows.append(bench_shape(m, n, k, bits, args.bucket_size, args.warmup, args.iters))
    print("| shape MxNxK | bits | packed Triton ms | fp16 matmul ms | bnb 4-bit ms | "
          "bnb 8-bit ms |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        def ms(key):
            return f"{r[key]['ms']:.4f}" if key in r else "n/a"
        print(f"| {r['shape']} | {r['bits']} | {ms('packed_triton')} | {ms('fp16_matmul')} | "
              f"{ms('bnb_4bit')} | {ms('bnb_8bit')} |")
    result = {"gpu": torch.cuda.get_device_name(0), "rows": rows}
    if not args.no_e2e:
        result["e2e"] = bench_e2e(args.e2e_batch, args.e2e_seq, args.warmup, args.iters)
        e = result["e2e"]
        print(f"end to end (batch {e['batch']} x {e['seq_len']}): packed 4-bit "
              f"{e['packed4_ms']:.3f} ms vs fp16 {e['fp16_ms']:.3f} ms")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
