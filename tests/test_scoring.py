"""Sentence scoring: BOS handling, right padding, gather semantics, batched == one at a time."""

from __future__ import annotations

import math

import pytest
import torch

from biasedit_peft import scoring
from biasedit_peft.scoring import (
    SentenceLogProbs,
    TokenBatch,
    encode_sentences,
    score_sentences,
    sentence_log_probs,
    token_log_probs,
)

from factories import EOT, editor_tokenizer, ranked_words, tiny_model, word_tokenizer

SENTENCES = [
    "the nurse was kind",
    "the engineer was very careful with the long bridge plans",
    "a cat",
    "the river carries sand and gravel to the sea every day of the year",
    "rain forms when water vapour cools",
]


WORDS = ranked_words(SENTENCES)  # the ids a word-level tokenizer trained on SENTENCES gives
SPECIALS = ("[UNK]", "[PAD]", "<s>", "</s>", EOT)


def tiny_gpt2(vocab_size: int):
    return tiny_model("gpt2", n_layer=2, vocab_size=vocab_size)


def test_encode_prepends_bos_and_right_pads():
    tokenizer = word_tokenizer(WORDS, SPECIALS, padding_side="left")  # ignored: we always pad right
    batch = encode_sentences(tokenizer, ["a cat", "the nurse was kind"])
    bos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    pad = tokenizer.pad_token_id
    cat = tokenizer.convert_tokens_to_ids(["a", "cat"])
    assert batch.input_ids.tolist()[0] == [bos, *cat, pad, pad]
    assert batch.input_ids[1, 0].item() == bos
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch.target_mask.tolist() == [[False, True, True, False, False], [False, True, True, True, True]]
    assert batch.input_ids.dtype == torch.long and batch.target_mask.dtype == torch.bool


def test_bos_never_doubled_for_llama_style_tokenizer():
    tokenizer = word_tokenizer(WORDS, SPECIALS, bos="<s>", eos="</s>", prepend_bos=True)
    assert tokenizer("a cat")["input_ids"][0] == tokenizer.bos_token_id  # it does add BOS itself
    batch = encode_sentences(tokenizer, ["a cat"])
    assert batch.input_ids[0].tolist() == [tokenizer.bos_token_id, *tokenizer.convert_tokens_to_ids(["a", "cat"])]


def test_eos_used_when_no_bos():
    tokenizer = word_tokenizer(WORDS, SPECIALS, bos=None, eos="</s>")
    assert tokenizer.bos_token_id is None
    batch = encode_sentences(tokenizer, ["a cat"])
    assert batch.input_ids[0, 0].item() == tokenizer.eos_token_id


def test_truncation_keeps_bos_and_beginning():
    tokenizer = word_tokenizer(WORDS, SPECIALS)
    batch = encode_sentences(tokenizer, [SENTENCES[3]], max_length=4)
    assert batch.input_ids.shape == (1, 4)
    assert batch.input_ids[0, 1:].tolist() == tokenizer.convert_tokens_to_ids(["the", "river", "carries"])
    assert batch.target_mask.sum().item() == 3


def test_empty_sentence_is_an_error():
    with pytest.raises(ValueError, match="sentence 1"):
        encode_sentences(word_tokenizer(WORDS, SPECIALS), ["a cat", ""])


def test_token_log_probs_hand_computed():
    # vocabulary of 3, one sentence BOS=0, tokens [1, 2], then one pad
    logits = torch.tensor([[[0.0, math.log(3.0), 0.0], [math.log(2.0), 0.0, math.log(2.0)], [9.0, 9.0, 9.0],
                            [1.0, 2.0, 3.0]]])
    batch = TokenBatch(
        input_ids=torch.tensor([[0, 1, 2, 0]]),
        attention_mask=torch.tensor([[1, 1, 1, 0]]),
        target_mask=torch.tensor([[False, True, True, False]]),
    )
    scores = token_log_probs(logits, batch)
    # token 1 scored by logits[0]: p = 3 / (1 + 3 + 1); token 2 by logits[1]: p = 2 / (2 + 1 + 2)
    expected = torch.tensor([[0.0, math.log(3 / 5), math.log(2 / 5), 0.0]])
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, expected)


def test_token_log_probs_bf16_logits_are_float32():
    logits = torch.randn(2, 5, 7).to(torch.bfloat16)
    batch = TokenBatch(torch.randint(0, 7, (2, 5)), torch.ones(2, 5, dtype=torch.long),
                       torch.ones(2, 5, dtype=torch.bool))
    scores = token_log_probs(logits, batch)
    assert scores.dtype == torch.float32
    assert (scores[:, 0] == 0).all()  # position 0 is BOS-like: nothing predicts it
    reference = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(scores[:, 1:], reference)


