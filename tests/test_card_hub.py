"""Model card content (Hub front-matter, methods with citations, figures, loading) and the
Hub push: the uploaded folder file by file, the call reaching HfApi.upload_folder, and
huggingface_hub-style errors without a repo id or a token. No network."""
import argparse
import json
import os

import pytest
import yaml
from conftest import tiny_bert
from tiny_text import tiny_tokenizer

from distilkit.card import model_card
from distilkit.hub import add_push_arguments, prepare_upload, push_to_hub, run_push

FIG = {"accuracy": 0.80, "macro_f1": 0.79, "parameters": 22_700_000, "nonzero_parameters": 22_700_000,
       "size_on_disk_bytes": 90_000_000, "bits_per_weight": 31.7, "latency_ms_batch1": 10.0,
       "latency_ms_batch32": 480.0, "peak_memory_mb": 180.0, "examples": 1060, "threads": 2,
       "max_length": 64}
STUDENT = {**FIG, "accuracy": 0.76, "macro_f1": 0.755, "parameters": 11_000_000,
           "size_on_disk_bytes": 6_000_000, "bits_per_weight": 4.36, "latency_ms_batch32": 240.0}
RECIPE = {"name": "kd-q4", "teacher": "builtin:minilm-rt", "dataset": "builtin:rotten_tomatoes",
          "student": {"type": "from_teacher", "num_layers": 3}, "max_length": 64,
          "alpha_kd": 0.5, "alpha_ce": 0.5, "alpha_patient": 100.0, "temperature": 2.0,
          "layer_map": "skip", "max_steps": 600, "learning_rate": 1e-4,
          "compression": [{"method": "quantize", "bits": 4, "bucket_size": 256}]}
RESULTS = {"name": "kd-q4", "split": "test", "teacher": FIG, "student": STUDENT, "recipe": RECIPE}


def front_matter(card):
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_card_front_matter_and_body():
    card = model_card(RESULTS, RECIPE)
    meta = front_matter(card)
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-classification"
    assert {"distillation", "distilkit", "quantization", "quantized-distillation"} <= set(meta["tags"])
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert meta["metrics"] == ["accuracy", "f1"]
    assert "datasets" not in meta  # the built-in data is not a Hub dataset: no made-up id
    # Teacher, data, student, every loss term with weight and paper, the method and its citation.
    assert "MiniLM" in card and "Rotten Tomatoes" in card and "Hutto, Gilbert" in card
    assert "| soft-target KL (x T^2) | 0.5 |" in card and "| hard-label cross-entropy | 0.5 |" in card
    assert "| Patient-KD | 100.0 |" in card and "temperature T = 2.0" in card
    assert "arXiv:1503.02531" in card and "arXiv:1908.09355" in card and "arXiv:1910.01108" in card
    assert "**quantize** (bits=4, bucket_size=256)" in card
    assert "Polino, Pascanu, Alistarh" in card  # from QuantizeConfig's Method.citation
    assert "alpha_mse" not in card and "logit MSE" not in card  # zero-weight terms are absent
    # Figures table from evaluate, and loading instructions for a compressed model.
    assert "95.0 %" in card and "15.00x" in card and "11,000,000" in card
    assert 'distilkit.from_pretrained("PATH_OR_REPO_ID")' in card
    assert "AutoModelForSequenceClassification.from_pretrained" not in card


def test_card_for_a_hub_dataset_and_plain_student():
    from huggingface_hub import ModelCard

    recipe = {**RECIPE, "dataset": "stanfordnlp/sst2", "teacher": "textattack/bert-base-uncased-SST-2",
              "compression": [], "alpha_patient": 0, "alpha_mse": 1.0, "alpha_kd": 0}
    card = model_card({**RESULTS, "recipe": recipe}, recipe, repo_id="me/tiny")
    meta = front_matter(card)
    assert meta["datasets"] == ["stanfordnlp/sst2"]
    assert meta["base_model"] == "textattack/bert-base-uncased-SST-2"
    res = meta["model-index"][0]["results"]
    metrics = {m["type"]: m["value"] for r in res for m in r["metrics"]}
    assert metrics == {"accuracy": 0.76, "f1": 0.755}
    assert "| logit MSE | 1.0 |" in card and "arXiv:1903.12136" in card
    assert "None: the student is stored in full precision." in card
    assert 'AutoModelForSequenceClassification.from_pretrained("me/tiny")' in card
    parsed = ModelCard(card)  # huggingface_hub reads it back
    assert parsed.data.library_name == "transformers" and parsed.data.eval_results[0].metric_value == 0.76


