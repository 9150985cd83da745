"""`biasedit evaluate` end to end on a tiny GPT-2 saved to disk, and evaluate_model on a LoRA model."""

from __future__ import annotations

import json

import pytest

from biasedit_peft.cli import main
from biasedit_peft.data import load_stereoset
from biasedit_peft.evaluation import evaluate_model, format_table
from biasedit_peft.metrics import stereoset_paper, stereoset_reference
from biasedit_peft.scoring import score_sentences

from factories import save_sentence_model

LIMIT = 6


def corpus() -> list[str]:
    items = load_stereoset("test", ["gender", "religion"])[:40]
    return [s for item in items for s in (item.stereotype, item.anti_stereotype, item.unrelated)]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return save_sentence_model(tmp_path_factory.mktemp("tiny-gpt2"), corpus(), n_layer=2, n_positions=256)


def test_cli_writes_valid_json(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "result.json"
    code = main([
        "evaluate", "--model", str(tiny_model_dir), "--bias-types", "gender,race", "--limit", str(LIMIT),
        "--n-resamples", "50", "--json", str(out), "--device", "cpu", "--quiet",
    ])
    assert code == 0
    result = json.loads(out.read_text())
    assert set(result) >= {"stereoset", "crows", "perplexity", "model", "adapter", "mode"}
    assert result["model"] == str(tiny_model_dir) and result["adapter"] is None and result["mode"] == "reference"
    assert list(result["stereoset"]) == ["gender", "race", "overall"]
    assert list(result["crows"]) == ["race-color", "gender", "overall"]
    for entry in result["stereoset"].values():
        assert {"ss", "lms", "icat", "n", "n_targets", "noisy", "ss_ci", "lms_ci", "icat_ci"} <= set(entry)
        assert 0 <= entry["ss"] <= 100 and 0 <= entry["lms"] <= 100
        assert entry["icat"] == pytest.approx(entry["lms"] * min(entry["ss"], 100 - entry["ss"]) / 50)
    assert result["stereoset"]["gender"]["n"] == LIMIT and result["stereoset"]["overall"]["n"] == 2 * LIMIT
    assert result["crows"]["overall"]["n"] == 2 * LIMIT
    assert result["perplexity"] > 1
    printed = capsys.readouterr().out
    assert "StereoSet" in printed and "CrowS-Pairs" in printed


def test_cli_numbers_match_direct_scoring(tiny_model_dir, tmp_path):
    """The CLI's gender SS / LMS equal the metric recomputed from directly scored sentences."""
    out = tmp_path / "paper.json"
    assert main(["evaluate", "--model", str(tiny_model_dir), "--benchmark", "stereoset", "--bias-types", "gender",
                 "--limit", str(LIMIT), "--n-resamples", "0", "--json", str(out), "--quiet"]) == 0
    result = json.loads(out.read_text())["stereoset"]["gender"]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    items = load_stereoset("test", ["gender"])[:LIMIT]
    scores = [score_sentences(model, tokenizer, [i.sentence(r) for i in items]).mean
              for r in ("stereotype", "anti-stereotype", "unrelated")]
    expected = stereoset_reference(*scores, [i.target for i in items], n_resamples=0)
    assert result["ss"] == pytest.approx(expected["ss"]) and result["lms"] == pytest.approx(expected["lms"])


def test_evaluate_model_on_lora_peft_model_paper_mode(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    result = evaluate_model(model, tokenizer, bias_types=["religion"], mode="paper", limit=LIMIT,
                            progress=False, n_resamples=20, adapter="lora-test")
    assert result["mode"] == "paper" and result["adapter"] == "lora-test"
    assert result["model"] == str(tiny_model_dir)
    assert result["stereoset"]["religion"]["n"] == LIMIT
    assert result["crows"]["religion"]["n"] == LIMIT
    assert "religion" in format_table(result)
    # LoRA's B starts at 0, so the PEFT model scores as its base: the paper's SS / LMS of directly scored sentences
    items = load_stereoset("test", ["religion"])[:LIMIT]
    scores = [score_sentences(base, tokenizer, [i.sentence(r) for i in items])
              for r in ("stereotype", "anti-stereotype", "unrelated")]
    expected = stereoset_paper(scores[0].mean_prob, scores[1].mean_prob, *(s.mean for s in scores), n_resamples=0)
    for metric in ("ss", "lms", "icat"):
        assert result["stereoset"]["religion"][metric] == pytest.approx(float(expected[metric])), metric


def test_profession_only_gives_empty_crows(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    result = evaluate_model(model, tokenizer, bias_types=["profession"], limit=3, progress=False, n_resamples=0)
    assert result["crows"] == {} and result["stereoset"]["profession"]["n"] == 3


def test_cli_rejects_unknown_bias_type(tiny_model_dir, capsys):
    code = main(["evaluate", "--model", str(tiny_model_dir), "--bias-types", "weather", "--quiet"])
    assert code == 2
    assert "weather" in capsys.readouterr().err


def test_quiet_hides_third_party_progress_bars_and_peft_deprecation_noise(capsys):
    from transformers.utils import logging as transformers_logging

    from biasedit_peft.cli import main

    try:
        code = main(["evaluate", "--model", "testbed", "--benchmark", "stereoset", "--bias-types", "religion",
                     "--limit", "2", "--n-resamples", "0", "--quiet"])
        err = capsys.readouterr().err
    finally:
        transformers_logging.enable_progress_bar()
    assert code == 0
    assert "Loading weights" not in err and "is_gradient_checkpointing" not in err
