"""Bundled data: counts, split determinism and leakage, noisy rows, malformed files, CrowS, swaps."""

from __future__ import annotations

import copy
import gzip
import json
from collections import Counter

import pytest

from biasedit_peft.data import (
    BIAS_TYPES,
    CROWS_BIAS_TYPES,
    CrowsFormatError,
    StereoSetFormatError,
    describe_edit_samples,
    gender_swapped,
    load_crows,
    load_edit_samples,
    load_neutral_text,
    load_split_ids,
    load_stereoset,
    load_stereoset_file,
    noise_report,
    split_calibration,
    split_train_dev,
    swap_gender,
)
from biasedit_peft.data.resources import STEREOSET_FILES, resource_path
from biasedit_peft.data.stereoset import context_noise, parse_item

from factories import STEREOSET_ROW as ROW

EXPECTED_COUNTS = {
    "test": {"gender": 255, "race": 962, "religion": 79, "profession": 810},
    "train": {"gender": 695, "race": 2651, "religion": 225},
    "dev": {"gender": 76, "race": 325, "religion": 22},
}



def write_rows(path, rows):
    path.write_text(json.dumps({"version": "user", "data": {"intrasentence": rows}}))
    return path


@pytest.mark.parametrize("split", sorted(EXPECTED_COUNTS))
def test_counts_per_split(split):
    assert Counter(item.bias_type for item in load_stereoset(split)) == EXPECTED_COUNTS[split]


def test_split_is_8_to_1_and_recomputes_deterministically():
    with gzip.open(resource_path(STEREOSET_FILES["test"]), "rt", encoding="utf-8") as handle:
        rows = json.load(handle)["data"]["intrasentence"]
    items = [parse_item(row, f"row {i}") for i, row in enumerate(rows)]
    assert split_train_dev(items) == load_split_ids()
    assert split_train_dev(list(reversed(items)))["dev"] == list(reversed(load_split_ids()["dev"]))
    for bias_type in BIAS_TYPES:
        train, dev = EXPECTED_COUNTS["train"][bias_type], EXPECTED_COUNTS["dev"][bias_type]
        assert 6 <= train / dev <= 11  # 8:1 up to whole target groups


def test_no_leakage_between_splits():
    splits = {name: load_stereoset(name) for name in EXPECTED_COUNTS}
    ids = {name: {item.id for item in items} for name, items in splits.items()}
    sentences = {name: {s for i in items for s in (i.stereotype, i.anti_stereotype, i.unrelated)}
                 for name, items in splits.items()}
    targets = {name: {(i.bias_type, i.target) for i in items} for name, items in splits.items()}
    for a, b in (("train", "dev"), ("train", "test"), ("dev", "test")):
        assert not ids[a] & ids[b]
        assert not targets[a] & targets[b], f"a target term is in both {a} and {b}"
    assert not sentences["test"] & (sentences["train"] | sentences["dev"])


def test_train_carves_into_fit_and_calib_by_target_term():
    """``train-fit`` + ``train-calib`` is ``train`` (file order kept), 8:1 per bias type up to whole target groups,
    no target term on both sides (and, as part of ``train``, none of ``dev``'s or ``test``'s)."""
    train, fit, calib = (load_stereoset(name) for name in ("train", "train-fit", "train-calib"))
    calib_ids = {item.id for item in calib}
    assert [item.id for item in fit] == [item.id for item in train if item.id not in calib_ids]
    assert [item.id for item in calib] == [item.id for item in train if item.id in calib_ids]
    assert Counter(item.bias_type for item in calib) == {"gender": 78, "race": 289, "religion": 27}
    for bias_type in BIAS_TYPES:
        fit_terms = {i.target for i in fit if i.bias_type == bias_type}
        calib_terms = {i.target for i in calib if i.bias_type == bias_type}
        assert calib_terms and not fit_terms & calib_terms
        n_fit, n_calib = (sum(i.bias_type == bias_type for i in part) for part in (fit, calib))
        assert 6 <= n_fit / n_calib <= 11
    assert {item.target for item in calib if item.bias_type != "race"} == {"man", "girl", "husband", "church"}
    assert set(split_calibration(list(reversed(train)))["train-calib"]) == calib_ids  # not the file order's doing
    assert load_edit_samples("stereoset:train-calib", ["religion"]) == [i for i in calib if i.bias_type == "religion"]


