"""``biasedit bench``: timing helper, and the figures of the cheap sections on the testbed."""

from __future__ import annotations

import json

import pytest
import torch

from biasedit_peft import models
from biasedit_peft.cli import main
from biasedit_peft.workflows.bench import BenchConfig, bench_forward, bench_size, bench_solve, run_bench, timed


def test_timed_warms_up_once_then_times_each_repeat():
    calls = []
    result = timed(lambda: calls.append(1), repeats=4)
    assert len(calls) == 5 and result["repeats"] == 4
    assert result["min_s"] <= result["median_s"] <= result["max_s"]


def test_forward_merged_equals_unmerged_adapter():
    result = bench_forward(BenchConfig(forward_repeats=2))
    assert result["max_abs_logit_difference_merged_vs_unmerged"] < 1e-4
    assert result["max_abs_logit_difference_unmerged_vs_base"] > 1e-2  # the delta is seen, so the check can fail
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
    from biasedit_peft.workflows.bench import _memory_phase

    result = _memory_phase("debiasing", BenchConfig(limit=1))
    assert result["n_debias_samples"] == 3  # one item of each bias type
    assert result["peak_is_of_the_phase_alone"]  # Linux: the peak was reset after loading
    assert result["peak_rss_mib"] >= 0.99 * result["rss_after_load_mib"] > 0


def test_an_interrupted_quality_section_keeps_the_variants_already_run(tmp_path, monkeypatch):
    import biasedit_peft.workflows.demo as demo

    stereoset = {"gender": {"ss": 60.0, "lms": 80.0, "icat": 64.0, "n": 2}}
    fake = {"edit": {"layers": ["transformer.h.3.mlp.c_proj"]},
            "before": {"stereoset": stereoset, "perplexity": 10.0},
            "after": {"stereoset": stereoset, "perplexity": 10.0},
            "protocols": {**{p: {"before": stereoset, "after": stereoset}
                             for p in ("per_batch", "held_out", "joint_on_test")},
                          "deployment": {"edit_data": "stereoset:train", "scale": 2.0}},
            "targets": {"deployment": {"all_ok": False}},
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
    # a table of the stopped bench says it is partial: in the printed summary and in results_tables' markdown
    from biasedit_peft.workflows.bench import format_bench

    from factories import script_module

    fake["after_deployment"] = fake["after"]
    saved["sections"]["quality"]["default"] = {**saved["sections"]["quality"]["default"], **fake}
    partial = "quality section PARTIAL: the bench stopped before it finished"
    assert format_bench(saved).splitlines()[-1].startswith(partial)
    tables = script_module("results_tables").bench_tables(saved)
    assert tables[-1].startswith(f"**{partial}") and any(line.startswith("| default |") for line in tables)
    del saved["sections"]["quality"]["partial"]
    assert partial not in format_bench(saved) and partial not in "\n".join(
        script_module("results_tables").bench_tables(saved))


# ----- speed section: goals, token counts, compute bound ---------------------------------------------------
TINY_SPEED = {"repeats": 1, "n_edits": 2, "throughput_limit": 1, "throughput_repeats": 1, "matmul_size": 32,
              "progress": False}


@pytest.fixture(scope="module")
def speed():
    """One tiny speed section on the testbed, fp32 and bf16 (shared by the tests below)."""
    from biasedit_peft.workflows.bench import bench_speed

    return bench_speed(BenchConfig(**TINY_SPEED))


def test_round_robin_interleaves_calls_and_skips_the_warm_up_round():
    from biasedit_peft.workflows.bench import round_robin

    order = []
    timings = round_robin({"a": lambda r: order.append(("a", r)) or r, "b": lambda r: order.append(("b", r))}, 2)
    assert order == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)]
    assert timings["a"].results == [1, 2] and timings["a"].stats()["repeats"] == 2


def test_forward_flops_are_twice_the_matmul_weights_by_hand():
    from biasedit_peft.models import load_model
    from biasedit_peft.workflows.bench import forward_flops_per_token

    model = load_model("testbed")
    c = model.config
    inner = c.n_inner or 4 * c.n_embd
    # per block: c_attn d x 3d, attn c_proj d x d, c_fc d x inner, mlp c_proj inner x d; then the tied LM head V x d
    by_hand = c.n_layer * (3 * c.n_embd ** 2 + c.n_embd ** 2 + 2 * c.n_embd * inner) + c.vocab_size * c.n_embd
    flops = forward_flops_per_token(model)
    assert flops["matmul_parameters"] == by_hand and flops["flops_per_token"] == 2 * by_hand
    assert flops["lm_head_tied"] and flops["lm_head_parameters"] == c.vocab_size * c.n_embd
    assert flops["embedding_parameters_not_counted"] == (c.vocab_size + c.n_positions) * c.n_embd


def test_agreement_of_identical_scores_is_100_and_a_hand_case_75():
    from biasedit_peft.scoring import SentenceLogProbs
    from biasedit_peft.workflows.bench import ScoringWorkload, agreement_pct, decision_agreement

    def scores(means):
        mean = torch.tensor(means)
        return SentenceLogProbs(mean, mean, torch.ones(len(means), dtype=torch.long))

    # 4 items, role-major: stereotypes, anti-stereotypes, unrelated; 2 CrowS pairs: sent_more, sent_less
    workload = ScoringWorkload(stereoset_items=[None] * 4, crows_pairs=[None] * 2, sections={})
    reference = {"stereoset": scores([-1.0, -2.0, -3.0, -1.0] + [-2.0, -1.0, -1.0, -2.0] + [-5.0] * 4),
                 "crows": scores([-1.0, -3.0, -2.0, -2.0])}
    same = decision_agreement(reference, reference, workload)
    assert same["stereoset_pct"] == 100.0 and same["crows_pct"] == 100.0 and same["stereoset_disagreements"] == 0
    flipped = {"stereoset": scores([-1.0, -2.0, -0.5, -1.0] + [-2.0, -1.0, -1.0, -2.0] + [-5.0] * 4),
               "crows": reference["crows"]}  # item 2: -3 < -1 becomes -0.5 > -1
    assert decision_agreement(reference, flipped, workload)["stereoset_pct"] == 75.0
    assert agreement_pct(torch.tensor([True, False]), torch.tensor([False, True])) == 0.0
    assert agreement_pct(torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.bool)) is None


def test_batched_token_counts_follow_score_sentences_batches():
    from biasedit_peft.models import load_tokenizer
    from biasedit_peft.scoring import encode_sentences
    from biasedit_peft.workflows.bench import batched_token_counts

    tokenizer = load_tokenizer("testbed")
    sentences = ["a b", "a b c d e f", "a", "a b c"]
    lengths = sorted(encode_sentences(tokenizer, sentences).attention_mask.sum(-1).tolist(), reverse=True)
    counts = batched_token_counts(tokenizer, sentences, batch_size=2)
    assert counts["real_tokens"] == sum(lengths)
    assert counts["padded_tokens"] == 2 * lengths[0] + 2 * lengths[2]  # batches: 2 longest, 2 shortest


def test_speed_counts_the_tokens_score_sentences_feeds_the_model(speed):
    from biasedit_peft.models import load_tokenizer
    from biasedit_peft.workflows.bench import evaluate_workload, workload_token_counts

    scoring = speed["scoring"]
    sample = workload_token_counts(load_tokenizer("testbed"), evaluate_workload(1), scoring["batch_size"])["total"]
    for entry in scoring["by_dtype"].values():  # counted by a forward hook == counted from the tokenizer
        assert (entry["real_tokens"], entry["padded_tokens"]) == (sample["real_tokens"], sample["padded_tokens"])
    full = scoring["evaluate_extrapolation"]["full_workload"]
    assert full["stereoset"]["sentences"] == 3 * 2106 and full["crows"]["sentences"] == 2 * 1508
    assert full["total"]["real_tokens"] <= full["total"]["padded_tokens"]


def test_speed_ratio_fields_are_consistent(speed):
    scoring, meta = speed["scoring"], speed["meta_step"]
    flops = scoring["flops"]["flops_per_token"]
    for dtype, entry in scoring["by_dtype"].items():
        rate = scoring["matmul"][dtype]
        assert rate["gflops"] == pytest.approx(2 * 32 ** 3 / rate["seconds"]["median_s"] / 1e9)
        for kind in ("real", "padded"):
            bound = entry[kind]
            assert bound["bound_tokens_per_s"] == pytest.approx(rate["gflops"] * 1e9 / flops)
            assert bound["tokens_per_s"] == pytest.approx(entry[f"{kind}_tokens"] / entry["seconds"]["median_s"])
            assert bound["fraction_of_bound"] == pytest.approx(bound["tokens_per_s"] / bound["bound_tokens_per_s"])
        estimate = scoring["evaluate_extrapolation"]["by_dtype"][dtype]
        full = scoring["evaluate_extrapolation"]["full_workload"]["total"]
        assert estimate["seconds"] == pytest.approx(full["padded_tokens"] / entry["padded"]["tokens_per_s"])
        assert estimate["minutes"] == pytest.approx(estimate["seconds"] / 60)
    for dtype, entry in meta["by_dtype"].items():
        tokens = entry["tokens"]
        assert tokens["forwards"] > 0 and 0 < tokens["padded_with_grad"] < tokens["padded"]
        assert tokens["real"] <= tokens["padded"]
        seconds = entry["seconds_per_step"]["median_s"]  # one timed round: the total is the median
        equivalent = tokens["padded"] + 2 * tokens["padded_with_grad"]  # forward + backward = 3 x forward
        assert entry["forward_equivalent"]["tokens_per_s"] == pytest.approx(equivalent / seconds)
        assert entry["forward_equivalent"]["bound_tokens_per_s"] == pytest.approx(
            meta["matmul"][dtype]["gflops"] * 1e9 / flops)
    assert speed["seconds_per_step"] == meta["by_dtype"]["fp32"]["seconds_per_step"] and speed["dtype"] == "fp32"


def test_scoring_and_the_meta_step_are_split_by_part_in_each_dtype_and_bound_the_ratio(speed):
    from biasedit_peft.profiling import PARTS, float32_parts_bound, float32_seconds
    from biasedit_peft.workflows.bench import matmul_rate_ratio

    for section, seconds_of, editor_runs in ((speed["meta_step"], "seconds_per_step", True),
                                             (speed["scoring"], "seconds", False)):
        for entry in section["by_dtype"].values():
            by_part = entry["by_part"]
            assert list(by_part["seconds"]) == list(PARTS) and min(by_part["seconds"].values()) >= 0
            assert sum(by_part["seconds"].values()) == pytest.approx(by_part["wall_s"])
            assert sum(by_part["shares"].values()) == pytest.approx(1.0)
            assert by_part["seconds"]["vocabulary_float32"] > 0
            assert (by_part["seconds"]["editor_float32"] > 0) == editor_runs  # scoring runs no editor
        step = {dtype: entry[seconds_of]["median_s"] for dtype, entry in section["by_dtype"].items()}
        fixed = {dtype: step[dtype] * float32_seconds(entry["by_part"]["shares"])
                 for dtype, entry in section["by_dtype"].items()}
        assert section["float32_parts_bound"] == pytest.approx(
            float32_parts_bound(step["fp32"], fixed["fp32"], fixed["bf16"], matmul_rate_ratio(section["matmul"])))


def test_speed_goals_are_judged_against_their_measurements(speed):
    scoring, meta = speed["scoring"], speed["meta_step"]
    goals = {row["key"]: row for row in speed["goals"]}
    assert set(goals) == {"evaluate_minutes.fp32", "evaluate_minutes.bf16", "meta_step_seconds.fp32",
                          "meta_step_seconds.bf16", "bf16_scoring_speedup", "bf16_meta_step_speedup",
                          "bf16_decision_agreement"}
    speedup = scoring["by_dtype"]["fp32"]["seconds"]["median_s"] / scoring["by_dtype"]["bf16"]["seconds"]["median_s"]
    assert goals["bf16_scoring_speedup"]["measured"] == pytest.approx(speedup)
    step = {dtype: entry["seconds_per_step"]["median_s"] for dtype, entry in meta["by_dtype"].items()}
    assert goals["bf16_meta_step_speedup"]["measured"] == pytest.approx(step["fp32"] / step["bf16"])
    agreement = scoring["decision_agreement"]["bf16_vs_fp32"]
    assert goals["bf16_decision_agreement"]["measured"] == agreement["stereoset_pct"]
    assert agreement["stereoset_items"] == 4  # one per StereoSet bias type
    for row in goals.values():
        at_most = row["comparison"] == "<="
        assert row["met"] == (row["measured"] <= row["goal"] if at_most else row["measured"] >= row["goal"])
    assert "(the goal is set at 32)" in goals["meta_step_seconds.fp32"]["name"]  # measured at n_edits 2


def test_speed_summary_lines(speed):
    from biasedit_peft.workflows.bench import format_bench

    text = format_bench({"sections": {"speed": speed}})
    assert "compute bound: 32^2 matmul fp32" in text and "MFLOP/token" in text and "load average" in text
    cpu = speed["cpu"]  # which CPU: bf16 speed depends on its features, and seeds repeat only on one CPU
    assert cpu == models.cpu_identity() and f" threads of {cpu['model']} (" in text
    assert "scoring (" in text and "tok/s bound" in text and "(goal 2.5x: " in text
    assert "decisions agree on" in text and "of 4 items (goal 98 %: " in text
    assert "evaluate --benchmark all extrapolated fp32" in text and "(goal 4 min: " in text
    assert "meta-training step (2 edits, LM batch 8, bf16)" in text and "speed goals met:" in text
    assert "by part (fp32, one profiled step of " in text and "vocabulary log-softmax (float32) " in text
    assert "by part (bf16, one profiled round of " in text
    for section in ("meta_step", "scoring"):
        assert f"bf16/fp32 is at most {speed[section]['float32_parts_bound']:.2f}x" in text


def test_speed_with_one_dtype_reports_no_ratio(monkeypatch):
    from biasedit_peft.workflows import bench

    monkeypatch.setattr(bench, "bench_meta_step", lambda config, flops: {
        "n_edits": 2, "batch_size": 8, "by_dtype": {"bf16": {"seconds_per_step": {"median_s": 1.0},
                                                                "samples_per_second": 2.0}}})
    result = bench.bench_speed(BenchConfig(**{**TINY_SPEED, "dtypes": ("bf16",)}))
    goals = {row["key"]: row for row in result["goals"]}
    assert goals["bf16_scoring_speedup"]["met"] is None and goals["bf16_decision_agreement"]["met"] is None
    assert result["scoring"]["decision_agreement"] == {} and set(result["scoring"]["by_dtype"]) == {"bf16"}


def test_bench_config_refuses_unknown_dtypes():
    with pytest.raises(ValueError, match="dtypes"):
        BenchConfig(dtypes=("fp32", "int8"))
    with pytest.raises(ValueError, match="throughput_limit"):
        BenchConfig(throughput_limit=0)


def test_bench_cli_passes_the_speed_flags(tmp_path, monkeypatch):
    from biasedit_peft.workflows import bench

    seen = []
    monkeypatch.setattr(bench, "run_bench", lambda config, **kwargs: seen.append(config) or {"sections": {}})
    code = main(["bench", "--sections", "speed", "--dtypes", "bf16", "--throughput-limit", "3",
                 "--throughput-repeats", "4", "--score-batch-size", "8", "--matmul-size", "256",
                 "--forward-repeats", "3", "--out", str(tmp_path), "--quiet"])
    (config,) = seen
    assert code == 0 and config.dtypes == ("bf16",) and config.throughput_limit == 3
    shape = (config.throughput_repeats, config.score_batch_size, config.matmul_size, config.forward_repeats)
    assert shape == (4, 8, 256, 3)
    assert main(["bench", "--dtypes", "fp64", "--out", str(tmp_path), "--quiet"]) == 2


# ----- scaling section: 1 and 2 processes ------------------------------------------------------------------
def test_scaling_reports_both_process_counts_their_ratio_and_agreeing_deltas(tmp_path):
    from biasedit_peft.workflows.bench import format_bench
    from biasedit_peft.workflows.scaling import bench_scaling

    result = bench_scaling(BenchConfig(out=str(tmp_path), repeats=1, n_edits=4, progress=False), rounds=1)
    one, two = result["runs"]["1"], result["runs"]["2"]
    assert (one["processes"], two["processes"]) == (1, 2) and len(one["rounds_seconds_per_meta_step"]) == 1
    assert one["debias_tokens"] == two["debias_tokens"] > 0  # the same 512 samples, split
    assert result["meta_step_throughput_ratio"] == pytest.approx(two["meta_steps_per_second"] /
                                                                 one["meta_steps_per_second"])
    assert result["debias_throughput_ratio"] == pytest.approx(two["debias_samples_per_second"] /
                                                              one["debias_samples_per_second"])
    assert len(result["debias_delta_relative_difference"]) == 3
    assert max(result["debias_delta_relative_difference"].values()) < 1e-5
    assert "throughput ratio meta-step" in format_bench({"sections": {"scaling": result}})
