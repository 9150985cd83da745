"""Loading a BiasEdit adapter folder so that nothing about it is silently wrong.

``PeftModel.from_pretrained`` accepts a weights file that does not fit the model with only a ``UserWarning``
(renamed keys, a layer missing, factors where the config says dense after ``delta_ranks`` was removed), and
loads NaN or Inf deltas as they are; the evaluation then prints zeros and the merge writes a broken model. Every
command loads adapters through :func:`load_biasedit_adapter`, which first reads the weights file itself
(:func:`read_adapter_weights`: readable safetensors, every tensor finite, each error naming the file and the
tensor), then loads it with peft, then checks that the tensors the model received are exactly the file's
(:func:`check_loaded_keys`). Adapters of other PEFT types (a LoRA from ``biasedit export-lora``, say) are loaded by
:func:`load_adapter` with peft's own loader. Every adapter's ``adapter_config.json`` is read and checked first
(:func:`read_adapter_config`), and a local path that does not exist is refused before any Hub call.

Each file is read once by these checks (for a Hub id a read can be a round trip): a caller that has read the config
passes it on (``adapter_config=``), and the weights file's keys serve every check after the load. peft's own load
reads both files again.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch

from .._io import MANIFEST_NAME, read_json_object, verify_manifest
from ..models import hub_download, require_local_or_hub

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
BIASEDIT_PEFT_TYPE = "BIASEDIT"


class AdapterFileError(ValueError):
    """An adapter folder that must not be used (names the file, and the tensor or key)."""


def adapter_source(adapter: str | os.PathLike) -> str:
    """What peft should load for ``adapter``: a local folder (``~`` expanded) or a Hub id (``org/name``).

    Raises:
        ModelNotFoundError: Neither an existing path nor an ``org/name`` Hub id (nothing is fetched).
    """
    if require_local_or_hub(adapter, "--adapter", namespaced=True):
        return os.path.expanduser(str(adapter))
    return str(adapter)


def adapter_config_file(adapter: str | os.PathLike, **hub_kwargs) -> Path:
    """The ``adapter_config.json`` of a local adapter folder, or of a Hub repo (downloaded to the cache).

    Raises:
        AdapterFileError: A local folder (or file) without it.
        ModelNotFoundError: ``adapter`` is neither an existing path nor an ``org/name`` Hub id, or a Hub id whose
            file could not be fetched (:func:`~biasedit_peft.models.hub_download`).
    """
    source = adapter_source(adapter)
    if Path(source).exists():
        path = Path(source) / CONFIG_NAME
        if not path.is_file():
            raise AdapterFileError(f"{adapter} has no {CONFIG_NAME}: not a PEFT adapter folder")
        return path
    return hub_download(source, "--adapter", CONFIG_NAME, **hub_kwargs)


def known_peft_types() -> list[str]:
    """The ``peft_type`` values this peft (with BIASEDIT registered) can load."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    import biasedit_peft  # noqa: F401 - registers BIASEDIT with peft

    return sorted(str(getattr(name, "value", name)) for name in PEFT_TYPE_TO_CONFIG_MAPPING)


def read_adapter_config(adapter: str | os.PathLike, **hub_kwargs) -> dict:
    """The ``adapter_config.json`` of adapter folder (or Hub id) ``adapter``, checked before peft reads it.

    Returns:
        The JSON object; its ``peft_type`` is one peft knows.

    Raises:
        AdapterFileError: Naming the file: missing, not UTF-8 JSON, not an object, no ``peft_type`` or one that
            peft does not know.
        ModelNotFoundError: ``adapter`` is neither an existing path nor an ``org/name`` Hub id.
    """
    path = adapter_config_file(adapter, **hub_kwargs)
    document = read_json_object(path, AdapterFileError)
    if "peft_type" not in document:
        raise AdapterFileError(f"{path} has no 'peft_type' (e.g. \"BIASEDIT\" or \"LORA\"): not a PEFT adapter "
                               "config")
    known = known_peft_types()
    if document["peft_type"] not in known:
        examples = ", ".join(name for name in (BIASEDIT_PEFT_TYPE, "LORA", "IA3") if name in known)
        raise AdapterFileError(f"{path}: unknown peft_type {document['peft_type']!r}; this peft knows {len(known)} "
                               f"types, e.g. {examples}")
    return document


def load_adapter_config(adapter: str | os.PathLike, *, adapter_config: dict | None = None, **hub_kwargs):
    """The ``PeftConfig`` of adapter folder (or Hub id) ``adapter``, after :func:`read_adapter_config`.

    Args:
        adapter: The adapter folder or Hub id.
        adapter_config: Its ``adapter_config.json`` as :func:`read_adapter_config` returned it (not read again);
            None reads it.
        hub_kwargs: For the Hub download (``revision``, ...).

    Raises:
        AdapterFileError: As :func:`read_adapter_config`, or fields that the peft_type's config class refuses.
        ModelNotFoundError: As :func:`read_adapter_config`.
    """
    document = read_adapter_config(adapter, **hub_kwargs) if adapter_config is None else adapter_config
    try:
        return _peft_config(document)
    except (TypeError, ValueError, KeyError) as error:
        raise AdapterFileError(f"{adapter}/{CONFIG_NAME}: not a valid config of its peft_type: {error}") from None


