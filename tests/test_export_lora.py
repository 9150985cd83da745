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

from factories import SENTENCES, random_low_rank, save_sentence_model, save_word_model


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return save_word_model(tmp_path_factory.mktemp("gpt2") / "model")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_word_model(tmp_path_factory.mktemp("llama") / "model", "llama")


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
                          "scaling": sorted({{float(m.scaling["default"]) for m in model.modules()
                                              if isinstance(getattr(m, "scaling", None), dict)}}),
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
        torch.testing.assert_close(torch.linalg.svdvals((delta - approx).double())[:4], singular[2:6], atol=1e-4,
                                   rtol=1e-4)
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


# ----- how much of the SS change survives ----------------------------------------------------------------------
SS_TYPES, SS_LIMIT = ["gender", "race"], 20


@pytest.fixture(scope="module")
def stereoset_gpt2_dir(tmp_path_factory):
    """A random GPT-2 whose word-level vocabulary covers the StereoSet items scored below (so SS is not all ties)."""
    from biasedit_peft.data import load_stereoset

    items = [item for bias_type in SS_TYPES for item in load_stereoset("test", [bias_type])[:SS_LIMIT]]
    sentences = [s for i in items for s in (i.stereotype, i.anti_stereotype, i.unrelated)]
    folder = tmp_path_factory.mktemp("stereoset-gpt2") / "model"
    return save_sentence_model(folder, sentences, n_layer=2, n_embd=16, n_positions=128)


def independent_ss(model, tokenizer) -> dict[str, float]:
    """SS per bias type through the public evaluation API, on whatever model we are handed."""
    from biasedit_peft.evaluation import evaluate_model

    result = evaluate_model(model, tokenizer, benchmarks=("stereoset",), bias_types=SS_TYPES, limit=SS_LIMIT,
                            n_resamples=0, progress=False)
    return {bias_type: entry["ss"] for bias_type, entry in result["stereoset"].items()}


def plain_lora_ss(base_dir, lora_dir, tokenizer) -> dict[str, float]:
    """SS of the base model with the exported LoRA loaded by plain peft (LoRA layers, not BiasEdit ones)."""
    from peft import PeftModel

    lora_model = PeftModel.from_pretrained(load_model(str(base_dir)), str(lora_dir)).eval()
    assert str(lora_model.peft_config["default"].peft_type.value) == "LORA"
    return independent_ss(lora_model, tokenizer)


def test_ss_survival_is_one_when_exact_and_matches_independent_scores_when_truncated(stereoset_gpt2_dir, tmp_path):
    peft_model = biasedit_model(stereoset_gpt2_dir, rank=4, storage="factored", seed=3)
    _, tokenizer = load_model_and_tokenizer(str(stereoset_gpt2_dir))
    options = dict(measure_ss=True, bias_types=SS_TYPES, limit=SS_LIMIT)

    exact = export_lora(peft_model, tmp_path / "exact", **options)
    assert exact.exact and exact.ss_skipped is None
    assert [r.bias_type for r in exact.ss_survival.rows] == ["gender", "race", "overall"]
    for row in exact.ss_survival.rows:
        assert row.ss_lora == pytest.approx(row.ss_adapter, abs=1e-9)
        assert row.ss_adapter != row.ss_base and row.survival == pytest.approx(1.0, abs=1e-9)

    truncated = export_lora(peft_model, tmp_path / "rank1", rank=1, **options)
    assert not truncated.exact
    base = independent_ss(load_model(str(stereoset_gpt2_dir)), tokenizer)  # no peft at all
    adapter = independent_ss(peft_model, tokenizer)
    lora = plain_lora_ss(stereoset_gpt2_dir, tmp_path / "rank1", tokenizer)
    for row in truncated.ss_survival.rows:
        kind = row.bias_type
        assert (row.ss_base, row.ss_adapter, row.ss_lora) == pytest.approx((base[kind], adapter[kind], lora[kind]))
        expected = (lora[kind] - base[kind]) / (adapter[kind] - base[kind])
        assert row.survival == pytest.approx(expected, rel=1e-9)
    # a rank-1 truncation of these rank-4 deltas loses part of the change: not the exact export's 1.0
    assert truncated.ss_survival.row("gender").survival != pytest.approx(1.0, abs=0.05)
    assert truncated.ss_survival.row("race").survival != pytest.approx(1.0, abs=0.05)

    saved = json.loads((tmp_path / "rank1" / "lora_export_report.json").read_text())
    assert saved["ss_survival"]["bias_types"]["race"]["survival"] == pytest.approx(
        truncated.ss_survival.row("race").survival)
    assert saved["ss_survival"]["limit"] == SS_LIMIT and saved["ss_survival"]["split"] == "test"
    assert "SS survival on StereoSet (test split" in truncated.to_text()


