"""The pieces of a pooled joint solve: length-sorted batches and the Gram of edited layers' inputs."""

from __future__ import annotations

import torch

from biasedit_peft.editor.cache import key_grams, logit_positions
from biasedit_peft.scoring import encode_sentences, length_sorted_batches

from factories import editor_tokenizer, peft_model, samples


def _edit_layers(model) -> dict:
    from biasedit_peft.editor.editor import _edit_layers

    return _edit_layers(model)


def test_length_sorted_batches_hold_every_sentence_once_longest_first():
    tokenizer = editor_tokenizer()
    sentences = [s.unrelated for s in samples(11)]
    order, batches = length_sorted_batches(tokenizer, sentences, batch_size=4)
    assert sorted(order.tolist()) == list(range(11))
    assert [len(b.input_ids) for b in batches] == [4, 4, 3]
    lengths = torch.cat([b.attention_mask.sum(-1) for b in batches])
    assert (lengths[:-1] >= lengths[1:]).all()
    full = encode_sentences(tokenizer, sentences)
    for row, index in enumerate(order.tolist()):
        batch, k = batches[row // 4], row % 4
        n = int(full.attention_mask[index].sum())
        assert torch.equal(batch.input_ids[k, :n], full.input_ids[index, :n])
        assert batch.input_ids.shape[1] == int(batch.attention_mask.sum(-1).max())  # cut to its longest


def test_key_grams_are_the_gram_of_the_inputs_at_scoring_positions_whatever_the_batching():
    model = peft_model()
    tokenizer = editor_tokenizer()
    layers = _edit_layers(model)
    sentences = [s.unrelated for s in samples(9)]
    by_three, n_rows = key_grams(model, layers, length_sorted_batches(tokenizer, sentences, 3)[1])
    whole, n_whole = key_grams(model, layers, length_sorted_batches(tokenizer, sentences, 9)[1])
    encoded = encode_sentences(tokenizer, sentences)
    assert n_rows == n_whole == int(logit_positions(encoded.target_mask).sum())
    captured = {}
    handles = [module.register_forward_hook(lambda m, i, o, name=name: captured.__setitem__(name, i[0]))
               for name, module in layers.items()]
    with torch.no_grad():
        model(input_ids=encoded.input_ids, attention_mask=encoded.attention_mask)
    for handle in handles:
        handle.remove()
    positions = logit_positions(encoded.target_mask)
    for name in layers:
        keys = captured[name][positions].double()
        torch.testing.assert_close(by_three[name], keys.T @ keys, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(whole[name], keys.T @ keys, rtol=1e-5, atol=1e-6)
