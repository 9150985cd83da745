"""The figures of docs/method.md §5: the pre-fix float32 ridge solve against today's float64 one, on real keys.

    python scripts/solve_precision.py --model smollm2-135m --out runs/solve-precision.json

Keys: inputs of the BiasEdit default targets (``get_peft_model(model, BiasEditConfig())``) at the scored
logit positions (the rows the editor caches) of the first ``--pairs`` StereoSet ``train`` pairs, stereotype
then anti-stereotype per pair. Per layer, form (dual: the first ``--n-dual`` rows, primal: ``--n-primal``,
fewer if fewer were cached) and lambda, with a seeded normal ``D``: Cholesky failure, relative Frobenius
error of ``delta.dense()`` (2 threads) against float64 least squares on ``[U; sqrt(lambda) I] S = [D; 0]``,
and the relative difference between 1 and 2 threads. Non-finite numbers are written as null.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from peft import get_peft_model

from biasedit_peft.data import load_stereoset
from biasedit_peft.editor.solve import solve_ridge
from biasedit_peft.models import load_model_and_tokenizer
from biasedit_peft.scoring import encode_sentences, logit_positions
from biasedit_peft.tuner import BiasEditConfig, edit_targets


def collect_keys(model_name: str, pairs: int, batch_size: int = 32) -> dict[str, tuple[torch.Tensor, int]]:
    """``{edited layer: (keys [N, d_in] float32, d_out)}`` from forward hooks on the base layers."""
    model, tokenizer = load_model_and_tokenizer(model_name, dtype="fp32")
    targets = edit_targets(get_peft_model(model, BiasEditConfig()))  # wraps ``model`` in place
    sentences = [s for item in load_stereoset("train")[:pairs] for s in (item.stereotype, item.anti_stereotype)]
    inputs: dict[str, list[torch.Tensor]] = {name: [] for name in targets}
    handles = [layer.get_base_layer().register_forward_hook(lambda m, args, out, n=name: inputs[n].append(args[0]))
               for name, layer in targets.items()]
    positions = []
    try:
        with torch.no_grad():
            for start in range(0, len(sentences), batch_size):
                batch = encode_sentences(tokenizer, sentences[start:start + batch_size])
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
                positions.append(logit_positions(batch.target_mask))
    finally:
        for handle in handles:
            handle.remove()
    keys = {name: torch.cat([x[p] for x, p in zip(inputs[name], positions)]).float() for name in targets}
    return {name: (k, targets[name].get_base_layer().weight.numel() // k.shape[1]) for name, k in keys.items()}


def key_stats(keys: torch.Tensor, n_dual: int, n_primal: int) -> dict:
    """Rows, distinct rows, row-norm min/median/max and the largest Gram diagonal of each form's system."""
    keys64 = keys.double()
    norms = keys64.norm(dim=1)
    return {"rows": len(keys), "distinct_rows": len(torch.unique(keys, dim=0)),
            "row_norm": {"min": norms.min().item(), "median": norms.median().item(), "max": norms.max().item()},
            "max_gram_diagonal": {"dual": keys64[:n_dual].square().sum(1).max().item(),      # diag of U U^T
                                  "primal": keys64[:n_primal].square().sum(0).max().item()}}  # diag of U^T U


def prefix_float32_solve(keys: torch.Tensor, changes: torch.Tensor, ridge: float, form: str) -> torch.Tensor | None:
    """``delta.dense()`` of the PRE-FIX ``solve_ridge`` (float32 Gram and Cholesky); None if the Cholesky fails.

    Kept here only as the comparison point for §5; the package no longer has it. Its factors, multiplied in
    float32: ``left = U^T, right = K^-1 D`` (dual, ``K = UU^T + lambda I``), ``left = M^-1, right = U^T D``
    (primal, ``M = U^T U + lambda I``).
    """
    keys, changes = keys.float(), changes.float()
    gram = keys @ keys.T if form == "dual" else keys.T @ keys
    gram.diagonal().add_(ridge)
    cholesky, info = torch.linalg.cholesky_ex(gram)
    if int(info) != 0:
        return None
    if form == "dual":
        return keys.T @ torch.cholesky_solve(changes, cholesky)
    return torch.cholesky_solve(torch.eye(keys.shape[1]), cholesky) @ (keys.T @ changes)


def float64_solve(keys: torch.Tensor, changes: torch.Tensor, ridge: float, form: str) -> torch.Tensor | None:
    """``delta.dense()`` of today's :func:`solve_ridge`; None where it raises ``FloatingPointError``."""
    try:
        return solve_ridge(keys, changes, ridge, form=form).delta.dense()
    except FloatingPointError:
        return None


def reference(keys: torch.Tensor, changes: torch.Tensor, ridge: float) -> torch.Tensor:
    """float64 ``lstsq`` (QR) of the augmented system ``[U; sqrt(lambda) I] S = [D; 0]``."""
    keys64, d_in = keys.double(), keys.shape[1]
    system = torch.cat([keys64, math.sqrt(ridge) * torch.eye(d_in, dtype=torch.float64)])
    rhs = torch.cat([changes.double(), torch.zeros(d_in, changes.shape[1], dtype=torch.float64)])
    return torch.linalg.lstsq(system, rhs).solution


def relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected||_F / ||expected||_F`` in float64."""
    return float((actual.double() - expected.double()).norm() / expected.double().norm())


def compare(solve: Callable, keys: torch.Tensor, changes: torch.Tensor, ridge: float, form: str,
            expected: torch.Tensor) -> dict:
    """``solve`` at 1 and 2 threads (``torch.set_num_threads``, restored after): failure at either, error of
    the 2-thread delta against ``expected``, relative difference between the two."""
    before = torch.get_num_threads()
    try:  # set_num_threads returns None, so each item is the solve at that thread count
        one, two = [torch.set_num_threads(threads) or solve(keys, changes, ridge, form) for threads in (1, 2)]
    finally:
        torch.set_num_threads(before)
    if one is None or two is None:
        return {"cholesky_failed": True, "rel_error": None, "rel_diff_threads": None}
    return {"cholesky_failed": False, "rel_error": relative(two, expected), "rel_diff_threads": relative(one, two)}


def measure_layer(keys: torch.Tensor, d_out: int, sizes: dict[str, int], ridges: list[float], seed: int) -> list[dict]:
    """One record per (form, lambda): both solves on the first ``sizes[form]`` rows, ``D`` seeded normal."""
    cases = []
    for form, n in sizes.items():
        rows = keys[:n].contiguous()
        changes = torch.randn(len(rows), d_out, generator=torch.Generator().manual_seed(seed + len(rows)))
        for ridge in ridges:
            expected = reference(rows, changes, ridge)
            cases.append({"form": form, "n_rows": len(rows), "ridge": ridge,
                          "float32_prefix": compare(prefix_float32_solve, rows, changes, ridge, form, expected),
                          "float64": compare(float64_solve, rows, changes, ridge, form, expected)})
    return cases


def write_json(document: dict, out: Path, overwrite: bool = False) -> None:
    """Strict JSON to ``out`` through a temporary file and ``os.replace``; ``FileExistsError`` unless ``overwrite``."""
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    plain = json.loads(json.dumps(document), parse_constant=lambda _: None)  # NaN / Infinity -> null
    text = json.dumps(plain, indent=2, allow_nan=False) + "\n"
    handle, temporary = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as file:
            file.write(text)
        os.replace(temporary, out)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def table(document: dict) -> str:
    """Layer stats, then one line per case with each solve's ``error 1-vs-2-threads``, or FAIL."""
    def cell(r: dict) -> str:
        return "FAIL" if r["cholesky_failed"] else f"{r['rel_error']:.1e} {r['rel_diff_threads']:.1e}"

    width = max(len(name) for name in document["layers"])
    lines, cases = [], [f"{'layer':<{width}} {'form':<6} {'N':>5} {'lambda':>6} | float32 pre-fix | float64"]
    for name, layer in document["layers"].items():
        s, norm, gram = layer["stats"], layer["stats"]["row_norm"], layer["stats"]["max_gram_diagonal"]
        lines.append(f"{name}: {s['distinct_rows']}/{s['rows']} distinct rows, row norm min/median/max "
                     f"{norm['min']:.3g}/{norm['median']:.3g}/{norm['max']:.3g}, max Gram diagonal "
                     f"{gram['dual']:.3g} (dual), {gram['primal']:.3g} (primal)")
        cases += [f"{name:<{width}} {c['form']:<6} {c['n_rows']:>5} {c['ridge']:>6g} | "
                  f"{cell(c['float32_prefix']):>15} | {cell(c['float64'])}" for c in layer["cases"]]
    return "\n".join(lines + cases)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="a name or path load_model_and_tokenizer takes")
    parser.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    parser.add_argument("--pairs", type=int, default=256, help="first K StereoSet train pairs (default 256)")
    parser.add_argument("--n-dual", type=int, default=512, help="rows of the dual cases (default 512)")
    parser.add_argument("--n-primal", type=int, default=2048, help="rows of the primal cases (default 2048)")
    parser.add_argument("--ridges", type=float, nargs="+", default=[1e-3, 1.0, 10.0], help="the lambdas")
    parser.add_argument("--seed", type=int, default=0, help="seed of D (plus the case's row count)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    if args.out.exists() and not args.overwrite:
        parser.error(f"{args.out} exists; pass --overwrite to replace it")
    sizes = {"dual": args.n_dual, "primal": args.n_primal}
    layers = {name: {"d_in": keys.shape[1], "d_out": d_out, "stats": key_stats(keys, args.n_dual, args.n_primal),
                     "cases": measure_layer(keys, d_out, sizes, args.ridges, args.seed)}
              for name, (keys, d_out) in collect_keys(args.model, args.pairs).items()}
    document = {"model": args.model, "split": "train", "pairs": args.pairs, "seed": args.seed, "threads": [1, 2],
                "torch": torch.__version__, "layers": layers}
    write_json(document, args.out, args.overwrite)
    print(table(document))


if __name__ == "__main__":
    main()
