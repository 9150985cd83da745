"""Loading a BiasEdit adapter folder so that nothing about it is silently wrong.

``PeftModel.from_pretrained`` accepts a weights file that does not fit the model with only a ``UserWarning``
(renamed keys, a layer missing, factors where the config says dense after ``delta_ranks`` was removed), and
loads NaN or Inf deltas as they are; the evaluation then prints zeros and the merge writes a broken model. Every
command loads adapters through :func:`load_biasedit_adapter`, which first reads the weights file itself
(:func:`read_adapter_weights`: readable safetensors, every tensor finite, each error naming the file and the
tensor), then loads it with peft, then checks that the tensors the model received are exactly the file's
(:func:`check_loaded_keys`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .._io import MANIFEST_NAME, verify_manifest

WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


class AdapterFileError(ValueError):
    """An adapter folder that must not be used (names the file, and the tensor or key)."""


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

        path = Path(hf_hub_download(str(adapter), WEIGHTS_NAME, **hub_kwargs))
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


def load_biasedit_adapter(model, adapter: str | os.PathLike, adapter_name: str = "default", **hub_kwargs):
    """Load adapter folder (or Hub id) ``adapter`` onto ``model`` (a plain model or a ``PeftModel`` that gets
    another adapter) after :func:`read_adapter_weights`, then :func:`check_loaded_keys`.

    Returns:
        The ``PeftModel``.

    Raises:
        AdapterFileError: As above.
    """
    from peft import PeftModel

    import biasedit_peft  # noqa: F401 - registers BIASEDIT with peft

    path = adapter_weights_file(adapter, **hub_kwargs)
    file_keys = set(read_adapter_weights(path))
    if isinstance(model, PeftModel):
        model.load_adapter(str(adapter), adapter_name=adapter_name)
        peft_model = model
    else:
        peft_model = PeftModel.from_pretrained(model, str(adapter), adapter_name=adapter_name)
    check_loaded_keys(peft_model, adapter_name, file_keys, path)
    return peft_model
