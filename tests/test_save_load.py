"""Saving and loading BiasEdit adapters: safetensors, bitwise round trips, every peft / transformers loader."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

import biasedit_peft  # noqa: F401  (registers BIASEDIT)
from biasedit_peft import BiasEditConfig, edit_targets, get_deltas, set_deltas

from factories import tiny_model, token_ids

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def saved_base(tmp_path) -> Path:
    """A tiny GPT-2 saved to disk, so adapters record a real ``base_model_name_or_path``."""
    path = tmp_path / "base"
    tiny_model("gpt2").save_pretrained(path)
    return path


def make_adapter(base_path: Path, storage: str = "auto", seed: int = 0):
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_path).eval(),
                           BiasEditConfig(delta_storage=storage, editor_id="tests/editor"))
    generator = torch.Generator().manual_seed(seed)
    deltas = {}
    for i, (name, layer) in enumerate(edit_targets(model).items()):
        rows, cols = layer.weight_shape
        if i == 0:  # one factored delta, one dense, ...: both kinds must round-trip
            deltas[name] = (torch.randn(rows, 2, generator=generator) * 0.1, torch.randn(2, cols, generator=generator))
        else:
            deltas[name] = torch.randn(rows, cols, generator=generator) * 0.02
    set_deltas(model, deltas)
    return model


@pytest.mark.parametrize("storage", ["auto", "dense", "factored"])
def test_save_load_round_trip_is_bitwise(tmp_path, saved_base, storage):
    from transformers import AutoModelForCausalLM

    model = make_adapter(saved_base, storage)
    model.save_pretrained(tmp_path / "adapter")
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert tensors and all(t.dtype == torch.float32 for t in tensors.values())
    if storage != "dense":
        assert any(".biasedit_A" in k for k in tensors)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(saved_base).eval(), tmp_path / "adapter")
    for name, layer in edit_targets(model, "default").items():
        other = edit_targets(loaded)[name]
        assert layer.delta_rank("default") == other.delta_rank("default")
        for store in ("biasedit_delta", "biasedit_A", "biasedit_B"):
            if "default" in getattr(layer, store):
                assert torch.equal(getattr(layer, store)["default"], getattr(other, store)["default"])
    ids = token_ids()
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_loaded_adapter_is_frozen_unless_trainable(tmp_path, saved_base):
    from transformers import AutoModelForCausalLM

    make_adapter(saved_base).save_pretrained(tmp_path / "adapter")
    frozen = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(saved_base), tmp_path / "adapter")
    assert not any(p.requires_grad for p in frozen.parameters())
    trainable = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(saved_base), tmp_path / "adapter",
                                          is_trainable=True)
    names = [n for n, p in trainable.named_parameters() if p.requires_grad]
    assert names and all("biasedit_" in n for n in names)


def test_every_loader_reads_a_saved_adapter(tmp_path, saved_base):
    from transformers import AutoModelForCausalLM

    model = make_adapter(saved_base)
    model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "BIASEDIT" and config["editor_id"] == "tests/editor"
    assert config["base_model_name_or_path"] == str(saved_base)
    ids = token_ids()
    expected = model(ids).logits

    assert isinstance(PeftConfig.from_pretrained(tmp_path / "adapter"), BiasEditConfig)
    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    assert torch.equal(auto(ids).logits, expected)
    plain = AutoModelForCausalLM.from_pretrained(saved_base).eval()
    plain.load_adapter(str(tmp_path / "adapter"), adapter_name="debias")
    torch.testing.assert_close(plain(ids).logits, expected, atol=1e-6, rtol=0)


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)


def test_fresh_process_loads_identical_outputs(tmp_path, saved_base):
    model = make_adapter(saved_base)
    model.save_pretrained(tmp_path / "adapter")
    torch.save(model(token_ids()).logits, tmp_path / "expected.pt")
    torch.save(token_ids(), tmp_path / "ids.pt")
    result = run_python(f"""
        import torch, biasedit_peft
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        torch.set_num_threads({torch.get_num_threads()})  # a bitwise match needs the same reduction order
        base = AutoModelForCausalLM.from_pretrained({str(saved_base)!r}).eval()
        model = PeftModel.from_pretrained(base, {str(tmp_path / 'adapter')!r})
        ids = torch.load({str(tmp_path / 'ids.pt')!r})
        assert torch.equal(model(ids).logits, torch.load({str(tmp_path / 'expected.pt')!r}))
        print("IDENTICAL")
    """)
    assert "IDENTICAL" in result.stdout, result.stderr


def test_loading_without_import_fails_in_peft_and_the_documented_path_works(tmp_path, saved_base):
    make_adapter(saved_base).save_pretrained(tmp_path / "adapter")
    without = run_python(f"""
        from peft import PeftConfig
        PeftConfig.from_pretrained({str(tmp_path / 'adapter')!r})
    """)
    assert without.returncode != 0 and "BIASEDIT" in without.stderr
    documented = run_python(f"""
        import biasedit_peft
        from peft import PeftConfig
        print(type(PeftConfig.from_pretrained({str(tmp_path / 'adapter')!r})).__name__)
    """)
    assert documented.stdout.strip() == "BiasEditConfig", documented.stderr


def test_from_config_models_have_no_base_path_and_autopeft_says_so(tmp_path):
    with pytest.warns(UserWarning, match="AutoPeftModelForCausalLM cannot find its base"):
        model = get_peft_model(tiny_model(), BiasEditConfig())
    model.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] is None
    base = tiny_model()  # the documented fix: save the base, point name_or_path at it
    base.save_pretrained(tmp_path / "base")
    base.name_or_path = str(tmp_path / "base")
    fixed = get_peft_model(base, BiasEditConfig(init_weights=False))
    fixed.save_pretrained(tmp_path / "adapter2")
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter2").eval()
    assert torch.equal(loaded(token_ids()).logits, fixed(token_ids()).logits)


def test_loading_onto_a_different_shape_fails(tmp_path, saved_base):
    make_adapter(saved_base).save_pretrained(tmp_path / "adapter")
    wider = tiny_model("gpt2", n_embd=48)
    with pytest.raises(Exception, match="size|shape"):
        PeftModel.from_pretrained(wider, tmp_path / "adapter")


def test_get_deltas_of_loaded_adapter_match(tmp_path, saved_base):
    from transformers import AutoModelForCausalLM

    model = make_adapter(saved_base)
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(saved_base), tmp_path / "adapter")
    original, reloaded = get_deltas(model), get_deltas(loaded)
    assert original.keys() == reloaded.keys()
    assert all(torch.equal(original[n], reloaded[n]) for n in original)


def test_low_cpu_mem_usage_loading_is_bitwise(tmp_path, saved_base):
    """peft creates the deltas on the meta device first, then assigns the saved values."""
    from transformers import AutoModelForCausalLM

    model = make_adapter(saved_base)
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(saved_base).eval(), tmp_path / "adapter",
                                       low_cpu_mem_usage=True)
    original, reloaded = get_deltas(model), get_deltas(loaded)
    assert all(d.device.type == "cpu" and torch.equal(original[n], d) for n, d in reloaded.items())
    assert torch.equal(loaded(token_ids()).logits, model(token_ids()).logits)
