"""BiasEdit's debias and retention losses, in two variants.

Notation per sentence with scored tokens ``t = 1..n``: ``l_t = log p(x_t | x_<t)``,
``mean_logp = (1/n) sum_t l_t`` and ``mean_p = (1/n) sum_t exp(l_t)``.

``"paper"`` — the semantics of the BiasEdit code (``nn.KLDivLoss(reduction="batchmean")`` on
per-sentence scores; ``KLDivLoss(input, target) = target * (log target - input)``):

    debias    = mean_p(s) (log mean_p(s) - mean_logp(a)) + mean_p(a) (log mean_p(a) - mean_logp(s))
    retention = mean_p_pre(u) (log mean_p_pre(u) - mean_logp_post(u))

``"token"`` — principled distributions:

    debias    = symmetric KL between Bernoulli(q) and Bernoulli(1 - q),
                q = sigmoid(mean_logp(s) - mean_logp(a)) the model's preference for the stereotype;
                = delta * tanh(delta / 2) with delta = mean_logp(s) - mean_logp(a); zero iff no preference
    retention = (1/n) sum_t KL(p_pre(. | x_<t) || p_post(. | x_<t)) over the whole vocabulary

``"abs"`` — the median's loss (retention as ``"token"``):

    debias    = |mean_logp(s) - mean_logp(a)|

    Reference SS counts signs of ``delta = mean_logp(s) - mean_logp(a)``, so it is 50 where the *median* gap is 0.
    Over a shift shared by the pairs, ``sum |delta - c|`` is least at the median gap, while ``"token"``'s loss
    (``~ delta^2 / 2`` near 0, gradient ``~ delta``) is least near the mean and pushes each pair in proportion to
    its gap; ``|delta|`` gives every pair the same push whatever its gap. Measured (docs/results.md): it is not
    better than ``"token"`` on SmolLM2 over three seeds, so ``"token"`` stays the default.

``level`` (every variant, weighted by ``level_coef``; 0 in the paper's presets) keeps each pair's average
mean log-prob where it was, so that the edit moves the *gap* between stereotype and anti-stereotype
rather than the likelihood of both (which is what LMS, against the unrelated sentence, measures):

    level     = ((mean_logp_post(s) + mean_logp_post(a)) / 2 - (mean_logp_pre(s) + mean_logp_pre(a)) / 2)^2

Every function returns one loss per pair / sentence; callers sum and scale (see docs/method.md).
Sentence scores come from :mod:`biasedit_peft.scoring` (logit ``t - 1`` scores token ``t``).
"""

from __future__ import annotations

from typing import Literal

import torch

from ..scoring import (
    SentenceLogProbs,
    TokenBatch,
    check_logits_match,
    logit_row_chunks,
    scatter_row_gradients,
    scoring_dtype,
    scoring_positions,
    sentence_scores,
    token_log_probs,
)

LossKind = Literal["paper", "token", "abs"]
LOSS_KINDS: tuple[str, ...] = ("paper", "token", "abs")
RETENTION_OF: dict[str, str] = {"paper": "paper", "token": "token", "abs": "token"}
"""The retention loss each kind is meta-trained with: ``"paper"``'s KLDivLoss on sentence scores, or ``"token"``'s
vocabulary KL per position."""


def paper_debias_loss(stereo: SentenceLogProbs, anti: SentenceLogProbs) -> torch.Tensor:
    """Per-pair symmetric KLDivLoss of the BiasEdit code: scores of ``P`` pairs -> ``[P]``."""
    return (stereo.mean_prob * (stereo.mean_prob.log() - anti.mean)
            + anti.mean_prob * (anti.mean_prob.log() - stereo.mean))


def pair_gap(stereo: SentenceLogProbs, anti: SentenceLogProbs) -> torch.Tensor:
    """Per-pair gap of mean token log-probs ``delta = mean_logp(s) - mean_logp(a)``: ``[P]`` (reference SS counts
    its signs)."""
    return stereo.mean - anti.mean


def token_debias_loss(stereo: SentenceLogProbs, anti: SentenceLogProbs) -> torch.Tensor:
    """Per-pair symmetric Bernoulli KL of the stereotype preference: ``[P]``."""
    gap = pair_gap(stereo, anti)
    return gap * torch.tanh(gap / 2)


def abs_debias_loss(stereo: SentenceLogProbs, anti: SentenceLogProbs) -> torch.Tensor:
    """Per-pair absolute gap of mean token log-probs ``|mean_logp(s) - mean_logp(a)|``: ``[P]``."""
    return pair_gap(stereo, anti).abs()


def paper_retention_loss(pre: SentenceLogProbs, post: SentenceLogProbs) -> torch.Tensor:
    """Per-sentence KLDivLoss of the BiasEdit code (pre-edit scores are constants): ``[B]``."""
    pre_prob = pre.mean_prob.detach()
    return pre_prob * (pre_prob.log() - post.mean)


