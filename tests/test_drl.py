"""DRL (Meulemans et al. 2020's DDTP-linear, dtp/drl.py): its loss, its targets, what its feedback maps
converge to, its output update, both protocols' resume, and where it is refused."""
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import SMOKE, load, train_in_process
from dtp import config as config_lib
from dtp.algorithm import VARIANTS, drl_targets, train_feedback_block
from dtp.config import ModelConfig
from dtp.drl import DIRECT, DirectFeedbackMap, drl_forward_losses, drl_loss, train_feedback_map
from dtp.drl_training import FeedbackOnlyEpochs
from dtp.errors import UserError
from dtp.models import DTPNetwork, ForwardBlock, invert_block
from dtp.seeding import BlockNoise
from dtp.stopping import StopSignal
from test_sequential_cli import assert_same_run

F64 = torch.float64


def linear_block(weight: torch.Tensor) -> ForwardBlock:
    """A forward block computing weight · x (zero bias), in float64."""
    block = ForwardBlock([nn.Linear(weight.shape[1], weight.shape[0])]).double()
    with torch.no_grad():
        block.layers[0].weight.copy_(weight)
        block.layers[0].bias.zero_()
    return block


def tanh_mlp(seed: int = 0) -> DTPNetwork:
    """4 inputs → 8 → 6 (tanh) → 10, with DRL's maps Q_0 (10 → 8) and Q_1 (10 → 6), in float64."""
    model = ModelConfig(arch="mlp", channels=(8, 6), activation="tanh")
    return DTPNetwork(model, (1, 2, 2), 10, seed, DIRECT).double()


def test_drl_loss_and_its_gradient_match_a_hand_computation():
    """L_i = (1/σ²) mean over rows and units of (Q_i(f_{i→L}(h_i + σε) − h_L) − σε)², written out element by element."""
    net, sigma = tanh_mlp(), 0.3
    blocks, q = list(net.forward_blocks), net.feedback_blocks[0]
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(3, 8, generator=gen, dtype=F64)
    noise = sigma * torch.randn(3, 8, generator=gen, dtype=F64)
    with torch.no_grad():
        h_out = blocks[2](blocks[1](h)[0])[0]
        delta = blocks[2](blocks[1](h + noise)[0])[0] - h_out  # f_{0→L}(h + σε) − h_L
    weight = q.linear.weight.detach().clone()
    residual = [[sum(weight[u, k] * delta[b, k] for k in range(10)) - noise[b, u] for u in range(8)] for b in range(3)]
    expected = sum(r**2 for row in residual for r in row) / (3 * 8) / sigma**2
    # ∂L/∂Q[u, k] = 2/(B·n·σ²) Σ_b residual[b][u] · delta[b, k]
    expected_grad = torch.tensor([[sum(2 * residual[b][u] * delta[b, k] for b in range(3)) / (3 * 8 * sigma**2)
                                   for k in range(10)] for u in range(8)], dtype=F64)
    loss = drl_loss(q, blocks, 0, h, h_out, noise, sigma)
    (grad,) = torch.autograd.grad(loss, [q.linear.weight])
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-14)
    assert all(p.grad is None for p in net.forward_blocks.parameters())  # f_{i→L} is not trained


def test_direct_targets_map_the_output_step_to_every_hidden_block():
    """t_L = h_L − β ∂CE_mean/∂h_L and t_i = h_i + Q_i(t_L − h_L): from the output, not from the block above."""
    net, beta = tanh_mlp(), 0.06
    x, labels = torch.randn(5, 1, 2, 2, dtype=F64), torch.tensor([0, 3, 9, 3, 1])
    outputs = []
    h = x
    for block in net.forward_blocks:
        h, _ = block(h)
        outputs.append(h)
    targets = drl_targets(list(net.feedback_blocks), outputs, [[]] * 3, labels, beta)
    logits = outputs[-1].detach().requires_grad_()
    (ce_grad,) = torch.autograd.grad(F.cross_entropy(logits, labels), [logits])
    step = -beta * ce_grad
    torch.testing.assert_close(targets[2], outputs[2] + step, rtol=1e-12, atol=1e-15)
    for i in (0, 1):
        expected = outputs[i] + step @ net.feedback_blocks[i].linear.weight.t()
        torch.testing.assert_close(targets[i], expected, rtol=1e-12, atol=1e-15)


