"""Tiny local stand-ins for the Hub models of peft's ``test_decoder_models.py`` (built from configs, no downloads).

peft's tests branch on substrings of the model id (``"GPT2LMHeadModel" in model_id``, ``model_id.endswith("qwen2")``,
``"gemma" in model_id.lower()``), so each model is saved under ``<root>/<the original Hub id>``: the local path keeps
every substring the tests look for.
"""

from __future__ import annotations

from pathlib import Path

from factories import tiny_model  # tests/factories.py: run_peft_peer_tests.py puts tests/ on PYTHONPATH

# Hub id used by peft 0.21-0.22's PEFT_DECODER_MODELS_TO_TEST -> the architecture of its tiny stand-in (factories'
# "peer" size: 2 blocks of width 16 over 96 ids)
TINY_DECODERS: dict[str, str] = {
    "peft-internal-testing/tiny-random-OPTForCausalLM": "opt",
    "peft-internal-testing/tiny-random-GPT2LMHeadModel": "gpt2",
    "peft-internal-testing/tiny-random-GPTJForCausalLM": "gptj",
    "trl-internal-testing/tiny-random-LlamaForCausalLM": "llama",
    "peft-internal-testing/tiny-random-LlamaForCausalLM": "llama",  # peft 0.22's id for it
    "peft-internal-testing/tiny-dummy-qwen2": "qwen2",
    "hf-internal-testing/tiny-random-Gemma3ForCausalLM": "gemma3_text",
}


def build_tiny_decoders(root: Path, hub_ids: list[str]) -> list[str]:
    """Save a randomly initialised tiny model for each of ``hub_ids`` under ``root``; return their local paths.

    Raises ``KeyError`` naming the Hub id when peft's test module lists a model this glue has no stand-in for.
    """
    local_paths = []
    for hub_id in hub_ids:
        if hub_id not in TINY_DECODERS:
            raise KeyError(
                f"peft's PEFT_DECODER_MODELS_TO_TEST lists {hub_id!r}, which tests_peer/tiny_decoders.py has no tiny "
                "local stand-in for: add its architecture to TINY_DECODERS (and a \"peer\" size to "
                "tests/factories.py)."
            )
        path = root / hub_id
        tiny_model(TINY_DECODERS[hub_id], size="peer").save_pretrained(path)
        local_paths.append(str(path))
    return local_paths
