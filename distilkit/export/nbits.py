"""A 4-bit quantized student's packed linears as onnxruntime ``com.microsoft`` ``MatMulNBits``
nodes, fed with the student's own codes and bucket scales: the exported graph computes the
quantized student's function, it does not re-quantize it.

The mapping. distilkit stores a uniform 4-bit weight ``W [N, K]`` (``N = out_features``,
``K = in_features``) as codes over the row-major flattened weight, two a byte, low nibble
first (``weight_packed``), and per bucket of ``k`` consecutive values ``alpha``
(``weight_scale``) and ``beta`` (``weight_offset``), with ``W = beta + alpha * code / 15``.
When ``k`` divides ``K`` every bucket lies inside one row, so the buckets are MatMulNBits'
blocks along ``K`` and the bytes need no reordering:

* ``B [N, K/k, k/2]`` (uint8) is ``weight_packed`` reshaped;
* ``scales [N, K/k]`` is ``alpha / 15`` reshaped;
* ``zero_points [N, ceil(K/k / 2)]`` (uint8, packed like B) are all 0, so the node computes
  ``x @ (code * alpha / 15)^T``;
* the offsets come back exactly as a bucket-sum term: ``x @ beta_rows^T`` (``beta`` spread
  over its bucket's ``k`` columns) is ``sum_j (sum of x over bucket j) * beta[n, j]``, so
  ``x`` reshaped to ``[..., K/k, k]``, summed over the last axis, times ``beta^T [K/k, N]``
  (a ``ReduceSum`` and a ``MatMul`` ``k`` times smaller than the layer's), then ``+ bias``.

A constant bucket (``alpha = 0``) is ``beta`` whatever its codes; here its scale is 0 and the
offset term gives ``beta``: exact, with no special case.

Why not the operator's float zero points (``zero_point = -15 beta / alpha``, one node)? The
contrib-op spec allows them and onnxruntime 1.32's CPU kernel computes them correctly (checked
to 3e-6 on single layers), but a float zero point turns its 4-bit kernel off: prepacking is
skipped and every call dequantizes the whole ``B`` to fp32 in a naive loop before an fp32 GEMM
(``ComputeBUnpacked``), ignoring ``accuracy_level``. It also cannot give a constant bucket's
``beta`` unless that bucket's codes are 0. With uint8 zero points the kernel prepacks ``B``
once and runs MLAS's blocked 4-bit GEMM.

``accuracy_level``: 0 (the default) keeps the activations fp32 (MLAS ``CompFp32``): the logits
match PyTorch's to fp32 rounding. 4 lets the kernel quantize the activations to int8 per block
(``CompInt8``): faster, but an approximation, so predictions may change (and the export check,
which wants the quantized student's own logits, would refuse it).

Measured once (2026-12-02, this 2-core CPU, shared and loaded, so indicative only): a
quickstart-sized 3-layer student (hidden 384, FFN 1536, bucket 64), random token ids, length
64, one thread, the best of interleaved runs. Batch 1: fp32 graph 12.2 ms, this mapping at
accuracy_level 0 15.3 ms (max |logit diff| 7e-7), at level 4 9.1 ms (2e-3), float zero points
20.9 ms. Batch 32: 441, 421, 395 and 494 ms. File: 51.8 MB against 69.6 MB (the fp32 word
embedding table is most of both). So level 4 is faster but not exact; level 0 is the default.
With the embeddings packed too (GatherBlockQuantized, same day, an untrained student of that
shape, bucket 128): 10.5 MB against 51.4 MB with the full 30,522-row table, 6.8 MB against
24.3 MB after prune_vocab (12,857 rows kept); max |logit diff| 1.1e-6 either way.

Packed embeddings (``quantize_embeddings``) become ``GatherBlockQuantized`` (``com.microsoft``),
which gathers rows of a blocked 4-bit table and dequantizes them as ``(code - zero_point) *
scale``. The table ``W [V, D]`` is stored like a linear's weight (row-major codes, low nibble
first, buckets of ``k`` consecutive values); when ``k`` divides ``D`` every bucket lies inside
one row, so the buckets are the operator's blocks along the embedding axis (``gather_axis=0``,
``quantize_axis=1``, ``block_size=k``) and again nothing is reordered:

* ``data [V, D/2]`` (uint8) is ``weight_packed`` reshaped;
* ``scales [V, D/k]`` is ``alpha / 15`` reshaped;
* ``zero_points [V, ceil(D/k / 2)]`` (uint8, packed like the data) are all 0. They must be
  given: without them the operator takes 8 (the middle of the unsigned 4-bit range), checked
  on onnxruntime 1.32;
* ``beta`` cannot be a zero point (that would be ``-15 beta / alpha`` in the table's own
  uint4 type), so it comes back exactly as a second, plain ``Gather`` of the ``[V, D/k]``
  offset table with the same ids, broadcast over each block's ``k`` values: the gathered
  ``[..., D]`` rows are viewed as ``[..., D/k, k]``, ``beta [..., D/k, 1]`` is added, and the
  view is undone. The offsets cost as much as the scales (32 bits a bucket), no fp32 table
  is left.

A constant bucket is exact here too (scale 0, offset ``beta``). The operator takes block sizes
that are powers of two >= 16 (its shape inference refuses others); a bucket must also divide
``D`` (a bucket across two rows is no block), the same rule as for linears with ``D`` in the
place of ``in_features``, so one :func:`check_layer_specs` holds both. Embeddings whose class
has a forward of its own (a scaled embedding) and packed LSTM matrices (``quantize_lstm``)
stay in the graph as their dequantized fp32 copy; :func:`export_four_bit` lists them.

Entry points are model-agnostic (any ``nn.Module`` holding packed linears, any callable the
exporter traces; the seq2seq exporter can use them for an encoder or a decoder):

* :func:`check_four_bit` (refuses a model that cannot be exported, before any work);
* :func:`export_four_bit` (``torch.onnx.export`` of a traced module with the MatMulNBits and
  GatherBlockQuantized forms swapped in, then the graph's operator inputs checked byte for
  byte against the packed buffers and stored as named initializers);
* lower level, for a custom export call: :func:`nbits_forwards` (the swap, as a context
  manager) and :func:`finish_graph` (the check and the naming).
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from distilkit.compress import packing
from distilkit.export.runtime import OPSET

BITS = 4
MIN_BLOCK = 16  # MatMulNBits: the block is a power of two, at least 16
DOMAIN = "com.microsoft"
DEFAULT_ACCURACY_LEVEL = 0
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
# Names of the initializers each exported layer gets, after the layer's module name.
SUFFIXES = ("weight_packed", "weight_scales", "weight_zero_points")  # inputs 1, 2, 3
# The same for an embedding's GatherBlockQuantized: data, scales, zero points (inputs 0, 2, 3).
GATHER_INPUTS = ((0, "weight_packed"), (2, "weight_scales"), (3, "weight_zero_points"))


def _is_packed_linear(module: nn.Module) -> bool:
    """A packed ``nn.Linear`` that computes ``F.linear`` with its weight (a subclass with a
    forward of its own would not be the function MatMulNBits computes)."""
    return (isinstance(module, packing.PackedMixin) and isinstance(module, nn.Linear)
            and "weight" in module.packed_specs
            and type(module).forward in (packing.PackedLinear.forward, nn.Linear.forward))


def _is_packed_embedding(module: nn.Module) -> bool:
    """A packed ``nn.Embedding`` that computes a plain row lookup (``nn.Embedding``'s own
    forward: a subclass that scales its rows computes something else; ``max_norm`` renormalises
    the table on every lookup, which no gather of fixed codes can do)."""
    return (isinstance(module, packing.PackedMixin) and isinstance(module, nn.Embedding)
            and "weight" in module.packed_specs and type(module).forward is nn.Embedding.forward
            and module.max_norm is None)


def packed_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every packed linear of ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if _is_packed_linear(m)]


def packed_embeddings(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every packed embedding of ``model`` that exports as
    GatherBlockQuantized, in module order."""
    return [(n, m) for n, m in model.named_modules() if _is_packed_embedding(m)]


