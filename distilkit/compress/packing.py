"""Real low-bit storage: packed codes, per-bucket scales, metadata checks and size accounting.

Codes of ``b`` bits are laid out as one little-endian bit stream: code ``i`` occupies bits
``[i*b, (i+1)*b)``, least significant bit first. For 4 bits this is two codes per byte (low
nibble first), for 2 bits four per byte, for 1 bit eight; 3-, 5-, 6- and 7-bit codes straddle
byte boundaries. One layout for every width keeps the unpacking rule (and the Triton kernel in
:mod:`distilkit.kernels.triton_dequant`) a single formula: byte ``(i*b) >> 3``, shift
``(i*b) & 7``, over a 16-bit window.

A packed module (:class:`PackedLinear`, and packed variants of ``nn.Embedding`` / ``nn.LSTM``
and their subclasses, made by :func:`packed_class`) keeps the parent class's forward (only
:class:`PackedLinear` adds a dispatch to the GPU kernel, below).
For each quantized weight ``W`` it holds, as persistent buffers,

* ``W_packed``: uint8, ``ceil(numel * b / 8)`` bytes of codes,
* ``W_scale`` and ``W_offset``: fp32 ``alpha`` and ``beta`` of each bucket (64 bits a bucket),
* ``W_points``: fp32, the ``2**b`` points of the non-uniform scheme (absent for uniform),

and ``W`` itself becomes a frozen, *non-persistent* fp32 copy dequantized from those buffers.
So the state dict, and the safetensors file that ``save_pretrained`` writes from it, holds
only the packed tensors: the file really is ``b + 64/k`` bits per quantized weight. On CPU the
module computes with the dequantized copy (the fast path there); the Triton kernel and the
bitsandbytes conversion in :mod:`distilkit.kernels` are the low-memory GPU paths.

Loading checks the metadata (bits, bucket size, scheme, shape) against the tensors before
anything is copied: a mismatch raises a ``ValueError`` naming the tensor, what the metadata
implies and what the file holds.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
from torch import nn

from distilkit.compress import quant_math as qm

SCHEMES = ("uniform", "nonuniform")


# ---------------------------------------------------------------------------------------
# Bit packing
# ---------------------------------------------------------------------------------------

def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes needed for ``numel`` codes of ``bits`` bits."""
    return -(-numel * qm.check_bits(bits) // 8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``0..2**bits-1`` into a uint8 tensor (layout: module docstring)."""
    qm.check_bits(bits)
    c = codes.reshape(-1).to(torch.uint8)
    if c.numel() and int(c.max()) >= (1 << bits):
        raise ValueError(f"pack_codes: a code is >= 2**{bits}; codes must fit in {bits} bits")
    n = c.numel()
    if 8 % bits == 0:
        # Fast path, same layout: ``per`` whole codes per byte, the first in the low bits.
        per = 8 // bits
        pad = (-n) % per
        if pad:
            c = torch.cat([c, c.new_zeros(pad)])
        shifts = _shifts(per, c.device) * bits
        return (c.view(-1, per) << shifts).sum(dim=1, dtype=torch.uint8) if per > 1 else c.clone()
    # General path: expand to a bit stream, then regroup by 8.
    stream = ((c[:, None] >> _shifts(bits, c.device)) & 1).reshape(-1)
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    return (stream.view(-1, 8) * (1 << _shifts(8, c.device))).sum(dim=1, dtype=torch.uint8)


def _shifts(n: int, device: torch.device) -> torch.Tensor:
    """``0, 1, ..., n - 1`` as uint8 on ``device`` (where the codes are)."""
    return torch.arange(n, dtype=torch.uint8, device=device)


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``numel`` codes as uint8."""
    qm.check_bits(bits)
    p = packed.reshape(-1).to(torch.uint8)
    if p.numel() < packed_nbytes(numel, bits):
        raise ValueError(f"unpack_codes: {p.numel()} bytes cannot hold {numel} codes of "
                         f"{bits} bits (need {packed_nbytes(numel, bits)})")
    if 8 % bits == 0:
        per = 8 // bits
        shifts = _shifts(per, p.device) * bits
        mask = (1 << bits) - 1
        return ((p[:, None] >> shifts) & mask).reshape(-1)[:numel].contiguous()
    stream = ((p[:, None] >> _shifts(8, p.device)) & 1).reshape(-1)
    stream = stream[: numel * bits].view(numel, bits)
    return (stream * (1 << _shifts(bits, p.device))).sum(dim=1, dtype=torch.uint8)


# ---------------------------------------------------------------------------------------
# Packed modules
# ---------------------------------------------------------------------------------------

def weight_spec(shape, bits: int, bucket_size: Optional[int], scheme: str) -> dict:
    """The JSON-serialisable metadata of one packed weight (stored in the compression
    record and checked against the tensors at load time)."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme={scheme!r} is invalid: use one of {SCHEMES}")
    numel = math.prod(shape)
    return {"shape": [int(s) for s in shape], "bits": qm.check_bits(bits),
            "bucket_size": qm.effective_bucket_size(numel, qm.check_bucket_size(bucket_size)),
            "scheme": scheme}


