"""Debias / retention losses: hand-computed values of both variants."""

from __future__ import annotations

import math

import pytest
import torch

from biasedit_peft.editor.losses import debias_loss, retention_loss
from biasedit_peft.scoring import TokenBatch


def _batch(ids: list[list[int]], lengths: list[int]) -> TokenBatch:
    input_ids = torch.tensor(ids)
    positions = torch.arange(input_ids.shape[1])
    attention = positions[None] < torch.tensor(lengths)[:, None]
    return TokenBatch(input_ids, attention.long(), attention & (positions[None] > 0))


def _logits_for(probabilities: list[list[float]], ids: list[list[int]], vocab: int = 4) -> torch.Tensor:
    """Logits [B, T, V] under which token ids[b][t+1] has probability probabilities[b][t]."""
    batch, length = len(ids), len(ids[0])
    logits = torch.full((batch, length, vocab), -1e9)
    for b in range(batch):
        for t, p in enumerate(probabilities[b]):
            target = ids[b][t + 1]
            logits[b, t] = math.log((1 - p) / (vocab - 1))
            logits[b, t, target] = math.log(p)
    return logits


def test_paper_debias_loss_is_the_codes_symmetric_kldivloss():
    ids = [[0, 1, 2], [0, 3, 1]]  # stereotype, anti-stereotype; two scored tokens each
    probs = [[0.5, 0.2], [0.1, 0.4]]
    loss = debias_loss("paper", _logits_for(probs, ids), _batch(ids, [3, 3]))
    stereo_p, anti_p = (0.5 + 0.2) / 2, (0.1 + 0.4) / 2
    stereo_l, anti_l = (math.log(0.5) + math.log(0.2)) / 2, (math.log(0.1) + math.log(0.4)) / 2
    expected = stereo_p * (math.log(stereo_p) - anti_l) + anti_p * (math.log(anti_p) - stereo_l)
    assert loss.shape == (1,)
    assert math.isclose(loss.item(), expected, rel_tol=1e-5)


def test_token_debias_loss_is_symmetric_bernoulli_kl():
    ids = [[0, 1, 2], [0, 3, 0]]
    probs = [[0.5, 0.2], [0.1, 0.0]]  # the anti-stereotype has one scored token (length 2)
    loss = debias_loss("token", _logits_for([[0.5, 0.2], [0.1, 0.25]], ids), _batch(ids, [3, 2]))
    gap = (math.log(0.5) + math.log(0.2)) / 2 - math.log(0.1)
    q = 1 / (1 + math.exp(-gap))
    expected = q * math.log(q / (1 - q)) + (1 - q) * math.log((1 - q) / q)
    assert math.isclose(loss.item(), expected, rel_tol=1e-5)
    same = debias_loss("token", _logits_for([probs[0], probs[0]], [ids[0], ids[0]]), _batch([ids[0], ids[0]], [3, 3]))
    assert same.abs().item() < 1e-7


def test_abs_debias_loss_is_the_absolute_gap_and_its_gradient_the_gaps_sign():
    ids = [[0, 1, 2], [0, 3, 0]]
    logits = _logits_for([[0.5, 0.2], [0.1, 0.25]], ids).requires_grad_(True)
    batch = _batch(ids, [3, 2])
    loss = debias_loss("abs", logits, batch)
    gap = (math.log(0.5) + math.log(0.2)) / 2 - math.log(0.1)  # 0.7 > 0
    assert math.isclose(loss.item(), abs(gap), rel_tol=1e-6)
    (grad_abs,) = torch.autograd.grad(loss.sum(), logits)
    # chain rule: d|gap|/dlogits = sign(gap) / (d token/d gap) * d token/dlogits, token = gap tanh(gap / 2)
    token = debias_loss("token", logits, batch)
    (grad_token,) = torch.autograd.grad(token.sum(), logits)
    slope = math.tanh(gap / 2) + gap / 2 / math.cosh(gap / 2) ** 2
    torch.testing.assert_close(grad_abs, grad_token / slope)
    swapped = debias_loss("abs", _logits_for([[0.1, 0.25], [0.5, 0.2]], ids[::-1]), _batch(ids[::-1], [2, 3]))
    assert math.isclose(swapped.item(), abs(gap), rel_tol=1e-6)  # symmetric in the two sentences


