"""Resumable long runs: what is finished is written to disk as soon as it is measured.

Nothing long is all-or-nothing. Two stores keep the finished parts of a run in a folder of small files,
each written atomically (a temporary file in the same folder, then ``os.replace``), so a killed run leaves
only whole pieces behind and a rerun with ``--resume`` does only what is missing.

:class:`ScoreStore` holds the per-sentence scores of one evaluation (``evaluate_model(..., store=...)``).
``biasedit evaluate --json FILE`` keeps it in ``FILE.partial/``, the demo in ``RUN/stages/NAME.partial/`` (``RUN``: its
hidden run folder ``.OUT.run`` beside ``OUT``)::

    fingerprint.json               {"format": 1, "fields": {name: value}}: what was scored, see below
    SECTION-00000.safetensors      piece 0 of SECTION ("stereoset", "crows", "perplexity"):
                                   index [C] long (sentence positions), sum / mean / mean_prob [C] float32,
                                   n_tokens [C] long

A section's sentences are put in the order ``score_sentences`` batches them in (by token length, stable)
and cut into pieces of a multiple of ``batch_size`` sentences, so every piece is scored in exactly the
batches (same sentences, same padded width) of one unchunked call: stored scores are bitwise those of
scoring everything at once.

The fingerprint names everything that decides the scores: ``model`` (name), ``adapter`` (name),
``weights`` (sha256 of the PEFT adapter's tensors; base weights are identified by the model name only),
``dtype``, ``device`` (its type), ``batch_size``, ``piece_size``, and per section ``SECTION sentences``
(count and sha256 of the sentence list). A demo's stores name the demo's own adapter and merged checkpoint
``OUT/adapter`` and ``OUT/merged`` (``ScoreStore(labels=...)``), so that a relative ``--out`` resumes from any
working directory. A store made with any other value is **refused**
(:class:`ResumeMismatch`, one line naming the fields); it is never silently reused nor silently thrown
away, and ``--overwrite`` starts again. Metrics are not stored: they are recomputed from the scores (cheap),
so ``mode``, ``n_resamples`` and ``seed`` may change between a run and its resume.

:class:`StageStore` holds the finished stages of ``biasedit demo`` in ``RUN/stages/`` (``OUT/stages/`` once the
demo has ended)::

    config.json     {"format": 1, "config": {...}}: the demo settings that decide its results
    NAME.json       {"result": <the stage's JSON-able result>, "seconds": float, "files": [paths under OUT]}
    NAME.partial/   the ScoreStore of an evaluation stage while it runs (removed when the stage is done)

A stage is finished when its ``NAME.json`` exists and every file it lists is still there. Stage files keep
non-finite floats as Python's ``NaN`` / ``Infinity`` tokens so that results round-trip exactly; the
documents meant for others (``biasedit evaluate --json``) are strict JSON (:func:`biasedit_peft._io.write_json`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from ._io import atomic_write, write_json
from .scoring import SCORE_FIELDS, SentenceLogProbs

FORMAT = 1
FINGERPRINT_NAME = "fingerprint.json"
STAGE_CONFIG_NAME = "config.json"
PARTIAL_SUFFIX = ".partial"
START_AGAIN = "pass --overwrite to start again"


class ResumeMismatch(ValueError):
    """A stored run was made with other inputs than the current one (the message names the fields)."""


class PreviousRunError(ValueError):
    """An output already holds a previous run and neither resume nor overwrite was asked for."""


# ----- JSON ----------------------------------------------------------------------------------------------
def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


# ----- fingerprints --------------------------------------------------------------------------------------
def sentences_digest(sentences: Sequence[str]) -> str:
    """``"N sentences, sha256 HEX16"`` of a list of strings (order and boundaries count)."""
    digest = hashlib.sha256()
    for sentence in sentences:
        data = sentence.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return f"{len(sentences)} sentences, sha256 {digest.hexdigest()[:16]}"


def tensors_digest(tensors: Mapping[str, Tensor]) -> str:
    """``"sha256 HEX16"`` of named tensors: names, dtypes, shapes and bytes (any dtype, any device)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return f"sha256 {digest.hexdigest()[:16]}"


class _Missing:
    def __repr__(self) -> str:
        return "(none)"


_MISSING = _Missing()


