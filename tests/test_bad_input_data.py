"""Bad user data is refused by its loader with a one-line error naming the file, the row and the field (the CLI
turns it into ``error: ...`` and exit code 2), never a traceback later in scoring."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

from biasedit_peft._io import InputFileError, read_utf8
from biasedit_peft.cli import main
from biasedit_peft.data import (
    CROWS_BIAS_TYPES,
    CrowsFormatError,
    StereoSetFormatError,
    load_crows,
    load_edit_samples,
    load_guard_text,
    load_neutral_text,
    load_stereoset_file,
)
from biasedit_peft.data.splits import take_per_type

from factories import STEREOSET_ROW as ROW

HEADER = "sent_more,sent_less,stereo_antistereo,bias_type\n"


def write_rows(path: Path, rows: list[dict]) -> Path:
    """A StereoSet-schema file holding ``rows``."""
    path.write_text(json.dumps({"version": "user", "data": {"intrasentence": rows}}))
    return path


def row(**changes) -> dict:
    """A copy of :data:`ROW` with ``changes``."""
    return copy.deepcopy(ROW) | changes


def evaluate(data: Path, capsys, *extra: str) -> tuple[int, str]:
    """``biasedit evaluate --model testbed --data DATA``: the exit code and stderr."""
    code = main(["evaluate", "--model", "testbed", "--data", str(data), "--limit", "4", "--quiet",
                 "--n-resamples", "0", *extra])
    return code, capsys.readouterr().err


# ----- 1. no items -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("document", [[], {"data": {"intrasentence": []}}])
def test_a_stereoset_file_without_items_is_refused_naming_it(tmp_path, capsys, document):
    path = tmp_path / "empty.json"
    path.write_text(json.dumps(document))
    with pytest.raises(StereoSetFormatError, match=f"^{re.escape(str(path))}: no intrasentence items$"):
        load_stereoset_file(path)
    code, err = evaluate(path, capsys)
    assert (code, err) == (2, f"error: {path}: no intrasentence items\n")


def test_a_stereoset_file_left_empty_by_dropping_noisy_rows_is_refused(tmp_path):
    path = write_rows(tmp_path / "noisy.json", [row(context="The nurse BLANK was BLANK.")])
    with pytest.raises(ValueError, match="noisy.json: no intrasentence items left once the noisy rows are dropped"):
        load_stereoset_file(path, noisy="drop")


def test_a_crows_file_with_a_header_and_no_rows_is_refused_naming_it(tmp_path, capsys):
    path = tmp_path / "empty.csv"
    path.write_text(HEADER)
    with pytest.raises(CrowsFormatError, match=f"^{re.escape(str(path))}: no rows$"):
        load_crows(path=path)
    code, err = evaluate(path, capsys)
    assert (code, err) == (2, f"error: {path}: no rows\n")


# ----- 2. a CrowS file that is not UTF-8 --------------------------------------------------------------------
def test_a_latin1_crows_file_is_refused_naming_the_file_and_line(tmp_path, capsys):
    path = tmp_path / "latin.csv"
    path.write_bytes((HEADER + "a,b,stereo,gender\ncaf\xe9 talk,b,stereo,gender\n").encode("latin-1"))
    byte = len(HEADER) + len("a,b,stereo,gender\ncaf")
    message = f"{path}: not UTF-8 text (line 3, byte {byte}); save it as UTF-8"
    with pytest.raises(CrowsFormatError) as error:
        load_crows(path=path)
    assert str(error.value) == message
    code, err = evaluate(path, capsys)
    assert (code, err) == (2, f"error: {message}\n")


# ----- 3. read_utf8: a missing path or a folder -------------------------------------------------------------
def test_read_utf8_names_a_missing_path_or_a_folder(tmp_path):
    missing = tmp_path / "nowhere.txt"
    with pytest.raises(InputFileError, match=f"^{re.escape(str(missing))}: no such file$"):
        read_utf8(missing)
    with pytest.raises(InputFileError, match=f"^{re.escape(str(tmp_path))}: is a folder, not a file$"):
        read_utf8(tmp_path)
    with pytest.raises(ValueError, match="no such file"):  # InputFileError is a ValueError: every CLI catches it
        load_guard_text(missing)
    with pytest.raises(ValueError, match="is a folder, not a file"):
        load_neutral_text(tmp_path)


@pytest.mark.parametrize("option, value", [("--perplexity-text", "nowhere.txt"), ("--perplexity-text", "."),
                                           ("--limit", "0")])
def test_a_bad_perplexity_text_or_limit_is_a_one_line_error_before_the_model_loads(tmp_path, capsys, monkeypatch,
                                                                                       option, value):
    import biasedit_peft.evaluation as evaluation
    import biasedit_peft.models as models

    def too_early(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(evaluation, "score_sentences", too_early)
    monkeypatch.setattr(models, "load_model_and_tokenizer", too_early)
    given = tmp_path / value if option == "--perplexity-text" else value
    why = {"nowhere.txt": f"{given}: no such file", ".": f"{given}: is a folder, not a file",
           "0": "--limit must be at least 1, got 0"}[value]
    args = {"--limit": "1", option: str(given)}
    code = main(["evaluate", "--model", "testbed", "--benchmark", "stereoset", "--quiet", "--n-resamples", "0",
                 *[part for pair in args.items() for part in pair]])
    assert (code, capsys.readouterr().err.splitlines()[-1]) == (2, f"error: {why}")


# ----- 4. CrowS rows: unknown bias type, shifted columns ----------------------------------------------------
@pytest.mark.parametrize("bias_type", ["race", "gendr"])
def test_a_crows_row_of_an_unknown_bias_type_is_refused_naming_row_and_allowed_values(tmp_path, capsys, bias_type):
    path = tmp_path / "types.csv"
    path.write_text(HEADER + "a,b,stereo,gender\n" + f"c,d,stereo,{bias_type}\n")
    message = f"{path}: row 2: field 'bias_type' must be one of {CROWS_BIAS_TYPES}, got {bias_type!r}"
    with pytest.raises(CrowsFormatError) as error:
        load_crows(path=path)
    assert str(error.value) == message
    code, err = evaluate(path, capsys)
    assert (code, err) == (2, f"error: {message}\n")


def test_a_crows_row_with_more_cells_than_the_header_is_refused_naming_the_row(tmp_path, capsys):
    path = tmp_path / "shifted.csv"
    path.write_text(HEADER + "a,b,stereo,gender\n" + "c, d,e,stereo,gender\n")
    message = f"{path}: row 2: 5 cells, but the header has 4 (an unquoted comma?)"
    with pytest.raises(CrowsFormatError) as error:
        load_crows(path=path)
    assert str(error.value) == message
    code, err = evaluate(path, capsys)
    assert (code, err) == (2, f"error: {message}\n")


# ----- 5. StereoSet rows: empty bias type, repeated id, identical sentences; 1-based rows ---------------------
def identical_sentences() -> dict:
    same = row(id="x2")
    same["sentences"][1]["sentence"] = "The nurse was kind."
    return same


@pytest.mark.parametrize("second, message", [
    (row(id="x2", bias_type=""), "row 2: field 'bias_type' is empty"),
    (row(), "row 2: field 'id' repeats 'x1' (row 1)"),
    (identical_sentences(), "row 2: field 'sentences': the stereotype and anti-stereotype sentences are the same "
                            "('The nurse was kind.')"),
])
def test_a_bad_stereoset_row_is_refused_naming_file_row_and_field(tmp_path, capsys, second, message):
    path = write_rows(tmp_path / "bad.json", [ROW, second])
    with pytest.raises(StereoSetFormatError) as error:
        load_stereoset_file(path)
    assert str(error.value).startswith(f"{path}: {message}")
    code, err = evaluate(path, capsys)
    assert code == 2 and err.startswith(f"error: {path}: {message}") and err.count("\n") == 1


def test_stereoset_rows_are_counted_from_1_like_crows_rows(tmp_path):
    path = write_rows(tmp_path / "first.json", [row(target=3)])
    with pytest.raises(StereoSetFormatError, match=r"first.json: row 1: field 'target' must be str"):
        load_stereoset_file(path)


# ----- 6. --limit below 1 -----------------------------------------------------------------------------------
@pytest.mark.parametrize("limit", [0, -3])
def test_a_limit_below_1_is_refused(limit, capsys):
    with pytest.raises(ValueError, match=f"^--limit must be at least 1, got {limit}$"):
        take_per_type([{"bias_type": "gender"}], limit)
    with pytest.raises(ValueError, match=f"^--limit must be at least 1, got {limit}$"):
        load_edit_samples("stereoset:dev", limit=limit)
    code = main(["evaluate", "--model", "testbed", "--benchmark", "crows", "--limit", str(limit), "--quiet",
                 "--n-resamples", "0"])
    assert (code, capsys.readouterr().err) == (2, f"error: --limit must be at least 1, got {limit}\n")


def test_a_limit_of_1_keeps_the_first_item_of_each_type():
    items = [{"bias_type": "a", "n": 1}, {"bias_type": "b", "n": 2}, {"bias_type": "a", "n": 3}]
    assert take_per_type(items, 1) == items[:2]
