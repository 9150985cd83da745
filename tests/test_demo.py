"""``biasedit demo``: a short seeded run on the bundled testbed, its results schema and its checks."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from biasedit_peft import get_deltas
from biasedit_peft.cli import main
from biasedit_peft.models import cpu_identity
from biasedit_peft.workflows.demo import format_results, max_abs_difference, merge_rounding_note, target_check
from biasedit_peft.workflows.deployment import calibration_score

EVALUATE_KEYS = {"stereoset", "crows", "gender_swapped", "perplexity", "model", "adapter", "mode", "split"}


def numeric_leaves(tree, prefix: str = "") -> dict[str, float]:
    """Every number of a nested dict (lists and strings skipped), non-finite ones included."""
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in numeric_leaves(value, f"{prefix}{key}/").items()}
    if isinstance(tree, (int, float)) and not isinstance(tree, bool):
        return {prefix.rstrip("/"): float(tree)}
    return {}


def test_max_abs_difference_by_hand():
    first = {"stereoset": {"gender": {"ss": 60.0, "ci": [1, 2], "n": 3}}, "perplexity": 10.0, "model": "m"}
    second = {"stereoset": {"gender": {"ss": 58.5, "ci": [1, 2], "n": 3}}, "perplexity": 10.25, "model": "x"}
    assert max_abs_difference(first, second) == 1.5
    assert max_abs_difference(first, {"stereoset": {}, "perplexity": 10.0}) == math.inf


def test_target_check_by_hand():
    before = {"gender": {"ss": 70.0, "lms": 80.0}, "race": {"ss": 65.0, "lms": 90.0}}
    after = {"gender": {"ss": 52.5, "lms": 77.5}, "race": {"ss": 46.0, "lms": 89.0}}
    check = target_check(before, after, ["gender", "race"])
    assert check["gender"] == {"ss": 52.5, "lms_drop": 2.5, "ss_ok": True, "lms_ok": True}
    assert check["race"]["ss_ok"] is False and check["race"]["lms_ok"] is True
    assert check["all_ok"] is False


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    code = main(["demo", "--out", str(out / "run"), "--json", str(out / "copy.json"), "--limit", "6",
                 "--max-steps", "2", "--eval-every", "1", "--n-resamples", "0", "--bias-types", "gender,race",
                 "--quiet"])
    assert code == 0
    return out


def test_demo_writes_every_artifact_with_the_evaluate_schema(demo_run):
    run = demo_run / "run"
    results = json.loads((run / "results.json").read_text())
    assert json.loads((demo_run / "copy.json").read_text()) == results
    for key in ("before", "after"):
        assert set(results[key]) == EVALUATE_KEYS
        assert set(results[key]["stereoset"]) == {"gender", "race", "overall"}
    assert results["after"]["adapter"] == str(run / "adapter")
    assert results["environment"]["cpu"] == cpu_identity()  # seeds repeat on one CPU only: say which
    for protocol in ("per_batch", "held_out", "joint_on_test"):
        assert set(results["protocols"][protocol]["after"]) == {"gender", "race", "overall"}
    # the shipped adapter is the deployment one: from train, its scale chosen on dev, scored on test
    deployment = results["protocols"]["deployment"]
    assert deployment["edit_data"] == "stereoset:train" and deployment["calibrated_on"] == "stereoset:dev"
    assert deployment["n_samples"] == 12  # --limit 6 per type, gender and race of train
    calibration = results["edit"]["calibration"]
    assert deployment["scale"] == calibration["scale"] == min(
        calibration["rows"], key=lambda r: (r["selection"], abs(r["scale"] - 1)))["scale"]
    adapter_config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["edit_data"] == "stereoset:train"
    assert adapter_config["edit_info"]["scale"] == deployment["scale"]
    assert adapter_config["edit_info"]["guard_text"] == "bundled"
    chosen = next(row for row in calibration["rows"] if row["scale"] == deployment["scale"])
    assert deployment["guard_perplexity_rise"] == pytest.approx(math.expm1(chosen["text_nll_increase"]))
    assert all(row["selection"] == calibration_score(row) for row in calibration["rows"])  # the guard counts
    assert f"guard-text perplexity {100 * deployment['guard_perplexity_rise']:+.2f} %" in format_results(results)
    assert set(results["targets"]["deployment"]) >= {"gender", "race", "perplexity_rise", "all_ok"}
    for path, value in numeric_leaves({k: results[k] for k in ("before", "after", "protocols")}).items():
        assert math.isfinite(value), path
        if path.rsplit("/", 1)[-1] in ("ss", "lms", "icat", "metric"):
            assert 0.0 <= value <= 100.0, path
    assert results["training"]["steps"] == 2
    for folder, name in (("editor", "config.json"), ("editor", "editor.safetensors"),
                         ("adapter", "adapter_config.json"), ("adapter", "README.md"), ("merged", "config.json"),
                         ("merged", "tokenizer.json")):
        assert (run / folder / name).is_file(), f"{folder}/{name}"
    pytest.importorskip("matplotlib")
    assert (run / "before_after.png").stat().st_size > 1000


def test_demo_merged_checkpoint_scores_like_base_plus_adapter(demo_run):
    results = json.loads((demo_run / "run" / "results.json").read_text())
    merged = results["merged"]["evaluation"]
    for bias_type, entry in results["after"]["stereoset"].items():
        assert merged["stereoset"][bias_type]["ss"] == entry["ss"]
        assert merged["stereoset"][bias_type]["lms"] == entry["lms"]
    assert results["merged"]["max_abs_metric_difference"] < 1e-2  # perplexity in float32 differs in the last bits
    assert results["merged"]["max_abs_weight_change"] > 0


def test_demo_adapter_reloads_with_peft_and_reproduces_after(demo_run):
    from peft import PeftModel

    import biasedit_peft  # noqa: F401
    from biasedit_peft.evaluation import evaluate_model
    from biasedit_peft.models import load_model_and_tokenizer

    results = json.loads((demo_run / "run" / "results.json").read_text())
    base, tokenizer = load_model_and_tokenizer("testbed")
    model = PeftModel.from_pretrained(base, str(demo_run / "run" / "adapter"))
    scores = evaluate_model(model, tokenizer, benchmarks=("stereoset",), bias_types=["gender", "race"], limit=6,
                            progress=False, n_resamples=0)
    for bias_type, entry in results["after"]["stereoset"].items():
        for metric in ("n", "ss", "lms", "icat"):
            assert scores["stereoset"][bias_type][metric] == entry[metric], (bias_type, metric)
    saved = load_file(demo_run / "run" / "adapter" / "adapter_model.safetensors")
    reloaded = get_deltas(model)
    assert len(saved) == len(reloaded) > 0
    for name, delta in reloaded.items():
        assert delta.abs().sum() > 0
        assert torch.equal(delta, saved[f"base_model.model.{name}.biasedit_delta"])


def test_demo_rejects_empty_bias_types(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--bias-types", ",", "--quiet"]) == 2
    assert "--bias-types is empty" in capsys.readouterr().err


def test_preset_is_the_named_one_else_testbeds_for_the_testbed_else_cpu_on_cpu_else_by_model_type():
    import argparse

    from peft import get_peft_model

    from biasedit_peft import BiasEditConfig
    from biasedit_peft.cli.demo import add_parser, config_from_args
    from biasedit_peft.editor.presets import PRESETS, preset_for_model, preset_name_for
    from biasedit_peft.workflows.demo import demo_fingerprint, editor_preset

    from factories import tiny_model

    peft_model = get_peft_model(tiny_model("gpt2"), BiasEditConfig(num_edit_layers=1))
    assert editor_preset("some/folder", peft_model) is PRESETS["cpu"]  # weights on the CPU
    on_meta = tiny_model("gpt2").to("meta")  # weights off the CPU: the family's paper preset
    assert preset_for_model(on_meta) is PRESETS["gpt2"]
    assert preset_for_model(tiny_model("llama").to("meta")) is PRESETS["llama"]
    assert editor_preset("testbed", peft_model) is PRESETS["testbed"]
    assert editor_preset("some/folder", peft_model, "testbed") is PRESETS["testbed"]
    assert (preset_name_for("testbed"), preset_name_for("some/folder"), preset_name_for("testbed", "gpt2")) == (
        "testbed", None, "gpt2")
    with pytest.raises(ValueError, match="Unknown preset"):
        editor_preset("some/folder", peft_model, "nope")
    parser = add_parser(argparse.ArgumentParser().add_subparsers())
    assert config_from_args(parser.parse_args(["--model", "dir", "--preset", "testbed"])).preset == "testbed"
    # --step-size-meta-lr reaches the training arguments through the overrides; unset, the preset's None
    config = config_from_args(parser.parse_args(["--model", "dir", "--step-size-meta-lr", "1e-6"]))
    _, args = PRESETS["cpu"].editor_and_arguments(peft_model, "unused", **config.overrides())
    assert config.step_size_meta_lr == 1e-6 and args.step_size_meta_lr == 1e-6
    _, args = PRESETS["cpu"].editor_and_arguments(peft_model, "unused")
    assert PRESETS["cpu"].step_size_meta_lr is None and args.step_size_meta_lr is None
    # --meta-lr the same way (a field every demo fingerprints; unset, the preset's)
    config = config_from_args(parser.parse_args(["--model", "dir", "--meta-lr", "1e-4"]))
    _, args = PRESETS["cpu"].editor_and_arguments(peft_model, "unused", **config.overrides())
    assert config.meta_lr == 1e-4 and args.meta_lr == 1e-4
    unset = config_from_args(parser.parse_args(["--model", "dir"]))
    _, args = PRESETS["cpu"].editor_and_arguments(peft_model, "unused", **unset.overrides())
    assert args.meta_lr == PRESETS["cpu"].meta_lr == 1e-3
    # --initial-edit-scale the same way; off in every preset, and left out of an unset run's fingerprint
    config = config_from_args(parser.parse_args(["--model", "dir", "--initial-edit-scale"]))
    _, args = PRESETS["cpu"].editor_and_arguments(peft_model, "unused", **config.overrides())
    assert config.initial_edit_scale is True and args.initial_edit_scale is True
    assert not any(preset.initial_edit_scale for preset in PRESETS.values())
    assert config_from_args(parser.parse_args(["--model", "dir"])).initial_edit_scale is None
    assert "initial_edit_scale" not in demo_fingerprint(config_from_args(parser.parse_args(["--model", "dir"])))
    assert demo_fingerprint(config)["initial_edit_scale"] is True
    switched_off = config_from_args(parser.parse_args(["--model", "dir", "--no-initial-edit-scale"]))
    assert switched_off.initial_edit_scale is False
    # --ss-coef the same way: 0 in every preset, left out of an unset run's fingerprint (older runs resume)
    config = config_from_args(parser.parse_args(["--model", "dir", "--ss-coef", "1.5"]))
    _, args = PRESETS["cpu"].editor_and_arguments(peft_model, "unused", **config.overrides())
    assert config.ss_coef == 1.5 and args.ss_coef == 1.5 and demo_fingerprint(config)["ss_coef"] == 1.5
    assert not any(preset.ss_coef for preset in PRESETS.values())
    assert "ss_coef" not in demo_fingerprint(config_from_args(parser.parse_args(["--model", "dir"])))


def test_layers_flag_picks_the_edited_blocks():
    import argparse

    from biasedit_peft import edit_targets
    from biasedit_peft.cli.demo import add_parser, config_from_args
    from biasedit_peft.workflows.demo import build_model

    parser = add_parser(argparse.ArgumentParser().add_subparsers())
    assert config_from_args(parser.parse_args([])).layers_to_transform is None  # the last --num-edit-layers
    config = config_from_args(parser.parse_args(["--layers", "2, 0", "--quiet"]))
    assert config.layers_to_transform == (0, 2)
    peft_model, _, _ = build_model(config)
    assert [name.split(".")[-3] for name in edit_targets(peft_model)] == ["0", "2"]
    with pytest.raises(ValueError, match="block indices"):
        config_from_args(parser.parse_args(["--layers", "last"]))


@pytest.mark.parametrize("units, fast", [(True, "bf16"), (False, None), (None, None)])  # None: no flags listed
def test_demo_runs_real_models_in_bf16_where_the_cpu_has_it_and_keeps_the_testbed_and_explicit_dtypes(
        monkeypatch, units, fast):
    from biasedit_peft import models
    from biasedit_peft.workflows.demo import DemoConfig, default_demo_dtype

    monkeypatch.setattr(models, "_CPU_BF16_FAST", [])  # decided once per process: forget this one's
    monkeypatch.setattr(models, "cpu_reports_bf16_units", lambda: units)
    assert default_demo_dtype("smollm2-135m", "cpu") == fast
    assert DemoConfig(model="some/folder", device="cpu").dtype == fast
    assert default_demo_dtype("some/folder", "cuda:0") is None  # a GPU keeps the checkpoint's dtype
    assert default_demo_dtype("testbed", "cpu") is None  # the testbed's figures stay float32
    assert DemoConfig(model="some/folder", device="cpu", dtype="fp32").dtype == "fp32"
    assert DemoConfig(device="cpu").dtype is None


def test_the_initial_editor_depends_on_the_seed_alone(tmp_path):
    """Random numbers drawn before the editor is made (a first load converting a GGUF initialises a whole model)
    change neither the editor a seed gives nor the global random state after it."""
    import torch

    from biasedit_peft.editor import PRESETS

    from factories import peft_model

    model = peft_model()

    def initial_editor(seed: int, draws_before: int):
        torch.manual_seed(123)
        torch.randn(draws_before)
        editor, args = PRESETS["testbed"].editor_and_arguments(model, str(tmp_path), seed=seed)
        return editor.state_dict(), torch.randn(4), args

    first, after_first, args = initial_editor(0, 0)
    second, after_second, _ = initial_editor(0, 1000)
    other, _, _ = initial_editor(1, 0)
    assert args.seed == 0
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)
    torch.manual_seed(123)
    assert torch.equal(after_first, torch.randn(4))  # the global generator is left as it was
    torch.manual_seed(123)
    torch.randn(1000)
    assert torch.equal(after_second, torch.randn(4))


def test_cpu_presets_draw_fan_in_blocks_the_papers_draw_malmens(tmp_path):
    """The CPU presets' meta_lr of 1e-3 needs ``A ~ N(0, 1/size)``; the paper's presets keep MALMEN's N(0, 1)."""
    from biasedit_peft.editor import PRESETS

    from factories import peft_model

    model = peft_model()

    def block_init_and_a_std(preset: str, **override) -> tuple[str, float, int]:
        editor, _ = PRESETS[preset].editor_and_arguments(model, str(tmp_path), seed=0, **override)
        (net,) = editor.nets.values()
        return editor.config.block_init, net.blocks[0].A.std().item(), net.key_size + net.value_size

    assert [PRESETS[name].block_init for name in ("gpt2", "llama", "gemma", "cpu", "testbed")] == \
        ["unit"] * 3 + ["fan_in"] * 2
    kind, std, size = block_init_and_a_std("testbed")
    assert kind == "fan_in" and abs(std * size**0.5 - 1) < 0.05
    kind, std, _ = block_init_and_a_std("testbed", block_init="unit")
    assert kind == "unit" and abs(std - 1) < 0.05


