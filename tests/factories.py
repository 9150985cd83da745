"""Everything the tests build, offline and from configs: tiny models by architecture, one word-level tokenizer,
and the sentences, edit samples and StereoSet items they are fed.

Models come in three sizes (:data:`SIZES`), each with the vocabulary of its tokenizer:

- ``"default"``: 4 blocks of width 32 over 128 ids (:data:`VOCAB`), for tests of the tuner itself: every
  architecture of :data:`ARCHITECTURES`;
- ``"editor"``: 3 GPT-2 blocks (2 Llama blocks) of width 16 with a 24-wide MLP, over the ids of
  :func:`editor_tokenizer` (the editor, trainer, protocol and card tests);
- ``"words"``: 3 GPT-2 blocks (2 Llama blocks) of width 16 over the ids of :func:`words_tokenizer` (models saved to a
  folder, for the commands, merging, LoRA export, sharing and tracing);
- ``"peer"``: 2 blocks of width 16 over 96 ids, the stand-ins for the Hub models of peft's own tests.

The same architecture, size, config and seed give the same weights, whatever test builds them.
"""

from __future__ import annotations

import importlib.util
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from peft import get_peft_model
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    FalconConfig,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    GPTJConfig,
    GPTNeoXConfig,
    LlamaConfig,
    OPTConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from biasedit_peft import BiasEditConfig
from biasedit_peft.data import StereoSetItem
from biasedit_peft.editor.cache import EditSample

# ----- tokenizers ------------------------------------------------------------------------------------------
EOT = "<|endoftext|>"
SPECIALS = ("[UNK]", "[PAD]", EOT)


def word_tokenizer(
    words: Iterable[str],
    specials: Sequence[str] = SPECIALS,
    *,
    unk: str = "[UNK]",
    pad: str | None = "[PAD]",
    bos: str | None = EOT,
    eos: str | None = EOT,
    prepend_bos: bool = False,
    split_punctuation: bool = True,
    padding_side: str = "right",
) -> PreTrainedTokenizerFast:
    """The one tokenizer builder: a word-level fast tokenizer.

    Ids are ``specials`` then ``words``, in order (a repeated word keeps its first id); ``specials`` are special
    tokens. Text is split at white space and, with ``split_punctuation``, between words and punctuation
    (``"kind."`` -> ``kind``, ``.``); control characters are dropped. ``bos`` / ``eos`` / ``pad`` None: the tokenizer
    has no such token. ``prepend_bos``: the tokenizer itself puts ``bos`` before every text (Llama style).
    """
    vocab = {token: i for i, token in enumerate(dict.fromkeys([*specials, *words]))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    backend.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=False, strip_accents=False,
                                                    lowercase=False)
    backend.pre_tokenizer = pre_tokenizers.Whitespace() if split_punctuation else pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(list(specials))
    if prepend_bos:
        backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    named = {"unk_token": unk, "pad_token": pad, "bos_token": bos, "eos_token": eos}
    return PreTrainedTokenizerFast(tokenizer_object=backend, padding_side=padding_side,
                                   **{key: token for key, token in named.items() if token is not None})


def ranked_words(texts: Iterable[str]) -> list[str]:
    """The words of ``texts`` (split as :func:`word_tokenizer` splits them), most frequent first, ties in
    alphabetical order: the order in which a word-level tokenizer trained on ``texts`` numbers them."""
    split = pre_tokenizers.Whitespace()
    counts = Counter(word for text in texts for word, _ in split.pre_tokenize_str(text))
    return sorted(counts, key=lambda word: (-counts[word], word))


# ----- sentences, edit samples and StereoSet items ------------------------------------------------------
WORDS = ("the man woman doctor nurse engineer teacher he she his her is was a an good bad kind strong weak "
         "smart caring boss cook pilot chef lawyer . , and of to in").split()
"""The vocabulary of :func:`words_tokenizer`."""
SENTENCES = [
    "the man is a good engineer .",
    "the woman is a kind nurse .",
    "she was a smart doctor and his boss .",
    "he is a weak cook , the pilot was strong .",
]
"""Sentences of :data:`WORDS` only."""
GROUPS = ["he", "she", "men", "women", "boys", "girls"]
ROLES = [("nurse", "engineer"), ("cook", "pilot"), ("dancer", "soldier"), ("teacher", "builder"),
         ("singer", "farmer"), ("baker", "driver"), ("painter", "guard"), ("writer", "miner")]
UNRELATED = ["table", "cloud", "spoon", "river", "lamp", "stone", "paper", "window"]


def words_tokenizer() -> PreTrainedTokenizerFast:
    """:data:`WORDS` after ``<|endoftext|>`` (BOS, EOS and pad) and ``<unk>``; split at white space only."""
    return word_tokenizer(WORDS, (EOT, "<unk>"), unk="<unk>", pad=EOT, split_punctuation=False)


def editor_tokenizer() -> PreTrainedTokenizerFast:
    """The words of :func:`samples` (alphabetical) after ``[UNK]``, ``[PAD]`` and ``<|endoftext|>`` (BOS, EOS)."""
    return word_tokenizer(ranked_words([" ".join(GROUPS + [w for pair in ROLES for w in pair] + UNRELATED
                                                 + ["is", "a", "."])]))


def samples(n: int = 16, bias_types: Sequence[str] = ()) -> list[EditSample]:
    """``n`` deterministic (stereotype, anti-stereotype, unrelated) triples over :func:`editor_tokenizer`'s words;
    with ``bias_types``, sample ``i`` has type ``bias_types[i % len(bias_types)]`` (else none)."""
    out = []
    for i in range(n):
        group = GROUPS[i % len(GROUPS)]
        stereo, anti = ROLES[i % len(ROLES)]
        if i % 2:
            stereo, anti = anti, stereo
        out.append(EditSample(f"{group} is a {stereo} .", f"{group} is a {anti} .",
                              f"{group} is a {UNRELATED[i % len(UNRELATED)]} .",
                              bias_type=bias_types[i % len(bias_types)] if bias_types else None))
    return out


STEREOSET_ROW = {
    "id": "x1", "target": "nurse", "bias_type": "gender", "context": "The nurse was BLANK.",
    "sentences": [
        {"sentence": "The nurse was kind.", "id": "s1", "gold_label": "stereotype"},
        {"sentence": "The nurse was rude.", "id": "s2", "gold_label": "anti-stereotype"},
        {"sentence": "The nurse was purple.", "id": "s3", "gold_label": "unrelated"},
    ],
}
"""One well-formed row of StereoSet's original schema (a user's file); copy it before changing it."""


def stereoset_item(item_id: str, target: str, stereotype: str, anti_stereotype: str, unrelated: str | None = None,
                   bias_type: str = "gender", context: str = "", words: Sequence[str] = ("", "", "")) -> StereoSetItem:
    """A StereoSet item; ``unrelated`` defaults to the stereotype with ``target`` replaced by ``the``."""
    unrelated = stereotype.replace(target, "the") if unrelated is None else unrelated
    return StereoSetItem(item_id, target, bias_type, context, stereotype, anti_stereotype, unrelated, *words)


def stereoset_items(n: int = 16) -> list[StereoSetItem]:
    """The triples of :func:`samples` as StereoSet items: target = the group, one bias type ("gender")."""
    items = []
    for i, sample in enumerate(samples(n)):
        group = GROUPS[i % len(GROUPS)]
        words = [sentence.split()[3] for sentence in (sample.stereotype, sample.anti_stereotype, sample.unrelated)]
        items.append(stereoset_item(f"tiny-{i}", group, sample.stereotype, sample.anti_stereotype, sample.unrelated,
                                    context=f"{group} is a BLANK .", words=words))
    return items


# ----- models ----------------------------------------------------------------------------------------------
VOCAB = 128
_LLAMA_LIKE = {"num_hidden_layers": 4, "hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 2,
               "num_key_value_heads": 1, "vocab_size": VOCAB, "max_position_embeddings": 64, "bos_token_id": 1,
               "eos_token_id": 2}
