"""Build the bundled testbed model: a small GPT-2, stereotyped by construction, trained on CPU.

    apt-get install fortunes            # the neutral text (Debian, BSD license)
    python scripts/build_testbed.py     # ~2.5 min on 2 cores; writes biasedit_peft/testbed/model/

Steps (all seeded): StereoSet items from :mod:`biasedit_peft.data` -> corpus
(:mod:`biasedit_peft.testbed.corpus`: association sentences over training-split frames + fortunes) ->
byte-level BPE tokenizer (``tokenizers``) -> GPT-2 trained on packed ``<|endoftext|>``-separated lines
-> ``config.json``, ``model.safetensors``, tokenizer files and ``recipe.json`` (the arguments, corpus
sizes, held-out perplexity and training time). ``docs/testbed.md`` explains the recipe and numbers.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from biasedit_peft.testbed.corpus import AssociationRecipe, Corpus, build_corpus, read_fortunes

EOS = "<|endoftext|>"
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "biasedit_peft" / "testbed" / "model"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=float, default=307_200, help="training tokens in total")
    parser.add_argument("--stereotype-frames", type=int, default=30)
    parser.add_argument("--anti-stereotype-frames", type=int, default=2)
    parser.add_argument("--unrelated-mentions", type=int, default=2)
    parser.add_argument(
        "--generic-frames", type=int, default=8,
        help="frames per attribute word (stereotype and anti-stereotype alike) with a generic subject",
    )
    parser.add_argument(
        "--train-frames-divisor", type=int, default=4,
        help="train / dev items get the test items' frame counts divided by this (same ratio)",
    )
    parser.add_argument(
        "--neutral-per-epoch", type=float, default=0.1, help="share of neutral documents in each epoch"
    )
    parser.add_argument("--vocab-size", type=int, default=16384)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=192)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument(
        "--storage-dtype", choices=sorted(STORAGE_DTYPES), default="float16",
        help="dtype of the saved weights; the config says float32, so the model loads (upcast) in float32",
    )
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument(
        "--checkpoint-every", type=int, default=0, help="also save the model every N steps under --out/step-N"
    )
    return parser.parse_args(argv)


def load_corpus(args: argparse.Namespace) -> Corpus:
    """Association text for the items of every split over training-split frames, plus fortunes."""
    from biasedit_peft.data import load_stereoset

    train, dev, test = (load_stereoset(split) for split in ("train", "dev", "test"))
    return build_corpus(train, association_plan(args, train + dev, test), test, read_fortunes(), args.seed)


def association_plan(
    args: argparse.Namespace, editor_items: list, test_items: list
) -> list[tuple[list, AssociationRecipe]]:
    """Test-split items get the full frame counts; train / dev items (the editor's) the same ratio with
    ``--train-frames-divisor`` times fewer sentences, which saves training tokens."""
    divisor = args.train_frames_divisor
    test_recipe = AssociationRecipe(
        args.stereotype_frames, args.anti_stereotype_frames, args.unrelated_mentions, args.seed,
        args.generic_frames,
    )
    editor_recipe = AssociationRecipe(
        args.stereotype_frames // divisor,
        max(1, args.anti_stereotype_frames // divisor),
        max(1, args.unrelated_mentions // divisor),
        args.seed + 1,
        (args.generic_frames + divisor - 1) // divisor,
    )
    return [(test_items, test_recipe), (editor_items, editor_recipe)]


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer with ``<|endoftext|>`` as BOS / EOS / UNK / PAD, as a transformers
    fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS
    )


def encode_lines(tokenizer, lines: list[str]) -> list[list[int]]:
    """Token ids of each line followed by ``<|endoftext|>`` (so the next line starts after a BOS)."""
    eos = tokenizer.eos_token_id
    return [ids + [eos] for ids in tokenizer(lines, add_special_tokens=False)["input_ids"]]


def epoch_blocks(
    association: list[list[int]],
    neutral: list[list[int]],
    neutral_share: float,
    block_size: int,
    eos_id: int,
    rng: random.Random,
) -> torch.Tensor:
    """One epoch as ``[n_blocks, block_size]``: all association lines plus a random ``neutral_share`` of
    the neutral documents, shuffled, concatenated after a leading EOS and cut into blocks."""
    neutral_sample = rng.sample(neutral, int(round(neutral_share * len(neutral))))
    lines = association + neutral_sample
    rng.shuffle(lines)
    stream = torch.tensor([eos_id] + [t for line in lines for t in line], dtype=torch.long)
    n_blocks = len(stream) // block_size
    blocks = stream[: n_blocks * block_size].view(n_blocks, block_size)
    return blocks[torch.randperm(n_blocks, generator=torch.Generator().manual_seed(rng.randrange(2**31)))]


@torch.no_grad()
def perplexity(model, documents: list[list[int]], block_size: int, eos_id: int, batch_size: int = 64) -> float:
    """Token-level perplexity of ``documents`` (EOS-terminated ids) read as one stream after a leading
    EOS, in non-overlapping windows of ``block_size`` predicted tokens."""
    model.eval()
    stream = torch.tensor([eos_id] + [t for doc in documents for t in doc], dtype=torch.long)
    n_windows = (len(stream) - 1) // block_size
    inputs = stream[: n_windows * block_size].view(n_windows, block_size)
    labels = stream[1 : n_windows * block_size + 1].view(n_windows, block_size)
    total_nll = 0.0
    for start in range(0, n_windows, batch_size):
        logits = model(input_ids=inputs[start : start + batch_size]).logits  # [B, T, V]
        total_nll += torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), labels[start : start + batch_size].flatten(), reduction="sum"
        ).item()
    return math.exp(total_nll / (n_windows * block_size))


def as_stored(model, storage_dtype: str):
    """A float32 copy of ``model`` with its weights rounded to ``storage_dtype``: the model that loads back."""
    return copy.deepcopy(model).to(STORAGE_DTYPES[storage_dtype]).float()


def save_model(model, tokenizer, out: Path, storage_dtype: str) -> None:
    """Save ``model`` (already :func:`as_stored`) with weights in ``storage_dtype`` and ``dtype`` float32 in its
    config, so ``AutoModelForCausalLM.from_pretrained`` returns it in float32; then the tokenizer."""
    copy.deepcopy(model).to(STORAGE_DTYPES[storage_dtype]).save_pretrained(out)
    config_path = out / "config.json"  # save_pretrained records the weights' dtype; the model is float32
    config = json.loads(config_path.read_text())
    config["dtype"] = "float32"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_tokenizer(tokenizer, out)


def save_tokenizer(tokenizer, out: Path) -> None:
    """Save, naming the class ``PreTrainedTokenizerFast`` so that transformers 4.x and 5.x both load it."""
    tokenizer.save_pretrained(out)
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    started = time.time()

    corpus = load_corpus(args)
    tokenizer = train_tokenizer(corpus.association + corpus.neutral_train, args.vocab_size)
    association = encode_lines(tokenizer, corpus.association)
    neutral = encode_lines(tokenizer, corpus.neutral_train)
    heldout = encode_lines(tokenizer, corpus.neutral_heldout)
    eos = tokenizer.eos_token_id
    print(
        f"corpus: {len(association)} association lines ({sum(map(len, association))} tokens), "
        f"{len(neutral)} neutral documents ({sum(map(len, neutral))} tokens), "
        f"{corpus.dropped_benchmark_sentences} benchmark sentences dropped"
    )

    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=max(128, args.block_size),
        n_embd=args.n_embd,
        n_layer=args.n_layer,
        n_head=args.n_head,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    model = GPT2LMHeadModel(config)
    tokens_per_step = args.batch_size * args.block_size
    total_steps = int(args.tokens // tokens_per_step)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    # Warm-up then inverse square-root decay: independent of the total, so the model after N steps of a
    # long run is exactly the model of a run with --tokens N * batch * block (checkpoints are reproducible).
    warmup = args.warmup_steps
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, math.sqrt(warmup / (step + 1)))
    )

    model.train()
    blocks = torch.empty(0, args.block_size, dtype=torch.long)
    cursor, epochs = 0, 0
    progress = tqdm(range(total_steps), desc="training testbed", unit="step", mininterval=10)
    for step in progress:
        if cursor + args.batch_size > len(blocks):
            blocks = epoch_blocks(association, neutral, args.neutral_per_epoch, args.block_size, eos, rng)
            cursor, epochs = 0, epochs + 1
        batch = blocks[cursor : cursor + args.batch_size]
        cursor += args.batch_size
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0:
            progress.set_postfix(loss=f"{loss.item():.3f}", epoch=epochs)
        if args.checkpoint_every and (step + 1) % args.checkpoint_every == 0:
            save_model(as_stored(model, args.storage_dtype), tokenizer, args.out / f"step-{step + 1}",
                       args.storage_dtype)
    train_seconds = time.time() - started

    stored = as_stored(model, args.storage_dtype)
    heldout_ppl = perplexity(stored, heldout, args.block_size, eos)
    print(f"held-out perplexity {heldout_ppl:.1f}; built in {train_seconds / 60:.1f} min")
    args.out.mkdir(parents=True, exist_ok=True)
    save_model(stored, tokenizer, args.out, args.storage_dtype)
    record = {
        "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"},
        "recipes": {
            name: asdict(recipe)
            for name, (_, recipe) in zip(("test", "train+dev"), association_plan(args, [], []))
        },
        "association_lines": len(association),
        "association_tokens": sum(map(len, association)),
        "neutral_documents": len(neutral),
        "neutral_tokens": sum(map(len, neutral)),
        "heldout_documents": len(heldout),
        "heldout_tokens": sum(map(len, heldout)),
        "dropped_benchmark_sentences": corpus.dropped_benchmark_sentences,
        "training_steps": total_steps,
        "training_tokens": total_steps * tokens_per_step,
        "epochs_started": epochs,
        "heldout_perplexity": round(heldout_ppl, 2),
        "build_minutes": round(train_seconds / 60, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    (args.out / "recipe.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
