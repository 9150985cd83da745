"""``biasedit bench --sections scaling``: meta-training and a joint debias at 1 and N processes.

Each process count runs in fresh processes under ``torchrun --standalone`` (gloo on the CPU), with the machine's
cores divided between them (``OMP_NUM_THREADS``). Every process takes its share of each meta-step's edits and of
the debias samples (``biasedit_peft.distributed``); rank 0 reports. On one machine the processes share its cores,
so the ratio measures the overhead of splitting (collectives, smaller batches) and checks that the deltas agree,
not a speed-up: that needs one device per process.

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m biasedit_peft.workflows.scaling PAYLOAD
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

PROCESS_COUNTS = (1, 2)
DEBIAS_SAMPLES = 512


def measure(config, delta_file: str) -> dict[str, Any]:
    """In each of the launched processes: one joint debias of :data:`DEBIAS_SAMPLES` train items by a fresh editor
    (normalisers from 64 samples, so every run's editor is the same), then ``config.repeats`` meta-steps (after
    one warm-up); rank 0 writes the debias deltas to ``delta_file`` and returns the timings.
    """
    from safetensors.torch import save_file

    from ..data import BIAS_TYPES
    from ..distributed import current_processes
    from .bench import _cached, _trainer
    from .demo import load_demo_items

    processes = current_processes()
    with tempfile.TemporaryDirectory() as folder:
        trainer = _trainer(config, folder)
        _cached(trainer.model, trainer.tokenizer, trainer.editor, 64)  # normalisers, the same in every process
        items = load_demo_items("train", BIAS_TYPES, None)[:DEBIAS_SAMPLES]
        processes.barrier()
        start = time.perf_counter()  # the debias first: the same editor in every run, so the deltas compare
        solutions, report = trainer.editor.joint_solutions(trainer.model, items, trainer.tokenizer,
                                                           trainer.args.batch_size, progress=False)
        processes.barrier()
        debias_seconds = time.perf_counter() - start
        batches = trainer._batches(trainer.train_data, 0)
        trainer.edit_step(batches[0], train=True)  # warm-up
        processes.barrier()
        start = time.perf_counter()
        for batch in batches[1:1 + config.repeats]:
            trainer.edit_step(batch, train=True)
        processes.barrier()
        step_seconds = (time.perf_counter() - start) / config.repeats
    if processes.is_main:
        save_file({name: solution.delta.dense().contiguous() for name, solution in solutions.items()}, delta_file)
    return {"processes": processes.world_size, "threads_per_process": torch.get_num_threads(),
            "seconds_per_meta_step": step_seconds, "meta_steps_per_second": 1 / step_seconds,
            "debias_seconds": debias_seconds, "debias_samples_per_second": report.n_samples / debias_seconds,
            "debias_tokens": report.n_tokens}


def bench_scaling(config, rounds: int = 2) -> dict[str, Any]:
    """Throughput at 1 and 2 processes on this machine, their ratio, and how far the 2-process debias deltas are
    from the 1-process ones (relative Frobenius, per layer).

    The process counts alternate for ``rounds`` rounds (1, 2, 1, 2, ...: a shared machine's load hits both); each
    count reports its fastest round.
    """
    from safetensors.torch import load_file

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    rounds_by_count: dict[int, list[dict]] = {count: [] for count in PROCESS_COUNTS}
    deltas = {}
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(rounds):
            for count in PROCESS_COUNTS:
                delta_file = str(Path(folder) / f"deltas-{count}.safetensors")
                rounds_by_count[count].append(_launch(config, count, cores, delta_file))
                deltas[count] = load_file(delta_file)
    runs = {count: min(results, key=lambda r: r["seconds_per_meta_step"]) | {
        "debias_samples_per_second": max(r["debias_samples_per_second"] for r in results),
        "rounds_seconds_per_meta_step": [r["seconds_per_meta_step"] for r in results]}
        for count, results in rounds_by_count.items()}
    one, many = PROCESS_COUNTS[0], PROCESS_COUNTS[-1]
    agreement = {name: float((deltas[many][name].double() - delta.double()).norm() / delta.double().norm())
                 for name, delta in deltas[one].items()}
    first, second = runs[one], runs[many]
    return {"cores": cores, "n_edits": config.n_edits, "rounds": rounds, "runs": {str(k): v for k, v in runs.items()},
            "meta_step_throughput_ratio": second["meta_steps_per_second"] / first["meta_steps_per_second"],
            "debias_throughput_ratio": second["debias_samples_per_second"] / first["debias_samples_per_second"],
            "debias_delta_relative_difference": agreement,
            "note": f"{many} processes share this machine's {cores} cores: the ratio is the overhead of splitting, "
                    "not a speed-up"}


def _launch(config, count: int, cores: int, delta_file: str) -> dict[str, Any]:
    """:func:`measure` in ``count`` fresh processes under torchrun, the cores split between them."""
    payload = json.dumps({"config": asdict(config), "delta_file": delta_file})
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(count),
         "-m", "biasedit_peft.workflows.scaling", payload], capture_output=True, text=True, check=False,
        env={**os.environ, "OMP_NUM_THREADS": str(max(1, cores // count))})
    if completed.returncode != 0:
        raise RuntimeError(f"scaling at {count} processes failed:\n{completed.stderr[-2000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _main(payload: str) -> None:
    from ..distributed import current_processes, leave_processes
    from .bench import config_from_json

    data = json.loads(payload)
    result = measure(config_from_json(data["config"]), data["delta_file"])
    if current_processes().is_main:
        print(json.dumps(result))
    leave_processes()


if __name__ == "__main__":
    _main(sys.argv[1])
