"""Vocabulary pruning: keep only the word-embedding rows of the tokens the model will see.

On MiniLM-sized students most parameters are the word embedding table (30,522 x 384), and
most of its rows belong to tokens a task's data never contains. ``prune_vocab`` keeps

* every token id that occurs in the training data (``input_ids`` of *all* the batches of
  the compression context's data loader, not only ``max_batches`` of them); with
  ``max_tokens: N``, only the N most frequent of them (ties broken by id; a token of the data
  beyond them becomes [UNK]: the budget search sets it to trade rare words' rows for heads
  and neurons),
* the special tokens: the model config's ``*_token_id`` values (pad, bos, eos, sep, cls,
  mask, decoder start), ``unk_token_id`` and ``special_token_ids`` (pass the tokenizer's
  ``all_special_ids`` here),

* with ``keep_frequent: N``, the N most frequent other tokens of ``frequency_file`` (your
  domain's text, one text a line, tokenized with the run's tokenizer): words the training data
  lacks but serving traffic will hold,

and shrinks the embedding to those rows.

During the run the model remaps ids itself, so the run's tokenizer, its cached teacher
outputs and its data keep working unchanged: the embedding becomes a
:class:`PrunedEmbedding` whose ``id_map`` buffer sends each original id to its new row, and
**a token id that was not kept maps to the row of [UNK]** (``unk_token_id``: by default the
run's tokenizer's, else 100, the [UNK] of BERT vocabularies; it is always kept, and recorded).

When the student is saved (``finalize_(model, tokenizer)``, which the pipeline calls), with
``tokenizer: shrink`` (the default) and a fast word-piece tokenizer, **model and tokenizer
shrink together**: the embedding becomes a plain ``nn.Embedding`` of the kept rows
(``config.vocab_size`` = the kept count, the config's special ids renumbered) and the saved
tokenizer's vocabulary is the kept pieces, piece ``i`` being row ``i``
(:func:`shrink_tokenizer`). The saved model is then an ordinary transformers model that
``from_pretrained`` loads, and its tokenizer is as small as its table. The rule of the shrunk
tokenizer: it runs the original word-piece algorithm (greedy longest match first) over the kept
pieces only, so

* a word whose original pieces are all kept is encoded into exactly those pieces (each piece
  the original chose is still there, and no longer match exists in a subset of its
  vocabulary), hence the model computes on it exactly what it computed in the run;
* a word with a dropped piece is spelled with the longest kept pieces instead, and becomes
  [UNK] only where the kept pieces cannot spell it (word-piece's own rule for a word it cannot
  cover). The run's id map sent only the dropped piece to [UNK]; the shrunk tokenizer keeps
  more of such a word.

``tokenizer: keep`` (or a tokenizer that is not a fast word-piece one, or an embedding that a
later method replaced, e.g. quantized) saves the id-map form with the original tokenizer.

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

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from distilkit.compress.base import CompressionContext, Method, register

logger = logging.getLogger(__name__)

_SPECIAL_ATTRS = ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id",
                  "cls_token_id", "mask_token_id", "decoder_start_token_id")


DEFAULT_UNK = 100  # [UNK] in BERT word-piece vocabularies
TOKENIZER_MODES = ("shrink", "keep")


@dataclass
class PruneVocabConfig:
    keep_frequent: int = field(default=0, metadata={
        "help": "Also keep this many of the most frequent other tokens of frequency_file."})
    frequency_file: Optional[str] = field(default=None, metadata={
        "help": "Text file (one text a line) whose token counts choose the keep_frequent "
                "tokens; tokenized with the run's tokenizer."})
    tokenizer: str = field(default="shrink", metadata={
        "help": "shrink: save a tokenizer of the kept pieces with a plain embedding of the kept "
                "rows; keep: save the original tokenizer and the id-map embedding."})
    unk_token_id: Optional[int] = field(default=None, metadata={
        "help": "Id of [UNK]: dropped ids map to its row. Default: the run's tokenizer's "
                "unk_token_id, else 100 (BERT vocabularies)."})
    special_token_ids: list = field(default_factory=list, metadata={
        "help": "Further ids to keep, e.g. the tokenizer's all_special_ids."})
    max_tokens: Optional[int] = field(default=None, metadata={
        "help": "Keep at most this many of the training data's tokens (besides the special "
                "ones), the most frequent first; the rest become [UNK]. Default: all."})

    def __post_init__(self):
        if not isinstance(self.keep_frequent, int) or self.keep_frequent < 0:
            raise ValueError(f"prune_vocab: keep_frequent={self.keep_frequent!r} must be a "
                             f"non-negative integer")
        if self.unk_token_id is not None and (not isinstance(self.unk_token_id, int)
                                              or self.unk_token_id < 0):
            raise ValueError(f"prune_vocab: unk_token_id={self.unk_token_id!r} must be a "
                             f"non-negative token id; use the tokenizer's unk_token_id")
        if self.tokenizer not in TOKENIZER_MODES:
            raise ValueError(f"prune_vocab: tokenizer={self.tokenizer!r} is invalid: use one of "
                             f"{TOKENIZER_MODES}")
        if self.keep_frequent and not self.frequency_file:
            raise ValueError(f"prune_vocab: keep_frequent={self.keep_frequent} needs "
                             f"frequency_file: a text file of your domain's text, one a line, "
                             f"whose {self.keep_frequent} most frequent other tokens are kept")
        if self.frequency_file is not None and not os.path.isfile(self.frequency_file):
            raise ValueError(f"prune_vocab: frequency_file={self.frequency_file!r} is not a "
                             f"file; give a text file, one text a line")
        if self.max_tokens is not None and (isinstance(self.max_tokens, bool) or not isinstance(
                self.max_tokens, int) or self.max_tokens < 0):
            raise ValueError(f"prune_vocab: max_tokens={self.max_tokens!r} must be a "
                             f"non-negative integer (the data tokens kept), or left out")
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


def data_token_counts(ctx: CompressionContext, vocab_size: int) -> torch.Tensor:
    """How often each id occurs in the training data: ``input_ids`` of every batch of
    ``ctx``'s data loader (all of them: a token missed here would become [UNK])."""
    if ctx is None or ctx.dataloader is None:
        raise ValueError("prune_vocab keeps the tokens of the training data, which needs "
                         "data: pass CompressionContext(dataloader=...)")
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for batch in ctx.dataloader:
        ids = batch["input_ids"].reshape(-1).cpu().long()
        if len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ValueError(f"prune_vocab: the data has token ids outside 0..{vocab_size - 1} "
                             f"(the model's vocab_size); tokenize with the model's tokenizer")
        counts += torch.bincount(ids, minlength=vocab_size)
    return counts


