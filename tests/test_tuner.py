"""The BiasEdit PEFT method: config, default targets, adapter layers, merge / unload, multi-adapter, deltas."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel, PeftType, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

import biasedit_peft
from biasedit_peft import BiasEditConfig, edit_targets, get_deltas, override_deltas, set_deltas
from biasedit_peft.tuner import MLP_OUTPUT_PROJECTION, RegistrationError, register
from biasedit_peft.tuner.layer import BiasEditLayer

from factories import EXPECTED_TARGETS, TUNER_ARCHITECTURES, tiny_model, token_ids


def with_weights_shifted(model, deltas):
    """A copy of ``model`` whose named weights were replaced by ``W + delta`` (the reference for an adapter)."""
    shifted = copy.deepcopy(model)
    with torch.no_grad():
        for name, delta in deltas.items():
            weight = shifted.get_submodule(name).weight
            weight.copy_((weight.float() + delta).to(weight.dtype))
    return shifted


# ----- registration ---------------------------------------------------------------------------------
def test_registration_is_idempotent_and_uses_peft_registry():
    register()
    register()
    assert PeftType.BIASEDIT == "BIASEDIT"
    assert PeftType("BIASEDIT") is PeftType.BIASEDIT
    assert PEFT_TYPE_TO_CONFIG_MAPPING["BIASEDIT"] is BiasEditConfig
    assert list(PeftType).count(PeftType.BIASEDIT) == 1


def test_registration_refuses_a_foreign_biasedit(monkeypatch):
    class OtherConfig:  # stands for a future peft that ships its own BIASEDIT
        pass

    monkeypatch.setitem(PEFT_TYPE_TO_CONFIG_MAPPING, "BIASEDIT", OtherConfig)
    with pytest.raises(RegistrationError, match="already has a method named 'BIASEDIT'"):
        register()


def test_registration_refuses_a_changed_registry(monkeypatch):
    from peft import mapping

    monkeypatch.delattr(mapping, "PEFT_TYPE_TO_TUNER_MAPPING")
    with pytest.raises(RegistrationError, match="registry changed"):
        register()


# ----- config ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"delta_storage": "sparse"}, "delta_storage"),
        ({"num_edit_layers": 0}, "num_edit_layers"),
        ({"layers_to_transform": [-1]}, "layers_to_transform"),
        ({"factored_rank": 0}, "factored_rank"),
        ({"target_modules": []}, "empty"),
        # ours names the regex; peft >= 0.22 refuses it first ("cannot be used when `target_modules` is a str")
        ({"target_modules": ".*c_proj", "layers_to_transform": [1]}, "regex|`target_modules` is a str"),
        ({"layers_pattern": "h"}, "layers_pattern"),
        ({"init_weights": "yes"}, "init_weights"),
        ({"delta_ranks": {"a": 0}}, "delta_ranks"),
    ],
)
def test_config_rejects_bad_fields(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BiasEditConfig(**kwargs)


def test_config_round_trips_through_json(tmp_path):
    config = BiasEditConfig(target_modules=["mlp.c_proj"], layers_to_transform=2, editor_id="me/editor",
                            edit_data="stereoset:test", edit_info={"n": 3})
    config.save_pretrained(tmp_path)
    from peft import PeftConfig

    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, BiasEditConfig)
    assert loaded.peft_type == PeftType.BIASEDIT
    assert loaded.target_modules == {"mlp.c_proj"} and loaded.layers_to_transform == 2
    assert (loaded.editor_id, loaded.edit_data, loaded.edit_info) == ("me/editor", "stereoset:test", {"n": 3})


# ----- default targets and forward --------------------------------------------------------------------
@pytest.mark.parametrize("model_type", TUNER_ARCHITECTURES)
def test_default_targets_are_the_last_mlp_output_projections(model_type):
    model = get_peft_model(tiny_model(model_type), BiasEditConfig())
    assert list(edit_targets(model)) == EXPECTED_TARGETS[model_type]


def test_num_edit_layers_and_layers_to_transform():
    assert list(edit_targets(get_peft_model(tiny_model(), BiasEditConfig(num_edit_layers=1)))) == [
        "transformer.h.3.mlp.c_proj"
    ]
    model = get_peft_model(tiny_model(), BiasEditConfig(layers_to_transform=[0, 2]))
    assert list(edit_targets(model)) == ["transformer.h.0.mlp.c_proj", "transformer.h.2.mlp.c_proj"]


def test_more_blocks_than_the_model_has_are_refused_but_the_default_edits_a_smaller_model_whole():
    """tiny_model has 4 blocks: num_edit_layers=4 edits them all, 5 is an error naming the count; a 2-block model
    under the default (3) gets both blocks, 4 asked for is refused."""
    assert len(edit_targets(get_peft_model(tiny_model(), BiasEditConfig(num_edit_layers=4)))) == 4
    with pytest.raises(ValueError, match=r"num_edit_layers=5: the model has only 4 blocks .* \(0-3\)"):
        get_peft_model(tiny_model(), BiasEditConfig(num_edit_layers=5))
    assert list(edit_targets(get_peft_model(tiny_model(n_layer=2), BiasEditConfig()))) == [
        "transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]
    with pytest.raises(ValueError, match=r"num_edit_layers=4: the model has only 2 blocks"):
        get_peft_model(tiny_model(n_layer=2), BiasEditConfig(num_edit_layers=4))


@pytest.mark.parametrize("layers", [[0, 4], 7])
def test_a_block_the_model_lacks_is_refused_by_name(layers):
    """tiny_model has blocks 0-3: a missing index is an error naming it, not an adapter on fewer blocks."""
    with pytest.raises(ValueError, match=r"no block \[%d\].*blocks are 0-3" % (4 if isinstance(layers, list) else 7)):
        get_peft_model(tiny_model(), BiasEditConfig(layers_to_transform=layers))


TINY_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=4, vocab_size=128, head_dim=16, max_position_embeddings=64, pad_token_id=0,
                   bos_token_id=1, eos_token_id=2)


def tiny_model_of_type(model_type: str) -> torch.nn.Module:
    """A 4-block causal LM of ``model_type`` from its transformers config, on the meta device (names only)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {k: v for k, v in TINY_CONFIG.items() if not (model_type == "falcon" and k == "head_dim")}
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kwargs))


