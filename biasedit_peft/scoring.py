"""Sentence log-likelihoods under a causal LM: one batched forward and a gather.

A sentence ``x_1 .. x_n`` is scored as ``log p(x_1 .. x_n | BOS) = sum_t log p(x_t | BOS, x_<t)``.
BOS is the tokenizer's ``bos_token_id`` (GPT-2: ``<|endoftext|>``, which is also its EOS), else its
``eos_token_id`` (Qwen-style tokenizers without a BOS). A BOS that opens a ChatML chat turn
(``<|im_start|>``, SmolLM2-Instruct's) is not a document start: then the document separator
``<|endoftext|>`` is used when the vocabulary has it (measured on SmolLM2: StereoSet LMS 90.23 against
88.73 after ``<|im_start|>``; docs/metrics.md). Sentences are tokenised *without* special
tokens and the BOS is prepended here, so tokenizers that add BOS themselves (Llama, Gemma, OPT)
never get two. Padding is always on the right (whatever ``tokenizer.padding_side`` says), so
positions of real tokens do not depend on the batch and batched scores equal one-at-a-time scores.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Iterable, Iterator, Sequence

import torch
from torch import Tensor

from .profiling import VOCABULARY_RANGE, float32_range

_HUGE_MAX_LENGTH = 10**6  # tokenizers without a real limit report ~1e30


@dataclass
class TokenBatch:
    """Right-padded token ids of BOS + sentence.

    ``input_ids`` [B, T] long; ``attention_mask`` [B, T] long (1 on BOS and sentence tokens);
    ``target_mask`` [B, T] bool (True on the scored sentence tokens: not BOS, not padding).
    """

    input_ids: Tensor
    attention_mask: Tensor
    target_mask: Tensor

    def to(self, device: torch.device | str) -> "TokenBatch":
        return TokenBatch(self.input_ids.to(device), self.attention_mask.to(device), self.target_mask.to(device))

    def __len__(self) -> int:
        return self.input_ids.shape[0]


@dataclass
class SentenceLogProbs:
    """Per-sentence scores, each [B] float32 (float64 for float64 logits): ``sum`` and ``mean`` of token log-probs,
    ``n_tokens``.

    ``mean_prob`` [B] is the arithmetic mean of token probabilities (the BiasEdit paper's SS score).
    """

    sum: Tensor
    mean: Tensor
    n_tokens: Tensor
    mean_prob: Tensor | None = None

    def __getitem__(self, index) -> "SentenceLogProbs":
        mean_prob = None if self.mean_prob is None else self.mean_prob[index]
        return SentenceLogProbs(self.sum[index], self.mean[index], self.n_tokens[index], mean_prob)

    def cpu(self) -> "SentenceLogProbs":
        return SentenceLogProbs(*(None if t is None else t.cpu() for t in (getattr(self, f) for f in SCORE_FIELDS)))


SCORE_FIELDS = tuple(f.name for f in fields(SentenceLogProbs))


CHAT_TURN_MARKERS = ("<|im_start|>", "<|im_end|>")
"""Special tokens that open or close a chat turn (ChatML), not a document."""
DOCUMENT_SEPARATOR = "<|endoftext|>"


def start_token_id(tokenizer) -> int:
    """The id prepended to every sentence: the BOS, else the EOS; but where that is a chat-turn marker (or there is
    neither), the document separator ``<|endoftext|>`` when the vocabulary has it.

    SmolLM2-Instruct reports ``<|im_start|>`` as its BOS, and Qwen-Instruct tokenizers have no BOS and ``<|im_end|>``
    as EOS, while both pretrain on documents separated by ``<|endoftext|>`` (docs/metrics.md, "Start token").
    """
    token = tokenizer.bos_token if tokenizer.bos_token is not None else tokenizer.eos_token
    if token is None or token in CHAT_TURN_MARKERS:
        separator = vocabulary_id(tokenizer, DOCUMENT_SEPARATOR)
        if separator is not None:
            return separator
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise ValueError(
        f"{type(tokenizer).__name__} has neither a BOS nor an EOS token; a causal LM needs one "
        "to condition the first word of a sentence on."
    )


def vocabulary_id(tokenizer, token: str) -> int | None:
    """The id of ``token`` in the vocabulary, or None when it has none.

    A lookup, not ``tokenizer.get_vocab()``: that builds the whole vocabulary as a dict (about 20 ms for
    SmolLM2's 49,152 tokens, on every encoded batch). ``convert_tokens_to_ids`` answers the unknown id (or None) for
    a missing token, hence the round trip.
    """
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or tokenizer.convert_ids_to_tokens(int(token_id)) != token:
        return None
    return int(token_id)


def _max_length(tokenizer, max_length: int | None) -> int | None:
    if max_length is not None:
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 (BOS + one token), got {max_length}")
        return max_length
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if limit is not None and limit < _HUGE_MAX_LENGTH else None


def model_context_length(model) -> int | None:
    """The longest input the model's position table takes (``n_positions`` / ``max_position_embeddings`` /
    ``n_ctx`` of its config), or None when the config names none."""
    config = getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_context(lengths: Sequence[int], sentences: Sequence[str], context: int | None) -> None:
    """Refuse sentences whose ``lengths`` (tokens with BOS) exceed the model's ``context``, naming the first.

    Longer sentences are refused, not truncated: a truncated sentence would be scored on other text than it has.

    Raises:
        ValueError: ``sentence i ('...') has n tokens with BOS, more than the model's context of c``.
    """
    if context is None:
        return
    too_long = [i for i, n in enumerate(lengths) if n > context]
    if too_long:
        first = too_long[0]
        raise ValueError(f"sentence {first} ({sentences[first][:80]!r}) has {lengths[first]} tokens with BOS, more "
                         f"than the model's context of {context}; {len(too_long)} sentence(s) are too long: shorten "
                         "or drop them")


def encode_sentences(tokenizer, sentences: Sequence[str], max_length: int | None = None,
                     context: int | None = None) -> TokenBatch:
    """Tokenise ``sentences`` as ``BOS + tokens``, right-padded, truncated to ``max_length`` in all.

    ``max_length`` defaults to the tokenizer's ``model_max_length`` when it is a real limit.
    Truncation keeps the beginning of a sentence. ``context``: the model's context length
    (:func:`model_context_length`); a longer sentence is refused (:func:`check_context`), unless the caller's own
    ``max_length`` cuts it to fit (the tokenizer's default limit never hides an over-long sentence).
    """
    if isinstance(sentences, str):
        raise TypeError("encode_sentences takes a list of sentences, not one string")
    if len(sentences) == 0:
        raise ValueError("encode_sentences got no sentences")
    bos = start_token_id(tokenizer)
    limit = _max_length(tokenizer, max_length)
    encoded = tokenizer(list(sentences), add_special_tokens=False)["input_ids"]
    rows = []
    for index, ids in enumerate(encoded):
        if ids and ids[0] == bos:  # a tokenizer that adds BOS even without special tokens
            ids = ids[1:]
        if not ids:
            raise ValueError(f"sentence {index} ({sentences[index]!r}) has no tokens to score")
        rows.append([bos] + ids)
    if max_length is not None:  # the caller's own cut: what it scores is what must fit
        rows = [row[:limit] for row in rows]
    check_context([len(row) for row in rows], sentences, context)
    if limit is not None:
        rows = [row[:limit] for row in rows]
    lengths = torch.tensor([len(row) for row in rows])
    width = int(lengths.max())
    positions = torch.arange(width)
    attention = positions[None, :] < lengths[:, None]  # [B, T]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else bos
    input_ids = torch.full((len(rows), width), int(pad_id), dtype=torch.long)
    input_ids[attention] = torch.tensor([token for row in rows for token in row], dtype=torch.long)
    target_mask = attention & (positions[None, :] > 0)
    return TokenBatch(input_ids, attention.long(), target_mask)


_LOGSUMEXP_CHUNK_BYTES = 1 << 20
"""Float32 logit rows per chunk on the CPU, in bytes: about one core's L2 cache. The bf16 -> float32 copy, the max
and the exp-sum of a chunk then stay in cache instead of streaming [N, V] float32 through memory several times
(no-grad bf16 SmolLM2 scoring 1.15x faster, ``scripts/logsumexp_timing.py``; the same under autograd, whose
backward recomputes each chunk's softmax rather than keeping an [N, V] float32 copy)."""


def row_chunk_size(n_columns: int, device: torch.device) -> int:
    """Rows of ``n_columns`` per chunk: :data:`_LOGSUMEXP_CHUNK_BYTES` of float32 on the CPU, unbounded elsewhere."""
    if device.type != "cpu":
        return 1 << 62
    return max(1, _LOGSUMEXP_CHUNK_BYTES // (4 * max(1, n_columns)))


def check_logits_match(logits: Tensor, batch: TokenBatch) -> None:
    """Refuse logits whose ``[B, T]`` is not the batch's (flat row indices would silently score other rows)."""
    if tuple(logits.shape[:-1]) != tuple(batch.target_mask.shape):
        raise ValueError(f"logits {tuple(logits.shape)} do not match the token batch {tuple(batch.target_mask.shape)}:"
                         " expected [B, T, V] for its [B, T]")


def batch_major(tensor: Tensor, batch_shape: Sequence[int], what: str) -> Tensor:
    """``[B, T, d]``: a module's input or output for a batch of shape ``batch_shape`` ``(B, T)``, viewed back from
    ``[B * T, d]`` where the model flattens tokens (OPT before its MLP); any other shape is an error that starts
    with ``what`` (e.g. ``"Layer 'model.decoder.layers.1.fc2'"``)."""
    batch_shape = tuple(batch_shape)
    if tensor.dim() == 3 and tuple(tensor.shape[:2]) == batch_shape:
        return tensor
    if tensor.dim() == 2 and tensor.shape[0] == batch_shape[0] * batch_shape[1]:
        return tensor.view(*batch_shape, tensor.shape[-1])
    raise RuntimeError(f"{what} saw a tensor of shape {tuple(tensor.shape)}, which is neither [B, T, d] nor "
                       f"[B * T, d] for the batch's [B, T] = {batch_shape}")


def logit_positions(target_mask: Tensor) -> Tensor:
    """``target_mask [B, T]`` (True at scored tokens) -> ``[B, T]`` True at the logits scoring them."""
    positions = torch.zeros_like(target_mask, dtype=torch.bool)
    positions[:, :-1] = target_mask[:, 1:].bool()
    return positions


def scoring_positions(batch: TokenBatch) -> Tensor:
    """``[N]`` long: flat indices into ``[B * T]`` of :func:`logit_positions`, row-major, so that position ``k``
    scores ``batch.input_ids[:, 1:][batch.target_mask[:, 1:]][k]``."""
    return logit_positions(batch.target_mask).flatten().nonzero().squeeze(1)


def logit_row_chunks(logits: Tensor, rows: Tensor) -> Iterator[tuple[slice, Tensor]]:
    """``(part, chunk)`` over cache-sized chunks of the logit rows ``logits.flatten(0, -2)[rows]``: ``part`` slices
    ``rows``; ``chunk`` is ``[len(part), V]`` in :func:`scoring_dtype` (float32 or wider), a fresh tensor (the
    ``index_select`` result, cast), free to modify."""
    flat = logits.reshape(-1, logits.shape[-1])
    step = row_chunk_size(flat.shape[-1], flat.device)
    dtype = scoring_dtype(logits)
    for start in range(0, len(rows), step):
        part = slice(start, start + step)
        yield part, flat.index_select(0, rows[part]).to(dtype)


def scoring_dtype(logits: Tensor) -> torch.dtype:
    """float32, or the logits' own dtype when it is wider (float64 logits are scored in float64)."""
    return torch.promote_types(logits.dtype, torch.float32)


def scatter_row_gradients(logits: Tensor, rows: Tensor, chunks: Iterable[tuple[slice, Tensor]]) -> Tensor:
    """The gradient of ``logits`` [..., V]: ``chunk`` on each chunk's rows ``logits.flatten(0, -2)[rows[part]]``
    and 0 on every other row; written row by row, with no [B, T, V] zeros filled and then overwritten.

    ``rows`` must be distinct, as :func:`scoring_positions` gives them: a repeated row would keep one chunk's
    value instead of their sum."""
    flat = torch.empty((logits[..., 0].numel(), logits.shape[-1]), dtype=logits.dtype, device=logits.device)
    others = torch.ones(len(flat), dtype=torch.bool, device=flat.device)
    others[rows] = False
    flat.index_fill_(0, others.nonzero().squeeze(1), 0)
    for part, chunk in chunks:
        flat.index_copy_(0, rows[part], chunk.to(flat.dtype))
    return flat.view(logits.shape)


class _TargetLogProbs(torch.autograd.Function):
    """``logits[r] [target] - logsumexp(logits[r])`` [N] at the flat logit rows ``r = rows`` of ``logits``
    [B, T, V] (any float dtype), in :func:`scoring_dtype` (float32 or wider).

    Forward and backward run over cache-sized row chunks (:func:`logit_row_chunks`); only the [N]
    log-sum-exps are kept beside the logits. The backward, ``grad[n] * (onehot(targets[n]) - softmax(row n))``,
    recomputes each chunk's softmax and writes the rows of the logits' gradient directly. Under ``create_graph``
    (double backward) it is built from differentiable operations instead: the softmax is taken afresh from each
    chunk rather than from the saved log-sum-exps, and nothing is written in place.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, rows: Tensor, targets: Tensor) -> Tensor:
        picked, sums = [], []
        with float32_range(VOCABULARY_RANGE):
            for part, chunk in logit_row_chunks(logits, rows):
                sums.append(torch.logsumexp(chunk, dim=-1))
                picked.append(chunk.gather(-1, targets[part, None]).squeeze(-1) - sums[-1])
        empty = logits.new_zeros(0, dtype=scoring_dtype(logits))
        ctx.save_for_backward(logits, rows, targets, torch.cat(sums) if sums else empty)
        return torch.cat(picked) if picked else empty

    @staticmethod
    def backward(ctx, grad: Tensor):
        logits, rows, targets, lse = ctx.saved_tensors

        def chunks():
            for part, chunk in logit_row_chunks(logits, rows):
                weight, target = grad[part, None], targets[part, None]
                if torch.is_grad_enabled():  # create_graph: the backward itself is differentiated
                    yield part, (chunk.softmax(-1) * -weight).scatter_add(-1, target, weight)
                else:
                    yield part, chunk.sub_(lse[part, None]).exp_().mul_(-weight).scatter_add_(-1, target, weight)

        with float32_range(VOCABULARY_RANGE):
            return scatter_row_gradients(logits, rows, chunks()), None, None


def token_log_probs(logits: Tensor, batch: TokenBatch) -> Tensor:
    """``log p(input_ids[:, t] | < t)`` [B, T] float32 (float64 for float64 logits) at target positions, 0 elsewhere.

    ``logits`` [B, T, V] (any float dtype); logit position ``t - 1`` scores token ``t``.
    Computed as ``logit[target] - logsumexp(logits)`` in :func:`scoring_dtype` at the target positions only (no
    padding, no [B, T, V] float32 copy or log-softmax kept), in cache-sized row chunks on the CPU
    (:class:`_TargetLogProbs`).
    """
    check_logits_match(logits, batch)
    picked = _TargetLogProbs.apply(logits, scoring_positions(batch).to(logits.device), scored_targets(batch, logits))
    return token_scores_at(picked, batch)


def scored_targets(batch: TokenBatch, logits: Tensor) -> Tensor:
    """``[N]`` long on ``logits``' device: the token that each row of :func:`scoring_positions` scores."""
    return batch.input_ids[:, 1:][batch.target_mask[:, 1:]].to(logits.device)


def token_scores_at(picked: Tensor, batch: TokenBatch) -> Tensor:
    """``[B, T]``: ``picked`` [N] (one value per row of :func:`scoring_positions`, in its order) placed at the
    tokens they score, 0 elsewhere (BOS, padding): the layout of :func:`token_log_probs`."""
    scored = batch.target_mask[:, 1:].to(picked.device)  # [B, T-1]: logit position t-1 scores token t
    scores = torch.zeros(scored.shape, dtype=picked.dtype, device=picked.device).masked_scatter(scored, picked)
    return torch.nn.functional.pad(scores, (1, 0))  # position 0 (BOS) scores nothing


def sentence_scores(token_scores: Tensor, batch: TokenBatch) -> SentenceLogProbs:
    """Reduce [B, T] token log-probs (0 off-target) to per-sentence sum / mean / mean prob."""
    n_tokens = batch.target_mask.sum(-1)
    total = token_scores.sum(-1)
    probs = token_scores.exp().masked_fill(~batch.target_mask, 0.0).sum(-1)
    count = n_tokens.clamp(min=1).to(total.dtype)
    return SentenceLogProbs(total, total / count, n_tokens, probs / count)


def sentence_log_probs(model, batch: TokenBatch) -> SentenceLogProbs:
    """Differentiable per-sentence scores from one forward pass of ``model`` on ``batch``."""
    output = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    return sentence_scores(token_log_probs(output.logits, batch), batch)


def model_device(model) -> torch.device:
    """Where inputs go: the input embedding's device (right for ``device_map`` models too)."""
    try:
        return model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        return next(model.parameters()).device


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Every module in eval mode (no dropout) within the block; each module's own flag restored after.

    ``model.train(was_training)`` would not do: it sets *all* submodules to the wrapper's flag, which
    turns dropout on inside a base model that was in eval mode under a ``PeftModel`` in train mode.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@torch.no_grad()
def score_sentences(
    model, tokenizer, sentences: Sequence[str], batch_size: int = 32, progress: bool = False,
    max_length: int | None = None,
) -> SentenceLogProbs:
    """Scores of ``sentences`` (no grad), in input order; batches are formed by token length.

    Runs in :func:`eval_mode` (every module's mode restored afterwards). Outputs are on CPU.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    sentences = list(sentences)
    if not sentences:
        empty = torch.zeros(0)
        return SentenceLogProbs(empty, empty, torch.zeros(0, dtype=torch.long), empty)
    order, batches = length_sorted_batches(tokenizer, sentences, batch_size, max_length, model_context_length(model))
    device = model_device(model)
    with eval_mode(model):
        pieces = [sentence_log_probs(model, batch.to(device)).cpu()
                  for batch in _progress(batches, progress, len(sentences))]
    return concat_scores(pieces)[inverse_permutation(order)]


def length_sorted_batches(tokenizer, sentences: Sequence[str], batch_size: int, max_length: int | None = None,
                          context: int | None = None) -> tuple[Tensor, list[TokenBatch]]:
    """``(order [S], batches)``: ``sentences`` encoded longest first (stable) in batches of ``batch_size``, each
    cut to its own longest sentence; row ``k`` of the concatenated batches is sentence ``order[k]``."""
    encoded = encode_sentences(tokenizer, sentences, max_length, context=context)
    order = torch.argsort(encoded.attention_mask.sum(-1), descending=True, stable=True)
    batches = []
    for chunk in torch.split(order, batch_size):
        width = int(encoded.attention_mask[chunk].sum(-1).max())
        batches.append(TokenBatch(encoded.input_ids[chunk, :width], encoded.attention_mask[chunk, :width],
                                  encoded.target_mask[chunk, :width]))
    return order, batches


def inverse_permutation(order: Tensor) -> Tensor:
    """``inverse [N]`` with ``inverse[order[k]] = k``: puts rows computed in ``order`` back in input order."""
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order), device=order.device)
    return inverse


def concat_scores(pieces: Sequence[SentenceLogProbs]) -> SentenceLogProbs:
    """Scores of several batches, concatenated along the sentence axis (``mean_prob`` None if any lacks it)."""
    columns = [[getattr(p, name) for p in pieces] for name in SCORE_FIELDS]
    return SentenceLogProbs(*(None if any(t is None for t in column) else torch.cat(column) for column in columns))


def _progress(chunks, enabled: bool, total: int):
    if not enabled:
        return chunks
    from tqdm.auto import tqdm

    return tqdm(chunks, desc=f"Scoring {total} sentences", unit="batch")
