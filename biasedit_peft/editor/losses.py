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

``soft_ss`` (weighted by ``ss_coef``; 0 in every preset; experimental) is a term of the *meta-loss* only, over the
whole edit group of ``P`` pairs rather than per pair. Reference SS of one bias type ``t`` is
``50 + 50 mean_{p in t} sign(delta_p)``; the term is its smooth stand-in, per type, weighted by each type's share
``n_t / P`` of the group:

    soft_ss   = sum_t (n_t / P) (mean_{p in t} tanh(delta_p / tau))^2,   tau = median_p |delta_p before the edit|

(``tau`` a constant of the whole group), zero where every type's stereotype and anti-stereotype preferences
balance. Its gradient pushes the pairs of one type the same way, against that type's majority, weighted most
where a pair is near flipping: the shared shift that moves SS, which a per-pair loss minimised pair by pair does
not aim at. Per type, because SS is reported per type and the types respond unequally to one edit: a pooled mean
sign lets a group balance one type's bias with another's overshoot (docs/method.md §6).

The other loss functions return one loss per pair / sentence; callers sum and scale (see docs/method.md).
Sentence scores come from :mod:`biasedit_peft.scoring` (logit ``t - 1`` scores token ``t``).
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch

from ..profiling import VOCABULARY_RANGE, float32_range
from ..scoring import (
    SentenceLogProbs,
    TokenBatch,
    check_logits_match,
    logit_row_chunks,
    scatter_row_gradients,
    scored_targets,
    scoring_dtype,
    scoring_positions,
    sentence_scores,
    token_log_probs,
    token_scores_at,
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


def soft_signs(gaps: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """``tanh(gaps / scale)``: each pair's smoothed stereotype preference in ``(-1, 1)``, gaps ``[P]`` -> ``[P]``
    (:func:`soft_ss_of` pools them per bias type)."""
    return torch.tanh(gaps / scale)


def type_indices(bias_types: Sequence[str | None]) -> tuple[torch.Tensor, int]:
    """Each pair's bias type ``[P]`` as an index into the group's distinct types (sorted; pairs without one form
    their own type), and how many there are: the same indices on every process that sees the whole group."""
    names = sorted({str(t) for t in bias_types})
    index = {name: i for i, name in enumerate(names)}
    return torch.tensor([index[str(t)] for t in bias_types], dtype=torch.long), len(names)


def sums_by_type(values: torch.Tensor, types: torch.Tensor, n_types: int) -> torch.Tensor:
    """``values`` ``[P]`` summed per type index ``types`` ``[P]`` (below ``n_types``): ``[n_types]``, same dtype and
    device as ``values``."""
    return torch.zeros(n_types, dtype=values.dtype, device=values.device).index_add(0, types.to(values.device),
                                                                                       values)


def soft_ss_of_sums(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``sum_t (n_t / n) m_t^2`` with ``m_t = sums[t] / counts[t]``: the soft-SS term from each type's summed soft
    signs ``[T]`` and pair counts ``[T]`` (every count positive; ``n`` their sum): a scalar."""
    return (sums.square() / counts).sum() / counts.sum()


def soft_ss_of(gaps: torch.Tensor, scale: torch.Tensor | float, types: torch.Tensor | None = None) -> torch.Tensor:
    """The soft-SS term of one group's gaps ``[P]``: ``sum_t (n_t / n) (mean_{p in t} tanh(gaps_p / scale))^2``
    over its bias types ``types`` ``[P]`` (indices, :func:`type_indices`; None: one type, ``(mean_p tanh)^2``).

    Zero only when every type's pairs are balanced: a group cannot pay for one type's bias with another's
    opposite one, as the pooled mean sign would let it. A scalar."""
    signs = soft_signs(gaps, scale)
    types = torch.zeros_like(signs, dtype=torch.long) if types is None else types.to(signs.device)
    counts = torch.bincount(types).to(signs.dtype)
    sums = sums_by_type(signs, types, len(counts))
    present = counts > 0
    return soft_ss_of_sums(sums[present], counts[present])


def gap_scale(pre_gaps: torch.Tensor, floor: float = 1e-3) -> torch.Tensor:
    """``tau`` of the soft-SS term: the median absolute pre-edit gap of the group ``[P]`` (at least ``floor``,
    so that a group of ties stays finite): a scalar constant."""
    return pre_gaps.detach().abs().median().clamp(min=floor)


def abs_debias_loss(stereo: SentenceLogProbs, anti: SentenceLogProbs) -> torch.Tensor:
    """Per-pair absolute gap of mean token log-probs ``|mean_logp(s) - mean_logp(a)|``: ``[P]``."""
    return pair_gap(stereo, anti).abs()


def paper_retention_loss(pre: SentenceLogProbs, post: SentenceLogProbs) -> torch.Tensor:
    """Per-sentence KLDivLoss of the BiasEdit code (pre-edit scores are constants): ``[B]``."""
    pre_prob = pre.mean_prob.detach()
    return pre_prob * (pre_prob.log() - post.mean)


class _RowKL(torch.autograd.Function):
    """``KL(softmax(pre[r]) || softmax(post[r]))`` [N] (float32 or wider) at the flat logit rows ``r = rows`` of logits
    ``pre`` / ``post`` [B, T, V] (any float dtype), and from the same log-softmaxes the log-probs of ``targets`` [N]
    before and after: ``pre_log[r, targets]``, ``post_log[r, targets]`` [N] each (constants, for the LMS and NLL
    metrics, so that no second vocabulary pass scores them); ``pre`` is a constant.

    Forward and backward run over cache-sized row chunks (:func:`~biasedit_peft.scoring.logit_row_chunks`) and
    keep only the logits and ``rows``; the backward, ``grad[n] * (softmax(post[r]) - softmax(pre[r]))``,
    recomputes both softmaxes a chunk at a time and writes the rows of the gradient directly (in place, except under
    ``create_graph``, where the backward is itself differentiated).
    """

    @staticmethod
    def forward(ctx, pre: torch.Tensor, post: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor):
        kl, pre_picked, post_picked = [], [], []
        with float32_range(VOCABULARY_RANGE):
            for (part, pre_chunk), (_, post_chunk) in zip(logit_row_chunks(pre, rows), logit_row_chunks(post, rows)):
                pre_log, post_log = torch.log_softmax(pre_chunk, -1), torch.log_softmax(post_chunk, -1)
                kl.append((pre_log.exp() * (pre_log - post_log)).sum(-1))
                pre_picked.append(pre_log.gather(-1, targets[part, None]).squeeze(-1))
                post_picked.append(post_log.gather(-1, targets[part, None]).squeeze(-1))
        ctx.save_for_backward(pre, post, rows)
        kl, pre_picked, post_picked = (torch.cat(values) if values else post.new_zeros(0, dtype=scoring_dtype(post))
                                       for values in (kl, pre_picked, post_picked))  # three tensors, even when empty
        ctx.mark_non_differentiable(pre_picked, post_picked)
        return kl, pre_picked, post_picked

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _pre_picked_grad, _post_picked_grad):
        pre, post, rows = ctx.saved_tensors

        def chunks():
            for (part, pre_chunk), (_, post_chunk) in zip(logit_row_chunks(pre, rows), logit_row_chunks(post, rows)):
                if torch.is_grad_enabled():  # create_graph: the backward itself is differentiated
                    yield part, (torch.softmax(post_chunk, -1) - torch.softmax(pre_chunk, -1)) * grad[part, None]
                else:
                    difference = torch.softmax(post_chunk, -1).sub_(torch.softmax(pre_chunk, -1))
                    yield part, difference.mul_(grad[part, None])

        with float32_range(VOCABULARY_RANGE):
            return None, scatter_row_gradients(post, rows, chunks()), None, None


def token_retention_terms(pre_logits: torch.Tensor, post_logits: torch.Tensor,
                          batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss [B], pre [B, T], post [B, T])``: the mean over scored positions of ``KL(p_pre || p_post)`` (logits
    ``[B, T, V]``), and the token log-probs before and after (constants, laid out as
    :func:`~biasedit_peft.scoring.token_log_probs`) from the same vocabulary pass.

    Only the ``N`` positions that score a token are taken (padding and the last position never are), in
    cache-sized chunks (:class:`_RowKL`).
    """
    check_logits_match(post_logits, batch)
    check_logits_match(pre_logits, batch)
    rows = scoring_positions(batch).to(post_logits.device)  # [N]
    per_row, pre_picked, post_picked = _RowKL.apply(pre_logits.detach(), post_logits, rows,
                                                    scored_targets(batch, post_logits))  # [N] each
    n_positions = batch.target_mask.shape[1]
    totals = torch.zeros(len(batch), dtype=per_row.dtype, device=per_row.device).index_add(
        0, rows // n_positions, per_row)
    loss = totals / batch.target_mask[:, 1:].sum(-1).clamp(min=1).to(per_row.device)
    return loss, token_scores_at(pre_picked, batch), token_scores_at(post_picked, batch)


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


def pair_debias_loss(kind: LossKind, stereo: SentenceLogProbs, anti: SentenceLogProbs) -> torch.Tensor:
    """Per-pair debias loss from the scores of ``P`` pairs (:func:`pair_scores`): ``[P]``."""
    loss_fn = {"paper": paper_debias_loss, "token": token_debias_loss, "abs": abs_debias_loss}[_check_kind(kind)]
    return loss_fn(stereo, anti)


def debias_loss(kind: LossKind, logits: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
    """Per-pair debias loss of a batch of ``2P`` sentences, stereotypes first: logits ``[2P, T, V]`` -> ``[P]``."""
    return pair_debias_loss(kind, *pair_scores(logits, batch))


def retention_terms(kind: LossKind, pre_logits: torch.Tensor, post_logits: torch.Tensor,
                    batch: TokenBatch) -> tuple[torch.Tensor, SentenceLogProbs, SentenceLogProbs]:
    """``(loss [B], pre, post)``: the per-sentence retention loss on unrelated sentences (logits ``[B, T, V]``)
    and their pre- and post-edit scores from the same vocabulary pass (``post`` may carry autograd; detach it)."""
    if RETENTION_OF[_check_kind(kind)] == "token":
        loss, pre_tokens, post_tokens = token_retention_terms(pre_logits, post_logits, batch)
        return loss, sentence_scores(pre_tokens, batch), sentence_scores(post_tokens, batch)
    pre = sentence_scores(token_log_probs(pre_logits, batch), batch)
    post = sentence_scores(token_log_probs(post_logits, batch), batch)
    return paper_retention_loss(pre, post), pre, post


def retention_loss(kind: LossKind, pre_logits: torch.Tensor, post_logits: torch.Tensor, batch: TokenBatch):
    """Per-sentence retention loss on unrelated sentences: logits ``[B, T, V]`` -> ``[B]``."""
    return retention_terms(kind, pre_logits, post_logits, batch)[0]


def _check_kind(kind: str) -> str:
    if kind not in LOSS_KINDS:
        raise ValueError(f"Unknown loss kind {kind!r}; choose one of {LOSS_KINDS}")
    return kind
