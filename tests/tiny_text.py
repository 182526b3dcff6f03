"""A tiny word-level tokenizer and a small labelled text dataset, built offline, for the tests
of the teacher cache, evaluation, reports and model cards (ids fit ``tiny_bert``'s vocab)."""
import random

POSITIVE = ["good", "great", "fine", "superb", "moving", "funny", "smart", "warm", "bright",
            "sharp", "fresh", "lovely"]
NEGATIVE = ["bad", "dull", "weak", "boring", "flat", "tired", "messy", "cold", "silly",
            "slow", "stale", "awful"]
NEUTRAL = ["the", "a", "film", "movie", "story", "cast", "plot", "is", "was", "and", "but",
           "very", "quite", "too", "its", "this", "script", "ending", "pace", "acting"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tiny_tokenizer():
    """A ``PreTrainedTokenizerFast`` (WordLevel, whitespace, ``[CLS] a [SEP]``) over ~50 words."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + POSITIVE + NEGATIVE + NEUTRAL)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   model_max_length=64)


def tiny_texts(n=40, seed=0):
    """``n`` short sentences of 3-10 words and their sentiment label (1 = positive)."""
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        label = rng.randint(0, 1)
        words = rng.choices(NEUTRAL, k=rng.randint(2, 8))
        words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if label else NEGATIVE))
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


def tiny_dataset(n=40, seed=0):
    """A ``datasets.Dataset`` with columns ``text`` and ``label``."""
    from datasets import Dataset

    texts, labels = tiny_texts(n, seed)
    return Dataset.from_dict({"text": texts, "label": labels})


def tokenized(ds, tok, max_length=32):
    """``ds`` tokenized without padding, with ``labels``."""
    def fn(b):
        enc = tok(b["text"], truncation=True, max_length=max_length)
        enc["labels"] = b["label"]
        return enc
    return ds.map(fn, batched=True, remove_columns=ds.column_names)


SENTIMENTS = ("negative", "neutral", "positive")


def tiny_labelled(n=60, seed=0, names=SENTIMENTS):
    """``n`` (sentence, label name) rows cycling through ``names``: a negative or positive
    word among neutral ones, or neutral words only for ``"neutral"``."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        name = names[i % len(names)]
        words = rng.choices(NEUTRAL, k=rng.randint(2, 8))
        if name in ("negative", "positive"):
            words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if name == "positive" else NEGATIVE))
        rows.append((" ".join(words), name))
    return rows


def write_csv(path, rows, header=("text", "label")):
    """``rows`` under ``header`` as a csv file (empty strings are empty cells); ``path`` as str."""
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)