class _RowKL(torch.autograd.Function):
    """``KL(softmax(pre[r]) || softmax(post[r]))`` [N] (float32 or wider) at the flat logit rows ``r = rows`` of logits
    ``pre`` / ``post`` [B, T, V] (any float dtype); ``pre`` is a constant.

    Forward and backward run over cache-sized row chunks (:func:`~biasedit_peft.scoring.logit_row_chunks`) and
    keep only the logits and ``rows``; the backward, ``grad[n] * (softmax(post[r]) - softmax(pre[r]))``,
    recomputes both softmaxes a chunk at a time and writes the rows of the gradient directly (in place, except under
    ``create_graph``, where the backward is itself differentiated).
    """

    @staticmethod
    def forward(ctx, pre: torch.Tensor, post: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        kl = [_kl_rows(pre_chunk, post_chunk)
              for (_, pre_chunk), (_, post_chunk) in zip(logit_row_chunks(pre, rows), logit_row_chunks(post, rows))]
        ctx.save_for_backward(pre, post, rows)
        return torch.cat(kl) if kl else post.new_zeros(0, dtype=scoring_dtype(post))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        pre, post, rows = ctx.saved_tensors

        def chunks():
            for (part, pre_chunk), (_, post_chunk) in zip(logit_row_chunks(pre, rows), logit_row_chunks(post, rows)):
                if torch.is_grad_enabled():  # create_graph: the backward itself is differentiated
                    yield part, (torch.softmax(post_chunk, -1) - torch.softmax(pre_chunk, -1)) * grad[part, None]
                else:
                    difference = torch.softmax(post_chunk, -1).sub_(torch.softmax(pre_chunk, -1))
                    yield part, difference.mul_(grad[part, None])

        return None, scatter_row_gradients(post, rows, chunks()), None


def _kl_rows(pre: torch.Tensor, post: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(pre) || softmax(post))`` per row: ``[n, V]`` (float32 or wider) -> ``[n]``."""
    pre_log = torch.log_softmax(pre, -1)
    return (pre_log.exp() * (pre_log - torch.log_softmax(post, -1))).sum(-1)


def token_retention_loss(pre_logits: torch.Tensor, post_logits: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
    """Mean over scored positions of ``KL(p_pre || p_post)``: logits ``[B, T, V]`` -> ``[B]``.

    Only the ``N`` positions that score a token are taken (padding and the last position never are), in
    cache-sized chunks (:class:`_RowKL`).
    """
    check_logits_match(post_logits, batch)
    check_logits_match(pre_logits, batch)
    rows = scoring_positions(batch).to(post_logits.device)  # [N]
    per_row = _RowKL.apply(pre_logits.detach(), post_logits, rows)  # [N]
    n_positions = batch.target_mask.shape[1]
    totals = torch.zeros(len(batch), dtype=per_row.dtype, device=per_row.device).index_add(
        0, rows // n_positions, per_row)
    return totals / batch.target_mask[:, 1:].sum(-1).clamp(min=1).to(per_row.device)


def level_loss(stereo: SentenceLogProbs, anti: SentenceLogProbs, pre_stereo: torch.Tensor,
               pre_anti: torch.Tensor) -> torch.Tensor:
    """Per-pair squared change of the pair's average mean token log-prob: post-edit scores of ``P`` pairs and
    the pre-edit means ``pre_stereo`` / ``pre_anti`` ``[P]`` (constants) -> ``[P]``."""
    post_level = (stereo.mean + anti.mean) / 2
    pre_level = (pre_stereo.detach() + pre_anti.detach()).to(post_level) / 2
    return (post_level - pre_level).square()


def pair_scores(logits: torch.Tensor, batch: TokenBatch) -> tuple[SentenceLogProbs, SentenceLogProbs]:
    """Scores of a ``2P``-sentence batch (stereotypes first, then anti-stereotypes), split in two."""
    scores = sentence_scores(token_log_probs(logits, batch), batch)
    n_pairs = len(batch) // 2
    return scores[:n_pairs], scores[n_pairs:]


def debias_loss(kind: LossKind, logits: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
    """Per-pair debias loss of a batch of ``2P`` sentences, stereotypes first: logits ``[2P, T, V]`` -> ``[P]``."""
    stereo, anti = pair_scores(logits, batch)
    loss_fn = {"paper": paper_debias_loss, "token": token_debias_loss, "abs": abs_debias_loss}[_check_kind(kind)]
    return loss_fn(stereo, anti)


def retention_loss(kind: LossKind, pre_logits: torch.Tensor, post_logits: torch.Tensor, batch: TokenBatch):
    """Per-sentence retention loss on unrelated sentences: logits ``[B, T, V]`` -> ``[B]``."""
    if RETENTION_OF[_check_kind(kind)] == "token":
        return token_retention_loss(pre_logits, post_logits, batch)
    pre = sentence_scores(token_log_probs(pre_logits, batch), batch)
    post = sentence_scores(token_log_probs(post_logits, batch), batch)
    return paper_retention_loss(pre, post)


def _check_kind(kind: str) -> str:
    if kind not in LOSS_KINDS:
        raise ValueError(f"Unknown loss kind {kind!r}; choose one of {LOSS_KINDS}")
    return kind
