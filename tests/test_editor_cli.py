"""``biasedit train-editor`` then ``biasedit debias`` end to end on a tiny saved model."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

import biasedit_peft  # noqa: F401  (registers BIASEDIT)
from biasedit_peft.cli import main
from biasedit_peft.editor import BiasEditor
from biasedit_peft.editor.joint import pooled_statistics, recipe_solutions
from biasedit_peft.tuner.deltas import get_deltas
from biasedit_peft.workflows.deployment import JOINT_RECIPES, deployable_adapter

from factories import editor_tokenizer, peft_model, samples, saved_editor_with_unit_statistics, tiny_model


def _saved_model(tmp_path, **config):
    folder = tmp_path / "model"
    tiny_model(size="editor", **config).save_pretrained(folder)
    editor_tokenizer().save_pretrained(folder)
    return folder


def test_train_editor_then_debias_then_load_adapter(tmp_path, capsys):
    model_dir = _saved_model(tmp_path)
    editor_dir, adapter_dir = tmp_path / "editor", tmp_path / "adapter"
    common = ["--model", str(model_dir), "--limit", "8", "--quiet"]
    # meta-trained on pairs in the tokenizer's words: StereoSet's sentences are mostly [UNK] to it, so their
    # stereotype and anti-stereotype read alike and give the editor no debias signal at all
    train_pairs = tmp_path / "train_pairs.jsonl"
    train_pairs.write_text("".join(json.dumps({"stereotype": s.stereotype, "anti_stereotype": s.anti_stereotype,
                                               "unrelated": s.unrelated}) + "\n" for s in samples(8)))
    code = main(["train-editor", *common, "--out", str(editor_dir), "--preset", "testbed", "--rank", "8",
                 "--n-edits", "4", "--batch-size", "4", "--max-steps", "3", "--eval-every", "2",
                 "--num-edit-layers", "2", "--step-size-meta-lr", "1e-4", "--train-data", str(train_pairs)])
    assert code == 0, capsys.readouterr().err
    assert (editor_dir / "checkpoint" / "trainer_state.json").is_file()
    saved = json.loads((editor_dir / "checkpoint" / "trainer_state.json").read_text())
    state = saved["trainer"]
    assert state["global_step"] == 3
    assert saved["args"]["step_size_meta_lr"] == 1e-4 and saved["optimizer"]["param_groups"][1]["lr"] == 1e-4
    assert "| `step_size_meta_lr` | `0.0001` |" in (editor_dir / "README.md").read_text()
    editor = BiasEditor.from_pretrained(editor_dir)
    assert list(editor.config.targets) == ["transformer.h.1.mlp.c_proj", "transformer.h.2.mlp.c_proj"]

    code = main(["debias", *common, "--editor", str(editor_dir), "--out", str(adapter_dir)])
    assert code == 0, capsys.readouterr().err
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    loaded = PeftModel.from_pretrained(base, adapter_dir)
    deltas = get_deltas(loaded)
    assert set(deltas) == set(editor.config.targets) and all(d.abs().sum() > 0 for d in deltas.values())
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["edit_data"] == "stereoset:train" and config["edit_info"]["n_samples"] == 24  # 8 per type
    assert config["edit_info"]["calibrated_on"] == "stereoset:dev" and config["edit_info"]["scale"] > 0
    assert config["edit_info"]["guard_text"] == "bundled"
    assert "as stereoset:dev says" in capsys.readouterr().out

    # a user's own pairs (JSONL, no unrelated sentence), the editor's own scale: the plain joint delta
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"stereotype": f"{g} is a nurse .", "anti_stereotype": f"{g} is a pilot ."})
                             + "\n" for g in ("he", "she", "men")))
    own = tmp_path / "own"
    assert main(["debias", "--model", str(model_dir), "--editor", str(editor_dir), "--data", str(pairs),
                 "--calibrate-on", "none", "--out", str(own), "--quiet"]) == 0
    config = json.loads((own / "adapter_config.json").read_text())
    assert config["edit_info"]["scale"] == 1.0 and config["edit_info"]["calibrated_on"] is None
    assert config["edit_info"]["guard_text"] is None
    written = get_deltas(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), own))
    reference = peft_model(num_edit_layers=2)
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    statistics, _ = pooled_statistics(editor, reference, editor_tokenizer(), rows, 16)
    layers = editor.check_compatible(reference)
    for name, solution in recipe_solutions(statistics, JOINT_RECIPES[0]).items():  # the default recipe, unscaled
        expected = solution.delta.dense() if layers[name].fan_in_fan_out else solution.delta.dense().T
        torch.testing.assert_close(written[name], expected, rtol=1e-4, atol=1e-7)


def test_debias_calibrates_on_every_calibrate_on_spec_pooled_in_order(tmp_path, capsys, monkeypatch):
    """``--calibrate-on A B``: the calibration receives A's samples then B's (as each reads alone), the adapter
    records 'A + B'; 'none' cannot be pooled."""
    import biasedit_peft.workflows.deployment as deployment
    from biasedit_peft.data import load_edit_samples, load_guard_text

    model_dir = _saved_model(tmp_path)
    saved_editor_with_unit_statistics(peft_model(num_edit_layers=1), tmp_path / "editor")
    given, guards = [], []
    real = deployment.deployable_adapter

    def recording(editor, peft_model, tokenizer, samples, calibration, **kwargs):
        given.append(calibration)
        guards.append(kwargs["guard_text"])
        return real(editor, peft_model, tokenizer, samples, calibration, **kwargs, scales=(1.0,))

    monkeypatch.setattr(deployment, "deployable_adapter", recording)
    base = ["debias", "--model", str(model_dir), "--editor", str(tmp_path / "editor"), "--limit", "2",
            "--bias-types", "religion", "--quiet"]
    out = tmp_path / "adapter"
    assert main([*base, "--calibrate-on", "stereoset:dev", "--calibrate-on", "stereoset:train-calib", "--out",
                 str(out)]) == 0, capsys.readouterr().err  # a repeated flag pools too
    dev, calib = (load_edit_samples(f"stereoset:{split}", ["religion"]) for split in ("dev", "train-calib"))
    assert len(dev) == 22 and len(calib) == 27
    assert [item.id for item in given[0]] == [item.id for item in dev + calib]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["edit_info"]["calibrated_on"] == "stereoset:dev + stereoset:train-calib"
    assert "as stereoset:dev + stereoset:train-calib says" in capsys.readouterr().out
    assert guards == [load_guard_text()] and config["edit_info"]["guard_text"] == "bundled"
    own_text = tmp_path / "guard.txt"
    own_text.write_text("The first paragraph .\n\nThe second\nparagraph .\n", encoding="utf-8")
    assert main([*base, "--guard-text", str(own_text), "--out", str(tmp_path / "guarded")]) == 0
    assert guards[-1] == ["The first paragraph .", "The second paragraph ."]
    config = json.loads((tmp_path / "guarded" / "adapter_config.json").read_text())
    assert config["edit_info"]["guard_text"] == str(own_text)
    assert main([*base, "--guard-text", "none", "--out", str(tmp_path / "unguarded")]) == 0 and guards[-1] == []
    code = main([*base, "--calibrate-on", "none", "--guard-text", str(own_text), "--out", str(tmp_path / "other")])
    assert code == 2 and "--guard-text" in capsys.readouterr().err and not (tmp_path / "other").exists()
    assert main([*base, "--calibrate-on", "none", "--guard-text", "none", "--out", str(tmp_path / "plain")]) == 0
    code = main([*base, "--guard-text", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "other")])
    assert code == 2 and "missing.txt" in capsys.readouterr().err and not (tmp_path / "other").exists()
    code = main([*base, "--calibrate-on", "none", "stereoset:dev", "--out", str(tmp_path / "other")])
    assert code == 2 and "'none'" in capsys.readouterr().err and not (tmp_path / "other").exists()
    # stereoset:train holds every train-calib pair: calibrating on edited pairs is refused, before any model loads
    code = main(["debias", "--model", str(tmp_path / "no-model"), "--editor", str(tmp_path / "editor"),
                 "--bias-types", "religion", "--data", "stereoset:train", "--calibrate-on", "stereoset:train-calib",
                 "--out", str(tmp_path / "other"), "--quiet"])
    assert code == 2 and "--calibrate-on stereoset:train-calib: 27 of its 27 pairs are also edited" in \
        capsys.readouterr().err
    code = main(["train-editor", "--model", str(tmp_path / "no-model"), "--bias-types", "religion",
                 "--calibration-data", "stereoset:dev", "stereoset:train-calib", "--out", str(tmp_path / "other")])
    assert code == 2 and "--calibration-data stereoset:dev + stereoset:train-calib: 27 of its 49 pairs" in \
        capsys.readouterr().err and not (tmp_path / "other").exists()


def test_debias_reports_a_mismatched_editor(tmp_path, capsys):
    model_dir = _saved_model(tmp_path)
    editor = BiasEditor.for_model(peft_model(num_edit_layers=1), rank=4)
    editor.config.targets = {"transformer.h.9.mlp.c_proj": [24, 16]}
    editor.save_pretrained(tmp_path / "editor")
    code = main(["debias", "--model", str(model_dir), "--editor", str(tmp_path / "editor"), "--limit", "2",
                 "--out", str(tmp_path / "adapter"), "--quiet"])
    assert code == 2
    assert "transformer.h.9.mlp.c_proj" in capsys.readouterr().err
    assert not (tmp_path / "adapter").exists()


def test_debias_preserves_the_keys_of_a_fluent_text(tmp_path, capsys):
    """``--preserve-keys W``: the delta is the pooled solve with ``W (N / N_r) U_r^T U_r`` of the bundled
    preservation text's keys added (checked against ``recipe_solutions`` at the editor's own scale), which differs
    from the default recipe's; the adapter records the recipe and the text; bad combinations are one-line errors; a
    model whose context is shorter than a paragraph keeps the keys of its first tokens, as the guard text is cut."""
    from transformers import AutoModelForCausalLM

    from biasedit_peft.data import load_preserve_text
    from biasedit_peft.editor.joint import JointRecipe
    from biasedit_peft.scoring import encode_sentences, model_context_length

    model_dir = _saved_model(tmp_path, n_positions=256)  # long enough for the bundled paragraphs (~130 tokens here)
    reference = peft_model(num_edit_layers=2, model_config={"n_positions": 256})
    editor = saved_editor_with_unit_statistics(reference, tmp_path / "editor")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"stereotype": f"{g} is a nurse .", "anti_stereotype": f"{g} is a pilot ."})
                             + "\n" for g in ("he", "she", "men")))
    base = ["debias", "--model", str(model_dir), "--editor", str(tmp_path / "editor"), "--data", str(pairs),
            "--calibrate-on", "none", "--quiet"]
    assert main([*base, "--preserve-keys", "10", "--out", str(tmp_path / "kept")]) == 0, capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "plain")]) == 0, capsys.readouterr().err
    config = json.loads((tmp_path / "kept" / "adapter_config.json").read_text())
    assert config["edit_info"]["recipe"] == "preserve 10, ridge 1"
    assert config["edit_info"]["preserved_keys"] == "bundled"
    assert "preserved_keys" not in json.loads((tmp_path / "plain" / "adapter_config.json").read_text())["edit_info"]
    kept, plain = (get_deltas(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir),
                                                        tmp_path / name)) for name in ("kept", "plain"))
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    statistics, _ = pooled_statistics(editor, reference, editor_tokenizer(), rows, 16, load_preserve_text())
    assert next(iter(statistics.values())).n_preserved > 1000  # every scored token of the 18 paragraphs
    layers = editor.check_compatible(reference)
    for name, solution in recipe_solutions(statistics, JointRecipe(preserve=10.0, ridge=1.0)).items():
        expected = solution.delta.dense() if layers[name].fan_in_fan_out else solution.delta.dense().T
        torch.testing.assert_close(kept[name], expected, rtol=1e-4, atol=1e-7)
        assert (kept[name] - plain[name]).norm() > 1e-3 * plain[name].norm()
    # a user's text is loaded and recorded by its path; the pairs' unrelated sentences, where they have them
    own_text = tmp_path / "own.txt"
    own_text.write_text("The tide turns .\n\nA seed grows .\n", encoding="utf-8")
    own = ["--preserve-keys", "10", "--preserve-text", str(own_text)]
    assert main([*base, *own, "--out", str(tmp_path / "own")]) == 0
    config = json.loads((tmp_path / "own" / "adapter_config.json").read_text())
    assert config["edit_info"]["preserved_keys"] == str(own_text)
    with_unrelated = tmp_path / "with_unrelated.jsonl"
    with_unrelated.write_text("".join(json.dumps({**row, "unrelated": "the sky is blue ."}) + "\n" for row in rows))
    assert main([*base[:6], str(with_unrelated), *base[7:], "--preserve-keys", "10", "--preserve-text", "unrelated",
                 "--out", str(tmp_path / "unrelated")]) == 0, capsys.readouterr().err
    config = json.loads((tmp_path / "unrelated" / "adapter_config.json").read_text())
    assert config["edit_info"]["preserved_keys"] == "the edit pairs' unrelated sentences"
    for flags, message in ((["--preserve-text", "unrelated"], "pass both"),
                           (["--preserve-keys", "10", "--preserve-text", "unrelated"], "which 3 of 3 lack"),
                           (["--preserve-keys", "-1"], "at least 0"), (["--preserve-keys", "nan"], "finite"),
                           (["--preserve-keys", "10", "--preserve-text", str(tmp_path)], "--out")):
        assert main([*base, *flags, "--out", str(tmp_path / "refused")]) == 2
        assert message in capsys.readouterr().err and not (tmp_path / "refused").exists()
    # a model whose context (64) is shorter than the bundled paragraphs keeps the keys of each one's first 64 tokens
    short = peft_model(num_edit_layers=2)
    paragraphs = load_preserve_text()
    assert model_context_length(short) == 64
    assert encode_sentences(editor_tokenizer(), paragraphs).attention_mask.sum(-1).max() > 64
    statistics, _ = pooled_statistics(editor, short, editor_tokenizer(), rows, 16, paragraphs)
    cut = encode_sentences(editor_tokenizer(), paragraphs, max_length=64)
    assert next(iter(statistics.values())).n_preserved == int(cut.target_mask.sum())
    with pytest.raises(TypeError, match="not one string"):
        deployable_adapter(editor, reference, editor_tokenizer(), rows, preserve_text="one string",
                           recipes=[JointRecipe(preserve=1.0, ridge=1.0)])
