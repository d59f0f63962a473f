"""benchmarks/step_time.py runs in both modes and reports what the README's benchmark rows quote
(no timing is asserted: only that each figure is there and positive)."""
import json
import runpy
import subprocess
import sys

import pytest

from conftest import ROOT, SMOKE, script_env

BENCHMARK = str(ROOT / "benchmarks" / "step_time.py")
SMALL = ["--config", SMOKE, "--batch-size", "16", "--steps", "1", "--warmup", "0", "--threads", "1", "--json"]


def test_sequential_mode_times_ours_the_baseline_and_the_split_bounds_and_reports_memory(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [BENCHMARK, *SMALL, "--bound-ranks", "2"])
    runpy.run_path(BENCHMARK, run_name="__main__")
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert len(result["block_feedback_s"]) == 5 and result["sec_per_step"] > 0
    assert result["speedup_over_baseline"] > 0 and result["batch_size"] == 16
    assert set(result["bounds"]) >= {"split_none", "split_auto"}
    assert len(result["bounds"]["split_auto"]["pieces"]) == 5
    assert result["memory"]["peak_rss_mib"] > 0 and "peak RSS" in out


@pytest.mark.slow
def test_parallel_mode_runs_the_ranks_under_torchrun_and_reports_each_rank_s_memory():
    proc = subprocess.run([sys.executable, BENCHMARK, *SMALL, "--parallel", "2", "--split", "none", "--no-baseline"],
                          env=script_env(1), capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["world_size"] == 2 and result["sec_per_step"] > 0 and 0 < result["efficiency"] <= 1
    assert set(result["memory_by_rank"]) == {"0", "1"}
    assert all(m["peak_rss_mib"] > 0 for m in result["memory_by_rank"].values())
    assert "rank 1: peak RSS" in proc.stdout
