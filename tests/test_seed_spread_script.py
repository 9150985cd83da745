"""``scripts/seed_spread.py``: mean and range over the seeds' ``results.json``, read, never computed."""

from __future__ import annotations

import json

import pytest

from factories import script_module


def _script():
    return script_module("seed_spread")


def _results(ss_after: float, lms_after: float, ppl_after: float, seconds: float) -> dict:
    def stereoset(ss, lms):
        return {"gender": {"ss": ss, "lms": lms, "n": 10}}

    protocol = {"before": stereoset(60.0, 90.0), "after": stereoset(ss_after, lms_after)}
    return {"before": {"stereoset": stereoset(60.0, 90.0), "crows": {"gender": {"metric": 55.0}}, "perplexity": 40.0},
            "after": {"stereoset": stereoset(ss_after + 5, lms_after), "crows": {"gender": {"metric": 54.0}},
                      "perplexity": ppl_after},
            "protocols": {"per_batch": {**protocol, "other_units": protocol}, "held_out": protocol},
            "training": {"best_step": 50, "calibration": {"scale": 0.5}}, "seconds": {"total": seconds}}


def test_mean_and_range_over_seeds_from_their_results(tmp_path, capsys):
    script = _script()
    for seed, (ss, lms, ppl, seconds) in enumerate([(50.0, 88.0, 41.0, 100.0), (54.0, 86.0, 42.0, 130.0),
                                                   (52.0, 87.0, 40.0, 160.0)]):
        folder = tmp_path / f"seed-{seed}"
        folder.mkdir()
        (folder / "results.json").write_text(json.dumps(_results(ss, lms, ppl, seconds)))
    script.main(["--out", str(tmp_path), "--seeds", "0,1,2", "--no-run", "--json", str(tmp_path / "spread.json")])
    table = json.loads((tmp_path / "spread.json").read_text())
    row = table["per-batch gender SS after"]
    assert (row["mean"], row["min"], row["max"]) == (52.0, 50.0, 54.0)
    assert table["per-batch gender LMS drop"]["mean"] == pytest.approx(3.0)  # 90 - (88 + 86 + 87) / 3
    assert table["per-batch gender |SS - 50| after"]["seeds"] == {"0": 0.0, "1": 4.0, "2": 2.0}
    assert script.metric_rows(_results(46.0, 88.0, 41.0, 1.0))["per-batch gender |SS - 50| after"] == 4.0  # undershoot
    assert table["joint adapter gender SS after"]["seeds"] == {"0": 55.0, "1": 59.0, "2": 57.0}  # an older demo
    assert table["perplexity change %"]["max"] == pytest.approx(5.0)  # 42 / 40
    assert table["seconds, total"]["mean"] == 130.0 and table["kept editor: edit scale"]["mean"] == 0.5
    printed = capsys.readouterr().out
    assert "| per-batch gender SS after | 52.00 | 50.00 - 54.00 | 50.00 | 54.00 | 52.00 |" in printed


def test_a_demo_with_the_deployment_protocol_names_its_adapter_so(tmp_path):
    script = _script()
    results = _results(50.0, 88.0, 41.0, 100.0)
    results["protocols"]["joint_on_test"] = results["protocols"]["held_out"]
    results["protocols"]["deployment"] = {"scale": 8.0}
    results["before"]["gender_swapped"] = {"gender": {"ss": 58.0, "lms": 90.0}}
    results["after"]["gender_swapped"] = {"gender": {"ss": 56.0, "lms": 89.0}}
    rows = script.metric_rows(results)
    assert rows["deployment adapter gender SS after"] == 55.0 and "joint adapter gender SS after" not in rows
    assert rows["joint delta from test gender SS after"] == 50.0
    assert rows["deployment adapter, gender-swapped gender SS after"] == 56.0
    assert rows["deployment adapter, gender-swapped gender LMS drop"] == 1.0
    assert rows["deployment adapter: joint scale"] == 8.0


def test_a_run_outside_the_seed_folders_joins_the_table_under_its_label(tmp_path, capsys):
    script = _script()
    for name, ss in (("seed-1", 50.0), ("elsewhere", 56.0)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(_results(ss, 88.0, 41.0, 100.0)))
    script.main(["--out", str(tmp_path), "--seeds", "1", "--no-run", "--run", f"shifted={tmp_path / 'elsewhere'}",
                 "--json", str(tmp_path / "spread.json")])
    row = json.loads((tmp_path / "spread.json").read_text())["per-batch gender SS after"]
    assert row["seeds"] == {"1": 50.0, "shifted": 56.0} and row["mean"] == 53.0
    assert "| metric | mean | range | seed 1 | shifted |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        script.main(["--out", str(tmp_path), "--seeds", "1", "--no-run", "--run", "no-folder"])