def test_roles_from_gold_label_not_position(tmp_path):
    row = copy.deepcopy(ROW)
    row["sentences"] = row["sentences"][::-1]  # unrelated, anti, stereo
    (item,) = load_stereoset_file(write_rows(tmp_path / "s.json", [row]))
    assert (item.stereotype, item.anti_stereotype, item.unrelated) == (
        "The nurse was kind.", "The nurse was rude.", "The nurse was purple.")
    assert (item.stereotype_word, item.anti_stereotype_word, item.unrelated_word) == ("kind", "rude", "purple")
    assert item.noise == ""


def test_bundled_fill_words_rebuild_the_sentences():
    for item in load_stereoset("test"):
        if item.noise:
            continue
        for role, word in (("stereotype", item.stereotype_word), ("unrelated", item.unrelated_word)):
            assert item.context.replace("BLANK", word).lower() == item.sentence(role).lower()


@pytest.mark.parametrize("context, rule", [
    ("The nurse was BLANK.", ""),
    ('He said "BLANK", twice.', ""),
    ("Nurses are BLANK and BLANK.", "multiple_blanks"),
    ("A nurse is as BLANK as a Blank.", "multiple_blanks"),
    ("The nurse BLANKed.", "glued_blank"),
    ("Nurses are nice.BLANK", "glued_blank"),
    ("The nurse's BLANK's hat", "glued_blank"),
    ("The nurse was very`BLANK", "glued_blank"),
])
def test_noise_rules(context, rule):
    assert context_noise(context) == rule


def test_noisy_rows_are_kept_flagged_and_counted(tmp_path):
    glued = copy.deepcopy(ROW) | {"id": "x2", "context": "The nurse BLANKed."}
    glued["sentences"] = [s | {"sentence": s["sentence"].replace("was ", "")} for s in glued["sentences"]]
    unaligned = copy.deepcopy(ROW) | {"id": "x3", "context": "A doctor was BLANK."}
    path = write_rows(tmp_path / "noisy.json", [ROW, glued, unaligned])
    items = load_stereoset_file(path)
    assert [item.noise for item in items] == ["", "glued_blank", "unaligned"]
    assert items[1].stereotype_word == "kind"  # word-level diff fallback
    report = noise_report(items)
    assert (report.count, report.by_rule, report.ids) == (2, {"glued_blank": 1, "unaligned": 1}, ("x2", "x3"))
    assert [item.id for item in load_stereoset_file(path, noisy="drop")] == ["x1"]


def test_bundled_noisy_counts():
    assert noise_report(load_stereoset("test")).by_rule == {"glued_blank": 4, "multiple_blanks": 2}
    train_dev = load_stereoset("train") + load_stereoset("dev")
    assert noise_report(train_dev).count == 10  # plus 2 profession rows, not in train/dev
    assert Counter(i.bias_type for i in load_stereoset("test", noisy="drop")) == {
        "gender": 254, "race": 962, "religion": 76, "profession": 808}


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.pop("target"), "row 2: missing field 'target'"),
    (lambda r: r.update(context=3), "row 2: field 'context' must be str"),
    (lambda r: r["sentences"][1].update(gold_label="neutral"), r"row 2, sentences\[1\]: field 'gold_label'"),
    (lambda r: r["sentences"][2].update(gold_label="stereotype"), r"sentences\[2\]: field 'gold_label' repeats"),
    (lambda r: r["sentences"].pop(), "lacks gold_label \\['unrelated'\\]"),
    (lambda r: r["sentences"][0].update(sentence=" "), r"sentences\[0\]: field 'sentence' is empty"),
])
def test_malformed_file_errors_name_file_row_and_field(tmp_path, mutate, message):
    bad = copy.deepcopy(ROW)
    mutate(bad)
    path = write_rows(tmp_path / "bad.json", [ROW, bad])
    with pytest.raises(StereoSetFormatError, match=message) as error:
        load_stereoset_file(path)
    assert str(path) in str(error.value)


def test_not_json_and_wrong_top_level(tmp_path):
    (tmp_path / "a.json").write_text("{not json")
    with pytest.raises(StereoSetFormatError, match="a.json: not valid JSON"):
        load_stereoset_file(tmp_path / "a.json")
    (tmp_path / "b.json").write_text(json.dumps({"data": {"intersentence": []}}))
    with pytest.raises(StereoSetFormatError, match="data.intrasentence"):
        load_stereoset_file(tmp_path / "b.json")


def test_edit_samples_from_a_bundled_split_a_stereoset_file_or_jsonl(tmp_path):
    train = load_edit_samples("stereoset:train", ["religion"], limit=5)
    assert train == load_stereoset("train", bias_types=["religion"])[:5]
    assert len(load_edit_samples("stereoset:dev")) == 76 + 325 + 22  # every bias type of the split, no limit
    path = write_rows(tmp_path / "rows.json", [ROW, copy.deepcopy(ROW) | {"id": "x2", "bias_type": "race"}])
    assert [item.id for item in load_edit_samples(str(path), ["race"])] == ["x2"]
    lines = tmp_path / "samples.jsonl"
    first, second = ({"stereotype": "a", "anti_stereotype": "b", "unrelated": "c"},
                     {"stereotype": "d", "anti_stereotype": "e", "bias_type": "gender"})
    lines.write_text(json.dumps(first) + "\n\n" + json.dumps(second) + "\n")
    assert load_edit_samples(str(lines), ["race"]) == [first]  # bias types apply to lines that name one
    assert load_edit_samples(str(lines), limit=1) == [first, second]  # --limit: per bias type (none is one type)
    assert load_edit_samples(str(lines)) == [first, second]


def test_edit_sample_errors_name_the_spec_or_the_line(tmp_path):
    with pytest.raises(ValueError, match=r"'nowhere.jsonl': neither 'stereoset:SPLIT' nor an existing file"):
        load_edit_samples("nowhere.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"stereotype": "a", "anti_stereotype": "b"}\n\n{oops\n')
    with pytest.raises(ValueError, match=r"bad.jsonl: line 3 is not JSON"):
        load_edit_samples(str(bad))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=r"empty.jsonl: no samples"):
        load_edit_samples(str(empty))
    with pytest.raises(ValueError, match="--limit must be at least 1, got 0"):
        load_edit_samples("stereoset:train", limit=0)


def test_edit_samples_description_names_bias_types_only_for_stereoset_data():
    assert describe_edit_samples("stereoset:train", ["gender", "race"], 8) == (
        "stereoset:train (bias types gender, race; first 8 samples of each bias type)")
    assert describe_edit_samples("stereoset:dev", None, None) == "stereoset:dev (bias types gender, race, religion)"
    assert describe_edit_samples("my.jsonl", ["gender"], None) == "my.jsonl"
    assert describe_edit_samples("my.jsonl", ["gender"], 3) == "my.jsonl (first 3 samples of each bias type)"


def test_unknown_split_and_bias_type():
    with pytest.raises(ValueError, match="split"):
        load_stereoset("validation")
    with pytest.raises(ValueError, match="profession"):
        load_stereoset("train", ["profession"])


def test_crows_counts_and_user_file_errors(tmp_path):
    pairs = load_crows()
    assert len(pairs) == 1508
    assert Counter(p.bias_type for p in pairs)["race-color"] == 516
    assert {p.bias_type for p in pairs} == set(CROWS_BIAS_TYPES)
    assert Counter(p.direction for p in pairs) == {"stereo": 1290, "antistereo": 218}
    assert len(load_crows(["gender", "race", "religion"])) == 262 + 516 + 105
    bad = tmp_path / "crows.csv"
    bad.write_text("sent_more,sent_less,stereo_antistereo,bias_type\na,b,stereo,gender\nc,d,sideways,gender\n")
    with pytest.raises(CrowsFormatError, match="crows.csv: row 2: field 'stereo_antistereo'"):
        load_crows(path=bad)
    (tmp_path / "nohead.csv").write_text("sent_more,sent_less\na,b\n")
    with pytest.raises(CrowsFormatError, match="lacks field"):
        load_crows(path=tmp_path / "nohead.csv")


def test_gender_swap_words_case_and_roles():
    assert swap_gender("He told his Mother; the man's wife saw her.") == (
        "She told her Father; the woman's husband saw him.")
    assert swap_gender("Her brother met MR. Lee") == "His sister met MRS. Lee"
    assert swap_gender("manhole heroes") == "manhole heroes"  # whole words only
    items = load_stereoset("test", ["gender", "race"])
    swapped = gender_swapped(items)
    gender = [i for i in items if i.bias_type == "gender"]
    assert len(swapped) == len(gender) == 255
    mother = next(i for i, s in zip(gender, swapped) if i.target == "mother")
    twin = swapped[gender.index(mother)]
    assert twin.target == "father" and twin.id == mother.id + ":gender-swapped"
    assert twin.stereotype == swap_gender(mother.stereotype)
    assert twin.stereotype_word == swap_gender(mother.stereotype_word)


def test_neutral_text_is_bundled():
    paragraphs = load_neutral_text()
    assert len(paragraphs) >= 10 and all(len(p.split()) > 20 for p in paragraphs)
