"""Small file utilities that every writer of the package shares: one JSON writer (``atomic_write`` joins it here
when the editor is split).

Every JSON document the package writes for others (``biasedit evaluate --json``, ``trace.json``, ``sweep.json``,
``merge_report.json``, ``lora_export_report.json``) goes through :func:`write_json`. It writes strict JSON: a
non-finite float (NaN, +inf, -inf) has no JSON spelling, so it is written as ``null``, at any depth, always. Only
``strict=False`` keeps Python's ``NaN`` / ``Infinity`` tokens, for the demo's resumable stage records, which
nobody but :mod:`biasedit_peft.progress_store` reads back and which must round-trip exactly.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from torch import Tensor


def json_ready(value: Any, digits: int | None = None, strict: bool = True) -> Any:
    """``value`` as plain JSON data.

    Tensors become (nested) lists, tuples lists and sets sorted lists; dicts and lists are converted item by item;
    anything else is returned as it is.

    Args:
        value: The document, or any part of it.
        digits: Round every float to this many decimals (``round``); ``None`` leaves floats as they are.
        strict: Replace every non-finite float by ``None`` (JSON ``null``). ``False`` keeps them.
    """
    if isinstance(value, Tensor):
        value = value.tolist()
    if isinstance(value, float):
        if not math.isfinite(value):
            return None if strict else value
        return value if digits is None else round(value, digits)
    if isinstance(value, dict):
        return {key: json_ready(item, digits, strict) for key, item in value.items()}
    if isinstance(value, (set, frozenset)):
        value = sorted(value)
    if isinstance(value, (list, tuple)):
        return [json_ready(item, digits, strict) for item in value]
    return value


def json_text(document: Any, indent: int | None = 2, strict: bool = True) -> str:
    """``document`` (see :func:`json_ready`) as JSON text with a final newline.

    Args:
        document: What to write.
        indent: ``json.dumps``'s indent; ``None`` writes one line.
        strict: Standard JSON, non-finite floats as ``null``. ``False`` writes them as ``NaN`` / ``Infinity``, which
            only Python's ``json`` reads back.
    """
    return json.dumps(json_ready(document, strict=strict), indent=indent, allow_nan=not strict) + "\n"


def write_json(path: str | Path, document: Any, indent: int | None = 2, strict: bool = True) -> Path:
    """Write ``document`` as :func:`json_text` to ``path``, atomically (folder created), with the permissions of any
    new file. Returns the path.

    Args:
        path: The file to write; replaced whole, or left as it was if the write fails.
        document: What to write (see :func:`json_ready`).
        indent: ``json.dumps``'s indent; ``None`` writes one line.
        strict: See :func:`json_text`.
    """
    from .editor.editor import atomic_write  # imported here until atomic_write moves into this module

    text = json_text(document, indent, strict)
    mode = _new_file_mode()

    def write(temporary: str) -> None:
        Path(temporary).write_text(text, encoding="utf-8")
        os.chmod(temporary, mode)  # the temporary file is private (0o600); the document gets a new file's mode

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write)
    return path


def _new_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: ``0o666`` less the process umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask
