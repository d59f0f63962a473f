"""What `--algorithm X` runs, pinned: the loss that trains the feedback weights, the target rule and the
forward update of each algorithm, against those rules written out here in float64.

Each case takes one training step through the Trainer that train_sequential.py builds, on a float64
network with plain SGD (no momentum, no weight decay), so a weight's change is −lr times its gradient.
The reference repeats the step from the same starting weights and the same noise with the rule the
algorithm is meant to use. A VARIANTS entry with the wrong loss or target rule fails here. DRL's entry
is pinned with its own order (targets from the Q's before their step) and Meulemans' local losses.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import SMOKE
from dtp import config as config_lib
from dtp.cli import build_network, sequential_trainer
from dtp.drl import TRAINING_STEP, drl_noise_generator
from dtp.models import DTPNetwork
from dtp.runtime import Runtime
from dtp.seeding import FEEDBACK_NOISE_STREAM, derive_seed

# What each algorithm is: (the feedback weights' loss, the target rule). None: no feedback weights.
RULES = {
    "dtp": ("ldrl", "difference"),
    "vanilla_dtp": ("reconstruction", "difference"),
    "tp": ("reconstruction", "plain"),
    "parallel_dtp": ("ldrl", "difference"),
    "bp": (None, "backprop"),
    "drl": ("drl", "direct"),
}

FEEDBACK_LR, FORWARD_LR, BETA, SAMPLES, BATCH = 0.05, 0.1, 0.7, 2, 8
NOISE = [0.3, 0.2]
INPUT = (2, 8, 8)  # channels [3, 4]: conv-pool 8→4, conv-pool 4→2, linear; feedback blocks 1 and 2


def test_every_algorithm_has_a_pinned_rule():
    assert set(RULES) == set(config_lib.ALGORITHMS)


def run_config(algorithm: str) -> dict:
    iterations = 1 if algorithm == "parallel_dtp" else 2  # parallel_dtp takes one fused step per batch
    samples = 1 if algorithm == "drl" else SAMPLES  # DRL draws one sample per step
    sets = ["model.channels=[3,4]", f"feedback.iterations=[{iterations},{iterations}]",
            f"feedback.noise={NOISE}", f"feedback.lr=[{FEEDBACK_LR},{FEEDBACK_LR}]", "feedback.momentum=0",
            "feedback.optimizer=sgd", f"feedback.samples={samples}", "forward.optimizer=sgd", "forward.momentum=0",
            "forward.weight_decay=0", f"forward.lr={FORWARD_LR}", f"forward.beta={BETA}", "seed=3"]
    return config_lib.resolve(SMOKE, {"algorithm": algorithm}, sets)


def sum_per_row(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).sum(1)


def ldrl(f, g, x: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """L-DRL: mean over samples and rows of −2 Σ dx·(G(F(x+dx)) − G(y)) + Σ (G(y+dy) − G(y))²; G(y) and
    G(y+dy) unpool with F(x)'s indices, G(F(x+dx)) with F(x+dx)'s."""
    y, idx = f(x)
    r = g(y, idx)
    total = 0.0
    for k in range(dx.shape[0]):
        y_noisy, idx_noisy = f(x + dx[k])
        dr = g(y_noisy, idx_noisy) - r
        dr_y = g(y + dy[k], idx) - r
        total = total + (-2 * sum_per_row(dx[k] * dr) + sum_per_row(dr_y.square())).mean()
    return total / dx.shape[0]


def reconstruction(f, g, x: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Noisy reconstruction: mean over samples and rows of Σ ((x + dx) − G(F(x + dx)))², F(x+dx)'s indices."""
    total = 0.0
    for k in range(dx.shape[0]):
        y_noisy, idx_noisy = f(x + dx[k])
        total = total + sum_per_row((x + dx[k] - g(y_noisy, idx_noisy)).square()).mean()
    return total / dx.shape[0]


def sgd_steps(module: torch.nn.Module, losses_of_steps) -> float:
    """A plain SGD step on `module` per loss the iterable yields (each computed after the previous step);
    returns their mean."""
    losses = []
    for loss in losses_of_steps:
        grads = torch.autograd.grad(loss, list(module.parameters()), allow_unused=True)
        with torch.no_grad():
            for p, grad in zip(module.parameters(), grads):
                if grad is not None:
                    p -= FEEDBACK_LR * grad
        losses.append(float(loss.detach()))
    return sum(losses) / len(losses)


def drl_losses(net: DTPNetwork, i: int, h: torch.Tensor, cfg, step: int):
    """Q_i's DRL losses, one per iteration: (1/σ²) mean over rows and units of (Q_i(f_{i→L}(h_i + σε) − h_L) − σε)²,
    σε drawn from the run's generator for (seed, training step, map i, step)."""
    def to_output(v):
        for block in net.forward_blocks[i + 1:]:
            v = block(v)[0]
        return v
    generator = drl_noise_generator(cfg.seed, TRAINING_STEP, i, step, torch.device("cpu"))
    sigma, q = NOISE[i], net.feedback_blocks[i]
    with torch.no_grad():
        h_out = to_output(h)
    for _ in range(cfg.feedback.iterations[i]):
        noise = sigma * torch.randn(h.shape, generator=generator, dtype=h.dtype)
        with torch.no_grad():
            delta = to_output(h + noise) - h_out
        yield ((delta @ q.linear.weight.t()).reshape(h.shape) - noise).square().mean() / sigma**2