def _peft_config(document: dict):
    """The ``PeftConfig`` of an ``adapter_config.json`` object, built from a copy of it as
    ``PeftConfig.from_pretrained`` builds one from the file (``check_kwargs``, then ``from_peft_type``; a
    ``runtime_config`` key is dropped, as peft drops it), without reading the file again. Used for its fields
    (the base model it was made for); peft's own load reads its own."""
    from peft import PeftConfig

    fields = {key: value for key, value in copy.deepcopy(document).items() if key != "runtime_config"}
    return PeftConfig.from_peft_type(**PeftConfig.check_kwargs(**fields))


def adapter_weights_file(adapter: str | os.PathLike, **hub_kwargs) -> Path:
    """The ``adapter_model.safetensors`` of a local adapter folder, or of a Hub repo (downloaded to the cache),
    checked against the folder's ``manifest.json`` when it has one (``_io.verify_manifest``).

    Raises:
        AdapterFileError: A local folder without the file, or a file whose sha256 is not the manifest's.
    """
    folder = Path(adapter)
    if folder.is_dir():
        path = folder / WEIGHTS_NAME
        if not path.is_file():
            raise AdapterFileError(f"{folder} has no {WEIGHTS_NAME}: not a saved BiasEdit adapter folder")
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import EntryNotFoundError

        path = hub_download(str(adapter), "--adapter", WEIGHTS_NAME, **hub_kwargs)
        try:
            hf_hub_download(str(adapter), MANIFEST_NAME, **hub_kwargs)  # beside it in the snapshot
        except EntryNotFoundError:
            pass  # pushed by other tools: nothing to verify against
    try:
        verify_manifest(path.parent, [WEIGHTS_NAME])
    except ValueError as error:
        raise AdapterFileError(str(error)) from None
    return path


def read_adapter_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of an adapter weights file, after checking that the file reads and each tensor is finite.

    Raises:
        AdapterFileError: The file is truncated or not safetensors, or a tensor holds NaN or Inf (named).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        raise AdapterFileError(f"{path}: not a readable safetensors file (truncated or corrupt?): {error}") from None
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise AdapterFileError(f"{path}: tensor {key!r} holds {bad} non-finite value(s) (NaN or Inf); "
                                   "refusing to load it")
    return tensors


def _without_adapter_name(key: str, adapter_name: str) -> str:
    """A model state key of adapter ``adapter_name`` (``...biasedit_A.NAME``) as peft saves it (``...biasedit_A``)."""
    return key.removesuffix(f".{adapter_name}")


def check_loaded_keys(peft_model, adapter_name: str, file_keys: set[str], path: str | os.PathLike) -> None:
    """The adapter's tensors in the model are exactly those of the file (same names), else nothing was silently
    dropped or left at its initial value.

    Raises:
        AdapterFileError: Naming the keys the file has that the model did not take, and the reverse.
    """
    from ..tuner.layout import DELTA_PARAMETER_NAMES

    model_keys = {_without_adapter_name(key, adapter_name) for key in peft_model.state_dict()
                  if key.endswith(f".{adapter_name}") and any(f".{name}." in key for name in DELTA_PARAMETER_NAMES)}
    refuse_other_keys(file_keys, model_keys, path)


def refuse_other_keys(file_keys: set[str], model_keys: set[str], path: str | os.PathLike) -> None:
    """Raise :class:`AdapterFileError` when an adapter file's tensor names differ from those the model holds for
    it (each side's extra names, the first four, are given)."""
    unexpected, missing = sorted(file_keys - model_keys), sorted(model_keys - file_keys)
    if unexpected or missing:
        details = []
        if unexpected:
            details.append(f"the model has no place for {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}")
        if missing:
            details.append(f"the file has nothing for {missing[:4]}{' ...' if len(missing) > 4 else ''}")
        raise AdapterFileError(f"{path} does not fit the model ({'; '.join(details)}): renamed keys, a missing "
                               "layer, or an adapter_config.json (delta_ranks, target_modules) that does not match "
                               "its weights")


def require_biasedit_adapter(adapter: str | os.PathLike, *, adapter_config: dict | None = None, **hub_kwargs) -> dict:
    """The checked ``adapter_config.json`` (:func:`read_adapter_config`) of a BiasEdit adapter; commands that only
    take BiasEdit adapters (``merge``, ``export-lora``) call it before loading the model.

    Args:
        adapter: The adapter folder or Hub id.
        adapter_config: Its ``adapter_config.json`` as :func:`read_adapter_config` returned it (only its type is
            checked); None reads it.
        hub_kwargs: For the Hub download (``revision``, ...).

    Raises:
        AdapterFileError: As :func:`read_adapter_config`, or another ``peft_type`` than BIASEDIT (named).
        ModelNotFoundError: As :func:`read_adapter_config`.
    """
    config = read_adapter_config(adapter, **hub_kwargs) if adapter_config is None else adapter_config
    if config["peft_type"] != BIASEDIT_PEFT_TYPE:
        raise AdapterFileError(f"{adapter} is a {config['peft_type']} adapter, not a BiasEdit adapter (peft_type "
                               f"{BIASEDIT_PEFT_TYPE})")
    return config


