"""The bundled texts stay apart: the preservation text shares no paragraph and no topic word with the guard text or
the perplexity text, so preserving its keys leaves both held out."""

from __future__ import annotations

import re

from biasedit_peft.data import load_guard_text, load_neutral_text, load_preserve_text

TOPIC_WORDS = ("mushroom", "balloon", "rust", "spider", "refrigerator", "siphon", "thermometer", "wool", "candle",
               "hinge", "firefl", "screw", "starfish", "hummingbird", "seed", "egg", "zip", "caterpillar")
"""A stem of each preservation paragraph's topic, in order."""


def test_each_preservation_paragraph_is_about_its_own_topic_and_the_other_texts_never_name_it():
    preserve = load_preserve_text()
    assert len(preserve) == len(TOPIC_WORDS) == 18
    held_out = " ".join(load_guard_text() + load_neutral_text()).lower()
    for paragraph, stem in zip(preserve, TOPIC_WORDS):
        assert stem in paragraph.lower()
        assert not re.search(rf"\b{stem}", held_out), stem
    assert not set(preserve) & set(load_guard_text()) and not set(preserve) & set(load_neutral_text())