@pytest.mark.parametrize("model_type", sorted(MLP_OUTPUT_PROJECTION))
def test_every_listed_architecture_has_its_mlp_output_projection_in_every_block(model_type):
    from transformers.pytorch_utils import Conv1D

    from biasedit_peft.tuner.model import block_indices

    model = tiny_model_of_type(model_type)
    suffix = MLP_OUTPUT_PROJECTION[model_type]
    assert block_indices(model, suffix) == [0, 1, 2, 3]
    projections = [m for name, m in model.named_modules() if name.endswith("." + suffix)]
    assert len(projections) == 4 and all(isinstance(m, (torch.nn.Linear, Conv1D)) for m in projections)
    # the projection maps the MLP's hidden width back to the residual stream
    assert {(m.weight.shape[-1] if isinstance(m, torch.nn.Linear) else m.weight.shape[0]) for m in projections} != {64}


def test_an_unlisted_architecture_edits_the_one_known_projection_in_its_blocks_with_a_warning():
    from transformers import GPT2Config

    class MysteryConfig(GPT2Config):
        model_type = "mystery"

    model = tiny_model()
    model.config.__class__ = MysteryConfig
    with pytest.warns(UserWarning, match="no table entry for model_type 'mystery'.*'mlp.c_proj'"):
        peft_model = get_peft_model(model, BiasEditConfig())
    assert [name.split("model.")[-1] for name in edit_targets(peft_model)] == [
        f"transformer.h.{i}.mlp.c_proj" for i in (1, 2, 3)]


def test_unknown_architecture_without_one_known_projection_says_which_targets_to_pass():
    from transformers import GPT2Config

    class MysteryConfig(GPT2Config):
        model_type = "mystery"

    model = tiny_model()
    model.config.__class__ = MysteryConfig
    for block in model.transformer.h:  # two known projection names in the blocks: ambiguous, so no guess
        block.mlp.down_proj = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match="no default target for model_type 'mystery'.*target_modules="):
        get_peft_model(model, BiasEditConfig())
    with pytest.raises(ValueError, match="no default target for model_type 'mixtral'"):  # experts: none known
        get_peft_model(tiny_model_of_type("mixtral"), BiasEditConfig())


def test_unsupported_layer_type_is_a_type_error():
    with pytest.raises(TypeError, match="only torch.nn.Linear and transformers' Conv1D"):
        get_peft_model(tiny_model("llama"), BiasEditConfig(target_modules=["embed_tokens"]))


