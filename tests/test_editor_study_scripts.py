"""The study scripts on the bundled testbed: ``_study_args`` (the refused ``--out``), ``edit_size_curve`` with an
untrained editor (3 items per bias type, edits of 2 items and one joint edit per type, at x1e6, a unit step size,
and x0) and
``finetune_ceiling`` (its dev choice by hand, its training step, and a two-step run), ``calibration_order``'s dev
groups and ``scale_transfer``'s choice on hand-built scores."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from biasedit_peft.editor import BiasEditor
from biasedit_peft.workflows.demo import DemoConfig, build_model, load_demo_items

from factories import saved_editor_with_unit_statistics, script_module


def _study_parser() -> argparse.ArgumentParser:
    study_args = script_module("_study_args")
    parser = argparse.ArgumentParser()
    study_args.add_editor_study_arguments(parser)
    return parser


def _saved_untrained_editor(folder) -> BiasEditor:
    """An untrained rank-8 testbed editor with unit normaliser statistics (as meta-training's would be), saved to
    ``folder``."""
    peft_model, _, _ = build_model(DemoConfig(model="testbed", progress=False))
    return saved_editor_with_unit_statistics(peft_model, folder, rank=8)


def test_an_existing_report_is_refused_without_overwrite(tmp_path, capsys):
    study_args = script_module("_study_args")
    out = tmp_path / "report.json"
    out.write_text("{}")
    with pytest.raises(SystemExit) as stop:
        study_args.parse_study_arguments(_study_parser(), ["--editor", "e", "--out", str(out)])
    assert stop.value.code == 2
    assert f"--out {out} exists; pass --overwrite" in capsys.readouterr().err
    args = study_args.parse_study_arguments(_study_parser(), ["--editor", "e", "--out", str(out), "--overwrite"])
    assert (args.model, args.batch_size, args.limit, args.out) == ("testbed", 16, None, str(out))
    assert out.read_text() == "{}"


def test_the_edit_size_curve_scores_the_same_items_at_every_size(tmp_path):
    editor = _saved_untrained_editor(tmp_path / "editor")
    out = tmp_path / "curve.json"
    script = script_module("edit_size_curve")
    # x1e6 turns the untrained step size 1e-6 into 1: large enough that the edits flip items (at x1 none flips, and
    # the x0 rows' equality below would hold whether or not the multiple reached the deltas)
    assert script.main(["--editor", str(tmp_path / "editor"), "--limit", "3", "--sizes", "2,4096",
                        "--scales", "1e6,0", "--batch-size", "8", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["n_items"] == 9
    from biasedit_peft.models import cpu_identity  # what the numbers were made on: the testbed's dtype, this CPU
    assert (report["model"], report["dtype"], report["cpu"]) == ("testbed", None, cpu_identity())
    assert report["threads"] == torch.get_num_threads() and report["device"] == "cpu"
    small, joint, small_zero, joint_zero = report["rows"]
    assert [(row["scale"], row["edit_batch_size"]) for row in report["rows"]] == [
        (1e6, 2), (1e6, 4096), (0, 2), (0, 4096)]
    assert (small["edit_batch_size"], small["n_batches"]) == (2, 3 * math.ceil(3 / 2))
    assert (joint["edit_batch_size"], joint["n_batches"]) == (4096, 3)
    for row in (small, joint):
        moved = [t for t in ("gender", "race", "religion") if row["after"][t] != row["before"][t]]
        assert moved, f"the x1e6 edits of {row['edit_batch_size']} items moved no score"
    for bias_type in ("gender", "race", "religion"):
        assert small["before"][bias_type] == joint["before"][bias_type]
        for zero in (small_zero, joint_zero):  # x0: every delta is zero, so the edited scores are the unedited ones
            assert zero["after"][bias_type]["ss"] == zero["before"][bias_type]["ss"]
            assert zero["after"][bias_type]["lms"] == zero["before"][bias_type]["lms"]
    scaled = BiasEditor.from_pretrained(tmp_path / "editor")  # the script left the saved editor as it was
    assert all(torch.equal(scaled.nets[name].lr, net.lr) for name, net in editor.nets.items())


def test_the_ceiling_checkpoint_choice_is_mean_distance_to_50_within_the_lms_bound():
    ceiling = script_module("finetune_ceiling")
    before = {"gender": {"ss": 60.0, "lms": 90.0}, "race": {"ss": 58.0, "lms": 88.0},
              "religion": {"ss": 56.0, "lms": 86.0}}
    after = {"gender": {"ss": 52.0, "lms": 89.0}, "race": {"ss": 47.0, "lms": 86.0},
             "religion": {"ss": 50.0, "lms": 85.0}}
    assert ceiling.dev_choice_score(before, before, 3.0) == pytest.approx((10 + 8 + 6) / 3)
    assert ceiling.dev_choice_score(after, before, 3.0) == pytest.approx((2 + 3 + 0) / 3)  # drop (1+2+1)/3
    assert ceiling.dev_choice_score(after, before, 1.0) == float("inf")


def test_a_ceiling_step_trains_the_deltas_against_the_unedited_model():
    ceiling = script_module("finetune_ceiling")
    peft_model, tokenizer, _ = build_model(DemoConfig(model="testbed", progress=False))
    peft_model.eval()
    deltas = ceiling.adapter_deltas(peft_model)
    assert len(deltas) == 3 and all(p.requires_grad and not p.any() for p in deltas.values())
    items = load_demo_items("train", ("gender",), 4)
    optimizer = torch.optim.Adam(deltas.values(), lr=1e-3)
    first = ceiling.training_step(peft_model, tokenizer, items, 1.0, optimizer)
    assert first["retention"] == 0.0  # zero deltas: the edited model is the unedited one (no dropout)
    assert all(p.abs().max().item() == pytest.approx(1e-3, rel=1e-3) for p in deltas.values())  # Adam's first step
    second = ceiling.training_step(peft_model, tokenizer, items, 1.0, optimizer)
    assert second["retention"] > 0.0 and second["debias"] < first["debias"]


def test_a_ceiling_run_reports_the_kept_checkpoint(tmp_path):
    out = tmp_path / "ceiling.json"
    ceiling = script_module("finetune_ceiling")
    assert ceiling.main(["--limit", "3", "--steps", "2", "--eval-every", "1", "--pairs-per-step", "4",
                         "--lr", "1e-2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [row["step"] for row in report["checkpoints"]] == [0, 1, 2]
    assert report["dtype"] is None and report["cpu"]["model"]
    kept = next(row for row in report["checkpoints"] if row["step"] == report["kept_step"])
    after = report["after"]
    assert ceiling.ss_lms(after["stereoset"]) == kept["test"]
    # perplexity is scored afresh after the kept deltas are restored: it must be the kept row's
    assert after["perplexity"] == pytest.approx(kept["perplexity"], rel=1e-6)
    assert set(after["crows"]) == {"gender", "race-color", "religion", "overall"}
    steps = report["checkpoints"]
    assert steps[2]["perplexity"] != steps[0]["perplexity"]  # the deltas moved, so restoring them is tested


def test_calibration_order_groups_dev_in_file_order_a_seeded_shuffle_or_by_type():
    from types import SimpleNamespace

    groups_of = script_module("calibration_order").dev_groups
    samples = list(range(10))
    assert groups_of(samples, 4, "file", 0) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    shuffled = groups_of(samples, 4, "shuffled", 0)
    assert [len(group) for group in shuffled] == [4, 4, 2]
    assert sorted(sum(shuffled, [])) == samples and sum(shuffled, []) != samples
    assert groups_of(samples, 4, "shuffled", 0) == shuffled and groups_of(samples, 4, "shuffled", 1) != shuffled
    typed = [SimpleNamespace(bias_type=t) for t in ("race", "gender", "race", "race", "gender")]
    assert groups_of(typed, 2, "by-type", 0) == [[typed[0], typed[2]], [typed[3]], [typed[1], typed[4]]]
    with pytest.raises(ValueError, match="unknown order"):
        groups_of(samples, 4, "random", 0)


def _typed_row(scale: float, ss: dict[str, float], lms_drop: dict[str, float] | None = None) -> dict:
    """A ``calibration_order.py`` row at ``scale``: ``ss_post`` per bias type, LMS 90 before (minus the drop)."""
    drops = lms_drop or {}
    return {"scale": scale, "by_type": {t: {"n": 10, "ss_pre": 60.0, "ss_post": value, "lms_pre": 90.0,
                                              "lms_post": 90.0 - drops.get(t, 0.0), "nll_increase": 0.0}
                                          for t, value in ss.items()}}


def test_per_type_transfer_reads_the_pooled_own_and_balanced_multiples_hand_computed():
    script = script_module("per_type_transfer")
    calibration = {1.0: _typed_row(1.0, {"gender": 58.0, "race": 51.0, "religion": 57.0}),
                   2.0: _typed_row(2.0, {"gender": 50.0, "race": 46.0, "religion": 51.0}),
                   4.0: _typed_row(4.0, {"gender": 50.0, "race": 42.0, "religion": 50.0}, {"religion": 3.5})}
    # own: gender ties at 0 between x2 and x4 (nearest 1: x2), race x1 (1.0), religion x2 (x4 breaks the LMS bound)
    assert [script.per_type_choice(calibration, t) for t in ("gender", "race", "religion")] == [2.0, 1.0, 2.0]
    # mean |SS - 50|: x1 (8 + 1 + 7) / 3 = 5.33, x2 (0 + 4 + 1) / 3 = 1.67, x4 out of bounds (religion)
    assert script.balanced_choice(calibration) == 2.0
    test = {scale: _typed_row(scale, {"gender": 60.0 - 4 * scale, "race": 55.0 - scale, "religion": 53.0})
            for scale in (1.0, 2.0, 4.0)}
    table = {row["bias_type"]: row for row in script.transfer_table(calibration, 1.0, test)}
    assert table["gender"]["test_ss_pooled"] == 56.0 and table["gender"]["test_ss_own"] == 52.0
    assert table["race"]["test_ss_own"] == 54.0 and table["race"]["test_ss_balanced"] == 53.0
    assert {row["balanced_scale"] for row in table.values()} == {2.0}
    assert table["religion"]["test_lms_drop_balanced"] == 0.0


def test_scale_transfer_chooses_on_one_half_of_the_targets_and_scores_the_other():
    from biasedit_peft.evaluation import STEREOSET_ROLES
    from biasedit_peft.scoring import SentenceLogProbs

    from factories import stereoset_item

    script = script_module("scale_transfer")
    # 4 target terms per bias type, 2 items each: items 2k and 2k + 1 share a target term
    items = [stereoset_item(f"{t}{k}-{j}", f"{t}{k}", "s", "a", "u", bias_type=t)
             for t in ("gender", "race", "religion") for k in range(4) for j in range(2)]
    n = len(items)

    def scores(stereotype: torch.Tensor, anti: torch.Tensor) -> dict:
        columns = {"stereotype": stereotype, "anti-stereotype": anti, "unrelated": torch.full((n,), -5.0)}
        return {role: SentenceLogProbs(columns[role], columns[role], torch.ones(n)) for role in STEREOSET_ROLES}

    zero, flipped = torch.zeros(n), torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0)
    before = scores(zero, -torch.ones(n))  # every stereotype preferred: SS 100, LMS 100
    # x1 leaves it; x1.5 flips one item of every target term (SS 50 in any half); x2 flips them all (SS 0)
    after = {1.0: before, 1.5: scores(zero, flipped), 2.0: scores(zero, torch.ones(n))}
    for seed in range(5):
        choose, report = script.halves(items, seed)
        chosen_targets = {items[i].target for i in choose.tolist()}
        assert chosen_targets.isdisjoint(items[i].target for i in report.tolist())
        assert sorted(choose.tolist() + report.tolist()) == list(range(n))
        assert len(chosen_targets) == 6  # 2 of the 4 target terms of each type
        result = script.transfer(items, before, after, seed)
        assert result["chosen"] == 1.5
        for t in ("gender", "race", "religion"):
            assert result["chosen_after"][t] == {"ss": 50.0, "lms": 100.0}
            assert result["x1_after"][t] == result["before"][t] == {"ss": 100.0, "lms": 100.0}
    halvings = [script.transfer(items, before, after, seed) for seed in range(5)]
    assert script.summary(halvings, "chosen_after")["race"] == {
        "ss_mean": 50.0, "ss_min": 50.0, "ss_max": 50.0, "lms_drop_mean": 0.0, "lms_drop_max": 0.0, "target_met": 5}
    assert script.summary(halvings, "x1_after")["race"]["target_met"] == 0


def test_scale_transfer_gap_summary_hand_computed():
    import math

    from biasedit_peft.scoring import SentenceLogProbs

    script = script_module("scale_transfer")
    gap = torch.tensor([0.1, 0.2, -0.3, 2.0], dtype=torch.float64)
    ones = torch.ones(4, dtype=torch.float64)
    scores = {"stereotype": SentenceLogProbs(gap - 1, gap - 1, ones),
              "anti-stereotype": SentenceLogProbs(-ones, -ones, ones)}
    summary = script.gap_summary(scores)
    assert summary["mean"] == pytest.approx(0.5) and summary["median"] == pytest.approx(0.1)  # torch: lower median
    assert summary["share_positive"] == 0.75
    assert summary["abs_loss"] == pytest.approx(0.65)
    assert summary["token_loss"] == pytest.approx(sum(g * math.tanh(g / 2) for g in (0.1, 0.2, -0.3, 2.0)) / 4)


def test_the_ridge_sweep_calibrates_on_each_pool_and_scores_test_once_per_chosen_multiple(tmp_path, monkeypatch):
    """``--edit-split train-fit --calibrations dev dev+train-calib``: one row per pool with its own size (3 items
    per type and split), ``test`` evaluated once before and once per distinct (recipe, multiple); ``test`` cannot be
    a calibration split, and a pool that shares pairs with the edit split is refused."""
    _saved_untrained_editor(tmp_path / "editor")
    sweep = script_module("joint_ridge_sweep")
    evaluations = []
    real = sweep.evaluate_model
    monkeypatch.setattr(sweep, "evaluate_model", lambda *a, **k: evaluations.append(1) or real(*a, **k))
    out = tmp_path / "sweep.json"
    common = ["--editor", str(tmp_path / "editor"), "--limit", "3", "--batch-size", "8", "--grid", "0:1"]
    assert sweep.main([*common, "--edit-split", "train-fit", "--calibrations", "dev", "dev+train-calib",
                       "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["edit_split"] == "train-fit" and report["n_train"] == 9
    assert report["dtype"] is None and report["cpu"]["model"]
    assert [(r["calibrated_on"], r["n_calibration"]) for r in report["rows"]] == [("dev", 9), ("dev+train-calib", 18)]
    distinct = {row["scale"] for row in report["rows"]}
    assert len(evaluations) == 1 + len(distinct)
    test_by_scale = {}
    for row in report["rows"]:
        assert row["chosen"] == next(r for r in row["calibration_rows"] if r["scale"] == row["scale"])
        # one recipe: the test scores depend on the chosen multiple alone (scored once per multiple)
        assert row["test"] == test_by_scale.setdefault(row["scale"], row["test"])
    with pytest.raises(SystemExit):
        sweep.main([*common, "--calibrations", "dev+test", "--out", str(tmp_path / "t.json")])
    with pytest.raises(ValueError, match="also edited"):
        sweep.main(["--editor", str(tmp_path / "editor"), "--grid", "0:1", "--calibrations", "train-calib",
                    "--out", str(tmp_path / "u.json")])


def test_every_family_of_the_smoke_run_builds_with_its_default_target_and_opt_runs_the_demo(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from biasedit_peft.tuner.model import default_target_suffix

    smoke = script_module("family_smoke")
    tokenizer = AutoTokenizer.from_pretrained(smoke.TESTBED_DIR)
    for family in smoke.FAMILIES:
        folder = smoke.save_family_model(family, tmp_path / "models" / family, tokenizer)
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert model.config.model_type == family and model.config.num_hidden_layers == 4
        assert default_target_suffix(family, model)
    # OPT flattens tokens before its MLP: the demo failed on it before the editor read [B * T, d] layer tensors
    assert smoke.main(["--out", str(tmp_path / "run"), "--families", "opt", "--", "--max-steps", "2"]) == 0
    row = json.loads((tmp_path / "run" / "families.json").read_text())["opt"]
    assert row["returncode"] == 0 and row["target_modules"] == ["fc2"] and not row["replay_fallback"]
    with pytest.raises(SystemExit):  # an existing --out is refused without --overwrite
        smoke.main(["--out", str(tmp_path / "run"), "--families", "opt"])


def test_revision_timing_runs_both_trees_and_reports_the_speedup_of_each_pair(tmp_path, capsys):
    """HEAD against the working tree on the testbed: the same batches and seed give the same losses in both (this
    package's numerics at HEAD are the working tree's in a clean checkout, as in CI)."""
    script = script_module("revision_timing")
    out = tmp_path / "timing.json"
    result = script.main(["--base", "HEAD", "--model", "testbed", "--dtypes", "fp32", "--pairs", "1", "--rounds", "1",
                          "--out", str(out)])
    (pair,) = result["pairs"]
    assert len(pair["base"]["losses"]["fp32"]) == 1 and pair["base"]["losses"] == pair["head"]["losses"]
    base, head = pair["base"]["median_s"]["fp32"], pair["head"]["median_s"]["fp32"]
    assert pair["speedup"]["fp32"] == pytest.approx(base / head)
    assert result["median_speedup"] == pair["speedup"] and json.loads(out.read_text())["base"] == "HEAD"
    assert "losses equal: True" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # an existing --out is refused
        script.main(["--base", "HEAD", "--model", "testbed", "--out", str(out)])


def test_the_ridge_sweep_preserves_the_keys_of_a_given_text(tmp_path):
    """``--preserve-text`` means what it means in ``biasedit debias``: FILE's paragraphs (every scored token of
    each), by default the bundled preservation text, and ``unrelated`` the edit items' unrelated sentences."""
    from biasedit_peft.data import BIAS_TYPES, load_preserve_text
    from biasedit_peft.data.neutral import BUNDLED
    from biasedit_peft.models import load_model_and_tokenizer
    from biasedit_peft.scoring import encode_sentences, model_context_length

    _saved_untrained_editor(tmp_path / "editor")
    paragraphs = ["The tide rises twice a day as the moon pulls on the sea .", "Bread dough rises as yeast feeds ."]
    (tmp_path / "preserve.txt").write_text("\n\n".join(paragraphs) + "\n")
    sweep = script_module("joint_ridge_sweep")
    common = ["--editor", str(tmp_path / "editor"), "--limit", "2", "--batch-size", "8", "--grid", "1:1"]
    text = ["--preserve-text", str(tmp_path / "preserve.txt")]
    assert sweep.main([*common, *text, "--out", str(tmp_path / "a.json")]) == 0
    assert sweep.main([*common, "--out", str(tmp_path / "b.json")]) == 0
    assert sweep.main([*common, "--preserve-text", "unrelated", "--out", str(tmp_path / "c.json")]) == 0
    with_text, default, unrelated = (json.loads((tmp_path / f"{name}.json").read_text()) for name in "abc")
    model, tokenizer = load_model_and_tokenizer("testbed")

    def scored_tokens(sentences):  # a paragraph longer than the testbed's context (128) keeps its first 128 tokens
        return int(encode_sentences(tokenizer, list(sentences), max_length=model_context_length(model))
                   .target_mask.sum())

    assert with_text["preserved"] == str(tmp_path / "preserve.txt")
    assert with_text["n_preserved"] == scored_tokens(paragraphs)
    assert default["preserved"] == BUNDLED and default["n_preserved"] == scored_tokens(load_preserve_text(None))
    train = load_demo_items("train", BIAS_TYPES, 2)
    assert unrelated["preserved"] == "the edit pairs' unrelated sentences"
    assert unrelated["n_preserved"] == scored_tokens(item.unrelated for item in train)
    assert len({with_text["n_preserved"], default["n_preserved"], unrelated["n_preserved"]}) == 3
    assert default["n_train"] == with_text["n_train"] == unrelated["n_train"] == 6


