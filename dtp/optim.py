"""The optimisers a run may use (SGD with momentum, or Adam as parallel_dtp publishes), with eager state,
and the forward weights' optimiser with its learning-rate schedule.

Their per-parameter state is created up front as zeros, which behaves exactly like the lazily created
state on the first step and lets the parallel trainer ship a block's weights and optimiser state as one
flat vector from the first step on.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

import torch
from torch import Tensor, nn

from dtp.models import DTPNetwork

if TYPE_CHECKING:  # the config imports this module's OPTIMIZERS
    from dtp.config import ForwardConfig

OPTIMIZERS = ("sgd", "adam")
# The per-parameter state each optimiser keeps, in the order it travels in a flat state vector.
STATE_KEYS = {torch.optim.SGD: ("momentum_buffer",), torch.optim.Adam: ("exp_avg", "exp_avg_sq", "step")}


def make_optimizer(params: Iterable[nn.Parameter] | list[dict[str, Any]], kind: str, lr: float, momentum: float,
                   weight_decay: float, betas: tuple[float, ...] = (0.9, 0.999), eps: float = 1e-8,
                   capturable: bool = False) -> torch.optim.Optimizer:
    """SGD (momentum, weight decay) or Adam (betas, eps; momentum unused), its state created as zeros.

    `params` are parameters, or parameter groups with their own settings (e.g. a per-block lr and eps).
    `capturable` (a feedback loop captured as a CUDA graph): Adam keeps its step on the weights' device
    and computes its bias corrections there; SGD needs nothing.
    """
    params = list(params)
    if kind == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        for p in _parameters(optimizer):
            optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p)
    elif kind == "adam":
        optimizer = torch.optim.Adam(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                     capturable=capturable)
        for p in _parameters(optimizer):
            # As Adam itself creates it (a host scalar unless capturable), so its step is unchanged.
            step = torch.zeros((), device=p.device) if capturable else torch.tensor(0.0)
            optimizer.state[p].update(step=step, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
    else:
        raise ValueError(f"unknown optimizer {kind!r}; choose one of {', '.join(OPTIMIZERS)}")
    return optimizer


def _parameters(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def forward_parameter_groups(network: DTPNetwork, forward: ForwardConfig) -> list[dict[str, Any]]:
    """One group for all forward weights, or, with forward.lrs or forward.eps, one per block with its own
    values; forward.normalize_lr divides every lr by β."""
    scale = 1.0 / forward.beta if forward.normalize_lr else 1.0
    blocks = list(network.forward_blocks)
    if not forward.lrs and not forward.eps:
        return [{"params": list(network.forward_blocks.parameters()), "lr": forward.lr * scale}]
    lrs = forward.lrs or [forward.lr] * len(blocks)
    eps = forward.eps or [1e-8] * len(blocks)
    return [{"params": list(block.parameters()), "lr": lr * scale, "eps": e} for block, lr, e in zip(blocks, lrs, eps)]


def state_tensors(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """Every parameter's state tensors, parameter by parameter in STATE_KEYS order."""
    keys = STATE_KEYS[type(optimizer)]
    return [optimizer.state[p][key] for group in optimizer.param_groups for p in group["params"] for key in keys]


def build_forward_optimizer(
    network: DTPNetwork, forward: ForwardConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The forward weights' optimiser (forward.optimizer) and its per-epoch schedule (forward.scheduler);
    feedback lrs have none."""
    opt = make_optimizer(forward_parameter_groups(network, forward), forward.optimizer, forward.lr, forward.momentum,
                         forward.weight_decay, forward.betas)
    if forward.scheduler == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=forward.t_max, eta_min=forward.eta_min)
    elif forward.scheduler == "step":
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=forward.step_size, gamma=forward.gamma)
    else:
        sched = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)
    return opt, sched