def test_finished_runs_made_with_other_flags_or_dtype_are_refused_naming_the_field(tmp_path, capsys):
    """As for stopped runs: the seeds of one table share every demo setting but the seed (and where it was written,
    how it was run), read from each ``results.json``'s ``config``; results without one are not compared."""
    script = _script()
    configs = {"seed-0": {"seed": 0, "dtype": "bf16", "out": "a", "command": "x"},
               "seed-1": {"seed": 1, "dtype": "bf16", "out": "b", "command": "y"},
               "seed-2": {"seed": 2, "dtype": None, "out": "c", "command": "z"}, "old": None}
    for name, config in configs.items():
        (tmp_path / name).mkdir()
        results = _results(50.0, 88.0, 41.0, 100.0) | ({"config": config} if config else {})
        (tmp_path / name / "results.json").write_text(json.dumps(results))
    script.main(["--out", str(tmp_path), "--seeds", "0,1", "--no-run", "--run", f"old={tmp_path / 'old'}"])
    assert "| per-batch gender SS after | 50.00 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        script.main(["--out", str(tmp_path), "--seeds", "0,1,2", "--no-run"])
    assert "the runs differ in {'dtype': ['bf16', 'bf16', None]}" in capsys.readouterr().err


def test_the_table_says_which_cpu_made_each_run_and_when_they_differ(tmp_path, capsys):
    script = _script()
    epyc = {"model": "AMD EPYC", "features": ["avx2", "avx512_bf16"]}
    xeon = {"model": "Intel Xeon", "features": ["avx512_bf16", "amx_bf16"]}
    for name, cpu in (("seed-0", epyc), ("seed-1", epyc), ("elsewhere", xeon)):
        (tmp_path / name).mkdir()
        results = {**_results(50.0, 88.0, 41.0, 100.0), "environment": {"cpu": cpu}}
        (tmp_path / name / "results.json").write_text(json.dumps(results))
    script.main(["--out", str(tmp_path), "--seeds", "0,1", "--no-run"])
    assert capsys.readouterr().out.splitlines()[0] == "CPU AMD EPYC (avx2, avx512_bf16): seed 0, seed 1"
    script.main(["--out", str(tmp_path), "--seeds", "0", "--no-run", "--run", f"other={tmp_path / 'elsewhere'}"])
    assert capsys.readouterr().out.splitlines()[0] == (
        "CPUs differ (seeds do not repeat across CPUs): AMD EPYC (avx2, avx512_bf16): seed 0; "
        "Intel Xeon (avx512_bf16, amx_bf16): other")
    assert script.cpu_line({0: None}) == "CPU not recorded: seed 0"  # results.json from before it was recorded


def test_runs_stopped_after_the_per_batch_protocol_are_read_from_their_stages(tmp_path, capsys):
    """``--per-batch-stages``: the per-batch rows (both units) and the kept editor from ``.seed-N.run/stages``."""
    script = _script()
    for seed, ss in ((0, 50.0), (1, 56.0)):
        stages = tmp_path / (f".seed-{seed}.run" if seed == 0 else f"seed-{seed}") / "stages"  # stopped / finished
        stages.mkdir(parents=True)
        (stages / "config.json").write_text(json.dumps({"format": 1, "config": {"seed": seed, "ss_coef": 1.0}}))
        protocol = _results(ss, 88.0, 41.0, 1.0)["protocols"]["per_batch"]
        (stages / "per_batch_protocol.json").write_text(json.dumps({"result": protocol, "seconds": 5.0}))
        (stages / "train_editor.json").write_text(json.dumps(
            {"result": {"best_step": 25 * (seed + 1), "calibration": {"scale": 2.0}}, "seconds": 100.0 + seed}))
    script.main(["--out", str(tmp_path), "--seeds", "0,1", "--per-batch-stages", "--json", str(tmp_path / "t.json")])
    table = json.loads((tmp_path / "t.json").read_text())
    assert table["per-batch gender SS after"]["seeds"] == {"0": 50.0, "1": 56.0}
    assert table["per-batch, paper-code SS gender |SS - 50| after"]["mean"] == 3.0  # (0 + 6) / 2
    assert table["kept editor: meta-step"]["seeds"] == {"0": 25, "1": 50}
    assert table["seconds, train_editor stage (its last session)"]["max"] == 101.0
    assert "perplexity change %" not in table and "held-out targets gender SS after" not in table
    assert "| per-batch gender SS after | 53.00 | 50.00 - 56.00 | 50.00 | 56.00 |" in capsys.readouterr().out
    # runs made with other flags are refused, and so are extra runs or demo arguments
    (tmp_path / "seed-1" / "stages" / "config.json").write_text(json.dumps({"config": {"seed": 1, "ss_coef": None}}))
    with pytest.raises(SystemExit):
        script.main(["--out", str(tmp_path), "--seeds", "0,1", "--per-batch-stages"])
    assert "ss_coef" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.main(["--out", str(tmp_path), "--seeds", "0", "--per-batch-stages", "--run", f"x={tmp_path}"])