def test_the_merged_line_names_16_bit_rounding_only_for_16_bit_runs():
    assert merge_rounding_note("fp32") == "" and merge_rounding_note(None) == ""
    for dtype in ("bf16", "fp16"):
        note = merge_rounding_note(dtype)
        assert f"rounds W + delta to {dtype}" in note and "--dtype fp32" in note


def test_a_demo_from_before_step_size_meta_lr_resumes_and_one_that_sets_it_is_fingerprinted():
    from biasedit_peft.progress_store import ResumeMismatch, check_fields
    from biasedit_peft.workflows.demo import DemoConfig, demo_fingerprint

    unset, old = demo_fingerprint(DemoConfig()), demo_fingerprint(DemoConfig())
    assert "step_size_meta_lr" not in unset
    check_fields("stages", old, unset, every=True)  # an older run's fingerprint: no error
    with pytest.raises(ResumeMismatch, match="step_size_meta_lr"):
        check_fields("stages", old, demo_fingerprint(DemoConfig(step_size_meta_lr=1e-6)), every=True)


def test_calibrate_on_dev_plus_train_calib_meta_trains_on_train_fit_and_calibrates_on_dev_and_train_calib(
        tmp_path, monkeypatch):
    import biasedit_peft.editor as editor_package
    from biasedit_peft.workflows import demo as demo_module
    from biasedit_peft.workflows.demo import DemoConfig, build_model, load_demo_items

    seen = {}

    class Captured(Exception):
        pass

    def capturing_trainer(model, editor, args, train, dev, tokenizer=None, calibration_data=None):
        seen.update(train=train, dev=dev, calibration=calibration_data)
        raise Captured

    monkeypatch.setattr(editor_package, "BiasEditTrainer", capturing_trainer)
    types = ("gender", "religion")
    for recipe, train_split, calibration_splits in ((None, "train", None),
                                                     ("dev+train-calib", "train-fit", ("dev", "train-calib"))):
        config = DemoConfig(bias_types=types, limit=6, calibrate_on=recipe, progress=False)
        peft_model, tokenizer, device = build_model(config)
        with pytest.raises(Captured):
            demo_module.train_editor(config, peft_model, tokenizer, device, tmp_path / "editor")
        assert seen["train"] == load_demo_items(train_split, types, 6)
        assert seen["dev"] == load_demo_items("dev", types, 6)
        expected = None if calibration_splits is None else [
            item for split in calibration_splits for item in load_demo_items(split, types, 6)]
        assert seen["calibration"] == expected
    fit, calib = load_demo_items("train-fit", types, None), load_demo_items("train-calib", types, None)
    assert not {item.target for item in fit} & {item.target for item in calib}  # held-out target terms


