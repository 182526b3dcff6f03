"""Batch collation that pads token fields and stacks everything else (cached teacher outputs,
teacher-tokenized inputs)."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

# Fields padded with the tokenizer's pad id (ids) or 0 (masks); labels of sequences use -100.
_PAD_ZERO = ("attention_mask", "token_type_ids", "teacher_attention_mask", "teacher_token_type_ids",
             "attention_mask_b", "decoder_attention_mask")
_PAD_ID = ("input_ids", "teacher_input_ids", "input_ids_b")


class DistilCollator:
    """Pads ``input_ids``-like fields per batch (right padding), sequence ``labels`` with
    -100, and stacks any other numeric field (``teacher_logits``, ``teacher_cls_hidden``) as
    float or integer tensors. ``pad_token_id`` defaults to the tokenizer's."""

    def __init__(self, tokenizer: Any = None, pad_token_id: int | None = None,
                 teacher_pad_token_id: int | None = None):
        self.pad_id = pad_token_id if pad_token_id is not None else (
            getattr(tokenizer, "pad_token_id", None) or 0)
        self.teacher_pad_id = teacher_pad_token_id if teacher_pad_token_id is not None else self.pad_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for key in features[0]:
            vals = [f[key] for f in features]
            if key in _PAD_ID or key in _PAD_ZERO or (key == "labels" and _is_seq(vals[0])):
                pad = (-100 if key == "labels" else 0 if key in _PAD_ZERO
                       else self.teacher_pad_id if key.startswith("teacher_") else self.pad_id)
                out[key] = _pad([list(v) for v in vals], pad)
            else:
                t = _stack(vals)
                out[key] = t.float() if t.is_floating_point() else t
        return out


def _stack(vals: list) -> torch.Tensor:
    """One tensor from per-example values: numbers, nested lists, or tensors / numpy arrays
    (a dataset in torch or numpy format, or outputs a user attached), stacked on a new dim."""
    if isinstance(vals[0], (torch.Tensor, np.ndarray)):
        return torch.stack([torch.as_tensor(v) for v in vals])
    return torch.as_tensor(vals)


def _is_seq(v) -> bool:
    return isinstance(v, (list, tuple)) or (isinstance(v, (torch.Tensor, np.ndarray)) and v.ndim > 0)


def _pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    n = max(len(s) for s in seqs)
    t = torch.full((len(seqs), n), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            t[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
    return t