def expected_buffers(spec: dict) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``suffix -> (shape, dtype)`` of the buffers a packed weight with ``spec`` must have."""
    numel = math.prod(spec["shape"])
    nb = qm.num_buckets(numel, spec["bucket_size"])
    out = {"packed": ((packed_nbytes(numel, spec["bits"]),), torch.uint8),
           "scale": ((nb,), torch.float32), "offset": ((nb,), torch.float32)}
    if spec["scheme"] == "nonuniform":
        out["points"] = ((1 << spec["bits"],), torch.float32)
    return out


def dequantize_packed(packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                      spec: dict, points: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The fp32 weight encoded by packed codes and per-bucket ``scale`` (alpha) and
    ``offset`` (beta): the same arithmetic as the fake-quantized forward."""
    shape, bits, k = spec["shape"], spec["bits"], spec["bucket_size"]
    numel = math.prod(shape)
    codes = unpack_codes(packed, bits, numel)
    pad = (-numel) % k
    if pad:
        codes = torch.cat([codes, codes.new_zeros(pad)])
    codes = codes.view(-1, k)
    if spec["scheme"] == "nonuniform":
        if points is None:
            raise ValueError("a non-uniform packed weight needs its points table")
        q = points.float()[codes.long()]
    else:
        q = qm.uniform_values(codes, bits)
    return qm.from_buckets(qm.dequantize_buckets(q, scale.float(), offset.float()), shape)


class PackedMixin:
    """Adds packed storage of some weights to a module class (see the module docstring).
    Use :func:`to_packed` to convert a module; do not instantiate directly."""

    packed_specs: dict

    def _setup_packed(self, specs: dict[str, dict]) -> None:
        self.packed_specs = {name: dict(spec) for name, spec in specs.items()}
        for name, spec in self.packed_specs.items():
            w = getattr(self, name)
            if list(w.shape) != spec["shape"]:
                raise ValueError(f"{type(self).__name__}.{name} has shape {list(w.shape)} but "
                                 f"the packed metadata says {spec['shape']}")
            w.requires_grad_(False)
            for suffix, (shape, dtype) in expected_buffers(spec).items():
                self.register_buffer(f"{name}_{suffix}",
                                     torch.zeros(shape, dtype=dtype, device=w.device))

    def set_packed(self, name: str, codes: torch.Tensor, alpha: torch.Tensor,
                   beta: torch.Tensor, points: Optional[torch.Tensor] = None) -> None:
        """Store the codes ``[num_buckets, k]`` (padding included, dropped here) and bucket
        scalars of weight ``name``, then refresh its dequantized copy."""
        spec = self.packed_specs[name]
        numel = math.prod(spec["shape"])
        getattr(self, f"{name}_packed").copy_(pack_codes(codes.reshape(-1)[:numel], spec["bits"]))
        getattr(self, f"{name}_scale").copy_(alpha)
        getattr(self, f"{name}_offset").copy_(beta)
        if spec["scheme"] == "nonuniform":
            getattr(self, f"{name}_points").copy_(points.detach())
        self.refresh_dequantized(name)

    def dequantized(self, name: str) -> torch.Tensor:
        """The fp32 weight ``name`` decoded from the packed buffers."""
        spec = self.packed_specs[name]
        pts = getattr(self, f"{name}_points") if spec["scheme"] == "nonuniform" else None
        return dequantize_packed(getattr(self, f"{name}_packed"), getattr(self, f"{name}_scale"),
                                 getattr(self, f"{name}_offset"), spec, pts)

    def codes(self, name: str) -> torch.Tensor:
        """The unpacked uint8 codes of weight ``name`` (flat, no padding)."""
        spec = self.packed_specs[name]
        return unpack_codes(getattr(self, f"{name}_packed"), spec["bits"],
                            math.prod(spec["shape"]))

    @torch.no_grad()
    def refresh_dequantized(self, name: Optional[str] = None) -> None:
        for n in ([name] if name else list(self.packed_specs)):
            w = getattr(self, n)
            w.copy_(self.dequantized(n).to(w.dtype))

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        # The dequantized copies are derived data: only the packed tensors are saved.
        for name in self.packed_specs:
            destination.pop(prefix + name, None)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        for name, spec in self.packed_specs.items():
            present = True
            for suffix, (shape, dtype) in expected_buffers(spec).items():
                key = f"{prefix}{name}_{suffix}"
                if key not in state_dict:
                    present = False
                    continue
                t = state_dict[key]
                if tuple(t.shape) != shape or t.dtype != dtype:
                    raise ValueError(
                        f"packed tensor {key!r}: the metadata (bits={spec['bits']}, "
                        f"bucket_size={spec['bucket_size']}, scheme={spec['scheme']!r}, "
                        f"shape={spec['shape']}) implies shape {list(shape)} and dtype "
                        f"{dtype}, but the saved tensor has shape {list(t.shape)} and dtype "
                        f"{t.dtype}. The compression metadata does not match the tensors; "
                        f"re-export the model with save_compressed.")
            if present:
                pts = state_dict.get(f"{prefix}{name}_points")
                state_dict[prefix + name] = dequantize_packed(
                    state_dict[f"{prefix}{name}_packed"], state_dict[f"{prefix}{name}_scale"],
                    state_dict[f"{prefix}{name}_offset"], spec, pts)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        for name in self.packed_specs:
            # A key we synthesised above is ours, not the caller's.
            state_dict.pop(prefix + name, None)


