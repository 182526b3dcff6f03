"""Distillation losses as pure tensor functions.

Conventions shared by every function here:

* ``logits`` have shape ``(..., C)``: ``(B, C)`` for classification, ``(B, T, V)`` for
  token-level (seq2seq) distillation.
* ``mask`` (optional) has the leading shape of the positions, ``(B,)`` or ``(B, T)``; ``True``
  or ``1`` marks a position that counts. Masked positions contribute nothing, and the mean is
  taken over the positions that count, so padding never dilutes the loss.
* Every function returns a scalar, the mean over counted positions, unless ``reduction="sum"``
  is given. (The trainer makes gradient accumulation exact by weighting each micro-batch's
  mean by its share of the term's items, :mod:`distilkit.loss_terms`.)
* Every function computes in fp32 whatever the inputs' dtype (bf16 logits included).

The soft-target loss carries the ``T^2`` factor of Hinton et al. (2015): the gradient of the
softened KL with respect to the logits scales as ``1/T^2``, so multiplying by ``T^2`` keeps
the soft-target term on the same scale as the hard-label term whatever the temperature.
Several widely used implementations omit it; here it is part of the definition and tested.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def _reduce(per_pos: Tensor, mask: Optional[Tensor], reduction: str) -> Tensor:
    """Mean (or sum) of per-position values over the positions that count."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if mask is None:
        total = per_pos.sum()
        return total if reduction == "sum" else total / max(per_pos.numel(), 1)
    m = mask.to(per_pos.dtype)
    total = (per_pos * m).sum()
    # The count stays a tensor: no device-to-host sync in the training step.
    return total if reduction == "sum" else total / m.sum().clamp_min(1)


def soft_targets(teacher_logits: Tensor, temperature: float) -> Tensor:
    """Teacher distribution softened at ``temperature``: ``softmax(z / T)``."""
    return F.softmax(teacher_logits.float() / temperature, dim=-1)


def _ensemble_weights(n: int, weights: Optional[Sequence[float]]) -> list[float]:
    """``weights`` (default: equal) normalised to sum to 1, checked on the host: they are
    plain numbers, so no tensor is built or read back in the step."""
    if n == 0:
        raise ValueError("an ensemble needs at least one teacher")
    w = [1.0] * n if weights is None else [float(x) for x in weights]
    if len(w) != n or any(x < 0 for x in w) or sum(w) <= 0:
        raise ValueError(f"ensemble weights must be {n} numbers >= 0, not all zero, got {w}")
    return [x / sum(w) for x in w]


def ensemble_soft_targets(teacher_logits: Sequence[Tensor], temperature: float,
                          weights: Optional[Sequence[float]] = None) -> Tensor:
    """An ensemble's soft targets: the (weighted) average of each teacher's softened
    distribution (Hinton et al. 2015, section 2), not of their logits."""
    w = _ensemble_weights(len(teacher_logits), weights)
    return sum(wk * soft_targets(z, temperature) for wk, z in zip(w, teacher_logits))


def ensemble_logits(teacher_logits: Sequence[Tensor],
                    weights: Optional[Sequence[float]] = None) -> Tensor:
    """The (weighted) mean of an ensemble's logits, in fp32: the target of the logit MSE
    (which matches logits, not distributions). One teacher's logits are returned as they are."""
    if len(teacher_logits) == 1 and weights is None:
        return teacher_logits[0]
    w = _ensemble_weights(len(teacher_logits), weights)
    return sum(wk * z.float() for wk, z in zip(w, teacher_logits))


