"""The held-out meta-loss (MEND / MALMEN's generalisation loss, trainer.held_out_group): the groups it pairs, its
value on a hand-built case, its gradient against autograd of the whole meta-loss, and held-out selection."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from biasedit_peft.editor import BiasEditor, BiasEditTrainer, BiasEditTrainingArguments
from biasedit_peft.editor.cache import EditSample
from biasedit_peft.editor.calibration import nll_rise
from biasedit_peft.editor.editor import encode_pairs, forward_logits, length_order
from biasedit_peft.editor.losses import debias_loss, pair_scores, retention_loss
from biasedit_peft.editor.trainer import held_out_group, selection_score
from biasedit_peft.scoring import encode_sentences
from biasedit_peft.tuner.deltas import override_deltas

from factories import editor_tokenizer, peft_model, samples

TOKENIZER = editor_tokenizer()


def labelled(n: int) -> list[EditSample]:
    """:func:`factories.samples` with target = the group word, bias type by the group's gender-ness."""
    return [dataclasses.replace(s, target=s.stereotype.split()[0],
                                bias_type="gender" if i % 3 else "race") for i, s in enumerate(samples(n))]


def _args(tmp_path, **kwargs):
    defaults = dict(output_dir=str(tmp_path), n_edits=4, batch_size=2, meta_lr=1e-2, loc_coef=0.5, max_steps=2,
                    progress=False, seed=0, calibrate=False)
    return BiasEditTrainingArguments(**{**defaults, **kwargs})


def test_held_out_group_keeps_the_same_bias_types_and_other_target_terms():
    def pair(target, bias_type):
        return EditSample(f"{target} a", f"{target} b", "c", target, bias_type)

    edit = [pair("he", "gender"), pair("she", "gender"), pair("asian", "race")]
    pool = [pair("he", "gender"), pair("boys", "gender"), pair("asian", "race"), pair("arab", "race"),
            pair("muslim", "religion")]
    assert [s.target for s in held_out_group(edit, pool)] == ["boys", "arab"]
    assert held_out_group([pair("he", "gender")], pool[:1]) == []
    with pytest.raises(ValueError, match="'target' and 'bias_type'"):
        held_out_group(samples(2), pool)


def _step_and_autograd_reference(tmp_path, monkeypatch, coef: float):
    """One trainer meta-step with held-out pairs, and the whole meta-loss rebuilt with plain autograd."""
    model = peft_model()
    editor = BiasEditor.for_model(model, rank=8, lr=1e-1)
    trainer = BiasEditTrainer(model, editor, _args(tmp_path, held_out_coef=coef), labelled(12), None,
                              tokenizer=TOKENIZER)
    captured = {}
    monkeypatch.setattr(editor, "meta_backward",
                        lambda cache, solutions, grads, **_: captured.update(s=solutions, g=grads))
    batches = trainer._batches(trainer.train_data, 0)
    group, held = batches[0], held_out_group(batches[0], batches[1])
    assert held and not {s.target for s in held} & {s.target for s in group}
    metrics = trainer.edit_step(group, train=True, held_out=held)

    ordered = [group[i] for i in length_order(TOKENIZER, group).tolist()]
    held = [held[i] for i in length_order(TOKENIZER, held).tolist()]
    pairs, unrelated = encode_pairs(TOKENIZER, ordered), encode_sentences(TOKENIZER, [s.unrelated for s in ordered])
    held_pairs = encode_pairs(TOKENIZER, held)
    with torch.no_grad():
        pre_u = forward_logits(model, unrelated)
        pre_held = pair_scores(forward_logits(model, held_pairs), held_pairs)
    leaves = {name: s.delta.dense().clone().requires_grad_(True) for name, s in captured["s"].items()}
    natives = {name: leaf.T if not trainer.layers[name].fan_in_fan_out else leaf for name, leaf in leaves.items()}
    with override_deltas(model, natives):
        logits, post_u, held_logits = (forward_logits(model, b) for b in (pairs, unrelated, held_pairs))
    n, m = len(ordered), len(held)
    held_loss = debias_loss("token", held_logits, held_pairs).sum() / m
    # the token debias loss by hand: gap * tanh(gap / 2), gap = mean log-prob of stereotype - anti-stereotype
    stereo, anti = pair_scores(held_logits, held_pairs)
    gap = stereo.mean - anti.mean
    assert metrics["held_out_debias"] == pytest.approx((gap * torch.tanh(gap / 2)).mean().item(), rel=1e-5)
    assert metrics["held_out_debias"] == pytest.approx(held_loss.item(), rel=1e-5)
    assert metrics["held_out_ss_pre"] == pytest.approx(100.0 * (pre_held[0].mean > pre_held[1].mean).float().mean())
    assert metrics["held_out_ss_post"] == pytest.approx(100.0 * (gap > 0).float().mean().item())
    total = (debias_loss("token", logits, pairs).sum() / n + coef * held_loss
             + 0.5 * retention_loss("token", pre_u, post_u, unrelated).sum() / n)
    assert metrics["loss"] == pytest.approx(total.item(), rel=1e-5)
    reference = dict(zip(leaves, torch.autograd.grad(total, list(leaves.values()))))
    return captured["g"], reference


def test_the_held_out_meta_loss_value_and_its_gradient_match_autograd_of_the_whole_meta_loss(tmp_path, monkeypatch):
    with_held_out, expected = _step_and_autograd_reference(tmp_path / "a", monkeypatch, coef=1.5)
    for name, grad in expected.items():
        torch.testing.assert_close(with_held_out[name], grad, rtol=1e-4, atol=1e-7)
    # coefficient 0: the held-out pairs are only measured, and the gradient is that of the rest of the loss
    without, expected = _step_and_autograd_reference(tmp_path / "b", monkeypatch, coef=0.0)
    for name, grad in expected.items():
        torch.testing.assert_close(without[name], grad, rtol=1e-4, atol=1e-7)
    assert any((with_held_out[name] - without[name]).abs().max() > 1e-5 for name in expected)


def test_held_out_training_and_selection_run_and_record_the_held_out_ss(tmp_path):
    model = peft_model()
    args = _args(tmp_path, held_out_coef=1.0, select_by="held_out", eval_every=1, max_steps=2)
    trainer = BiasEditTrainer(model, BiasEditor.for_model(model, rank=8, lr=1e-2), args, labelled(12), labelled(8),
                              tokenizer=TOKENIZER)
    state = trainer.train()
    assert len(state.history) == 2  # eval_every 1, max_steps 2
    for record in state.history:
        assert record["train_held_out_n"] > 0 and 0.0 <= record["eval_held_out_ss_post"] <= 100.0
        evaluated = {k[5:]: v for k, v in record.items() if k.startswith("eval_")}
        within_bounds = (evaluated["lms_pre"] - evaluated["lms_post"] <= args.max_lms_drop
                         and nll_rise(evaluated) <= args.max_nll_increase)
        if within_bounds:  # held_out_ss_post is scored, not ss_post
            assert record["selection"] == pytest.approx(abs(evaluated["held_out_ss_post"] - 50.0))
        else:
            assert record["selection"] >= 100.0


def test_held_out_selection_scores_the_held_out_ss_on_a_hand_built_validation(tmp_path):
    validation = dict(loss=0.3, ss_post=53.5, held_out_ss_post=47.0, lms_pre=90.0, lms_post=88.0, nll_increase=0.01)
    assert selection_score(validation, _args(tmp_path, select_by="held_out")) == pytest.approx(3.0)  # |47 - 50|
    assert selection_score(validation, _args(tmp_path, select_by="target")) == pytest.approx(3.5)  # |53.5 - 50|


def test_held_out_options_refuse_unlabelled_samples(tmp_path):
    model = peft_model()
    with pytest.raises(ValueError, match="train_data: samples \\[0, 1, 2, 3, 4\\] have no 'target'"):
        BiasEditTrainer(model, BiasEditor.for_model(model, rank=8), _args(tmp_path, held_out_coef=1.0), samples(8),
                        labelled(4), tokenizer=TOKENIZER)
    with pytest.raises(ValueError, match="eval_data"):
        BiasEditTrainer(model, BiasEditor.for_model(model, rank=8), _args(tmp_path, select_by="held_out"),
                        samples(8), samples(4), tokenizer=TOKENIZER)
