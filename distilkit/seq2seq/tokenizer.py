"""A small subword tokenizer for the seq2seq tasks, trained here on the built-in sentences.

No pretrained T5, BART or Marian tokenizer can be installed offline, so the seq2seq teachers
and students share a tokenizer trained with the ``tokenizers`` library on the training split of
the task: byte-pair encoding over a SentencePiece-style ``Metaspace`` pre-tokenizer (a word
boundary is the ``▁`` prefix of a piece, so decoding restores the exact spacing, which matters
for exact match and BLEU), ~3k pieces, cased. Source (lower-cased, unpunctuated) and target
(original) texts are both in the training text, so one vocabulary serves encoder and decoder,
as T5 and BART's shared embeddings need.

Special tokens have fixed ids so model configs can be written without looking them up:
``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, ``<s>`` 3. Every encoded sequence ends with ``</s>``.

Training is deterministic for a given text list and settings (single-threaded BPE merges are
ordered by count, then by pair), and the result is cached under
``$DISTILKIT_CACHE/seq2seq/tokenizer-<fingerprint>`` as a ``PreTrainedTokenizerFast``
directory, written to a temporary directory and renamed into place.
"""
from __future__ import annotations

import hashlib
import json
import os
import string
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

from distilkit.files import atomic_dir, atomic_write_json

PAD, EOS, UNK, BOS = "<pad>", "</s>", "<unk>", "<s>"
SPECIAL_TOKENS = (PAD, EOS, UNK, BOS)  # ids 0, 1, 2, 3 in this order
PAD_ID, EOS_ID, UNK_ID, BOS_ID = 0, 1, 2, 3


@dataclass
class TokenizerSettings:
    """How the seq2seq tokenizer is trained."""

    vocab_size: int = field(default=3000, metadata={"help": "Number of pieces, special tokens included (256-32000)."})
    min_frequency: int = field(default=2, metadata={"help": "A merge must occur at least this often."})
    version: int = field(default=1, metadata={"help": "Bump to invalidate cached tokenizers after a change here."})

    def __post_init__(self):
        if not isinstance(self.vocab_size, int) or not 256 <= self.vocab_size <= 32000:
            raise ValueError(f"vocab_size: {self.vocab_size!r} must be an integer in 256..32000 "
                             "(a few thousand pieces suit ~10k sentences; try 3000)")
        if not isinstance(self.min_frequency, int) or self.min_frequency < 1:
            raise ValueError(f"min_frequency: {self.min_frequency!r} must be an integer >= 1 (try 2)")


def texts_fingerprint(texts: Sequence[str]) -> str:
    """A short hash of a list of texts (order matters)."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()[:16]


def build_tokenizer(texts: Sequence[str], settings: Optional[TokenizerSettings] = None):
    """Train a BPE tokenizer on ``texts`` and wrap it as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    s = settings or TokenizerSettings()
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("build_tokenizer: no texts to train on")
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    # Printable ASCII is always in the alphabet, so rare characters in unseen text still map to
    # pieces instead of <unk> whenever they are ASCII.
    alphabet = sorted(set(string.printable) - set(string.whitespace) | {"▁"})
    trainer = trainers.BpeTrainer(vocab_size=s.vocab_size, min_frequency=s.min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS), initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    for i, t in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(t) != i:
            raise RuntimeError(f"special token {t} got id {tok.token_to_id(t)}, expected {i}")
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, EOS_ID)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS,
                                   unk_token=UNK, bos_token=BOS, padding_side="right",
                                   model_max_length=512)


def cached_tokenizer(texts: Sequence[str], settings: Optional[TokenizerSettings] = None,
                     name: str = "truecase", cache_dir: Optional[str] = None):
    """The tokenizer trained on ``texts`` with ``settings``, from the cache when it was
    trained before (keyed by a fingerprint of both), else trained and cached now.

    Returns ``(tokenizer, path)``.
    """
    from transformers import PreTrainedTokenizerFast

    from distilkit.data import cache_root

    s = settings or TokenizerSettings()
    key = hashlib.sha256(json.dumps({"texts": texts_fingerprint(texts), "settings": asdict(s)},
                                    sort_keys=True).encode()).hexdigest()[:12]
    root = cache_dir or os.path.join(cache_root(), "seq2seq")
    out = os.path.join(root, f"tokenizer-{name}-{key}")
    marker = os.path.join(out, "distilkit_tokenizer.json")
    if not os.path.isfile(marker):
        tok = build_tokenizer(texts, s)

        def fill(d: str) -> None:
            tok.save_pretrained(d)
            atomic_write_json(os.path.join(d, "distilkit_tokenizer.json"),
                              {"settings": asdict(s), "texts": texts_fingerprint(texts),
                               "num_texts": len(texts)})

        if not os.path.isfile(marker):  # a concurrent run that finished first is kept
            atomic_dir(out, fill)
    return PreTrainedTokenizerFast.from_pretrained(out), out


def special_token_ids(tokenizer) -> dict:
    """Ids to put in a seq2seq model config for this tokenizer."""
    return {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "vocab_size": len(tokenizer)}
