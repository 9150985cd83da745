"""A tiny word-level tokenizer, tiny GPT-2 / Llama PEFT models and StereoSet-like samples for editor tests."""

from __future__ import annotations

import torch
from peft import get_peft_model
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from biasedit_peft import BiasEditConfig
from biasedit_peft.data.stereoset import StereoSetItem
from biasedit_peft.editor.cache import EditSample

GROUPS = ["he", "she", "men", "women", "boys", "girls"]
ROLES = [("nurse", "engineer"), ("cook", "pilot"), ("dancer", "soldier"), ("teacher", "builder"),
         ("singer", "farmer"), ("baker", "driver"), ("painter", "guard"), ("writer", "miner")]
UNRELATED = ["table", "cloud", "spoon", "river", "lamp", "stone", "paper", "window"]


def samples(n: int = 16) -> list[EditSample]:
    """``n`` deterministic (stereotype, anti-stereotype, unrelated) triples."""
    out = []
    for i in range(n):
        group = GROUPS[i % len(GROUPS)]
        stereo, anti = ROLES[i % len(ROLES)]
        if i % 2:
            stereo, anti = anti, stereo
        out.append(EditSample(f"{group} is a {stereo} .", f"{group} is a {anti} .",
                              f"{group} is a {UNRELATED[i % len(UNRELATED)]} ."))
    return out


def stereoset_items(n: int = 16) -> list[StereoSetItem]:
    """The triples of :func:`samples` as StereoSet items: target = the group, one bias type ("gender")."""
    items = []
    for i, sample in enumerate(samples(n)):
        group = GROUPS[i % len(GROUPS)]
        words = [sentence.split()[3] for sentence in (sample.stereotype, sample.anti_stereotype, sample.unrelated)]
        items.append(StereoSetItem(f"tiny-{i}", group, "gender", f"{group} is a BLANK .", sample.stereotype,
                                   sample.anti_stereotype, sample.unrelated, *words))
    return items


def tokenizer() -> PreTrainedTokenizerFast:
    words = GROUPS + [w for pair in ROLES for w in pair] + UNRELATED + ["is", "a", "."]
    backend = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=False,
                                                    strip_accents=False, lowercase=False)  # drops control chars
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator([" ".join(words)],
                                trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]", "<|endoftext|>"]))
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                   bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def gpt2_base(seed: int = 0, dtype: torch.dtype = torch.float32) -> GPT2LMHeadModel:
    """A 3-block GPT-2 (Conv1D projections, MLP 16 -> 24 -> 16)."""
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=16, n_head=2, n_inner=24, vocab_size=40, n_positions=64,
                                      bos_token_id=2, eos_token_id=2)).to(dtype).eval()


def peft_gpt2(seed: int = 0, dtype: torch.dtype = torch.float32, **config):
    """:func:`gpt2_base` with a BiasEdit adapter on the last 2 MLP output projections."""
    config.setdefault("num_edit_layers", 2)
    return get_peft_model(gpt2_base(seed, dtype), BiasEditConfig(**config))


def peft_llama(seed: int = 0):
    """A 2-block Llama (nn.Linear projections, [out, in] layout) with a BiasEdit adapter on both blocks."""
    torch.manual_seed(seed)
    base = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=16, intermediate_size=24,
                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=40,
                                        max_position_embeddings=64, bos_token_id=2, eos_token_id=2,
                                        pad_token_id=1)).eval()
    return get_peft_model(base, BiasEditConfig(num_edit_layers=2))
