"""Caching, meta-training, debias, editor folders and resume on tiny models."""

from __future__ import annotations

import json
import math

import pytest
import torch

from biasedit_peft._io import write_manifest
from biasedit_peft.editor import BiasEditor, BiasEditTrainer, BiasEditTrainingArguments
from biasedit_peft.editor.editor import encode_pairs, forward_logits
from biasedit_peft.editor.losses import debias_loss
from biasedit_peft.editor.trainer import selection_score
from biasedit_peft.scoring import logit_positions
from biasedit_peft.tuner.deltas import edit_targets, get_deltas, set_deltas

from factories import editor_tokenizer, peft_model, samples, tiny_model

TOKENIZER = editor_tokenizer()


def _editor(model, loss="paper", data=None, **config):
    """An editor whose normalisers have seen the cache of ``data`` (as after training)."""
    editor = BiasEditor.for_model(model, rank=8, lr=1e-2, loss=loss, **config)
    editor.cache_samples(model, TOKENIZER, data or samples(8), batch_size=4, update_normalizers=True)
    return editor


def _args(tmp_path, **kwargs):
    defaults = dict(output_dir=str(tmp_path), n_edits=4, batch_size=2, meta_lr=1e-2, loc_coef=1.0, epochs=2,
                    progress=False, seed=0)
    return BiasEditTrainingArguments(**{**defaults, **kwargs})


def _base_weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.get_base_model().state_dict().items() if "biasedit" not in k}


def test_cache_holds_layer_inputs_and_output_gradients_at_logit_positions():
    from biasedit_peft.editor.editor import length_order

    model = peft_model()
    editor = BiasEditor.for_model(model, rank=8, loss="paper")
    data = samples(4)
    cache, _, _ = editor.cache_samples(model, TOKENIZER, data, batch_size=3)  # two LM batches: 3 + 1 pairs
    data = [data[i] for i in length_order(TOKENIZER, data).tolist()]  # the LM batches hold length-sorted pairs
    assert all(p.grad is None for p in model.parameters())  # caching leaves .grad untouched

    name = "transformer.h.2.mlp.c_proj"
    layer = edit_targets(model)[name]
    outputs = []
    handle = layer.register_forward_hook(lambda module, inputs, output: outputs.append((inputs[0], output)))
    keys, grads = [], []
    for start in (0, 3):
        batch = encode_pairs(TOKENIZER, data[start:start + 3])
        outputs.clear()
        logits = forward_logits(model, batch)
        layer_input, layer_output = outputs[0]
        layer_output.retain_grad()
        debias_loss("paper", logits, batch).sum().backward()  # per-pair losses, summed
        positions = torch.zeros_like(batch.target_mask)
        positions[:, :-1] = batch.target_mask[:, 1:]  # logit t-1 scores token t
        keys.append(layer_input[positions].detach())
        grads.append(layer_output.grad[positions])
    handle.remove()
    cached_keys, cached_grads = cache.layer(name)
    assert cache.n_tokens == int(sum(encode_pairs(TOKENIZER, data).target_mask.sum(-1)))
    torch.testing.assert_close(cached_keys, torch.cat(keys))
    torch.testing.assert_close(cached_grads, torch.cat(grads))


def test_logit_positions_shift_left_by_one():
    target = torch.tensor([[False, True, True, False]])
    assert logit_positions(target).tolist() == [[True, True, False, False]]


def test_rows_at_positions_reads_batch_major_and_flattened_layer_tensors_alike():
    from biasedit_peft.editor.cache import rows_at_positions

    tensor = torch.arange(2 * 3 * 2.0).view(2, 3, 2)  # [B=2, T=3, d=2]
    positions = torch.tensor([[True, False, True], [False, True, False]])
    expected = torch.tensor([[0.0, 1.0], [4.0, 5.0], [8.0, 9.0]])
    assert torch.equal(rows_at_positions(tensor, positions, "layer"), expected)
    assert torch.equal(rows_at_positions(tensor.view(6, 2), positions, "layer"), expected)  # OPT's [B * T, d]
    with pytest.raises(RuntimeError, match=r"Layer 'model.decoder.layers.1.fc2' saw a tensor of shape \(5, 2\)"):
        rows_at_positions(torch.zeros(5, 2), positions, "model.decoder.layers.1.fc2")


@pytest.mark.parametrize("loss", ["paper", "token", "abs"])
def test_meta_steps_lower_the_meta_loss_on_a_fixed_batch(tmp_path, loss):
    model = peft_model()
    editor = _editor(model, loss)
    data = samples(8)
    trainer = BiasEditTrainer(model, editor, _args(tmp_path, batch_size=4), data, tokenizer=TOKENIZER)
    before = trainer.edit_step(data, train=False)["loss"]
    for _ in range(6):
        trainer.edit_step(data, train=True)
    after = trainer.edit_step(data, train=False)["loss"]
    assert after < before
    assert not any(get_deltas(model)[n].any() for n in edit_targets(model))  # training wrote nothing


@pytest.mark.parametrize("make_model", [peft_model, lambda: peft_model("llama"), lambda: peft_model("opt")],
                         ids=["gpt2", "llama", "opt (flattens tokens before its MLP)"])
def test_debias_writes_the_predicted_deltas_only_into_targeted_layers(make_model):
    model = make_model()
    editor = _editor(model)
    base_before = _base_weights(model)
    data = samples(6)
    cache, _, _ = editor.cache_samples(model, TOKENIZER, data, batch_size=4)
    expected = {name: s.delta.dense() for name, s in editor.predict(cache).items()}
    report = editor.debias(model, data, tokenizer=TOKENIZER, batch_size=4, progress=False)
    assert report.n_samples == 6 and report.n_tokens == cache.n_tokens
    deltas = get_deltas(model)
    for name, layer in edit_targets(model).items():
        native = expected[name] if layer.fan_in_fan_out else expected[name].T
        torch.testing.assert_close(deltas[name], native, atol=1e-6, rtol=1e-5)
        assert deltas[name].abs().sum() > 0
    after = _base_weights(model)
    assert all(torch.equal(base_before[k], after[k]) for k in base_before)  # base weights untouched
    # the edited model maps each cached key u to its output plus u @ S
    name = next(iter(expected))
    keys, _ = cache.layer(name)
    layer = edit_targets(model)[name]
    with torch.no_grad():
        torch.testing.assert_close(layer(keys) - layer.get_base_layer()(keys), keys @ expected[name],
                                   atol=1e-5, rtol=1e-4)


def test_debias_adds_to_an_existing_delta():
    model = peft_model()
    editor = _editor(model)
    data = samples(4)
    names = list(edit_targets(model))
    existing = {n: torch.randn(24, 16) * 1e-3 for n in names}
    set_deltas(model, existing)
    cache, _, _ = editor.cache_samples(model, TOKENIZER, data, batch_size=4)
    new = {n: s.delta.dense() for n, s in editor.predict(cache).items()}
    editor.debias(model, data, tokenizer=TOKENIZER, progress=False)
    for name, delta in get_deltas(model).items():
        torch.testing.assert_close(delta, existing[name] + new[name], atol=1e-6, rtol=1e-5)


