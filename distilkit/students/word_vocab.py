"""A word-level tokenizer built from the training text, for the BiLSTM student.

Tang et al. (2019) feed their BiLSTM whole words (word2vec vocabulary), not the teacher's
word pieces. :func:`build_word_tokenizer` counts the words of the training sentences and
returns a transformers ``PreTrainedTokenizerFast`` around a ``tokenizers`` ``WordLevel``
model, so it is saved next to the student with ``save_pretrained`` and comes back with
``AutoTokenizer.from_pretrained(dir)``, like any other Hugging Face tokenizer.

What the tokenizer does, and why:

* Normalisation is NFKC plus lower-casing; words are split on white space and punctuation
  (BERT's pre-tokenizer), so ``"movie,"`` and ``"movie"`` are one word.
* Ids 0, 1, 2 are ``[PAD]``, ``[UNK]`` and ``[MASK]``. ``[MASK]`` is a special token so
  that the masking rule of :mod:`distilkit.augment` produces a token both this tokenizer and
  a BERT teacher's tokenizer keep whole.
* A sentence pair is encoded as ``$A $B`` with ``token_type_ids`` 0 for the first sentence
  and 1 for the second (no separator tokens): that is how
  :class:`~distilkit.students.bilstm.BiLSTMForSequenceClassification` splits a pair batch
  that came through the same ``tokenizer(text, text_pair)`` call every other student uses.

The vocabulary keeps words seen at least ``min_frequency`` times, most frequent first, up to
``max_size`` words (special tokens not counted). A vocabulary with no word at all (empty
text, or nothing frequent enough) is an error, not a model that maps everything to
``[UNK]``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

PAD, UNK, MASK = "[PAD]", "[UNK]", "[MASK]"
SPECIAL_TOKENS = (PAD, UNK, MASK)
MODEL_INPUT_NAMES = ["input_ids", "token_type_ids", "attention_mask"]


@dataclass
class WordVocabConfig:
    """How the word vocabulary is built from the training text."""

    min_frequency: int = field(default=1, metadata={
        "help": "keep words seen at least this many times in the training text"})
    max_size: Optional[int] = field(default=None, metadata={
        "help": "keep at most this many words (most frequent first); None keeps all"})
    lowercase: bool = field(default=True, metadata={"help": "lower-case before lookup"})

    def __post_init__(self):
        if not isinstance(self.min_frequency, int) or self.min_frequency < 1:
            raise ValueError(f"min_frequency={self.min_frequency!r}: use an integer >= 1 "
                             "(1 keeps every word of the training text)")
        if self.max_size is not None and (not isinstance(self.max_size, int) or self.max_size < 1):
            raise ValueError(f"max_size={self.max_size!r}: use a positive integer, or None "
                             "to keep every word")


def _normalizer(lowercase: bool):
    from tokenizers import normalizers

    parts = [normalizers.NFKC()]
    if lowercase:
        parts.append(normalizers.Lowercase())
    return normalizers.Sequence(parts)


def split_words(text: str, lowercase: bool = True) -> list[str]:
    """The words the word-level tokenizer sees in ``text`` (same normalisation and split)."""
    from tokenizers import pre_tokenizers

    norm = _normalizer(lowercase).normalize_str(text)
    return [w for w, _ in pre_tokenizers.BertPreTokenizer().pre_tokenize_str(norm)]


def build_word_tokenizer(texts: Iterable[str], config: Optional[WordVocabConfig] = None,
                         **kwargs):
    """A ``PreTrainedTokenizerFast`` whose vocabulary is the words of ``texts``.

    ``texts`` is any iterable of sentences (for a pair task pass both columns). Keyword
    arguments are :class:`WordVocabConfig` fields. Raises ``ValueError`` when no word
    qualifies.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if config is None:
        config = WordVocabConfig(**kwargs)
    elif kwargs:
        raise TypeError("pass either a WordVocabConfig or its fields as keywords, not both")
    if isinstance(texts, str):
        raise TypeError("texts: pass a list of sentences, not one string")
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError("word vocabulary: the training text has no words (got no non-empty "
                         "sentence); pass the training sentences, or reuse the teacher's "
                         "tokenizer instead (student.tokenizer: teacher)")

    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.normalizer = _normalizer(config.lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    # The trainer's vocab_size counts the special tokens too; a huge number means "all".
    size = (config.max_size + len(SPECIAL_TOKENS)) if config.max_size else 2 ** 31 - 1
    trainer = trainers.WordLevelTrainer(vocab_size=size, min_frequency=config.min_frequency,
                                        special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    n_words = tok.get_vocab_size() - len(SPECIAL_TOKENS)
    if n_words <= 0:
        raise ValueError(
            f"word vocabulary: zero words from {len(texts)} sentence(s) with "
            f"min_frequency={config.min_frequency}; lower min_frequency or pass more text")
    tok.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1",
                                                       special_tokens=[])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, unk_token=UNK,
                                   mask_token=MASK, model_input_names=list(MODEL_INPUT_NAMES))


def vocabulary_words(tokenizer) -> list[str]:
    """The tokenizer's vocabulary as a list indexed by id."""
    vocab = tokenizer.get_vocab()
    words = [""] * (max(vocab.values()) + 1)
    for w, i in vocab.items():
        words[i] = w
    return words


def is_word_tokenizer(tokenizer) -> bool:
    """Whether ``tokenizer`` is a word-level tokenizer (built here or elsewhere)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and type(backend.model).__name__ == "WordLevel"
