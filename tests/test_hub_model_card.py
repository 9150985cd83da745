"""Model cards for adapters and editors: metadata parses with huggingface_hub and holds the metrics."""

from __future__ import annotations

import torch
from huggingface_hub import ModelCard
from peft import get_peft_model

from biasedit_peft import BiasEditConfig, set_deltas
from biasedit_peft.models import load_model
from biasedit_peft.sharing import adapter_model_card, editor_model_card, flatten_metrics, metrics_table
from biasedit_peft.sharing.model_card import metric_rows

from factories import save_word_model

BEFORE = {"stereoset": {"gender": {"ss": 62.5, "lms": 90.0, "icat": 67.5, "n": 40}},
          "crows": {"gender": {"score": 58.0, "n": 30}}, "perplexity": 31.25}
AFTER = {"stereoset": {"gender": {"ss": 51.0, "lms": 89.0, "icat": 87.22, "n": 40}},
         "crows": {"gender": {"score": 52.0, "n": 30}}, "perplexity": 31.75}


def test_flatten_keeps_numbers_and_drops_counts():
    flat = flatten_metrics({**BEFORE, "note": "x", "ci": [1.0, 2.0], "bad": float("nan")})
    assert flat == {("stereoset", "gender", "ss"): 62.5, ("stereoset", "gender", "lms"): 90.0,
                    ("stereoset", "gender", "icat"): 67.5, ("crows", "gender", "score"): 58.0,
                    ("perplexity",): 31.25}


def test_metrics_table_has_before_after_and_change():
    table = metrics_table(metric_rows(BEFORE, AFTER))
    assert "| SS (gender) | 62.50 | 51.00 | -11.50 |" in table
    assert "| CrowS (gender) | 58.00 | 52.00 | -6.00 |" in table
    assert "| Perplexity | 31.25 | 31.75 | +0.50 |" in table


def test_adapter_card_metadata_and_body(tmp_path):
    model = load_model(str(save_word_model(tmp_path / "base")))
    peft_model = get_peft_model(model, BiasEditConfig(num_edit_layers=2, delta_storage="factored",
                                                      editor_id="org/editor", edit_data="stereoset:gender:test"))
    set_deltas(peft_model, {"transformer.h.2.mlp.c_proj": (torch.ones(64, 2), torch.ones(2, 16))})
    card = adapter_model_card(peft_model, repo_id="org/debiased", metrics_before=BEFORE, metrics_after=AFTER,
                              command=["biasedit", "debias", "--model", "gpt2", "--out", "my dir"])
    parsed = ModelCard(str(card))  # round trip through the text, as the Hub stores it
    data = parsed.data
    assert data.library_name == "peft"
    assert {"peft", "biasedit", "debiasing"} <= set(data.tags)
    assert data.base_model is None  # a local folder is not a Hub id
    results = {(r.dataset_type, r.dataset_config, r.metric_type): r.metric_value for r in data.eval_results}
    assert results[("stereoset", "gender", "ss")] == 51.0
    assert results[("stereoset", "gender", "ss_base")] == 62.5
    assert results[("crows_pairs", "gender", "score")] == 52.0
    assert results[("text", None, "perplexity")] == 31.75
    assert data.to_dict()["model-index"][0]["name"] == "org/debiased"
    text = parsed.text
    assert "biasedit debias --model gpt2 --out 'my dir'" in text
    assert "import biasedit_peft" in text and 'PeftModel.from_pretrained(base, "org/debiased")' in text
    assert "`transformer.h.2.mlp.c_proj` | Conv1D [in, out] 64×16 | factored, rank 2" in text
    assert "Editor: `org/editor`" in text and "stereoset:gender:test" in text


def test_editor_card_with_hub_base_model():
    card = editor_model_card(base_model="openai-community/gpt2", target_modules=["transformer.h.11.mlp.c_proj"],
                             repo_id="org/editor", training_data="stereoset", splits={"train": 1800, "dev": 200},
                             hyperparameters={"rank": 1920}, metrics_before=BEFORE, metrics_after=AFTER)
    data = ModelCard(str(card)).data
    assert data.base_model == "openai-community/gpt2"
    assert "biasedit-editor" in data.tags and data.library_name == "peft"
    assert {r.metric_type for r in data.eval_results} >= {"ss", "lms", "icat", "score", "perplexity"}
    assert "- train: `1800`" in card.text and "BiasEditor.from_pretrained(\"org/editor\")" in card.text


def test_card_without_metrics_says_so():
    card = editor_model_card(base_model=None, target_modules=[])
    assert "No evaluation was recorded" in card.text
    assert ModelCard(str(card)).data.eval_results is None