def test_survival_formula_and_undefined_case():
    from biasedit_peft.sharing.lora_export import SSSurvival, SSSurvivalRow

    half = SSSurvivalRow("gender", 10, ss_base=60.0, ss_adapter=50.0, ss_lora=55.0)
    unchanged = SSSurvivalRow("race", 10, ss_base=60.0, ss_adapter=60.0, ss_lora=58.0)
    assert half.survival == pytest.approx(0.5) and unchanged.survival is None
    survival = SSSurvival([half, unchanged], split="test", mode="reference", limit=None)
    assert json.loads(json.dumps(survival.to_dict()))["bias_types"]["race"]["survival"] is None
    text = survival.to_text()
    assert "0.500" in text and "n/a" in text and "did not change SS" in text


def test_cli_measure_ss_with_json_and_the_refused_or_skipped_cases(stereoset_gpt2_dir, gpt2_dir, tmp_path, capsys):
    _, tokenizer = load_model_and_tokenizer(str(stereoset_gpt2_dir))
    biasedit_model(stereoset_gpt2_dir, rank=4, storage="factored", seed=3).save_pretrained(tmp_path / "adapter")
    code = cli_main(["export-lora", "--model", str(stereoset_gpt2_dir), "--adapter", str(tmp_path / "adapter"),
                     "--out", str(tmp_path / "lora"), "--rank", "1", "--measure-ss", "--bias-types", "gender,race",
                     "--limit", str(SS_LIMIT), "--json", str(tmp_path / "report.json"), "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "SS survival on StereoSet (test split, reference mode, first 20 items per bias type)" in printed
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["ss_skipped"] is None and not report["exact"]
    rows = report["ss_survival"]["bias_types"]
    assert list(rows) == ["gender", "race", "overall"] and rows["gender"]["n"] == SS_LIMIT
    base = independent_ss(load_model(str(stereoset_gpt2_dir)), tokenizer)
    lora = plain_lora_ss(stereoset_gpt2_dir, tmp_path / "lora", tokenizer)
    for kind, row in rows.items():
        assert row["ss_base"] == pytest.approx(base[kind]) and row["ss_lora"] == pytest.approx(lora[kind])
        change = row["ss_adapter"] - row["ss_base"]
        assert row["survival"] == pytest.approx((row["ss_lora"] - row["ss_base"]) / change)
        assert f"{row['survival']:.3f}" in printed

    # no --measure-ss: said so; --measure-ss on a base folder without a tokenizer: refused saying why, nothing
    # written; in Python the export still happens and the report says why
    biasedit_model(gpt2_dir, rank=3, storage="factored", seed=4).save_pretrained(tmp_path / "adapter2")
    assert cli_main(["export-lora", "--model", str(gpt2_dir), "--adapter", str(tmp_path / "adapter2"),
                     "--out", str(tmp_path / "lora2"), "--json", str(tmp_path / "r2.json")]) == 0
    assert "SS survival not measured: not requested" in capsys.readouterr().out
    assert json.loads((tmp_path / "r2.json").read_text())["ss_survival"] is None
    no_tokenizer = tmp_path / "bare"
    load_model(str(gpt2_dir)).save_pretrained(no_tokenizer)
    assert cli_main(["export-lora", "--model", str(no_tokenizer), "--adapter", str(tmp_path / "adapter2"),
                     "--out", str(tmp_path / "lora3"), "--measure-ss", "--json", str(tmp_path / "r3.json")]) == 2
    assert "SS survival could not be measured: no tokenizer could be loaded" in capsys.readouterr().err
    assert not (tmp_path / "lora3").exists() and not (tmp_path / "r3.json").exists()
    assert not any(p.name.startswith(".lora3") for p in tmp_path.iterdir())  # no temporary folder left
    skipped = export_lora((str(no_tokenizer), str(tmp_path / "adapter2")), tmp_path / "lora4", measure_ss=True)
    assert skipped.ss_survival is None and str(no_tokenizer) in skipped.ss_skipped
    assert (tmp_path / "lora4" / "adapter_model.safetensors").is_file()


def test_ss_options_without_measure_ss_or_misspelt_are_refused_before_writing(gpt2_dir, tmp_path):
    peft_model = biasedit_model(gpt2_dir, rank=2, storage="factored", seed=5)
    with pytest.raises(TypeError, match="without measure_ss"):
        export_lora(peft_model, tmp_path / "a", limit=5)
    with pytest.raises(TypeError, match="bias_type"):
        export_lora(peft_model, tmp_path / "b", measure_ss=True, bias_type=["gender"])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