def load_biasedit_adapter(model, adapter: str | os.PathLike, adapter_name: str = "default", *,
                          adapter_config: dict | None = None, **hub_kwargs):
    """Load BiasEdit adapter folder (or Hub id) ``adapter`` onto ``model`` (a plain model or a ``PeftModel`` that
    gets another adapter) after :func:`read_adapter_config` and :func:`read_adapter_weights`, then
    :func:`check_loaded_keys`.

    Args:
        model: The model, or a ``PeftModel`` that gets one more adapter.
        adapter: The adapter folder or Hub id.
        adapter_name: Its name in the ``PeftModel``.
        adapter_config: Its ``adapter_config.json`` as :func:`read_adapter_config` returned it (not read again);
            None reads it.
        hub_kwargs: For the Hub downloads and peft's load (``revision``, ...).

    Returns:
        The ``PeftModel``.

    Raises:
        AdapterFileError: As above, or an adapter whose peft_type is not BIASEDIT (see :func:`load_adapter`).
        ModelNotFoundError: ``adapter`` is neither an existing path nor an ``org/name`` Hub id.
    """
    return load_biasedit_adapter_with_keys(model, adapter, adapter_name, adapter_config=adapter_config,
                                           **hub_kwargs)[0]


def load_biasedit_adapter_with_keys(model, adapter: str | os.PathLike, adapter_name: str = "default", *,
                                    adapter_config: dict | None = None, **hub_kwargs):
    """:func:`load_biasedit_adapter`, also giving the tensor names of the weights file it read, for later checks
    without a second read.

    Returns:
        ``(PeftModel, frozenset of the file's tensor names)``.
    """
    require_biasedit_adapter(adapter, adapter_config=adapter_config, **hub_kwargs)
    path = adapter_weights_file(adapter_source(adapter), **hub_kwargs)
    file_keys = frozenset(read_adapter_weights(path))
    peft_model = _peft_load(model, adapter, adapter_name, **hub_kwargs)
    check_loaded_keys(peft_model, adapter_name, file_keys, path)
    return peft_model, file_keys


def load_adapter(model, adapter: str | os.PathLike, adapter_name: str = "default", *,
                 adapter_config: dict | None = None, **hub_kwargs):
    """Load a PEFT adapter folder (or Hub id) of any type onto ``model``: a BiasEdit adapter with every check of
    :func:`load_biasedit_adapter`, another type (LoRA, ...) with peft's own loader, after
    :func:`read_adapter_config` checked its config, and then refused (:func:`refuse_other_keys`) unless the model
    took every tensor of the file and holds no other (peft drops the tensors of layers the model lacks).

    Args: as :func:`load_biasedit_adapter`.

    Returns:
        The ``PeftModel``.

    Raises:
        AdapterFileError: As :func:`read_adapter_config`, and for BiasEdit adapters :func:`load_biasedit_adapter`.
        ModelNotFoundError: ``adapter`` is neither an existing path nor an ``org/name`` Hub id.
    """
    document = read_adapter_config(adapter, **hub_kwargs) if adapter_config is None else adapter_config
    if document["peft_type"] == BIASEDIT_PEFT_TYPE:
        return load_biasedit_adapter(model, adapter, adapter_name, adapter_config=document, **hub_kwargs)
    from peft import get_peft_model_state_dict
    from peft.utils import load_peft_weights

    source = adapter_source(adapter)
    try:
        file_keys = set(load_peft_weights(source, **hub_kwargs))
        peft_model = _peft_load(model, adapter, adapter_name, **hub_kwargs)
    except (RuntimeError, KeyError, OSError) as error:  # shapes that do not fit, an unreadable weights file
        raise AdapterFileError(f"{adapter}: its weights do not load onto this model: "
                               f"{str(error).strip().splitlines()[0]}") from None
    refuse_other_keys(file_keys, set(get_peft_model_state_dict(peft_model, adapter_name=adapter_name)), adapter)
    return peft_model


def _peft_load(model, adapter: str | os.PathLike, adapter_name: str, **hub_kwargs):
    """``adapter`` loaded by peft onto ``model``: a new ``PeftModel``, or one more adapter of a ``PeftModel``
    (``hub_kwargs``, e.g. ``revision``, as for the files checked before)."""
    from peft import PeftModel

    import biasedit_peft  # noqa: F401 - registers BIASEDIT with peft

    source = adapter_source(adapter)
    if isinstance(model, PeftModel):
        model.load_adapter(source, adapter_name=adapter_name, **hub_kwargs)
        return model
    return PeftModel.from_pretrained(model, source, adapter_name=adapter_name, **hub_kwargs)
