"""Pushing adapters and editors to the Hugging Face Hub so that our model card survives.

transformers' ``PeftModel.push_to_hub`` rewrites ``README.md`` and tags the repo ``library_name:
transformers``; instead we save the folder, write our card into it, and upload the folder with
``huggingface_hub.HfApi().upload_folder`` in one commit.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from .._io import write_manifest

README = "README.md"


def _card_text(card: Any) -> str:
    """A card given as ``ModelCard``, string, or path to a README file, as text."""
    if isinstance(card, Path) or (isinstance(card, str) and "\n" not in card and Path(card).is_file()):
        return Path(card).read_text(encoding="utf-8")
    return str(card)


def push_folder_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    card: Any = None,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
) -> str:
    """Create ``repo_id`` if needed and upload every file of ``folder`` in one commit, with a ``manifest.json`` of
    each file's sha256 (written into ``folder`` first; loading the adapter or editor back verifies it).

    Args:
        folder: The folder to upload.
        repo_id: The Hub model repo, created when missing.
        card: A ``ModelCard``, its text, or a README path, written as the folder's ``README.md`` before the
            upload; None keeps the folder's own.
        private: Visibility of a newly created repo (None: the Hub's default).
        token: Hub token (None: the logged-in one).
        commit_message: Default: ``"Upload FOLDER with biasedit_peft"``.
        revision: The branch to commit to.

    Returns:
        The commit URL.
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Cannot push {folder}: not a folder.")
    if card is not None:
        (folder / README).write_text(_card_text(card), encoding="utf-8")
    write_manifest(folder)  # each file's sha256: pulls and loads verify it (_io.verify_manifest)
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        commit_message=commit_message or f"Upload {folder.name} with biasedit_peft",
        revision=revision,
        repo_type="model",
    )
    return commit.commit_url


def push_adapter_to_hub(
    peft_model,
    repo_id: str,
    *,
    card: Any = None,
    adapter_name: str = "default",
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    metrics_before: dict | None = None,
    metrics_after: dict | None = None,
    command: str | list[str] | None = None,
) -> str:
    """Save adapter ``adapter_name`` of ``peft_model`` with a BiasEdit model card and upload it to ``repo_id``.

    Load it back with ``import biasedit_peft; PeftModel.from_pretrained(base, repo_id)``.

    Args:
        peft_model: The ``PeftModel`` holding the adapter.
        repo_id: The Hub model repo, created when missing.
        card: The card to upload; None: :func:`~biasedit_peft.sharing.adapter_model_card` of the model,
            ``metrics_before`` / ``metrics_after`` and ``command``.
        adapter_name: The adapter to upload.
        private: Visibility of a newly created repo (None: the Hub's default).
        token: Hub token (None: the logged-in one).
        commit_message: Default: ``"Upload BiasEdit adapter"``.
        metrics_before: For the generated card: evaluate-style metrics of the base model.
        metrics_after: For the generated card: the same with the adapter applied.
        command: For the generated card: the command line that made the adapter.

    Returns:
        The commit URL.
    """
    from .model_card import adapter_model_card

    if card is None:
        card = adapter_model_card(
            peft_model, adapter_name, repo_id=repo_id, metrics_before=metrics_before,
            metrics_after=metrics_after, command=command,
        )
    with tempfile.TemporaryDirectory(prefix="biasedit-push-") as folder:
        peft_model.save_pretrained(folder, selected_adapters=[adapter_name])
        saved = Path(folder) / adapter_name if adapter_name != "default" else Path(folder)
        return push_folder_to_hub(saved, repo_id, card=card, private=private, token=token,
                                  commit_message=commit_message or "Upload BiasEdit adapter")