# The GPU forward of PackedLinear. It lives a layer up, in distilkit.kernels (which this module
# must not import), so distilkit.kernels registers it here when it is imported.
_KERNEL_FORWARD = None
# DISTILKIT_TRITON=1 forces the kernel on any device (CPU tensors under TRITON_INTERPRET=1:
# how the tests check the dispatch), =0 never uses it; unset, CUDA tensors use it when Triton
# is installed. FORCE_KERNEL (None / True / False) overrides the variable in code.
TRITON_ENV = "DISTILKIT_TRITON"
FORCE_KERNEL: Optional[bool] = None
_HAS_TRITON: Optional[bool] = None


def register_kernel_forward(fn) -> None:
    """Set the ``(module, x) -> y`` kernel forward :class:`PackedLinear` dispatches to."""
    global _KERNEL_FORWARD
    _KERNEL_FORWARD = fn


def _triton_installed() -> bool:
    # find_spec, not import: the CPU path must never import triton.
    global _HAS_TRITON
    if _HAS_TRITON is None:
        import importlib.util

        _HAS_TRITON = importlib.util.find_spec("triton") is not None
    return _HAS_TRITON


def use_kernel(x: torch.Tensor, packed: torch.Tensor) -> bool:
    """Whether a PackedLinear forward on ``x`` runs the Triton kernel (rules above). Inputs
    that need a gradient take the dequantized path: the kernel has no backward."""
    if _KERNEL_FORWARD is None or (x.requires_grad and torch.is_grad_enabled()):
        return False
    force = FORCE_KERNEL
    if force is None:
        env = os.environ.get(TRITON_ENV, "").strip()
        force = {"1": True, "0": False}.get(env)
    if force is not None:
        return force
    return x.is_cuda and packed.is_cuda and _triton_installed()


