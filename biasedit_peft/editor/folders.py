"""Editor folders: what ``BiasEditor.save_pretrained`` writes and ``from_pretrained`` reads, and their Hub upload.

A folder holds ``config.json`` (:class:`~biasedit_peft.editor.editor.BiasEditorConfig`), ``editor.safetensors``
(the nets' state dict) and ``README.md`` (the model card). Every file is written atomically.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import MISSING, asdict, fields
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_write, atomic_write_text, read_json_object, verify_manifest, write_manifest
from .editor import EDITOR_FORMAT, BiasEditor, BiasEditorConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "editor.safetensors"
CARD_NAME = "README.md"


def editor_card(editor: BiasEditor, **card_info: Any):
    """The editor's ``huggingface_hub.ModelCard``: what it knows (base model, targets and shapes, hyper-network
    settings, loss) and its training provenance (:attr:`BiasEditor.provenance`, updated by ``card_info``).

    Args:
        editor: The editor.
        card_info: Keyword arguments of :func:`~biasedit_peft.sharing.editor_model_card` (``training_data``,
            ``eval_data``, ``splits``, ``command``, ``validation`` (a trainer history record), ``training_args``,
            ``repo_id``); None values are left out.
    """
    from ..sharing.model_card import editor_model_card

    config = editor.config
    info = {**editor.provenance, **{key: value for key, value in card_info.items() if value is not None}}
    hyperparameters = {"rank": config.rank, "n_blocks": config.n_blocks, "lr": config.lr,
                       "chunk_size": config.chunk_size}
    return editor_model_card(base_model=config.base_model, target_modules=list(config.targets),
                             target_shapes=config.targets, hyperparameters=hyperparameters, loss=config.loss, **info)


def save_editor(editor: BiasEditor, save_directory: str | os.PathLike, **card_info: Any) -> None:
    """Write ``config.json``, ``editor.safetensors`` and ``README.md`` (each file atomically; the card is built
    first, so a bad ``card_info`` keyword writes nothing).

    Args:
        editor: The editor.
        save_directory: The folder (created if needed).
        card_info: See :func:`editor_card`.
    """
    from safetensors.torch import save_file

    card = str(editor_card(editor, **card_info))
    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().to("cpu").contiguous() for key, value in editor.state_dict().items()}
    atomic_write(directory / WEIGHTS_NAME, lambda path: save_file(state, path, metadata={"format": "pt"}))
    atomic_write_text(directory / CONFIG_NAME, json.dumps(asdict(editor.config), indent=2) + "\n")
    atomic_write_text(directory / CARD_NAME, card)
    write_manifest(directory)  # last: a kill before it leaves a manifest that the new files do not match


def load_editor(path_or_repo_id: str | os.PathLike, device: str | torch.device | None = None,
                editor_class: type[BiasEditor] = BiasEditor, **hub_kwargs: Any) -> BiasEditor:
    """Load an editor folder, or download one from the Hub (``snapshot_download``).

    Args:
        path_or_repo_id: A local editor folder or a Hub repo id.
        device: Where to put the nets (default: the CPU).
        editor_class: The class to build (a subclass of :class:`BiasEditor`).
        hub_kwargs: Passed to ``snapshot_download`` (``revision``, ``token``, ...).

    Raises:
        FileNotFoundError: The folder lacks ``config.json`` or ``editor.safetensors``; ``path_or_repo_id`` is
            neither an existing path nor an ``org/name`` Hub id (refused before any Hub call), or the Hub download
            failed (``models.ModelNotFoundError``, also a ``ValueError``).
        ValueError: The folder's format is not this package's, or its weights do not match its config.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = _editor_folder(path_or_repo_id, **hub_kwargs)
    config_path = directory / CONFIG_NAME
    if not config_path.is_file() or not (directory / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{directory} is not an editor folder (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    verify_manifest(directory, [CONFIG_NAME, WEIGHTS_NAME])  # when the folder has a manifest
    editor = editor_class(read_editor_config(config_path))
    try:
        state = load_file(str(directory / WEIGHTS_NAME))
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        raise ValueError(f"{directory / WEIGHTS_NAME}: not a readable safetensors file (truncated or corrupt?): "
                         f"{error}") from None
    try:
        missing, unexpected = editor.load_state_dict(state, strict=False)
    except RuntimeError as error:  # a tensor of another shape
        raise ValueError(f"{directory / WEIGHTS_NAME} does not match {CONFIG_NAME}: {error}") from None
    if missing or unexpected:
        raise ValueError(f"{directory / WEIGHTS_NAME} does not match {CONFIG_NAME}: "
                         f"missing {missing}, unexpected {unexpected}")
    return editor.to(device) if device is not None else editor


def _editor_folder(path_or_repo_id: str | os.PathLike, **hub_kwargs: Any) -> Path:
    """The local folder of an editor: ``path_or_repo_id`` itself, or its Hub snapshot (downloaded).

    Raises:
        ModelNotFoundError: Neither an existing path nor an ``org/name`` Hub id, or a Hub id whose download
            failed (no such repo, no network), naming it as ``--editor``.
    """
    from ..models import hub_download, require_local_or_hub

    if require_local_or_hub(path_or_repo_id, "--editor", namespaced=True):
        return Path(os.path.expanduser(str(path_or_repo_id)))
    return hub_download(str(path_or_repo_id), "--editor", **hub_kwargs)


def read_editor_config(path: Path) -> BiasEditorConfig:
    """The :class:`BiasEditorConfig` of an editor folder's ``config.json``, every field checked.

    Raises:
        ValueError: Naming the file: not UTF-8 JSON, another format, an unknown or missing key, or a value of the
            wrong type (``targets`` must map module names to ``[key_size, value_size]``).
    """
    document = read_json_object(path)
    if document.get("format") != EDITOR_FORMAT:
        raise ValueError(f"{path}: format {document.get('format')!r} is not {EDITOR_FORMAT!r}")
    known = {f.name: f for f in fields(BiasEditorConfig)}
    unknown = sorted(set(document) - set(known))
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; an editor config has {sorted(known)}")
    required = [name for name, f in known.items() if f.default is MISSING and f.default_factory is MISSING]
    missing = [name for name in required if name not in document]
    if missing:
        raise ValueError(f"{path}: missing key(s) {missing}")
    targets = document["targets"]
    if not isinstance(targets, dict) or not all(
            isinstance(name, str) and isinstance(shape, list) and len(shape) == 2
            and all(isinstance(size, int) and size > 0 for size in shape) for name, shape in targets.items()):
        raise ValueError(f"{path}: 'targets' must map module names to [key_size, value_size] (positive ints), "
                         f"got {targets!r}")
    types = {"rank": int, "n_blocks": int, "chunk_size": int, "lr": (int, float), "loss": str,
             "base_model": (str, type(None)), "format": str}
    for name, kind in types.items():
        if name in document and (not isinstance(document[name], kind) or isinstance(document[name], bool)):
            raise ValueError(f"{path}: {name!r} must be {getattr(kind, '__name__', 'a number or string')}, got "
                             f"{document[name]!r}")
    try:
        return BiasEditorConfig(**document)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def push_editor(editor: BiasEditor, repo_id: str, private: bool | None = None, token: str | None = None,
                commit_message: str = "Upload BiasEdit editor") -> str:
    """Save ``editor`` to a temporary folder and upload it in one commit; returns the commit URL.

    Args:
        editor: The editor.
        repo_id: The Hub repository (created if missing).
        private: Create it private.
        token: A Hub token (default: the logged-in one).
        commit_message: The commit's message.
    """
    from ..sharing.hub import push_folder_to_hub

    with tempfile.TemporaryDirectory() as folder:
        save_editor(editor, folder, repo_id=repo_id)
        return push_folder_to_hub(folder, repo_id, private=private, token=token, commit_message=commit_message)
