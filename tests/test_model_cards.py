"""The editor folder's model card: what ``BiasEditor.save_pretrained`` writes, from the trainer and the CLI."""

from __future__ import annotations

import json

import pytest
from huggingface_hub import ModelCard

import biasedit_peft.editor.editor as editor_module
from biasedit_peft.cli import main
from biasedit_peft.editor import BiasEditor, BiasEditTrainer, BiasEditTrainingArguments

from factories import editor_tokenizer, peft_model, samples, tiny_model

RECORD = {"step": 7, "epoch": 1, "train_loss": 0.9, "eval_debias": 0.125, "eval_retention": 0.0625,
          "eval_loss": 0.375, "eval_ss_pre": 62.5, "eval_ss_post": 53.125, "eval_lms_pre": 90.0, "eval_lms_post": 88.5}


def card_of(folder) -> ModelCard:
    """The README as the Hub would parse it (YAML metadata + text)."""
    return ModelCard.load(folder / "README.md")


def test_save_pretrained_writes_the_rich_card_with_parseable_metadata(tmp_path):
    editor = BiasEditor.for_model(peft_model(), rank=4, n_blocks=1, loss="token", base_model="openai-community/gpt2")
    command = ["biasedit", "train-editor", "--model", "openai-community/gpt2", "--out", "my editor"]
    editor.save_pretrained(tmp_path / "ed", training_data="stereoset:train (bias types gender)",
                           eval_data="stereoset:dev", splits={"train": 12, "eval": 4}, command=command,
                           validation=RECORD, training_args={"n_edits": 4, "meta_lr": 0.01, "output_dir": "/x/y"})
    assert {p.name for p in (tmp_path / "ed").iterdir()} == {"config.json", "editor.safetensors", "README.md",
                                                             "manifest.json"}
    card = card_of(tmp_path / "ed")
    data = card.data
    assert data.library_name == "peft" and data.base_model == "openai-community/gpt2"
    assert {"peft", "biasedit", "debiasing", "model-editing", "biasedit-editor",
            "base_model:openai-community/gpt2"} <= set(data.tags)
    results = {(r.dataset_type, r.dataset_config, r.metric_type): r.metric_value for r in data.eval_results}
    assert results == {("stereoset", "dev", "ss"): 53.125, ("stereoset", "dev", "ss_base"): 62.5,
                       ("stereoset", "dev", "lms"): 88.5, ("stereoset", "dev", "lms_base"): 90.0}
    text = card.text
    assert "| `transformer.h.1.mlp.c_proj` | 24 | 16 |" in text
    assert "| `transformer.h.2.mlp.c_proj` | 24 | 16 |" in text
    assert "| `rank` | `4` |" in text and "| `n_blocks` | `1` |" in text and "| `loss` | `token` |" in text
    assert "| `n_edits` | `4` |" in text and "| `meta_lr` | `0.01` |" in text and "/x/y" not in text
    assert "- Training data: `stereoset:train (bias types gender)`" in text
    assert "- Validation data: `stereoset:dev`" in text
    assert "- train: `12`\n- eval: `4`" in text
    assert "Best validation at meta-step 7 (epoch 1)" in text
    assert "meta-loss 0.375 (debias 0.125, retention 0.0625)" in text
    assert "| SS (dev) | 62.50 | 53.12 | -9.38 |" in text
    assert "biasedit train-editor --model openai-community/gpt2 --out 'my editor'" in text
    assert "import biasedit_peft" in text and 'BiasEditor.from_pretrained("path/to/this/editor")' in text
    assert BiasEditor.from_pretrained(tmp_path / "ed").config.targets == editor.config.targets  # still loads


def test_one_card_generator_and_a_bare_editor_card(tmp_path):
    assert not hasattr(editor_module, "editor_card")  # the thin duplicate is gone
    editor = BiasEditor.for_model(peft_model(), rank=4)  # an in-memory model: no base model name
    editor.save_pretrained(tmp_path / "ed", repo_id="org/ed")
    card = card_of(tmp_path / "ed")
    assert card.data.base_model is None and card.data.eval_results is None
    assert not any(tag.startswith("base_model:") for tag in card.data.tags)
    assert "- Training data: `not recorded`" in card.text and "No evaluation was recorded" in card.text
    assert 'BiasEditor.from_pretrained("org/ed")' in card.text and "## Validation" not in card.text
    with pytest.raises(TypeError):
        editor.save_pretrained(tmp_path / "bad", no_such_field=1)
    assert not (tmp_path / "bad").exists()


