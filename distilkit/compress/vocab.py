"""Vocabulary pruning: keep only the word-embedding rows of the tokens the model will see.

On MiniLM-sized students most parameters are the word embedding table (30,522 x 384), and
most of its rows belong to tokens a task's data never contains. ``prune_vocab`` keeps

* every token id that occurs in the training data (``input_ids`` of *all* the batches of
  the compression context's data loader, not only ``max_batches`` of them),
* the special tokens: the model config's ``*_token_id`` values (pad, bos, eos, sep, cls,
  mask, decoder start), ``unk_token_id`` and ``special_token_ids`` (pass the tokenizer's
  ``all_special_ids`` here),

and shrinks the embedding to those rows. ``keep_frequent`` (keep the N most frequent other
tokens) needs token frequencies from outside the training data, which the compression
context does not carry: it is accepted so recipes can state it, and ignored (with a warning
when it is not 0) until a frequency source exists.

The rule. The model remaps ids itself, so the original tokenizer keeps working unchanged:
the embedding becomes a :class:`PrunedEmbedding` whose ``id_map`` buffer sends each original
id to its new row, and **a token id that was not kept maps to the row of [UNK]**
(``unk_token_id``: by default the run's tokenizer's, else 100, the [UNK] of BERT
vocabularies; it is always kept, and recorded). So
the pruned model predicts on any input exactly what the original model predicts on the same
input with every dropped id replaced by ``unk_token_id``.

Size. The table loses ``(V - kept) * hidden`` floats (``* 4`` bytes in fp32); the map costs
``V`` int32s (``4 V`` bytes), so the saving is ``4 ((V - kept) hidden - V)`` bytes.
``config.vocab_size`` is unchanged: it is still the range of ids the model accepts.

Scope. Only the input word embedding changes; no ``nn.Linear`` is touched, so any method may
follow. A model whose output embedding shares the word-embedding weight (masked-LM and
tied seq2seq heads) is refused: its logits are indexed by the original ids. Apply
``prune_vocab`` before a method that quantizes embeddings (``quantize`` with
``quantize_embeddings=True``): it needs the plain ``nn.Embedding``. Such a method applied
after it quantizes the inner ``<embedding>.embedding``, which composes.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from distilkit.compress.base import CompressionContext, Method, register

logger = logging.getLogger(__name__)

_SPECIAL_ATTRS = ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id",
                  "cls_token_id", "mask_token_id", "decoder_start_token_id")


DEFAULT_UNK = 100  # [UNK] in BERT word-piece vocabularies


@dataclass
class PruneVocabConfig:
    keep_frequent: int = field(default=0, metadata={
        "help": "Number of the most frequent other tokens to keep as well; ignored for now "
                "(no frequency source beyond the training data, all of whose tokens are "
                "kept)."})
    unk_token_id: Optional[int] = field(default=None, metadata={
        "help": "Id of [UNK]: dropped ids map to its row. Default: the run's tokenizer's "
                "unk_token_id, else 100 (BERT vocabularies)."})
    special_token_ids: list = field(default_factory=list, metadata={
        "help": "Further ids to keep, e.g. the tokenizer's all_special_ids."})

    def __post_init__(self):
        if not isinstance(self.keep_frequent, int) or self.keep_frequent < 0:
            raise ValueError(f"prune_vocab: keep_frequent={self.keep_frequent!r} must be a "
                             f"non-negative integer")
        if self.unk_token_id is not None and (not isinstance(self.unk_token_id, int)
                                              or self.unk_token_id < 0):
            raise ValueError(f"prune_vocab: unk_token_id={self.unk_token_id!r} must be a "
                             f"non-negative token id; use the tokenizer's unk_token_id")
        bad = [i for i in self.special_token_ids if not isinstance(i, int) or i < 0]
        if bad:
            raise ValueError(f"prune_vocab: special_token_ids has {bad[:4]}, which are not "
                             f"token ids; give non-negative integers")


class PrunedEmbedding(nn.Module):
    """An ``nn.Embedding`` over the kept rows behind an id map: ``forward(ids)`` looks up
    ``embedding(id_map[ids])``. ``id_map`` (int32, one entry per original id) is saved with
    the weights."""

    def __init__(self, vocab_size: int, kept: int, dim: int, padding_idx: Optional[int] = None):
        super().__init__()
        self.embedding = nn.Embedding(kept, dim, padding_idx=padding_idx)
        self.register_buffer("id_map", torch.zeros(vocab_size, dtype=torch.int32))
        self.num_embeddings, self.embedding_dim = vocab_size, dim

    @property
    def weight(self) -> torch.Tensor:
        # transformers reads get_input_embeddings().weight (dtype, device, resizing checks).
        return self.embedding.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(self.id_map[input_ids])


def id_map_for(kept: list[int], vocab_size: int, unk_row: int) -> torch.Tensor:
    """Original id -> new row: the kept ids (sorted) get rows 0..k-1, every other id the row
    ``unk_row``."""
    out = torch.full((vocab_size,), unk_row, dtype=torch.int32)
    out[torch.tensor(kept, dtype=torch.long)] = torch.arange(len(kept), dtype=torch.int32)
    return out


def _data_ids(ctx: CompressionContext, vocab_size: int) -> set[int]:
    if ctx is None or ctx.dataloader is None:
        raise ValueError("prune_vocab keeps the tokens of the training data, which needs "
                         "data: pass CompressionContext(dataloader=...)")
    seen = torch.zeros(vocab_size, dtype=torch.bool)
    for batch in ctx.dataloader:  # all of them: a token missed here would become [UNK]
        ids = batch["input_ids"].reshape(-1).cpu().long()
        if len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ValueError(f"prune_vocab: the data has token ids outside 0..{vocab_size - 1} "
                             f"(the model's vocab_size); tokenize with the model's tokenizer")
        seen[ids] = True
    return set(torch.nonzero(seen).flatten().tolist())


def _check_embedding(model: nn.Module) -> nn.Embedding:
    emb = model.get_input_embeddings()
    if type(emb) is not nn.Embedding:
        raise ValueError(f"prune_vocab: the input embedding is a {type(emb).__name__}, not a "
                         f"plain nn.Embedding (an earlier method replaced it, e.g. quantize "
                         f"with quantize_embeddings=True); put prune_vocab before that method")
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None and getattr(out, "weight", None) is emb.weight:
        raise ValueError("prune_vocab: the output embedding shares the word-embedding weight "
                         "(tie_word_embeddings), so its logits are indexed by the original "
                         "ids; prune the vocabulary of a model with an untied or no LM head")
    return emb


@register
class PruneVocab(Method):
    name = "prune_vocab"
    needs = frozenset({"plain_embedding"})
    config_cls = PruneVocabConfig
    citation = ("Abdaoui, Pradel, Sigel. Load What You Need: Smaller Versions of Multilingual "
                "BERT. SustaiNLP 2020. arXiv:2010.05609")

    def apply(self, model: nn.Module, cfg: PruneVocabConfig, ctx: CompressionContext) -> dict:
        emb = _check_embedding(model)
        vocab = emb.num_embeddings
        tok = ctx.tokenizer if ctx is not None else None
        tok_unk = getattr(tok, "unk_token_id", None)
        unk = cfg.unk_token_id if cfg.unk_token_id is not None else (
            tok_unk if tok_unk is not None else DEFAULT_UNK)
        if unk >= vocab:
            raise ValueError(f"prune_vocab: unk_token_id={unk} is outside the "
                             f"vocabulary 0..{vocab - 1}; give the tokenizer's unk_token_id")
        if cfg.keep_frequent:
            logger.warning("prune_vocab: keep_frequent=%d ignored: no token frequencies beyond "
                           "the training data, whose tokens are all kept", cfg.keep_frequent)
        specials = {getattr(model.config, a, None) for a in _SPECIAL_ATTRS}
        if tok is not None:  # the run's tokenizer: all its special tokens, and its [UNK]
            specials |= set(getattr(tok, "all_special_ids", None) or [])
            if tok_unk is not None and tok_unk != unk:
                raise ValueError(f"prune_vocab: unk_token_id={unk} but the tokenizer's [UNK] "
                                 f"is {tok_unk}; set unk_token_id: {tok_unk} (or leave it unset)")
        specials = {i for i in specials if isinstance(i, int) and 0 <= i < vocab}
        bad = [i for i in cfg.special_token_ids if i >= vocab]
        if bad:
            raise ValueError(f"prune_vocab: special_token_ids {bad[:4]} are outside the "
                             f"vocabulary 0..{vocab - 1}")
        kept = sorted(_data_ids(ctx, vocab) | specials | {unk} | set(cfg.special_token_ids))
        record = {"kept_ids": kept, "vocab_size": vocab, "kept": len(kept), "unk_token_id": unk,
                  "bytes_saved_fp32": 4 * ((vocab - len(kept)) * emb.embedding_dim - vocab)}
        new = self._build(emb, record, unk)
        with torch.no_grad():
            new.embedding.weight.copy_(emb.weight[torch.tensor(kept, device=emb.weight.device)])
        model.set_input_embeddings(new)
        return record

    def restore(self, model: nn.Module, record: dict) -> None:
        emb = _check_embedding(model)
        model.set_input_embeddings(self._build(emb, record, record["unk_token_id"]))

    @staticmethod
    def _build(emb: nn.Embedding, record: dict, unk: int) -> PrunedEmbedding:
        kept, vocab = record["kept_ids"], record["vocab_size"]
        pad = emb.padding_idx
        rows = {k: i for i, k in enumerate(kept)}
        new = PrunedEmbedding(vocab, len(kept), emb.embedding_dim,
                              padding_idx=rows.get(pad) if pad is not None else None)
        new.id_map.copy_(id_map_for(kept, vocab, rows[unk]))
        return new.to(device=emb.weight.device, dtype=emb.weight.dtype)
