"""Every algorithm (DRL in both of its protocols) on every network: two training steps through
train_sequential.py, in this process."""
import json

import pytest
import torch

from conftest import SMOKE, load, train_in_process
from dtp.algorithm import VARIANTS
from dtp.config import ALGORITHMS, ARCHS, build
from dtp.models import DTPNetwork

# Narrow versions of each network on 32×32 inputs, and their number of trainable feedback blocks.
# The ResNets use ReLU as published: with ELU, TP's targets from an untrained G overflow at step 1.
NETWORKS = {
    "simple_vgg": (["model.channels=[4,4,8,8,8]"], 5),
    "lenet": (["model.channels=[4,8]", "model.hidden=16"], 3),
    "resnet18": (["model.channels=[4,4,8,8]", "model.activation=relu"], 5),
    "resnet34": (["model.channels=[4,4,8,8]", "model.activation=relu"], 5),
    "mlp": (["model.channels=[16,16]", "model.activation=tanh"], 2),
}
# DRL runs as p-DDTP (no feedback-only passes) unless given s-DDTP's: here one pass (4 batches) before step 1.
PROTOCOLS = {**{algorithm: (algorithm, []) for algorithm in ALGORITHMS},
             "drl s-DDTP": ("drl", ["feedback.fb_epochs=1", "feedback.extra_fb_epochs=1"])}


def block_lists(n: int, algorithm: str) -> list[str]:
    """Per-block settings for n feedback blocks; parallel_dtp as published (one step, Adam, samples)."""
    if algorithm == "parallel_dtp":
        return [f"feedback.iterations={[1] * n}", f"feedback.noise={[0.1] * n}", f"feedback.lr={[3e-4] * n}",
                "feedback.samples=3", "feedback.optimizer=adam", "forward.optimizer=adam", "forward.lr=0.0003"]
    if algorithm == "drl":  # Adam for both weight sets, as published
        return [f"feedback.iterations={[2] * n}", f"feedback.noise={[0.1] * n}", f"feedback.lr={[1e-3] * n}",
                "feedback.optimizer=adam", "forward.optimizer=adam", "forward.lr=0.001", "forward.beta=0.1"]
    return [f"feedback.iterations={[2] * n}", f"feedback.noise={[0.1] * n}", f"feedback.lr={[1e-3] * n}",
            "forward.lr=0.001"]


def test_every_network_is_in_the_matrix():
    assert set(NETWORKS) == set(ARCHS)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_two_steps_of_every_algorithm_on_every_network(tmp_path, monkeypatch, tiny_npz, arch, protocol):
    algorithm, protocol_sets = PROTOCOLS[protocol]
    sets, n_feedback = NETWORKS[arch]
    out = tmp_path / "run"
    args = ["--config", SMOKE, "--dataset", "npz", "--data-dir", str(tiny_npz), "--algorithm", algorithm,
            "--max-steps", "2", "--out", str(out), "--set", f"model.arch={arch}"]
    for assignment in sets + block_lists(n_feedback, algorithm) + protocol_sets:
        args += ["--set", assignment]
    train_in_process(monkeypatch, *args)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2
    state = load(out)
    run_cfg = build(state["config"])
    variant = VARIANTS[algorithm]
    start = DTPNetwork(run_cfg.model, (3, 32, 32), 10, run_cfg.seed, variant.feedback)
    # Every forward block learned; every trainable feedback module learned (bp has none to train), G_0 never.
    for i, block in enumerate(start.forward_blocks):
        assert any(not torch.equal(p, state["forward"][f"{i}.{name}"]) for name, p in block.named_parameters()), i
    for i, block in enumerate(start.feedback_blocks):
        changed = any(not torch.equal(p, state["feedback"][f"{i}.{name}"]) for name, p in block.named_parameters())
        assert changed == (variant.trains_feedback and i >= variant.feedback.first_trained), i
    if algorithm != "bp":
        # The output block's update is (a multiple of) BP's gradient, on every network.
        assert summary["bp_comparison"][f"block{n_feedback}"]["angle"] < 1e-2
        # W against Bᵀ exists for inverted blocks only; DRL's Q_i have no forward twin.
        assert len(summary["alignment"]) == (n_feedback + 1 if variant.feedback.inverts_forward else 1)
