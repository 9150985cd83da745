"""The BiasEdit cases fed into peft's own parametrised tuner tests (data only; see ``peft_peer_glue``).

Each constant mirrors one parametrisation list of a peft test module and has the same row shape:

======================================  ==========================  ============================================
constant                                peft list it replaces       row
======================================  ==========================  ============================================
``CUSTOM_MODEL_CASES``                  ``TEST_CASES``              ``(name, model_id, config_cls, kwargs)``
``MULTIPLE_ACTIVE_ADAPTERS_CASES``      ``MULTIPLE_ACTIVE_...``     ``(name, tuner, config_cls, kw1, kw2)``
``CONFIG_CLASSES``                      ``ALL_CONFIG_CLASSES``      ``(config_cls, mandatory_kwargs)``
``DECODER_CONFIGS``                     ``ALL_CONFIGS``             ``(config_cls, kwargs)``
======================================  ==========================  ============================================

Every test name contains ``BiasEdit`` so that ``-k BiasEdit`` also selects them.
"""

from __future__ import annotations

from biasedit_peft import BiasEditConfig

# model ids understood by test_custom_models.MockTransformerWrapper: "MLP" is Linear(10, 20) -> Linear(20, 2),
# "EmbConv1D" is Embedding(100, 5) -> transformers Conv1D(nf=1, nx=5) -> Linear(10, 2).
_DENSE = {"delta_storage": "dense"}
_FACTORED = {"delta_storage": "factored", "factored_rank": 2}
_PROVENANCE = {"editor_id": "toy/editor", "edit_data": "stereoset:dev", "edit_info": {"n_samples": 8, "solve": "dual"}}

CUSTOM_MODEL_CASES = [
    ("Vanilla MLP 1 BiasEdit", "MLP", BiasEditConfig, {"target_modules": "lin0"}),
    ("Vanilla MLP 2 BiasEdit", "MLP", BiasEditConfig, {"target_modules": ["lin0"]}),
    ("Vanilla MLP 3 BiasEdit", "MLP", BiasEditConfig, {"target_modules": ["lin1"]}),
    ("Vanilla MLP 4 BiasEdit", "MLP", BiasEditConfig, {"target_modules": ["lin0", "lin1"], **_DENSE}),
    ("Vanilla MLP 5 BiasEdit auto", "MLP", BiasEditConfig, {"target_modules": ["lin0"], "delta_storage": "auto"}),
    ("Vanilla MLP 6 BiasEdit provenance", "MLP", BiasEditConfig, {"target_modules": ["lin0"], **_PROVENANCE}),
    ("Vanilla MLP 1 BiasEdit factored", "MLP", BiasEditConfig, {"target_modules": "lin0", **_FACTORED}),
    ("Vanilla MLP 2 BiasEdit factored", "MLP", BiasEditConfig, {"target_modules": ["lin1"], **_FACTORED}),
    ("Vanilla MLP 3 BiasEdit factored", "MLP", BiasEditConfig, {"target_modules": ["lin0", "lin1"], **_FACTORED}),
    (
        "Vanilla MLP 4 BiasEdit factored rank 1",
        "MLP",
        BiasEditConfig,
        {"target_modules": ["lin0", "lin1"], "delta_storage": "factored", "factored_rank": 1},
    ),
    ("MLP LayerNorm BiasEdit", "MLP_LayerNorm", BiasEditConfig, {"target_modules": ["lin0", "lin1"]}),
    ("MLP LayerNorm BiasEdit factored", "MLP_LayerNorm", BiasEditConfig, {"target_modules": ["lin0"], **_FACTORED}),
    ("Embedding + transformers Conv1D 1 BiasEdit", "EmbConv1D", BiasEditConfig, {"target_modules": ["conv1d"]}),
    (
        "Embedding + transformers Conv1D 2 BiasEdit",
        "EmbConv1D",
        BiasEditConfig,
        {"target_modules": ["conv1d", "lin0"], **_DENSE},
    ),
    (
        "Embedding + transformers Conv1D 1 BiasEdit factored",
        "EmbConv1D",
        BiasEditConfig,
        {"target_modules": ["conv1d"], "delta_storage": "factored", "factored_rank": 1},
    ),
    (
        "Embedding + transformers Conv1D 2 BiasEdit factored",
        "EmbConv1D",
        BiasEditConfig,
        {"target_modules": ["conv1d", "lin0"], **_FACTORED},
    ),
]

