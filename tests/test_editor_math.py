"""Hyper-network, ridge solve and the decoupled meta-gradient, on plain tensors."""

from __future__ import annotations

import pytest
import torch

from biasedit_peft.editor.editor import meta_backward_layer, predict_layer
from biasedit_peft.editor.nets import EditorNet, RunningMeanStd
from biasedit_peft.editor.solve import solve_ridge
from biasedit_peft.tuner.layout import native_factors

torch.set_default_dtype(torch.float32)


def _data(n: int, d_in: int, d_out: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=generator), torch.randn(n, d_out, generator=generator)


def test_running_mean_std_matches_batch_statistics():
    x = torch.randn(50, 6) * 3 + 1
    normaliser = RunningMeanStd(6)
    for part in x.split([7, 20, 23]):
        normaliser.update(part)
    torch.testing.assert_close(normaliser.mean, x.mean(0))
    torch.testing.assert_close(normaliser.std, x.std(0))
    torch.testing.assert_close(normaliser(x).mean(0), torch.zeros(6), atol=1e-5, rtol=0)


def test_net_at_init_gives_the_mend_step():
    keys, grads = _data(10, 4, 3)
    net = EditorNet(4, 3, rank=5, n_blocks=2, n_modules=2, lr=0.1)
    net.normalizer.update(torch.cat((keys, grads), -1))
    normalised = net.normalizer(torch.cat((keys, grads), -1))
    pseudo_keys, pseudo_grads = normalised.split([4, 3], -1)
    expected = -0.1 * (keys * pseudo_keys).sum(-1, keepdim=True) * pseudo_grads
    torch.testing.assert_close(net.value_changes(keys, grads, 1), expected)
    assert net.ridge(0).item() == 1.0


def test_blocks_learn_from_the_identity_init():
    """With ``B = 0`` every pre-activation is 0; the rectifier must pass gradient there, or the blocks never train
    (``relu`` did: the editor stayed the MEND step for a whole meta-training)."""
    keys, grads = _data(10, 4, 3)
    net = EditorNet(4, 3, rank=5, n_blocks=2, n_modules=2, lr=0.1)
    net.normalizer.update(torch.cat((keys, grads), -1))
    net.value_changes(keys, grads, 1).square().sum().backward()
    for block in net.blocks:
        assert block.B.grad.abs().max() > 1e-3 and block.bias.grad.abs().max() > 1e-3
        assert block.A.grad.abs().max() == 0  # B = 0 still: A learns from the next step on
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    optimizer.step()
    optimizer.zero_grad()
    net.value_changes(keys, grads, 1).square().sum().backward()
    assert all(block.A.grad.abs().max() > 1e-3 and block.scale.grad[1].abs().max() > 1e-3 for block in net.blocks)
    assert all(block.scale.grad[0].abs().max() == 0 for block in net.blocks)  # module 0 was not edited


@pytest.mark.parametrize(("block_init", "std"), [("unit", 1.0), ("fan_in", 0.1)])
def test_block_init_sets_the_spread_of_a(block_init, std):
    torch.manual_seed(0)
    net = EditorNet(60, 40, rank=100, n_blocks=1, n_modules=1, lr=0.1, block_init=block_init)
    assert abs(net.blocks[0].A.std().item() / std - 1) < 0.02  # 10,000 draws: std within 2 %
    with pytest.raises(ValueError, match="block_init"):
        EditorNet(60, 40, rank=100, n_blocks=1, n_modules=1, lr=0.1, block_init="xavier")


@pytest.mark.parametrize("n", [5, 40])  # dual (N < d_in) and primal
def test_solve_matches_normal_equations(n):
    keys, changes = _data(n, 12, 7)
    ridge = 0.3
    solution = solve_ridge(keys.double().float(), changes, ridge)
    assert solution.form == ("dual" if n < 12 else "primal")
    expected = torch.linalg.solve(keys.T.double() @ keys.double() + ridge * torch.eye(12, dtype=torch.float64),
                                  keys.T.double() @ changes.double()).float()
    torch.testing.assert_close(solution.delta.dense(), expected, atol=1e-5, rtol=1e-4)