@pytest.mark.parametrize("model_type", TUNER_ARCHITECTURES)
def test_zero_init_adapter_is_exactly_the_base(model_type):
    base = tiny_model(model_type)
    ids = token_ids()
    expected = base(ids).logits
    model = get_peft_model(base, BiasEditConfig())
    assert torch.equal(model(ids).logits, expected)


@pytest.mark.parametrize("model_type", TUNER_ARCHITECTURES)
def test_random_delta_equals_shifted_weights_fp32(model_type):
    base = tiny_model(model_type)
    reference = copy.deepcopy(base)
    model = get_peft_model(base, BiasEditConfig(init_weights=False))
    deltas = get_deltas(model)
    assert all(d.abs().max() > 0 for d in deltas.values())
    ids = token_ids()
    expected = with_weights_shifted(reference, deltas)(ids).logits
    torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("dtype", "atol"), [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_low_precision_base_keeps_float32_deltas(model_type, dtype, atol):
    """A bf16 / fp16 base with float32 deltas computes the float32 model with shifted weights, to within the low
    precision's rounding (measured: at most 4.3e-3 in bf16 and 7.7e-4 in fp16), and the deltas move the logits
    far more than that tolerance, so a dropped adapter fails."""
    model = get_peft_model(tiny_model(model_type, dtype=dtype), BiasEditConfig(init_weights=False))
    generator = torch.Generator().manual_seed(0)
    deltas = {name: 0.2 * torch.randn(delta.shape, generator=generator) for name, delta in get_deltas(model).items()}
    set_deltas(model, deltas)
    for layer in edit_targets(model).values():
        assert layer.biasedit_delta["default"].dtype == torch.float32
    ids = token_ids()
    out = model(ids).logits
    assert out.dtype == dtype
    float32_base = tiny_model(model_type)  # the same seed, so the same weights before rounding
    expected = with_weights_shifted(float32_base, deltas)(ids).logits
    assert (expected - float32_base(ids).logits).abs().max() > 10 * atol
    torch.testing.assert_close(out.float(), expected, atol=atol, rtol=0)


# ----- merge / unload ---------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", TUNER_ARCHITECTURES)
def test_merge_unmerge_restores_weights_bitwise(model_type):
    model = get_peft_model(tiny_model(model_type), BiasEditConfig(init_weights=False))
    ids = token_ids()
    before = {n: layer.get_base_layer().weight.detach().clone() for n, layer in edit_targets(model).items()}
    unmerged = model(ids).logits
    model.merge_adapter()
    torch.testing.assert_close(model(ids).logits, unmerged, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    for name, layer in edit_targets(model).items():
        assert torch.equal(layer.get_base_layer().weight, before[name])
    assert torch.equal(model(ids).logits, unmerged)


@pytest.mark.parametrize("model_type", TUNER_ARCHITECTURES)
def test_merge_and_unload_returns_plain_model_with_equal_outputs(model_type):
    base = tiny_model(model_type)
    plain_class = type(base)
    model = get_peft_model(base, BiasEditConfig(init_weights=False))
    ids = token_ids()
    expected = model(ids).logits
    merged = model.merge_and_unload()
    assert type(merged) is plain_class
    assert not any(isinstance(m, BiasEditLayer) for m in merged.modules())
    torch.testing.assert_close(merged(ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_merge_into_bf16_casts_once():
    base = tiny_model("gpt2", dtype=torch.bfloat16)
    reference = copy.deepcopy(base)
    model = get_peft_model(base, BiasEditConfig(init_weights=False))
    deltas = get_deltas(model)
    merged = model.merge_and_unload()
    for name, delta in deltas.items():
        expected = (reference.get_submodule(name).weight.float() + delta).to(torch.bfloat16)
        assert torch.equal(merged.get_submodule(name).weight, expected)


@pytest.mark.parametrize("model_type", ["gpt2", "opt"])
def test_unload_and_disable_adapter_give_the_base(model_type):
    base = tiny_model(model_type)
    ids = token_ids()
    expected = base(ids).logits
    model = get_peft_model(base, BiasEditConfig(init_weights=False))
    assert not torch.allclose(model(ids).logits, expected)
    with model.disable_adapter():
        assert torch.equal(model(ids).logits, expected)
    model.merge_adapter()
    with model.disable_adapter():  # disabling a merged adapter unmerges it
        assert torch.equal(model(ids).logits, expected)
    assert torch.equal(model.unload()(ids).logits, expected)


def test_safe_merge_refuses_non_finite_deltas():
    model = get_peft_model(tiny_model(), BiasEditConfig(init_weights=False))
    name, layer = next(iter(edit_targets(model).items()))
    before = layer.get_base_layer().weight.detach().clone()
    layer.biasedit_delta["default"].data[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaNs detected in the merged weights"):
        model.merge_adapter(safe_merge=True)
    assert torch.equal(layer.get_base_layer().weight, before)
    assert not layer.merged


# ----- several adapters -----------------------------------------------------------------------------
def test_two_adapters_switch_and_delete():
    base = tiny_model()
    reference = copy.deepcopy(base)
    model = get_peft_model(base, BiasEditConfig(init_weights=False))
    model.add_adapter("other", BiasEditConfig(init_weights=False))
    ids = token_ids()
    first, second = get_deltas(model, "default"), get_deltas(model, "other")
    out_default = model(ids).logits
    torch.testing.assert_close(out_default, with_weights_shifted(reference, first)(ids).logits, atol=1e-5, rtol=0)
    model.set_adapter("other")
    torch.testing.assert_close(model(ids).logits, with_weights_shifted(reference, second)(ids).logits, atol=1e-5,
                               rtol=0)
    model.base_model.set_adapter(["default", "other"])  # both active: deltas add
    both = {n: first[n] + second[n] for n in first}
    torch.testing.assert_close(model(ids).logits, with_weights_shifted(reference, both)(ids).logits, atol=1e-5,
                               rtol=0)
    model.set_adapter("default")
    model.delete_adapter("other")
    assert "other" not in model.peft_config
    assert all("other" not in layer.biasedit_delta for layer in edit_targets(model).values())
    assert torch.equal(model(ids).logits, out_default)


# ----- writing deltas ---------------------------------------------------------------------------------
def test_set_deltas_writes_native_layout_for_conv1d_and_linear():
    for model_type in ("gpt2", "llama"):
        base = tiny_model(model_type)
        reference = copy.deepcopy(base)
        model = get_peft_model(base, BiasEditConfig())
        shapes = {n: layer.get_base_layer().weight.shape for n, layer in edit_targets(model).items()}
        generator = torch.Generator().manual_seed(3)
        deltas = {n: torch.randn(s, generator=generator) * 0.05 for n, s in shapes.items()}
        set_deltas(model, deltas)
        ids = token_ids()
        expected = with_weights_shifted(reference, deltas)(ids).logits
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=1e-5)
        assert all(torch.equal(get_deltas(model)[n], deltas[n]) for n in deltas)


@pytest.mark.parametrize(
    "make_bad, error, message",
    [
        (lambda n, s: {"transformer.h.0.attn.c_attn": torch.zeros(s)}, KeyError, "No BiasEdit layer"),
        (lambda n, s: {n: torch.zeros(s[1], s[0] + 1)}, ValueError, "expected the module's weight shape"),
        (lambda n, s: {n: torch.full(s, float("nan"))}, ValueError, "NaN"),
        (lambda n, s: {n: (torch.zeros(s[0], 2), torch.zeros(3, s[1]))}, ValueError, "Factored delta"),
        (lambda n, s: {n: torch.zeros(s, dtype=torch.long)}, TypeError, "floating point"),
    ],
)
def test_set_deltas_validates_everything_before_writing(make_bad, error, message):
    model = get_peft_model(tiny_model(), BiasEditConfig(init_weights=False))
    before = get_deltas(model)
    names = list(before)
    good = {names[0]: torch.ones_like(before[names[0]])}
    bad = make_bad(names[1], tuple(before[names[1]].shape))
    with pytest.raises(error, match=message):
        set_deltas(model, {**good, **bad})
    after = get_deltas(model)
    assert all(torch.equal(after[n], before[n]) for n in names)  # nothing half-written


def test_factored_delta_equals_dense_and_auto_picks_the_smaller():
    base = tiny_model()
    model = get_peft_model(base, BiasEditConfig())
    name, layer = next(iter(edit_targets(model).items()))
    rows, cols = layer.weight_shape
    generator = torch.Generator().manual_seed(0)
    first, second = torch.randn(rows, 2, generator=generator), torch.randn(2, cols, generator=generator)
    ids = token_ids()
    set_deltas(model, {name: (first, second)})
    assert layer.delta_rank("default") == 2 and model.peft_config["default"].delta_ranks == {name: 2}
    factored_out = model(ids).logits
    set_deltas(model, {name: first @ second})  # dense input stays dense under "auto"
    assert layer.delta_rank("default") is None and model.peft_config["default"].delta_ranks == {}
    torch.testing.assert_close(model(ids).logits, factored_out, atol=1e-5, rtol=1e-5)
    high_rank = min(rows, cols)  # r * (rows + cols) > rows * cols: auto stores it dense
    set_deltas(model, {name: (torch.randn(rows, high_rank), torch.randn(high_rank, cols))})
    assert layer.delta_rank("default") is None


def test_factored_storage_factorises_dense_input_exactly():
    model = get_peft_model(tiny_model("llama"), BiasEditConfig(delta_storage="factored"))
    name, layer = next(iter(edit_targets(model).items()))
    rows, cols = layer.weight_shape
    low_rank = torch.randn(rows, 3) @ torch.randn(3, cols)
    set_deltas(model, {name: low_rank})
    assert layer.delta_rank("default") == 3
    torch.testing.assert_close(get_deltas(model)[name], low_rank, atol=1e-5, rtol=1e-5)


def test_factored_init_has_zero_product_but_gradients():
    model = get_peft_model(tiny_model(), BiasEditConfig(delta_storage="factored", factored_rank=2))
    layer = next(iter(edit_targets(model).values()))
    assert torch.equal(layer.get_delta_weight("default"), torch.zeros(layer.weight_shape))
    model(token_ids()).logits.sum().backward()
    assert layer.biasedit_A["default"].grad.abs().sum() > 0


def test_override_deltas_is_functional_and_differentiable():
    model = get_peft_model(tiny_model(), BiasEditConfig())
    ids = token_ids()
    base_out = model(ids).logits.detach()
    stored = get_deltas(model)
    overrides = {n: torch.zeros_like(d, requires_grad=True) for n, d in stored.items()}
    with override_deltas(model, overrides):
        loss = model(ids).logits.square().mean()
    loss.backward()
    # the gradient w.r.t. an override equals the gradient w.r.t. the stored delta parameter
    model.zero_grad()
    model(ids).logits.square().mean().backward()
    for name, layer in edit_targets(model).items():
        torch.testing.assert_close(overrides[name].grad, layer.biasedit_delta["default"].grad)
    assert torch.equal(model(ids).logits, base_out)  # nothing was written
    assert all(not layer._delta_overrides for layer in edit_targets(model).values())


def test_set_deltas_refuses_a_merged_adapter():
    model = get_peft_model(tiny_model(), BiasEditConfig(init_weights=False))
    model.merge_adapter()
    deltas = get_deltas(model)
    with pytest.raises(RuntimeError, match="unmerge"):
        set_deltas(model, deltas)


def test_adapter_parameters_are_float32_and_package_exports():
    assert biasedit_peft.BiasEditConfig is BiasEditConfig
    model = get_peft_model(tiny_model(), BiasEditConfig())
    assert isinstance(model, PeftModel)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("biasedit_" in n for n in trainable)


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])  # Conv1D ([in, out]) and Linear ([out, in]) weights
def test_the_additive_delta_is_what_merging_adds(architecture):
    """peft >= 0.22 converts additive adapters to LoRA from ``get_additive_delta``: for BiasEdit it is W' - W in the
    base weight's layout, and peft refuses it while an adapter is merged."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_model(architecture), BiasEditConfig())
    targets = edit_targets(model)
    set_deltas(model, {name: 1e-2 * torch.randn(layer.weight_shape) for name, layer in targets.items()})
    for layer in targets.values():
        assert layer.supports_lora_conversion()
        base = layer.get_base_layer().weight.detach().clone()
        delta = layer._get_additive_delta("default")
        assert delta.dtype == torch.float32 and delta.shape == base.shape
        layer.merge()
        torch.testing.assert_close(layer.get_base_layer().weight.detach(), base + delta)
        if hasattr(BiasEditLayer, "get_additive_delta"):  # peft >= 0.22
            with pytest.raises(ValueError, match="merged"):
                layer.get_additive_delta("default")
        layer.unmerge()