@pytest.fixture
def run(tmp_path):
    """A run directory as distilkit distill writes it, plus files that must not be uploaded."""
    from distilkit.compress.base import compress_, config_from_dict, finalize_, save_compressed

    r = tmp_path / "run"
    student = r / "student"
    m = tiny_bert(layers=2)
    compress_(m, config_from_dict({"method": "ptq", "bits": 4, "bucket_size": 64}))
    finalize_(m)
    save_compressed(m, str(student))
    tiny_tokenizer().save_pretrained(student)
    (student / "distil_projections.safetensors").write_bytes(b"training only")
    (student / ".tmp-123").write_text("partial")
    (student / "checkpoint-5").mkdir()
    (r / "results.json").write_text(json.dumps(RESULTS))
    (r / "recipe.yaml").write_text(yaml.safe_dump(RECIPE))
    return r


def test_upload_folder_contents_file_by_file(run, tmp_path):
    staging = tmp_path / "staging"
    files = prepare_upload(str(run), str(staging), repo_id="org/kd-q4")
    student = run / "student"
    expected_model = sorted(n for n in os.listdir(student) if n.endswith(".safetensors")
                            and n != "distil_projections.safetensors")
    tok_files = sorted(n for n in os.listdir(student) if n.startswith(("tokenizer", "special_tokens")))
    assert expected_model == ["model.safetensors"] and tok_files
    assert files == sorted(["README.md", "compression_config.json", "config.json", "recipe.yaml",
                            "results.json", *expected_model, *tok_files])
    for n in files:
        src = run / n if n in ("results.json", "recipe.yaml") else student / n
        if n != "README.md":
            assert (staging / n).read_bytes() == src.read_bytes(), n
    card = (staging / "README.md").read_text()
    assert 'distilkit.from_pretrained("org/kd-q4")' in card and "**ptq** (bits=4, bucket_size=64" in card
    # The card written after training gets the repo id in its loading snippet on the copy.
    (student / "README.md").write_text(model_card(RESULTS, RECIPE))
    prepare_upload(str(run), str(tmp_path / "s1"), repo_id="org/named")
    assert 'from_pretrained("org/named")' in (tmp_path / "s1" / "README.md").read_text()
    assert "PATH_OR_REPO_ID" in (student / "README.md").read_text()
    # A card already beside the model is uploaded as it is.
    (student / "README.md").write_text("---\nlibrary_name: transformers\n---\n# mine\n")
    files2 = prepare_upload(str(student), str(tmp_path / "s2"))
    assert (tmp_path / "s2" / "README.md").read_text().endswith("# mine\n") and files2 == files


