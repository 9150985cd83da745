"""``scripts/solve_precision.py`` (the figures of docs/method.md §5) on the bundled testbed model: 8 pairs,
small systems, one lambda. The real-model run is ``--model smollm2-135m`` (see the script's docstring)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from biasedit_peft.data import load_stereoset
from biasedit_peft.models import load_tokenizer
from biasedit_peft.scoring import encode_sentences

from factories import script_module

PAIRS, SIZES, RIDGE = 8, {"dual": 32, "primal": 64}, 1.0


def _script():
    return script_module("solve_precision")


@pytest.fixture(scope="module")
def script():
    return _script()


@pytest.fixture(scope="module")
def keys(script):
    return script.collect_keys("testbed", PAIRS)


@pytest.fixture(scope="module")
def document(script, keys):
    layers = {name: {"stats": script.key_stats(k, SIZES["dual"], SIZES["primal"]),
                     "cases": script.measure_layer(k, d_out, SIZES, [RIDGE], seed=0)}
              for name, (k, d_out) in keys.items()}
    return {"model": "testbed", "layers": layers}


def test_keys_are_the_default_targets_inputs_at_the_scored_positions(keys):
    items = load_stereoset("train")[:PAIRS]
    batch = encode_sentences(load_tokenizer("testbed"), [s for i in items for s in (i.stereotype, i.anti_stereotype)])
    assert list(keys) == [f"transformer.h.{block}.mlp.c_proj" for block in (1, 2, 3)]  # the last 3 blocks
    for k, d_out in keys.values():
        assert k.dtype == torch.float32 and k.shape == (int(batch.target_mask.sum()), 768) and d_out == 192
        assert torch.isfinite(k).all()


def test_key_stats_are_consistent(document, keys):
    for name, layer in document["layers"].items():
        stats, rows = layer["stats"], keys[name][0]
        assert stats["rows"] == len(rows) and 1 <= stats["distinct_rows"] <= stats["rows"]
        assert stats["distinct_rows"] < stats["rows"]  # every sentence starts with the same BOS row
        norm = stats["row_norm"]
        assert 0 < norm["min"] <= norm["median"] <= norm["max"]
        assert stats["max_gram_diagonal"]["dual"] <= norm["max"] ** 2 * (1 + 1e-9)
        assert stats["max_gram_diagonal"]["primal"] > 0


def test_float64_solve_matches_the_float64_reference(document):
    cases = [case for layer in document["layers"].values() for case in layer["cases"]]
    assert [(c["form"], c["n_rows"], c["ridge"]) for c in cases] == [("dual", 32, RIDGE), ("primal", 64, RIDGE)] * 3
    for case in cases:
        new, old = case["float64"], case["float32_prefix"]
        assert not new["cholesky_failed"]
        assert new["rel_error"] <= 1e-5 and new["rel_diff_threads"] <= 1e-6
        # the pre-fix solve is a correct solve on these mild keys: its inline re-implementation is right
        assert not old["cholesky_failed"] and old["rel_error"] < 1e-3


def test_prefix_solve_reports_a_failed_cholesky(script):
    keys = torch.ones(4, 8)  # U U^T is singular; lambda = 0 leaves it so
    assert script.prefix_float32_solve(keys, torch.randn(4, 3), 0.0, "dual") is None
    assert script.compare(script.float64_solve, keys, torch.randn(4, 3), -1.0, "dual", torch.ones(8, 3)) == {
        "cholesky_failed": True, "rel_error": None, "rel_diff_threads": None}


def test_json_is_strict_atomic_and_not_overwritten(script, document, tmp_path):
    out = tmp_path / "runs" / "solve-precision.json"
    script.write_json({**document, "bad": [float("nan"), float("inf")]}, out)

    def refuse(constant):
        raise AssertionError(f"non-strict JSON constant {constant}")

    written = json.loads(out.read_text(), parse_constant=refuse)
    assert written["bad"] == [None, None] and written["layers"].keys() == document["layers"].keys()
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary file left behind
    with pytest.raises(FileExistsError):
        script.write_json(document, out)
    script.write_json(document, out, overwrite=True)
    assert "bad" not in json.loads(out.read_text())
    with pytest.raises(SystemExit):  # the command refuses before loading anything
        script.main(["--model", "testbed", "--out", str(out)])


def test_table_has_a_line_per_case(script, document):
    lines = script.table(document).splitlines()
    assert len(lines) == 3 + 1 + 6  # 3 layers' stats, the header, 3 layers x 2 forms x 1 lambda
    error, threads = (float(x) for x in lines[-1].split("|")[2].split())  # the float64 cell of the last case
    assert math.isfinite(error) and error <= 1e-5 and threads <= 1e-6
