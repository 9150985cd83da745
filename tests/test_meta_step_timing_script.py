"""``scripts/meta_step_timing.py`` on the testbed: every variant runs and replay gives the same losses."""

from __future__ import annotations

from factories import script_module


def test_meta_step_timing_runs_every_variant_and_replay_changes_no_loss(capsys):
    script = script_module("meta_step_timing")
    medians = script.main(["--model", "testbed", "--n-edits", "8", "--rounds", "2"])
    assert set(medians) == {"8-False", "8-True", "16-True"} and all(v > 0 for v in medians.values())
    lines = capsys.readouterr().out.splitlines()
    for round_number in range(2):
        losses = [line.rsplit("loss ", 1)[1] for line in lines if line.startswith(f"round {round_number} n_edits 8 ")]
        assert len(losses) == 2 and losses[0] == losses[1]
