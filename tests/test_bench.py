"""``biasedit bench``: timing helper, and the figures of the cheap sections on the testbed."""

from __future__ import annotations

import json

import pytest

from biasedit_peft.bench import BenchConfig, bench_forward, bench_size, bench_solve, run_bench, timed
from biasedit_peft.cli import main


def test_timed_warms_up_once_then_times_each_repeat():
    calls = []
    result = timed(lambda: calls.append(1), repeats=4)
    assert len(calls) == 5 and result["repeats"] == 4
    assert result["min_s"] <= result["median_s"] <= result["max_s"]


def test_forward_merged_equals_unmerged_adapter():
    result = bench_forward(BenchConfig(forward_repeats=2))
    assert result["max_abs_logit_difference_merged_vs_unmerged"] < 1e-4
    assert result["batch"][0] == 64


def test_solve_primal_and_dual_agree_and_auto_picks_the_smaller_system():
    result = bench_solve(BenchConfig(repeats=1, solve_sizes=(2,)))
    (row,) = result["sizes"]
    assert row["n_samples"] == 2 and row["n_tokens"] < row["key_size"]
    assert row["auto_form"] == "dual"
    assert row["primal_vs_dual_relative_difference"] < 1e-3


def test_size_factored_is_smaller_than_dense_for_few_tokens_and_lora_exact_at_full_rank():
    result = bench_size(BenchConfig(limit=1, lora_ranks=(1, 64)))
    assert result["n_tokens"] < 64
    assert result["factored"] < result["dense"]
    assert result["as_written_by_debias"] < result["dense"]  # debias keeps the exact U^T C factors
    assert result["lora"]["64"]["relative_error"] < 1e-5
    assert result["lora"]["1"]["bytes"] < result["lora"]["64"]["bytes"]


def test_unknown_section_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="Unknown bench section"):
        run_bench(BenchConfig(out=str(tmp_path), sections=("speed", "nope")))


def test_bench_cli_writes_json_per_section(tmp_path):
    code = main(["bench", "--sections", "forward", "--repeats", "1", "--out", str(tmp_path / "b"),
                 "--json", str(tmp_path / "copy.json"), "--quiet"])
    assert code == 0
    data = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert list(data["sections"]) == ["forward"]
    assert data["sections"]["forward"]["base"]["repeats"] == 20
    assert json.loads((tmp_path / "copy.json").read_text()) == data


def test_solve_skips_systems_over_the_limit():
    result = bench_solve(BenchConfig(repeats=1, solve_sizes=(2,), max_system=16))
    (row,) = result["sizes"]
    assert "skipped" in row["solve_one_layer"]["primal"] and "skipped" in row["solve_one_layer"]["dual"]
    assert row["primal_vs_dual_relative_difference"] is None


def test_memory_phase_reports_a_peak_at_least_the_loaded_size():
    from biasedit_peft.bench import _memory_phase

    result = _memory_phase("debiasing", BenchConfig(limit=1))
    assert result["n_debias_samples"] == 3  # one item of each bias type
    assert result["peak_is_of_the_phase_alone"]  # Linux: the peak was reset after loading
    assert result["peak_rss_mib"] >= 0.99 * result["rss_after_load_mib"] > 0


def test_an_interrupted_quality_section_keeps_the_variants_already_run(tmp_path, monkeypatch):
    import biasedit_peft.demo as demo

    stereoset = {"gender": {"ss": 60.0, "lms": 80.0, "icat": 64.0, "n": 2}}
    fake = {"edit": {"layers": ["transformer.h.3.mlp.c_proj"]},
            "before": {"stereoset": stereoset, "perplexity": 10.0}, "after": {"stereoset": stereoset, "perplexity": 10.0},
            "protocols": {p: {"before": stereoset, "after": stereoset} for p in ("per_batch", "held_out")},
            "training": {"steps": 1}, "seconds": {"total": 0.1}}
    calls = []

    def run_demo(config):
        calls.append(config.out)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return fake

    monkeypatch.setattr(demo, "run_demo", run_demo)
    with pytest.raises(KeyboardInterrupt):
        run_bench(BenchConfig(out=str(tmp_path), sections=("quality",), progress=False))
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["sections"]["quality"]["partial"] is True
    assert saved["sections"]["quality"]["default"]["per_batch"]["after"]["gender"]["ss"] == 60.0
    assert "paper_loss" not in saved["sections"]["quality"]
