"""Loading base models and tokenizers by name, including the bundled ``testbed``.

Every command takes ``--model``: a local folder, a Hub id, or ``testbed`` (the small, deliberately
biased GPT-2 shipped inside this package, see :mod:`biasedit_peft.testbed`).
"""

from __future__ import annotations

from pathlib import Path

import torch

TESTBED_NAME = "testbed"
TESTBED_PATH = Path(__file__).parent / "testbed" / "model"

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def resolve_model_path(name_or_path: str) -> str:
    """Map ``testbed`` to the bundled model folder; pass anything else through."""
    if name_or_path == TESTBED_NAME:
        if not (TESTBED_PATH / "config.json").is_file():
            raise FileNotFoundError(
                f"The bundled testbed model is missing from {TESTBED_PATH}; "
                "rebuild it with `python scripts/build_testbed.py` or reinstall biasedit-peft."
            )
        return str(TESTBED_PATH)
    return name_or_path


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """``"bf16"`` / ``"fp16"`` / ``"fp32"`` (or a torch dtype, or None) to a torch dtype."""
    if name is None or isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"Unknown dtype {name!r}; choose one of {sorted(set(DTYPES))}") from None


def default_device(requested: str | torch.device | None = None) -> str | torch.device:
    """``requested``, else ``cuda`` when available, else ``cpu``."""
    if requested:
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_tokenizer(name_or_path: str):
    """The tokenizer of a model, with a pad token set (the EOS token where the model has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
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
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if device is not None and device_map is None:
        model.to(device)
    model.eval()
    return model


def load_model_and_tokenizer(name_or_path: str, dtype=None, device=None, device_map=None):
    """``(model, tokenizer)`` for ``name_or_path`` (see :func:`load_model`)."""
    return load_model(name_or_path, dtype, device, device_map), load_tokenizer(name_or_path)
