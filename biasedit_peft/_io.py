"""Small file utilities that every writer of the package shares: :func:`atomic_write` (a file is replaced whole or
not at all, with the permissions a new file gets), one JSON writer, and the rules for output folders
(:func:`check_output_folder` before any compute, :func:`folder_in_place` to build one beside its final name and swap
it in whole, :func:`resumable_folder_in_place` for the commands that resume, whose unfinished run waits under a
hidden name beside the folder).

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
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

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


class InputFileError(ValueError):
    """A text file given as input that cannot be read: missing, a folder, or not UTF-8 (names the path)."""


def read_utf8(path: str | Path) -> str:
    """The text of ``path``.

    Raises:
        InputFileError: ``path`` does not exist, is a folder, or is not UTF-8 text; the message names it (not a bare
            ``FileNotFoundError`` / ``IsADirectoryError`` / ``UnicodeDecodeError`` traceback).
    """
    if Path(path).is_dir():  # checked first: Windows opens a folder with PermissionError
        raise InputFileError(f"{path}: is a folder, not a file")
    try:
        return Path(path).read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        raise InputFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputFileError(f"{path}: is a folder, not a file") from None
    except UnicodeDecodeError as error:
        raise InputFileError(f"{path}: not UTF-8 text (byte {error.start}); save it as UTF-8") from None


def read_json_object(path: str | Path, error: type[ValueError] = ValueError) -> dict:
    """The JSON object in UTF-8 file ``path``.

    Raises:
        error: ``path`` is not UTF-8 text, not valid JSON or not a JSON object, naming it (``error`` is a
            ``ValueError`` subclass of the caller's, e.g. ``AdapterFileError``).
    """
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise error(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as decode_error:
        raise error(f"{path}: not valid JSON ({decode_error})") from None
    if not isinstance(document, dict):
        raise error(f"{path}: expected a JSON object, got {type(document).__name__}")
    return document


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
    return 0o666 & ~_umask()


# ----- output folders ----------------------------------------------------------------------------------------
class OutputFolderError(ValueError):
    """An ``--out`` folder that must not be written (it names the folder and why)."""


def check_output_folder(out: str | Path, inputs: Sequence[str | Path | None] = (), overwrite: bool = False) -> Path:
    """Check, before any compute, that folder ``out`` may be (re)written.

    Refused: ``out`` is, or lies under, a file; its nearest existing parent is not writable; ``out`` is one of
    ``inputs`` or holds or lies inside one (local paths; Hub ids that are no local path are skipped); ``out`` is a
    folder that is not empty, unless ``overwrite``.

    Returns:
        ``out`` as a :class:`~pathlib.Path`.

    Raises:
        OutputFolderError: Saying which rule and which path.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"--out {out} is a file, not a folder")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputFolderError(f"--out {out} lies under {parent}, which is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputFolderError(f"--out {out}: {parent} is not writable")
    resolved = out.resolve()
    for given in inputs:
        if given is None or not Path(given).exists():
            continue
        source = Path(given).resolve()
        if resolved == source or source.is_relative_to(resolved) or resolved.is_relative_to(source):
            raise OutputFolderError(f"--out {out} is (or holds, or lies in) the input {given}; choose another folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputFolderError(f"--out {out} is not empty; pass --overwrite to replace it")
    return out


@contextmanager
def folder_in_place(out: str | Path) -> Iterator[Path]:
    """Build a folder under a temporary name beside ``out``, and put it in place of ``out`` when the block ends.

    A kill at any moment leaves ``out`` as it was (and a hidden ``.NAME.tmp-*`` beside it) or the complete new
    folder: the swap is one ``renameat2(RENAME_EXCHANGE)`` where Linux has it, else two renames. An exception in
    the block removes the temporary folder and leaves ``out`` untouched; what a kill left beside ``out`` is removed
    when the next build of ``out`` starts. Check ``out`` first
    (:func:`check_output_folder`).

    Yields:
        The temporary folder to write into.
    """
    out = Path(out)
    temporary = _fresh_temporary_folder(out)
    try:
        yield temporary
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    _swap_into_place(temporary, out)


# ----- resumable output folders (train-editor, demo, bench) -------------------------------------------------
RUN_FOLDER_SUFFIX = ".run"


def run_folder(out: str | Path) -> Path:
    """Where a resumable command builds ``out``: the hidden ``.NAME.run`` beside it, kept by a kill for
    ``--resume``."""
    out = Path(out)
    return out.parent / f".{out.name}{RUN_FOLDER_SUFFIX}"


def resume_source(out: str | Path) -> Path:
    """The folder ``--resume`` continues: the interrupted run beside ``out`` if there is one, else ``out`` (a
    finished run, extended)."""
    work = run_folder(out)
    return work if work.is_dir() else Path(out)


def check_resumable_output_folder(out: str | Path, inputs: Sequence[str | Path | None] = (), resume: bool = False,
                                  overwrite: bool = False) -> Path:
    """:func:`check_output_folder` for a command that resumes, before any compute.

    Also refused: ``resume`` with no run to continue (neither the run folder nor a non-empty ``out``); a fresh
    start (neither flag) while an interrupted run waits beside ``out``. Both messages name the flags.

    Raises:
        OutputFolderError: Saying which rule and which path.
    """
    if resume and overwrite:
        raise OutputFolderError("choose one of --resume and --overwrite")
    out = check_output_folder(out, inputs, overwrite=True)  # every rule but "not empty", checked below
    work = run_folder(out)
    holds_a_run = out.is_dir() and any(out.iterdir())
    if resume and not work.is_dir() and not holds_a_run:
        raise OutputFolderError(f"--resume: there is no run of --out {out} to continue (neither {out} nor {work})")
    if not (resume or overwrite):
        if work.exists():
            raise OutputFolderError(f"{work} holds an interrupted run of --out {out}; pass --resume to continue it "
                                    "or --overwrite to discard it")
        if holds_a_run:
            raise OutputFolderError(f"--out {out} is not empty (an earlier run?); pass --resume to continue it or "
                                    "--overwrite to replace it")
    return out


@contextmanager
def resumable_folder_in_place(out: str | Path, resume: bool = False) -> Iterator[Path]:
    """Build ``out`` in its run folder (:func:`run_folder`) and swap it in whole when the block ends.

    Unlike :func:`folder_in_place`, an exception or a kill keeps the run folder, for ``--resume``: ``out`` holds
    the old state or the complete new one, and the unfinished run lies under a hidden name that never looks like a
    result. ``resume`` continues the run folder, or else a copy of ``out`` (made under a temporary name and renamed,
    so a kill during the copy leaves no half run folder); without it the run folder starts empty. Check first with
    :func:`check_resumable_output_folder`.

    Yields:
        The run folder to write into.
    """
    out = Path(out)
    work = run_folder(out)
    if not (resume and work.is_dir()):
        staging = _fresh_temporary_folder(out)
        if resume and out.is_dir():
            shutil.copytree(out, staging, dirs_exist_ok=True)
        if work.exists():
            shutil.rmtree(work)
        os.rename(staging, work)
    yield work
    _swap_into_place(work, out)


def _fresh_temporary_folder(out: Path) -> Path:
    """An empty hidden ``.NAME.tmp-*`` beside ``out`` with a new folder's permissions, after removing what a killed
    earlier build left there (``.NAME.tmp-*``, ``.NAME.old-*``; never the run folder)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for leftover in [*out.parent.glob(f".{out.name}.tmp-*"), *out.parent.glob(f".{out.name}.old-*")]:
        shutil.rmtree(leftover, ignore_errors=True)
    temporary = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    os.chmod(temporary, 0o777 & ~_umask())
    return temporary


def _swap_into_place(temporary: Path, out: Path) -> None:
    """Put folder ``temporary`` in place of ``out`` in one step where the OS allows, and delete the old ``out``."""
    if out.exists():
        if not _exchange(temporary, out):
            aside = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            os.rmdir(aside)
            os.rename(out, aside)
            os.rename(temporary, out)
            temporary = aside
        shutil.rmtree(temporary, ignore_errors=True)  # the old folder, now under the temporary name
    else:
        os.rename(temporary, out)


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2`` with ``RENAME_EXCHANGE``); False where it is not available."""
    if sys.platform != "linux":
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange)
    return result == 0


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


# ----- manifests: each file's sha256 --------------------------------------------------------------------------
MANIFEST_NAME = "manifest.json"
UNHASHED = ("README.md", MANIFEST_NAME)
"""Files a manifest leaves out: the model card (edited on the Hub by hand) and the manifest itself."""


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file, hex."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: str | Path) -> Path:
    """``folder/manifest.json``: ``{file name: sha256}`` of every file in ``folder`` but :data:`UNHASHED`; written
    last, so a folder whose manifest exists is complete."""
    folder = Path(folder)
    hashes = {path.name: file_sha256(path) for path in sorted(folder.iterdir())
              if path.is_file() and path.name not in UNHASHED}
    (folder / MANIFEST_NAME).write_text(json.dumps(hashes, indent=2) + "\n", encoding="utf-8")
    return folder / MANIFEST_NAME


def verify_manifest(folder: str | Path, names: Sequence[str] | None = None) -> bool:
    """Check the files of ``folder`` (all those its manifest lists, or only ``names``) against their sha256.

    Returns:
        False when the folder has no manifest (made before manifests, or by other tools); True when all match.

    Raises:
        ValueError: A listed file is missing, or its sha256 differs (changed, corrupt, tampered with), named.
    """
    folder = Path(folder)
    manifest = folder / MANIFEST_NAME
    if not manifest.is_file():
        return False
    hashes = json.loads(read_utf8(manifest))
    for name in names if names is not None else list(hashes):
        if name not in hashes:
            raise ValueError(f"{folder}: {name} is not in its {MANIFEST_NAME}")
        path = folder / name
        if not path.is_file():
            raise ValueError(f"{folder}: {name} is missing (its {MANIFEST_NAME} lists it)")
        if file_sha256(path) != hashes[name]:
            raise ValueError(f"{folder}: {name} does not match its sha256 in {MANIFEST_NAME} (changed, corrupt or "
                             "tampered with since it was written)")
    return True
