"""The ``--int8`` graph of an encoder classifier: onnxruntime's dynamic int8 quantization of
a *fused* graph, with per-channel weight scales.

Why fused. Quantizing the traced graph as it is leaves attention as a dozen small fp32 ops
(and, with transformers' SDPA path, NaN guards around the mask) between the int8 matmuls.
For BERT-family encoders the graph is instead traced with the eager attention code and
rewritten by onnxruntime's transformer optimizer into its fused ``EmbedLayerNormalization``,
``Attention`` and ``Gelu`` kernels (not ``SkipLayerNormalization`` nor ``BiasGelu``, which
are slower on CPU: :func:`fusion_options`), which the quantizer then turns into
``QAttention`` and int8 matmuls. Measured on the quickstart student
(docs/RESULTS.md, #15): faster than the unfused int8 graph, and with per-channel scales within
0.1 point of the fp32 student's test accuracy where the unfused per-tensor graph lost ~1.

Safety. The fused fp32 graph is checked against the PyTorch model like every export (same
logits within the tolerance, same argmax); a model the optimizer does not fuse correctly (a
layout it does not know, or head-pruned layers with their own head counts, which its
Attention op refuses) falls back to quantizing the plain traced graph, and export.json says
which graph the int8 file was made from (``graph``: fused or traced).
"""
from __future__ import annotations

import logging
import os
import warnings
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from distilkit.export.runtime import OPSET, quantize_int8

# transformers model types whose encoders onnxruntime's "bert" optimizer fuses
FUSABLE = ("bert", "roberta", "xlm-roberta", "electra", "camembert")


def fused_graph(model: nn.Module, wrapper: Callable[[nn.Module], nn.Module],
                example: tuple, names: Sequence[str], axes: dict, path: str,
                attention: bool = True) -> Optional[str]:
    """Trace ``wrapper(model)`` with eager attention into ``path`` and fuse it in place with
    onnxruntime's transformer optimizer (``attention=False``: every fusion but attention's,
    for layers its Attention op cannot take); None (nothing written) for a model type it does
    not fuse. The model's attention implementation is restored afterwards."""
    cfg = model.config
    if cfg.model_type not in FUSABLE:
        return None
    before = getattr(cfg, "_attn_implementation", None)
    try:
        model.set_attn_implementation("eager")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings: the check measures the graph
            torch.onnx.export(wrapper(model).eval(), example, path, input_names=list(names),
                              output_names=["logits"], dynamic_axes=axes,
                              opset_version=OPSET, dynamo=False)
    finally:
        if before is not None:
            model.set_attn_implementation(before)
    from onnxruntime.transformers.optimizer import optimize_model

    # The config's head count and width: without them the optimizer fuses no attention.
    # A layer whose reshape says otherwise (a head-pruned layer keeps fewer heads) is fused
    # with the count its own graph holds, and the check of the fused graph verifies it.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        # (0, 0: no attention pattern matches, the other fusions still apply)
        heads, width = (cfg.num_attention_heads, cfg.hidden_size) if attention else (0, 0)
        optimize_model(path, model_type="bert", num_heads=heads, hidden_size=width,
                       opt_level=1, optimization_options=fusion_options()
                       ).save_model_to_file(path)
    finally:
        root.setLevel(level)
    return path


def fusion_options():
    """The transformer optimizer's fusions for the int8 graph: attention (``QAttention`` once
    quantized), embeddings with their LayerNorm, GELU; not ``SkipLayerNormalization`` nor
    ``BiasGelu``. Measured in turns on the vocab-pruned quickstart student (batch 32, length
    64, 2 threads, onnxruntime 1.32, 2026-12-02): its six SkipLayerNormalization nodes took
    12.3 ms of a 68.8 ms int8 run where Add + LayerNormalization take 2.5 ms, and BiasGelu
    9.5 ms where the bias folded into the int8 matmul before a plain Gelu takes 4.2 ms; the
    int8 file without both runs in 53-65 ms against 64-76 ms with them (6.4x the teacher
    against 5.2-5.3x, same machine, same run). The same arithmetic either way (exact GELU),
    so the same predictions. The session must also leave residual Add + LayerNormalization
    alone at load time (:data:`distilkit.export.runtime.DISABLED_OPTIMIZERS`)."""
    from onnxruntime.transformers.fusion_options import FusionOptions

    opts = FusionOptions("bert")
    opts.enable_skip_layer_norm = False
    opts.enable_bias_skip_layer_norm = False
    opts.enable_bias_gelu = False
    return opts


def int8_from(src: str, dst: str, per_channel: bool = True) -> None:
    """Dynamic int8 quantization of ``src`` into ``dst``, by default with per-channel weight
    scales (one scale per output column: what keeps the accuracy of small encoders; the
    quantized LSTM op takes per-tensor scales only)."""
    quantize_int8(src, dst, per_channel=per_channel)


def remove(path: Optional[str]) -> None:
    if path and os.path.exists(path):
        os.remove(path)