def soft_target_kl(student_logits: Tensor, teacher_logits: Optional[Tensor], temperature: float,
                   mask: Optional[Tensor] = None, reduction: str = "mean",
                   teacher_probs: Optional[Tensor] = None) -> Tensor:
    """``T^2 * KL(p_teacher^T || p_student^T)`` per position, reduced over counted positions.

    Give either ``teacher_logits`` or precomputed ``teacher_probs`` (e.g. an ensemble's
    averaged distribution from :func:`ensemble_soft_targets`). Zero when the student's logits
    equal the teacher's.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if teacher_probs is None:
        teacher_probs = soft_targets(teacher_logits, temperature)
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    # KL(p_t || p_s) = sum p_t (log p_t - log p_s); xlogy makes p_t = 0 entries exactly 0.
    kl = (torch.xlogy(teacher_probs, teacher_probs) - teacher_probs * log_p_s).sum(-1)
    return _reduce(kl, mask, reduction) * (temperature ** 2)


def hard_ce(logits: Tensor, labels: Tensor, ignore_index: int = -100,
            reduction: str = "mean") -> Tensor:
    """Cross-entropy with the hard labels at T = 1; ``ignore_index`` positions are masked."""
    flat_logits = logits.float().reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1)
    per = F.cross_entropy(flat_logits, flat_labels, ignore_index=ignore_index, reduction="none")
    return _reduce(per, flat_labels != ignore_index, reduction)


def logit_mse(student_logits: Tensor, teacher_logits: Tensor, mask: Optional[Tensor] = None,
              reduction: str = "mean") -> Tensor:
    """Mean squared error between raw logits (Tang et al. 2019), averaged over classes and
    over counted positions."""
    per = (student_logits.float() - teacher_logits.float()).pow(2).mean(-1)
    return _reduce(per, mask, reduction)


def hidden_mse(student_hidden: Tensor, teacher_hidden: Tensor,
               projection: Optional[torch.nn.Module] = None,
               mask: Optional[Tensor] = None, reduction: str = "mean") -> Tensor:
    """MSE between hidden states ``(B, T, H)`` of one mapped layer pair (FitNets/TinyBERT).
    ``projection`` maps the student's width to the teacher's when they differ (learned)."""
    s = projection(student_hidden) if projection is not None else student_hidden
    if s.shape[-1] != teacher_hidden.shape[-1]:
        raise ValueError(f"hidden widths differ ({s.shape[-1]} vs {teacher_hidden.shape[-1]}): "
                         "give a projection")
    per = (s.float() - teacher_hidden.float()).pow(2).mean(-1)
    return _reduce(per, mask, reduction)


def patient_loss(student_cls: Sequence[Tensor], teacher_cls: Sequence[Tensor],
                 mask: Optional[Tensor] = None, reduction: str = "mean") -> Tensor:
    """Patient-KD (Sun et al. 2019): for each mapped layer pair, the squared distance between
    the L2-normalised [CLS] vectors ``(B, H)``, summed over pairs, averaged over the batch.
    Given per-token states ``(B, T, H)`` and ``mask`` ``(B, T)`` (encoder-decoder stacks,
    which have no [CLS]), every counted token's vector is compared and averaged instead."""
    if len(student_cls) != len(teacher_cls) or not student_cls:
        raise ValueError(f"patient_loss needs equal, non-empty layer lists "
                         f"({len(student_cls)} vs {len(teacher_cls)})")
    per = 0
    for s, t in zip(student_cls, teacher_cls):
        if s.shape[-1] != t.shape[-1]:
            raise ValueError(f"Patient-KD compares states of equal width; got {s.shape[-1]} "
                             f"and {t.shape[-1]} (use hidden_mse with a projection instead)")
        d = F.normalize(s.float(), dim=-1) - F.normalize(t.float(), dim=-1)
        per = per + d.pow(2).sum(-1)
    return _reduce(per, mask, reduction)


def attention_loss(student_attn: Tensor, teacher_attn: Tensor,
                   mask: Optional[Tensor] = None, reduction: str = "mean",
                   kind: str = "kl") -> Tensor:
    """Loss between attention distributions ``(B, heads, T, T)`` of one mapped layer pair
    (TinyBERT uses MSE, MiniLM KL). Heads are matched one to one, so head counts must agree.
    ``mask`` ``(B, T)`` masks padded query rows and key columns."""
    if student_attn.shape != teacher_attn.shape:
        raise ValueError(f"attention maps differ in shape {tuple(student_attn.shape)} vs "
                         f"{tuple(teacher_attn.shape)}: the mapped layers need the same number "
                         "of heads and sequence length")
    s, t = student_attn.float(), teacher_attn.float()
    if kind == "kl":
        per_row = (torch.xlogy(t, t) - t * torch.log(s.clamp_min(1e-12))).sum(-1)
    elif kind == "mse":
        km = mask[:, None, None, :].to(s.dtype) if mask is not None else 1.0
        per_row = ((s - t).pow(2) * km).sum(-1)
    else:
        raise ValueError(f"attention loss kind must be 'kl' or 'mse', got {kind!r}")
    row_mask = None if mask is None else mask[:, None, :].expand(per_row.shape)
    return _reduce(per_row, row_mask, reduction)


def cosine_loss(student_hidden: Tensor, teacher_hidden: Tensor,
                mask: Optional[Tensor] = None, reduction: str = "mean") -> Tensor:
    """DistilBERT's cosine embedding loss: ``1 - cos(h_s, h_t)`` per position."""
    if student_hidden.shape[-1] != teacher_hidden.shape[-1]:
        raise ValueError(f"cosine loss needs equal widths ({student_hidden.shape[-1]} vs "
                         f"{teacher_hidden.shape[-1]})")
    per = 1 - F.cosine_similarity(student_hidden.float(), teacher_hidden.float(), dim=-1)
    return _reduce(per, mask, reduction)


