"""Students built from a teacher *directory*: the teacher's tensors are read lazily, only those
the student keeps, and the result is the student built from the loaded teacher, bit for bit."""
import os

import pytest
import torch
from conftest import tiny_bart, tiny_bert, tiny_t5

from distilkit.students.init import student_from_teacher

SEQ2SEQ = {"t5": tiny_t5, "bart": tiny_bart}


def _saved(model, path, shard: bool = False) -> str:
    # A small max_shard_size splits even a tiny model into several files plus an index.
    model.save_pretrained(path, **({"max_shard_size": "20KB"} if shard else {}))
    return str(path)


def _loaded(path):
    """The teacher as a run loads it (a seq2seq head for an encoder-decoder config)."""
    from transformers import AutoConfig

    from distilkit.teachers import load_teacher
    return load_teacher(path, like=AutoConfig.from_pretrained(path))


def assert_same_student(lazy, eager):
    assert type(lazy) is type(eager) and lazy.training == eager.training
    a, b = lazy.state_dict(), eager.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert lazy.config.distilkit_init == eager.config.distilkit_init
    assert lazy.config.to_diff_dict() == eager.config.to_diff_dict()


@pytest.mark.parametrize("shard", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("spec", [{"num_layers": 2}, {"keep_layers": [1, 3]},
                                  {"num_layers": 3, "strategy": "last"}, {}],
                         ids=["alternate", "explicit", "last", "all"])
def test_bert_student_from_a_directory_equals_the_one_from_the_loaded_teacher(tmp_path, spec, shard):
    path = _saved(tiny_bert(seed=1), tmp_path / "t", shard)
    assert os.path.isfile(os.path.join(path, "model.safetensors.index.json")) == shard
    assert_same_student(student_from_teacher(path, **spec),
                        student_from_teacher(_loaded(path), **spec))


@pytest.mark.parametrize("shard", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("spec", [{"num_layers": 1, "keep_decoder_layers": [1]},
                                  {"num_decoder_layers": 1, "strategy": "first"},
                                  {"keep_layers": [0]}],
                         ids=["both", "decoder", "encoder"])
@pytest.mark.parametrize("family", sorted(SEQ2SEQ))
def test_seq2seq_student_from_a_directory_equals_the_one_from_the_loaded_teacher(
        tmp_path, family, spec, shard):
    path = _saved(SEQ2SEQ[family](seed=2), tmp_path / "t", shard)
    lazy = student_from_teacher(path, **spec)
    assert_same_student(lazy, student_from_teacher(_loaded(path), **spec))
    # Tied embeddings stay tied (they are saved once, as the shared embedding).
    assert lazy.get_input_embeddings().weight is lazy.get_output_embeddings().weight


def test_the_lazy_path_never_builds_the_teacher_and_reads_only_kept_tensors(tmp_path, monkeypatch):
    import safetensors
    import safetensors.torch
    from transformers import BertForSequenceClassification

    path = _saved(tiny_bert(seed=1), tmp_path / "t")  # 4 layers
    built = []
    real_init = BertForSequenceClassification.__init__

    def counting_init(self, config, *a, **kw):
        built.append(config.num_hidden_layers)
        real_init(self, config, *a, **kw)

    def refuse(*a, **kw):
        raise AssertionError("the whole teacher was loaded")

    read = []
    real_open = safetensors.safe_open

    class Recording:
        def __init__(self, *a, **kw):
            self.handle = real_open(*a, **kw)

        def __enter__(self):
            self.inner = self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_tensor(self, key):
            read.append(key)
            return self.inner.get_tensor(key)

    monkeypatch.setattr(BertForSequenceClassification, "__init__", counting_init)
    monkeypatch.setattr(BertForSequenceClassification, "from_pretrained", refuse)
    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    monkeypatch.setattr(safetensors, "safe_open", Recording)
    student = student_from_teacher(path, keep_layers=[0, 3])
    assert built == [2]  # the student only: the 4-layer teacher is never constructed
    assert student.config.distilkit_init == {"encoder": [0, 3]}
    layers = {int(k.split(".")[3]) for k in read if k.startswith("bert.encoder.layer.")}
    assert layers == {0, 3}  # the dropped layers' tensors are never read
    assert len(read) == len(set(read)) == len(student.state_dict())


def test_a_compressed_teacher_directory_is_loaded_with_load_compressed(tmp_path, monkeypatch):
    from distilkit.compress import base
    from distilkit.compress.base import compress_, config_from_dict, save_compressed

    teacher = tiny_bert(seed=3)
    compress_(teacher, config_from_dict({"method": "magnitude", "initial_sparsity": 0.5,
                                         "final_sparsity": 0.5}))
    save_compressed(teacher, str(tmp_path / "t"))
    assert os.path.isfile(tmp_path / "t" / "compression_config.json")
    calls = []
    real = base.load_compressed
    monkeypatch.setattr(base, "load_compressed", lambda p, **kw: calls.append(p) or real(p, **kw))
    lazy = student_from_teacher(str(tmp_path / "t"), num_layers=2)
    assert calls == [str(tmp_path / "t")]
    assert_same_student(lazy, student_from_teacher(real(str(tmp_path / "t")), num_layers=2))


def test_teacher_directory_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="teacher: .*missing.* is not a directory"):
        student_from_teacher(tmp_path / "missing", num_layers=1)  # a Path works too
    tiny_bert().config.save_pretrained(tmp_path / "config_only")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        student_from_teacher(str(tmp_path / "config_only"), num_layers=1)
    path = _saved(tiny_bert(), tmp_path / "t")
    with pytest.raises(ValueError, match=r"keep_layers: \[0, 4\] must be distinct layer indices in 0..3"):
        student_from_teacher(path, keep_layers=[0, 4])
    with pytest.raises(ValueError, match="num_layers: 5 must be between 1 and the teacher's 4"):
        student_from_teacher(path, num_layers=5)