def ranked_data_ids(counts: torch.Tensor, always: set) -> list[int]:
    """The ids the data holds and ``always`` (the ids kept whatever the count) lacks, most
    frequent first, ties by id: ``max_tokens: N`` keeps the first N, and the budget search
    drops rows from the end."""
    seen = torch.nonzero(counts).flatten().tolist()
    return sorted((i for i in seen if i not in always), key=lambda i: (-int(counts[i]), i))


def _frequent_ids(cfg: PruneVocabConfig, tokenizer: Any, vocab_size: int, kept: set[int]
                  ) -> list[int]:
    """The ``keep_frequent`` most frequent ids of ``frequency_file`` not already ``kept``
    (ties broken by id, so the choice is reproducible)."""
    if not cfg.keep_frequent:
        return []
    if tokenizer is None:
        raise ValueError("prune_vocab: keep_frequent needs the run's tokenizer to count the "
                         "tokens of frequency_file: pass CompressionContext(tokenizer=...)")
    with open(cfg.frequency_file, encoding="utf-8") as f:
        texts = [line.strip() for line in f if line.strip()]
    counts: Counter = Counter()
    for i in range(0, len(texts), 256):
        for ids in tokenizer(texts[i:i + 256], add_special_tokens=False)["input_ids"]:
            counts.update(j for j in ids if 0 <= j < vocab_size and j not in kept)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [j for j, _ in ranked[: cfg.keep_frequent]]