def test_abs_loss_over_a_shared_shift_is_least_at_the_median_gap_token_loss_near_the_mean():
    from biasedit_peft.editor.losses import abs_debias_loss, token_debias_loss
    from biasedit_peft.scoring import SentenceLogProbs

    gaps = torch.tensor([0.05, 0.1, 0.15, 0.2, 2.5], dtype=torch.float64)  # skewed: mean 0.6, median 0.15
    shifts = torch.linspace(-1, 1, 2001, dtype=torch.float64)
    ones = torch.ones(len(gaps), dtype=torch.float64)

    def best_shift(loss_fn) -> float:
        totals = [loss_fn(SentenceLogProbs(gaps - c, gaps - c, ones), SentenceLogProbs(0 * ones, 0 * ones, ones)).sum()
                  for c in shifts]
        return shifts[int(torch.stack(totals).argmin())].item()

    assert best_shift(abs_debias_loss) == pytest.approx(0.15, abs=1e-3)  # the median: 2 gaps above it, 2 below
    token_shift = best_shift(token_debias_loss)
    assert 0.3 < token_shift < 0.7  # 0.427, pulled toward the mean by the large gap: 4 of 5 signs flip (SS 20)


def test_abs_retention_is_the_token_retention():
    ids = [[0, 1, 2]]
    batch = _batch(ids, [3])
    pre, post = _logits_for([[0.5, 0.2]], ids), _logits_for([[0.4, 0.3]], ids)
    torch.testing.assert_close(retention_loss("abs", pre, post, batch), retention_loss("token", pre, post, batch),
                               rtol=0, atol=0)


def test_retention_losses():
    ids = [[0, 1, 2]]
    batch = _batch(ids, [3])
    pre, post = _logits_for([[0.5, 0.2]], ids), _logits_for([[0.4, 0.3]], ids)
    pre_p, post_l = 0.35, (math.log(0.4) + math.log(0.3)) / 2
    paper = retention_loss("paper", pre, post, batch)
    assert math.isclose(paper.item(), pre_p * (math.log(pre_p) - post_l), rel_tol=1e-5)
    assert retention_loss("token", pre, pre.clone(), batch).abs().item() < 1e-6
    pre_soft, post_soft = pre[0, :2].softmax(-1), post[0, :2].softmax(-1)
    kl = (pre_soft * (pre_soft.clamp_min(1e-30).log() - post_soft.clamp_min(1e-30).log())).sum(-1).mean()
    assert math.isclose(retention_loss("token", pre, post, batch).item(), kl.item(), rel_tol=1e-4)


def test_level_loss_hand_computed_and_its_gradient():
    from biasedit_peft.editor.losses import level_loss
    from biasedit_peft.scoring import SentenceLogProbs

    post_s = torch.tensor([-2.0, -1.0], dtype=torch.float64, requires_grad=True)
    post_a = torch.tensor([-3.0, -1.5], dtype=torch.float64, requires_grad=True)
    pre_s, pre_a = torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -1.0])
    ones = torch.ones(2)
    loss = level_loss(SentenceLogProbs(post_s, post_s, ones), SentenceLogProbs(post_a, post_a, ones), pre_s, pre_a)
    # pair 0: post level -2.5, pre level -2.0 -> 0.25; pair 1: post -1.25, pre -1.5 -> 0.0625
    torch.testing.assert_close(loss, torch.tensor([0.25, 0.0625], dtype=torch.float64))
    loss.sum().backward()
    # d/d post_s = d/d post_a = (post level - pre level) = [-0.5, 0.25]
    torch.testing.assert_close(post_s.grad, torch.tensor([-0.5, 0.25], dtype=torch.float64))
    torch.testing.assert_close(post_a.grad, post_s.grad)
    assert torch.autograd.gradcheck(
        lambda s, a: level_loss(SentenceLogProbs(s, s, ones), SentenceLogProbs(a, a, ones), pre_s, pre_a),
        (post_s.detach().requires_grad_(), post_a.detach().requires_grad_()))


