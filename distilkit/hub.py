"""Publishing a distilled student to the Hugging Face Hub.

:func:`push_to_hub` uploads one folder through ``huggingface_hub``
(``HfApi.create_repo`` then ``HfApi.upload_folder``). What goes up is decided locally by
:func:`prepare_upload`, which builds that folder (hard links, so no copy of the weights):

* from the model directory: the weights (``*.safetensors`` / ``*.bin`` and their index),
  ``config.json``, ``generation_config.json``, ``compression_config.json`` (the metadata
  :func:`~distilkit.load_compressed` needs to rebuild compressed layers), the tokenizer files,
  ``evaluation.json`` when present;
* ``README.md``: the model card already there, or one written now by
  :func:`distilkit.card.model_card` from the run's results;
* from the run directory (the parent of ``student/``): ``results.json`` and ``recipe.yaml``,
  so the Hub copy records how the model was made;
* the ONNX export in ``onnx/`` when the model directory holds one (``distilkit export``'s
  default place, written by a recipe's ``export:`` step): the card's Serve line names a file
  there;
* never: training checkpoints, optimizer state, distillation projections, temporary files.

Bad input gives huggingface_hub's own errors and wording (``HFValidationError`` for a
missing or malformed repo id, ``LocalTokenNotFoundError`` without a token), raised before any
network call; the ``distilkit push`` command prints them as one line.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Optional

from distilkit.card import PLACEHOLDER
from distilkit.evaluate import NOT_MODEL_FILES, model_files

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.txt", "vocab.json", "merges.txt", "added_tokens.json", "spiece.model",
                   "sentencepiece.bpe.model", "source.spm", "target.spm", "chat_template.jinja")
EXTRA_MODEL_FILES = ("README.md", "evaluation.json")
RUN_FILES = ("results.json", "recipe.yaml")
EXPORT_DIR = "onnx"  # where distilkit export (and a recipe's export: step) writes by default


def resolve_dirs(path: str) -> tuple[str, Optional[str]]:
    """``(model_dir, run_dir or None)`` for a run directory (holding ``student/``) or a model
    directory (whose parent may be its run). Raises naming what is missing."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isfile(os.path.join(path, "student", "config.json")):
        return os.path.join(path, "student"), path
    model_files(path)  # FileNotFoundError naming what is missing
    parent = os.path.dirname(path)
    run = parent if os.path.isfile(os.path.join(parent, "results.json")) else None
    return path, run


def upload_files(model_dir: str) -> list[str]:
    """The files of ``model_dir`` that belong on the Hub (see the module docstring)."""
    names = set(model_files(model_dir))
    for n in os.listdir(model_dir):
        if n in TOKENIZER_FILES or n in EXTRA_MODEL_FILES:
            names.add(n)
    return sorted(n for n in names if n not in NOT_MODEL_FILES and not n.startswith("."))


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)


def prepare_upload(path: str, staging_dir: str, repo_id: Optional[str] = None) -> list[str]:
    """Fill ``staging_dir`` with exactly what :func:`push_to_hub` uploads; returns the file
    names. The model card is generated (with ``repo_id`` in its loading snippet) when the model
    directory has none."""
    model_dir, run_dir = resolve_dirs(path)
    os.makedirs(staging_dir, exist_ok=True)
    for n in upload_files(model_dir):
        _link_or_copy(os.path.join(model_dir, n), os.path.join(staging_dir, n))
    export_dir = os.path.join(model_dir, EXPORT_DIR)
    if os.path.isfile(os.path.join(export_dir, "export.json")):
        os.makedirs(os.path.join(staging_dir, EXPORT_DIR), exist_ok=True)
        for n in sorted(os.listdir(export_dir)):
            f = os.path.join(export_dir, n)
            if os.path.isfile(f) and not n.startswith("."):
                _link_or_copy(f, os.path.join(staging_dir, EXPORT_DIR, n))
    if run_dir:
        for n in RUN_FILES:
            f = os.path.join(run_dir, n)
            if os.path.isfile(f):
                _link_or_copy(f, os.path.join(staging_dir, n))
    readme = os.path.join(staging_dir, "README.md")
    if os.path.isfile(readme) and repo_id:
        # The card written at the end of training does not know the repo yet: fill it in on
        # the uploaded copy (a new file, so the hard-linked original is untouched).
        with open(readme) as f:
            text = f.read()
        if PLACEHOLDER in text:
            os.remove(readme)
            with open(readme, "w") as f:
                f.write(text.replace(PLACEHOLDER, repo_id))
    if not os.path.isfile(readme):
        from distilkit.card import model_card
        from distilkit.compress.base import read_records

        results, recipe = {}, {}
        if run_dir and os.path.isfile(os.path.join(run_dir, "results.json")):
            with open(os.path.join(run_dir, "results.json")) as f:
                results = json.load(f)
            recipe = results.get("recipe") or {}
        records = read_records(model_dir)
        text = model_card(results, recipe, methods=records or None, repo_id=repo_id)
        with open(readme, "w") as f:
            f.write(text)
    return sorted(os.path.relpath(os.path.join(d, n), staging_dir)
                  for d, _, files in os.walk(staging_dir) for n in files)