def shrink_tokenizer(tokenizer: Any, kept: list[int]) -> Any:
    """A copy of the fast word-piece ``tokenizer`` whose vocabulary is the pieces of ``kept``
    (original ids, in row order: piece ``kept[i]`` becomes id ``i``), with its special tokens
    and post-processor renumbered (rule: module docstring). ValueError for a tokenizer this
    cannot shrink (slow, or not word-piece)."""
    import copy

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"{type(tokenizer).__name__} is not a fast (tokenizers) tokenizer")
    spec = json.loads(backend.to_str())
    model = spec["model"]
    if model.get("type") != "WordPiece":
        raise ValueError(f"its model is {model.get('type')}, not WordPiece")
    pieces = {i: t for t, i in model["vocab"].items()}
    missing = [i for i in kept if i not in pieces]
    if missing:
        raise ValueError(f"ids {missing[:4]} are not in its vocabulary")
    row = {old: new for new, old in enumerate(kept)}
    if model["vocab"].get(model.get("unk_token")) not in row:
        raise ValueError(f"its unknown token {model.get('unk_token')!r} is not kept")
    model["vocab"] = {pieces[old]: new for new, old in enumerate(kept)}
    # Added tokens that were not kept would still be matched before word-piece runs, with
    # an id the table no longer has: drop them (a kept one keeps its new id).
    spec["added_tokens"] = [{**a, "id": row[a["id"]]} for a in spec.get("added_tokens", [])
                            if a["id"] in row]
    _renumber(spec.get("post_processor"), row)
    from tokenizers import Tokenizer

    out = copy.deepcopy(tokenizer)
    out._tokenizer = Tokenizer.from_str(json.dumps(spec))
    return out


def _renumber(node: Any, row: dict) -> None:
    """Renumber the special-token ids a post-processor spec holds (TemplateProcessing's
    ``special_tokens[*].ids``, BertProcessing's ``[token, id]`` pairs), recursively."""
    if isinstance(node, list):
        for x in node:
            _renumber(x, row)
    elif isinstance(node, dict):
        for key, value in node.items():
            if key == "ids" and isinstance(value, list):
                node[key] = [row[i] for i in value]
            elif key in ("sep", "cls") and isinstance(value, list) and len(value) == 2:
                node[key] = [value[0], row[value[1]]]
            else:
                _renumber(value, row)


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


def _kept_parts(model: nn.Module, cfg: PruneVocabConfig, ctx: CompressionContext
                ) -> tuple[list[int], list[int], list[int], int]:
    """``(kept ids sorted, the data tokens among them most frequent first, the keep_frequent
    ids, the [UNK] id)``: what :func:`kept_ids` and :func:`droppable_ids` report."""
    emb = _check_embedding(model)
    vocab = emb.num_embeddings
    tok = ctx.tokenizer if ctx is not None else None
    tok_unk = getattr(tok, "unk_token_id", None)
    unk = cfg.unk_token_id if cfg.unk_token_id is not None else (
        tok_unk if tok_unk is not None else DEFAULT_UNK)
    if unk >= vocab:
        raise ValueError(f"prune_vocab: unk_token_id={unk} is outside the "
                         f"vocabulary 0..{vocab - 1}; give the tokenizer's unk_token_id")
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
    always = specials | {unk} | set(cfg.special_token_ids)
    data = ranked_data_ids(data_token_counts(ctx, vocab), always)
    # keep_frequent adds words the training data lacks (whatever max_tokens keeps of it), so
    # the rows kept at max_tokens N are always the same N data tokens and the same others
    frequent = _frequent_ids(cfg, tok, vocab, always | set(data))
    if cfg.max_tokens is not None:
        data = data[: cfg.max_tokens]
    return sorted(always | set(frequent) | set(data)), data, frequent, unk


def kept_ids(model: nn.Module, cfg: PruneVocabConfig, ctx: CompressionContext
             ) -> tuple[list[int], int, list[int]]:
    """``(kept ids sorted, the [UNK] id, the keep_frequent ids among them)``: the rows
    ``prune_vocab`` keeps of ``model``'s word table on ``ctx``'s data (module docstring), so a
    budget search can count a later ``prune_vocab`` before it runs."""
    kept, _, frequent, unk = _kept_parts(model, cfg, ctx)
    return kept, unk, frequent


