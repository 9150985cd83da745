"""The per-batch and held-out evaluation protocols of a trained editor (biasedit_peft.protocols)."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from biasedit_peft import BiasEditConfig, get_deltas
from biasedit_peft.data import load_stereoset
from biasedit_peft.editor import BiasEditor
from biasedit_peft.evaluation import evaluate_stereoset, score_stereoset_items, stereoset_results
from biasedit_peft.models import load_model_and_tokenizer
from biasedit_peft.protocols import edit_batches, held_out_protocol, per_batch_protocol, split_targets


@pytest.fixture(scope="module")
def testbed():
    model, tokenizer = load_model_and_tokenizer("testbed")
    return get_peft_model(model, BiasEditConfig()), tokenizer


@pytest.fixture(scope="module")
def items():
    chosen, counts = [], {}
    for item in load_stereoset("test", bias_types=["gender", "religion"]):
        if counts.get(item.bias_type, 0) < 10:
            counts[item.bias_type] = counts.get(item.bias_type, 0) + 1
            chosen.append(item)
    return chosen


def _editor(peft_model, tokenizer, items, lr: float) -> BiasEditor:
    torch.manual_seed(0)
    editor = BiasEditor.for_model(peft_model, rank=16, lr=lr)
    editor.cache_samples(peft_model, tokenizer, items, batch_size=8, update_normalizers=True)
    return editor


def test_edit_batches_group_by_bias_type_in_order():
    class Item:
        def __init__(self, bias_type):
            self.bias_type = bias_type

    kinds = ["gender", "race", "gender", "gender", "race"]
    assert edit_batches([Item(k) for k in kinds], 2) == [[0, 2], [3], [1, 4]]
    with pytest.raises(ValueError, match="positive"):
        edit_batches([Item("gender")], 0)


def test_split_targets_halves_each_bias_type_disjointly_and_repeatably(items):
    split = split_targets(items, seed=3)
    for bias_type in ("gender", "religion"):
        targets = {item.target for item in items if item.bias_type == bias_type}
        edit, scored = set(split.edit[bias_type]), set(split.scored[bias_type])
        assert edit | scored == targets and not edit & scored
        assert len(edit) - len(scored) in (0, 1)
    assert split_targets(items, seed=3) == split
    one_target = [item for item in items if item.target == items[0].target]
    with pytest.raises(ValueError, match="needs 2"):
        split_targets(one_target)


def test_zero_step_editor_changes_nothing_in_either_protocol(testbed, items):
    peft_model, tokenizer = testbed
    editor = _editor(peft_model, tokenizer, items, lr=0.0)
    per_batch = per_batch_protocol(editor, peft_model, tokenizer, items, edit_batch_size=4, n_resamples=0,
                                   progress=False)
    assert per_batch["before"] == per_batch["after"]
    other = per_batch["other_units"]
    assert other["mode"] == "paper" and other["before"] == other["after"]
    assert other["before"]["overall"]["ss"] == evaluate_stereoset(peft_model, tokenizer, items, mode="paper",
                                                                   progress=False, n_resamples=0)["overall"]["ss"]
    assert per_batch["n_batches"] == 6  # 10 gender + 10 religion items in batches of 4
    held_out = held_out_protocol(editor, peft_model, tokenizer, items, n_resamples=0, progress=False)
    assert held_out["before"] == held_out["after"]


def test_per_batch_scores_each_batch_under_its_own_edit_and_restores_the_model(testbed, items):
    peft_model, tokenizer = testbed
    editor = _editor(peft_model, tokenizer, items, lr=1e-2)
    result = per_batch_protocol(editor, peft_model, tokenizer, items, edit_batch_size=4, n_resamples=0,
                                progress=False)
    assert all(not delta.any() for delta in get_deltas(peft_model).values())  # nothing written
    # recompute by hand: every batch edited on its own, scores put back in item order
    roles = ("stereotype", "anti-stereotype", "unrelated")
    expected = {role: torch.zeros(len(items)) for role in roles}
    for indices in edit_batches(items, 4):
        group = [items[i] for i in indices]
        cache, _, _ = editor.cache_samples(peft_model, tokenizer, group, 32)
        with editor.edited(peft_model, editor.predict(cache)):
            scores = score_stereoset_items(peft_model, tokenizer, group, progress=False)
        for role in roles:
            expected[role][indices] = scores[role].mean
    by_role = score_stereoset_items(peft_model, tokenizer, items, progress=False)
    for role in roles:
        by_role[role].mean = expected[role]
    assert result["after"] == stereoset_results(items, by_role, n_resamples=0)
    assert result["after"] != result["before"]


def test_per_batch_uses_given_unedited_scores_instead_of_scoring_again(testbed, items):
    peft_model, tokenizer = testbed
    editor = _editor(peft_model, tokenizer, items, lr=1e-2)
    unedited = score_stereoset_items(peft_model, tokenizer, items, progress=False)
    given = per_batch_protocol(editor, peft_model, tokenizer, items, edit_batch_size=4, n_resamples=0,
                               progress=False, unedited=unedited)
    assert given == per_batch_protocol(editor, peft_model, tokenizer, items, edit_batch_size=4, n_resamples=0,
                                       progress=False)
    shifted = {role: scores[slice(None)] for role, scores in unedited.items()}
    shifted["stereotype"].mean = shifted["stereotype"].mean + 100.0  # every stereotype now scores higher
    before = per_batch_protocol(editor, peft_model, tokenizer, items, edit_batch_size=4, n_resamples=0,
                                progress=False, unedited=shifted)["before"]
    assert before["overall"]["ss"] == 100.0  # the given scores were used, not recomputed
    assert before != given["before"]


def test_held_out_scores_only_targets_the_edit_never_saw(testbed, items):
    peft_model, tokenizer = testbed
    editor = _editor(peft_model, tokenizer, items, lr=1e-2)
    result = held_out_protocol(editor, peft_model, tokenizer, items, n_resamples=0, progress=False, seed=1)
    scored = {t for targets in result["scored_targets"].values() for t in targets}
    edit = {t for targets in result["edit_targets"].values() for t in targets}
    assert not scored & edit
    assert result["n_items"] == sum(1 for item in items if item.target in scored)
    assert result["n_edit_items"] + result["n_items"] == len(items)
    assert result["after"]["overall"]["n"] == result["n_items"]
    assert all(not delta.any() for delta in get_deltas(peft_model).values())
