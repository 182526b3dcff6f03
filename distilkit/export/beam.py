"""Beam search bookkeeping in numpy, for the ONNX seq2seq generation loop
(:class:`distilkit.export.seq2seq.OnnxSeq2SeqGenerator`): what ``transformers``' (5.x)
``_beam_search`` does with its tensors, as pure functions over a :class:`Beams` state, so the
ONNX loop chooses the tokens ``model.generate(num_beams=k, do_sample=False)`` chooses.

The rules followed (each one changes the output when left out):

* a hypothesis' score is the sum of its tokens' log-softmax (float32), after the logits
  processors (forced BOS/EOS set every other token to -inf and the forced one to 0);
* every row starts with one live beam: the other ``k - 1`` start at -1e9, so the first step
  does not pick the same token ``k`` times;
* each step keeps the ``K = max(2, 1 + len(eos)) * k`` best continuations over all beams, so
  ``k`` live ones remain even when the best ones end; a continuation that ends (an
  end-of-sequence token, or the maximum length) leaves the live beams (its score -1e9 there)
  and, only if it is among the first ``k`` of the ``K``, joins the row's finished hypotheses
  with the score ``sum / generated_length ** length_penalty``; the ``k`` best of those are kept;
* ``early_stopping``: ``True`` stops a row once it has ``k`` finished hypotheses; ``False``
  stops it once the best live beam, scored at the current length, cannot beat the worst
  finished one; ``"never"`` does the same with the best length it could reach (the maximum
  length when ``length_penalty > 0``); a row that cannot improve takes no new hypotheses, and
  the loop ends when no row can improve, every row is done (``True``), or every continuation
  ended;
* the output is each row's best finished hypothesis, cut to the longest of them; positions
  after a hypothesis' end hold ``fill`` (generate's: the pad id, or the first end id when the
  pad id is 0 or unset).

Ties are broken by position (a stable sort), as a sorted ``torch.topk`` does in practice; a
tie decides nothing here except between hypotheses of equal score.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np

NEG = np.float32(-1.0e9)  # transformers' "never chosen" score
EarlyStopping = Union[bool, str]


def check_beam_settings(num_beams, length_penalty, early_stopping) -> None:
    """One ValueError naming the first bad setting."""
    if not isinstance(num_beams, int) or isinstance(num_beams, bool) or num_beams < 1:
        raise ValueError(f"num_beams: {num_beams!r} must be an integer >= 1 (1 = greedy)")
    if not isinstance(length_penalty, (int, float)) or isinstance(length_penalty, bool) \
            or not np.isfinite(length_penalty):
        raise ValueError(f"length_penalty: {length_penalty!r} must be a finite number "
                         "(1.0 = score / length, 0 = none)")
    if early_stopping not in (True, False, "never") or not isinstance(early_stopping, (bool, str)):
        raise ValueError(f"early_stopping: {early_stopping!r} must be true, false or 'never'")


def fill_id(pad_token_id: int, eos_token_id: Sequence[int]) -> int:
    """What generate's beam search writes after a hypothesis' end: ``pad or eos[0]``, so a pad
    id of 0 (T5's) gives the first end id."""
    return int(pad_token_id) if pad_token_id else int(eos_token_id[0])


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log-softmax over the last axis, in float32."""
    x = logits.astype(np.float32, copy=False)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def top_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """The indices of the ``k`` largest of each row, largest first, ties by position."""
    return np.argsort(-scores, axis=-1, kind="stable")[:, :k]


def _take(a: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``a[b, idx[b, j], ...]``: beams gathered per row (axis 1)."""
    return np.take_along_axis(a, idx.reshape(idx.shape + (1,) * (a.ndim - 2)), axis=1)


@dataclass
class Beams:
    """The beam search state of ``batch`` rows with ``k`` beams each: live beams
    (``running`` tokens ``[batch, k, max_length]``, their summed log-probs ``running_scores``
    ``[batch, k]``, ``source`` the beam each came from at the last step) and finished
    hypotheses (``finished`` tokens, ``finished_scores`` after the length penalty,
    ``finished_len`` generated tokens, ``is_finished``: a real hypothesis, not a -1e9
    placeholder), ``improvable`` ``[batch, 1]`` (the early-stop heuristic not yet satisfied),
    ``cur_len`` (tokens so far, prompt included) and ``prompt_len``."""

    running: np.ndarray
    running_scores: np.ndarray
    source: np.ndarray
    finished: np.ndarray
    finished_scores: np.ndarray
    finished_len: np.ndarray
    is_finished: np.ndarray
    improvable: np.ndarray
    cur_len: int
    prompt_len: int
    max_length: int
    going: bool = True

    @property
    def num_beams(self) -> int:
        return self.running_scores.shape[1]

    def last_tokens(self) -> np.ndarray:
        """The newest token of every live beam, ``[batch * k, 1]`` (the decoder's next input)."""
        return self.running[:, :, self.cur_len - 1].reshape(-1, 1)

    def reorder_index(self) -> np.ndarray:
        """For each live beam in flat ``batch * k`` order, the flat row its past comes from
        (the take to apply to every self-attention key/value on the batch axis)."""
        b, k = self.source.shape
        return (self.source + np.arange(b)[:, None] * k).reshape(-1)


def init_beams(prompt: np.ndarray, num_beams: int, max_length: int, fill: int) -> Beams:
    """The start: every row's ``prompt`` (``[batch, prompt_len]``, the decoder start token)
    in all ``num_beams`` beams, beam 0 live at score 0, the others at -1e9, no finished
    hypothesis."""
    b, p = prompt.shape
    running = np.full((b, num_beams, max_length), fill, dtype=np.int64)
    running[:, :, :p] = prompt[:, None, :]
    scores = np.zeros((b, num_beams), dtype=np.float32)
    scores[:, 1:] = NEG
    return Beams(running=running, running_scores=scores,
                 source=np.tile(np.arange(num_beams), (b, 1)), finished=running.copy(),
                 finished_scores=np.full((b, num_beams), NEG, dtype=np.float32),
                 finished_len=np.zeros((b, num_beams), dtype=np.int64),
                 is_finished=np.zeros((b, num_beams), dtype=bool),
                 improvable=np.ones((b, 1), dtype=bool), cur_len=p, prompt_len=p,
                 max_length=max_length)


def beam_step(s: Beams, log_probs: np.ndarray, eos_token_id: Sequence[int],
              length_penalty: float, early_stopping: EarlyStopping) -> Beams:
    """One step: ``log_probs`` ``[batch * k, vocab]`` (log-softmax of every live beam's next
    token logits, after the logits processors) -> the next state (see the module docstring
    for the rules). ``going`` of the result says whether to run the decoder again."""
    b, k = s.running_scores.shape
    vocab = log_probs.shape[-1]
    n_keep = max(2, 1 + len(eos_token_id)) * k
    total = (log_probs.reshape(b, k, vocab).astype(np.float32)
             + s.running_scores[:, :, None]).reshape(b, k * vocab)
    top = top_indices(total, n_keep)
    top_scores = np.take_along_axis(total, top, axis=1)
    src, tokens = top // vocab, top % vocab
    top_seqs = _take(s.running, src).copy()
    top_seqs[:, :, s.cur_len] = tokens
    ended = np.isin(tokens, list(eos_token_id)) | (s.cur_len + 1 >= s.max_length)

    # The k best continuations that did not end stay live.
    live_scores = top_scores + ended.astype(np.float32) * NEG
    keep = top_indices(live_scores, k)
    running, running_scores, source = (_take(a, keep) for a in (top_seqs, live_scores, src))

    # The ended ones among the first k join the finished hypotheses, if they can still count.
    length = s.cur_len + 1 - s.prompt_len
    just = ended & (np.arange(n_keep) < k)[None, :]
    cand = top_scores / np.float32(length ** length_penalty)
    full = s.is_finished.all(axis=1, keepdims=True) & (early_stopping is True)
    cand = cand + full.astype(np.float32) * NEG
    cand = cand + (~s.improvable).astype(np.float32) * NEG
    cand = cand + (~just).astype(np.float32) * NEG
    merged_scores = np.concatenate([s.finished_scores, cand], axis=1)
    best = top_indices(merged_scores, k)
    finished = _take(np.concatenate([s.finished, top_seqs], axis=1), best)
    finished_scores = np.take_along_axis(merged_scores, best, axis=1)
    finished_len = np.take_along_axis(np.concatenate(
        [s.finished_len, np.full((b, n_keep), length, dtype=np.int64)], axis=1), best, axis=1)
    is_finished = np.take_along_axis(np.concatenate([s.is_finished, just], axis=1), best, axis=1)

    cur_len = s.cur_len + 1
    improvable = s.improvable & can_improve(running_scores, finished_scores, is_finished,
                                            cur_len - s.prompt_len,
                                            s.max_length - s.prompt_len, length_penalty,
                                            early_stopping)
    going = bool(improvable.any()) \
        and not (bool(is_finished.all()) and early_stopping is True) \
        and not bool(ended.all())
    return Beams(running=running, running_scores=running_scores, source=source,
                 finished=finished, finished_scores=finished_scores, finished_len=finished_len,
                 is_finished=is_finished, improvable=improvable, cur_len=cur_len,
                 prompt_len=s.prompt_len, max_length=s.max_length, going=going)


def can_improve(running_scores: np.ndarray, finished_scores: np.ndarray,
                is_finished: np.ndarray, generated: int, max_generated: int,
                length_penalty: float, early_stopping: EarlyStopping) -> np.ndarray:
    """``[batch, 1]``: whether the best live beam, scored at the best length it may reach
    (``generated`` tokens, or ``max_generated`` with ``early_stopping="never"`` and a positive
    ``length_penalty``), beats the worst finished hypothesis (a row with a placeholder left
    always can)."""
    n = max_generated if early_stopping == "never" and length_penalty > 0.0 else generated
    best = running_scores[:, :1] / np.float32(n ** length_penalty)
    worst = np.where(is_finished, finished_scores.min(axis=1, keepdims=True), NEG)
    return (best > worst).any(axis=-1, keepdims=True)


def best_sequences(s: Beams) -> np.ndarray:
    """Each row's best finished hypothesis ``[batch, prompt_len + longest]``, cut to the
    longest of them (as generate returns one sequence a row)."""
    return s.finished[:, 0, :s.prompt_len + int(s.finished_len[:, 0].max())]
