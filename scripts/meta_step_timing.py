"""Seconds per meta-step with and without prefix replay (interleaved), and at twice the edits.

    python scripts/meta_step_timing.py --model smollm2-135m            # bf16 on the CPU, the cpu preset

Each round runs one meta-step of every variant on the same batch (A, B, C, A, B, C, ...); the first round is a
warm-up and the median of the others is printed, with the load average before and after. Quality numbers are not
the point here: the losses printed show that replay changes nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from biasedit_peft.editor import BiasEditTrainer
from biasedit_peft.workflows.demo import DemoConfig, build_model, editor_preset, load_demo_items


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="testbed")
    parser.add_argument("--n-edits", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4, help="rounds, the first a warm-up (default 4)")
    args = parser.parse_args(argv)
    print("load average", os.getloadavg(), flush=True)
    config = DemoConfig(model=args.model, out="unused", progress=False)
    peft_model, tokenizer, _ = build_model(config)
    train = load_demo_items("train", config.bias_types, None)
    variants = {(args.n_edits, False): None, (args.n_edits, True): None, (2 * args.n_edits, True): None}
    times: dict = {key: [] for key in variants}
    with tempfile.TemporaryDirectory() as folder:
        for n_edits, replay in variants:
            editor, training = editor_preset(config.model, peft_model, None).editor_and_arguments(
                peft_model, f"{folder}/{n_edits}-{replay}", progress=False, n_edits=n_edits, prefix_replay=replay)
            variants[(n_edits, replay)] = BiasEditTrainer(peft_model, editor, training, train, None,
                                                          tokenizer=tokenizer)
        for round_number in range(args.rounds):
            for key, trainer in variants.items():
                batch = trainer._batches(trainer.train_data, 0)[round_number]
                start = time.perf_counter()
                metrics = trainer.edit_step(batch, train=True)
                times[key].append(time.perf_counter() - start)
                print(f"round {round_number} n_edits {key[0]} replay {key[1]}: {times[key][-1]:.2f} s, "
                      f"loss {metrics['loss']:.4f}", flush=True)
    medians = {key: statistics.median(values[1:]) for key, values in times.items()}
    for (n_edits, replay), seconds in medians.items():
        print(f"n_edits {n_edits}, prefix replay {replay}: median {seconds:.2f} s per meta-step")
    print(f"prefix replay speed-up at n_edits {args.n_edits}: "
          f"{medians[(args.n_edits, False)] / medians[(args.n_edits, True)]:.2f}x")
    print("load average", os.getloadavg())
    return {f"{n}-{r}": s for (n, r), s in medians.items()}


if __name__ == "__main__":
    main()
