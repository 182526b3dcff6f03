"""Offline, tiny models built from configs, shared by every test file."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# GPU kernels are checked on CPU tensors by Triton's interpreter, which must be chosen before
# anything (peft, bitsandbytes, torch) first imports triton.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


def tiny_bert_config(num_labels=2, layers=4, hidden=32, heads=4, inter=64, vocab=120, **kw):
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, intermediate_size=inter,
                      max_position_embeddings=64, num_labels=num_labels, **kw)


def tiny_bert(seed=0, **kw):
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_bert_config(**kw)).eval()


def tiny_t5(seed=0, vocab=120):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                   num_decoder_layers=2, num_heads=4, decoder_start_token_id=0,
                   pad_token_id=0, eos_token_id=1)
    return T5ForConditionalGeneration(cfg).eval()


def tiny_bart(seed=0, vocab=120):
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(seed)
    cfg = BartConfig(vocab_size=vocab, d_model=32, encoder_layers=2, decoder_layers=2,
                     encoder_attention_heads=4, decoder_attention_heads=4,
                     encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                     pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
    return BartForConditionalGeneration(cfg).eval()


def tiny_marian(seed=0, vocab=120):
    from transformers import MarianConfig, MarianMTModel

    torch.manual_seed(seed)
    cfg = MarianConfig(vocab_size=vocab, d_model=32, encoder_layers=2, decoder_layers=2,
                       encoder_attention_heads=4, decoder_attention_heads=4,
                       encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                       pad_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    return MarianMTModel(cfg).eval()


def tiny_batch(vocab=120, batch=4, seq=10, seed=0, num_labels=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, seq - 3:] = 0  # one padded row, so masks are exercised
    labels = torch.randint(0, num_labels, (batch,), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.fixture
def bert():
    return tiny_bert()


@pytest.fixture
def batch():
    return tiny_batch()


WORDS = ("the a film movie is was great good bad awful boring fun and but not very plot acting "
         "story funny dull brilliant mess charming slow").split()


def tiny_tokenizer(path):
    """A BERT word-piece tokenizer over a small vocabulary, written to ``path``."""
    from transformers import BertTokenizerFast

    os.makedirs(path, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    tok.save_pretrained(path)
    return tok


def tiny_sentences(n=96, seed=0):
    """Sentences whose label is learnable: positive words vs negative words."""
    import random

    rng = random.Random(seed)
    pos, neg = ["great", "good", "fun", "brilliant", "charming", "funny"], ["bad", "awful", "boring", "dull", "mess", "slow"]
    filler = ["the", "film", "movie", "is", "was", "plot", "acting", "story", "very", "and"]
    rows = []
    for i in range(n):
        label = i % 2
        words = rng.sample(filler, 4) + rng.sample(pos if label else neg, 2)
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


@pytest.fixture
def tiny_task(tmp_path):
    """A tiny teacher directory (model + tokenizer) and csv splits, all offline."""
    import csv

    tok = tiny_tokenizer(str(tmp_path / "teacher"))
    teacher = tiny_bert(vocab=tok.vocab_size, layers=4)
    teacher.save_pretrained(str(tmp_path / "teacher"))
    files = {}
    for split, n, seed in (("train", 96, 0), ("validation", 32, 1), ("test", 32, 2)):
        p = tmp_path / f"{split}.csv"
        with open(p, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            w.writerows(tiny_sentences(n, seed))
        files[split] = str(p)
    return {"teacher": str(tmp_path / "teacher"), "data_files": files, "tmp": tmp_path}


class ForbiddenTeacher(torch.nn.Module):
    """A 'teacher' that fails the test if it is ever run (``why``: what should have made
    running it unnecessary)."""

    def __init__(self, config, why="no loss term needs it"):
        super().__init__()
        self.config, self.why = config, why
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, **kw):
        raise AssertionError(f"the teacher was run although {self.why}")


def load_script(name: str):
    """``scripts/<name>.py`` imported as a module (the benchmark scripts are no package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
