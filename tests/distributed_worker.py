"""Run under ``torchrun --standalone --nproc_per_node N`` by tests/test_distributed.py (not a test module).

    python -m torch.distributed.run --standalone --nproc_per_node 2 distributed_worker.py solve OUT.safetensors

``solve``: each process takes its block of the same real-like keys (tests/test_solve_real_keys.py) and solves
across the processes, in the primal (2,048 rows > d_in) and the dual (512 rows), then runs the closed-form
backward of a fixed ``dL/dS``; rank 0 writes the deltas, ``dL/dD`` of every process's own rows (gathered),
``dL/dlambda`` and a process-summed count; every rank checks that it holds the same delta as rank 0.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from biasedit_peft.distributed import current_processes, leave_processes
from biasedit_peft.editor.solve import solve_ridge

from test_solve_real_keys import down_proj_like_keys, value_changes

ROWS = {"primal": 2048, "dual": 512}


def solve(out: str) -> None:
    processes = current_processes()
    tensors = {}
    for form, n_rows in ROWS.items():
        keys, changes = down_proj_like_keys(n_rows), value_changes(n_rows)
        mine = processes.shard(n_rows)
        solution = solve_ridge(keys[mine], changes[mine], 1.0, processes=processes)
        assert solution.form == form, (solution.form, form)
        dense = solution.delta.dense()
        same = processes.gather_rows(dense.unsqueeze(0))
        assert all(torch.equal(same[0], other) for other in same), "processes disagree"
        tensors[form] = dense
        delta_grad = torch.randn(dense.shape, generator=torch.Generator().manual_seed(3))
        change_grads, ridge_grad = solution.backward(delta_grad)  # what meta_backward_layer uses
        if solution.rows is not None:
            change_grads = change_grads[solution.rows]
        tensors[f"{form}.change_grads"] = processes.gather_rows(change_grads)  # this process's rows, in order
        tensors[f"{form}.ridge_grad"] = ridge_grad.reshape(1)
    tensors["world_size"] = torch.tensor([processes.sum_int(1)])
    if processes.is_main:
        save_file(tensors, out)


def train(out: str, steps: str, ss_coef: str = "0") -> None:
    """``steps`` meta-steps (validation after each) on the tiny word model and samples of three bias types, with the
    soft-SS term weighted ``ss_coef``; rank 0 writes the editor and the logged metrics of every step."""
    import json
    import tempfile

    from biasedit_peft.editor import BiasEditor, BiasEditTrainer, BiasEditTrainingArguments

    from factories import editor_tokenizer, peft_model, samples

    torch.manual_seed(0)
    model = peft_model()
    editor = BiasEditor.for_model(model, rank=8, lr=1e-2)
    initial = {f"initial.{name}": value.clone() for name, value in editor.state_dict().items()}
    folder = tempfile.mkdtemp() if current_processes().is_main else "/nonexistent"  # only rank 0 writes
    args = BiasEditTrainingArguments(output_dir=folder, n_edits=6, batch_size=2, meta_lr=1e-2, loc_coef=1.0,
                                     max_steps=int(steps), eval_every=1, progress=False, calibrate=False,
                                     ss_coef=float(ss_coef))
    types = ("gender", "race", "religion")  # the soft-SS term's mean signs per type span both processes
    trainer = BiasEditTrainer(model, editor, args, samples(18, types), samples(12, types),
                              tokenizer=editor_tokenizer())
    state = trainer.train()
    if trainer.processes.is_main:
        save_file({**initial, **{name: value.contiguous() for name, value in editor.state_dict().items()}}, out)
        Path(out + ".json").write_text(json.dumps(state.history))


if __name__ == "__main__":
    {"solve": solve, "train": train}[sys.argv[1]](*sys.argv[2:])
    leave_processes()
