"""The samples an editor is trained on or edits with, named by one spec string (``--data``, ``--train-data``).

``stereoset:SPLIT`` is a bundled StereoSet split; a path is a StereoSet-schema ``.json`` file, a CrowS-Pairs ``.csv``
(:func:`crows_edit_samples`) or a ``.jsonl`` file
of one JSON object per line with ``stereotype``, ``anti_stereotype`` and ``unrelated`` fields (read as they are:
the editor turns each into an edit sample).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from .._io import read_utf8
from .crows import CROWS_NAMES, load_crows
from .splits import SPLIT_BIAS_TYPES as BIAS_TYPES
from .splits import take_per_type
from .stereoset import StereoSetItem, load_stereoset, load_stereoset_file

STEREOSET_PREFIX = "stereoset:"


def load_edit_samples(
    spec: str, bias_types: Sequence[str] | None = None, limit: int | None = None
) -> list[StereoSetItem] | list[dict[str, Any]]:
    """The samples named by ``spec``, in file order.

    Args:
        spec: ``stereoset:SPLIT`` (bundled), a StereoSet-schema ``.json`` file, or a ``.jsonl`` file.
        bias_types: Keep only these bias types (StereoSet data, and ``.jsonl`` rows with a ``bias_type``).
            ``None``: gender, race and religion of a bundled split; every type a user's file has.
        limit: Keep only the first ``limit`` samples of each bias type (rows without one count as one type),
            as ``--limit`` means in every command.

    Raises:
        ValueError: ``spec`` is neither a StereoSet split nor an existing file, a ``.jsonl`` line is not JSON,
            or no sample is left.
    """
    if spec.startswith(STEREOSET_PREFIX):
        items = load_stereoset(spec[len(STEREOSET_PREFIX):], bias_types=bias_types or list(BIAS_TYPES))
    else:
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"{spec!r}: neither 'stereoset:SPLIT' nor an existing file")
        if path.suffix == ".csv":
            items = crows_edit_samples(path, bias_types)
        elif path.suffix == ".jsonl":
            items = _read_jsonl(path)
            if bias_types is not None:
                items = [row for row in items if row.get("bias_type", bias_types[0]) in bias_types]
        else:
            items = load_stereoset_file(path, bias_types=bias_types)
    items = take_per_type(items, limit)
    if not items:
        raise ValueError(f"{spec}: no samples")
    return items


def load_pooled_edit_samples(
    specs: Sequence[str], bias_types: Sequence[str] | None = None, limit: int | None = None
) -> list[StereoSetItem | dict[str, Any]]:
    """The samples of every spec in ``specs``, one after another (each as :func:`load_edit_samples` reads it,
    ``limit`` per spec): a calibration set pooled from several sources, e.g. ``stereoset:dev`` and
    ``stereoset:train-calib``.

    Raises:
        ValueError: ``specs`` is empty, or one spec is unreadable (the error names it).
    """
    if not specs:
        raise ValueError("no sample specs given")
    return [sample for spec in specs for sample in load_edit_samples(spec, bias_types, limit)]


def check_held_out(edited: Sequence[Any], held_out: Sequence[Any], what: str) -> None:
    """Refuse held-out pairs (a calibration set) that share a pair with the edited ones: the same stereotype and
    anti-stereotype sentences, whatever the files (``stereoset:train`` holds every ``train-calib`` pair).

    Raises:
        ValueError: Naming ``what``, how many pairs are shared and the first of them.
    """
    def pair(sample) -> tuple[str, str]:
        return (sample["stereotype"], sample["anti_stereotype"]) if isinstance(sample, dict) \
            else (sample.stereotype, sample.anti_stereotype)

    edited_pairs = {pair(sample) for sample in edited}
    shared = [pair(sample) for sample in held_out if pair(sample) in edited_pairs]
    if shared:
        raise ValueError(f"{what}: {len(shared)} of its {len(held_out)} pairs are also edited (first: "
                         f"{shared[0][0]!r}); calibrate on pairs the edit does not contain (e.g. --data "
                         "stereoset:train-fit with stereoset:train-calib)")


def require_unrelated(samples: Sequence[Any], what: str) -> None:
    """Raise ``ValueError`` naming ``what`` and the first rows (counted from 1) whose sample has no ``unrelated``
    sentence: meta-training's retention loss needs one per sample (a CrowS-Pairs file has none)."""
    def unrelated(sample: Any) -> Any:
        return sample.get("unrelated") if isinstance(sample, dict) else getattr(sample, "unrelated", None)

    missing = [number for number, sample in enumerate(samples, 1) if not unrelated(sample)]
    if missing:
        rows = ", ".join(map(str, missing[:5])) + (" ..." if len(missing) > 5 else "")
        raise ValueError(f"{what}: row(s) {rows} have no 'unrelated' sentence, which meta-training's retention loss "
                         "needs (a CrowS-Pairs file has none: use it with `biasedit debias` or `evaluate`)")


def pooled_spec(specs: Sequence[str]) -> str:
    """How a pooled set is named in records and cards: ``'stereoset:dev + stereoset:train-calib'``."""
    return " + ".join(specs)


def describe_edit_samples(spec: str, bias_types: Sequence[str] | None = None, limit: int | None = None) -> str:
    """``spec`` with the bias types (StereoSet data) and the limit it was read with, e.g. for a model card.

    Args:
        spec: As for :func:`load_edit_samples`.
        bias_types: The bias types it was read with (None: the default ones); named only for ``stereoset:`` specs.
        limit: The limit it was read with.
    """
    stereoset = spec.startswith(STEREOSET_PREFIX)
    bias_types = bias_types or (list(BIAS_TYPES) if stereoset else None)
    details = [f"bias types {', '.join(bias_types)}"] if bias_types and stereoset else []
    details += [f"first {limit} samples of each bias type"] if limit is not None else []
    return f"{spec} ({'; '.join(details)})" if details else spec


def crows_edit_samples(path: str | Path, bias_types: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """A CrowS-Pairs CSV (the bundled file's columns) as edit samples: ``sent_more`` (the more stereotypical
    sentence, whichever way the pair was written) is the stereotype, ``sent_less`` the anti-stereotype, the bias
    type in our names (``race-color`` -> ``race``); there is no unrelated sentence."""
    ours = {crows: name for name, crows in CROWS_NAMES.items()}
    return [{"stereotype": pair.sent_more, "anti_stereotype": pair.sent_less,
             "bias_type": ours.get(pair.bias_type, pair.bias_type)} for pair in load_crows(bias_types, path)]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``.jsonl`` pairs file, each checked: a JSON object with non-empty ``stereotype`` and
    ``anti_stereotype`` strings (and ``unrelated``, ``target``, ``bias_type`` strings when present).

    Raises:
        ValueError: Naming the file and the (1-based) line.
    """
    items = []
    for number, line in enumerate(read_utf8(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: line {number} is not JSON ({error})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}: line {number} is not a JSON object")
        for key in ("stereotype", "anti_stereotype"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise ValueError(f"{path}: line {number}: {key!r} must be a non-empty sentence, got {row.get(key)!r}")
        for key in ("unrelated", "target", "bias_type"):
            if row.get(key) is not None and not isinstance(row[key], str):
                raise ValueError(f"{path}: line {number}: {key!r} must be a string, got {row[key]!r}")
        items.append(row)
    return items

