"""evaluate_model on CUDA: same predictions as on CPU, latency timed with synchronisation,
peak memory from the CUDA allocator."""
import torch
from datasets import Dataset

from conftest import cpu_conftest
from distilkit.evaluate import evaluate_model


def test_evaluate_model_on_cuda(tmp_path):
    tok = cpu_conftest.tiny_tokenizer(str(tmp_path / "tok"))
    rows = cpu_conftest.tiny_sentences(40)
    ds = Dataset.from_dict({"text": [r[0] for r in rows], "label": [r[1] for r in rows]})
    model = cpu_conftest.tiny_bert(vocab=tok.vocab_size, layers=2)
    cpu = evaluate_model(model, tok, ds, max_length=16, latency=False)
    gpu = evaluate_model(model.cuda(), tok, ds, max_length=16, latency_runs=(5, 3))
    assert gpu["accuracy"] == cpu["accuracy"] and gpu["macro_f1"] == cpu["macro_f1"]
    assert gpu["latency_ms_batch1"] > 0 and gpu["latency_ms_batch32"] > 0
    assert gpu["memory_method"] == "cuda allocator max_memory_allocated"
    assert gpu["activation_peak_mb"] > 0 and gpu["peak_memory_mb"] > gpu["model_memory_mb"] > 0
    assert next(model.parameters()).is_cuda and torch.cuda.is_initialized()