def test_drl_trains_q_to_the_pseudo_inverse_where_ldrl_trains_g_to_the_transpose():
    """On a linear network with J = f_{0→L}'s Jacobian (3×6, singular values 1.5, 1, 0.6), the DRL loss is
    minimised by Q = J⁺ and L-DRL (on one block F = J) by G = Jᵀ; the two differ, and each loss finds its own."""
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(5, 5, generator=gen, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=F64))
    w_a, w_b = v[:5], torch.diag(torch.tensor([1.5, 1.0, 0.6], dtype=F64)) @ u[:3]
    jacobian = w_b @ w_a
    pinv = torch.linalg.pinv(jacobian)
    blocks = [linear_block(torch.eye(6, dtype=F64)), linear_block(w_a), linear_block(w_b)]
    h = torch.randn(64, 6, generator=gen, dtype=F64)
    with torch.no_grad():
        h_out = blocks[2](blocks[1](h)[0])[0]
    q = DirectFeedbackMap(3, torch.Size((6,))).double()
    for lr in (2.0, 0.5, 0.1):  # SGD with a falling lr, 40 noise draws each, for both losses
        train_feedback_map(q, torch.optim.SGD(q.parameters(), lr=lr), blocks, 0, h, h_out, 40, 0.1, gen, nullcontext)
    trained_q = q.linear.weight.detach()
    assert (trained_q - pinv).norm() / pinv.norm() < 0.1
    assert (trained_q - jacobian.t()).norm() / jacobian.norm() > 0.5

    g = invert_block(ForwardBlock([nn.Linear(6, 3)]), torch.Size((6,))).double()
    for step, lr in enumerate((0.2, 0.05, 0.01)):
        optimizer = torch.optim.SGD(g.parameters(), lr=lr)
        train_feedback_block(linear_block(jacobian), g, optimizer, h, 40, 1.0, 1,
                             BlockNoise(torch.device("cpu")).start(0, 1, step, slice(0, 64), 64))
    trained_g = g.layers[0].weight.detach()
    assert (trained_g - jacobian.t()).norm() / jacobian.norm() < 0.1
    assert (trained_g - pinv).norm() / pinv.norm() > 0.5


def test_with_exact_q_the_output_update_is_bp_scaled_and_the_last_hidden_target_is_gauss_newton():
    """Output block: (2β/B) × BP's gradient of the mean cross-entropy (the published loss scaling). Last hidden
    block, Q = J⁺ of the linear classifier: its target step is J⁺ (t_L − h_L), the Gauss-Newton step, so its
    update is not BP's (which carries Jᵀ)."""
    net, beta, batch = tanh_mlp(), 0.060969, 16  # MNIST's published β
    classifier = net.forward_blocks[2].layers[0].weight
    with torch.no_grad():
        net.feedback_blocks[1].linear.weight.copy_(torch.linalg.pinv(classifier))
    x, labels = torch.randn(batch, 1, 2, 2, dtype=F64), torch.randint(0, 10, (batch,))
    outputs, h = [], x
    for block in net.forward_blocks:
        h, _ = block(h.detach())
        outputs.append(h)
    targets = drl_targets(list(net.feedback_blocks), outputs, [[]] * 3, labels, beta)
    losses = drl_forward_losses(outputs, targets)
    params = list(net.forward_blocks.parameters())
    drl_grads = torch.autograd.grad(torch.stack(losses).sum(), params)
    bp_grads = torch.autograd.grad(F.cross_entropy(net(x), labels), params)
    for drl_grad, bp_grad in zip(drl_grads[-2:], bp_grads[-2:]):  # the classifier's weight and bias
        torch.testing.assert_close(drl_grad, 2 * beta / batch * bp_grad, rtol=1e-10, atol=1e-15)
    output_step = (targets[2] - outputs[2]).detach()
    gauss_newton = output_step @ torch.linalg.pinv(classifier).t()
    torch.testing.assert_close(targets[1] - outputs[1].detach(), gauss_newton, rtol=1e-10, atol=1e-15)
    hidden, bp_hidden = drl_grads[2].flatten(), bp_grads[2].flatten()
    cosine = float(hidden @ bp_hidden / (hidden.norm() * bp_hidden.norm()))
    assert cosine < 0.999


DRL_SMOKE = ["--config", SMOKE, "--algorithm", "drl", "--set", "feedback.optimizer=adam",
             "--set", "forward.optimizer=adam", "--set", "forward.lr=1.0e-3", "--set", "forward.beta=0.1",
             "--set", "feedback.lr=[1.0e-3,1.0e-3,1.0e-3,1.0e-3,1.0e-3]", "--set", "feedback.iterations=[1,2,1,1,1]"]


def stop_after_feedback_only_batch(monkeypatch: pytest.MonkeyPatch, batches: int) -> None:
    """Ask the run to stop once `batches` feedback-only batches are done, as SIGUSR1 would."""
    signals: list[StopSignal] = []
    monkeypatch.setattr(StopSignal, "install", lambda self: signals.append(self))
    take_batch = FeedbackOnlyEpochs.take_batch

    def take_batch_then_stop(self, x):
        take_batch(self, x)
        if self.done == batches:
            signals[-1].received = "SIGUSR1"

    monkeypatch.setattr(FeedbackOnlyEpochs, "take_batch", take_batch_then_stop)