def dequantized_weights(model: nn.Module) -> list[str]:
    """The packed weights that are neither a 4-bit-exportable linear's nor an exportable
    embedding's (LSTM matrices, a scaled embedding): in the ONNX graph they are their
    dequantized fp32 copy."""
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, packing.PackedMixin) and not (_is_packed_linear(mod)
                                                         or _is_packed_embedding(mod)):
            out += [f"{name}.{w}" if name else w for w in mod.packed_specs]
    return out


def block_sizes_for(in_features: Iterable[int]) -> list[int]:
    """The bucket sizes MatMulNBits takes for layers of these ``in_features``: powers of two,
    at least 16, dividing every one of them (so that no bucket straddles two rows)."""
    sizes = list(in_features)
    if not sizes:
        return []
    g = math.gcd(*sizes)
    return [1 << e for e in range(MIN_BLOCK.bit_length() - 1, g.bit_length())
            if g % (1 << e) == 0]


def check_four_bit(model: nn.Module) -> None:
    """Raise one ValueError, before any work, when ``model`` cannot be exported to
    MatMulNBits and GatherBlockQuantized (the rules of :func:`check_layer_specs`, on its
    packed linears and embeddings)."""
    check_layer_specs([(name, mod.packed_specs["weight"]) for name, mod in packed_linears(model)],
                      embeddings=[(name, mod.packed_specs["weight"])
                                  for name, mod in packed_embeddings(model)])