def droppable_ids(model: nn.Module, cfg: PruneVocabConfig, ctx: CompressionContext
                  ) -> tuple[list[int], list[int], int]:
    """``(kept ids sorted, the data tokens among them most frequent first, the [UNK] id)``:
    with ``max_tokens: N`` prune_vocab keeps the first N of that list and every other kept id
    whatever N is. The budget search drops rows from the list's end."""
    kept, data, _, unk = _kept_parts(model, cfg, ctx)
    return kept, data, unk


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
        kept, unk, frequent = kept_ids(model, cfg, ctx)
        record = {"kept_ids": kept, "vocab_size": vocab, "kept": len(kept), "unk_token_id": unk,
                  "frequent_kept": len(frequent),
                  "bytes_saved_fp32": 4 * ((vocab - len(kept)) * emb.embedding_dim - vocab)}
        new = self._build(emb, record, unk)
        with torch.no_grad():
            new.embedding.weight.copy_(emb.weight[torch.tensor(kept, device=emb.weight.device)])
        model.set_input_embeddings(new)
        return record

    def restore(self, model: nn.Module, record: dict) -> None:
        emb = _check_embedding(model)
        if record.get("shrunk"):
            _to_plain(model, emb, record)
        else:
            model.set_input_embeddings(self._build(emb, record, record["unk_token_id"]))

    def finalize_tokenizer(self, model: nn.Module, cfg: PruneVocabConfig, record: dict,
                           tokenizer: Any) -> tuple[Any, dict]:
        if cfg.tokenizer == "keep" or record.get("shrunk"):
            return tokenizer, record
        emb = model.get_input_embeddings()
        why = None
        if not isinstance(emb, PrunedEmbedding) or type(emb.embedding) is not nn.Embedding:
            why = "a later method replaced the kept table (e.g. quantized it)"
        else:
            try:
                small = shrink_tokenizer(tokenizer, record["kept_ids"])
            except ValueError as e:
                why = f"the tokenizer cannot be shrunk: {e}"
        if why:
            logger.warning("prune_vocab: saving the id-map form with the original tokenizer (%s)",
                           why)
            return tokenizer, {**record, "shrunk": False, "why_not_shrunk": why}
        original = {a: getattr(model.config, a, None) for a in _SPECIAL_ATTRS}
        record = {**record, "shrunk": True,
                  "config_ids": {a: v for a, v in original.items() if isinstance(v, int)}}
        _to_plain(model, emb.embedding, record)
        return small, record

    def undo_config(self, config: Any, record: dict) -> None:
        if record.get("shrunk"):
            config.vocab_size = record["vocab_size"]
            for a, v in record["config_ids"].items():
                setattr(config, a, v)

    @staticmethod
    def _build(emb: nn.Embedding, record: dict, unk: int) -> PrunedEmbedding:
        kept, vocab = record["kept_ids"], record["vocab_size"]
        pad = emb.padding_idx
        rows = {k: i for i, k in enumerate(kept)}
        new = PrunedEmbedding(vocab, len(kept), emb.embedding_dim,
                              padding_idx=rows.get(pad) if pad is not None else None)
        new.id_map.copy_(id_map_for(kept, vocab, rows[unk]))
        return new.to(device=emb.weight.device, dtype=emb.weight.dtype)


def _to_plain(model: nn.Module, table: nn.Embedding, record: dict) -> None:
    """Make ``model`` read the shrunk ids: a plain ``nn.Embedding`` whose rows are ``table``'s
    (the kept rows; the same Parameter when ``table`` has them, a fresh one to load into when
    rebuilding), ``config.vocab_size`` the kept count and the config's special ids renumbered
    (an id that was not kept cannot occur in the shrunk tokenizer's output: it is left)."""
    kept = record["kept_ids"]
    row = {old: new for new, old in enumerate(kept)}
    pad = model.config.pad_token_id if isinstance(model.config.pad_token_id, int) else None
    plain = nn.Embedding(len(kept), table.embedding_dim, padding_idx=row.get(pad))
    if table.num_embeddings == len(kept):
        plain.weight = table.weight
    model.set_input_embeddings(plain.to(device=table.weight.device, dtype=table.weight.dtype))
    model.config.vocab_size = len(kept)
    for a, v in record["config_ids"].items():
        if v in row:
            setattr(model.config, a, row[v])
