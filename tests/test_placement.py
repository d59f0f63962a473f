"""Where ranks run: one rank per GPU or a clear refusal that names a launch that works, for simulated
GPU counts (the CUDA machine itself is not needed to decide placement)."""
import subprocess
import sys

import pytest

from conftest import ROOT, SMOKE, error_lines, script_env
from dtp.errors import UserError
from dtp.parallel.placement import place_rank
from dtp.parallel.planning import check_layout


def launch_flags(message: str) -> tuple[int, int]:
    """(nodes, ranks per node) from the refusal's suggested torchrun flags."""
    flags = dict(part.lstrip("-").split("=") for part in message.split("start ")[1].split(" (")[0].split())
    return int(flags.get("nnodes", 1)), int(flags["nproc_per_node"])


@pytest.mark.parametrize("gpus", [0, 1, 2, 8])
@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_every_layout_is_placed_one_rank_per_gpu_or_refused_with_one_that_works(gpus, replicas):
    for ranks in range(1, 13):
        try:
            devices = [place_rank(r, ranks, gpus, replicas) for r in range(ranks)]
        except UserError as exc:
            assert gpus and ranks > gpus, (ranks, gpus)
            nodes, per_node = launch_flags(str(exc))
            placed = [place_rank(r, per_node, gpus, replicas) for r in range(per_node)]
            assert len({p.device for p in placed}) == per_node and per_node <= gpus
            check_layout(128, 5, nodes * per_node, replicas, "auto")  # the suggested world suits the replicas
            continue
        if gpus == 0:
            assert {(p.device, p.backend) for p in devices} == {("cpu", "gloo")}
        else:
            assert [p.device for p in devices] == [f"cuda:{r}" for r in range(ranks)]
            assert {p.backend for p in devices} == {"nccl"}


def test_the_refusal_names_the_problem_and_the_fix():
    with pytest.raises(UserError, match="6 ranks on a node with 2 GPU\\(s\\) would share GPUs.*--nproc_per_node=2"):
        place_rank(0, 6, 2)
    with pytest.raises(UserError, match="start --nnodes=3 --nproc_per_node=2"):
        place_rank(0, 4, 2, replicas=3)


# Every rank sees one CUDA device: placement runs as on a GPU node, and refuses before NCCL is touched.
ONE_FAKE_GPU = """
import torch
torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 1
"""


@pytest.mark.slow
def test_two_ranks_on_one_gpu_stop_before_training_with_one_error_line(tmp_path, tiny_npz):
    (tmp_path / "sitecustomize.py").write_text(ONE_FAKE_GPU)
    env = {**script_env(1), "PYTHONPATH": f"{tmp_path}:{ROOT}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train_parallel.py"), "--config", SMOKE, "--dataset", "npz", "--data-dir", str(tiny_npz),
           "--out", str(tmp_path / "r")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert error_lines(proc.stderr) == [
        "error: 2 ranks on a node with 1 GPU(s) would share GPUs, and NCCL serves one process per GPU; start "
        "--nproc_per_node=1 (a rank trains several feedback blocks on its GPU)"], proc.stderr[-3000:]
    assert "NCCL error" not in proc.stderr and not (tmp_path / "r").exists()
