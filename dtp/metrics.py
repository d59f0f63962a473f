"""Running averages, accuracy and memory, in the style of pytorch/examples imagenet."""
from __future__ import annotations

import resource

import torch
from torch import Tensor


class AverageMeter:
    """Sample-weighted running mean of a scalar. A tensor value is summed where it lives, so updating
    reads nothing on the host; reading `avg` does."""

    def __init__(self) -> None:
        self.sum: float | Tensor = 0.0
        self.count = 0

    def update(self, value: float | Tensor, n: int = 1) -> None:
        self.sum = self.sum + value * n
        self.count += n

    @property
    def avg(self) -> float:
        return float(self.sum) / max(self.count, 1)


@torch.no_grad()
def topk_correct(logits: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> list[Tensor]:
    """Number of samples whose label is among the k highest logits, for each k (clipped to n_classes)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hits = top.eq(labels.unsqueeze(1))
    return [hits[:, : min(k, kmax)].any(dim=1).sum() for k in ks]


def peak_rss_mib() -> float:
    """This process's peak resident memory (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory_mib(device: torch.device) -> dict[str, float]:
    """This process's peak memory: resident (RSS) and, on a CUDA device, what tensors allocated there
    (torch.cuda.max_memory_allocated), as the published benchmark reports them."""
    memory = {"peak_rss_mib": peak_rss_mib()}
    if device.type == "cuda":
        memory["peak_cuda_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return memory


def format_memory(memory: dict[str, float]) -> str:
    text = f"peak RSS {memory['peak_rss_mib']:.0f} MiB"
    if "peak_cuda_allocated_mib" in memory:
        text += f", peak CUDA allocated {memory['peak_cuda_allocated_mib']:.0f} MiB"
    return text
