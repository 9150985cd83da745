"""The per-batch and held-out evaluation protocols of a trained editor (biasedit_peft.workflows.protocols)."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from peft import get_peft_model

import biasedit_peft.workflows.protocols as protocols
from biasedit_peft import BiasEditConfig, get_deltas
from biasedit_peft.data import load_stereoset
from biasedit_peft.editor import BiasEditor
from biasedit_peft.evaluation import STEREOSET_ROLES, evaluate_stereoset, score_stereoset_items
from biasedit_peft.models import load_model_and_tokenizer
from biasedit_peft.scoring import SentenceLogProbs
from biasedit_peft.workflows.protocols import edit_batches, held_out_protocol, per_batch_protocol, split_targets

from factories import stereoset_item


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


class FakeEditor:
    """Edits by name: the edit of a batch is the ids of its items, active inside ``edited``."""

    def __init__(self):
        self.active = None

    def cache_samples(self, model, tokenizer, group, batch_size):
        return tuple(item.id for item in group), None, None

    def predict(self, cache):
        return cache

    @contextmanager
    def edited(self, model, solutions, adapter_name="default"):
        self.active = solutions
        try:
            yield
        finally:
            self.active = None


# mean log-probs (stereotype, anti-stereotype, unrelated) of four items, one target term each
UNEDITED = {"he": (-1.0, -2.0, -3.0), "monk": (-1.0, -1.5, -1.2), "she": (-2.0, -1.0, -4.0), "nun": (-1.0, -3.0, -0.6)}
EDIT_BOOST = 2.5  # an item's own edit raises its anti-stereotype by this much
WRONG_EDIT = 5.0  # scored under another batch's edit, the stereotype would rise by this much (it never is)


def test_per_batch_scores_each_batch_under_its_own_edit_and_restores_the_model(monkeypatch):
    items = [stereoset_item(target, target, f"{target} a", f"{target} b", bias_type=bias_type)
             for target, bias_type in (("he", "gender"), ("monk", "religion"), ("she", "gender"), ("nun", "religion"))]
    editor, calls = FakeEditor(), []

    def fake_scores(model, tokenizer, group, batch_size=32, progress=True):
        calls.append((editor.active, [item.id for item in group]))
        rows = []
        for item in group:
            stereo, anti, unrelated = UNEDITED[item.id]
            if editor.active is not None:
                if item.id in editor.active:
                    anti += EDIT_BOOST
                else:
                    stereo += WRONG_EDIT
            rows.append((stereo, anti, unrelated))
        scores = torch.tensor(rows)
        return {role: SentenceLogProbs(scores[:, k], scores[:, k], torch.ones(len(group)), scores[:, k].exp())
                for k, role in enumerate(STEREOSET_ROLES)}

    monkeypatch.setattr(protocols, "score_stereoset_items", fake_scores)
    result = protocols.per_batch_protocol(editor, None, None, items, edit_batch_size=2, n_resamples=0,
                                          progress=False)
    # all four unedited, then the gender batch (he, she) under its edit, then the religion batch (monk, nun)
    assert calls == [(None, ["he", "monk", "she", "nun"]), (("he", "she"), ["he", "she"]),
                     (("monk", "nun"), ["monk", "nun"])]
    assert editor.active is None and result["n_batches"] == 2 and result["n_items"] == 4

    def ss_lms(entry):
        return entry["ss"], entry["lms"], entry["icat"]

    # before. pro (stereotype > anti): he 1, monk 1, she 0, nun 1.
    #   related ((s > u) + (a > u)) / 2: he (1 + 1) / 2 = 1, monk (1 + 0) / 2 = 0.5, she 1, nun (0 + 0) / 2 = 0.
    #   gender: SS (1 + 0) / 2 = 50, LMS 100, ICAT 100 * min(50, 50) / 50 = 100
    #   religion: SS 100, LMS (0.5 + 0) / 2 = 25, ICAT 25 * 0 / 50 = 0
    #   overall: SS 3 / 4 = 75, LMS 2.5 / 4 = 62.5, ICAT 62.5 * 25 / 50 = 31.25
    before = result["before"]
    assert ss_lms(before["gender"]) == pytest.approx((50.0, 100.0, 100.0))
    assert ss_lms(before["religion"]) == pytest.approx((100.0, 25.0, 0.0))
    assert ss_lms(before["overall"]) == pytest.approx((75.0, 62.5, 31.25))
    # after: anti + 2.5 -> he 0.5, monk 1.0, she 1.5, nun -0.5: no stereotype is preferred any more.
    #   related: he 1, monk (1 + 1) / 2 = 1, she 1, nun (0 + 1) / 2 = 0.5 (-0.5 > -0.6).
    #   gender: SS 0, LMS 100, ICAT 0; religion: SS 0, LMS 75; overall: SS 0, LMS 3.5 / 4 = 87.5
    after = result["after"]
    assert ss_lms(after["gender"]) == pytest.approx((0.0, 100.0, 0.0))
    assert ss_lms(after["religion"]) == pytest.approx((0.0, 75.0, 0.0))
    assert ss_lms(after["overall"]) == pytest.approx((0.0, 87.5, 0.0))
    # the paper's units: 4 items fit one chunk of its batch (64), so its SS is the plain share, 75 then 0
    other = result["other_units"]
    assert other["mode"] == "paper" and (other["before"]["overall"]["ss"], other["after"]["overall"]["ss"]) == (
        pytest.approx(75.0), pytest.approx(0.0))
    assert "scores" not in result
    # keep_scores: every item's role scores, in item order (he, monk, she, nun), before and under its own edit
    kept = protocols.per_batch_protocol(editor, None, None, items, edit_batch_size=2, n_resamples=0,
                                        progress=False, keep_scores=True)["scores"]
    for k, role in enumerate(STEREOSET_ROLES):
        unedited = torch.tensor([UNEDITED[item.id][k] for item in items])
        edited = unedited + (EDIT_BOOST if role == "anti-stereotype" else 0.0)
        assert torch.equal(kept["before"][role].mean, unedited) and torch.equal(kept["after"][role].mean, edited)


def test_per_batch_on_the_testbed_writes_nothing_and_changes_the_scores(testbed, items):
    peft_model, tokenizer = testbed
    editor = _editor(peft_model, tokenizer, items, lr=1e-2)
    result = per_batch_protocol(editor, peft_model, tokenizer, items, edit_batch_size=4, n_resamples=0,
                                progress=False)
    assert all(not delta.any() for delta in get_deltas(peft_model).values())  # nothing written
    assert result["after"] != result["before"]
    assert result["n_batches"] == 6 and result["after"]["overall"]["n"] == len(items)


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
