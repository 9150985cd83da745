"""Small file utilities that every writer of the package shares: :func:`atomic_write` (a file is replaced whole or
not at all, with the permissions a new file gets) and one JSON writer.

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
import tempfile
from pathlib import Path
from typing import Any, Callable

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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json_text(document, indent, strict))
    return path


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Write ``path`` through a temporary file in the same folder and ``os.replace`` it into place.

    Args:
        path: The file to write; after a failure (or a kill) it is as it was before.
        write: Called with the temporary file's path; writes the content there. The file then gets the mode
            ``open(path, "w")`` would give a new file (``0o666`` less the umask), not ``mkstemp``'s private 0o600.
    """
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temporary)
        os.chmod(temporary, _new_file_mode())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """:func:`atomic_write` of UTF-8 ``text``."""
    atomic_write(path, lambda temporary: Path(temporary).write_text(text, encoding="utf-8"))


def _new_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: ``0o666`` less the process umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask
