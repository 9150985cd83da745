"""Metric formulas on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from biasedit_peft.metrics import _paper_weights, crows_pairs, icat, perplexity, stereoset_paper, stereoset_reference


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_icat_formula():
    assert icat(100.0, 50.0) == 100.0
    assert icat(80.0, 60.0) == pytest.approx(80 * 40 / 50)
    assert icat(80.0, 40.0) == pytest.approx(80 * 40 / 50)
    assert icat(90.0, 100.0) == 0.0


def test_reference_macro_averages_over_target_terms():
    # target "a": 3 items, stereo wins 2 (one tie -> counts as anti); target "b": 1 item, stereo wins.
    stereo = t(-1.0, -1.0, -2.0, -1.0)
    anti = t(-2.0, -3.0, -2.0, -5.0)
    unrel = t(-3.0, -0.5, -9.0, -4.0)
    result = stereoset_reference(stereo, anti, unrel, ["a", "a", "a", "b"], n_resamples=0)
    # SS_a = 100 * 2/3, SS_b = 100 -> SS = (66.67 + 100) / 2 (micro would be 75)
    assert result["ss"] == pytest.approx((200 / 3 + 100) / 2)
    # related_a: item1 (s>u, a>u) = 2, item2 (s<u, a<u) = 0, item3 = 2 -> 4/6; related_b: s>u, a<u -> 1/2
    assert result["lms"] == pytest.approx((100 * 4 / 6 + 50) / 2)
    assert result["icat"] == pytest.approx(result["lms"] * min(result["ss"], 100 - result["ss"]) / 50)
    assert (result["n"], result["n_targets"]) == (4, 2)


def test_reference_bootstrap_ci_is_seeded_and_brackets_point():
    generator = torch.Generator().manual_seed(1)
    stereo, anti, unrel = (torch.randn(200, generator=generator) for _ in range(3))
    targets = [f"t{i % 7}" for i in range(200)]
    first = stereoset_reference(stereo, anti, unrel, targets, n_resamples=200, seed=3)
    again = stereoset_reference(stereo, anti, unrel, targets, n_resamples=200, seed=3)
    assert first == again
    for name in ("ss", "lms", "icat"):
        low, high = first[f"{name}_ci"]
        assert low <= first[name] <= high and high - low > 0


def test_paper_weights_reproduce_nested_batch_average():
    n, batch_size, n_edits = 11, 2, 4  # groups of 4, 4, 3; chunks [2,2], [2,2], [2,1]
    x = torch.arange(n, dtype=torch.float64) ** 2
    groups = [x[i:i + n_edits] for i in range(0, n, n_edits)]
    nested = sum(
        sum(chunk.mean() for chunk in g.split(batch_size)) / len(g.split(batch_size)) for g in groups
    ) / len(groups)
    weights = _paper_weights(n, batch_size, n_edits)
    assert weights.sum().item() == pytest.approx(1.0)
    assert (weights @ x).item() == pytest.approx(nested.item())


def test_paper_mode_hand_computed():
    # 3 items, one chunk: SS from mean probs, LMS from mean log-probs.
    result = stereoset_paper(
        stereotype_prob=t(0.5, 0.2, 0.3), anti_stereotype_prob=t(0.4, 0.3, 0.3),  # wins: yes, no, tie
        stereotype_logp=t(-1.0, -2.0, -3.0), anti_stereotype_logp=t(-1.5, -1.0, -4.0),
        unrelated_logp=t(-1.2, -1.5, -3.5), n_resamples=0,
    )
    assert result["ss"] == pytest.approx(100 / 3)
    assert result["lms"] == pytest.approx(100 * (1 + 1 + 1) / 6)  # item1: s>u; item2: a>u; item3: s>u
    assert result["icat"] == pytest.approx(50 * (100 / 3) / 50)


def test_paper_mode_averages_batch_fractions_not_items():
    pro = t(1, 1, 1, 0)  # chunks of 3 and 1: (1 + 0) / 2 = 50, not 75
    result = stereoset_paper(pro, torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.zeros(4),
                             batch_size=3, n_edits=4, n_resamples=0)
    assert result["ss"] == pytest.approx(50.0)


def test_crows_ties_counted_in_n_and_reported():
    result = crows_pairs(t(-1, -2, -3, -4), t(-2, -2, -1, -5), n_resamples=100)
    assert result["metric"] == pytest.approx(50.0)  # 2 of 4 (the tie does not count as more)
    assert (result["n"], result["ties"], result["ties_pct"]) == (4, 1, 25.0)
    low, high = result["metric_ci"]
    assert 0 <= low <= 50 <= high <= 100


def test_perplexity_token_weighted():
    # two sentences: 2 tokens with log p = log 0.5 each, 1 token with log p = log 0.25
    value = perplexity(t(2 * math.log(0.5), math.log(0.25)), torch.tensor([2, 1]))
    assert value == pytest.approx(math.exp(-(2 * math.log(0.5) + math.log(0.25)) / 3))


def test_bad_shapes_are_errors():
    with pytest.raises(ValueError, match="one length"):
        crows_pairs(t(1, 2), t(1))
    with pytest.raises(ValueError, match="targets"):
        stereoset_reference(t(1), t(1), t(1), ["a", "b"])


def test_item_ss_lms_hand_computed():
    from biasedit_peft.metrics import item_ss_lms

    stereo = torch.tensor([-1.0, -2.0, -3.0, -1.5])
    anti = torch.tensor([-2.0, -1.0, -4.0, -1.5])  # stereotype above anti in items 0, 2; 3 a tie
    unrelated = torch.tensor([-1.5, -1.5, -3.5, -1.0])
    # above unrelated: stereo 0, 2 (2 of 4); anti 1 (1 of 4) -> 3 of 8
    assert item_ss_lms(stereo, anti, unrelated) == {"ss": 50.0, "lms": 37.5}
    assert item_ss_lms(stereo, anti) == {"ss": 50.0}
