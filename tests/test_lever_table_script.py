"""``scripts/lever_table.py``: one row per demo run, every number read from its ``results.json``."""

from __future__ import annotations

import json

from factories import script_module


def _results(deployed_ss: float, outside_ci: bool) -> dict:
    types = ("gender", "race", "religion")
    stereoset = {t: {"ss": 60.0, "lms": 90.0} for t in types}
    after = {t: {"ss": deployed_ss, "lms": 88.5} for t in types}
    crows = {"gender": {"metric": 55.0}, "race-color": {"metric": 52.0}, "religion": {"metric": 51.0}}
    return {"before": {"stereoset": stereoset, "crows": crows, "perplexity": 40.0},
            "after": {"stereoset": after, "crows": crows, "perplexity": 41.0},
            "protocols": {"per_batch": {"after": {t: {"ss": 51.0} for t in types}}, "deployment": {"scale": 8.0}},
            "targets": {"deployment": {t: {"ss_after": deployed_ss, "ss_outside_ci": outside_ci} for t in types}},
            "training": {"best_step": 75}}


def test_rows_are_read_from_each_runs_results(tmp_path, capsys):
    script = script_module("lever_table")
    for name, (ss, outside) in {"a": (55.0, True), "b": (59.0, False)}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(_results(ss, outside)))
    script.main([f"first={tmp_path / 'a'}", f"second={tmp_path / 'b'}"])
    printed = capsys.readouterr().out.splitlines()
    assert printed[2] == ("| first | 51.0 / 51.0 / 51.0 | 55.0 / 55.0 / 55.0 | 1.5 / 1.5 / 1.5 | 55.0 / 52.0 / 51.0 | "
                          "+2.5 % | 8 | 75 |")
    assert "59.0* / 59.0* / 59.0*" in printed[3]  # inside the before-CI: starred
