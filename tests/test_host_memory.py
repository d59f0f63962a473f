"""The CPU runtime keeps freed host memory for reuse (dtp.runtime.keep_freed_host_memory): without it,
glibc hands every large temporary back to the OS when it is freed, and each feedback iteration
page-faults it in again."""
import ctypes
import resource

import pytest
import torch

from dtp.runtime import Runtime

BLOCK = 64 << 20  # above glibc's largest automatic mmap threshold (32 MiB): always fresh pages by default
PAGES = BLOCK // resource.getpagesize()


def page_faults_of(churn) -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    churn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def c_library_has_mallopt() -> bool:
    try:
        return hasattr(ctypes.CDLL(None), "mallopt")
    except (OSError, TypeError):  # no process-wide symbol table (Windows)
        return False


def allocate_and_free_ten_times() -> None:
    for _ in range(10):
        torch.empty(BLOCK, dtype=torch.uint8).fill_(1)


@pytest.mark.skipif(not c_library_has_mallopt(), reason="the C library is not glibc (no mallopt)")
def test_a_cpu_runtime_reuses_freed_blocks_instead_of_faulting_in_fresh_pages():
    Runtime(torch.device("cpu"))
    allocate_and_free_ten_times()  # the heap grows to the block's size once
    # Without the setting: 10 × PAGES faults (16,384 pages of 4 KiB each time); with it, none beyond noise.
    assert page_faults_of(allocate_and_free_ten_times) < PAGES // 10