def test_a_study_report_records_the_dtype_it_ran_in_as_the_demo_resolves_it(monkeypatch):
    """``--dtype`` as given; without it the demo's default: bf16 for a real model on a CPU that lists bf16
    instructions, the checkpoint's own (None) on one that does not and for the testbed."""
    from biasedit_peft import models

    record = script_module("_study_args").study_record
    for units, folder_default in ((True, "bf16"), (False, None)):
        monkeypatch.setattr(models, "_CPU_BF16_FAST", [])
        monkeypatch.setattr(models, "cpu_reports_bf16_units", lambda: units)
        assert record(argparse.Namespace(model="some/folder", dtype=None))["dtype"] == folder_default
        assert record(argparse.Namespace(model="testbed", dtype=None))["dtype"] is None
        assert record(argparse.Namespace(model="testbed", dtype="fp16"))["dtype"] == "fp16"


def test_the_ridge_sweep_refuses_to_preserve_unrelated_sentences_that_some_pairs_lack(tmp_path, monkeypatch):
    """As in ``biasedit debias``: ``--preserve-text unrelated`` over pairs of which some lack an unrelated sentence is
    refused before any scoring, naming how many lack one; a text to preserve still works for those pairs."""
    import dataclasses

    _saved_untrained_editor(tmp_path / "editor")
    sweep = script_module("joint_ridge_sweep")
    real = sweep.load_demo_items

    def without_unrelated(split, bias_types, limit):  # the edit split's first two pairs lose their unrelated sentence
        items = real(split, bias_types, limit)
        return [dataclasses.replace(item, unrelated="") if split == "train" and i < 2 else item
                for i, item in enumerate(items)]

    monkeypatch.setattr(sweep, "load_demo_items", without_unrelated)
    monkeypatch.setattr(sweep, "pooled_statistics", lambda *a, **k: pytest.fail("scored before refusing"))
    common = ["--editor", str(tmp_path / "editor"), "--limit", "2", "--batch-size", "8", "--grid", "1:1"]
    with pytest.raises(ValueError, match="which 2 of 6 lack"):
        sweep.main([*common, "--preserve-text", "unrelated", "--out", str(tmp_path / "a.json")])
    assert not (tmp_path / "a.json").exists()
    monkeypatch.undo()
    monkeypatch.setattr(sweep, "load_demo_items", without_unrelated)
    assert sweep.main([*common, "--out", str(tmp_path / "b.json")]) == 0  # the bundled text: nothing is missing
    assert json.loads((tmp_path / "b.json").read_text())["n_train"] == 6