# TestMultipleActiveAdapters builds MLP(bias=True) for any tuner name it does not special-case.
_LIN0_RANDOM = {"target_modules": ["lin0"], "init_weights": False}
_LIN1_RANDOM = {"target_modules": ["lin1"], "init_weights": False}
MULTIPLE_ACTIVE_ADAPTERS_CASES = [
    ("BiasEdit Same", "biasedit", BiasEditConfig, _LIN0_RANDOM, _LIN0_RANDOM),
    ("BiasEdit Different", "biasedit", BiasEditConfig, _LIN0_RANDOM, _LIN1_RANDOM),
    (
        "BiasEdit factored Same",
        "biasedit",
        BiasEditConfig,
        {**_LIN0_RANDOM, **_FACTORED},
        {**_LIN0_RANDOM, **_FACTORED},
    ),
    ("BiasEdit dense + factored Same", "biasedit", BiasEditConfig, _LIN0_RANDOM, {**_LIN0_RANDOM, **_FACTORED}),
    ("BiasEdit dense + factored Different", "biasedit", BiasEditConfig, _LIN0_RANDOM, {**_LIN1_RANDOM, **_FACTORED}),
]

CONFIG_CLASSES = [
    (BiasEditConfig, {}),
    (BiasEditConfig, {"layers_to_transform": [1, 2], "num_edit_layers": 2, **_FACTORED, **_PROVENANCE}),
]

# target_modules=None: the default targets, the MLP output projection of the last blocks, by model_type.
DECODER_CONFIGS = [
    (BiasEditConfig, {"task_type": "CAUSAL_LM", "target_modules": None}),
    (BiasEditConfig, {"task_type": "CAUSAL_LM", "target_modules": None, **_FACTORED}),
]

# ----- peer tests that do not apply to BiasEdit, or that fail on a known tuner bug -----------------------------------
# (test function name, predicate on the test's parameters, reason). "skip" rows test a feature BiasEdit does not
# have by design; "xfail" rows are strict: once the tuner is fixed they XPASS, which fails the run, and the row must
# go.
_NO_MODULES_TO_SAVE = (
    "BiasEditConfig has no `modules_to_save`: a BiasEdit adapter only holds weight deltas of the edited projections, "
    "never trainable copies of whole modules"
)
_DELTAS_ARE_FLOAT32 = (
    "BiasEdit keeps its deltas in float32 whatever the base dtype (by design, for exact edits and merges), so "
    "autocast_adapter_dtype=False cannot leave them in the base model's float16/bfloat16"
)
_LOW_CPU_MEM_BUG = (
    "tuner bug: BiasEditLayer._move_delta_to_base_device copies meta-device deltas created under "
    "low_cpu_mem_usage=True ('Cannot copy out of meta tensor'); see docs/peft_peer_tests.md"
)
_NAN_MESSAGE = (
    "tuner deviation: safe_merge raises \"NaNs or infs detected in the merged weights; adapter(s) [...] are broken.\" "
    "where every peft tuner raises \"NaNs detected in the merged weights. The adapter <name> seems to be broken\"; "
    "see docs/peft_peer_tests.md"
)
_INT_LAYERS_BUG = (
    "tuner deviation: BiasEditConfig turns layers_to_transform=0 into [0], peft configs keep the int as given; see "
    "docs/peft_peer_tests.md"
)


def _always(params: dict) -> bool:
    return True


def _half_precision_without_autocast(params: dict) -> bool:
    import torch

    return not params["autocast_adapter_dtype"] and params["dtype"] in (torch.float16, torch.bfloat16)


SKIPPED = [
    ("test_set_adapter_non_overlapping_modules_to_save", _always, _NO_MODULES_TO_SAVE),
    ("test_multiple_active_adapters_with_same_modules_to_save_raises", _always, _NO_MODULES_TO_SAVE),
    ("test_multiple_active_adapters_with_overlapping_modules_to_save_raises", _always, _NO_MODULES_TO_SAVE),
    ("test_multiple_active_adapters_with_different_modules_to_save_works", _always, _NO_MODULES_TO_SAVE),
    ("test_loading_model_with_modules_to_save_requires_grad_set_correctly", _always, _NO_MODULES_TO_SAVE),
    ("test_set_requires_grad", _always, _NO_MODULES_TO_SAVE),
    ("test_adapter_dtype_autocast", _half_precision_without_autocast, _DELTAS_ARE_FLOAT32),
    ("test_add_adapter_no_autocast_adapter_dtype", _always, _DELTAS_ARE_FLOAT32),  # only float16 / bfloat16 cases
]

KNOWN_FAILURES: list = []  # the three tuner bugs these tests found are fixed (see docs/peft_peer_tests.md)