def test_push_reaches_upload_folder_with_the_right_arguments(run, monkeypatch):
    from huggingface_hub import HfApi

    calls = []

    def fake_create_repo(self, repo_id, **kw):
        calls.append(("create_repo", repo_id, kw, self.token))
        return f"https://huggingface.co/{repo_id}"

    def fake_upload_folder(self, *, repo_id, folder_path, **kw):
        calls.append(("upload_folder", repo_id, kw, sorted(os.listdir(folder_path))))

    monkeypatch.setattr(HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", fake_upload_folder)
    url = push_to_hub(str(run), "org/kd-q4", token="hf_test", private=True)
    assert url == "https://huggingface.co/org/kd-q4"
    (c_name, c_repo, c_kw, c_token), (u_name, u_repo, u_kw, u_files) = calls
    assert (c_name, c_repo, c_token) == ("create_repo", "org/kd-q4", "hf_test")
    assert c_kw["private"] is True and c_kw["exist_ok"] is True and c_kw["repo_type"] == "model"
    assert (u_name, u_repo, u_kw["repo_type"]) == ("upload_folder", "org/kd-q4", "model")
    assert {"model.safetensors", "config.json", "compression_config.json", "README.md",
            "tokenizer.json", "results.json"} <= set(u_files)
    assert "distil_projections.safetensors" not in u_files and ".tmp-123" not in u_files


def _cli(argv):
    p = argparse.ArgumentParser()
    add_push_arguments(p)
    return run_push(p.parse_args(argv))


def test_push_without_token_or_repo_id_gives_hub_messages(run, monkeypatch, capsys):
    import huggingface_hub
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HFValidationError, LocalTokenNotFoundError

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    reached = []
    monkeypatch.setattr(HfApi, "create_repo", lambda *a, **k: reached.append(a))
    with pytest.raises(LocalTokenNotFoundError, match="Token is required"):
        push_to_hub(str(run), "org/kd-q4")
    with pytest.raises(HFValidationError, match="Repo id must be in the form"):
        push_to_hub(str(run), None, token="hf_x")
    with pytest.raises(HFValidationError):
        push_to_hub(str(run), "a/b/c", token="hf_x")
    assert _cli([str(run), "--repo-id", "org/kd-q4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "LocalTokenNotFoundError: Token is required" in err
    assert _cli([str(run)]) == 2
    assert "HFValidationError: Repo id must be in the form" in capsys.readouterr().err
    assert reached == []
    assert _cli([str(run), "--dry-run"]) == 0
    assert "model.safetensors" in capsys.readouterr().out


def test_push_of_a_directory_without_a_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing config.json and model weights"):
        push_to_hub(str(tmp_path), "org/x", token="hf_x")


def test_card_lists_the_loss_weights_left_at_their_defaults():
    """A recipe that relies on alpha_kd: 0.5, alpha_ce: 0.5 and temperature 2.0 (it sets none
    of them) gets them in its card: the table is read from the resolved recipe through the
    loss-term registry."""
    from distilkit.recipe import Recipe

    recipe = Recipe.from_dict({"name": "defaults", "max_steps": 10}).to_dict()
    card = model_card({"name": "defaults"}, recipe)
    assert "| soft-target KL (x T^2) | 0.5 |" in card and "| hard-label cross-entropy | 0.5 |" in card
    assert "temperature T = 2.0" in card and "arXiv:1503.02531" in card
    assert "logit MSE" not in card and "Patient-KD" not in card


def test_card_loss_rows_come_from_the_registry():
    from distilkit.loss_terms import loss_terms

    recipe = {**RECIPE, "attention_loss_kind": "mse", **{t.weight: 1.0 for t in loss_terms()}}
    card = model_card(RESULTS, recipe)
    for t in loss_terms():
        assert f"| {t.title} | 1.0 | {t.matches} |" in card, t.name
        assert all(r in card for r in t.references(recipe)), t.name
    assert "TinyBERT" in card and "MiniLM: Deep Self-Attention" not in card  # MSE attention


def test_the_onnx_export_goes_up_with_the_model(run, tmp_path):
    """The card's Serve line names a file in student/onnx: the export is uploaded too (and a
    folder there without export.json, or a hidden file, is not)."""
    onnx = run / "student" / "onnx"
    onnx.mkdir()
    for n, data in (("export.json", "{}"), ("model.onnx", "graph"), ("model_int8.onnx", "q"),
                    (".tmp-x", "partial")):
        (onnx / n).write_text(data)
    (run / "student" / "scratch").mkdir()
    (run / "student" / "scratch" / "model.onnx").write_text("not an export")
    files = prepare_upload(str(run), str(tmp_path / "s"))
    assert {"onnx/export.json", "onnx/model.onnx", "onnx/model_int8.onnx"} <= set(files)
    assert not any(f.startswith(("onnx/.tmp", "scratch")) for f in files)
    assert (tmp_path / "s" / "onnx" / "model_int8.onnx").read_text() == "q"