class PackedLinear(PackedMixin, nn.Linear):
    """``nn.Linear`` whose ``weight`` is stored as packed low-bit codes with per-bucket
    fp32 scale and offset (and a points table for the non-uniform scheme). On CUDA (with
    Triton) the forward reads the packed codes in the kernel of :mod:`distilkit.kernels`;
    elsewhere it computes with the dequantized copy."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_kernel(x, self.weight_packed):
            return _KERNEL_FORWARD(self, x).to(x.dtype)
        return super().forward(x)


class PackedEmbedding(PackedMixin, nn.Embedding):
    """``nn.Embedding`` with packed low-bit storage of ``weight``."""


class PackedLSTM(PackedMixin, nn.LSTM):
    """``nn.LSTM`` with packed low-bit storage of its weight matrices (biases stay fp32)."""


_PACKED_CLASSES: dict[type, type] = {nn.Linear: PackedLinear, nn.Embedding: PackedEmbedding,
                                     nn.LSTM: PackedLSTM}


def packed_class(cls: type) -> type:
    """The packed variant of module class ``cls``. Subclasses (e.g. a scaled word embedding
    whose forward multiplies by a constant) get their own packed subclass, so their forward
    is kept; it is registered in this module so that it pickles by name."""
    if cls in _PACKED_CLASSES:
        return _PACKED_CLASSES[cls]
    if issubclass(cls, PackedMixin):
        return cls
    name = f"Packed_{cls.__module__.replace('.', '_')}_{cls.__name__}"
    new = type(name, (PackedMixin, cls), {"__module__": __name__, "__qualname__": name,
                                           "__doc__": f"{cls.__name__} with packed weights."})
    globals()[name] = new
    _PACKED_CLASSES[cls] = new
    return new


def to_packed(module: nn.Module, specs: dict[str, dict]) -> nn.Module:
    """Convert ``module`` in place to its packed class with packed buffers for the weights
    in ``specs`` (``name -> weight_spec``). Parameters, hooks and the forward are kept; the
    buffers start at zero: fill them with ``set_packed`` or a state-dict load."""
    module.__class__ = packed_class(type(module))
    module._setup_packed(specs)
    return module


# ---------------------------------------------------------------------------------------
# Size accounting
# ---------------------------------------------------------------------------------------

def size_report(model: nn.Module, huffman: bool = False) -> dict:
    """What the model's saved tensors weigh, from the tensors themselves.

    Returns ``quantized_weights`` (count), ``packed_bytes`` (codes), ``scale_bytes``
    (bucket scale/offset and points tables), ``fp_bytes`` (every other saved tensor),
    ``total_bytes``, ``bits_per_quantized_weight`` ((packed + scale) * 8 / count),
    ``fp32_bytes`` (the same model all in fp32) and ``compression`` (fp32 / total). With
    ``huffman=True`` also ``huffman_total_bytes``: the codes Huffman-coded per weight
    (codebooks not counted) plus everything else.
    """
    state = model.state_dict()
    packed_keys: set[str] = set()
    n_q = packed_b = scale_b = huff_bits = 0
    for mname, mod in model.named_modules():
        if not isinstance(mod, PackedMixin):
            continue
        prefix = f"{mname}." if mname else ""
        for name, spec in mod.packed_specs.items():
            n_q += math.prod(spec["shape"])
            for suffix in expected_buffers(spec):
                key = f"{prefix}{name}_{suffix}"
                packed_keys.add(key)
                nbytes = state[key].numel() * state[key].element_size()
                if suffix == "packed":
                    packed_b += nbytes
                else:
                    scale_b += nbytes
            if huffman:
                huff_bits += qm.huffman_bits(mod.codes(name))
    seen: set[tuple] = set()
    fp_b = 0
    for key, t in state.items():
        # Tied tensors appear under several keys but are saved once.
        ident = (t.data_ptr(), t.numel(), t.dtype) if t.numel() else ("empty", key)
        if key in packed_keys or ident in seen:
            continue
        seen.add(ident)
        fp_b += t.numel() * t.element_size()
    total = packed_b + scale_b + fp_b
    fp32 = n_q * 4 + fp_b
    out = {"quantized_weights": n_q, "packed_bytes": packed_b, "scale_bytes": scale_b,
           "fp_bytes": fp_b, "total_bytes": total,
           "bits_per_quantized_weight": (packed_b + scale_b) * 8 / n_q if n_q else None,
           "fp32_bytes": fp32, "compression": fp32 / total if total else None}
    if huffman:
        out["huffman_total_bytes"] = math.ceil(huff_bits / 8) + scale_b + fp_b
    return out


def safetensors_payload_bytes(path: str) -> tuple[int, int]:
    """``(file_bytes, header_bytes)`` of a safetensors file: its size on disk and the part
    that is the JSON header (8-byte length + header), the rest being tensor data."""
    import os
    import struct

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    return size, 8 + n