def test_primal_and_dual_agree_and_factored_equals_dense():
    keys, changes = _data(9, 11, 6)
    primal = solve_ridge(keys, changes, 0.7, form="primal")
    dual = solve_ridge(keys, changes, 0.7, form="dual")
    torch.testing.assert_close(primal.delta.dense(), dual.delta.dense(), atol=1e-5, rtol=1e-4)
    assert dual.delta.rank == 9 and dual.delta.left.shape == (11, 9)
    torch.testing.assert_close(dual.delta(keys), keys @ dual.delta.dense(), atol=1e-5, rtol=1e-5)
    a, b = native_factors(dual.delta.left, dual.delta.right, fan_in_fan_out=False)  # nn.Linear: [out, in]
    torch.testing.assert_close(a @ b, dual.delta.dense().T)
    a, b = native_factors(dual.delta.left, dual.delta.right, fan_in_fan_out=True)  # Conv1D: [in, out]
    torch.testing.assert_close(a @ b, dual.delta.dense())
    grad = torch.randn(11, 6)
    for a_grad, b_grad in zip(primal.backward(grad), dual.backward(grad)):
        torch.testing.assert_close(a_grad, b_grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("form_n", [6, 30])
def test_ridge_backward_matches_autograd(form_n):
    keys, changes = _data(form_n, 10, 4, seed=3)
    changes.requires_grad_(True)
    ridge = torch.tensor(0.5, requires_grad=True)
    delta = torch.linalg.solve(keys.T @ keys + ridge * torch.eye(10), keys.T @ changes)
    weights = torch.randn(10, 4)
    (weights * delta).sum().backward()
    change_grad, ridge_grad = solve_ridge(keys, changes, 0.5).backward(weights)
    torch.testing.assert_close(change_grad, changes.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ridge_grad, ridge.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("n", [7, 25])
def test_decoupled_meta_gradient_equals_plain_autograd(n):
    torch.manual_seed(0)
    keys, grads = _data(n, 8, 5, seed=4)
    net = EditorNet(8, 5, rank=4, n_blocks=2, n_modules=2, lr=0.05)
    net.normalizer.update(torch.cat((keys, grads), -1))
    with torch.no_grad():  # leave the identity init so every parameter matters
        for block in net.blocks:
            block.B.normal_(0, 0.3)
            block.bias.normal_(0, 0.3)
            block.scale.normal_(1, 0.2)
            block.shift.normal_(0, 0.2)
        net.log_lambda.fill_(-0.5)
    target = torch.randn(8, 5)

    def meta_loss(delta):
        return ((delta - target) ** 2).sum() + (keys @ delta).pow(3).mean()

    # plain autograd through the whole pipeline
    changes = net.value_changes(keys, grads, 1)
    system = keys.T @ keys + net.ridge(1) * torch.eye(8)
    meta_loss(torch.linalg.solve(system, keys.T @ changes)).backward()
    expected = {name: p.grad.clone() for name, p in net.named_parameters()}
    net.zero_grad()

    # decoupled: solve without graph, dL/dS, then chunked recomputation (chunk 3 rows)
    solution = predict_layer(net, 1, keys, grads, chunk_size=3)
    delta = solution.delta.dense().requires_grad_(True)
    meta_loss(delta).backward()
    meta_backward_layer(net, 1, keys, grads, solution, delta.grad, chunk_size=3)
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], atol=1e-4, rtol=1e-3, msg=name)
    assert expected["lr"][1] != 0 and expected["log_lambda"][1] != 0
    assert expected["lr"][0] == 0  # module 0 was not edited


def test_non_finite_keys_raise():
    keys, changes = _data(4, 6, 3)
    keys[0, 0] = float("nan")
    with pytest.raises(FloatingPointError):
        solve_ridge(keys, changes, 1.0)
