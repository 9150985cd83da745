"""Bias tracing: restoration invariants, batched == unbatched, seeding, aggregation, JSON, plots, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from biasedit_peft.scoring import encode_sentences, sentence_scores, token_log_probs
from biasedit_peft.tracing import (
    KINDS,
    POSITIONS,
    PromptTrace,
    PromptTracer,
    TracePrompt,
    TraceSettings,
    find_layout,
    format_trace,
    plot_trace,
    prepare_prompt,
    prepare_prompts,
    trace_items,
    window_matrix,
)
from biasedit_peft.tracing.trace import draw_noise, summarise

from factories import save_word_model, stereoset_item, tiny_model, words_tokenizer

ITEMS = [
    stereoset_item("a", "man", "the man is a good engineer .", "the man is a good nurse ."),
    stereoset_item("b", "his boss", "his boss is a strong man .", "his boss is a weak man , and a cook ."),
    stereoset_item("c", "doctor", "the doctor cook .", "the doctor pilot ."),  # last target token = last token
    stereoset_item("d", "woman", "the kind woman .", "the bad woman ."),  # target after BLANK: skipped
    stereoset_item("e", "lawyer", "the man is a cook .", "the man is a chef ."),  # target absent: skipped
]
TRACEABLE = ITEMS[:3]


@pytest.fixture(scope="module")
def tokenizer():
    return words_tokenizer()


def _gpt2():  # a large init, so that effects are far from zero and restoring visibly matters
    return tiny_model("gpt2", size="words", initializer_range=0.3)


def _llama():
    return tiny_model("llama", size="words", num_hidden_layers=3, num_key_value_heads=1, initializer_range=0.3)


def _opt():  # no MLP module: fc2's output, flattened to [B * T, D], is the MLP state
    return tiny_model("opt", size="words", init_std=0.3)


MODELS = {"gpt2": _gpt2, "llama": _llama, "opt": _opt}


def _tracer(model, tokenizer, item, samples=3, scale=1.0, seed=0):
    prompt = prepare_prompt(tokenizer, item)
    noise = draw_noise(prompt, samples, scale, model.get_input_embeddings().weight.shape[1], seed)
    return PromptTracer(model, find_layout(model), prompt, noise), noise


# ----- prompts and layout ---------------------------------------------------------------------------------
def test_prompt_positions_and_groups(tokenizer):
    prompt = prepare_prompt(tokenizer, ITEMS[1])  # BOS his boss is a | strong/weak ...
    assert (prompt.subject_start, prompt.subject_end, prompt.prefix_len) == (1, 3, 5)
    assert prompt.tokens == ("his", "boss", "is", "a")
    assert prompt.positions.tolist() == [1, 2, 3, 4]
    assert prompt.position_groups().tolist() == [[True, False, False, False], [False, True, False, False],
                                                 [False, False, True, False], [False, False, False, True]]
    last = prepare_prompt(tokenizer, ITEMS[2])  # BOS the doctor | cook/pilot: the target's token is also the last
    assert last.positions.tolist() == [2]
    assert last.position_groups().tolist() == [[False, True, False, True]]
    _, skipped = prepare_prompts(tokenizer, ITEMS)
    assert skipped == {"target_after_blank": 1, "target_not_found": 1}


def test_layout_is_found_from_the_module_tree():
    assert find_layout(_gpt2()).blocks == "transformer.h"
    assert (find_layout(_gpt2()).mlp, find_layout(_gpt2()).attn) == ("mlp", "attn")
    llama = find_layout(_llama())
    assert (llama.blocks, llama.mlp, llama.attn) == ("model.layers", "mlp", "self_attn")
    opt = tiny_model("opt")  # OPT blocks have fc1 / fc2, no "mlp" child: fc2's output is the MLP's
    assert find_layout(opt).modules(opt, "mlp")[0] is opt.model.decoder.layers[0].fc2
    with pytest.raises(ValueError, match="mlp module.*--mlp-module"):
        find_layout(opt, mlp="feed_forward")
    with pytest.raises(ValueError, match="pass blocks="):
        find_layout(opt, blocks="model.nothing")


def test_window_matrix_matches_rome():
    assert torch.equal(window_matrix(4, 1), torch.eye(4, dtype=torch.bool))
    expected = [[0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4]]  # ROME: [l - w // 2, l + ceil(w / 2))
    assert [row.nonzero().flatten().tolist() for row in window_matrix(5, 3)] == expected
    assert [row.nonzero().flatten().tolist() for row in window_matrix(3, 2)] == [[0], [0, 1], [1, 2]]


# ----- restoration invariants ------------------------------------------------------------------------------
@pytest.mark.parametrize("architecture", sorted(MODELS))
def test_clean_effect_equals_full_sentence_scores(architecture, tokenizer):
    model = MODELS[architecture]()
    for item in TRACEABLE:
        tracer, _ = _tracer(model, tokenizer, item)
        batch = encode_sentences(tokenizer, [item.stereotype, item.anti_stereotype])
        with torch.no_grad():
            sums = sentence_scores(token_log_probs(model(input_ids=batch.input_ids).logits, batch), batch).sum
        clean = tracer.clean_log_probs()
        # signed: the continuation's shared prefix cancels in the difference, and swapped roles (stereo, anti) fail
        assert float((clean[1] - clean[0]) - (sums[1] - sums[0])) == pytest.approx(0.0, abs=1e-5)
        assert float((sums[1] - sums[0]).abs()) > 0.05  # not a vacuous comparison


@pytest.mark.parametrize("architecture", sorted(MODELS))
def test_restoring_nothing_gives_the_corrupted_effect(architecture, tokenizer):
    model = MODELS[architecture]()
    for item in TRACEABLE:
        tracer, noise = _tracer(model, tokenizer, item)
        prompt = tracer.prompt
        batch = encode_sentences(tokenizer, [item.stereotype, item.anti_stereotype])
        expected = []
        with torch.no_grad():  # independent reference: noisy inputs_embeds, full-sentence scores
            for draw in noise:
                embeds = model.get_input_embeddings()(batch.input_ids)
                embeds[:, prompt.subject_start:prompt.subject_end] += draw
                logits = model(inputs_embeds=embeds, attention_mask=batch.attention_mask).logits
                sums = sentence_scores(token_log_probs(logits, batch), batch).sum
                expected.append(float((sums[1] - sums[0]).abs()))
        nothing = torch.zeros(1, 3, batch.input_ids.shape[1], dtype=torch.bool)
        for kind in KINDS:
            assert torch.allclose(tracer.run(kind, nothing)[0], torch.tensor(expected), atol=1e-5)
        clean = float(tracer.clean_log_probs().diff().abs())
        assert max(abs(e - clean) for e in expected) > 1e-3  # the noise does change the effect


@pytest.mark.parametrize("architecture", sorted(MODELS))
def test_restoring_every_hidden_state_gives_the_clean_effect(architecture, tokenizer):
    model = MODELS[architecture]()
    for item in TRACEABLE:
        tracer, _ = _tracer(model, tokenizer, item)
        clean = float(tracer.clean_log_probs().diff().abs())
        width = tracer.input_ids.shape[1]
        everything = torch.ones(1, 3, width, dtype=torch.bool)
        assert torch.allclose(tracer.run("hidden", everything), torch.full((1, 3), clean), atol=1e-5)
        one_layer_each = torch.eye(3, dtype=torch.bool)[:, :, None].expand(3, 3, width)  # row l: all of layer l
        assert torch.allclose(tracer.run("hidden", one_layer_each), torch.full((3, 3), clean), atol=1e-5)


@pytest.mark.parametrize("architecture", sorted(MODELS))
def test_states_before_the_target_are_clean_and_later_ones_matter(architecture, tokenizer):
    model = MODELS[architecture]()
    tracer, _ = _tracer(model, tokenizer, ITEMS[0])  # BOS the | man is a good
    corrupted = tracer.corrupted()
    width = tracer.input_ids.shape[1]
    before = torch.zeros(1, 3, width, dtype=torch.bool)
    before[..., :2] = True  # BOS and "the", at every layer
    for kind in KINDS:
        assert torch.allclose(tracer.run(kind, before)[0], corrupted, atol=1e-6)
    grid = tracer.grid("hidden", window=1)  # [L, P, S]
    assert grid.shape == (3, 4, 3)
    assert (grid[0, 0] - corrupted).abs().max() > 1e-3  # restoring the target's block-0 output changes the effect


@pytest.mark.parametrize("architecture", sorted(MODELS))
@pytest.mark.parametrize("window", [1, 2])
def test_batched_and_unbatched_runs_agree(architecture, window, tokenizer):
    model = MODELS[architecture]()
    tracer, _ = _tracer(model, tokenizer, ITEMS[1])
    for kind in KINDS:
        batched = tracer.grid(kind, window)  # one forward per position
        unbatched = tracer.grid(kind, window, layers_per_forward=1)  # one forward per position and layer
        assert batched.shape == (3, 4, 3)
        assert torch.allclose(batched, unbatched, atol=1e-5)
        assert batched.std() > 1e-4  # the grid is not constant


# ----- whole traces ----------------------------------------------------------------------------------------
def test_zero_noise_restores_nothing_because_nothing_is_lost(tokenizer):
    result = trace_items(_gpt2(), tokenizer, ITEMS, TraceSettings(noise_scale=0.0, samples=2))
    for trace in result.traces:
        assert torch.allclose(trace.corrupted, torch.full((2,), trace.clean), atol=1e-5)
        for grid in trace.restored.values():
            assert torch.allclose(grid, torch.full_like(grid, trace.clean), atol=1e-5)


def test_traces_are_seeded_and_noise_is_per_item(tokenizer):
    settings = TraceSettings(samples=2, seed=3)
    model = _gpt2()
    first = trace_items(model, tokenizer, ITEMS, settings, noise_std=0.5).to_json()
    assert trace_items(model, tokenizer, ITEMS, settings, noise_std=0.5).to_json() == first
    alone = trace_items(model, tokenizer, [ITEMS[1]], settings, noise_std=0.5).to_json()
    assert alone["items"][0] == first["items"][1]  # an item's noise does not depend on the other items
    other = trace_items(model, tokenizer, ITEMS, TraceSettings(samples=2, seed=4), noise_std=0.5).to_json()
    assert other["corrupted_effect"] != first["corrupted_effect"]


def _fake_trace(start, end, prefix, restored, clean, corrupted) -> PromptTrace:
    prompt = TracePrompt("x", "x", torch.zeros(2, prefix + 1, dtype=torch.long), torch.ones(2, prefix + 1), start,
                         end, prefix, ())
    return PromptTrace(prompt, clean, torch.tensor(corrupted), {"mlp": torch.tensor(restored)})


def test_summary_weights_each_item_once_per_cell():
    a = _fake_trace(1, 3, 5, [[[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]]], 0.0, [5.0, 5.0])  # 4 positions
    b = _fake_trace(1, 2, 2, [[[10.0, 20.0]]], 10.0, [20.0, 20.0])  # one position: last target token = last token
    overall, kinds = summarise([a, b], ["mlp"])
    assert overall["clean"] == 5.0 and overall["corrupted"] == 12.5
    assert overall["position_items"].tolist() == [1, 2, 1, 2]
    assert kinds["mlp"].restored.tolist() == [[1.0, 8.5, 3.0, 9.5]]
    assert torch.allclose(kinds["mlp"].fraction, torch.tensor([[0.8, 4 / 7.5, 0.4, 0.4]], dtype=torch.float64))
    assert kinds["mlp"].per_layer.tolist() == [8.75]
    assert kinds["mlp"].per_layer_fraction.tolist() == [0.5]


def test_json_schema(tokenizer):
    result = trace_items(_gpt2(), tokenizer, ITEMS, TraceSettings(samples=2), meta={"model": "tiny"})
    document = json.loads(json.dumps(result.to_json(), allow_nan=False))
    assert document["format"] == "biasedit-trace/1" and document["model"] == "tiny"
    assert document["n_layers"] == 3 and document["n_items"] == 3 and len(document["items"]) == 3
    assert document["skipped"] == {"target_after_blank": 1, "target_not_found": 1}
    assert document["positions"] == list(POSITIONS)
    assert document["position_items"] == [1, 3, 2, 3]
    assert document["settings"] == {"noise_scale": 3.0, "samples": 2, "window": 1, "seed": 0, "kinds": list(KINDS)}
    assert set(document["kinds"]) == set(KINDS)
    for kind, summary in document["kinds"].items():
        assert set(summary) == {"restored", "fraction", "per_layer", "per_layer_fraction"}
        assert [len(row) for row in summary["restored"]] == [4, 4, 4]
        assert len(summary["per_layer"]) == 3
        assert sorted(document["ranked_layers"][kind]) == [0, 1, 2]
    item = document["items"][1]
    assert item["tokens"] == ["his", "boss", "is", "a"] and item["subject_tokens"] == 2
    assert [len(row) for row in item["restored"]["attn"]] == [4, 4, 4]
    assert math.isclose(document["clean_effect"], sum(i["clean"] for i in document["items"]) / 3, abs_tol=1e-5)


def test_text_summary_of_a_document_with_a_weak_corruption():
    document = {"n_items": 2, "skipped": {}, "noise_std": 0.5, "settings": {"noise_scale": 3.0, "samples": 2},
                "clean_effect": 1.0, "corrupted_effect": 0.98, "positions": ["first", "last"],
                "position_items": [2, 1],
                "kinds": {"mlp": {"restored": [[0.5, None]], "fraction": [[0.25, None]], "per_layer": [0.5],
                                  "per_layer_fraction": [0.25]}},
                "ranked_layers": {"mlp": [0]}}
    lines = format_trace(document).split("\n")
    assert lines[:3] == ["traced 2 items (skipped: none), noise std 0.5 x 3.0, 2 draws",
                         "bias effect |log p(anti) - log p(stereo)|: clean 1.0000, corrupted 0.9800",
                         "items per position group: first 2, last 1"]
    # |1.0 - 0.98| = 0.02 is under WEAK_GAP (0.05) x clean 1.0: the fractions are flagged as unreliable
    assert lines[3].startswith("note: corrupting the target terms changes the bias effect by only 0.0200 (2.0%)")
    assert lines[5] == "mlp: restored effect (fraction restored)"
    assert lines[6] == "layer " + "first".rjust(22) + "last".rjust(22) + "all positions".rjust(22)
    cells = [" 0.500 ( 0.250)", "   -   (   -  )", " 0.500 ( 0.250)"]  # first, last, all positions
    assert lines[7] == "    0 " + "".join(cell.rjust(22) for cell in cells)
    assert lines[-1] == "blocks by MLP restoration: 0"
    document["corrupted_effect"] = 0.5  # a gap of 50%: no note
    assert not any(line.startswith("note:") for line in format_trace(document).split("\n"))


def test_plots_are_written_when_matplotlib_is_present(tokenizer, tmp_path):
    pytest.importorskip("matplotlib")
    document = trace_items(_gpt2(), tokenizer, ITEMS, TraceSettings(samples=2)).to_json()
    paths = plot_trace(document, tmp_path)
    assert sorted(p.name for p in paths) == ["trace_attn.png", "trace_hidden.png", "trace_mlp.png",
                                             "trace_per_layer.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


# ----- the command ---------------------------------------------------------------------------------------
def test_trace_command_on_the_testbed(tmp_path):
    from biasedit_peft.cli import main

    out = tmp_path / "trace"
    code = main(["trace", "--model", "testbed", "--limit", "3", "--samples", "2", "--kinds", "hidden,mlp",
                 "--out", str(out), "--quiet", "--threads", "1"])
    assert code == 0
    document = json.loads((out / "trace.json").read_text())
    assert set(document["kinds"]) == {"hidden", "mlp"} and document["n_layers"] == 4
    assert document["n_items"] + sum(document["skipped"].values()) == 3
    assert document["model"] == "testbed" and document["bias_types"] == ["gender"]
    pytest.importorskip("matplotlib")
    assert sorted(p.name for p in out.glob("*.png")) == ["trace_hidden.png", "trace_mlp.png", "trace_per_layer.png"]


def test_trace_command_without_matplotlib_still_writes_json(tmp_path, monkeypatch, capsys):
    import sys

    import biasedit_peft.data
    from biasedit_peft.cli import main

    folder = save_word_model(tmp_path / "model")
    monkeypatch.setattr(biasedit_peft.data, "load_stereoset", lambda split, bias_types=None: list(ITEMS))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ModuleNotFoundError
    code = main(["trace", "--model", str(folder), "--samples", "2", "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 0
    assert "pip install 'biasedit-peft[plot]'" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "trace.json").read_text())["n_items"] == 3
    assert not list((tmp_path / "out").glob("*.png"))


def test_a_peft_model_is_traced_with_its_adapter(tokenizer):
    from peft import get_peft_model

    from biasedit_peft import BiasEditConfig

    base = trace_items(_gpt2(), tokenizer, TRACEABLE, TraceSettings(samples=2), noise_std=0.5)
    peft_model = get_peft_model(_gpt2(), BiasEditConfig(num_edit_layers=2, init_weights=False)).eval()
    edited = trace_items(peft_model, tokenizer, TRACEABLE, TraceSettings(samples=2), noise_std=0.5)
    assert edited.layout.blocks == "transformer.h" and edited.n_layers == 3
    batch = encode_sentences(tokenizer, [ITEMS[0].stereotype, ITEMS[0].anti_stereotype])
    with torch.no_grad():
        sums = sentence_scores(token_log_probs(peft_model(input_ids=batch.input_ids).logits, batch), batch).sum
    assert abs(edited.traces[0].clean - float((sums[1] - sums[0]).abs())) < 1e-5
    assert abs(edited.traces[0].clean - base.traces[0].clean) > 1e-4  # the adapter's delta is in the traced model


def test_plots_or_hint_only_swallows_a_missing_matplotlib(capsys):
    from biasedit_peft.cli._common import plots_or_hint

    def missing(name):
        def draw():
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return draw

    assert plots_or_hint(missing("matplotlib.figure")) == []
    assert "pip install 'biasedit-peft[plot]'" in capsys.readouterr().out
    with pytest.raises(ModuleNotFoundError):
        plots_or_hint(missing("matplotlibx"))
    assert plots_or_hint(lambda: ["a.png"]) == ["a.png"]