def _short(value: Any, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def check_fields(where: str, stored: Mapping[str, Any], current: Mapping[str, Any], every: bool = False) -> None:
    """Raise :class:`ResumeMismatch` (one line naming the fields) if a field of ``current`` is stored with
    another value; with ``every``, a field only one side has differs too."""
    names = list(current) + ([k for k in stored if k not in current] if every else [])
    differing = [k for k in names if (k in stored or every) and stored.get(k, _MISSING) != current.get(k, _MISSING)]
    if differing:
        details = "; ".join(f"{k}: stored {_short(stored.get(k, _MISSING))}, now {_short(current.get(k, _MISSING))}"
                            for k in differing)
        raise ResumeMismatch(f"{where} was made with a different {', '.join(differing)} ({details}); {START_AGAIN}")


def refuse_previous(what: str, resume: bool, overwrite: bool) -> None:
    """Raise :class:`PreviousRunError` for an existing ``what`` unless ``resume`` or ``overwrite``."""
    if not (resume or overwrite):
        raise PreviousRunError(f"{what}; pass --resume to continue it or --overwrite to start again")


def remove_path(path: Path) -> None:
    """Delete a file or a folder tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


# ----- sentence scores -----------------------------------------------------------------------------------
class ScoreStore:
    """Finished pieces of per-sentence scores under ``root`` (see the module docstring for the layout).

    The folder is created on the first write; :meth:`require` records and checks the fingerprint.
    """

    def __init__(self, root: str | Path, labels: Mapping[str, str] | None = None):
        """``labels``: fingerprint fields the store names itself, for what lies inside the run that owns it
        (a demo's ``OUT/adapter``), so the store does not depend on the working directory or where the run lies;
        see :meth:`require`."""
        self.root = Path(root)
        self.labels = dict(labels or {})

    def __repr__(self) -> str:
        return f"ScoreStore({str(self.root)!r})"

    @classmethod
    def beside(cls, output: str | Path) -> "ScoreStore":
        """The store of an output file: ``OUTPUT.partial/``."""
        return cls(Path(str(output) + PARTIAL_SUFFIX))

    def exists(self) -> bool:
        return self.root.is_dir() and any(self.root.iterdir())

    def remove(self) -> None:
        remove_path(self.root)

    @property
    def _fingerprint_path(self) -> Path:
        return self.root / FINGERPRINT_NAME

    def fields(self) -> dict[str, Any]:
        """The fingerprint recorded so far (empty for a new store)."""
        if not self._fingerprint_path.is_file():
            return {}
        return read_json(self._fingerprint_path)["fields"]

    def require(self, fields: Mapping[str, Any]) -> None:
        """Check ``fields`` against the recorded fingerprint (:class:`ResumeMismatch` on a difference),
        then record the new ones.

        A field the store labels itself (``labels``; a None value is kept) is recorded as its label instead; a
        store that recorded it as given (made before the label) matches when the value given now is the same, and
        records the label from then on."""
        stored = self.fields()
        labelled = {k: label for k, label in self.labels.items() if fields.get(k) is not None}
        current = {**fields, **labelled}
        as_given = {k: label for k, label in labelled.items() if stored.get(k) == fields[k]}
        check_fields(str(self.root), {**stored, **as_given}, current)
        if {**stored, **current} != stored:
            write_json(self._fingerprint_path, {"format": FORMAT, "fields": {**stored, **current}})

    def _piece_path(self, section: str, number: int) -> Path:
        return self.root / f"{section}-{number:05d}.safetensors"

    def load_scores(self, section: str, number: int, index: Tensor) -> SentenceLogProbs | None:
        """Stored scores [C] of piece ``number`` of ``section``, or None when it is not finished.

        ``index`` [C] long: the positions of the piece's sentences; a piece stored for other positions
        is refused.
        """
        from safetensors.torch import load_file

        path = self._piece_path(section, number)
        if not path.is_file():
            return None
        tensors = load_file(path)
        if not torch.equal(tensors["index"], index):
            raise ResumeMismatch(f"{path} holds other sentences than piece {number} of {section}; {START_AGAIN}")
        return SentenceLogProbs(*(tensors.get(name) for name in SCORE_FIELDS))

    def save_scores(self, section: str, number: int, index: Tensor, scores: SentenceLogProbs) -> None:
        """Write piece ``number`` of ``section``: scores [C] of the sentences at positions ``index`` [C]."""
        from safetensors.torch import save_file

        tensors = {name: getattr(scores, name).contiguous() for name in SCORE_FIELDS
                   if getattr(scores, name) is not None}
        tensors["index"] = index.contiguous()
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write(self._piece_path(section, number), lambda temporary: save_file(tensors, temporary))


# ----- demo stages ---------------------------------------------------------------------------------------
def _as_stored(config: Mapping[str, Any]) -> dict:
    """``config`` as JSON gives it back (tuples as lists)."""
    return json.loads(json.dumps(dict(config)))


class StageStore:
    """Finished stages of a run of ordered stages under ``root`` (see the module docstring).

    Stages finish in order, so :meth:`open` loads the longest run of finished stages from the start; the
    first unfinished stage and every later one run again (their leftovers are discarded first, except the
    running stage's own partial evaluation, which it resumes).
    """

    def __init__(self, root: str | Path, stages: Sequence[str]):
        self.root = Path(root)
        self.stages = tuple(stages)
        self._finished: dict[str, dict] = {}
        self._discarded = False

    def check(self, config: Mapping[str, Any]) -> None:
        """Raise :class:`ResumeMismatch` (naming the fields) if a stored config differs from ``config``."""
        path = self.root / STAGE_CONFIG_NAME
        if path.is_file():
            check_fields(str(path), read_json(path)["config"], _as_stored(config), every=True)

    def open(self, config: Mapping[str, Any], resume: bool) -> list[str]:
        """Check ``config`` against the stored one when resuming (:meth:`check`), record it, and return the
        names of the finished stages that will be loaded (none unless ``resume``)."""
        if resume:
            self.check(config)
        write_json(self.root / STAGE_CONFIG_NAME, {"format": FORMAT, "config": _as_stored(config)}, strict=False)
        self._finished = self._finished_prefix() if resume else {}
        return list(self._finished)

    def _finished_prefix(self) -> dict[str, dict]:
        finished = {}
        for name in self.stages:
            record = self._record_path(name)
            if not record.is_file():
                break
            stage = read_json(record)
            if not all((self.root.parent / f).exists() for f in stage.get("files", [])):
                break
            finished[name] = stage
        return finished

    def _record_path(self, name: str) -> Path:
        return self.root / f"{name}.json"

    def partial(self, name: str, labels: Mapping[str, str] | None = None) -> ScoreStore:
        """The score store of stage ``name``'s evaluation (``labels``: :class:`ScoreStore`'s)."""
        return ScoreStore(self.root / f"{name}{PARTIAL_SUFFIX}", labels)

    def finished(self, name: str) -> bool:
        """Did stage ``name`` finish in an earlier run (so it is loaded, not run)?"""
        return name in self._finished

    def result(self, name: str) -> Any:
        return self._finished[name]["result"]

    def seconds(self, name: str) -> float:
        return self._finished[name]["seconds"]

    def _discard_from(self, name: str) -> None:
        """Remove the records of ``name`` and later stages and the partial stores of later stages."""
        later = self.stages[self.stages.index(name):]
        for stage in later:
            remove_path(self._record_path(stage))
            if stage != name:
                self.partial(stage).remove()

    def save(self, name: str, result: Any, seconds: float, files: Iterable[str] = ()) -> None:
        """Record stage ``name`` as finished (``files``: paths relative to the output folder it made)."""
        write_json(self._record_path(name), {"result": result, "seconds": seconds, "files": sorted(files)},
                   strict=False, indent=1)
        self.partial(name).remove()

    def start(self, name: str) -> None:
        """Called before stage ``name`` runs: the first run stage discards what follows it."""
        if not self._discarded:
            self._discard_from(name)
            self._discarded = True


def files_under(out: Path, folders: Iterable[str]) -> list[str]:
    """Every file under ``out/FOLDER`` for each folder (or the file ``out/FOLDER``), relative to ``out``."""
    found: list[str] = []
    for folder in folders:
        path = out / folder
        paths = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        found += [str(p.relative_to(out)) for p in paths]
    return found


def run_stage(stages: StageStore, name: str, compute: Callable[[], Any], seconds: dict[str, float],
              files: Callable[[], Iterable[str]] = tuple) -> Any:
    """The result of stage ``name``: loaded when finished, else computed, timed and recorded.

    ``seconds[name]`` gets the stage's wall-clock time (the stored one for a loaded stage); ``files()``
    names what the stage wrote (checked to exist on a later resume).
    """
    if stages.finished(name):
        seconds[name] = stages.seconds(name)
        return stages.result(name)
    stages.start(name)
    start = time.perf_counter()
    try:
        result = compute()
    finally:
        seconds[name] = round(time.perf_counter() - start, 2)
    stages.save(name, result, seconds[name], files())
    return result
