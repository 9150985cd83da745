"""Tiny local stand-ins for the Hub models of peft's ``test_decoder_models.py`` (built from configs, no downloads).

peft's tests branch on substrings of the model id (``"GPT2LMHeadModel" in model_id``, ``model_id.endswith("qwen2")``,
``"gemma" in model_id.lower()``), so each model is saved under ``<root>/<the original Hub id>``: the local path keeps
every substring the tests look for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPTJConfig,
    LlamaConfig,
    OPTConfig,
    PretrainedConfig,
    Qwen2Config,
)

VOCAB_SIZE = 96
_SMALL = {"vocab_size": VOCAB_SIZE, "max_position_embeddings": 64, "bos_token_id": 1, "eos_token_id": 2}
_LLAMA_LIKE = {
    "num_hidden_layers": 2,
    "hidden_size": 16,
    "intermediate_size": 24,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    **_SMALL,
}

# Hub id used by peft 0.21's PEFT_DECODER_MODELS_TO_TEST -> config of a tiny model of the same architecture
TINY_DECODER_CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    "peft-internal-testing/tiny-random-OPTForCausalLM": lambda: OPTConfig(
        num_hidden_layers=2, hidden_size=16, ffn_dim=24, num_attention_heads=2, word_embed_proj_dim=16,
        pad_token_id=0, **_SMALL,
    ),
    "peft-internal-testing/tiny-random-GPT2LMHeadModel": lambda: GPT2Config(
        n_layer=2, n_embd=16, n_head=2, n_positions=64, vocab_size=VOCAB_SIZE, bos_token_id=1, eos_token_id=2,
    ),
    "peft-internal-testing/tiny-random-GPTJForCausalLM": lambda: GPTJConfig(
        n_layer=2, n_embd=16, n_head=2, rotary_dim=4, n_positions=64, vocab_size=VOCAB_SIZE, bos_token_id=1,
        eos_token_id=2,
    ),
    "trl-internal-testing/tiny-random-LlamaForCausalLM": lambda: LlamaConfig(pad_token_id=0, **_LLAMA_LIKE),
    "peft-internal-testing/tiny-dummy-qwen2": lambda: Qwen2Config(**_LLAMA_LIKE),
    "hf-internal-testing/tiny-random-Gemma3ForCausalLM": lambda: Gemma3TextConfig(
        head_dim=8, query_pre_attn_scalar=8, sliding_window=16, pad_token_id=0, **_LLAMA_LIKE,
    ),
}


def build_tiny_decoders(root: Path, hub_ids: list[str]) -> list[str]:
    """Save a randomly initialised tiny model for each of ``hub_ids`` under ``root``; return their local paths.

    Raises ``KeyError`` naming the Hub id when peft's test module lists a model this glue has no stand-in for.
    """
    local_paths = []
    for hub_id in hub_ids:
        if hub_id not in TINY_DECODER_CONFIGS:
            raise KeyError(
                f"peft's PEFT_DECODER_MODELS_TO_TEST lists {hub_id!r}, which tests_peer/tiny_decoders.py has no tiny "
                "local stand-in for: add its config to TINY_DECODER_CONFIGS."
            )
        path = root / hub_id
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(TINY_DECODER_CONFIGS[hub_id]())
        model.save_pretrained(path)
        local_paths.append(str(path))
    return local_paths
