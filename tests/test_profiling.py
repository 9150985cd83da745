"""The float32 profiler ranges and the meta-step's time by part (biasedit_peft/profiling.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from biasedit_peft.profiling import (
    EDITOR_RANGE,
    PARTS,
    VOCABULARY_RANGE,
    float32_parts_bound,
    float32_range,
    float32_seconds,
    part_of,
    time_by_part,
)

from factories import editor_tokenizer, peft_model, samples


@dataclass
class Op:
    """A stand-in for a profiler ``FunctionEvent``: its name, parent and own time in microseconds."""

    name: str
    cpu_parent: "Op | None" = None
    self_cpu_time_total: float = 0.0


def test_each_op_goes_to_its_innermost_range_then_attention_then_its_name():
    editor = Op(EDITOR_RANGE)
    vocabulary_in_editor = Op(VOCABULARY_RANGE, editor)
    attention = Op("aten::_scaled_dot_product_flash_attention_for_cpu")
    public_attention = Op("aten::scaled_dot_product_attention")
    assert part_of(Op("aten::mm", editor)) == "editor_float32"
    assert part_of(Op("aten::exp_", Op("aten::logsumexp", vocabulary_in_editor))) == "vocabulary_float32"
    assert part_of(attention) == "attention"
    assert part_of(Op("aten::bmm", Op("aten::_scaled_dot_product_attention_math", public_attention))) == "attention"
    assert part_of(Op("aten::mm", Op("autograd::engine::evaluate_function: MmBackward0"))) == "lm_matmul"
    assert part_of(Op("aten::addmm")) == "lm_matmul"
    assert part_of(Op("aten::mul")) == "lm_other"


def test_time_by_part_adds_own_times_once_and_leaves_the_rest_untracked():
    editor = Op(EDITOR_RANGE, None, 100.0)  # 100 us in the range itself, outside its ops
    events = [editor, Op("aten::mm", editor, 400.0), Op("aten::mm", None, 1_000.0), Op("aten::add", None, 500.0),
              Op(VOCABULARY_RANGE, None, 0.0), Op("aten::exp", Op(VOCABULARY_RANGE), 250.0)]
    seconds = time_by_part(events, wall_seconds=0.003)
    assert list(seconds) == list(PARTS)
    assert seconds == pytest.approx({"editor_float32": 500e-6, "vocabulary_float32": 250e-6, "attention": 0.0,
                                     "lm_matmul": 1_000e-6, "lm_other": 500e-6, "untracked": 750e-6})
    assert time_by_part(events, wall_seconds=0.001)["untracked"] == 0.0  # never below 0
    assert float32_seconds(seconds) == pytest.approx(750e-6)


def test_float32_parts_bound_by_hand():
    # fp32 step 4 s of which 1 s float32; in bf16 the float32 parts take 1.2 s; the other 3 s at 5x: 0.6 s
    assert float32_parts_bound(4.0, 1.0, 1.2, 5.0) == pytest.approx(4.0 / 1.8)
    assert float32_parts_bound(4.0, 0.0, 0.0, 5.0) == pytest.approx(5.0)  # nothing fixed: the matmul ratio


def test_only_the_two_float32_ranges_exist():
    with pytest.raises(ValueError, match="Unknown range 'biasedit::lm'"):
        float32_range("biasedit::lm")


def test_the_vocabulary_range_holds_the_log_softmax_and_its_backward():
    from biasedit_peft.scoring import TokenBatch, token_log_probs

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 6, 3_000, generator=generator, requires_grad=True)
    attention = torch.ones(4, 6, dtype=torch.bool)
    batch = TokenBatch(torch.randint(0, 3_000, (4, 6), generator=generator), attention.long(),
                       attention & (torch.arange(6)[None] > 0))
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        token_log_probs(logits, batch).sum().backward()
    seconds = time_by_part(profiler.events(), wall_seconds=0.0)
    names = {event.name for event in profiler.events()}
    assert VOCABULARY_RANGE in names and EDITOR_RANGE not in names
    in_ops = sum(value for part, value in seconds.items() if part != "untracked")
    assert seconds["vocabulary_float32"] > 0.5 * in_ops  # the exp over 15 x 3,000 logits, forward and backward


def test_a_meta_step_splits_into_parts_that_sum_to_its_wall_time(tmp_path, monkeypatch):
    """The editor's range covers its solve: a 0.2 s pause in every layer's solve lands in ``editor_float32``."""
    from biasedit_peft.editor import BiasEditor, BiasEditTrainer, BiasEditTrainingArguments
    from biasedit_peft.editor import editor as editor_module

    layer_solve = editor_module.predict_layer

    def slow_predict_layer(*args, **kwargs):
        time.sleep(0.2)
        return layer_solve(*args, **kwargs)

    model = peft_model()
    editor = BiasEditor.for_model(model, rank=8, lr=1e-2)
    args = BiasEditTrainingArguments(output_dir=str(tmp_path), n_edits=4, batch_size=2, meta_lr=1e-2, loc_coef=1.0,
                                     max_steps=1, progress=False, calibrate=False)
    trainer = BiasEditTrainer(model, editor, args, samples(4), None, tokenizer=editor_tokenizer())
    trainer.edit_step(samples(4), train=True)  # warm-up: the normalisers see rows before the timed step
    monkeypatch.setattr(editor_module, "predict_layer", slow_predict_layer)
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        start = time.perf_counter()
        trainer.edit_step(samples(4), train=True)
        wall = time.perf_counter() - start
    seconds = time_by_part(profiler.events(), wall)
    assert seconds["editor_float32"] >= 0.2 * len(editor.config.targets)
    assert seconds["vocabulary_float32"] > 0 and seconds["lm_matmul"] > 0 and seconds["lm_other"] > 0
    assert sum(seconds.values()) == pytest.approx(wall)