ARCHITECTURES: dict[str, tuple[type[PretrainedConfig], dict]] = {
    "gpt2": (GPT2Config, {"n_layer": 4, "n_embd": 32, "n_head": 2, "n_positions": 64, "vocab_size": VOCAB,
                          "bos_token_id": 1, "eos_token_id": 1}),
    "llama": (LlamaConfig, {**_LLAMA_LIKE, "pad_token_id": 0}),
    "gemma": (GemmaConfig, {**_LLAMA_LIKE, "head_dim": 16, "pad_token_id": 0}),
    "gemma3_text": (Gemma3TextConfig, {**_LLAMA_LIKE, "head_dim": 16, "query_pre_attn_scalar": 16,
                                       "sliding_window": 16, "pad_token_id": 0}),
    "qwen2": (Qwen2Config, _LLAMA_LIKE),
    "gpt_neox": (GPTNeoXConfig, {key: value for key, value in _LLAMA_LIKE.items() if key != "num_key_value_heads"}),
    "opt": (OPTConfig, {"num_hidden_layers": 4, "hidden_size": 32, "ffn_dim": 48, "num_attention_heads": 2,
                        "word_embed_proj_dim": 32, "vocab_size": VOCAB, "max_position_embeddings": 64,
                        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}),
    "gptj": (GPTJConfig, {"n_layer": 4, "n_embd": 32, "n_head": 2, "rotary_dim": 4, "n_positions": 64,
                          "vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2}),
    # blocks that return a tuple led by the hidden states (the model loop reads outputs[0])
    "falcon": (FalconConfig, {"num_hidden_layers": 4, "hidden_size": 32, "num_attention_heads": 2,
                              "vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2}),
    "bloom": (BloomConfig, {"n_layer": 4, "hidden_size": 32, "n_head": 2, "vocab_size": VOCAB, "bos_token_id": 1,
                            "eos_token_id": 2}),
}
"""model_type -> (config class, the default size's config)."""
TUNER_ARCHITECTURES = ("gpt2", "llama", "gemma", "qwen2", "gpt_neox", "opt", "falcon", "bloom")
"""The architectures the tuner tests run on."""
EXPECTED_TARGETS = {
    "gpt2": [f"transformer.h.{i}.mlp.c_proj" for i in (1, 2, 3)],
    "llama": [f"model.layers.{i}.mlp.down_proj" for i in (1, 2, 3)],
    "gemma": [f"model.layers.{i}.mlp.down_proj" for i in (1, 2, 3)],
    "qwen2": [f"model.layers.{i}.mlp.down_proj" for i in (1, 2, 3)],
    "gpt_neox": [f"gpt_neox.layers.{i}.mlp.dense_4h_to_h" for i in (1, 2, 3)],
    "opt": [f"model.decoder.layers.{i}.fc2" for i in (1, 2, 3)],
    "falcon": [f"transformer.h.{i}.mlp.dense_4h_to_h" for i in (1, 2, 3)],
    "bloom": [f"transformer.h.{i}.mlp.dense_4h_to_h" for i in (1, 2, 3)],
}
"""model_type -> the names the default BiasEdit targets must have at the default size (last 3 of 4 blocks)."""
_PEER = {"num_hidden_layers": 2, "hidden_size": 16, "intermediate_size": 24, "vocab_size": 96}
_WORD_IDS = {"vocab_size": len(WORDS) + 2, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
SIZES: dict[str, dict[str, dict]] = {
    "default": {},
    "editor": {
        "gpt2": {"n_layer": 3, "n_embd": 16, "n_inner": 24, "vocab_size": 40, "bos_token_id": 2, "eos_token_id": 2},
        "llama": {"num_hidden_layers": 2, "hidden_size": 16, "intermediate_size": 24, "vocab_size": 40,
                  "bos_token_id": 2, "eos_token_id": 2, "pad_token_id": 1},
        "falcon": {"num_hidden_layers": 3, "hidden_size": 16, "vocab_size": 40, "bos_token_id": 2, "eos_token_id": 2},
        "bloom": {"n_layer": 3, "hidden_size": 16, "vocab_size": 40, "bos_token_id": 2, "eos_token_id": 2},
        "opt": {"num_hidden_layers": 3, "hidden_size": 16, "ffn_dim": 24, "word_embed_proj_dim": 16,
                "vocab_size": 40, "bos_token_id": 2, "eos_token_id": 2, "pad_token_id": 1},
    },
    "words": {
        "gpt2": {"n_layer": 3, "n_embd": 16, "n_positions": 32, **_WORD_IDS},
        "llama": {"num_hidden_layers": 2, "hidden_size": 16, "intermediate_size": 32, "num_key_value_heads": 2,
                  "max_position_embeddings": 32, **_WORD_IDS},
        "opt": {"num_hidden_layers": 3, "hidden_size": 16, "ffn_dim": 32, "word_embed_proj_dim": 16,
                "max_position_embeddings": 32, **_WORD_IDS},
    },
    "peer": {  # the stand-ins for the Hub models of peft's own decoder tests (tests_peer/tiny_decoders.py)
        "gpt2": {"n_layer": 2, "n_embd": 16, "vocab_size": 96, "eos_token_id": 2},
        "gptj": {"n_layer": 2, "n_embd": 16, "vocab_size": 96},
        "llama": _PEER,
        "qwen2": _PEER,
        "gemma3_text": {**_PEER, "head_dim": 8, "query_pre_attn_scalar": 8},
        "opt": {"num_hidden_layers": 2, "hidden_size": 16, "ffn_dim": 24, "word_embed_proj_dim": 16, "vocab_size": 96},
    },
}
"""size -> model_type -> what that size changes in the default config."""


def tiny_config(architecture: str = "gpt2", size: str = "default", **config) -> PretrainedConfig:
    """The config of a tiny ``architecture`` model of ``size`` (:data:`SIZES`), with ``config`` on top."""
    config_class, defaults = ARCHITECTURES[architecture]
    return config_class(**{**defaults, **SIZES[size].get(architecture, {}), **config})


def tiny_model(architecture: str = "gpt2", seed: int = 0, dtype: torch.dtype = torch.float32, size: str = "default",
               **config) -> torch.nn.Module:
    """A randomly initialised tiny causal LM (:func:`tiny_config`) in eval mode (dropout off)."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(architecture, size, **config)).to(dtype).eval()


def peft_model(architecture: str = "gpt2", seed: int = 0, dtype: torch.dtype = torch.float32,
               model_config: dict | None = None, **biasedit):
    """An ``"editor"``-size :func:`tiny_model` with a BiasEdit adapter (``BiasEditConfig(**biasedit)``), by default
    on the MLP output projections of the last 2 blocks."""
    biasedit.setdefault("num_edit_layers", 2)
    base = tiny_model(architecture, seed, dtype, size="editor", **(model_config or {}))
    return get_peft_model(base, BiasEditConfig(**biasedit))


def trained_editor(output_dir: Path, steps: int = 3):
    """``(peft_model(), editor)``: a rank-8 editor meta-trained for ``steps`` steps on :func:`samples` (12 of them,
    4 per edit, no validation, no calibration); its folder is ``output_dir``."""
    from biasedit_peft.editor import BiasEditor, BiasEditTrainer, BiasEditTrainingArguments

    model = peft_model()
    editor = BiasEditor.for_model(model, rank=8, lr=1e-2)
    args = BiasEditTrainingArguments(output_dir=str(output_dir), n_edits=4, batch_size=2, meta_lr=1e-2,
                                     loc_coef=1.0, max_steps=steps, progress=False, calibrate=False)
    BiasEditTrainer(model, editor, args, samples(12), None, tokenizer=editor_tokenizer()).train()
    return model, editor


def saved_editor_with_unit_statistics(model, folder: Path, rank: int = 4):
    """An untrained editor for ``model`` whose normalisers hold unit statistics (mean 0, variance 1 over 10 rows),
    standing in for meta-training, saved to ``folder``."""
    from biasedit_peft.editor import BiasEditor

    editor = BiasEditor.for_model(model, rank=rank)
    for net in editor.nets.values():
        width = net.normalizer.mean.shape
        net.normalizer.merge(torch.tensor(10.0), torch.zeros(width), torch.full(width, 9.0))
    editor.save_pretrained(folder)
    return editor


def save_word_model(folder: Path, architecture: str = "gpt2", seed: int = 0, **config) -> Path:
    """A ``"words"``-size :func:`tiny_model` saved with :func:`words_tokenizer` to ``folder``."""
    tiny_model(architecture, seed, size="words", **config).save_pretrained(folder)
    words_tokenizer().save_pretrained(folder)
    return folder


def save_sentence_model(folder: Path, sentences: Sequence[str], seed: int = 0, **config) -> Path:
    """A GPT-2 over the words of ``sentences`` (``[UNK]`` and ``<|endoftext|>`` as BOS / EOS first, no pad token),
    saved with its tokenizer to ``folder``; ``config`` sets the model's size."""
    tokenizer = word_tokenizer(ranked_words(sentences), ("[UNK]", EOT), pad=None)
    tiny_model("gpt2", seed, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, **config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# ----- scripts ---------------------------------------------------------------------------------------------
def script_module(name: str):
    """The module of ``scripts/NAME.py`` (not a package), loaded from its file."""
    scripts = Path(__file__).resolve().parents[1] / "scripts"
    if str(scripts) not in sys.path:  # as ``python scripts/NAME.py`` does, for the scripts' shared helpers
        sys.path.insert(0, str(scripts))
    path = scripts / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # as importing it would (a dataclass of the script looks its module up there)
    spec.loader.exec_module(module)
    return module


# ----- tensors ---------------------------------------------------------------------------------------------
def token_ids(batch: int = 2, length: int = 9, seed: int = 1) -> torch.Tensor:
    """Random token ids ``[batch, length]`` of a default-size model, avoiding the special ids 0..2."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


def random_low_rank(shape: tuple[int, int], rank: int, scale: float, generator: torch.Generator):
    """Factors ``(A [rows, rank], B [rank, cols])`` whose product has entries of size about ``scale``."""
    first = torch.randn(shape[0], rank, generator=generator)
    second = torch.randn(rank, shape[1], generator=generator) * scale / rank**0.5
    return first, second
