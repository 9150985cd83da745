"""Prefix replay (editor/replay.py): the edited forward from the first edited block on gives what the full
forward gives, and a meta-step with it equals one without it."""

from __future__ import annotations

import warnings

import pytest
import torch

from biasedit_peft.editor import BiasEditor, BiasEditTrainer, BiasEditTrainingArguments
from biasedit_peft.editor.editor import forward_logits
from biasedit_peft.editor.replay import PrefixReplay, decoder_blocks
from biasedit_peft.scoring import encode_sentences
from biasedit_peft.tuner.deltas import edit_targets, override_deltas

from factories import editor_tokenizer, peft_model, samples

TOKENIZER = editor_tokenizer()


def peft_llama_last_block(seed: int = 0):
    """A 3-block Llama with a BiasEdit adapter on the last block's down_proj."""
    return peft_model("llama", seed, model_config={"num_hidden_layers": 3}, num_edit_layers=1)


def peft_falcon():
    """A 3-block Falcon (its blocks return a tuple) with a BiasEdit adapter on the last 2 blocks."""
    return peft_model("falcon")


def peft_bloom():
    """A 3-block Bloom (its blocks return a tuple) with a BiasEdit adapter on the last 2 blocks."""
    return peft_model("bloom")


TUPLE_BLOCKS = [peft_falcon, peft_bloom]


def random_deltas(model, scale: float = 0.5) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {name: scale * torch.randn(layer.get_base_layer().weight.shape, generator=generator)
            for name, layer in edit_targets(model).items()}


@pytest.mark.parametrize("build, first", [(peft_model, 1), (peft_llama_last_block, 2), (peft_falcon, 1)])
def test_the_first_edited_block_is_found(build, first):
    model = build()
    blocks, index = decoder_blocks(model, list(edit_targets(model).values()))
    assert index == first and len(blocks) == 3
    assert PrefixReplay(model, list(edit_targets(model).values())).enabled


@pytest.mark.parametrize("build", [peft_model, peft_llama_last_block, *TUPLE_BLOCKS])
def test_replayed_edited_logits_equal_full_edited_logits_and_their_gradients(build):
    model = build()
    replay = PrefixReplay(model, list(edit_targets(model).values()))
    batch = encode_sentences(TOKENIZER, [s.stereotype for s in samples(6)])
    with torch.no_grad(), replay.record() as recorded:
        unedited = forward_logits(model, batch)
    assert len(recorded) == 1 and recorded[0].shape == (6, batch.input_ids.shape[1], 16)
    results = []
    for prefix in (None, recorded[0]):
        deltas = {name: d.clone().requires_grad_(True) for name, d in random_deltas(model).items()}
        with override_deltas(model, deltas), replay.replay(prefix):
            logits = forward_logits(model, batch)
        grads = torch.autograd.grad(logits.square().sum(), list(deltas.values()))
        results.append((logits.detach(), grads))
    (full, full_grads), (replayed, replayed_grads) = results
    assert not torch.equal(full, unedited)  # the deltas do change the output
    assert torch.equal(full, replayed)
    for a, b in zip(full_grads, replayed_grads):
        assert torch.equal(a, b)
    # after the context, every block runs again: a full forward equals the unedited one bitwise
    with torch.no_grad():
        assert torch.equal(forward_logits(model, batch), unedited)
    assert all("forward" not in block.__dict__ for block in replay.blocks)


def test_replay_skips_the_blocks_before_the_first_edited_one():
    model = peft_model()  # blocks 1 and 2 edited: block 0 is skipped
    replay = PrefixReplay(model, list(edit_targets(model).values()))
    calls = []
    handles = [block.attn.register_forward_pre_hook(lambda m, a, i=i: calls.append(i)) for i, block in
               enumerate(replay.blocks)]
    batch = encode_sentences(TOKENIZER, ["he is a nurse ."])
    with torch.no_grad():
        with replay.record() as recorded:
            full = forward_logits(model, batch)
        assert calls == [0, 1, 2]
        calls.clear()
        with replay.replay(recorded[0]):
            forward_logits(model, batch)
        assert calls == [1, 2]
        with replay.replay(torch.zeros_like(recorded[0])):  # block 1 computes from what it is given
            zeroed = forward_logits(model, batch)
    for handle in handles:
        handle.remove()
    assert not torch.allclose(zeroed, full)


def test_nothing_to_skip_when_the_first_block_is_edited():
    model = peft_model(num_edit_layers=3)
    replay = PrefixReplay(model, list(edit_targets(model).values()))
    assert not replay.enabled and not replay.check(lambda: torch.zeros(1))


def test_check_switches_replay_off_with_a_warning_when_it_does_not_reproduce_the_forward():
    model = peft_model()
    replay = PrefixReplay(model, list(edit_targets(model).values()))
    batch = encode_sentences(TOKENIZER, ["he is a nurse ."])
    assert replay.check(lambda: forward_logits(model, batch))
    noise = iter([torch.zeros(1, 6, 40), torch.ones(1, 6, 40)])
    with pytest.warns(UserWarning, match="Prefix replay does not reproduce"):
        assert not replay.check(lambda: (forward_logits(model, batch), next(noise))[1])
    assert not replay.enabled


def _meta_step(tmp_path, prefix_replay: bool, build=peft_model):
    model = build()
    editor = BiasEditor.for_model(model, rank=8, lr=1e-2)
    args = BiasEditTrainingArguments(output_dir=str(tmp_path), n_edits=6, batch_size=2, meta_lr=1e-2, loc_coef=1.0,
                                     progress=False, seed=0, prefix_replay=prefix_replay)
    trainer = BiasEditTrainer(model, editor, args, samples(12), None, tokenizer=TOKENIZER)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the check passes: no fallback warning
        metrics = [trainer.edit_step(trainer._batches(trainer.train_data, 0)[i], train=True) for i in range(2)]
    assert trainer.replay.enabled == prefix_replay
    return metrics, editor.state_dict()


@pytest.mark.parametrize("build", [peft_model, peft_llama_last_block, *TUPLE_BLOCKS])
def test_meta_steps_with_and_without_replay_are_the_same(tmp_path, build):
    full_metrics, full_state = _meta_step(tmp_path / "full", False, build)
    replay_metrics, replay_state = _meta_step(tmp_path / "replay", True, build)
    assert full_metrics == replay_metrics
    for name, value in full_state.items():
        assert torch.equal(value, replay_state[name]), name


def test_a_sequence_of_prefixes_is_consumed_one_per_forward_and_a_misfit_is_an_error():
    model = peft_model()
    replay = PrefixReplay(model, list(edit_targets(model).values()))
    batches = [encode_sentences(TOKENIZER, s) for s in (["he is a nurse ."], ["she is a cook .", "men is a ."])]
    with torch.no_grad():
        with replay.record() as recorded:
            full = [forward_logits(model, b) for b in batches]
        with replay.replay(recorded):
            replayed = [forward_logits(model, b) for b in batches]
            with pytest.raises(RuntimeError, match="no recorded prefix"):
                forward_logits(model, batches[0])  # one forward too many
        assert all(torch.equal(a, b) for a, b in zip(full, replayed))
        with replay.replay(recorded), pytest.raises(RuntimeError, match=r"shape \(2, "):
            forward_logits(model, batches[1])  # out of order: batch 1 where batch 0's prefix is next
