"""Exporting BiasEdit adapters as standard peft LoRA adapters (biasedit_peft.sharing.lora_export)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file

import biasedit_peft
from biasedit_peft import BiasEditConfig, get_deltas, set_deltas
from biasedit_peft.cli import main as cli_main
from biasedit_peft.models import load_model, load_model_and_tokenizer
from biasedit_peft.scoring import score_sentences
from biasedit_peft.sharing import export_lora
from biasedit_peft.sharing.lora_export import lora_factors_from_dense

from _tiny_models import SENTENCES, make_gpt2, make_llama, random_low_rank


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return make_gpt2(tmp_path_factory.mktemp("gpt2") / "model")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_llama(tmp_path_factory.mktemp("llama") / "model")


def biasedit_model(base_dir, rank: int, storage: str, seed: int):
    peft_model = get_peft_model(load_model(str(base_dir)), BiasEditConfig(num_edit_layers=2, delta_storage=storage))
    generator = torch.Generator().manual_seed(seed)
    deltas = {}
    for name, layer in biasedit_peft.edit_targets(peft_model).items():
        first, second = random_low_rank(layer.weight_shape, rank, 0.5, generator)
        deltas[name] = (first, second) if storage == "factored" else first @ second
    set_deltas(peft_model, deltas)
    return peft_model


def plain_peft_scores(base_dir, lora_dir, cwd) -> dict:
    """Scores of base + LoRA in a fresh process that never imports biasedit_peft."""
    script = textwrap.dedent(f"""
        import json, sys, torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer
        base = AutoModelForCausalLM.from_pretrained({str(base_dir)!r})
        model = PeftModel.from_pretrained(base, {str(lora_dir)!r}).eval()
        tok = AutoTokenizer.from_pretrained({str(base_dir)!r})
        totals = []
        for sentence in {SENTENCES!r}:
            x = torch.tensor([[tok.bos_token_id] + tok(sentence, add_special_tokens=False)["input_ids"]])
            with torch.no_grad():
                logp = model(input_ids=x).logits.log_softmax(-1)
            totals.append(float(logp[0, :-1].gather(-1, x[0, 1:, None]).sum()))
        config = model.peft_config["default"]
        print(json.dumps({{"scores": totals, "peft_type": str(config.peft_type.value),
                          "scaling": sorted({{float(m.scaling["default"]) for m in model.modules() if isinstance(getattr(m, "scaling", None), dict)}}),
                          "biasedit": any(m.startswith("biasedit_peft") for m in sys.modules)}}))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=cwd,
                            env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("storage", ["dense", "factored"])
def test_exact_export_loads_in_plain_peft_with_identical_scores(gpt2_dir, tmp_path, storage):
    peft_model = biasedit_model(gpt2_dir, rank=3, storage=storage, seed=1)
    _, tokenizer = load_model_and_tokenizer(str(gpt2_dir))
    expected = score_sentences(peft_model, tokenizer, SENTENCES).sum

    report = export_lora(peft_model, tmp_path / "lora")
    assert report.exact and report.relative_error == 0.0
    assert [(m.rank, m.delta_rank) for m in report.modules] == [(3, 3), (3, 3)]
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == 3
    assert config["fan_in_fan_out"] is True  # GPT-2 projections are Conv1D
    assert sorted(config["target_modules"]) == sorted(biasedit_peft.edit_targets(peft_model))
    weights = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    for name, delta in get_deltas(peft_model).items():
        lora_a = weights[f"base_model.model.{name}.lora_A.weight"]
        lora_b = weights[f"base_model.model.{name}.lora_B.weight"]
        assert lora_a.shape == (3, delta.shape[0]) and lora_b.shape == (delta.shape[1], 3)  # Conv1D: delta [in, out]
        torch.testing.assert_close(lora_b @ lora_a, delta.T, atol=1e-5, rtol=1e-5)

    answer = plain_peft_scores(gpt2_dir, tmp_path / "lora", tmp_path)
    assert answer["biasedit"] is False and answer["peft_type"] == "LORA" and answer["scaling"] == [1.0]
    torch.testing.assert_close(torch.tensor(answer["scores"]), expected, atol=1e-4, rtol=0)


def test_linear_layout_and_truncation_report_the_frobenius_error(llama_dir, tmp_path):
    peft_model = biasedit_model(llama_dir, rank=6, storage="dense", seed=2)
    deltas = get_deltas(peft_model)  # nn.Linear: [out, in]
    report = export_lora(peft_model, tmp_path / "lora", rank=2)
    assert not report.exact
    weights = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    total_dropped = total = 0.0
    for module in report.modules:
        delta = deltas[module.module]
        singular = torch.linalg.svdvals(delta.double())
        dropped, norm = float((singular[2:] ** 2).sum()), float((singular**2).sum())
        total_dropped, total = total_dropped + dropped, total + norm
        assert module.rank == 2 and module.delta_rank == 6
        assert module.relative_error == pytest.approx(math.sqrt(dropped / norm), rel=1e-6)
        approx = weights[f"base_model.model.{module.module}.lora_B.weight"] @ \
            weights[f"base_model.model.{module.module}.lora_A.weight"]
        # the residual of the best rank-2 approximation has exactly the dropped singular values
        torch.testing.assert_close(torch.linalg.svdvals((delta - approx).double())[:4], singular[2:6], atol=1e-4, rtol=1e-4)
    assert report.relative_error == pytest.approx(math.sqrt(total_dropped / total), rel=1e-6)
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is False and config["r"] == config["lora_alpha"] == 2

    exact = export_lora(peft_model, tmp_path / "exact")  # full rank: scores match in plain peft
    assert exact.exact and {m.rank for m in exact.modules} == {6}
    _, tokenizer = load_model_and_tokenizer(str(llama_dir))
    expected = score_sentences(peft_model, tokenizer, SENTENCES).sum
    answer = plain_peft_scores(llama_dir, tmp_path / "exact", tmp_path)
    torch.testing.assert_close(torch.tensor(answer["scores"]), expected, atol=1e-4, rtol=0)


def test_svd_factors_hand_computed_case():
    delta = torch.diag(torch.tensor([3.0, 4.0, 0.0]))  # rank 2, ||.||_F = 5
    full = lora_factors_from_dense(delta, rank=None)
    assert full.delta_rank == 2 and full.relative_error == 0.0
    torch.testing.assert_close(full.lora_B @ full.lora_A, delta)
    one = lora_factors_from_dense(delta, rank=1)
    assert one.relative_error == pytest.approx(3.0 / 5.0)  # keeps the 4, drops the 3
    torch.testing.assert_close(one.lora_B @ one.lora_A, torch.diag(torch.tensor([0.0, 4.0, 0.0])))


def test_cli_export_lora_with_rank_per_module_ranks(gpt2_dir, tmp_path, capsys):
    peft_model = biasedit_model(gpt2_dir, rank=3, storage="factored", seed=3)
    peft_model.save_pretrained(tmp_path / "adapter")
    code = cli_main(["export-lora", "--model", str(gpt2_dir), "--adapter", str(tmp_path / "adapter"),
                     "--out", str(tmp_path / "lora"), "--rank", "2"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "truncated" in printed and "rank 2 of 3" in printed
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["base_model_name_or_path"] == str(gpt2_dir)
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        export_lora(peft_model, tmp_path / "bad", rank=0)