def reference_feedback_training(net: DTPNetwork, cfg: dict, x: torch.Tensor, rule: str, step: int) -> list[float]:
    """k_i plain SGD steps on each G_i (DRL: Q_i) with the rule's loss and the run's noise; returns each block's mean
    loss."""
    loss_of = ldrl if rule == "ldrl" else reconstruction
    with torch.no_grad():
        inputs = [x]
        for block in net.forward_blocks[:-1]:
            inputs.append(block(inputs[-1])[0])
    if rule == "drl":
        return [sgd_steps(net.feedback_blocks[i], drl_losses(net, i, inputs[i + 1], cfg, step))
                for i in range(net.n_feedback)]
    mean_losses = []
    for i in range(1, net.n_feedback + 1):
        f, g, h = net.forward_blocks[i], net.feedback_blocks[i], inputs[i]
        # The run's noise, written out: one generator per (seed, block, step), each iteration dx then dy.
        noise = torch.Generator().manual_seed(derive_seed(FEEDBACK_NOISE_STREAM, cfg.seed, i, step))
        with torch.no_grad():
            y = f(h)[0]
        draws = ((NOISE[i - 1] * torch.randn((SAMPLES, *h.shape), generator=noise, dtype=h.dtype),
                  NOISE[i - 1] * torch.randn((SAMPLES, *y.shape), generator=noise, dtype=y.dtype))
                 for _ in range(cfg.feedback.iterations[i - 1]))
        mean_losses.append(sgd_steps(g, (loss_of(f, g, h, dx, dy) for dx, dy in draws)))
    return mean_losses


def reference_forward_gradients(net: DTPNetwork, x: torch.Tensor, labels: torch.Tensor, rule: str) -> list:
    """The forward weights' gradient: BP's of the mean cross-entropy, or that of
    L_F = Σ_i ½ mean_b ‖h_i − t_i‖² with t_N = h_N − β ∂CE_sum/∂h_N and, going down,
    t_{i−1} = h_{i−1} + G_i(t_i) − G_i(h_i) (difference) or t_{i−1} = G_i(t_i) (plain); or DRL's (direct)."""
    params = list(net.forward_blocks.parameters())
    if rule == "backprop":
        return list(torch.autograd.grad(F.cross_entropy(net(x), labels), params))
    hs, indices, h = [], [], x
    for block in net.forward_blocks:
        h, idx = block(h.detach())
        hs.append(h)
        indices.append(idx)
    if rule == "direct":
        return list(torch.autograd.grad(drl_forward_loss(net, hs, labels), params))
    with torch.no_grad():
        logits = hs[-1]
        targets = [logits - BETA * (torch.softmax(logits, 1) - F.one_hot(labels, 10).double())]
        for i in range(len(hs) - 1, 0, -1):
            g, t = net.feedback_blocks[i], targets[0]
            if rule == "difference":
                targets.insert(0, hs[i - 1] + g(t, indices[i]) - g(hs[i], indices[i]))
            else:
                targets.insert(0, g(t, indices[i]))
    loss = sum(0.5 * sum_per_row((h - t).square()).mean() for h, t in zip(hs, targets))
    return list(torch.autograd.grad(loss, params))


def drl_forward_loss(net: DTPNetwork, hs: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """DRL: t_L = h_L − β ∂CE_mean/∂h_L, t_i = h_i + Q_i (t_L − h_L) for every hidden block, and Meulemans'
    local losses: mean over all elements of (h_i − t_i)² for a conv block, (1/B) Σ_b ‖h_i − t_i‖² for a linear one."""
    with torch.no_grad():
        logits = hs[-1]
        t_out = logits - BETA * (torch.softmax(logits, 1) - F.one_hot(labels, 10).double()) / BATCH
        targets = [h + ((t_out - logits) @ q.linear.weight.t()).reshape(h.shape)
                   for h, q in zip(hs[:-1], net.feedback_blocks)] + [t_out]
    return sum((h - t).square().mean() if h.dim() > 2 else sum_per_row((h - t).square()).mean()
               for h, t in zip(hs, targets))


@pytest.mark.parametrize("algorithm", list(RULES))
def test_each_algorithm_trains_with_its_own_feedback_loss_and_target_rule(algorithm):
    feedback_rule, target_rule = RULES[algorithm]
    cfg = run_config(algorithm)
    network = build_network(cfg, INPUT, 10).double()
    start = copy.deepcopy(network)
    trainer = sequential_trainer(cfg, network, Runtime(torch.device("cpu")))
    gen = torch.Generator().manual_seed(7)
    x = torch.randn((BATCH, *INPUT), generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 10, (BATCH,), generator=gen)
    step = 5
    trainer.step = step
    result, _ = trainer.train_batch(x, labels)

    reference = copy.deepcopy(start)
    if target_rule == "direct":  # DRL's targets come from the Q's as they were before this step's feedback step
        gradients = reference_forward_gradients(reference, x, labels, target_rule)
    if feedback_rule is not None:
        losses = reference_feedback_training(reference, cfg, x, feedback_rule, step)
        # The reported loss is accumulated in float32 (the weights below carry the float64 comparison).
        assert [float(l) for l in result.feedback_losses] == pytest.approx(losses, rel=1e-6)
        for name, trained in network.feedback_blocks.state_dict().items():
            expected = reference.feedback_blocks.state_dict()[name]
            torch.testing.assert_close(trained, expected, rtol=1e-9, atol=1e-12, msg=f"feedback {name}")
    else:
        assert result.feedback_losses == []
    if target_rule != "direct":
        gradients = reference_forward_gradients(reference, x, labels, target_rule)
    for (name, trained), before, grad in zip(network.forward_blocks.named_parameters(),
                                             start.forward_blocks.parameters(), gradients, strict=True):
        torch.testing.assert_close(trained.detach(), before.detach() - FORWARD_LR * grad, rtol=1e-9, atol=1e-12,
                                   msg=f"forward {name}")
