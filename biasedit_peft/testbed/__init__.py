"""The bundled testbed: a small GPT-2 that is stereotyped *by construction*, for demonstrating and testing
debiasing offline (``--model testbed``). Not a model to use for anything else.

``model/`` holds the artifact (config, weights, tokenizer, model card, ``recipe.json``);
:mod:`biasedit_peft.testbed.corpus` builds its training corpus and ``scripts/build_testbed.py`` trains it.
"""

from pathlib import Path

MODEL_DIR = Path(__file__).parent / "model"

__all__ = ["MODEL_DIR"]
