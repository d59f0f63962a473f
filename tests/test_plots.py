"""Pictures of a run: metrics.jsonl, the figures plot.py draws from it, and progress lines in a log file."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

from conftest import SMOKE, assert_ok, expect_error, run_ranks, script_in_process, train_in_process
from dtp.plots import accuracy_panels, angles_panels, draw, losses_panels, timing_panels
from dtp.progress import ProgressLines, progress_lines
from dtp.rundata import load_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STEPS_PER_EPOCH = 4  # tiny_npz: 64 images at batch size 16


def raw_records(run_dir: Path) -> list[dict]:
    """metrics.jsonl read line by line, independently of dtp's reader."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def logged(records: list[dict], kind: str, key: str, x: str = "step") -> tuple[list, list]:
    pairs = [(r[x], r[key]) for r in records if r["kind"] == kind and key in r]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def event_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar of a run's TensorBoard events by tag and step, read with TensorBoard's own reader."""
    scalars: dict[str, dict[int, float]] = {}
    for event_file in run_dir.glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(event_file), size_guidance={SCALARS: 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, {}).update({event.step: event.value for event in accumulator.Scalars(tag)})
    return scalars


def smoke_flags(tiny_npz: Path) -> list[str]:
    return ["--config", SMOKE, "--dataset", "npz", "--data-dir", str(tiny_npz), "--epochs", "2"]


@pytest.fixture(scope="module")
def sequential_run(tmp_path_factory, tiny_npz) -> Path:
    """Two epochs (8 steps) of smoke.yaml on tiny_npz, every step logged, angles every 2 steps."""
    out = tmp_path_factory.mktemp("sequential")
    with pytest.MonkeyPatch.context() as monkeypatch:
        train_in_process(monkeypatch, *smoke_flags(tiny_npz), "--out", str(out))
    return out


def assert_valid_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 300 and image.height > 200


def test_metrics_jsonl_records_what_tensorboard_records(sequential_run):
    records = raw_records(sequential_run)
    assert [r["kind"] for r in records].count("start") == 1 and records[0]["algorithm"] == "dtp"
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 9))
    assert [r["step"] for r in records if r["kind"] == "val"] == [4, 8]
    assert all(r["epoch"] == r["step"] / STEPS_PER_EPOCH for r in records)
    walls = [r["wall_s"] for r in records]
    assert walls == sorted(walls) and walls[-1] > 0
    scalars = {key for r in records if r["kind"] != "start" for key in r} - {"kind", "step", "epoch", "wall_s"}
    assert {"train/loss", "val/top1", "feedback_loss/block5", "forward_loss/block0", "alignment/angle_block1",
            "bp_comparison/angle_block0"} <= scalars
    events = event_scalars(sequential_run)
    assert scalars == set(events) - {"hparam/val_top1", "hparam/val_top5"}
    for tag in scalars:
        from_events = events[tag]
        steps, values = logged(records, "val" if tag.startswith("val/") else "train", tag)
        assert sorted(from_events) == steps, tag
        for step, value in zip(steps, values):
            assert from_events[step] == pytest.approx(value, rel=1e-6, abs=1e-30), (tag, step)


def test_plotted_curves_equal_logged_values(sequential_run, tmp_path):
    records = raw_records(sequential_run)
    runs = [load_run(sequential_run)]
    by_epoch, by_time = accuracy_panels(runs)
    epochs, top1 = logged(records, "val", "val/top1", "epoch")
    walls, _ = logged(records, "val", "val/top1", "wall_s")
    assert by_epoch.curves["dtp, sequential"] == (epochs, [100 * v for v in top1])
    assert by_time.curves["dtp, sequential"] == (walls, [100 * v for v in top1])
    angles = {panel.title: panel.curves for panel in angles_panels(runs)}
    assert sorted(angles) == [f"block {i}" for i in range(6)]
    for i in range(6):
        assert angles[f"block {i}"]["dtp, sequential: update vs BP gradient"] == logged(
            records, "train", f"bp_comparison/angle_block{i}")
    for i in range(1, 6):
        assert angles[f"block {i}"]["dtp, sequential: W vs $B^\\top$"] == logged(
            records, "train", f"alignment/angle_block{i}")
    feedback, forward = losses_panels(runs)
    assert feedback.curves == {f"dtp, sequential: block {i}": logged(records, "train", f"feedback_loss/block{i}")
                               for i in range(1, 6)}
    assert forward.curves == {f"dtp, sequential: block {i}": logged(records, "train", f"forward_loss/block{i}")
                              for i in range(6)}
    assert timing_panels(runs) == []  # a sequential run has no timing to draw
    # A figure holds exactly the panels' curves.
    figure = draw([feedback, forward], "losses")
    for axes, panel in zip(figure.axes, [feedback, forward], strict=True):
        assert {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in axes.lines} \
            == panel.curves


def test_an_old_run_without_metrics_jsonl_is_read_from_its_tensorboard_events(sequential_run, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(sequential_run, old, ignore=shutil.ignore_patterns("metrics.jsonl"))
    run, logged_run = load_run(old), load_run(sequential_run)
    assert run.label == "dtp, sequential"
    for kind, key, x in (("val", "val/top1", "epoch"), ("train", "feedback_loss/block1", "step"),
                         ("train", "alignment/angle_block2", "epoch")):
        xs, values = run.series(kind, key, x)
        expected_xs, expected = logged_run.series(kind, key, x)
        assert xs == expected_xs and values == pytest.approx(expected, rel=1e-6)


def test_a_resumed_run_logs_each_step_once_and_continues_the_clock(tmp_path, monkeypatch, tiny_npz,
                                                                  sequential_run):
    """Interrupted with --max-steps at step 3, resumed to step 6, then as if killed after logging step 6
    but before its checkpoint (the step-3 checkpoint put back), and resumed to the end."""
    resumed = tmp_path / "resumed"
    train_in_process(monkeypatch, *smoke_flags(tiny_npz), "--max-steps", "3", "--out", str(resumed))
    step3 = (resumed / "checkpoint.pt").read_bytes()
    train_in_process(monkeypatch, "--resume", str(resumed), "--max-steps", "6")
    assert max(r["step"] for r in raw_records(resumed)) == 6
    (resumed / "checkpoint.pt").write_bytes(step3)
    train_in_process(monkeypatch, "--resume", str(resumed))
    records = raw_records(resumed)
    assert [r["step"] for r in records if r["kind"] == "start"] == [0, 3]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 9))
    assert [r["step"] for r in records if r["kind"] == "val"] == [3, 4, 8]  # 3: the end of the --max-steps run
    walls = [r["wall_s"] for r in records]
    assert walls == sorted(walls)
    straight = raw_records(sequential_run)
    for key in ("train/loss", "feedback_loss/block2"):
        assert logged(records, "train", key) == logged(straight, "train", key)
    # Angles also at step 3, the --max-steps run's last step; the others equal the uninterrupted run's.
    angles = dict(zip(*logged(records, "train", "alignment/angle_block1")))
    straight_angles = dict(zip(*logged(straight, "train", "alignment/angle_block1")))
    assert sorted(angles) == [2, 3, 4, 6, 8] and {step: angles[step] for step in straight_angles} == straight_angles


def test_a_run_whose_stdout_is_a_file_prints_progress_lines(tmp_path, monkeypatch, capsys, tiny_npz):
    proc = script_in_process(monkeypatch, capsys, "train_sequential.py", *smoke_flags(tiny_npz),
                             "--set", "log.progress_s=0.001", "--out", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if " img/s | ETA " in line]
    assert [line.split(" | ")[0] for line in lines] == [
        f"epoch {(step - 1) // STEPS_PER_EPOCH} step {step}/8" for step in range(1, 9)]
    assert lines[-1].split(" | ")[2] == "ETA 0s" and lines[-1].split(" | ")[3].startswith("loss ")


def test_progress_lines_come_every_interval_and_at_epoch_ends_and_not_on_a_terminal(monkeypatch, capsys):
    now = [0.0]
    progress = ProgressLines(30.0, total_steps=10, steps_per_epoch=5, clock=lambda: now[0])
    for step in range(1, 11):
        now[0] += 12.0  # a line after 36 s (step 3), at the epoch end (5), after 36 s more (8), at the end (10)
        progress.after_step(step, images=16, step_s=8.0, loss=0.5)
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["epoch 0 step 3/10 | 2.0 img/s | ETA 1m24s | loss 0.5000",
                     "epoch 0 step 5/10 | 2.0 img/s | ETA 1m00s | loss 0.5000",
                     "epoch 1 step 8/10 | 2.0 img/s | ETA 24s | loss 0.5000",
                     "epoch 1 step 10/10 | 2.0 img/s | ETA 0s | loss 0.5000"]
    assert progress_lines(30.0, 10, 5, show=False) is None  # not a copy that logs
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert progress_lines(30.0, 10, 5, show=True) is None  # tqdm's bar shows progress on a terminal


@pytest.mark.parametrize("case,fragments", [
    ("missing", ["does not exist"]),
    ("a file", ["is not a directory"]),
    ("empty", ["neither metrics.jsonl nor TensorBoard events"]),
    ("events, no summary", ["no metrics.jsonl", "no summary.json", "resume it to the end"]),
    ("labels", ["--labels gives 2 label(s) for 1 run directories"]),
])
def test_plot_py_refuses_a_bad_run_directory_with_one_error_line(tmp_path, monkeypatch, capsys, sequential_run,
                                                                  case, fragments):
    target = tmp_path / "run"
    args = [str(target)]
    if case == "a file":
        target.write_text("not a run\n")
    elif case == "empty":
        target.mkdir()
    elif case == "events, no summary":
        shutil.copytree(sequential_run, target, ignore=shutil.ignore_patterns("metrics.jsonl", "summary.json"))
    elif case == "labels":
        args = [str(sequential_run), "--labels", "a", "b"]
    expect_error(script_in_process(monkeypatch, capsys, "plot.py", *args, "--out", str(tmp_path / "figures")),
                 *fragments)
    assert not (tmp_path / "figures").exists()


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, tiny_npz) -> Path:
    """sequential_run's training on 2 ranks (whole blocks): this file's one process launch."""
    out = tmp_path_factory.mktemp("p2")
    assert_ok(run_ranks(2, *smoke_flags(tiny_npz), "--split", "none", "--out", str(out)))
    return out


@pytest.mark.slow
def test_plot_py_on_a_sequential_and_a_2_rank_run_writes_valid_pngs(tmp_path, monkeypatch, capsys, sequential_run,
                                                                    two_rank_run):
    figures = tmp_path / "figures"
    proc = script_in_process(monkeypatch, capsys, "plot.py", str(sequential_run), str(two_rank_run),
                             "--out", str(figures), "--pdf")
    assert proc.returncode == 0, proc.stderr
    for name in ("accuracy", "angles", "losses", "timing"):
        assert_valid_png(figures / f"{name}.png")
        assert (figures / f"{name}.pdf").read_bytes()[:5] == b"%PDF-"
    assert "dtp, sequential: val top-1" in proc.stdout and "dtp, 2 ranks: val top-1" in proc.stdout
    runs = [load_run(sequential_run), load_run(two_rank_run)]
    by_epoch = accuracy_panels(runs)[0].curves
    assert by_epoch["dtp, 2 ranks"] == by_epoch["dtp, sequential"]  # the same weights, bit for bit
    records = raw_records(two_rank_run)
    timing = timing_panels(runs)
    assert [panel.title for panel in timing] == ["dtp, 2 ranks: rank 0", "dtp, 2 ranks: rank 1"]
    rank0, rank1 = (panel.curves for panel in timing)
    assert rank0 == {"compute": logged(records, "train", "parallel/rank0_compute_s"),
                     "wait": logged(records, "train", "parallel/rank0_wait_s")}
    assert rank1 == {name: logged(records, "train", f"parallel/rank1_{key}")
                     for key, name in (("compute_s", "compute"), ("comm_s", "communication"), ("wait_s", "wait"))}
    assert records[0]["world_size"] == 2 and records[0]["replicas"] == 1