def _reference_token_retention(pre: torch.Tensor, post: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
    """The definition on the whole [B, T, V] tensor: mean over scoring positions of KL(p_pre || p_post)."""
    positions = torch.zeros_like(batch.target_mask)
    positions[:, :-1] = batch.target_mask[:, 1:]
    pre_log, post_log = torch.log_softmax(pre.detach(), -1), torch.log_softmax(post, -1)
    per_position = (pre_log.exp() * (pre_log - post_log)).sum(-1)
    return (per_position * positions).sum(-1) / positions.sum(-1)


def test_token_retention_in_row_chunks_equals_the_whole_tensor_kl_with_the_same_gradient(monkeypatch):
    from biasedit_peft import scoring

    torch.manual_seed(0)
    pre = torch.randn(3, 6, 11, dtype=torch.float64)
    post = torch.randn(3, 6, 11, dtype=torch.float64, requires_grad=True)
    batch = _batch(torch.randint(0, 11, (3, 6)).tolist(), [6, 2, 4])  # 5 + 1 + 3 scoring positions
    monkeypatch.setattr(scoring, "_LOGSUMEXP_CHUNK_BYTES", 2 * 4 * 11)  # two rows a chunk: 5 chunks
    chunked = retention_loss("token", pre, post, batch)
    reference = _reference_token_retention(pre, post, batch)
    torch.testing.assert_close(chunked.double(), reference, rtol=0, atol=1e-6)
    weights = torch.randn(3, dtype=torch.float64)
    (grad_chunked,) = torch.autograd.grad((chunked.double() * weights).sum(), post)
    (grad_reference,) = torch.autograd.grad((reference * weights).sum(), post)
    torch.testing.assert_close(grad_chunked, grad_reference, rtol=0, atol=1e-6)
    positions = torch.zeros_like(batch.target_mask)
    positions[:, :-1] = batch.target_mask[:, 1:]
    assert (grad_chunked[~positions] == 0).all()  # padding and the last position get no gradient


def test_token_retention_second_derivative_passes_gradgradcheck_in_chunks(monkeypatch):
    from biasedit_peft import scoring

    torch.manual_seed(4)
    pre = torch.randn(2, 5, 7, dtype=torch.float64)
    post = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    batch = _batch(torch.randint(0, 7, (2, 5)).tolist(), [5, 3])
    monkeypatch.setattr(scoring, "_LOGSUMEXP_CHUNK_BYTES", 2 * 4 * 7)  # two rows a chunk
    assert torch.autograd.gradgradcheck(lambda x: retention_loss("token", pre, x, batch), (post,))


def test_token_retention_gradient_of_bf16_logits_is_the_float32_gradient_rounded():
    torch.manual_seed(1)
    pre, post = torch.randn(2, 5, 13).bfloat16(), torch.randn(2, 5, 13).bfloat16().requires_grad_()
    batch = _batch(torch.randint(0, 13, (2, 5)).tolist(), [5, 3])
    loss = retention_loss("token", pre, post, batch)
    assert loss.dtype == torch.float32
    (grad,) = torch.autograd.grad(loss.sum(), post)
    post32 = post.detach().float().requires_grad_()
    (grad32,) = torch.autograd.grad(_reference_token_retention(pre.float(), post32, batch).sum(), post32)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(grad, grad32.bfloat16(), rtol=0, atol=0)


def test_every_loss_kind_names_its_retention_loss():
    from biasedit_peft.editor.losses import LOSS_KINDS, RETENTION_OF

    assert set(RETENTION_OF) == set(LOSS_KINDS) and set(RETENTION_OF.values()) <= {"paper", "token"}


@pytest.mark.parametrize("kind", ["token", "paper"])
def test_retention_terms_score_both_sides_as_token_log_probs_do(kind, monkeypatch):
    from biasedit_peft import scoring
    from biasedit_peft.editor.losses import retention_terms
    from biasedit_peft.scoring import sentence_scores, token_log_probs

    torch.manual_seed(1)
    pre = torch.randn(3, 6, 11, dtype=torch.float64)
    post = torch.randn(3, 6, 11, dtype=torch.float64, requires_grad=True)
    batch = _batch(torch.randint(0, 11, (3, 6)).tolist(), [6, 2, 4])
    monkeypatch.setattr(scoring, "_LOGSUMEXP_CHUNK_BYTES", 2 * 4 * 11)  # two rows a chunk
    loss, pre_scores, post_scores = retention_terms(kind, pre, post, batch)
    torch.testing.assert_close(loss, retention_loss(kind, pre, post, batch), rtol=0, atol=0)
    for scores, logits in ((pre_scores, pre), (post_scores, post.detach())):
        expected = sentence_scores(token_log_probs(logits, batch), batch)
        for field in ("sum", "mean", "mean_prob"):
            torch.testing.assert_close(getattr(scores, field).detach(), getattr(expected, field), rtol=0, atol=1e-12)
    if kind == "token":  # the scores are constants beside the loss; the loss keeps its gradient
        assert not pre_scores.mean.requires_grad and not post_scores.mean.requires_grad
        (grad,) = torch.autograd.grad(loss.sum(), post)
        (reference,) = torch.autograd.grad(_reference_token_retention(pre, post, batch).sum(), post)
        torch.testing.assert_close(grad, reference, rtol=0, atol=1e-12)


def test_token_retention_of_a_batch_with_nothing_scored_is_zero_with_a_zero_gradient():
    from biasedit_peft.editor.losses import token_retention_terms

    nothing_scored = torch.zeros(2, 2, dtype=torch.bool)  # BOS alone in each sentence
    batch = TokenBatch(torch.tensor([[0, 1], [0, 2]]), torch.tensor([[1, 0], [1, 0]]), nothing_scored)
    post = torch.randn(2, 2, 5, requires_grad=True)
    loss, pre_scores, post_scores = token_retention_terms(torch.randn(2, 2, 5), post, batch)
    assert loss.tolist() == [0.0, 0.0] and pre_scores.abs().sum() == 0 and post_scores.abs().sum() == 0
    (grad,) = torch.autograd.grad(loss.sum(), post)
    assert grad.abs().sum() == 0


def test_soft_ss_term_hand_computed_and_zero_for_a_balanced_group():
    """``(mean tanh(gap / tau))^2`` with ``tau`` the (lower) median absolute pre-edit gap, by hand."""
    from biasedit_peft.editor.losses import gap_scale, soft_ss_of

    gaps = torch.tensor([0.2, -0.1, 0.4, 0.0])
    tau = gap_scale(gaps)  # |gaps| sorted 0, 0.1, 0.2, 0.4: the lower median 0.1
    assert tau.item() == pytest.approx(0.1)
    expected = ((math.tanh(2.0) + math.tanh(-1.0) + math.tanh(4.0) + 0.0) / 4) ** 2  # 0.090265...
    assert soft_ss_of(gaps, tau).item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.0902650, rel=1e-5)
    assert soft_ss_of(torch.tensor([0.3, -0.3, 0.05, -0.05]), 0.1).item() == pytest.approx(0.0, abs=1e-12)
    assert gap_scale(torch.zeros(3)).item() == pytest.approx(1e-3)  # a group of ties keeps a finite scale


