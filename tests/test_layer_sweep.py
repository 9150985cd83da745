"""Layer selection: candidate sets, the recommendation rule, tracing's choice, a sweep on a tiny model, the CLI."""

from __future__ import annotations

import json

import pytest

from biasedit_peft.editor import Preset
from biasedit_peft.tuner.deltas import edit_targets
from biasedit_peft.workflows.layer_sweep import (
    CandidateResult,
    SweepSettings,
    candidate_sets,
    compare_with_tracing,
    format_sweep,
    plot_sweep,
    recommend,
    sweep_layers,
    tracing_choice,
)

from factories import editor_tokenizer, samples, stereoset_items, tiny_model


def _result(name, ss, lms, lms_pre=80.0, layers=(0,)) -> CandidateResult:
    return CandidateResult(name, list(layers), ss=ss, lms=lms, ss_pre=70.0, lms_pre=lms_pre, steps=1, seconds=0.0)


def test_candidate_sets():
    assert candidate_sets(4, 2) == [("first", [0, 1]), ("last", [2, 3])]
    assert candidate_sets(4, 2, every_window=True) == [("first", [0, 1]), ("blocks 1-2", [1, 2]), ("last", [2, 3])]
    assert [name for name, _ in candidate_sets(4, 1, every_window=True)] == ["first", "block 1", "block 2", "last"]
    assert candidate_sets(3, 3) == [("all", [0, 1, 2])]  # first == last: one candidate
    for budget in (0, 5):
        with pytest.raises(ValueError, match="budget"):
            candidate_sets(4, budget)


def test_recommend_prefers_ss_near_50_then_the_smallest_lms_drop():
    results = [_result("a", 52.0, 75.0), _result("b", 51.5, 79.0), _result("c", 60.0, 80.0)]
    assert recommend(results, ss_tolerance=1.0) == 1  # a and b tied on SS; b loses 1 LMS point, a 5
    results = [_result("a", 48.0, 79.5), _result("b", 51.0, 77.0)]
    assert recommend(results, ss_tolerance=1.0) == 0  # |SS-50| 2 vs 1: tied within 1, a drops less LMS
    assert recommend(results, ss_tolerance=0.5) == 1  # not tied: b is closer to 50
    assert recommend([_result("a", 55.0, 70.0), _result("b", 45.0, 70.0)]) == 0  # full tie: the earlier


def test_tracing_choice_and_comparison():
    fraction = [0.5, 0.1, None, 0.2]
    assert tracing_choice(fraction, [[0, 1], [2, 3]]) == 0
    assert tracing_choice(fraction, [[1, 2], [2, 3]]) == 1  # None counts as 0
    trace = {"kinds": {"mlp": {"per_layer_fraction": fraction}}, "ranked_layers": {"mlp": [0, 3, 1, 2]}}
    candidates = [_result("first", 60.0, 70.0, layers=(0, 1)), _result("last", 50.0, 70.0, layers=(2, 3))]
    view = compare_with_tracing(candidates, recommended=1, trace=trace, budget=2)
    assert view["top_blocks"] == [0, 3] and view["candidate"] == "first" and view["agrees"] is False
    assert compare_with_tracing(candidates, 0, trace, 2)["agrees"] is True


def test_sweep_trains_each_candidate_on_its_own_blocks(tmp_path):
    built = []

    def load_model():
        built.append(tiny_model(size="editor"))
        return built[-1]

    preset = Preset(n_edits=4, batch_size=4, lr=1e-2, meta_lr=1e-3, loc_coef=1.0, rank=8, epochs=1)
    settings = SweepSettings(budget=1, every_window=True, max_steps=1)
    result = sweep_layers(load_model, editor_tokenizer(), samples(8), stereoset_items(8)[::-1], settings, preset)
    assert [c.layers for c in result.candidates] == [[0], [1], [2]]
    assert len(built) == 3  # one fresh model per candidate; the first also gave the block count
    for candidate, model in zip(result.candidates, built):
        names = list(edit_targets(model))
        assert len(names) == 1 and names[0].endswith(f"h.{candidate.layers[0]}.mlp.c_proj")
    assert len({(c.ss_pre, c.lms_pre) for c in result.candidates}) == 1  # the unedited scores do not depend on it
    assert all(c.steps == 1 and 0 <= c.ss <= 100 and 0 <= c.lms <= 100 for c in result.candidates)
    document = json.loads(json.dumps(result.to_json(), allow_nan=False))
    assert document["recommended"] == result.candidates[result.recommended].name
    assert document["tracing"] is None and document["n_layers"] == 3
    assert set(document["candidates"][0]) == {"name", "layers", "ss", "lms", "ss_pre", "lms_pre", "steps", "seconds",
                                              "lms_drop", "icat"}
    table = format_sweep(document)
    assert [line.split()[0] for line in table.splitlines() if "<- recommended" in line] == [document["recommended"]]
    pytest.importorskip("matplotlib")
    plot_sweep(document, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_sweep_command_on_the_testbed(tmp_path, capsys):
    from biasedit_peft.cli import main

    code = main(["sweep-layers", "--model", "testbed", "--budget", "2", "--max-steps", "1", "--train-limit", "16",
                 "--eval-limit", "16", "--n-edits", "8", "--trace-limit", "3", "--samples", "1",
                 "--out", str(tmp_path), "--quiet", "--threads", "1"])
    assert code == 0
    document = json.loads((tmp_path / "sweep.json").read_text())
    assert [c["layers"] for c in document["candidates"]] == [[0, 1], [2, 3]]
    assert document["n_held_out"] == 16
    fields = ("name", "layers", "ss", "lms", "ss_pre", "lms_pre", "steps", "seconds")
    candidates = [CandidateResult(**{k: c[k] for k in fields}) for c in document["candidates"]]
    recommended = recommend(candidates, document["settings"]["ss_tolerance"])
    assert document["recommended"] == candidates[recommended].name  # the rule, applied to the printed scores
    fraction = document["tracing"]["mlp_per_layer_fraction"]
    assert len(fraction) == 4
    chosen = tracing_choice(fraction, [c.layers for c in candidates])
    assert document["tracing"]["candidate"] == candidates[chosen].name
    assert document["tracing"]["agrees"] == (chosen == recommended)
    assert "recommended:" in capsys.readouterr().out
