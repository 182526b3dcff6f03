"""The BiLSTM student of Tang et al. (2019), "Distilling Task-Specific Knowledge from BERT
into Simple Neural Networks", as a transformers model.

Architecture: word embeddings -> bidirectional LSTM (``num_layers``, ``hidden_size`` per
direction) -> max-pool over time of the non-padding positions -> ReLU MLP -> logits.

Sentence pairs (``sentence_pair=True``) go through one shared encoder, and the classifier
sees ``[h1, h2, h1 * h2, |h1 - h2|]`` (8 x ``hidden_size`` features). A pair batch can come
in two ways, and both give the same result:

* ``input_ids`` / ``attention_mask`` for the first sentence and ``input_ids_b`` /
  ``attention_mask_b`` for the second; or
* one concatenated sequence from ``tokenizer(text, text_pair)`` with ``token_type_ids``
  (0 = first sentence, 1 = second). This is what every other student gets from the same
  data pipeline; the word-level tokenizer of :mod:`distilkit.students.word_vocab` encodes
  pairs that way, and so does a BERT teacher's tokenizer (then [CLS] and the first [SEP]
  stay with the first sentence, the last [SEP] with the second).

For single sentences ``token_type_ids`` is accepted and ignored. Padding may be on either
side: the non-padding tokens are moved to the front and the LSTM runs on packed sequences,
so the backward direction starts at the last real word, never at padding.

Building one: :func:`build_bilstm_student` makes the tokenizer (a word vocabulary from the
training text, or the teacher's own tokenizer) and the model, with the embedding matrix
initialised from the teacher's input embeddings (:func:`teacher_embedding_init`: a word's
vector is the mean of its word pieces' rows, PCA-projected when the widths differ) or at
random.

Importing this module registers ``distilkit-bilstm`` with ``AutoConfig`` and
``AutoModelForSequenceClassification``; ``distilkit.modeling.ensure_registered()`` imports
it, so ``load_compressed`` and ``from_pretrained`` on a saved directory just work.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence, Union

import torch
from torch import nn
from transformers import (AutoConfig, AutoModelForSequenceClassification, PretrainedConfig,
                          PreTrainedModel)
from transformers.modeling_outputs import SequenceClassifierOutput

MODEL_TYPE = "distilkit-bilstm"
CITATION = ("Tang, Lu, Liu, Mou, Vechtomova, Lin (2019). Distilling Task-Specific Knowledge "
            "from BERT into Simple Neural Networks. arXiv:1903.12136")


class BiLSTMConfig(PretrainedConfig):
    """Configuration of :class:`BiLSTMForSequenceClassification`.

    Args:
        vocab_size: number of token ids (the tokenizer's ``len``).
        embedding_dim: width of the word embeddings (300 in Tang et al.).
        hidden_size: LSTM hidden size per direction (150 in Tang et al. for SST-2).
        num_layers: stacked BiLSTM layers.
        mlp_hidden_size: width of the ReLU layer between the pooled features and the logits.
        dropout: dropout on the embeddings, between LSTM layers and before each MLP layer.
        sentence_pair: encode two sentences with a shared encoder (classifier input
            ``[h1, h2, h1*h2, |h1-h2|]``).
        embedding_init_std: std of the random embedding init (when not from a teacher).
        freeze_embeddings: keep the embedding matrix fixed during training.
    """

    model_type = MODEL_TYPE

    def __init__(self, vocab_size: int = 30522, embedding_dim: int = 300, hidden_size: int = 150,
                 num_layers: int = 1, mlp_hidden_size: int = 200, dropout: float = 0.1,
                 sentence_pair: bool = False, embedding_init_std: float = 0.1,
                 freeze_embeddings: bool = False, pad_token_id: int = 0, **kwargs):
        for name, value in (("vocab_size", vocab_size), ("embedding_dim", embedding_dim),
                            ("hidden_size", hidden_size), ("num_layers", num_layers),
                            ("mlp_hidden_size", mlp_hidden_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"BiLSTMConfig.{name}={value!r}: use a positive integer")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"BiLSTMConfig.dropout={dropout!r}: use a value in [0, 1)")
        if pad_token_id is None or not 0 <= pad_token_id < vocab_size:
            raise ValueError(f"BiLSTMConfig.pad_token_id={pad_token_id!r}: must be an id in "
                             f"[0, vocab_size={vocab_size}) (the tokenizer's pad_token_id)")
        self.vocab_size = vocab_size
        self.embedding_dim = embedding_dim
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.mlp_hidden_size = mlp_hidden_size
        self.dropout = float(dropout)
        self.sentence_pair = bool(sentence_pair)
        self.embedding_init_std = float(embedding_init_std)
        self.freeze_embeddings = bool(freeze_embeddings)
        super().__init__(pad_token_id=pad_token_id, **kwargs)

    @property
    def feature_size(self) -> int:
        """Width of the classifier's input: 2H per sentence, 8H for a pair."""
        return 2 * self.hidden_size * (4 if self.sentence_pair else 1)


# ---------------------------------------------------------------------------------------
# Pure tensor helpers
# ---------------------------------------------------------------------------------------

def compact_left(ids: torch.Tensor, keep: torch.Tensor, pad_id: int):
    """Move the positions where ``keep`` is true to the front of each row, in order.

    Returns ``(ids, mask, lengths)`` with the kept tokens left-aligned, ``pad_id`` after
    them, a 0/1 mask and the per-row counts. Used to drop left padding and to cut one
    segment out of a concatenated sentence pair.
    """
    keep = keep.bool()
    lengths = keep.sum(dim=1)
    # A stable sort on "not kept" puts kept positions first and keeps their order.
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
    moved = torch.gather(ids, 1, order)
    width = max(int(lengths.max().item()) if lengths.numel() else 0, 1)
    moved = moved[:, :width]
    mask = torch.arange(width, device=ids.device).unsqueeze(0) < lengths.unsqueeze(1)
    moved = moved.masked_fill(~mask, pad_id)
    return moved, mask.long(), lengths


def masked_max_pool(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Max over time of ``states`` (B, T, F) at positions where ``mask`` (B, T) is 1.

    Padding never wins the max (it is filled with the dtype's lowest value first); a row
    with no token at all pools to zeros instead of -inf.
    """
    m = mask.bool().unsqueeze(-1)
    filled = states.masked_fill(~m, torch.finfo(states.dtype).min)
    pooled = filled.max(dim=1).values
    empty = ~m.any(dim=1)
    return pooled.masked_fill(empty, 0.0)


def pair_features(h1: torch.Tensor, h2: torch.Tensor) -> torch.Tensor:
    """``[h1, h2, h1 * h2, |h1 - h2|]`` (Tang et al., after Mou et al. 2016)."""
    return torch.cat([h1, h2, h1 * h2, (h1 - h2).abs()], dim=-1)


# ---------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------

class BiLSTMForSequenceClassification(PreTrainedModel):
    """Embeddings -> BiLSTM -> masked max-pool -> ReLU MLP -> logits (see module docstring).

    ``forward`` returns a ``SequenceClassifierOutput`` (loss when ``labels`` are given:
    cross-entropy, or MSE when ``num_labels == 1``)."""

    config_class = BiLSTMConfig
    base_model_prefix = "bilstm"
    main_input_name = "input_ids"
    citation = CITATION

    def __init__(self, config: BiLSTMConfig):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.embedding_dim,
                                       padding_idx=config.pad_token_id)
        self.embeddings.weight.requires_grad_(not config.freeze_embeddings)
        self.lstm = nn.LSTM(config.embedding_dim, config.hidden_size,
                            num_layers=config.num_layers, bidirectional=True, batch_first=True,
                            dropout=config.dropout if config.num_layers > 1 else 0.0)
        self.dropout = nn.Dropout(config.dropout)
        self.mlp = nn.Linear(config.feature_size, config.mlp_hidden_size)
        self.classifier = nn.Linear(config.mlp_hidden_size, config.num_labels)
        self.post_init()

    def _init_weights(self, module):
        from transformers import initialization as init

        if isinstance(module, nn.Embedding):
            # Word vectors need a larger scale than BERT's 0.02 to train from scratch.
            init.normal_(module.weight, mean=0.0, std=self.config.embedding_init_std)
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, nn.Linear):
            # BERT's N(0, 0.02) makes a 2-layer MLP start with ~1e-4 logits and a long
            # plateau; Glorot keeps unit-scale activations through the ReLU layer.
            init.xavier_uniform_(module.weight)
            init.zeros_(module.bias)
        else:
            super()._init_weights(module)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings = value

    def encode(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One sentence per row -> pooled features (B, 2 * hidden_size)."""
        pad = self.config.pad_token_id
        if attention_mask is None:
            attention_mask = (input_ids != pad).long()
        ids, mask, lengths = compact_left(input_ids, attention_mask, pad)
        x = self.dropout(self.embeddings(ids))
        # pack_padded_sequence rejects length 0; such rows are masked out of the pool anyway.
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths.clamp(min=1).cpu(),
                                                   batch_first=True, enforce_sorted=False)
        out, _ = self.lstm(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=ids.shape[1])
        return masked_max_pool(out, mask)

    def _pair_inputs(self, input_ids, attention_mask, token_type_ids, input_ids_b, attention_mask_b):
        pad = self.config.pad_token_id
        if input_ids_b is not None:
            return (input_ids, attention_mask), (input_ids_b, attention_mask_b)
        if token_type_ids is None or not bool((token_type_ids == 1).any()):
            raise ValueError(
                "BiLSTM: config.sentence_pair=True but the batch holds one sentence per row "
                "(no input_ids_b and no token_type_ids == 1). Give the recipe's data section a "
                "second text column (text_pair_column), or build the student with "
                "sentence_pair=False.")
        if attention_mask is None:
            attention_mask = (input_ids != pad).long()
        real = attention_mask.bool()
        a_ids, a_mask, _ = compact_left(input_ids, real & (token_type_ids == 0), pad)
        b_ids, b_mask, _ = compact_left(input_ids, real & (token_type_ids == 1), pad)
        return (a_ids, a_mask), (b_ids, b_mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None,
                input_ids_b: Optional[torch.Tensor] = None,
                attention_mask_b: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, return_dict: Optional[bool] = None,
                **kwargs: Any) -> SequenceClassifierOutput:
        if self.config.sentence_pair:
            (a, am), (b, bm) = self._pair_inputs(input_ids, attention_mask, token_type_ids,
                                                 input_ids_b, attention_mask_b)
            # One call on both halves: a shared encoder, and half the LSTM launches.
            width = max(a.shape[1], b.shape[1])
            pad = self.config.pad_token_id
            ids = torch.cat([nn.functional.pad(a, (0, width - a.shape[1]), value=pad),
                             nn.functional.pad(b, (0, width - b.shape[1]), value=pad)])
            mask = torch.cat([nn.functional.pad(am if am is not None else (a != pad).long(),
                                                (0, width - a.shape[1])),
                              nn.functional.pad(bm if bm is not None else (b != pad).long(),
                                                (0, width - b.shape[1]))])
            h = self.encode(ids, mask)
            feats = pair_features(h[: a.shape[0]], h[a.shape[0]:])
        else:
            if input_ids_b is not None:
                raise ValueError("BiLSTM: input_ids_b was given but config.sentence_pair is "
                                 "False; build the student with sentence_pair=True for pairs")
            feats = self.encode(input_ids, attention_mask)
        hidden = torch.relu(self.mlp(self.dropout(feats)))
        logits = self.classifier(self.dropout(hidden))
        loss = None
        if labels is not None:
            if self.config.num_labels == 1:
                loss = nn.functional.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
            else:
                loss = nn.functional.cross_entropy(logits, labels.long())
        return SequenceClassifierOutput(loss=loss, logits=logits)


AutoConfig.register(MODEL_TYPE, BiLSTMConfig, exist_ok=True)
AutoModelForSequenceClassification.register(BiLSTMConfig, BiLSTMForSequenceClassification,
                                            exist_ok=True)


# ---------------------------------------------------------------------------------------
# Building a student
# ---------------------------------------------------------------------------------------

def pca_project(vectors: torch.Tensor, dim: int) -> torch.Tensor:
    """Rows of ``vectors`` (N, D) mapped to ``dim`` columns by PCA (centred, top singular
    directions). When ``dim >= D`` the rows are only rotated onto their principal axes and
    zero-padded, so no information is lost; the result keeps the input's overall scale."""
    x = vectors.float()
    centred = x - x.mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    k = min(dim, vh.shape[0])
    out = centred @ vh[:k].T
    if k < dim:
        out = torch.cat([out, out.new_zeros(out.shape[0], dim - k)], dim=1)
    return out


def teacher_word_vectors(words: Sequence[str], teacher_embeddings: torch.Tensor,
                         teacher_tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """A vector per word: the mean of the teacher's input embeddings of the word's pieces.

    Returns ``(vectors (N, D), found (N,) bool)``; a word the teacher's tokenizer maps only
    to its unknown token is not found (its row is zero)."""
    emb = teacher_embeddings.detach().float()
    out = torch.zeros(len(words), emb.shape[1])
    found = torch.zeros(len(words), dtype=torch.bool)
    unk = getattr(teacher_tokenizer, "unk_token_id", None)
    enc = teacher_tokenizer(list(words), add_special_tokens=False)["input_ids"]
    for i, ids in enumerate(enc):
        ids = [t for t in ids if t != unk and 0 <= t < emb.shape[0]]
        if ids:
            out[i] = emb[ids].mean(dim=0)
            found[i] = True
    return out, found


def teacher_embedding_init(model: BiLSTMForSequenceClassification, tokenizer, teacher,
                           teacher_tokenizer=None) -> dict:
    """Initialise ``model``'s embeddings from ``teacher``'s input embeddings, in place.

    With the teacher's own tokenizer the rows are the teacher's rows; with a word-level
    tokenizer each word gets the mean of its word pieces' rows (``teacher_tokenizer`` is
    then required). Widths are matched by :func:`pca_project`, and the result is rescaled
    to ``config.embedding_init_std`` per coordinate so LSTM inputs keep a trainable scale.
    Words the teacher does not know keep their random init. Returns counts for the log."""
    from distilkit.students.word_vocab import SPECIAL_TOKENS, is_word_tokenizer, vocabulary_words

    t_emb = teacher.get_input_embeddings().weight
    if is_word_tokenizer(tokenizer):
        if teacher_tokenizer is None:
            raise ValueError("embedding init from the teacher with a word vocabulary needs "
                             "teacher_tokenizer (to split each word into the teacher's pieces)")
        words = vocabulary_words(tokenizer)
        vecs, found = teacher_word_vectors(words, t_emb, teacher_tokenizer)
        for i, w in enumerate(words):
            if w in SPECIAL_TOKENS:
                found[i] = False
    else:
        if len(tokenizer) > t_emb.shape[0]:
            raise ValueError(f"the tokenizer has {len(tokenizer)} ids but the teacher's "
                             f"embedding has {t_emb.shape[0]} rows; pass the teacher's tokenizer")
        vecs = torch.zeros(model.config.vocab_size, t_emb.shape[1])
        n = min(model.config.vocab_size, t_emb.shape[0])
        vecs[:n] = t_emb.detach().float()[:n]
        found = torch.zeros(model.config.vocab_size, dtype=torch.bool)
        found[:n] = True
    if not bool(found.any()):
        raise ValueError("embedding init from the teacher: no word of the vocabulary is known "
                         "to the teacher's tokenizer; use embedding_init='random'")
    proj = pca_project(vecs[found], model.config.embedding_dim)
    proj = proj * (model.config.embedding_init_std / proj.std().clamp(min=1e-8))
    with torch.no_grad():
        w = model.embeddings.weight
        w[found] = proj.to(w.dtype)
        if model.config.pad_token_id is not None:
            w[model.config.pad_token_id] = 0.0
    return {"from_teacher": int(found.sum()), "random": int((~found).sum())}


BUILDER_KEYS = ("vocabulary", "min_frequency", "max_vocab_size", "embedding_init", "seed",
                "num_labels")
CONFIG_KEYS = ("embedding_dim", "hidden_size", "num_layers", "mlp_hidden_size", "dropout",
               "sentence_pair", "embedding_init_std", "freeze_embeddings")


def build_bilstm_student(teacher=None, tokenizer=None, texts: Optional[Iterable[str]] = None, *,
                         vocabulary: str = "word", min_frequency: int = 1,
                         max_vocab_size: Optional[int] = None, embedding_init: str = "teacher",
                         seed: Optional[int] = None, num_labels: Optional[int] = None,
                         **config_kwargs) -> tuple[BiLSTMForSequenceClassification, Any]:
    """Make a BiLSTM student and the tokenizer it reads with.

    Args:
        teacher: the teacher model (its input embeddings initialise the student's, and its
            ``num_labels`` is the default), or ``None``.
        tokenizer: the teacher's tokenizer: reused as is with ``vocabulary="teacher"``, and
            used to split words into the teacher's pieces for the embedding init otherwise.
        texts: the training sentences (both columns for a pair task), from which
            ``vocabulary="word"`` builds the word vocabulary
            (:func:`~distilkit.students.word_vocab.build_word_tokenizer`).
        vocabulary: ``"word"`` (Tang et al.) or ``"teacher"``.
        min_frequency / max_vocab_size: word vocabulary limits.
        embedding_init: ``"teacher"`` (needs ``teacher``) or ``"random"``.
        seed: seed of the random initialisation.
        num_labels: classes (default: the teacher's; 2 without a teacher).
        **config_kwargs: :class:`BiLSTMConfig` fields (``hidden_size``, ``sentence_pair``...);
            an unknown key is an error that lists the valid ones.

    Returns ``(model, tokenizer)``; save both to one directory and
    ``AutoModelForSequenceClassification`` / ``AutoTokenizer`` load them back.
    """
    from distilkit.students.word_vocab import WordVocabConfig, build_word_tokenizer

    unknown = sorted(set(config_kwargs) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(f"student (bilstm): unknown key(s) {unknown}; valid keys: "
                         f"{sorted(BUILDER_KEYS + CONFIG_KEYS)}")
    if vocabulary not in ("word", "teacher"):
        raise ValueError(f"student.vocabulary={vocabulary!r}: use 'word' (a word vocabulary "
                         "built from the training text) or 'teacher' (the teacher's tokenizer)")
    if embedding_init not in ("teacher", "random"):
        raise ValueError(f"student.embedding_init={embedding_init!r}: use 'teacher' or 'random'")
    if embedding_init == "teacher" and teacher is None:
        raise ValueError("student.embedding_init='teacher' needs a teacher; pass one or use "
                         "embedding_init='random'")
    if vocabulary == "teacher":
        if tokenizer is None:
            raise ValueError("student.vocabulary='teacher' needs the teacher's tokenizer")
        student_tok = tokenizer
    else:
        if texts is None:
            raise ValueError("student.vocabulary='word' needs the training texts to build the "
                             "vocabulary from")
        student_tok = build_word_tokenizer(
            texts, WordVocabConfig(min_frequency=min_frequency, max_size=max_vocab_size))
    if student_tok.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token first")
    if num_labels is None:
        num_labels = int(getattr(getattr(teacher, "config", None), "num_labels", 2) or 2)
    if seed is not None:
        torch.manual_seed(seed)
    config = BiLSTMConfig(vocab_size=len(student_tok), pad_token_id=student_tok.pad_token_id,
                          num_labels=num_labels, **config_kwargs)
    if teacher is not None and getattr(teacher.config, "id2label", None) and \
            len(teacher.config.id2label) == num_labels:
        config.id2label = dict(teacher.config.id2label)
        config.label2id = dict(teacher.config.label2id)
    model = BiLSTMForSequenceClassification(config)
    if embedding_init == "teacher":
        if vocabulary == "word" and tokenizer is None:
            raise ValueError("embedding_init='teacher' with a word vocabulary needs the "
                             "teacher's tokenizer (to split each word into its pieces)")
        teacher_embedding_init(model, student_tok, teacher, tokenizer)
    return model, student_tok


def check_pair_data(config: BiLSTMConfig, text_pair_column: Optional[str]) -> None:
    """Fail before training when the student and the data disagree about sentence pairs."""
    if config.sentence_pair and not text_pair_column:
        raise ValueError("student.sentence_pair is true but the data has one text column: set "
                         "data.text_pair_column to the second sentence's column")
    if text_pair_column and not config.sentence_pair:
        raise ValueError(f"data.text_pair_column={text_pair_column!r} but the BiLSTM student "
                         "encodes single sentences: set student.sentence_pair: true")
