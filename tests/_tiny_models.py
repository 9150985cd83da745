"""Tiny causal LMs saved to folders (config, weights, word-level tokenizer), built offline from configs."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ("the man woman doctor nurse engineer teacher he she his her is was a an good bad kind strong weak "
         "smart caring boss cook pilot chef lawyer . , and of to in").split()
SENTENCES = [
    "the man is a good engineer .",
    "the woman is a kind nurse .",
    "she was a smart doctor and his boss .",
    "he is a weak cook , the pilot was strong .",
]


def make_tokenizer(folder: Path):
    """A word-level fast tokenizer over :data:`WORDS` with ``<|endoftext|>`` as BOS / EOS / pad."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>",
                                        eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<unk>")
    tokenizer.save_pretrained(folder)
    return tokenizer


def make_gpt2(folder: Path, n_layer: int = 3, n_embd: int = 16, seed: int = 0) -> Path:
    """A random GPT-2 (Conv1D projections) saved with its tokenizer to ``folder``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=2, n_positions=32, vocab_size=len(WORDS) + 2,
                        bos_token_id=0, eos_token_id=0, pad_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    make_tokenizer(folder)
    return folder


def make_llama(folder: Path, n_layer: int = 2, hidden: int = 16, seed: int = 0) -> Path:
    """A random Llama (nn.Linear projections) saved with its tokenizer to ``folder``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(num_hidden_layers=n_layer, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_attention_heads=2, num_key_value_heads=2, vocab_size=len(WORDS) + 2,
                         max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(folder)
    make_tokenizer(folder)
    return folder


def random_low_rank(shape: tuple[int, int], rank: int, scale: float, generator: torch.Generator):
    """Factors ``(A [rows, rank], B [rank, cols])`` whose product has entries of size about ``scale``."""
    first = torch.randn(shape[0], rank, generator=generator)
    second = torch.randn(rank, shape[1], generator=generator) * scale / rank**0.5
    return first, second