def test_token_log_probs_in_cache_sized_chunks_equal_one_log_softmax_with_the_same_gradient(monkeypatch):
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11, requires_grad=True)
    lengths = torch.tensor([6, 2, 4])
    attention = torch.arange(6)[None] < lengths[:, None]
    batch = TokenBatch(torch.randint(0, 11, (3, 6)), attention.long(), attention & (torch.arange(6)[None] > 0))
    reference = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    reference = torch.nn.functional.pad(reference, (1, 0)).masked_fill(~batch.target_mask, 0.0)
    monkeypatch.setattr(scoring, "_LOGSUMEXP_CHUNK_BYTES", 2 * 4 * 11)  # two rows a chunk: 5 chunks of 9 targets
    chunked = token_log_probs(logits, batch)
    torch.testing.assert_close(chunked, reference, rtol=0, atol=1e-6)
    weights = torch.randn(3, 6)
    (grad_chunked,) = torch.autograd.grad((chunked * weights).sum(), logits)
    (grad_reference,) = torch.autograd.grad((reference * weights).sum(), logits)
    torch.testing.assert_close(grad_chunked, grad_reference, rtol=0, atol=1e-6)
    assert (grad_chunked[~batch.target_mask.roll(-1, 1)] == 0).all()  # padding rows get no gradient


def test_sentence_log_probs_matches_manual_loop_and_is_differentiable():
    tokenizer = word_tokenizer(WORDS, SPECIALS)
    model = tiny_gpt2(len(tokenizer))
    batch = encode_sentences(tokenizer, SENTENCES[:2])
    result = sentence_log_probs(model, batch)
    weight = model.transformer.h[1].mlp.c_proj.weight
    manual_total = 0.0
    for row, sentence in enumerate(SENTENCES[:2]):
        ids = [tokenizer.bos_token_id] + tokenizer(sentence, add_special_tokens=False)["input_ids"]
        logits = model(torch.tensor([ids])).logits[0].float()
        manual = sum(torch.log_softmax(logits[t - 1], -1)[ids[t]] for t in range(1, len(ids)))
        torch.testing.assert_close(result.sum[row], manual, atol=1e-5, rtol=1e-5)
        assert result.n_tokens[row].item() == len(ids) - 1
        torch.testing.assert_close(result.mean[row], manual / (len(ids) - 1), atol=1e-5, rtol=1e-5)
        manual_total = manual_total + manual
    (expected_grad,) = torch.autograd.grad(manual_total, weight)
    result.sum.sum().backward()
    assert expected_grad.abs().max() > 1e-3
    torch.testing.assert_close(weight.grad, expected_grad, atol=1e-5, rtol=1e-4)


def test_batched_equals_one_at_a_time_and_keeps_order():
    tokenizer = word_tokenizer(WORDS, SPECIALS)
    model = tiny_gpt2(len(tokenizer))
    batched = score_sentences(model, tokenizer, SENTENCES, batch_size=3)
    single = [score_sentences(model, tokenizer, [s], batch_size=1) for s in SENTENCES]
    for field in ("sum", "mean", "n_tokens", "mean_prob"):
        one_by_one = torch.cat([getattr(s, field) for s in single])
        torch.testing.assert_close(getattr(batched, field), one_by_one, atol=1e-5, rtol=1e-5)
    assert batched.n_tokens.tolist() == [len(s.split()) for s in SENTENCES]
    mean_prob = batched.mean_prob
    assert ((mean_prob > 0) & (mean_prob < 1)).all()
    assert (mean_prob >= batched.mean.exp() - 1e-6).all()  # arithmetic mean >= geometric mean


def test_score_sentences_restores_training_mode():
    tokenizer = word_tokenizer(WORDS, SPECIALS)
    model = tiny_gpt2(len(tokenizer)).train()
    scores = score_sentences(model, tokenizer, SENTENCES[:2])
    assert model.training
    assert isinstance(scores, SentenceLogProbs) and not scores.sum.requires_grad


def test_scoring_keeps_each_module_mode_under_a_peft_wrapper_in_train_mode():
    """A PeftModel is in train mode while its base is in eval mode; scoring must not switch dropout on."""
    from peft import get_peft_model

    import biasedit_peft
    from biasedit_peft.scoring import eval_mode

    base = tiny_gpt2(64).eval()
    model = get_peft_model(base, biasedit_peft.BiasEditConfig())
    modes = {name: module.training for name, module in model.named_modules()}
    assert modes[""] is True and not any(m.training for m in base.modules() if isinstance(m, torch.nn.Dropout))
    with eval_mode(model):
        assert not any(module.training for module in model.modules())
    assert {name: module.training for name, module in model.named_modules()} == modes
    tokenizer = word_tokenizer(WORDS, SPECIALS)
    score_sentences(model, tokenizer, ["the nurse was kind"])
    assert {name: module.training for name, module in model.named_modules()} == modes


def _chatml_tokenizer(with_separator: bool):
    specials = ["[UNK]", "[PAD]", "<|im_start|>", "<|im_end|>"] + ([EOT] if with_separator else [])
    return word_tokenizer(WORDS, specials, bos="<|im_start|>", eos="<|im_end|>")


