"""Each adapter's files are read once by our own checks (for a Hub id every read can be a round trip): its
``adapter_config.json`` once, its ``adapter_model.safetensors`` loaded once (keys and finiteness, and the module list
of ``merge``) and hashed once against its manifest, beside what peft's own load reads, in ``biasedit evaluate
--adapter`` and ``biasedit merge``."""

from __future__ import annotations

import builtins
import io
import os
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest
import safetensors.torch
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import biasedit_peft
from biasedit_peft import BiasEditConfig, set_deltas
from biasedit_peft._io import write_manifest
from biasedit_peft.cli import main
from biasedit_peft.models import load_model
from biasedit_peft.sharing.adapter_files import CONFIG_NAME, WEIGHTS_NAME, load_adapter_config, read_adapter_config

from factories import random_low_rank

FAST = ["--benchmark", "stereoset", "--bias-types", "gender", "--limit", "2", "--n-resamples", "0", "--quiet"]
CONFIG, LOADED, HASHED = "config opened", "weights loaded", "weights opened"
"""What :func:`counted_reads` counts per adapter folder: Python opens of ``adapter_config.json``, safetensors loads of
``adapter_model.safetensors`` (``safe_open``, which ``load_file`` uses, ours and peft's), Python opens of
``adapter_model.safetensors`` (the manifest's sha256)."""


def biasedit_adapter(folder: Path, seed: int) -> Path:
    """A BiasEdit adapter with rank-3 deltas on the testbed model, saved with a manifest as ``debias`` saves one."""
    peft_model = get_peft_model(load_model("testbed"), BiasEditConfig(num_edit_layers=2))
    generator = torch.Generator().manual_seed(seed)
    set_deltas(peft_model, {name: torch.matmul(*random_low_rank(layer.weight_shape, 3, 0.3, generator))
                            for name, layer in biasedit_peft.edit_targets(peft_model).items()})
    peft_model.save_pretrained(folder)
    write_manifest(folder)
    return folder


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    """Two BiasEdit adapters and a LoRA adapter of the testbed model."""
    root = tmp_path_factory.mktemp("adapters")
    torch.manual_seed(0)
    get_peft_model(load_model("testbed"), LoraConfig(r=2, target_modules=["c_fc"], fan_in_fan_out=True,
                                                     init_lora_weights=False)).save_pretrained(root / "lora")
    return {"first": biasedit_adapter(root / "first", 3), "second": biasedit_adapter(root / "second", 4),
            "lora": root / "lora"}


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "neutral.txt"
    path.write_text("The doctor read the chart before lunch.\n\nA small boat crossed the lake at dawn.\n",
                    encoding="utf-8")
    return path


@contextmanager
def counted_reads():
    """A ``Counter`` of ``(adapter folder, CONFIG | LOADED | HASHED)``, filled while the block runs."""
    counts: Counter = Counter()

    def note(file, kinds: dict[str, str]) -> None:
        if isinstance(file, (str, os.PathLike)) and Path(file).name in kinds:
            counts[Path(file).resolve().parent, kinds[Path(file).name]] += 1

    def counting_open(original):
        def opened(file, *args, **kwargs):
            note(file, {CONFIG_NAME: CONFIG, WEIGHTS_NAME: HASHED})
            return original(file, *args, **kwargs)
        return opened

    def counting_safe_open(filename, *args, **kwargs):
        note(filename, {WEIGHTS_NAME: LOADED})
        return safe_open(filename, *args, **kwargs)

    safe_open = safetensors.torch.safe_open
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(builtins, "open", counting_open(builtins.open))  # peft's reads
        patch.setattr(io, "open", counting_open(io.open))  # pathlib's (Path.read_text): ours
        patch.setattr(safetensors.torch, "safe_open", counting_safe_open)  # load_file: ours and peft's
        yield counts


def peft_own_reads(folders: list[Path]) -> Counter:
    """The reads of peft's own load of ``folders`` onto the testbed model (as ``adapter_0``, ``adapter_1``, ...), which
    our loaders leave to it."""
    model = load_model("testbed")
    with counted_reads() as counts:
        model = PeftModel.from_pretrained(model, str(folders[0]), adapter_name="adapter_0")
        for index, folder in enumerate(folders[1:], 1):
            model.load_adapter(str(folder), adapter_name=f"adapter_{index}")
    return counts


def our_reads(counts: Counter, folders: list[Path]) -> dict[str, dict[str, int]]:
    """``{folder name: {kind: reads beyond peft's own}}``."""
    peft = peft_own_reads(folders)
    return {folder.name: {kind: counts[folder.resolve(), kind] - peft[folder.resolve(), kind]
                          for kind in (CONFIG, LOADED, HASHED)} for folder in folders}


@pytest.mark.parametrize(("name", "hashed"), [("first", 1), ("lora", 0)])
def test_evaluate_reads_the_adapter_config_once_and_its_weights_once(adapters, text_file, tmp_path, name, hashed):
    """``evaluate --adapter``: the config checked before the model loads is the one the loader uses (it read it 3
    times for a BiasEdit adapter, twice for a LoRA); the weights are loaded once for our checks (the LoRA has no
    manifest to hash)."""
    with counted_reads() as counts:
        assert main(["evaluate", "--model", "testbed", "--adapter", str(adapters[name]), *FAST,
                     "--perplexity-text", str(text_file)]) == 0
    assert our_reads(counts, [adapters[name]]) == {name: {CONFIG: 1, LOADED: 1, HASHED: hashed}}


def test_merge_reads_each_adapter_config_once_and_its_weights_once(adapters, tmp_path):
    """``merge`` with two adapters: each config once (it was read 5 times: the pre-check, load_adapters' check,
    load_adapter_config twice, load_biasedit_adapter's check), each weights file loaded once for the checks and the
    module list together (it was loaded twice) and hashed once."""
    folders = [adapters["first"], adapters["second"]]
    with counted_reads() as counts:
        assert main(["merge", "--model", "testbed", *(f"--adapter={folder}" for folder in folders),
                     "--out", str(tmp_path / "merged")]) == 0
    assert our_reads(counts, folders) == {folder.name: {CONFIG: 1, LOADED: 1, HASHED: 1} for folder in folders}


def test_the_peft_config_of_a_read_config_is_the_one_peft_reads(adapters):
    """``load_adapter_config`` builds the ``PeftConfig`` from the checked document, as peft builds it from the file."""
    from peft import PeftConfig

    for folder in adapters.values():
        document = read_adapter_config(folder)
        with counted_reads() as counts:
            given = load_adapter_config(folder, adapter_config=document)
        assert not counts
        expected = PeftConfig.from_pretrained(str(folder))
        assert type(given) is type(expected) and given.to_dict() == expected.to_dict()
        assert load_adapter_config(folder).to_dict() == expected.to_dict()
        assert document == read_adapter_config(folder)  # not changed by the config built from it


def test_export_lora_reads_the_adapter_config_once_and_its_weights_once(adapters, tmp_path):
    """``export-lora``: the config checked before the model loads is the one ``load_adapters`` uses (it was read 5
    times), the weights loaded once for the checks (twice before)."""
    with counted_reads() as counts:
        assert main(["export-lora", "--model", "testbed", "--adapter", str(adapters["first"]),
                     "--out", str(tmp_path / "lora")]) == 0
    assert our_reads(counts, [adapters["first"]]) == {"first": {CONFIG: 1, LOADED: 1, HASHED: 1}}