def test_per_batch_editors_reproduces_the_demo_and_builds_each_variant_as_documented(tmp_path):
    """On a two-step testbed demo: ``kept`` gives the demo's per-batch stage exactly and ``multiple:1`` the same;
    ``later`` is the checkpoint's averaged parameters; ``untrained`` is the seeded initial editor with normalisers
    that saw the first training groups; ``ridge:RHO`` sets each layer's lambda to RHO x its mean squared key norm.
    Every calibrated variant records the trainer's grid."""
    from safetensors.torch import load_file

    from biasedit_peft.workflows.demo import editor_preset, run_demo

    demo = tmp_path / "demo"
    config = DemoConfig(out=str(demo), limit=6, max_steps=2, eval_every=1, n_resamples=0, merge=False, crows=False,
                        progress=False)
    run_demo(config)
    script = script_module("per_batch_editors")
    out = tmp_path / "pb.json"
    assert script.main(["--run", str(demo), "--variants", "kept,multiple:1,later,untrained,ridge:0.5", "--groups", "2",
                        "--out", str(out)]) == 0
    variants = json.loads(out.read_text())["variants"]
    stage = json.loads((demo / "stages" / "per_batch_protocol.json").read_text())["result"]
    for bias_type in script.TYPES:
        kept = variants["kept"]["per_batch"][bias_type]
        assert kept["ss"] == stage["after"][bias_type]["ss"]
        assert kept["lms_drop"] == stage["before"][bias_type]["lms"] - stage["after"][bias_type]["lms"]
        assert variants["multiple:1"]["per_batch"][bias_type] == kept
    grid = json.loads((demo / "stages" / "train_editor.json").read_text())["result"]["arguments"]["edit_scales"]
    for name in ("later", "untrained", "ridge:0.5"):
        assert [row["scale"] for row in variants[name]["calibration"]][:len(grid)] == grid
    editors = tmp_path / "pb-editors"
    assert script.editors_folder(out) == editors
    out.unlink()  # the report gone, its calibrated editors still there: refused, not overwritten
    with pytest.raises(SystemExit):
        script.main(["--run", str(demo), "--variants", "kept", "--out", str(out)])
    assert not out.exists()

    def parameters(folder, skip_lr=True):  # the calibration scales only the step sizes lr
        editor = BiasEditor.from_pretrained(folder)
        return {f"{key}.{name}": value for key, net in editor.nets.items()
                for name, value in net.state_dict().items() if not (skip_lr and name == "lr")}

    average = load_file(str(demo / "editor" / "checkpoint" / "average.safetensors"))
    later = BiasEditor.from_pretrained(editors / "later")
    for index, (name, parameter) in enumerate(later.named_parameters()):
        if not name.endswith(".lr"):
            assert torch.equal(parameter, average[str(index)]), name

    peft_model, _, _ = build_model(config)
    fresh, _ = editor_preset(config.model, peft_model).editor_and_arguments(peft_model, str(tmp_path), seed=0)
    untrained = parameters(editors / "untrained")
    for key, net in fresh.nets.items():
        for name, value in net.named_parameters():
            if name != "lr":
                assert torch.equal(untrained[f"{key}.{name}"], value), name
        assert untrained[f"{key}.normalizer.count"].item() > 0  # fitted on the training groups

    norms = variants["ridge:0.5"]["mean_squared_key_norm"]
    ridged = BiasEditor.from_pretrained(editors / "ridge-0.5")
    kept_parameters = parameters(demo / "editor")
    for name in ridged.config.targets:
        net, index = ridged.net_for(name)
        assert net.ridge(index).item() == pytest.approx(0.5 * norms[name], rel=1e-6)
    assert all(torch.equal(value, kept_parameters[key]) for key, value in parameters(editors / "ridge-0.5").items()
               if not key.endswith("log_lambda"))
