"""The samples an editor is trained on or edits with, named by one spec string (``--data``, ``--train-data``).

``stereoset:SPLIT`` is a bundled StereoSet split; a path is a StereoSet-schema ``.json`` file or a ``.jsonl`` file
of one JSON object per line with ``stereotype``, ``anti_stereotype`` and ``unrelated`` fields (read as they are:
the editor turns each into an edit sample).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from .stereoset import StereoSetItem, load_stereoset, load_stereoset_file

STEREOSET_PREFIX = "stereoset:"


def load_edit_samples(
    spec: str, bias_types: Sequence[str] | None = None, limit: int | None = None
) -> list[StereoSetItem] | list[dict[str, Any]]:
    """The samples named by ``spec``, in file order.

    Args:
        spec: ``stereoset:SPLIT`` (bundled), a StereoSet-schema ``.json`` file, or a ``.jsonl`` file.
        bias_types: Keep only these StereoSet bias types (StereoSet data; ``.jsonl`` lines are all kept).
        limit: Keep only the first ``limit`` samples.

    Raises:
        ValueError: ``spec`` is neither a StereoSet split nor an existing file, a ``.jsonl`` line is not JSON,
            or no sample is left.
    """
    if spec.startswith(STEREOSET_PREFIX):
        items = load_stereoset(spec[len(STEREOSET_PREFIX):], bias_types=bias_types)
    else:
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"--data {spec!r}: neither 'stereoset:SPLIT' nor an existing file")
        items = _read_jsonl(path) if path.suffix == ".jsonl" else load_stereoset_file(path, bias_types=bias_types)
    items = items[:limit] if limit is not None else items
    if not items:
        raise ValueError(f"{spec}: no samples")
    return items


def describe_edit_samples(spec: str, bias_types: Sequence[str] | None = None, limit: int | None = None) -> str:
    """``spec`` with the bias types (StereoSet data) and the limit it was read with, e.g. for a model card.

    Args:
        spec: As for :func:`load_edit_samples`.
        bias_types: The bias types it was read with; named only for ``stereoset:`` specs.
        limit: The limit it was read with.
    """
    details = [f"bias types {', '.join(bias_types)}"] if bias_types and spec.startswith(STEREOSET_PREFIX) else []
    details += [f"first {limit} samples"] if limit is not None else []
    return f"{spec} ({'; '.join(details)})" if details else spec


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: line {number} is not JSON ({error})") from None
    return items
