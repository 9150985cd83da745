"""The pieces of a pooled joint solve: length-sorted batches and the Gram of edited layers' inputs."""

from __future__ import annotations

import pytest
import torch

from biasedit_peft.editor.cache import key_grams
from biasedit_peft.scoring import encode_sentences, length_sorted_batches, logit_positions

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


def test_the_default_recipe_is_the_editors_own_joint_delta_and_every_recipe_has_its_size(tmp_path):
    """``JointRecipe()`` (learned lambda, nothing preserved) gives ``joint_solutions``' delta; every other recipe is
    rescaled to that delta's ``||U S||_F`` on the edit keys; preservation moves the preserved keys' values less."""
    from biasedit_peft.editor.cache import as_edit_sample
    from biasedit_peft.editor.joint import JointRecipe, pooled_statistics, recipe_solutions

    from factories import trained_editor

    model, editor = trained_editor(tmp_path / "editor")
    tokenizer = editor_tokenizer()
    edit = samples(12)
    expected, report = editor.joint_solutions(model, edit, tokenizer, batch_size=4, progress=False)
    preserved = [s.unrelated for s in samples(16)[12:]] + [s.unrelated for s in edit]
    statistics, n_tokens = pooled_statistics(editor, model, tokenizer, edit, 4, preserved)
    assert n_tokens == report.n_tokens and set(statistics) == set(expected)
    default = recipe_solutions(statistics, JointRecipe())
    for name in expected:
        want = expected[name].delta.dense().double()
        got = default[name].delta.dense().double()
        assert float((got - want).norm() / want.norm()) < 1e-4
    cache, _, _ = editor.cache_samples(model, tokenizer, [as_edit_sample(s, i) for i, s in enumerate(edit)], 4)
    layers = _edit_layers(model)
    _, batches = length_sorted_batches(tokenizer, preserved, 4)
    captured = {name: [] for name in layers}
    handles = [module.register_forward_hook(lambda m, i, o, name=name: captured[name].append(i[0]))
               for name, module in layers.items()]
    with torch.no_grad():
        for batch in batches:
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            for name in layers:
                captured[name][-1] = captured[name][-1][logit_positions(batch.target_mask)]
    for handle in handles:
        handle.remove()
    for recipe in (JointRecipe(ridge=1.0), JointRecipe(preserve=10.0)):
        solutions = recipe_solutions(statistics, recipe)
        for name in expected:
            keys = cache.layer(name)[0].double()
            size = (keys @ solutions[name].delta.dense().double()).norm()
            assert float(size) == pytest.approx(float((keys @ expected[name].delta.dense().double()).norm()), rel=1e-4)
    # at the same size on the edit keys, a heavier preservation weight moves the preserved keys' values less
    for name in expected:
        preserved_keys = torch.cat(captured[name]).double()
        moved = [float((preserved_keys @ recipe_solutions(statistics, JointRecipe(preserve=w))[name].delta.dense()
                        .double()).norm()) for w in (0.0, 10.0, 1000.0)]
        assert moved[0] > moved[1] > moved[2]


def test_a_recipe_that_preserves_needs_the_preserved_gram(tmp_path):
    from biasedit_peft.editor.joint import JointRecipe, pooled_statistics, recipe_solutions

    from factories import trained_editor

    model, editor = trained_editor(tmp_path / "editor")
    statistics, _ = pooled_statistics(editor, model, editor_tokenizer(), samples(4), 4)
    with pytest.raises(ValueError, match="preserved keys"):
        recipe_solutions(statistics, JointRecipe(preserve=1.0))
    assert JointRecipe(preserve=1.0, ridge=0.01).label == "preserve 1, ridge 0.01"


def test_the_sweep_script_refuses_an_existing_out_before_any_work(tmp_path, capsys):
    from factories import script_module

    out = tmp_path / "sweep.json"
    out.write_text("{\"mine\": 1}")
    with pytest.raises(SystemExit):
        script_module("joint_ridge_sweep").main(["--editor", str(tmp_path / "none"), "--out", str(out)])
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_text() == "{\"mine\": 1}"


@pytest.mark.parametrize("fields, named", [({"preserve": -1.0}, "preserve"), ({"preserve": float("nan")}, "preserve"),
                                           ({"preserve": float("inf")}, "preserve"), ({"ridge": 0.0}, "ridge"),
                                           ({"ridge": -1e-3}, "ridge"), ({"ridge": float("nan")}, "ridge")])
def test_a_recipe_with_a_weight_that_cannot_be_solved_is_refused(fields, named):
    """A negative, infinite or NaN preservation weight, or a ridge that is not above 0, fails where the recipe is
    made (the API, the sweep's --grid and --preserve-keys alike), naming the field; valid ones are accepted."""
    from biasedit_peft.editor.joint import JointRecipe

    with pytest.raises(ValueError, match=f"JointRecipe.{named}"):
        JointRecipe(**fields)
    assert JointRecipe(preserve=0.0, ridge=1e-6).label == "preserve 0, ridge 1e-06"
    assert JointRecipe(preserve=10.0).label == "preserve 10, ridge learned"