def check_layer_specs(layers: Sequence[tuple[str, dict]], field: str = "--4bit",
                      off: str = "export without --4bit",
                      embeddings: Sequence[tuple[str, dict]] = ()) -> None:
    """The one home of what MatMulNBits (linears, ``layers``) and GatherBlockQuantized
    (``embeddings``) can take, described by their packed weight specs (``{"shape": [out, in]``
    or ``[vocab, dim], "bits", "bucket_size", "scheme"}``, as the packed modules and the
    compression records hold them): at least one of either, each 4-bit, uniform, and in
    buckets of a power of two >= 16 dividing its row width (``in_features``, or the
    embedding's ``embedding_dim``: no bucket may straddle two rows; both operators block along
    that axis). One ValueError naming ``field``, the layer, and the fix (the bucket sizes that
    work for every layer and embedding, else ``off``)."""
    every = [(name, spec, "MatMulNBits", "in_features") for name, spec in layers] + \
        [(name, spec, "GatherBlockQuantized", "embedding_dim") for name, spec in embeddings]
    if not every:
        raise ValueError(
            f"{field}: the model has no packed 4-bit linear layer or embedding (it was not "
            "trained with quantized distillation); distil it with compression: [{method: "
            f"quantize, bits: 4, bucket_size: 64}}], or {off} (int8 quantizes any student)")
    for name, spec, op, _ in every:
        if spec["bits"] != BITS:
            raise ValueError(
                f"{field}: layer {name!r} is packed with bits={spec['bits']}; {op} export "
                f"takes 4-bit students only: distil with quantize bits: 4, or {off}")
        if spec["scheme"] != "uniform":
            raise ValueError(
                f"{field}: layer {name!r} uses the {spec['scheme']!r} scheme (a table of learned "
                f"points), which {op} cannot express (it computes (code - zero_point) * "
                f"scale); distil with scheme: uniform, or {off}")
    widths = [spec["shape"][1] for _, spec, _, _ in every]
    works = block_sizes_for(widths)
    for (name, spec, op, axis), width in zip(every, widths):
        k = spec["bucket_size"]
        if k < MIN_BLOCK or k & (k - 1) or width % k:
            fix = (f"distil with one of bucket_size {works}, which work for every layer of this "
                   "model" if works else
                   f"no bucket size works for every layer of this model (row widths "
                   f"{sorted(set(widths))}); {off}")
            raise ValueError(
                f"{field}: layer {name!r} has bucket_size {k} and {axis} {width}; "
                f"{op} needs a power of two >= {MIN_BLOCK} that divides {axis} (no "
                f"bucket may straddle two rows): {fix}")


