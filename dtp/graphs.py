"""One feedback block's training loop, kept for the whole run: its noise and, on CUDA with
`feedback.cuda_graphs`, the loop captured once as a CUDA graph and replayed every step; and the blocks a
process trains on concurrent CUDA streams (docs/design.md §11).

On the CPU, and with the switch off (the default until it has been measured on a GPU), the loop runs
eagerly: the same buffers, the same kernels, the same numbers.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from dtp.errors import ConfigError
from dtp.seeding import BlockNoise

GRAPH_SETTINGS = ("auto", "on", "off")
EAGER_STEPS = 2  # eager steps before capture: the allocator, cuBLAS and the optimiser state settle first


def graphs_enabled(setting: str, device: torch.device) -> bool:
    """feedback.cuda_graphs for this process: `auto` means on exactly when it computes on CUDA."""
    if setting == "on" and device.type != "cuda":
        raise ConfigError(f"feedback.cuda_graphs is on, but this process computes on {device.type}; "
                          "CUDA graphs need a GPU: set it to auto or off")
    return device.type == "cuda" and setting in ("auto", "on")


class BlockLoop:
    """Block i's k_i feedback iterations, run by `loop(x, noise)` on a started BlockNoise.

    Captured: after EAGER_STEPS eager steps the loop is recorded once on a fixed input buffer; each later
    step copies its input in, re-seeds the noise generator (registered with the graph, so the replay
    draws what an eager step after the same seeding draws) and replays. A batch of another shape (a
    short last batch) or a gradient sum over ranks (gloo and host-side collectives cannot be captured)
    runs eagerly.
    """

    def __init__(self, device: torch.device, graphed: bool) -> None:
        self.noise = BlockNoise(device)
        self.graphed = graphed
        self.eager_steps = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_x: Tensor | None = None
        self.static_loss: Tensor | None = None

    def run(self, loop: Callable[[Tensor, BlockNoise], Tensor], x: Tensor, collective: bool) -> Tensor:
        """The loop's mean loss on x; the noise must have been started for this step."""
        if not self.graphed or collective or (self.graph is not None and x.shape != self.static_x.shape):
            return loop(x, self.noise)
        if self.graph is None and self.eager_steps < EAGER_STEPS:
            self.eager_steps += 1
            return self._warm_up(loop, x)
        if self.graph is None:
            self._capture(loop, x)
        self.static_x.copy_(x)
        self.graph.replay()
        return self.static_loss.clone()

    def _warm_up(self, loop: Callable[[Tensor, BlockNoise], Tensor], x: Tensor) -> Tensor:
        """An eager step on a side stream, as capture wants its warm-up: lazily created per-stream state
        (autograd, cuBLAS workspaces) then exists before recording starts."""
        caller = torch.cuda.current_stream(x.device)
        side = torch.cuda.Stream(x.device)
        side.wait_stream(caller)
        with torch.cuda.stream(side):
            loss = loop(x, self.noise)
        caller.wait_stream(side)
        loss.record_stream(caller)
        return loss

    def _capture(self, loop: Callable[[Tensor, BlockNoise], Tensor], x: Tensor) -> None:
        """Record the loop; recording runs nothing, so the step's own replay follows. The generator is
        seeded for this step already, and capturing leaves its seed where it was."""
        seed = self.noise.generator.initial_seed()
        self.static_x = x.clone()
        self.graph = torch.cuda.CUDAGraph()
        self.graph.register_generator_state(self.noise.generator)
        with torch.cuda.graph(self.graph):
            self.static_loss = loop(self.static_x, self.noise)
        self.noise.generator.manual_seed(seed)


def on_streams(device: torch.device, runs: dict[int, Callable[[], Tensor]],
               streams: dict[int, torch.cuda.Stream]) -> dict[int, Tensor]:
    """Each block's run on a CUDA stream of its own, concurrently; eagerly one after the other elsewhere.

    The blocks of a step are independent (docs/design.md §4): each reads its own input and writes only
    its own feedback weights. Their losses are returned on the caller's stream, after every block is done.
    `streams` keeps each block's stream from step to step.
    """
    if device.type != "cuda" or len(runs) < 2:
        return {i: run() for i, run in runs.items()}
    caller = torch.cuda.current_stream(device)
    losses = {}
    for i, run in runs.items():
        if i not in streams:  # created once per run, not on every step
            streams[i] = torch.cuda.Stream(device)
        stream = streams[i]
        stream.wait_stream(caller)
        with torch.cuda.stream(stream):
            losses[i] = run()
    for i in runs:
        caller.wait_stream(streams[i])
    for loss in losses.values():
        loss.record_stream(caller)
    return losses