def test_trainer_records_splits_settings_and_the_best_validation(tmp_path):
    model = peft_model()
    editor = BiasEditor.for_model(model, rank=8, lr=1e-2)
    args = BiasEditTrainingArguments(output_dir=str(tmp_path / "ed"), n_edits=4, batch_size=2, meta_lr=1e-2,
                                     loc_coef=1.0, epochs=3, progress=False, seed=0, early_stopping_patience=5)
    state = BiasEditTrainer(model, editor, args, samples(8), samples(4), tokenizer=editor_tokenizer()).train()
    (best,) = [record for record in state.history if record["step"] == state.best_step]  # the saved editor's
    card = card_of(tmp_path / "ed")
    assert "- train: `8`\n- eval: `4`" in card.text and "| `loc_coef` | `1.0` |" in card.text
    assert f"Best validation at meta-step {best['step']} (epoch {best['epoch']})" in card.text
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results["ss"] == round(best["eval_ss_post"], 4) and results["ss_base"] == round(best["eval_ss_pre"], 4)
    assert results["lms"] == round(best["eval_lms_post"], 4)


def test_cli_train_editor_card_has_the_data_and_the_command(tmp_path, capsys):
    folder = tmp_path / "model"
    tiny_model(size="editor").save_pretrained(folder)
    editor_tokenizer().save_pretrained(folder)
    code = main(["train-editor", "--model", str(folder), "--limit", "8", "--quiet", "--out", str(tmp_path / "ed"),
                 "--preset", "testbed", "--rank", "8", "--n-edits", "4", "--batch-size", "4", "--max-steps", "2",
                 "--eval-every", "2", "--num-edit-layers", "2"])
    assert code == 0, capsys.readouterr().err
    state = json.loads((tmp_path / "ed" / "checkpoint" / "trainer_state.json").read_text())["trainer"]
    card = card_of(tmp_path / "ed")
    text = card.text
    assert ("- Training data: `stereoset:train (bias types gender, race, religion; first 8 samples of each bias "
            "type)`") in text
    assert "- Validation data: `stereoset:dev`" in text and "- train: `24`\n- eval: `24`" in text  # 8 per type
    assert "biasedit train-editor --model" in text and "--max-steps 2" in text and "--eval-every 2" in text
    assert f"meta-step {state['history'][0]['step']}" in text
    assert card.data.base_model is None  # a local folder is not a Hub id
    assert {r.metric_type for r in card.data.eval_results} == {"ss", "ss_base", "lms", "lms_base"}


def test_cli_train_editor_calibrates_on_calibration_data_and_says_so(tmp_path, capsys):
    """``--calibration-data`` pools its specs into the calibration only: the run meta-trains on ``train-fit``
    (4 + 4 + 4 samples), validates on ``dev``, calibrates on ``dev`` + ``train-calib`` (24), and the card says so."""
    folder = tmp_path / "model"
    tiny_model(size="editor").save_pretrained(folder)
    editor_tokenizer().save_pretrained(folder)
    code = main(["train-editor", "--model", str(folder), "--limit", "4", "--quiet", "--out", str(tmp_path / "ed"),
                 "--preset", "testbed", "--rank", "8", "--n-edits", "4", "--batch-size", "4", "--max-steps", "2",
                 "--eval-every", "2", "--num-edit-layers", "2", "--train-data", "stereoset:train-fit",
                 "--calibration-data", "stereoset:dev", "stereoset:train-calib"])
    assert code == 0, capsys.readouterr().err
    text = card_of(tmp_path / "ed").text
    assert "- train: `12`\n- eval: `12`\n- calibration: `24`" in text
    assert "- Edit scale calibrated on: `stereoset:dev + stereoset:train-calib`" in text
    assert "--calibration-data stereoset:dev stereoset:train-calib" in text
