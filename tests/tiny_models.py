"""Tiny transformers models built from configs (no downloads), shared by the test modules."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    OPTConfig,
    Qwen2Config,
)

VOCAB = 128

_CONFIGS = {
    "gpt2": lambda: GPT2Config(n_layer=4, n_embd=32, n_head=2, n_positions=64, vocab_size=VOCAB,
                               bos_token_id=1, eos_token_id=1),
    "llama": lambda: LlamaConfig(num_hidden_layers=4, hidden_size=32, intermediate_size=48, num_attention_heads=2,
                                 num_key_value_heads=1, vocab_size=VOCAB, max_position_embeddings=64,
                                 bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "gemma": lambda: GemmaConfig(num_hidden_layers=4, hidden_size=32, intermediate_size=48, num_attention_heads=2,
                                 num_key_value_heads=1, head_dim=16, vocab_size=VOCAB, max_position_embeddings=64,
                                 bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "qwen2": lambda: Qwen2Config(num_hidden_layers=4, hidden_size=32, intermediate_size=48, num_attention_heads=2,
                                 num_key_value_heads=1, vocab_size=VOCAB, max_position_embeddings=64,
                                 bos_token_id=1, eos_token_id=2),
    "gpt_neox": lambda: GPTNeoXConfig(num_hidden_layers=4, hidden_size=32, intermediate_size=48,
                                      num_attention_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                                      bos_token_id=1, eos_token_id=2),
    "opt": lambda: OPTConfig(num_hidden_layers=4, hidden_size=32, ffn_dim=48, num_attention_heads=2,
                             word_embed_proj_dim=32, vocab_size=VOCAB, max_position_embeddings=64,
                             bos_token_id=1, eos_token_id=2, pad_token_id=0),
}

# model_type -> the names default BiasEdit targets must have (last 3 of 4 blocks)
EXPECTED_TARGETS = {
    "gpt2": [f"transformer.h.{i}.mlp.c_proj" for i in (1, 2, 3)],
    "llama": [f"model.layers.{i}.mlp.down_proj" for i in (1, 2, 3)],
    "gemma": [f"model.layers.{i}.mlp.down_proj" for i in (1, 2, 3)],
    "qwen2": [f"model.layers.{i}.mlp.down_proj" for i in (1, 2, 3)],
    "gpt_neox": [f"gpt_neox.layers.{i}.mlp.dense_4h_to_h" for i in (1, 2, 3)],
    "opt": [f"model.decoder.layers.{i}.fc2" for i in (1, 2, 3)],
}
MODEL_TYPES = tuple(_CONFIGS)


def tiny_config(model_type: str):
    return _CONFIGS[model_type]()


def tiny_model(model_type: str = "gpt2", seed: int = 0, dtype: torch.dtype = torch.float32):
    """A randomly initialised tiny causal LM in eval mode (dropout off), same weights for the same seed."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type))
    return model.to(dtype).eval()


def token_ids(batch: int = 2, length: int = 9, seed: int = 1) -> torch.Tensor:
    """Random token ids ``[batch, length]`` avoiding the special ids 0..2."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)