def test_a_chatml_turn_bos_gives_way_to_the_document_separator():
    tokenizer = _chatml_tokenizer(with_separator=True)  # SmolLM2-Instruct: BOS <|im_start|>, EOS <|im_end|>
    separator = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert separator == 4 and tokenizer.bos_token_id == 2
    batch = encode_sentences(tokenizer, ["a cat"])
    assert batch.input_ids[0].tolist() == [separator, *tokenizer.convert_tokens_to_ids(["a", "cat"])]
    without = _chatml_tokenizer(with_separator=False)  # nothing better to start with: the BOS as it is
    assert encode_sentences(without, ["a cat"]).input_ids[0, 0].item() == without.bos_token_id == 2


@pytest.mark.parametrize("eos, expected", [("<|im_end|>", "<|endoftext|>"), ("<|endoftext|>", "<|endoftext|>"),
                                           ("[PAD]", "[PAD]")])
def test_without_a_bos_the_eos_starts_unless_it_closes_a_chat_turn(eos, expected):
    """Qwen-style tokenizers have no BOS: the base models' EOS is the document separator, the instruct models' EOS
    closes a chat turn (<|im_end|>), which gives way to the separator; any other EOS is kept."""
    specials = ["[UNK]", "[PAD]", "<|im_start|>", "<|im_end|>", EOT]
    tokenizer = word_tokenizer(WORDS, specials, bos=None, eos=eos)
    assert tokenizer.bos_token is None and tokenizer.eos_token == eos
    assert scoring.start_token_id(tokenizer) == tokenizer.convert_tokens_to_ids(expected)
    assert encode_sentences(tokenizer, ["a cat"]).input_ids[0, 0].item() == tokenizer.convert_tokens_to_ids(expected)


def test_token_log_probs_gradient_passes_gradcheck_at_padded_positions(monkeypatch):
    torch.manual_seed(2)
    logits = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    attention = torch.arange(4)[None] < torch.tensor([4, 2])[:, None]
    batch = TokenBatch(torch.randint(0, 5, (2, 4)), attention.long(), attention & (torch.arange(4)[None] > 0))
    monkeypatch.setattr(scoring, "_LOGSUMEXP_CHUNK_BYTES", 2 * 4 * 5)  # two rows a chunk
    assert torch.autograd.gradcheck(lambda x: token_log_probs(x, batch).double(), (logits,), eps=1e-6, atol=1e-5)


def test_token_log_probs_second_derivative_passes_gradgradcheck_in_chunks(monkeypatch):
    """Double backward (``create_graph``) differentiates the chunked backward itself: it must not reuse the
    saved log-sum-exps or write in place (the in-place backward raised a version-counter error here)."""
    torch.manual_seed(3)
    logits = torch.randn(2, 4, 7, dtype=torch.float64, requires_grad=True)
    attention = torch.arange(4)[None] < torch.tensor([4, 2])[:, None]
    batch = TokenBatch(torch.randint(0, 7, (2, 4)), attention.long(), attention & (torch.arange(4)[None] > 0))
    monkeypatch.setattr(scoring, "_LOGSUMEXP_CHUNK_BYTES", 2 * 4 * 7)  # two rows a chunk
    assert torch.autograd.gradgradcheck(lambda x: token_log_probs(x, batch), (logits,))


def test_the_start_token_is_looked_up_not_read_from_the_whole_vocabulary(monkeypatch):
    tokenizer = _chatml_tokenizer(with_separator=True)
    monkeypatch.setattr(type(tokenizer), "get_vocab", lambda self: pytest.fail("get_vocab builds the whole dict"))
    assert scoring.start_token_id(tokenizer) == tokenizer.convert_tokens_to_ids("<|endoftext|>") == 4
    assert scoring.vocabulary_id(tokenizer, "<|no such token|>") is None
    assert scoring.vocabulary_id(tokenizer, "[UNK]") == tokenizer.unk_token_id


def test_logits_of_another_shape_than_the_batch_are_refused():
    batch = TokenBatch(torch.zeros(3, 7, dtype=torch.long), torch.ones(3, 7, dtype=torch.long),
                       torch.ones(3, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"do not match the token batch \(3, 7\)"):
        token_log_probs(torch.randn(3, 9, 13), batch)


def test_a_sentence_over_the_context_is_refused_unless_truncated_to_fit():
    tokenizer = editor_tokenizer()
    long = " ".join(["he is a nurse ."] * 3)  # 15 words: 16 tokens with BOS
    with pytest.raises(ValueError, match=r"sentence 1 .* 16 tokens with BOS, more than the model's context of 8"):
        encode_sentences(tokenizer, ["he is a nurse .", long], context=8)
    cut = encode_sentences(tokenizer, ["he is a nurse .", long], max_length=8, context=8)
    assert cut.input_ids.shape == (2, 8) and cut.attention_mask.sum(-1).tolist() == [6, 8]
    assert cut.input_ids[1].tolist() == encode_sentences(tokenizer, [long]).input_ids[0, :8].tolist()
    tokenizer.model_max_length = 8  # the tokenizer's own limit does not hide it: still refused
    with pytest.raises(ValueError, match="more than the model's context of 8"):
        encode_sentences(tokenizer, [long], context=8)
