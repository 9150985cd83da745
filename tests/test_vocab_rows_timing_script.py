"""``scripts/vocab_rows_timing.py``: its "previous" losses are the definitions, and both arms run on the testbed."""

from __future__ import annotations

import torch

from biasedit_peft.editor import losses
from biasedit_peft.scoring import TokenBatch, token_log_probs

from factories import script_module


def _padded_batch() -> TokenBatch:
    torch.manual_seed(3)
    attention = torch.arange(6)[None] < torch.tensor([6, 3, 5])[:, None]
    return TokenBatch(torch.randint(0, 9, (3, 6)), attention.long(), attention & (torch.arange(6)[None] > 0))


def test_the_previous_arm_gives_the_current_values_and_gradients():
    script = script_module("vocab_rows_timing")
    batch = _padded_batch()
    pre, post = torch.randn(3, 6, 9), torch.randn(3, 6, 9, requires_grad=True)
    pairs = ((lambda x: script.previous_token_log_probs(x, batch), lambda x: token_log_probs(x, batch)),
             (lambda x: script.previous_token_retention_loss(pre, x, batch),
              lambda x: losses.retention_loss("token", pre, x, batch)))
    for previous, current in pairs:
        old, new = previous(post), current(post)
        torch.testing.assert_close(new, old, rtol=0, atol=1e-6)
        weights = torch.randn(old.shape)
        (grad_old,) = torch.autograd.grad((old * weights).sum(), post)
        (grad_new,) = torch.autograd.grad((new * weights).sum(), post)
        torch.testing.assert_close(grad_new, grad_old, rtol=0, atol=1e-6)
    # the previous arm's unrelated-sentence log-probs, scored by passes of their own, are the current ones
    for old, new in zip(script.previous_token_retention_terms(pre, post, batch)[1:],
                        losses.token_retention_terms(pre, post, batch)[1:]):
        torch.testing.assert_close(new, old, rtol=0, atol=1e-6)


def test_vocab_rows_timing_runs_both_arms_with_the_same_first_loss(capsys):
    script = script_module("vocab_rows_timing")
    medians = script.main(["--model", "testbed", "--dtypes", "fp32", "--n-edits", "8", "--rounds", "2"])
    assert set(medians) == {"fp32-previous", "fp32-chunked"} and all(v > 0 for v in medians.values())
    assert losses.token_retention_terms.__name__ == "token_retention_terms"  # the swap is undone
    assert losses.token_log_probs is token_log_probs
    first = [line.rsplit("loss ", 1)[1] for line in capsys.readouterr().out.splitlines()
             if line.startswith("round 0 fp32 ")]
    assert len(first) == 2 and first[0] == first[1]
