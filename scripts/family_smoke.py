"""Run ``biasedit demo`` end to end on tiny random models of several architecture families, offline.

Each family's model is built from its transformers config (4 blocks, hidden 64) with the bundled testbed's
tokenizer, saved to ``OUT/models/FAMILY`` and sent through a short ``biasedit demo`` (meta-training, the three
protocols, debias, evaluate, merge and re-score). The weights are random, so the SS figures mean nothing; what
is checked is that every stage runs, which default target the adapter gets, and that prefix replay reproduces the
family's forward pass (a fallback prints a warning). Prints one row per family and rewrites ``OUT/families.json``
after each one, so a killed run keeps the families it finished. An existing ``OUT`` is refused without
``--overwrite``.

    python scripts/family_smoke.py --out runs/families              # 22 families, about 5 min on 2 cores
    python scripts/family_smoke.py --out runs/families --families qwen2,falcon -- --max-steps 8
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from biasedit_peft.testbed import MODEL_DIR as TESTBED_DIR

FAMILIES = ("qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "phi3", "phi", "gpt_neox", "stablelm", "olmo",
            "olmo2", "granite", "cohere", "smollm3", "starcoder2", "gpt_bigcode", "gptj", "codegen", "mpt", "falcon",
            "bloom", "opt")
QUICK_DEMO = ("--preset", "cpu", "--limit", "8", "--max-steps", "4", "--eval-every", "2", "--n-edits", "8",
              "--n-resamples", "0", "--quiet")
REPLAY_FALLBACK = "Prefix replay does not reproduce"


def tiny_config(family: str, tokenizer) -> AutoConfig:
    """A 4-block, hidden-64 config of ``family`` over ``tokenizer``'s vocabulary (its BOS / EOS / pad ids)."""
    sizes = dict(num_hidden_layers=4, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128, vocab_size=len(tokenizer),
                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                 pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    if family in ("gemma2", "gemma3_text"):
        sizes.update(head_dim=16, query_pre_attn_scalar=16, sliding_window=16)
    if family in ("gpt_neox", "phi", "bloom", "opt"):
        sizes.pop("num_key_value_heads")
    if family == "bloom":
        sizes.update(n_layer=4, n_head=4)
    if family in ("gptj", "codegen"):
        sizes.update(rotary_dim=8)
    if family == "opt":
        sizes.update(ffn_dim=128, word_embed_proj_dim=64)
    return AutoConfig.for_model(family, **sizes)


def save_family_model(family: str, folder: Path, tokenizer, seed: int = 0) -> Path:
    """A random tiny ``family`` model over ``tokenizer`` (the testbed's), saved with it to ``folder``."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_demo(model_folder: Path, out: Path, extra: list[str]) -> dict:
    """``biasedit demo`` on ``model_folder`` into ``out``: return code, seconds, replay fallback, targets."""
    command = [sys.executable, "-m", "biasedit_peft", "demo", "--model", str(model_folder), "--out", str(out),
               "--overwrite", *QUICK_DEMO, *extra]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    log = done.stdout + done.stderr
    (out.parent / f"{out.name}.log").write_text(log)
    targets = None
    config_file = out / "adapter" / "adapter_config.json"
    if config_file.is_file():
        targets = json.loads(config_file.read_text()).get("target_modules")
    return {"returncode": done.returncode, "seconds": round(seconds, 1), "replay_fallback": REPLAY_FALLBACK in log,
            "target_modules": targets, "last_line": log.strip().splitlines()[-1] if log.strip() else ""}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated transformers model types")
    parser.add_argument("demo_args", nargs="*", help="after --: extra `biasedit demo` flags")
    args = parser.parse_args(argv)
    if args.out.exists() and not args.overwrite:
        parser.error(f"--out {args.out} exists; pass --overwrite to replace it")
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    tokenizer = AutoTokenizer.from_pretrained(TESTBED_DIR)
    results = {}
    for family in [f for f in args.families.split(",") if f]:
        folder = save_family_model(family, args.out / "models" / family, tokenizer)
        results[family] = run_demo(folder, args.out / "demos" / family, args.demo_args)
        row = results[family]
        print(f"{family:10s} rc {row['returncode']}  {row['seconds']:6.1f} s  replay "
              f"{'FELL BACK' if row['replay_fallback'] else 'on'}  targets {row['target_modules']}", flush=True)
        (args.out / "families.json").write_text(json.dumps(results, indent=2) + "\n")
    failed = [family for family, row in results.items() if row["returncode"] != 0]
    if failed:
        print(f"failed: {', '.join(failed)} (logs in {args.out / 'demos'})")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