def nbits_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The MatMulNBits inputs of packed linear ``module`` (the mapping in the module
    docstring): ``weight_packed`` (B), ``weight_scales``, ``weight_zero_points`` and the
    offsets' ``offsets_t [K/k, N]`` for the bucket-sum term. Reshapes of the packed buffers,
    no re-quantization."""
    n, k_in = module.out_features, module.in_features
    k = module.packed_specs["weight"]["bucket_size"]
    nb = k_in // k
    return {
        "weight_packed": module.weight_packed.detach().reshape(n, nb, k // 2).cpu(),
        "weight_scales": (module.weight_scale.detach().float() / 15).reshape(n, nb).cpu(),
        "weight_zero_points": torch.zeros(n, -(-nb * BITS // 8), dtype=torch.uint8),
        "offsets_t": module.weight_offset.detach().float().reshape(n, nb).t().contiguous().cpu(),
    }


class _MatMulNBitsLinear(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` in PyTorch (the packed layer's own dequantized forward,
    so the trace carries the student's values); in the ONNX graph, MatMulNBits plus the
    bucket-sum offset term and the bias."""

    @staticmethod
    def forward(ctx, x, weight, bias, b, scales, zero_points, offsets_t, k_in, n, block, level):
        return F.linear(x, weight, bias)

    @staticmethod
    def symbolic(g, x, weight, bias, b, scales, zero_points, offsets_t, k_in, n, block, level):
        y = g.op(f"{DOMAIN}::MatMulNBits", x, b, scales, zero_points, K_i=k_in, N_i=n,
                 bits_i=BITS, block_size_i=block, accuracy_level_i=level)
        rank = x.type().dim()
        if rank is None:
            raise RuntimeError("MatMulNBits export: the input's rank is unknown to the tracer")
        # [..., K] -> [..., K/k, k]: -1 for the first axis, 0 copies the others (dynamic).
        shape = [-1] + [0] * (rank - 2) + [k_in // block, block] if rank > 1 else [k_in // block, block]
        sums = g.op("ReduceSum", g.op("Reshape", x, g.op("Constant", value_t=torch.tensor(shape))),
                    g.op("Constant", value_t=torch.tensor([-1])), keepdims_i=0)
        y = g.op("Add", y, g.op("MatMul", sums, offsets_t))
        return y if bias is None else g.op("Add", y, bias)


def gather_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The GatherBlockQuantized inputs of packed embedding ``module`` (the mapping in the
    module docstring): ``weight_packed`` (data ``[V, D/2]``), ``weight_scales`` (``alpha /
    15``, ``[V, D/k]``), ``weight_zero_points`` (0, ``[V, ceil(D/k / 2)]``) and
    ``weight_offsets`` (``beta``, ``[V, D/k]``) for the second gather. Reshapes of the packed
    buffers, no re-quantization."""
    v, d = module.num_embeddings, module.embedding_dim
    nb = d // module.packed_specs["weight"]["bucket_size"]
    return {
        "weight_packed": module.weight_packed.detach().reshape(v, d * BITS // 8).cpu(),
        "weight_scales": (module.weight_scale.detach().float() / 15).reshape(v, nb).cpu(),
        "weight_zero_points": torch.zeros(v, -(-nb * BITS // 8), dtype=torch.uint8),
        "weight_offsets": module.weight_offset.detach().float().reshape(v, nb).cpu(),
    }


class _GatherBlockQuantized(torch.autograd.Function):
    """``F.embedding(ids, weight)`` in PyTorch (the packed table's dequantized copy: the
    trace carries the student's values; ``padding_idx`` only shapes gradients); in the ONNX
    graph, GatherBlockQuantized of the codes plus the gathered per-bucket offsets."""

    @staticmethod
    def forward(ctx, ids, weight, data, scales, zero_points, offsets, dim, block):
        return F.embedding(ids, weight)

    @staticmethod
    def symbolic(g, ids, weight, data, scales, zero_points, offsets, dim, block):
        y = g.op(f"{DOMAIN}::GatherBlockQuantized", data, ids, scales, zero_points,
                 gather_axis_i=0, quantize_axis_i=1, block_size_i=block, bits_i=BITS)
        rank = ids.type().dim()
        if rank is None:
            raise RuntimeError("GatherBlockQuantized export: the ids' rank is unknown to the "
                               "tracer")

        def shape(*tail):  # 0 copies each of the ids' (dynamic) axes
            return g.op("Constant", value_t=torch.tensor([0] * rank + list(tail)))

        # [..., D] -> [..., D/k, k], + beta [..., D/k, 1], -> [..., D].
        beta = g.op("Unsqueeze", g.op("Gather", offsets, ids, axis_i=0),
                    g.op("Constant", value_t=torch.tensor([-1])))
        y = g.op("Add", g.op("Reshape", y, shape(dim // block, block)), beta)
        return g.op("Reshape", y, shape(dim))


@contextlib.contextmanager
def nbits_forwards(model: nn.Module, accuracy_level: int = DEFAULT_ACCURACY_LEVEL
                   ) -> Iterator[list[str]]:
    """While active, each packed linear of ``model`` (checked by :func:`check_four_bit`)
    runs its MatMulNBits form and each packed embedding its GatherBlockQuantized form: the
    same values in PyTorch, those nodes when traced by ``torch.onnx.export(..., dynamo=False,
    custom_opsets={"com.microsoft": 1})``. Yields the list of layer names in the order the
    trace called them, which :func:`finish_graph` pairs with the graph's nodes (linears with
    MatMulNBits, embeddings with GatherBlockQuantized, each in order). The forwards are
    restored on exit."""
    if accuracy_level not in ACCURACY_LEVELS:
        raise ValueError(f"accuracy_level={accuracy_level!r}: use one of {ACCURACY_LEVELS} "
                         "(0: fp32 activations, exact; 4: int8 activations, approximate)")
    check_four_bit(model)
    calls: list[str] = []
    layers = packed_linears(model)
    tables = packed_embeddings(model)

    def swapped(name: str, mod: nn.Module):
        t = nbits_tensors(mod)
        args = (t["weight_packed"], t["weight_scales"], t["weight_zero_points"], t["offsets_t"],
                mod.in_features, mod.out_features, mod.packed_specs["weight"]["bucket_size"],
                accuracy_level)

        def forward(x):
            if torch.jit.is_tracing():
                calls.append(name)
            return _MatMulNBitsLinear.apply(x, mod.weight, mod.bias, *args)
        return forward

    def gathered(name: str, mod: nn.Module):
        t = gather_tensors(mod)
        args = (t["weight_packed"], t["weight_scales"], t["weight_zero_points"],
                t["weight_offsets"], mod.embedding_dim, mod.packed_specs["weight"]["bucket_size"])

        def forward(ids):
            if torch.jit.is_tracing():
                calls.append(name)
            return _GatherBlockQuantized.apply(ids, mod.weight, *args)
        return forward

    try:
        for name, mod in layers:
            # An instance attribute: nn.Module.__call__ looks up self.forward.
            mod.__dict__["forward"] = swapped(name, mod)
        for name, mod in tables:
            mod.__dict__["forward"] = gathered(name, mod)
        yield calls
    finally:
        for _, mod in layers + tables:
            mod.__dict__.pop("forward", None)


def finish_graph(path: str, model: nn.Module, calls: Sequence[str]) -> dict:
    """Check the MatMulNBits and GatherBlockQuantized nodes of the ONNX file ``path`` against
    ``model``'s packed buffers and store their inputs as initializers named
    ``<layer>.weight_packed`` (B, or the embedding's data), ``.weight_scales``,
    ``.weight_zero_points`` and, for the offset term, ``.weight_offsets_t`` (a linear's
    MatMul) or ``.weight_offsets`` (an embedding's second Gather); the exporter leaves them as
    Constant nodes. ``calls`` are the layer names :func:`nbits_forwards` recorded: the i-th
    MatMulNBits node is the i-th linear called, the i-th GatherBlockQuantized node the i-th
    embedding. A tensor that is not byte for byte the layer's (the codes its packed bytes, the
    scales its ``alpha / 15``, the offsets its ``beta``) is a RuntimeError. Returns
    ``{"matmulnbits_nodes", "gatherblockquantized_nodes", "bucket_sizes"}``."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(path)
    graph = proto.graph
    consts = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    modules = dict(model.named_modules())
    linear_calls = [c for c in calls if not isinstance(modules[c], nn.Embedding)]
    table_calls = [c for c in calls if isinstance(modules[c], nn.Embedding)]
    nodes = [n for n in graph.node if n.op_type == "MatMulNBits" and n.domain == DOMAIN]
    gathers = [n for n in graph.node if n.op_type == "GatherBlockQuantized" and n.domain == DOMAIN]
    for op, found, called, what in (("MatMulNBits", nodes, linear_calls, "packed linears"),
                                    ("GatherBlockQuantized", gathers, table_calls,
                                     "packed embeddings")):
        if len(found) != len(called):
            raise RuntimeError(f"{op} export: {len(found)} nodes in the graph but the trace "
                               f"called {len(called)} {what}")
    new: dict[str, object] = {}

    def adopt(node, idx: int, name: str, suffix: str, want, op: str) -> None:
        # The tensor behind node.input[idx] must be ``want`` byte for byte; it becomes the
        # initializer ``<layer>.<suffix>``.
        src = node.input[idx]
        tensor = consts[src].attribute[0].t if src in consts else inits.get(src)
        got = numpy_helper.to_array(tensor) if tensor is not None else None
        want = want.numpy()
        if got is None or got.dtype != want.dtype or got.shape != want.shape or \
                got.tobytes() != want.tobytes():
            raise RuntimeError(f"{op} export: node {node.name!r} input {idx} ({suffix}) "
                               f"differs from the packed buffers of layer {name!r}")
        key = f"{name}.{suffix}"
        new.setdefault(key, numpy_helper.from_array(np.ascontiguousarray(got), key))
        node.input[idx] = key

    def next_op(output: str, op_type: str):
        return next((c for c in consumers.get(output, []) if c.op_type == op_type), None)

    for node, name in zip(nodes, linear_calls):
        expected = nbits_tensors(modules[name])
        for idx, suffix in enumerate(SUFFIXES, start=1):
            adopt(node, idx, name, suffix, expected[suffix], "MatMulNBits")
        # The offset term: Add(MatMulNBits, MatMul(bucket sums, offsets_t)).
        add = next_op(node.output[0], "Add")
        other = add and producer.get(next(i for i in add.input if i != node.output[0]))
        if other is None or other.op_type != "MatMul":
            raise RuntimeError(f"MatMulNBits export: node {node.name!r} has no offset term")
        adopt(other, 1, name, "weight_offsets_t", expected["offsets_t"], "MatMulNBits")
    for node, name in zip(gathers, table_calls):
        expected = gather_tensors(modules[name])
        for idx, suffix in GATHER_INPUTS:
            adopt(node, idx, name, suffix, expected[suffix], "GatherBlockQuantized")
        # The offset term: Add(Reshape(GatherBlockQuantized), Unsqueeze(Gather(offsets, ids))).
        view = next_op(node.output[0], "Reshape")
        add = view and next_op(view.output[0], "Add")
        other = add and producer.get(next(i for i in add.input if i != view.output[0]))
        source = other and other.op_type == "Unsqueeze" and producer.get(other.input[0])
        if not source or source.op_type != "Gather" or source.input[1] != node.input[1]:
            raise RuntimeError(f"GatherBlockQuantized export: node {node.name!r} has no offset "
                               "term")
        adopt(source, 0, name, "weight_offsets", expected["weight_offsets"],
              "GatherBlockQuantized")
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [n for n in graph.node if not (n.op_type == "Constant" and n.output[0] not in used)]
    del graph.node[:]
    graph.node.extend(keep)
    graph.initializer.extend(new.values())
    onnx.save(proto, path)
    modules_done = {modules[n] for n in calls}
    return {"matmulnbits_nodes": len(nodes), "gatherblockquantized_nodes": len(gathers),
            "bucket_sizes": sorted({m.packed_specs["weight"]["bucket_size"] for m in modules_done})}


def export_four_bit(model: nn.Module, traced: nn.Module, args: tuple, path: str, *,
                    input_names: Sequence[str], output_names: Sequence[str],
                    dynamic_axes: Optional[dict] = None, opset: int = OPSET,
                    accuracy_level: int = DEFAULT_ACCURACY_LEVEL) -> dict:
    """Export ``traced`` (a module whose forward runs ``model``, e.g. a wrapper that returns
    the logits) called on ``args`` to ``path`` with every packed linear of ``model`` as a
    MatMulNBits node and every packed embedding as GatherBlockQuantized, then check the nodes
    against the packed buffers (:func:`finish_graph`). Refuses an unexportable model first
    (:func:`check_four_bit`). The file is not checked against PyTorch here: the caller runs
    it on its own inputs.

    Returns ``matmulnbits_nodes``, ``gatherblockquantized_nodes``, ``bucket_sizes``,
    ``accuracy_level`` and ``dequantized_in_graph`` (packed weights exported as neither,
    kept as fp32)."""
    import warnings

    with nbits_forwards(model, accuracy_level) as calls, warnings.catch_warnings():
        # The tracer warns about every Python-level shape branch; the caller's check on
        # other batch sizes and lengths measures whether the graph generalises.
        warnings.simplefilter("ignore")
        torch.onnx.export(traced, args, path, input_names=list(input_names),
                          output_names=list(output_names), dynamic_axes=dynamic_axes,
                          opset_version=opset, custom_opsets={DOMAIN: 1}, dynamo=False)
        done = list(calls)
    return {**finish_graph(path, model, done), "accuracy_level": accuracy_level,
            "dequantized_in_graph": dequantized_weights(model)}
