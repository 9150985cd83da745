"""Bundled bias benchmarks (StereoSet intrasentence, CrowS-Pairs) and their loaders.

Data: CC BY-SA 4.0, see ``resources/NOTICE.md``. Splits, counts and the noisy-row rule: docs/data.md.
"""

from .crows import CROWS_BIAS_TYPES, CrowsFormatError, CrowsPair, crows_bias_type, load_crows
from .edit_samples import (
    check_held_out,
    describe_edit_samples,
    load_edit_samples,
    load_pooled_edit_samples,
    pooled_spec,
    require_unrelated,
)
from .neutral import (
    guard_text_file,
    guard_text_label,
    guard_text_option,
    load_guard_text,
    load_neutral_text,
    load_preserve_text,
    preserve_text_file,
    preserve_text_label,
    preserve_text_option,
)
from .splits import SPLIT_SEED, split_calibration, split_train_dev
from .stereoset import (
    NOISE_RULES,
    ROLES,
    SPLITS,
    NoiseReport,
    StereoSetFormatError,
    StereoSetItem,
    load_split_ids,
    load_stereoset,
    load_stereoset_file,
    noise_report,
)
from .swap import gender_swapped, load_bias_attribute_words, swap_gender

BIAS_TYPES = ("gender", "race", "religion")  # the BiasEdit paper's types (train / dev / test)
EXTRA_BIAS_TYPES = ("profession",)  # held out: only in the test split
STEREOSET_BIAS_TYPES = BIAS_TYPES + EXTRA_BIAS_TYPES

__all__ = [
    "BIAS_TYPES", "EXTRA_BIAS_TYPES", "STEREOSET_BIAS_TYPES", "CROWS_BIAS_TYPES", "NOISE_RULES", "ROLES",
    "SPLITS", "SPLIT_SEED", "CrowsFormatError", "CrowsPair", "NoiseReport", "StereoSetFormatError",
    "StereoSetItem", "check_held_out", "crows_bias_type", "describe_edit_samples", "gender_swapped",
    "guard_text_file", "guard_text_label", "guard_text_option", "load_bias_attribute_words", "load_crows",
    "load_edit_samples", "load_guard_text", "load_neutral_text", "load_pooled_edit_samples", "load_preserve_text",
    "load_split_ids", "preserve_text_file", "preserve_text_label", "preserve_text_option",
    "load_stereoset", "load_stereoset_file", "noise_report", "pooled_spec", "split_calibration", "split_train_dev",
    "swap_gender", "require_unrelated",
]
