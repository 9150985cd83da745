"""The one JSON writer (biasedit_peft._io): strict JSON, non-finite floats as null, atomic writes."""

from __future__ import annotations

import json
import math

import pytest
import torch

from biasedit_peft._io import json_ready, json_text, write_json


def test_json_ready_converts_containers_and_tensors_and_nulls_every_non_finite_float():
    document = {"a": math.nan, "b": [math.inf, 1.5, {"c": -math.inf}], "d": (2, "x"), "e": {"z", "y"},
                "t": torch.tensor([[1.0, 2.0]]), "n": None, "flag": True}
    assert json_ready(document) == {"a": None, "b": [None, 1.5, {"c": None}], "d": [2, "x"], "e": ["y", "z"],
                                    "t": [[1.0, 2.0]], "n": None, "flag": True}
    kept = json_ready(document, strict=False)
    assert math.isnan(kept["a"]) and kept["b"][0] == math.inf and kept["b"][2]["c"] == -math.inf


def test_json_ready_rounds_floats_only_when_asked():
    assert json_ready([1 / 3, 2, torch.tensor(2 / 3)], digits=4) == [0.3333, 2, 0.6667]
    assert json_ready([1 / 3]) == [1 / 3]
    assert json_ready([math.nan, 1 / 3], digits=2) == [None, 0.33]


def test_json_text_is_json_dumps_with_a_final_newline_for_finite_documents():
    document = {"b": [1, 2.5], "a": "é"}
    assert json_text(document) == json.dumps(document, indent=2) + "\n"
    assert json_text(document, indent=1) == json.dumps(document, indent=1) + "\n"
    assert json_text(document, indent=None) == '{"b": [1, 2.5], "a": "\\u00e9"}\n'


def test_written_documents_hold_no_nan_and_are_replaced_whole(tmp_path):
    document = {"a": math.nan, "b": [math.inf, 1.5, {"c": -math.inf}], "d": (2, "x")}
    path = write_json(tmp_path / "new" / "x.json", document)  # the folder is created
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": None, "b": [None, 1.5, {"c": None}], "d": [2, "x"]}
    assert text.endswith("}\n")
    assert not list(path.parent.glob(".*tmp"))  # the temporary file was renamed into place
    plain = tmp_path / "plain.txt"
    plain.write_text("")
    assert path.stat().st_mode == plain.stat().st_mode  # not the temporary file's private 0o600
    with pytest.raises(TypeError):
        write_json(path, {"a": object()})
    assert json.loads(path.read_text())["b"][1] == 1.5  # a failed write leaves the previous document


def test_not_strict_keeps_non_finite_floats_so_that_they_round_trip(tmp_path):
    path = write_json(tmp_path / "stage.json", {"a": math.nan, "b": [-math.inf, 0.1]}, strict=False)
    assert "NaN" in path.read_text() and "-Infinity" in path.read_text()
    stored = json.loads(path.read_text())
    assert math.isnan(stored["a"]) and stored["b"] == [-math.inf, 0.1]