def test_the_default_recipe_is_fingerprinted_so_runs_of_the_old_default_are_not_resumed_under_it():
    from biasedit_peft.editor.presets import preset_name_without_model
    from biasedit_peft.progress_store import ResumeMismatch, check_fields
    from biasedit_peft.workflows.demo import DemoConfig, demo_fingerprint

    with pytest.raises(ValueError, match="dev\\+train-calib"):
        DemoConfig(calibrate_on="train")
    new = demo_fingerprint(DemoConfig())
    assert new["calibrate_on"] == "dev+train-calib" and new["average_steps"] == 25  # the testbed preset's
    old_default = {k: v for k, v in new.items() if k not in ("calibrate_on", "average_steps")}
    with pytest.raises(ResumeMismatch, match="calibrate_on, average_steps"):
        check_fields("stages", old_default, new, every=True)
    old_recipe = {k: v for k, v in new.items() if k != "average_steps"}  # --calibrate-on given, the old preset's 0
    with pytest.raises(ResumeMismatch, match="average_steps"):
        check_fields("stages", old_recipe, new, every=True)
    check_fields("stages", {**old_recipe, "average_steps": 25}, new, every=True)  # --average-steps 25: the same run
    assert demo_fingerprint(DemoConfig(average_steps=0))["average_steps"] == 0
    assert [preset_name_without_model(*case) for case in (("m", None, "cpu"), ("m", None, "cuda"),
                                                          ("testbed", None, "cuda"), ("m", "llama", "cpu"))] == \
        ["cpu", None, "testbed", "llama"]  # on an accelerator the model's type decides, after it loads


def test_every_calibration_recipe_is_a_demo_flag_value_and_reaches_the_config():
    from biasedit_peft.cli import build_parser
    from biasedit_peft.cli.demo import config_from_args
    from biasedit_peft.workflows.demo import CALIBRATION_RECIPES

    parser, _ = build_parser()
    assert config_from_args(parser.parse_args(["demo"])).calibrate_on == "dev+train-calib"  # the default
    for recipe in CALIBRATION_RECIPES:
        args = parser.parse_args(["demo", "--calibrate-on", recipe])
        assert config_from_args(args).calibrate_on == recipe
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--calibrate-on", "test"])