def topk_soft_targets(teacher_logits: Tensor, k: int, temperature: float
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """The teacher's distribution at ``temperature`` cut to its ``k`` most likely tokens plus
    one tail bucket: ``(log_probs (..., k), ids (..., k), tail (...))``, with
    ``log_probs = log softmax(z / T)`` at ``ids`` (largest first) and ``tail = 1 - sum of
    those probabilities``, computed as ``exp(logsumexp)`` of the other tokens' log-probs, so
    it is exactly 0 when ``k`` is the vocabulary size and keeps its precision when tiny.
    The input of :func:`topk_soft_target_kl`, computed in fp32."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    vocab = teacher_logits.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"top_k: {k} must be between 1 and the vocabulary size {vocab}")
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    top, ids = log_p.topk(k, dim=-1)
    rest = log_p.scatter(-1, ids, float("-inf"))
    return top, ids, torch.logsumexp(rest, dim=-1).exp()


def topk_soft_target_kl(student_logits: Tensor, topk_log_probs: Tensor, topk_ids: Tensor,
                        tail_mass: Tensor, temperature: float, mask: Optional[Tensor] = None,
                        reduction: str = "mean") -> Tensor:
    """Soft-target KL against a *cached top-k* teacher distribution, ``x T^2`` like
    :func:`soft_target_kl`.

    Per position, with ``S`` the ``k`` cached token ids, ``p_i = exp(topk_log_probs_i)`` the
    teacher's probabilities at temperature ``T`` for ``i in S``, ``r = tail_mass`` its
    remaining mass, ``q = softmax(z_s / T)`` the student's distribution and
    ``q_r = 1 - sum_{i in S} q_i`` the student's own tail mass, the loss is the KL between
    the two ``(k+1)``-way distributions (the top-k tokens, then the tail as one bucket)::

        KD_k = T^2 * [ sum_{i in S} p_i (log p_i - log q_i)  +  r (log r - log q_r) ]

    averaged over counted positions. ``q_r`` is computed as ``logsumexp`` of the student's
    log-probabilities outside ``S`` (the same number as ``1 - sum q_i``, without the
    cancellation when it is tiny); ``0 log 0`` is 0, so ``r = 0`` (``k`` = vocabulary size)
    adds nothing and the loss equals :func:`soft_target_kl` on the full distributions.

    How far it is from the full-vocabulary KD: merging the tokens outside ``S`` into one
    bucket can only lower a KL (log-sum inequality), and the gap is exactly the tail's own KL
    weighted by the tail mass. Per position, with ``p~ = p / r`` and ``q~ = q / q_r`` the two
    distributions renormalised over the tokens outside ``S``::

        0 <= KD_full - KD_k = T^2 * r * KL(p~ || q~)
                            <= T^2 * r * log(q_r / min_{j not in S} q_j)
                            <= T^2 * r * (log(V - k) + (max_j z_s,j - min_j z_s,j) / T)

    so the cut costs nothing where the teacher's tail mass ``r`` is 0 and at most the tail
    mass times the log of the tail's size plus the student's logit range over ``T``.
    The gradient with respect to the student's logits is ``T (q_i - p_i)`` for ``i in S`` and
    ``T q_j (1 - r / q_r)`` outside it: the student is pulled to put mass ``r`` on the tail,
    spread as its own tail is.

    Args:
        student_logits: ``(..., V)``.
        topk_log_probs: ``(..., k)`` the teacher's log-probabilities at ``temperature`` (any
            float dtype; the cache stores fp16), from :func:`topk_soft_targets`.
        topk_ids: ``(..., k)`` their token ids (integers in ``[0, V)``).
        tail_mass: ``(...)`` the teacher's probability outside ``topk_ids``.
        temperature: the temperature the cached values were computed at.
        mask: positions that count (padding, e.g. labels -100, must be masked out).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if topk_log_probs.shape != topk_ids.shape or topk_ids.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(f"top-k teacher values {tuple(topk_log_probs.shape)} / ids "
                         f"{tuple(topk_ids.shape)} do not match the student's logits "
                         f"{tuple(student_logits.shape)} (same positions, k values each)")
    ids = topk_ids.long()
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_q_top = log_q.gather(-1, ids)
    # The student's tail: every token but the cached ones. A very negative finite fill (not
    # -inf) keeps logsumexp and its gradient finite when the cached ids cover the vocabulary;
    # scatter passes no gradient to the filled entries.
    log_q_tail = torch.logsumexp(log_q.scatter(-1, ids, -1e30), dim=-1)
    p = topk_log_probs.float().exp()
    r = tail_mass.float().clamp_min(0)
    kl = ((torch.xlogy(p, p) - p * log_q_top).sum(-1)
          + torch.xlogy(r, r) - r * log_q_tail)
    return _reduce(kl, mask, reduction) * (temperature ** 2)