def test_soft_ss_term_per_bias_type_hand_computed():
    """``sum_t (n_t / n) m_t^2`` over the group's bias types, by hand; a group balanced only when pooled pays."""
    from biasedit_peft.editor.losses import soft_ss_of, type_indices

    types, n_types = type_indices(["race", None, "gender", "race", "race"])  # sorted: "None", "gender", "race"
    assert types.tolist() == [2, 0, 1, 2, 2] and n_types == 3
    gaps = torch.tensor([0.2, -0.1, 0.4, 0.0, -0.3])
    race = (math.tanh(2.0) + 0.0 + math.tanh(-3.0)) / 3
    expected = (3 / 5) * race ** 2 + (1 / 5) * math.tanh(-1.0) ** 2 + (1 / 5) * math.tanh(4.0) ** 2
    assert soft_ss_of(gaps, 0.1, types).item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.3158011, rel=1e-5)
    # pooled this group balances (mean sign 0); per type each type is fully one-sided
    balanced, by_type = torch.tensor([0.3, 0.3, -0.3, -0.3]), torch.tensor([0, 0, 1, 1])
    assert soft_ss_of(balanced, 0.1).item() == pytest.approx(0.0, abs=1e-12)
    assert soft_ss_of(balanced, 0.1, by_type).item() == pytest.approx(math.tanh(3.0) ** 2, rel=1e-6)
    # one type: the pooled term
    assert soft_ss_of(gaps, 0.1, torch.zeros(5, dtype=torch.long)).item() == pytest.approx(
        soft_ss_of(gaps, 0.1).item(), rel=1e-6)