def test_bad_input_is_a_clear_error_and_changes_nothing():
    model = peft_model()
    editor = _editor(model)
    before = get_deltas(model)
    with pytest.raises(ValueError, match="empty"):
        editor.debias(model, [], tokenizer=TOKENIZER)
    with pytest.raises(ValueError, match="Sample 1: field 'anti_stereotype'"):
        editor.debias(model, [("he is a cook .", "he is a pilot ."), ("she is a cook .", "")], tokenizer=TOKENIZER)
    with pytest.raises(ValueError, match="Sample 0: field 'anti_stereotype' .* tokenizes to no scored tokens"):
        editor.debias(model, [("he is a cook .", "\x07\x07")], tokenizer=TOKENIZER)
    with torch.no_grad():  # a NaN upstream of the edited layers poisons keys and gradients
        model.get_base_model().transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="Non-finite"):
        editor.debias(model, samples(2), tokenizer=TOKENIZER)
    after = get_deltas(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bf16_model_with_float32_editor():
    """The same float32 editor on a bf16 copy of the model writes float32 deltas within bf16's rounding of the
    float32 model's (measured: 0.9-1.1 % relative per layer)."""
    reference_model, model = peft_model(), peft_model(dtype=torch.bfloat16)
    reference_editor, editor = _editor(reference_model), _editor(model)
    editor.load_state_dict(reference_editor.state_dict())
    assert all(p.dtype == torch.float32 for p in editor.parameters())
    reference_editor.debias(reference_model, samples(4), tokenizer=TOKENIZER, progress=False)
    editor.debias(model, samples(4), tokenizer=TOKENIZER, progress=False)
    expected, deltas = get_deltas(reference_model), get_deltas(model)
    for name, delta in deltas.items():
        assert delta.dtype == torch.float32 and delta.norm() > 0
        assert (delta - expected[name]).norm() / expected[name].norm() < 0.05, name


def test_editor_folder_round_trip_and_mismatch_errors(tmp_path):
    model = peft_model()
    editor = _editor(model)
    with torch.no_grad():
        editor.nets["24x16"].blocks[0].B.normal_()
    editor.save_pretrained(tmp_path / "editor")
    assert {p.name for p in (tmp_path / "editor").iterdir()} == {"config.json", "editor.safetensors", "README.md",
                                                                 "manifest.json"}
    loaded = BiasEditor.from_pretrained(tmp_path / "editor")
    assert json.loads((tmp_path / "editor" / "config.json").read_text())["targets"] == editor.config.targets
    for (name, a), (_, b) in zip(editor.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    cache, _, _ = editor.cache_samples(model, TOKENIZER, samples(4))
    torch.testing.assert_close(editor.predict(cache)["transformer.h.2.mlp.c_proj"].delta.dense(),
                               loaded.predict(cache)["transformer.h.2.mlp.c_proj"].delta.dense())
    with pytest.raises(ValueError, match="not BiasEdit layers"):
        loaded.debias(peft_model("llama"), samples(2), tokenizer=TOKENIZER)
    with pytest.raises(ValueError, match="shapes differ"):
        loaded.debias(peft_gpt2_wide(), samples(2), tokenizer=TOKENIZER)


def test_the_abs_loss_drives_the_cached_value_gradients_and_survives_a_save(tmp_path):
    model = peft_model()
    data = samples(1)  # one pair: the abs gradient is the token gradient divided by d token / d gap
    token, absolute = _editor(model, "token", data), _editor(model, "abs", data)
    absolute.save_pretrained(tmp_path / "editor")
    assert BiasEditor.from_pretrained(tmp_path / "editor").config.loss == "abs"
    token_cache, stereo, anti = token.cache_samples(model, TOKENIZER, data)
    abs_cache, _, _ = absolute.cache_samples(model, TOKENIZER, data)
    gap = (stereo - anti).item()
    slope = math.tanh(gap / 2) + gap / 2 / math.cosh(gap / 2) ** 2
    name = "transformer.h.2.mlp.c_proj"
    torch.testing.assert_close(abs_cache.layer(name)[1], token_cache.layer(name)[1] / slope, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(abs_cache.layer(name)[0], token_cache.layer(name)[0], rtol=0, atol=0)


def peft_gpt2_wide():
    return peft_model(model_config={"n_inner": 32, "n_positions": 16})


def _train(tmp_path, **kwargs):
    model = peft_model()
    editor = BiasEditor.for_model(model, rank=8, lr=1e-2)
    data = samples(12)
    trainer = BiasEditTrainer(model, editor, _args(tmp_path, **kwargs), data, samples(4), tokenizer=TOKENIZER)
    state = trainer.train()
    return editor, state


def test_resume_after_interruption_continues_from_the_checkpoint(tmp_path):
    full, full_state = _train(tmp_path / "full", max_steps=5, eval_every=2)
    _train(tmp_path / "cut", max_steps=3, eval_every=2)  # "interrupted" after step 3 (checkpoint at step 3)
    saved = json.loads((tmp_path / "cut" / "checkpoint" / "trainer_state.json").read_text())
    assert saved["trainer"]["global_step"] == 3 and saved["trainer"]["step_in_epoch"] == 0
    assert saved["soft_ss_form"] == "per_type"  # what resume_mismatches reads
    resumed, resumed_state = _train(tmp_path / "cut", max_steps=5, eval_every=2, resume=True)
    assert resumed_state.global_step == full_state.global_step == 5
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)
    assert (tmp_path / "cut" / "editor.safetensors").is_file()  # best editor folder


def test_resume_on_another_model_dtype_data_or_base_model_is_refused_naming_it(tmp_path):
    """A checkpoint keeps what it computed on beyond the settings: the base model's dtype, a digest of its base
    weights, a digest of each data set (a changed sentence with the row count kept differs) and, in the editor's
    config, the base model's name; a resume on other inputs is refused naming them, and one on the same inputs goes
    on, whatever name or path now loads the same weights (a checkpoint without the weights' digest compares the
    names)."""
    import dataclasses

    from biasedit_peft.editor.trainer import base_weights_digest, run_inputs

    _train(tmp_path, max_steps=2, eval_every=2)
    saved = json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())
    model = peft_model()
    assert saved["inputs"] == run_inputs(edit_targets(model), {"train": samples(12), "eval": samples(4),
                                                               "calibration": samples(4)}, base_weights_digest(model))
    assert saved["inputs"]["model dtype"] == "float32"
    for name, parameter in model.named_parameters():  # the edited weights' dtype, not the embedding's
        if "biasedit_" not in name and ".mlp.c_proj." not in name:
            parameter.data = parameter.data.to(torch.float16)
    assert run_inputs(edit_targets(model), {})["model dtype"] == "float32"

    def resume(model=None, train=None):
        model = model or peft_model()
        editor = BiasEditor.for_model(model, rank=8, lr=1e-2)
        trainer = BiasEditTrainer(model, editor, _args(tmp_path, max_steps=3, eval_every=2, resume=True),
                                  train or samples(12), samples(4), tokenizer=TOKENIZER)
        trainer.load_checkpoint()
        return trainer.state.global_step

    with pytest.raises(ValueError, match=r"model dtype: checkpoint 'float32', now 'bfloat16'"):
        resume(model=peft_model(dtype=torch.bfloat16))
    edited = samples(12)
    edited[5] = dataclasses.replace(edited[5], anti_stereotype="someone else entirely .")
    with pytest.raises(ValueError, match=r"train data: checkpoint 'sha256 [0-9a-f]{16}', now 'sha256 [0-9a-f]{16}'"):
        resume(train=edited)
    renamed = peft_model()
    renamed.config.name_or_path = "../elsewhere/model"  # what the editor records as its base model
    assert resume(model=renamed) == 2  # the same weights by another name or path (another working directory)
    other = peft_model()
    with torch.no_grad():
        next(p for n, p in other.named_parameters() if ".attn.c_attn." in n and "biasedit_" not in n)[0, 0] += 1e-3
    with pytest.raises(ValueError, match=r"base weights: checkpoint 'sha256 [0-9a-f]{16}', now 'sha256 [0-9a-f]{16}'"):
        resume(model=other)  # one weight outside the edited blocks' MLPs: another model
    other.config.name_or_path = "another/model"
    with pytest.raises(ValueError, match=r"base weights: .*; base_model: checkpoint .*, now 'another/model'"):
        resume(model=other)
    assert resume() == 2  # the same inputs: restored
    state_path = tmp_path / "checkpoint" / "trainer_state.json"
    before_digests = json.loads(state_path.read_text())
    before_digests["inputs"].pop("base weights")  # a checkpoint from before the weights were digested
    state_path.write_text(json.dumps(before_digests))
    write_manifest(tmp_path / "checkpoint")
    with pytest.raises(ValueError, match=r"base_model: checkpoint .*, now '\.\./elsewhere/model'"):
        resume(model=renamed)  # compared by name there, as before
    assert resume() == 2


def test_the_base_weights_digest_is_the_bare_models_whatever_wraps_it_and_none_for_offloaded_weights():
    from biasedit_peft.editor.trainer import base_weights_digest
    from biasedit_peft.progress_store import tensors_digest

    bare = tiny_model(size="editor")
    expected = tensors_digest(dict(bare.named_parameters()))
    wrapped = peft_model()  # the same seed: the same weights, wrapped in BiasEdit layers with their own parameters
    assert base_weights_digest(wrapped) == base_weights_digest(bare) == expected
    assert base_weights_digest(torch.nn.ModuleDict({"module": wrapped})) == expected  # DDP's "module." prefix
    with torch.no_grad():
        wrapped.get_base_model().transformer.wte.weight[3, 1] += 1e-3
    assert base_weights_digest(wrapped) != expected
    with torch.device("meta"):
        offloaded = tiny_model(size="editor")
    assert base_weights_digest(offloaded) is None


def test_same_seed_gives_the_same_editor_and_deltas(tmp_path):
    first, _ = _train(tmp_path / "a", max_steps=3)
    second, _ = _train(tmp_path / "b", max_steps=3)
    other, _ = _train(tmp_path / "c", max_steps=3, seed=1)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    assert any(not torch.equal(a, b) for a, b in zip(first.state_dict().values(), other.state_dict().values()))
    deltas = []
    for editor in (first, second):
        model = peft_model()
        editor.debias(model, samples(4), tokenizer=TOKENIZER, progress=False)
        deltas.append(get_deltas(model))
    assert all(torch.equal(deltas[0][k], deltas[1][k]) for k in deltas[0])


def test_early_stopping_and_best_checkpoint(tmp_path):
    _, state = _train(tmp_path, epochs=30, early_stopping_patience=1, meta_lr=0.5, select_by="loss")
    assert state.stopped_early and state.epoch < 30
    best = min(record["eval_loss"] for record in state.history)
    assert state.best_loss == best
    assert state.best_step == next(r["step"] for r in state.history if r["eval_loss"] == best)


def test_target_selection_keeps_the_validation_closest_to_ss_50_and_saves_that_editor(tmp_path):
    from safetensors.torch import load_file

    _, state = _train(tmp_path, max_steps=6, eval_every=1, meta_lr=0.05, early_stopping_patience=10,
                      calibrate=False)  # the kept editor as validated (calibration scales it: test_calibration)
    scores = [record["selection"] for record in state.history]
    assert len(scores) == 6 and state.best_loss == min(scores)
    best = state.history[scores.index(min(scores))]
    assert state.best_step == best["step"]
    args = _args(tmp_path)
    assert best["selection"] == selection_score({k[5:]: v for k, v in best.items() if k.startswith("eval_")}, args)
    kept = load_file(str(tmp_path / "editor.safetensors"))  # the best editor folder holds step best_step's nets
    replay, _ = _train(tmp_path / "replay", max_steps=state.best_step, eval_every=state.best_step, meta_lr=0.05,
                       early_stopping_patience=10, calibrate=False)
    for name, value in replay.state_dict().items():
        torch.testing.assert_close(kept[name], value.cpu(), rtol=0, atol=0, msg=name)


def test_ctrl_c_mid_run_checkpoints_the_last_completed_step_and_resume_matches(tmp_path, monkeypatch):
    full, full_state = _train(tmp_path / "full", max_steps=5, eval_every=2)
    original = BiasEditTrainer.edit_step
    calls = {"train": 0}

    def interrupted(self, batch, train, held_out=()):
        if train:
            calls["train"] += 1
            if calls["train"] == 4:  # Ctrl-C while the 4th meta-step computes
                raise KeyboardInterrupt
        return original(self, batch, train, held_out)

    monkeypatch.setattr(BiasEditTrainer, "edit_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "cut", max_steps=5, eval_every=2)
    monkeypatch.setattr(BiasEditTrainer, "edit_step", original)
    saved = json.loads((tmp_path / "cut" / "checkpoint" / "trainer_state.json").read_text())
    assert saved["trainer"]["global_step"] == 3
    resumed, resumed_state = _train(tmp_path / "cut", max_steps=5, eval_every=2, resume=True)
    assert resumed_state.global_step == 5
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)


def test_deferred_interrupts_finish_the_block_then_raise():
    import os
    import signal

    from biasedit_peft.editor.trainer import deferred_interrupts

    # Python's own handler, also where the test runner was started in the background (which ignores SIGINT)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    done = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with deferred_interrupts():
                os.kill(os.getpid(), signal.SIGINT)
                done.append("after the signal")
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    finally:
        signal.signal(signal.SIGINT, previous)
    assert done == ["after the signal"]


def test_caching_is_invariant_to_sample_order_and_lm_batch_size():
    """Samples are length-sorted into LM batches; scores come back in input order, the delta is the same."""
    from biasedit_peft.editor.editor import length_order

    model = peft_model()
    data = samples(8)
    editor = _editor(model, data=data)
    order = length_order(TOKENIZER, data)
    lengths = [max(len(TOKENIZER(s.stereotype)["input_ids"]), len(TOKENIZER(s.anti_stereotype)["input_ids"]))
               for s in (data[i] for i in order.tolist())]
    assert lengths == sorted(lengths, reverse=True)
    reference, stereo, anti = editor.cache_samples(model, TOKENIZER, data, batch_size=8)
    shuffled = [data[i] for i in (3, 0, 7, 1, 6, 2, 5, 4)]
    cache, stereo_shuffled, anti_shuffled = editor.cache_samples(model, TOKENIZER, shuffled, batch_size=3)
    torch.testing.assert_close(stereo_shuffled, stereo[[3, 0, 7, 1, 6, 2, 5, 4]])
    torch.testing.assert_close(anti_shuffled, anti[[3, 0, 7, 1, 6, 2, 5, 4]])
    for name in editor.config.targets:
        torch.testing.assert_close(editor.predict(cache)[name].delta.dense(),
                                   editor.predict(reference)[name].delta.dense(), rtol=1e-4, atol=1e-7)


def test_accelerate_device_map_model_trains_and_debiases(tmp_path):
    """A model loaded with an accelerate ``device_map`` (here all on CPU) goes through the whole pipeline."""
    from peft import get_peft_model

    from biasedit_peft import BiasEditConfig
    from biasedit_peft.models import load_model_and_tokenizer

    base, testbed_tokenizer = load_model_and_tokenizer("testbed", device_map={"": "cpu"})
    assert getattr(base, "hf_device_map", {"": "cpu"}) == {"": "cpu"}  # transformers 5 sets it only when split
    model = get_peft_model(base, BiasEditConfig(num_edit_layers=1))
    editor = BiasEditor.for_model(model, rank=8, lr=1e-2)
    data = [("The nurse was caring.", "The nurse was rude.", "The nurse was purple."),
            ("The boy was strong.", "The boy was weak.", "The boy was cloud.")] * 2
    args = BiasEditTrainingArguments(output_dir=str(tmp_path), n_edits=2, batch_size=1, meta_lr=1e-2, max_steps=2,
                                     progress=False)
    state = BiasEditTrainer(model, editor, args, data, None, tokenizer=testbed_tokenizer).train()
    assert state.global_step == 2
    editor.debias(model, data, tokenizer=testbed_tokenizer, progress=False)
    (name,) = edit_targets(model)
    assert get_deltas(model)[name].abs().sum() > 0


def test_value_gradients_do_not_shrink_with_the_number_of_samples_edited_together():
    """Each token's cached gradient is that of its own pair's loss: editing a sample alone or among copies of
    itself gives the same rows (a mean over samples would halve them for two copies)."""
    model = peft_model()
    editor = BiasEditor.for_model(model, rank=8)
    one = samples(1)
    single, _, _ = editor.cache_samples(model, TOKENIZER, one)
    double, _, _ = editor.cache_samples(model, TOKENIZER, one * 2)
    name = "transformer.h.2.mlp.c_proj"
    _, grads_single = single.layer(name)
    _, grads_double = double.layer(name)
    assert double.n_tokens == 2 * single.n_tokens
    torch.testing.assert_close(grads_double.abs().max(), grads_single.abs().max())
    torch.testing.assert_close(grads_double.pow(2).sum(), 2 * grads_single.pow(2).sum())


def _step_and_debias(tmp_path, lm_device: str, editor_device: str, editor_state: dict):
    """From ``editor_state``: one meta-step, then a debias by the untrained editor, with the LM on
    ``lm_device`` and the editor on ``editor_device``. Returns (the step's logged metrics, deltas on CPU).

    The debias uses the starting editor, not the trained one: Adam's first update is about
    ``meta_lr * sign(grad)``, so float rounding that flips the sign of a near-zero gradient would make
    the trained editors differ by ``meta_lr`` for reasons that have nothing to do with devices."""
    model = peft_model().to(lm_device)
    editor = BiasEditor.for_model(model, rank=8, lr=1e-2)
    editor.load_state_dict(editor_state)
    args = _args(tmp_path / f"{lm_device}-{editor_device}", max_steps=1, eval_every=1, editor_device=editor_device)
    state = BiasEditTrainer(model, editor, args, samples(8), samples(4), tokenizer=TOKENIZER).train()
    assert state.global_step == 1 and editor.device.type == torch.device(editor_device).type
    assert len(state.history) == 1  # the step's training metrics (and a validation after the update)
    editor.load_state_dict(editor_state)
    editor.debias(model, samples(4), tokenizer=TOKENIZER, progress=False)
    assert all(layer.get_base_layer().weight.device.type == torch.device(lm_device).type
               for layer in edit_targets(model).values())  # the deltas stay with their layers
    return state.history, {name: delta.to("cpu") for name, delta in get_deltas(model).items()}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device next to the CPU")
@pytest.mark.parametrize(("lm_device", "editor_device"), [("cuda", "cpu"), ("cpu", "cuda")])
def test_lm_and_editor_on_two_devices_match_one_device(tmp_path, lm_device, editor_device):
    """The paper runs the LM and the editor on two GPUs; here one of them is the CPU. A meta-step logs
    the losses and scores of the all-CPU run, and debias writes its deltas (float32 kernels differ
    between devices: a tolerance)."""
    editor_state = _editor(peft_model(), "token").state_dict()  # normalisers fitted, as after training
    reference_history, reference_deltas = _step_and_debias(tmp_path, "cpu", "cpu", editor_state)
    history, deltas = _step_and_debias(tmp_path, lm_device, editor_device, editor_state)
    (ours,), (theirs,) = history, reference_history
    trained = [key for key in theirs if key.startswith("train_")]  # before the update (eval_* come after it)
    assert len(trained) == 7
    for key in trained + ["step", "epoch"]:
        assert ours[key] == pytest.approx(theirs[key], rel=1e-3, abs=1e-6), key
    assert reference_deltas and all(delta.abs().sum() > 0 for delta in reference_deltas.values())
    for name, delta in reference_deltas.items():
        torch.testing.assert_close(deltas[name], delta, rtol=1e-3, atol=1e-6)


def test_selection_score_on_hand_built_validations(tmp_path):
    args = _args(tmp_path)  # select_by="target", max_lms_drop 3, max_nll_increase 0.0488
    inside = dict(loss=0.3, ss_post=53.5, lms_pre=90.0, lms_post=88.0, nll_increase=0.01)
    assert selection_score(inside, args) == pytest.approx(3.5)  # |53.5 - 50|
    below = dict(inside, ss_post=47.0)
    assert selection_score(below, args) == pytest.approx(3.0)
    lms_out = dict(inside, ss_post=50.0, lms_post=85.0)  # drop 5: 2 points over the bound
    assert selection_score(lms_out, args) == pytest.approx(102.0)
    nll_out = dict(inside, ss_post=50.0, nll_increase=0.0588)  # 0.01 over: 100 + 100 * 0.01
    assert selection_score(nll_out, args) == pytest.approx(101.0)
    assert selection_score(lms_out, args) > selection_score(nll_out, args) > selection_score(inside, args)
    assert selection_score(inside, _args(tmp_path, select_by="loss")) == 0.3
    with pytest.raises(ValueError, match="select_by"):
        _args(tmp_path, select_by="ss")


@pytest.mark.parametrize("ss_coef, bias_types",
                         [(0.0, ()), (1.5, ()), (1.5, ("race", "gender", "gender", "race"))])
def test_meta_gradient_with_the_level_loss_matches_autograd_of_the_whole_meta_loss(tmp_path, monkeypatch, ss_coef,
                                                                                   bias_types):
    """The whole meta-loss, its level term and (``ss_coef``) the group's soft-SS term over two LM batches, whose
    pair losses then wait for the group's mean signs (one type, or two, one across the batches), against one autograd
    pass over all pairs at once. The trainer's length order is replaced by the reverse (these pairs are all one
    length), so that the types must follow the pairs into it."""
    from biasedit_peft.editor.losses import (
        gap_scale,
        level_loss,
        pair_scores,
        retention_loss,
        soft_ss_of,
        type_indices,
    )
    from biasedit_peft.scoring import encode_sentences
    from biasedit_peft.tuner.deltas import override_deltas

    model = peft_model()
    editor = BiasEditor.for_model(model, rank=8, lr=1e-1)
    args = _args(tmp_path, level_coef=2.0, loc_coef=0.5, ss_coef=ss_coef)
    trainer = BiasEditTrainer(model, editor, args, samples(8, bias_types), None, tokenizer=TOKENIZER)
    captured = {}
    monkeypatch.setattr(editor, "meta_backward",
                        lambda cache, solutions, grads, **_: captured.update(s=solutions, g=grads))
    reverse = lambda tokenizer, group: torch.arange(len(group) - 1, -1, -1)  # noqa: E731
    monkeypatch.setattr("biasedit_peft.editor.trainer.length_order", reverse)
    group = trainer._batches(trainer.train_data, 0)[0]
    metrics = trainer.edit_step(group, train=True)
    assert metrics["level"] > 0
    ordered = [group[i] for i in reverse(TOKENIZER, group).tolist()]
    pairs, unrelated = encode_pairs(TOKENIZER, ordered), encode_sentences(TOKENIZER, [s.unrelated for s in ordered])
    with torch.no_grad():
        pre_s, pre_a = pair_scores(forward_logits(model, pairs), pairs)
        pre_u = forward_logits(model, unrelated)
    leaves = {name: s.delta.dense().clone().requires_grad_(True) for name, s in captured["s"].items()}
    natives = {name: leaf.T if not trainer.layers[name].fan_in_fan_out else leaf for name, leaf in leaves.items()}
    with override_deltas(model, natives):
        logits, post_u = forward_logits(model, pairs), forward_logits(model, unrelated)
    n = len(ordered)
    total = (debias_loss("token", logits, pairs).sum() / n
             + 2.0 * level_loss(*pair_scores(logits, pairs), pre_s.mean, pre_a.mean).sum() / n
             + 0.5 * retention_loss("token", pre_u, post_u, unrelated).sum() / n)
    post_s, post_a = pair_scores(logits, pairs)
    types, n_types = type_indices([s.bias_type for s in ordered])
    if bias_types:  # 3 gender pairs over both LM batches, 1 race; in the group's own order: [1, 0, 0, 0]
        assert types.tolist() == [0, 0, 0, 1]
    soft_ss = soft_ss_of(post_s.mean - post_a.mean, gap_scale(pre_s.mean - pre_a.mean), types)
    total = total + ss_coef * soft_ss
    assert len(group) == 4 and args.batch_size == 2  # two LM batches
    assert metrics["soft_ss"] == (pytest.approx(soft_ss.item(), rel=1e-5) if ss_coef else 0.0) and soft_ss > 1e-4
    assert metrics["loss"] == pytest.approx(total.item(), rel=1e-5)
    grads = torch.autograd.grad(total, list(leaves.values()))
    for name, grad in zip(leaves, grads):
        torch.testing.assert_close(captured["g"][name], grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("level_coef", [0.0, 2.0])
def test_a_meta_step_takes_each_vocabulary_pass_once(tmp_path, monkeypatch, level_coef):
    """One LM batch: the pairs' log-softmax once while caching and once after the edit (the debias loss, the level
    loss and the SS metrics share it), the unrelated sentences' KL once (the LMS and NLL metrics come with it)."""
    from biasedit_peft import scoring
    from biasedit_peft.editor import losses

    calls = {"pairs": 0, "retention": 0}
    pairs_forward, retention_forward = scoring._TargetLogProbs.forward, losses._RowKL.forward

    def counted(key, forward):
        return staticmethod(lambda ctx, *args: calls.__setitem__(key, calls[key] + 1) or forward(ctx, *args))

    monkeypatch.setattr(scoring._TargetLogProbs, "forward", counted("pairs", pairs_forward))
    monkeypatch.setattr(losses._RowKL, "forward", counted("retention", retention_forward))
    model = peft_model()
    args = _args(tmp_path, level_coef=level_coef, batch_size=4)
    trainer = BiasEditTrainer(model, BiasEditor.for_model(model, rank=8, lr=1e-1), args, samples(4), None,
                              tokenizer=TOKENIZER)
    metrics = trainer.edit_step(samples(4), train=True)
    assert calls == {"pairs": 2, "retention": 1}
    assert (metrics["level"] > 0) == bool(level_coef) and 0 <= metrics["lms_post"] <= 100


def test_step_sizes_take_their_own_adam_rate_and_an_old_checkpoint_resumes_with_the_default(tmp_path):
    """``step_size_meta_lr``: Adam's first step moves every ``lr[m]`` with a gradient by that rate exactly (its
    first update is ``rate x sign(gradient)``, up to ``eps``), every other parameter by ``meta_lr``; ``None`` keeps
    one group. A checkpoint without the field resumes with ``None`` and is refused with a rate."""
    from biasedit_peft.editor.trainer import meta_parameter_groups, resume_mismatches

    model = peft_model()
    data = samples(8)
    editor = _editor(model, data=data)
    args = _args(tmp_path, batch_size=4, meta_lr=1e-2, step_size_meta_lr=1e-5)
    groups = meta_parameter_groups(editor, args)
    assert [len(g["params"]) for g in groups] == [len(list(editor.parameters())) - len(editor.nets), len(editor.nets)]
    trainer = BiasEditTrainer(model, editor, args, data, tokenizer=TOKENIZER)
    before = {name: p.detach().clone() for name, p in editor.named_parameters()}
    trainer.edit_step(data, train=True)
    moved = {name: (p.detach() - before[name]).abs() for name, p in editor.named_parameters()}
    step_sizes = [name for name in moved if name.endswith(".lr")]
    assert step_sizes and all((moved[n] > 0).all() and torch.allclose(moved[n], torch.tensor(1e-5), rtol=1e-3)
                              for n in step_sizes)
    assert all(moved[n].max() == pytest.approx(1e-2, rel=1e-3) for n in moved if n.endswith("log_lambda"))
    trainer.save_checkpoint()  # both groups and every parameter's Adam state come back in order
    again = BiasEditTrainer(model, _editor(peft_model(), data=data), _args(tmp_path, batch_size=4, meta_lr=1e-2,
                                                                          step_size_meta_lr=1e-5, resume=True),
                            data, tokenizer=TOKENIZER)
    again.load_checkpoint()
    assert [g["lr"] for g in again.optimizer.param_groups] == [1e-2, 1e-5]
    for group, restored in zip(trainer.optimizer.param_groups, again.optimizer.param_groups):
        for param, other in zip(group["params"], restored["params"]):
            assert param.shape == other.shape and torch.equal(param, other)
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(trainer.optimizer.state[param][key], again.optimizer.state[other][key])
    assert len(meta_parameter_groups(editor, _args(tmp_path))) == 1
    saved = {"args": {k: v for k, v in vars(_args(tmp_path)).items() if k != "step_size_meta_lr"}}
    config = editor.config
    assert resume_mismatches(saved, _args(tmp_path), config, config, {}) == {}
    # a checkpoint from before the inputs were kept: they are not compared
    assert resume_mismatches(saved, _args(tmp_path), config, config, {}, {"model dtype": "bfloat16"}) == {}
    assert resume_mismatches({**saved, "inputs": {"model dtype": "float32"}}, _args(tmp_path), config, config, {},
                             {"model dtype": "bfloat16"}) == {"model dtype": ("float32", "bfloat16")}
    assert resume_mismatches(saved, args, config, config, {}) == {"step_size_meta_lr": (None, 1e-5),
                                                                  "batch_size": (2, 4)}
    # other fields a checkpoint lacks are not compared: their default need not be what older code did
    older = {"args": {k: v for k, v in saved["args"].items() if k != "select_by"}}
    assert resume_mismatches(older, _args(tmp_path, select_by="loss"), config, config, {}) == {}
    # a checkpoint from before ss_coef was trained without the term: resumed only with it off
    no_ss = {"args": {k: v for k, v in vars(_args(tmp_path)).items() if k != "ss_coef"}}
    assert resume_mismatches(no_ss, _args(tmp_path), config, config, {}) == {}
    assert resume_mismatches(no_ss, _args(tmp_path, ss_coef=1.0), config, config, {}) == {"ss_coef": (0.0, 1.0)}
    # one that trained the pooled soft-SS term (no form recorded) is not resumed under the per-type one
    pooled = {"args": vars(_args(tmp_path, ss_coef=1.0))}
    assert resume_mismatches(pooled, _args(tmp_path, ss_coef=1.0), config, config, {}) == {
        "soft-SS form": ("pooled", "per_type")}
    assert resume_mismatches({**pooled, "soft_ss_form": "per_type"}, _args(tmp_path, ss_coef=1.0), config, config,
                             {}) == {}


# ----- parameter averaging and selection ties -----------------------------------------------------------
def test_average_weight_is_the_running_mean_then_an_exponential_average():
    from biasedit_peft.editor.trainer import average_weight

    assert [average_weight(step, 3) for step in (1, 2, 3, 4, 10)] == [1.0, 0.5, 1 / 3, 1 / 3, 1 / 3]
    assert average_weight(7, 1) == 1.0  # an average over one step is the last iterate


def test_averaged_training_validates_and_keeps_the_mean_of_the_iterates_and_trains_the_last_one(tmp_path,
                                                                                                monkeypatch):
    """With ``average_steps`` 4 and 3 steps, the kept editor's parameters are the plain mean of the 3 iterates
    (recorded after each step); validation sees them; the training editor ends as the last iterate, the same as
    without averaging (averaging changes what is validated, not what is trained)."""
    from safetensors.torch import load_file

    iterates, validated = [], []
    update = BiasEditTrainer._update_average

    def recording(self):
        iterates.append({n: p.detach().clone() for n, p in self.editor.named_parameters()})
        update(self)

    evaluate = BiasEditTrainer.evaluate

    def seen(self):
        validated.append({n: p.detach().clone() for n, p in self.editor.named_parameters()})
        return evaluate(self)

    monkeypatch.setattr(BiasEditTrainer, "_update_average", recording)
    monkeypatch.setattr(BiasEditTrainer, "evaluate", seen)
    averaged, state = _train(tmp_path / "avg", max_steps=3, eval_every=3, average_steps=4, calibrate=False)
    assert state.global_step == 3 and len(iterates) == 3 and len(validated) == 1
    kept = load_file(str(tmp_path / "avg" / "editor.safetensors"))
    for name, _ in averaged.named_parameters():
        mean = sum(step[name] for step in iterates) / 3
        torch.testing.assert_close(validated[0][name], mean, rtol=1e-6, atol=1e-7, msg=name)
        torch.testing.assert_close(kept[name], mean.cpu(), rtol=1e-6, atol=1e-7, msg=name)
        assert torch.equal(dict(averaged.named_parameters())[name].detach(), iterates[-1][name]), name
    plain, _ = _train(tmp_path / "plain", max_steps=3, eval_every=3, calibrate=False)
    for (name, a), (_, b) in zip(plain.named_parameters(), averaged.named_parameters()):
        assert torch.equal(a, b), name
    assert any(not torch.equal(kept[name], p.detach()) for name, p in averaged.named_parameters())


def test_averaged_training_resumes_to_the_uninterrupted_average(tmp_path):
    from safetensors.torch import load_file

    _train(tmp_path / "full", max_steps=5, eval_every=5, average_steps=2, calibrate=False)
    _train(tmp_path / "cut", max_steps=3, eval_every=5, average_steps=2, calibrate=False)
    assert (tmp_path / "cut" / "checkpoint" / "average.safetensors").is_file()
    _train(tmp_path / "cut", max_steps=5, eval_every=5, average_steps=2, calibrate=False, resume=True)
    full, resumed = (load_file(str(tmp_path / run / "editor.safetensors")) for run in ("full", "cut"))
    for name in full:
        torch.testing.assert_close(resumed[name], full[name], rtol=1e-6, atol=1e-7, msg=name)


def test_a_selection_tie_within_rounding_keeps_the_earlier_editor(tmp_path, monkeypatch):
    """Two validations whose dev SS is the same count pooled in another order (3.1914893828 vs 3.1914893687, as a
    testbed run printed) are a tie: the first is kept and the second counts against patience. A real improvement
    (one item of 423: 0.236 points) is kept."""
    from biasedit_peft.editor.trainer import SELECTION_TIE

    def run(folder, ss_posts):
        scores = iter(ss_posts)
        inside = dict(loss=0.1, lms_pre=90.0, lms_post=90.0, nll_increase=0.0)
        monkeypatch.setattr(BiasEditTrainer, "evaluate", lambda self: {**inside, "ss_post": next(scores)})
        return _train(tmp_path / folder, max_steps=len(ss_posts), eval_every=1, early_stopping_patience=5,
                      calibrate=False)[1]

    state = run("tie", [53.191489382838526, 53.1914893687476, 54.0])
    first, second = (record["selection"] for record in state.history[:2])
    assert second < first and first - second < SELECTION_TIE  # the float order alone would keep step 2
    assert state.best_step == 1 and state.bad_evals == 2
    better = run("better", [53.191489382838526, 52.95508274231678])
    assert better.best_step == 2 and better.bad_evals == 0


def test_item_ss_and_lms_are_exact_percentages_of_counts():
    from biasedit_peft.metrics import item_ss_lms

    stereo = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    anti = torch.tensor([1.0, 0.0, 1.0, 1.0, 9.0, 9.0, 9.0])  # 3 of 7 stereotypes score above
    unrelated = torch.full((7,), 2.5)  # 4 stereotypes and 3 anti-stereotypes above it: 7 of 14
    result = item_ss_lms(stereo, anti, unrelated)
    assert result == {"ss": 100.0 * 3 / 7, "lms": 50.0}