def resolve_token(token: Optional[str] = None) -> str:
    """The token to push with: ``token``, else ``HF_TOKEN`` / the stored login. Raises
    huggingface_hub's ``LocalTokenNotFoundError`` when there is none."""
    from huggingface_hub import get_token
    from huggingface_hub.errors import LocalTokenNotFoundError

    token = token or get_token()
    if not token:
        raise LocalTokenNotFoundError(
            "Token is required to push to the Hub, but no token found. You need to provide a "
            "token (--token, or the HF_TOKEN environment variable) or be logged in to Hugging "
            "Face with `hf auth login` or `huggingface_hub.login`. See "
            "https://huggingface.co/settings/tokens.")
    return token


def check_repo_id(repo_id: Optional[str]) -> None:
    """huggingface_hub's own validation (``HFValidationError``), also for a missing id."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not repo_id:
        raise HFValidationError(f"Repo id must be in the form 'repo_name' or "
                                f"'namespace/repo_name': {repo_id!r}. Give the repository to "
                                "push to (--repo-id ORG/NAME, or hub_repo_id in the recipe).")
    validate_repo_id(repo_id)


def push_to_hub(run_dir_or_model_dir: str, repo_id: Optional[str], token: Optional[str] = None,
                private: bool = False, commit_message: Optional[str] = None) -> str:
    """Create (if needed) the model repo ``repo_id`` and upload the student: model, tokenizer,
    configs, compression metadata, card, results and recipe. Returns the repo URL.

    Args:
        run_dir_or_model_dir: a run directory from ``distilkit distill`` or a model directory.
        repo_id: ``ORG/NAME`` (or ``NAME`` under the token's user).
        token: a Hub token; default ``HF_TOKEN`` or the stored login.
        private: create the repo private.
    """
    from huggingface_hub import HfApi

    check_repo_id(repo_id)
    resolve_dirs(run_dir_or_model_dir)  # a directory without a model fails first, locally
    token = resolve_token(token)
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="distilkit-push-") as staging:
        files = prepare_upload(run_dir_or_model_dir, staging, repo_id=repo_id)
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=staging, repo_type="model",
                          commit_message=commit_message or f"Upload distilled model ({len(files)} files)")
    return str(getattr(url, "url", url) or f"https://huggingface.co/{repo_id}")


# ---------------------------------------------------------------------------------------
# Command line: ``distilkit push RUN_DIR --repo-id ORG/NAME``
# ---------------------------------------------------------------------------------------

def add_push_arguments(p) -> None:
    """Arguments of ``distilkit push`` (wired by :mod:`distilkit.cli`)."""
    p.add_argument("run_dir", help="a run directory from distilkit distill, or a model directory")
    p.add_argument("--repo-id", default=None, help="the Hub repository, ORG/NAME")
    p.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or `hf auth login`)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--commit-message", default=None)
    p.add_argument("--dry-run", action="store_true",
                   help="list the files that would be uploaded, and upload nothing")


def run_push(args, rest=None) -> int:
    """``distilkit push``: upload, or list what would be uploaded (``--dry-run``). Hub errors
    are printed as one line in huggingface_hub's words, not a traceback."""
    import sys

    from huggingface_hub.errors import HFValidationError, LocalTokenNotFoundError

    try:
        if args.dry_run:
            with tempfile.TemporaryDirectory(prefix="distilkit-push-") as staging:
                for n in prepare_upload(args.run_dir, staging, repo_id=args.repo_id):
                    print(f"{os.path.getsize(os.path.join(staging, n)):>12,}  {n}")
            return 0
        url = push_to_hub(args.run_dir, args.repo_id, token=args.token, private=args.private,
                          commit_message=args.commit_message)
    except (HFValidationError, LocalTokenNotFoundError) as e:
        print(f"distilkit push: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print(f"pushed to {url}")
    return 0
