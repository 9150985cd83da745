"""Merging BiasEdit adapters into plain transformers checkpoints (biasedit_peft.sharing.merge, `biasedit merge`)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import get_peft_model

import biasedit_peft
from biasedit_peft import BiasEditConfig, get_deltas, set_deltas
from biasedit_peft.cli import main as cli_main
from biasedit_peft.models import load_model, load_model_and_tokenizer
from biasedit_peft.scoring import score_sentences
from biasedit_peft.sharing import merge_adapters_with_report, merge_deltas_into, merge_to_folder

from factories import SENTENCES, random_low_rank, save_word_model


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return save_word_model(tmp_path_factory.mktemp("gpt2") / "model")


def make_adapter(base_dir, out_dir, seed: int, scale: float = 0.5, storage: str = "dense"):
    """A BiasEdit adapter with rank-4 deltas big enough to move sentence scores; returns its deltas."""
    model = load_model(str(base_dir))
    peft_model = get_peft_model(model, BiasEditConfig(num_edit_layers=2, delta_storage=storage))
    generator = torch.Generator().manual_seed(seed)
    deltas = {}
    for name, layer in biasedit_peft.edit_targets(peft_model).items():
        first, second = random_low_rank(layer.weight_shape, 4, scale, generator)
        deltas[name] = first @ second
    set_deltas(peft_model, deltas)
    peft_model.save_pretrained(out_dir)
    return get_deltas(peft_model), peft_model


def scores(model, tokenizer) -> torch.Tensor:
    return score_sentences(model, tokenizer, SENTENCES).sum


def test_merged_checkpoint_scores_like_base_plus_adapter(gpt2_dir, tmp_path):
    deltas, peft_model = make_adapter(gpt2_dir, tmp_path / "adapter", seed=1)
    _, tokenizer = load_model_and_tokenizer(str(gpt2_dir))
    expected = scores(peft_model, tokenizer)
    base = load_model(str(gpt2_dir))
    assert (expected - scores(base, tokenizer)).abs().max() > 0.5  # the adapter really changes scores

    report = merge_to_folder(str(gpt2_dir), [tmp_path / "adapter"], tmp_path / "merged")
    merged, merged_tokenizer = load_model_and_tokenizer(str(tmp_path / "merged"))
    assert not any("biasedit" in type(m).__name__.lower() for m in merged.modules())
    torch.testing.assert_close(scores(merged, merged_tokenizer), expected, atol=1e-4, rtol=0)
    base_weights = dict(base.named_parameters())
    for name, delta in deltas.items():
        assert torch.equal(merged.get_submodule(name).weight, base_weights[f"{name}.weight"] + delta)
    assert [c.module for c in report.changes] == sorted(deltas)
    for change in report.changes:
        assert change.max_abs_delta == pytest.approx(float(deltas[change.module].abs().max()))
        assert change.max_abs_change == pytest.approx(change.max_abs_delta, rel=1e-5)
    saved = json.loads((tmp_path / "merged" / "merge_report.json").read_text())
    assert saved["dtype"] == "float32" and len(saved["changes"]) == 2
    assert (tmp_path / "merged" / "tokenizer.json").is_file()


def test_bf16_merge_adds_in_float32_and_casts_once(gpt2_dir, tmp_path):
    deltas, peft_model = make_adapter(gpt2_dir, tmp_path / "adapter", seed=2)
    _, tokenizer = load_model_and_tokenizer(str(gpt2_dir))
    reference = scores(peft_model, tokenizer)
    base = dict(load_model(str(gpt2_dir)).named_parameters())

    merge_to_folder(str(gpt2_dir), [tmp_path / "adapter"], tmp_path / "merged", dtype="bf16")
    merged = load_model(str(tmp_path / "merged"))  # transformers loads the saved dtype
    assert merged.dtype == torch.bfloat16
    for name, delta in deltas.items():
        expected = (base[f"{name}.weight"] + delta).to(torch.bfloat16)  # one rounding of the float32 sum
        assert torch.equal(merged.get_submodule(name).weight, expected)
        twice_rounded = (base[f"{name}.weight"].to(torch.bfloat16) + delta.to(torch.bfloat16))
        assert not torch.equal(twice_rounded, expected)  # the test can tell the two apart
    # bf16 keeps ~3 significant digits: scores agree with the float32 adapter model to rounding
    torch.testing.assert_close(scores(merged, tokenizer).float(), reference, atol=0.3, rtol=0.01)


def test_several_adapters_add_their_deltas(gpt2_dir, tmp_path):
    first, _ = make_adapter(gpt2_dir, tmp_path / "a", seed=3)
    second, _ = make_adapter(gpt2_dir, tmp_path / "b", seed=4)
    model, report = merge_adapters_with_report(str(gpt2_dir), [tmp_path / "a", tmp_path / "b"])
    base = dict(load_model(str(gpt2_dir)).named_parameters())
    for name in first:
        assert torch.equal(model.get_submodule(name).weight, base[f"{name}.weight"] + (first[name] + second[name]))
    # the same as one adapter holding the sum
    combined = get_peft_model(load_model(str(gpt2_dir)), BiasEditConfig(num_edit_layers=2, delta_storage="dense"))
    set_deltas(combined, {name: first[name] + second[name] for name in first})
    _, tokenizer = load_model_and_tokenizer(str(gpt2_dir))
    torch.testing.assert_close(scores(model, tokenizer), scores(combined, tokenizer), atol=1e-4, rtol=0)
    assert report.adapters == [str(tmp_path / "a"), str(tmp_path / "b")]


def test_non_finite_merges_are_refused_and_write_nothing(gpt2_dir):
    model = load_model(str(gpt2_dir))
    name = "transformer.h.2.mlp.c_proj"
    weight = model.get_submodule(name).weight
    before = weight.detach().clone()
    other = "transformer.h.1.mlp.c_proj"
    refused = "NaN or infinite.*transformer.h.2.mlp.c_proj|transformer.h.2.mlp.c_proj.*NaN"
    with pytest.raises(ValueError, match=refused):
        merge_deltas_into(model, {other: torch.ones_like(before), name: torch.full_like(before, float("nan"))})
    # finite in float32 but beyond float16's range (65504): refused for fp16, and the model stays float32
    with pytest.raises(ValueError, match="float16"):
        merge_deltas_into(model, {name: torch.full_like(before, 1e5)}, dtype="fp16")
    assert torch.equal(weight, before) and model.dtype == torch.float32
    unchanged = dict(load_model(str(gpt2_dir)).named_parameters())[f"{other}.weight"]
    assert torch.equal(model.get_submodule(other).weight, unchanged)


def test_wrong_base_fails_with_a_clear_message(gpt2_dir, tmp_path):
    make_adapter(gpt2_dir, tmp_path / "adapter", seed=5)
    wider = save_word_model(tmp_path / "wider", n_embd=32)
    with pytest.raises(ValueError, match=r"adapter.*does not fit the base model GPT2LMHeadModel"):
        merge_adapters_with_report(str(wider), [tmp_path / "adapter"])
    llama = save_word_model(tmp_path / "llama", "llama")
    with pytest.raises(ValueError, match="made for a GPT2LMHeadModel.*LlamaForCausalLM"):
        merge_adapters_with_report(str(llama), [tmp_path / "adapter"])
    from peft import LoraConfig

    lora = get_peft_model(load_model(str(gpt2_dir)), LoraConfig(target_modules=["c_proj"], r=2))
    lora.save_pretrained(tmp_path / "lora")
    with pytest.raises(ValueError, match="LORA adapter, not a BiasEdit adapter"):
        merge_adapters_with_report(str(gpt2_dir), [tmp_path / "lora"])


def test_cli_merge_writes_a_sharded_checkpoint_that_plain_transformers_loads(gpt2_dir, tmp_path, capsys):
    make_adapter(gpt2_dir, tmp_path / "a", seed=6)
    make_adapter(gpt2_dir, tmp_path / "b", seed=7)
    out = tmp_path / "merged"
    code = cli_main(["merge", "--model", str(gpt2_dir), "--adapter", str(tmp_path / "a"), "--adapter",
                     str(tmp_path / "b"), "--out", str(out), "--dtype", "fp16", "--max-shard-size", "20KB"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "transformer.h.2.mlp.c_proj" in printed and "max |change|" in printed
    assert (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("model-*.safetensors"))) > 1
    merged, tokenizer = load_model_and_tokenizer(str(out))
    in_process = scores(merged.float(), tokenizer)
    # a fresh process that never imports biasedit_peft loads and scores it with plain transformers
    script = textwrap.dedent(f"""
        import json, sys, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}, dtype="auto")
        dtype = str(model.dtype)
        model = model.float()
        tok = AutoTokenizer.from_pretrained({str(out)!r})
        ids = [[tok.bos_token_id] + tok(s, add_special_tokens=False)["input_ids"] for s in {SENTENCES!r}]
        totals = []
        for row in ids:
            x = torch.tensor([row])
            with torch.no_grad():
                logp = model(x).logits.log_softmax(-1)
            totals.append(float(logp[0, :-1].gather(-1, x[0, 1:, None]).sum()))
        print(json.dumps({{"dtype": dtype, "scores": totals,
                          "biasedit": any(m.startswith("biasedit_peft") for m in sys.modules)}}))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["biasedit"] is False and answer["dtype"] == "torch.float16"
    torch.testing.assert_close(torch.tensor(answer["scores"]), in_process, atol=1e-4, rtol=0)
