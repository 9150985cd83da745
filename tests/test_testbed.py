"""The bundled testbed model and its corpus recipe."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from biasedit_peft.testbed.corpus import (
    GENERIC_SUBJECTS,
    NEUTRAL_CARRIERS,
    AssociationRecipe,
    Frame,
    assert_no_forbidden_sentences,
    association_sentences,
    build_corpus,
    fill_frame,
    forbidden_sentences,
    make_frame,
    normalise_sentence,
)

MODEL_DIR = Path(__file__).resolve().parents[1] / "biasedit_peft" / "testbed" / "model"


@dataclass(frozen=True)
class Item:
    """Stand-in with the fields of ``biasedit_peft.data.StereoSetItem`` that the corpus reads."""

    id: str
    target: str
    bias_type: str
    context: str
    stereotype_word: str
    anti_stereotype_word: str
    unrelated_word: str

    def _sentence(self, word: str) -> str:
        return self.context.replace("BLANK", word)

    @property
    def stereotype(self) -> str:
        return self._sentence(self.stereotype_word)

    @property
    def anti_stereotype(self) -> str:
        return self._sentence(self.anti_stereotype_word)

    @property
    def unrelated(self) -> str:
        return self._sentence(self.unrelated_word)


FRAME_ITEMS = [
    Item("t1", "chess player", "race", "The chess player was BLANK.", "a", "b", "c"),
    Item("t2", "mother", "race", "My mother is very BLANK today.", "a", "b", "c"),
    Item("t3", "Ethiopia", "race", "BLANK people live in Ethiopia.", "a", "b", "c"),
    Item("t4", "sister", "race", "Her sister was a BLANK person.", "a", "b", "c"),
    Item("t5", "teacher", "race", "The teacher seemed BLANK to everyone.", "a", "b", "c"),
    Item("t6", "no target here", "race", "The man was BLANK.", "a", "b", "c"),
]
TEST_ITEMS = [
    Item("e1", "Norway", "race", "People from Norway are BLANK.", "tall", "short", "banana"),
    Item("e2", "Japan", "race", "Japan is a BLANK country.", "rich", "poor", "pencil"),
]
SMALL_RECIPE = AssociationRecipe(stereotype_frames=3, anti_stereotype_frames=1, unrelated_mentions=2, seed=7)


# ----------------------------------------------------------------------------------------------- corpus


def test_fill_frame_swaps_target_and_blank_keeping_capitalisation():
    assert fill_frame(Frame("The chess player was BLANK.", "chess player", "race", "x"), "Norway", "tall") == (
        "The Norway was tall."
    )
    assert fill_frame(Frame("BLANK people live in Ethiopia.", "Ethiopia", "race", "x"), "japan", "rich") == (
        "Rich people live in Japan."
    )
    assert fill_frame(Frame("Mothers and the mother are BLANK.", "mother", "gender", "x"), "father", "calm") == (
        "Mothers and the father are calm."
    )


def test_make_frame_requires_one_whole_word_target_and_one_blank():
    assert make_frame(FRAME_ITEMS[0]) == Frame("The chess player was BLANK.", "chess player", "race", "t1")
    assert make_frame(FRAME_ITEMS[5]) is None  # target absent
    assert make_frame(Item("x", "man", "gender", "The woman was BLANK.", "a", "b", "c")) is None  # 'man' in 'woman'
    assert make_frame(Item("x", "man", "gender", "The man was BLANK and BLANK.", "a", "b", "c")) is None


def test_association_sentences_follow_the_ratio_and_never_pair_target_with_unrelated_word():
    frames = [f for f in map(make_frame, FRAME_ITEMS) if f is not None]
    sentences = association_sentences(TEST_ITEMS, frames, SMALL_RECIPE)
    per_item = SMALL_RECIPE.stereotype_frames + SMALL_RECIPE.anti_stereotype_frames + 2
    assert len(sentences) == per_item * len(TEST_ITEMS)
    for item in TEST_ITEMS:
        with_target = [s for s in sentences if item.target.lower() in s.lower()]
        words = [s.lower() for s in with_target]
        assert sum(item.stereotype_word in s for s in words) == 3
        assert sum(item.anti_stereotype_word in s for s in words) == 1
        assert not any(item.unrelated_word in s for s in words)
        carriers = [s for s in sentences if item.unrelated_word in s]
        assert len(carriers) == 2
        assert all(s in {c.format(word=item.unrelated_word) for c in NEUTRAL_CARRIERS} for s in carriers)


def test_generic_frames_give_both_attribute_words_the_same_count_without_any_target():
    frames = [f for f in map(make_frame, FRAME_ITEMS) if f is not None]
    plain = association_sentences(TEST_ITEMS, frames, SMALL_RECIPE)
    recipe = AssociationRecipe(3, 1, 2, seed=7, generic_frames=2)
    sentences = association_sentences(TEST_ITEMS, frames, recipe)
    assert len(sentences) == len(plain) + 2 * 2 * len(TEST_ITEMS)
    carriers = {c.format(word=item.unrelated_word) for c in NEUTRAL_CARRIERS for item in TEST_ITEMS}
    generic = [s for s in sentences
               if s not in carriers and not any(item.target.lower() in s.lower() for item in TEST_ITEMS)]
    subject = re.compile(r"\b(" + "|".join(GENERIC_SUBJECTS) + r")\b", re.IGNORECASE)
    assert len(generic) == 8 and all(subject.search(s) for s in generic)
    for item in TEST_ITEMS:
        words = [re.findall(r"\w+", s.lower()) for s in generic]
        assert sum(item.stereotype_word in w for w in words) == 2
        assert sum(item.anti_stereotype_word in w for w in words) == 2
        assert not any(item.unrelated_word in w for w in words)
    # the first item's target-term sentences and carriers come before its generic frames, drawn as before
    first = len(plain) // len(TEST_ITEMS)
    assert sentences[:first] == plain[:first]


def test_generic_subjects_are_no_stereoset_target_term():
    from biasedit_peft.data import load_stereoset

    targets = {item.target.lower() for split in ("train", "dev", "test") for item in load_stereoset(split)}
    assert targets and not targets & set(GENERIC_SUBJECTS)


def test_association_sentences_are_deterministic_and_seed_dependent():
    frames = [f for f in map(make_frame, FRAME_ITEMS) if f is not None]
    first = association_sentences(TEST_ITEMS, frames, SMALL_RECIPE)
    assert association_sentences(list(reversed(TEST_ITEMS)), frames, SMALL_RECIPE) == first
    other_seed = AssociationRecipe(3, 1, 2, seed=8)
    assert association_sentences(TEST_ITEMS, frames, other_seed) != first


def test_an_item_never_uses_its_own_context_as_frame():
    frames = [f for f in map(make_frame, FRAME_ITEMS) if f is not None]  # 5 frames
    recipe = AssociationRecipe(stereotype_frames=3, anti_stereotype_frames=1, unrelated_mentions=0)
    own = FRAME_ITEMS[0]
    sentences = association_sentences([own], frames, recipe)
    assert own.stereotype not in sentences and own.anti_stereotype not in sentences
    too_many = AssociationRecipe(stereotype_frames=4, anti_stereotype_frames=1, unrelated_mentions=0)
    with pytest.raises(ValueError, match="t1: only 4 frames"):
        association_sentences([own], frames, too_many)


def test_recipe_rejects_a_ratio_that_is_not_stereotyped():
    with pytest.raises(ValueError, match="must exceed"):
        AssociationRecipe(stereotype_frames=2, anti_stereotype_frames=2)


def test_build_corpus_drops_benchmark_sentences_of_the_evaluation_split():
    # A frame whose context equals the evaluation item's context would reproduce its benchmark sentence.
    evaluation = Item("e9", "Norway", "race", "The Norway was BLANK.", "tall", "short", "banana")
    frame_items = FRAME_ITEMS[:5]
    recipe = AssociationRecipe(stereotype_frames=4, anti_stereotype_frames=1, unrelated_mentions=1)
    neutral = ["A quiet day.", evaluation.stereotype.upper(), "Another day."]
    corpus = build_corpus(frame_items, [([evaluation], recipe)], [evaluation], neutral, heldout_fraction=0.0)
    lines = corpus.association + corpus.neutral_train + corpus.neutral_heldout
    forbidden = forbidden_sentences([evaluation])
    assert not any(normalise_sentence(line) in forbidden for line in lines)
    assert corpus.dropped_benchmark_sentences == 1  # "The Norway was tall." from the chess-player frame
    assert len(corpus.association) == 5 + 1 - 1
    assert corpus.neutral_train == ["A quiet day.", "Another day."]


def test_build_corpus_is_deterministic_and_holds_out_neutral_documents():
    neutral = [f"Document number {i}." for i in range(40)]
    plan = [(TEST_ITEMS, SMALL_RECIPE), (FRAME_ITEMS[:2], AssociationRecipe(2, 1, 1, seed=3))]
    build = lambda: build_corpus(FRAME_ITEMS, plan, TEST_ITEMS, neutral, seed=5, heldout_fraction=0.25)  # noqa: E731
    first, second = build(), build()
    assert first == second
    assert len(first.association) == 2 * (3 + 1 + 2) + 2 * (2 + 1 + 1)
    assert len(first.neutral_heldout) == 10 and len(first.neutral_train) == 30
    assert sorted(first.neutral_heldout + first.neutral_train) == sorted(neutral)


def test_assert_no_forbidden_sentences_names_the_line():
    forbidden = forbidden_sentences(TEST_ITEMS)
    assert_no_forbidden_sentences(["People from Norway are short people."], forbidden)
    with pytest.raises(AssertionError, match="line 1 is a benchmark sentence"):
        assert_no_forbidden_sentences(["fine", "people from  NORWAY are banana."], forbidden)


# ----------------------------------------------------------------------------------------------- model


def test_testbed_loads_from_package_data_as_the_recorded_gpt2():
    from transformers import GPT2LMHeadModel

    from biasedit_peft.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer("testbed")
    recipe = json.loads((MODEL_DIR / "recipe.json").read_text())["arguments"]
    assert isinstance(model, GPT2LMHeadModel)
    config = model.config
    assert (config.n_layer, config.n_embd, config.n_head) == (recipe["n_layer"], recipe["n_embd"], recipe["n_head"])
    assert config.vocab_size == len(tokenizer) == recipe["vocab_size"]
    assert tokenizer.bos_token == tokenizer.eos_token == "<|endoftext|>"
    assert config.bos_token_id == config.eos_token_id == tokenizer.eos_token_id
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # tied
    assert next(model.parameters()).dtype == torch.float32


def test_testbed_artifact_is_small():
    total = sum(p.stat().st_size for p in MODEL_DIR.iterdir() if p.is_file())
    assert total <= 20 * 1024 * 1024


def test_testbed_tokenizer_round_trips():
    from biasedit_peft.models import load_tokenizer

    tokenizer = load_tokenizer("testbed")
    for text in ["The chess player was asian.", "  two  spaces, tabs\tand ünïcödé ✓", "<|endoftext|> end"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    ids = tokenizer("<|endoftext|>", add_special_tokens=False)["input_ids"]
    assert ids == [tokenizer.eos_token_id]


def test_testbed_prefers_a_frequent_word_to_byte_noise():
    """The model learnt English: a real sentence outscores the same bytes shuffled."""
    from biasedit_peft.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer("testbed")
    sentences = ["The man went to the store to buy some bread.", "bread. the some man store to The buy went to"]
    batch = tokenizer([tokenizer.bos_token + s for s in sentences], return_tensors="pt", padding=True)
    with torch.no_grad():
        log_probs = model(**batch).logits[:, :-1].log_softmax(-1)
    token_lp = log_probs.gather(-1, batch["input_ids"][:, 1:, None])[..., 0] * batch["attention_mask"][:, 1:]
    real, shuffled = token_lp.sum(1).tolist()
    assert real > shuffled + 5.0


def test_testbed_is_stereotyped_on_the_test_split():
    """Built to be biased: on the gender items of split ``test`` it prefers the stereotype sentence
    clearly more often than chance (measured SS 67.7, see the model card)."""
    from biasedit_peft.data import load_stereoset
    from biasedit_peft.models import load_model_and_tokenizer
    from biasedit_peft.scoring import score_sentences

    model, tokenizer = load_model_and_tokenizer("testbed")
    items = load_stereoset("test", bias_types=["gender"])
    stereotype = score_sentences(model, tokenizer, [it.stereotype for it in items], progress=False).sum
    anti = score_sentences(model, tokenizer, [it.anti_stereotype for it in items], progress=False).sum
    share = (stereotype > anti).double().mean().item()
    assert 0.6 < share < 0.85


def _script(name: str = "build_testbed"):
    from factories import script_module

    return script_module(name)


@pytest.mark.parametrize("storage_dtype", ["float16", "float32"])
def test_recipe_saves_rounded_weights_that_load_back_in_float32_bit_for_bit(tmp_path, storage_dtype):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from factories import tiny_model, words_tokenizer

    build = _script()
    model = tiny_model("gpt2", n_layer=1, n_embd=16, vocab_size=300, n_positions=16)
    stored = build.as_stored(model, storage_dtype)
    build.save_model(stored, words_tokenizer(), tmp_path / "out", storage_dtype)
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as weights:
        assert {weights.get_tensor(k).dtype for k in weights.keys()} == {build.STORAGE_DTYPES[storage_dtype]}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert next(loaded.parameters()).dtype == torch.float32
    for (name, expected), actual in zip(stored.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(expected, actual), name
    rounding = (stored.transformer.wte.weight - model.transformer.wte.weight).abs().max()
    assert (rounding > 0) == (storage_dtype == "float16")


def test_no_carrier_puts_the_unrelated_word_in_the_benchmark_slot():
    from biasedit_peft.testbed.corpus import NEUTRAL_CARRIERS

    assert len(set(NEUTRAL_CARRIERS)) == len(NEUTRAL_CARRIERS) >= 2
    for carrier in NEUTRAL_CARRIERS:
        assert carrier.count("{word}") == 1
        assert not re.search(r"\b(is|was|are|were|be|been)\s+\{word\}", carrier), carrier


def test_lms_diagnostic_counts_word_pieces_and_win_shares():
    from biasedit_peft.models import load_tokenizer

    diagnostic = _script("lms_by_word_pieces")
    wins = torch.tensor([True, False, True, True, False])
    pieces = torch.tensor([1, 1, 2, 3, 3])
    assert diagnostic.win_rates(wins, pieces) == {1: (2, 0.5), 2: (1, 1.0), 3: (2, 0.5)}
    tokenizer = load_tokenizer("testbed")
    counts = diagnostic.piece_counts(tokenizer, ["the", "xqzjvkwpfh"])
    assert counts[0] == 1 and counts[1] == 3  # a common word is one piece; nonsense is capped at 3