def test_s_ddtp_resumes_exactly_inside_feedback_only_passes_and_epochs(tmp_path, monkeypatch, tiny_npz):
    """2 epochs of 4 batches: 8 feedback-only batches, epoch 0, 4 more, epoch 1. Stopped after feedback-only
    batch 3 (first passes), again after 10 (the pass before epoch 1), then finished; and stopped mid-epoch 1
    by --max-steps: both equal the uninterrupted run bit for bit."""
    common = [*DRL_SMOKE, "--dataset", "npz", "--data-dir", str(tiny_npz), "--epochs", "2",
              "--set", "feedback.fb_epochs=2", "--set", "feedback.extra_fb_epochs=1"]
    straight, signalled, mid = tmp_path / "straight", tmp_path / "signalled", tmp_path / "mid"
    train_in_process(monkeypatch, *common, "--out", str(straight))
    for batches, args in ((3, common), (10, ["--resume", str(signalled)])):
        with monkeypatch.context() as patch:
            stop_after_feedback_only_batch(patch, batches)
            train_in_process(patch, *args, "--out", str(signalled))
        assert load(signalled)["feedback_only_batches"] == batches
    assert load(signalled)["step"] == 4
    train_in_process(monkeypatch, "--resume", str(signalled))
    train_in_process(monkeypatch, *common, "--max-steps", "6", "--out", str(mid))
    train_in_process(monkeypatch, "--resume", str(mid), "--max-steps", "8")
    reference = load(straight)
    assert reference["step"] == 8 and reference["feedback_only_batches"] == 12
    assert_same_run(reference, load(signalled))
    assert_same_run(reference, load(mid))


def test_precision_float64_trains_in_float64(tmp_path, monkeypatch, tiny_npz):
    out = tmp_path / "run"
    train_in_process(monkeypatch, *DRL_SMOKE, "--dataset", "npz", "--data-dir", str(tiny_npz), "--max-steps", "1",
                     "--set", "precision=float64", "--out", str(out))
    state = load(out)
    assert all(t.dtype == F64 for key in ("forward", "feedback") for t in state[key].values())


def test_mlp_layers_biases_and_xavier_initialisation():
    model = ModelConfig(arch="mlp", channels=(64, 64), activation="tanh", bias=(True, False, True),
                        init="xavier_normal")
    net = DTPNetwork(model, (1, 28, 28), 10, 0, DIRECT)
    linears = [layer for block in net.forward_blocks for layer in block.layers if isinstance(layer, nn.Linear)]
    assert [(l.in_features, l.out_features, l.bias is not None) for l in linears] == [
        (784, 64, True), (64, 64, False), (64, 10, True)]
    assert all(isinstance(block.layers[-1], nn.Tanh) for block in net.forward_blocks[:-1])
    assert float(linears[0].bias.detach().abs().max()) == 0.0
    assert float(linears[0].weight.detach().std()) == pytest.approx((2 / (784 + 64)) ** 0.5, rel=0.05)
    assert [q.linear.weight.shape for q in net.feedback_blocks] == [(64, 10), (64, 10)]
    assert torch.equal(net.forward_blocks[0].layers[1].weight,
                       DTPNetwork(model, (1, 28, 28), 10, 0).forward_blocks[0].layers[1].weight)


@pytest.mark.parametrize("assignments,message", [
    (["algorithm=dtp", "feedback.fb_epochs=2"], "fb_epochs and feedback.extra_fb_epochs are DRL's s-DDTP schedule"),
    (["algorithm=drl", "feedback.init_symmetric=true"], "DRL's feedback maps Q_i go from the output"),
    (["algorithm=drl", "feedback.samples=3"], "DRL draws one noise sample per feedback step"),
    (["feedback.betas=[0.9]"], "feedback.betas must be two numbers in \\[0, 1\\)"),
    (["algorithm=drl", "feedback.cuda_graphs=on"], "DRL's maps Q_i train eagerly"),
])
def test_drl_settings_are_checked(assignments, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.resolve(SMOKE, {}, assignments)


def test_per_block_forward_lists_must_match_the_network(tmp_path, monkeypatch, capsys, tiny_npz):
    from conftest import expect_error, script_in_process

    proc = script_in_process(monkeypatch, capsys, "train_sequential.py", *DRL_SMOKE, "--dataset", "npz",
                             "--data-dir", str(tiny_npz), "--set", "forward.lrs=[0.1,0.1]", "--out", str(tmp_path))
    expect_error(proc, "forward.lrs has 2 entries but the network has 6 forward blocks")


def test_train_parallel_refuses_drl_with_one_reason(monkeypatch):
    """DRL's loss for Q_i needs every later forward block, so its feedback phase is not per-block work."""
    import sys

    import train_parallel

    monkeypatch.setattr(sys, "argv", ["train_parallel.py", *DRL_SMOKE])
    with pytest.raises(UserError, match="--algorithm drl: the loss of each feedback map Q_i runs every forward block"):
        train_parallel.decide_start(train_parallel.parse_args(), world_size=2)
    assert not VARIANTS["drl"].feedback.inverts_forward
