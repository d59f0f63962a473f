"""train_sequential.py as users run it: outputs, exact resume, and clear errors on bad input."""
import json
import math
import signal
import subprocess
import sys

import pytest
import torch

from conftest import (
    ROOT, SMOKE, assert_ok, event_tags, expect_error, feedback_optimizer_state, load, max_relative_difference,
    optimizer_state, run_script, scalar_values, script_env, script_in_process, train_in_process,
)
from dtp.stopping import EarlyStopping


def test_smoke_run_writes_checkpoint_summary_and_tensorboard(tmp_path, monkeypatch, tiny_npz):
    out = tmp_path / "run"
    train_in_process(monkeypatch, "--config", SMOKE, "--dataset", "npz", "--data-dir", str(tiny_npz),
                     "--max-steps", "3", "--out", str(out))
    summary = json.loads((out / "summary.json").read_text())
    for key in ("val_top1", "val_top5", "steps", "epochs", "wall_time_s", "train_images_per_s"):
        assert key in summary
    assert summary["steps"] == 3 and 0.0 <= summary["val_top1"] <= summary["val_top5"] <= 1.0
    ckpt = load(out)
    for key in ("forward", "feedback", "step", "epoch", "forward_optimizer", "scheduler", "feedback_optimizers",
                "rng", "config"):
        assert key in ckpt
    assert ckpt["step"] == 3 and ckpt["config"]["dataset"] == "npz"
    tags = event_tags(out)
    for tag in ("train/loss", "train/top1", "train/forward_lr", "train/images_per_s", "val/top1", "val/top5",
                "val/loss", "feedback_loss/block1", "forward_loss/block0", "alignment/angle_block1",
                "alignment/distance_block5", "alignment/whole_tensor_angle_block1", "bp_comparison/angle_block0",
                "bp_comparison/distance_block5", "bp_comparison/angle/block0.layers.0.weight",
                "bp_comparison/distance/block5.layers.1.bias", "config/text_summary", "hparam/val_top1"):
        assert tag in tags, tag
    # The last comparison with backprop (step 3, the end): the output block's update is BP's gradient.
    assert summary["bp_comparison"]["step"] == 3 and summary["alignment"]["step"] == 3
    assert summary["bp_comparison"]["block5"]["angle"] < 1e-2
    # summary.json holds the figures logged at the last step, every block's.
    for i in range(6):
        logged = scalar_values(out, f"bp_comparison/angle_block{i}")[3]
        assert summary["bp_comparison"][f"block{i}"]["angle"] == pytest.approx(logged, rel=1e-6)
    assert set(summary["alignment"]) == {"step", *[f"block{i}" for i in range(1, 6)]}


def assert_same_run(a, b):
    assert a["step"] == b["step"]
    for key in ("forward", "feedback"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name}"
    for x, y in zip(feedback_optimizer_state(a), feedback_optimizer_state(b), strict=True):
        assert torch.equal(x, y)
    for x, y in zip(optimizer_state(a["forward_optimizer"]), optimizer_state(b["forward_optimizer"]), strict=True):
        assert torch.equal(x, y)
    assert a["scheduler"] == b["scheduler"]


PARALLEL_DTP = ["--set", "feedback.iterations=[1,1,1,1,1]", "--set", "feedback.samples=3", "--set",
                "feedback.optimizer=adam", "--set", "forward.optimizer=adam", "--set", "forward.lr=0.001"]


@pytest.mark.parametrize("algorithm,flags", [("dtp", []), ("bp", []), ("parallel_dtp", PARALLEL_DTP)])
def test_resume_equals_uninterrupted(tmp_path, monkeypatch, tiny_npz, algorithm, flags):
    common = ["--config", SMOKE, "--dataset", "npz", "--data-dir", str(tiny_npz), "--algorithm", algorithm, *flags]
    straight, split, mid, elsewhere = tmp_path / "straight", tmp_path / "split", tmp_path / "mid", tmp_path / "else"
    train_in_process(monkeypatch, *common, "--epochs", "2", "--out", str(straight))
    # One epoch, then resumed for one more into another directory (--resume with --out).
    train_in_process(monkeypatch, *common, "--epochs", "1", "--out", str(split))
    assert load(split)["step"] == 4
    first_epoch = (split / "checkpoint.pt").read_bytes()
    train_in_process(monkeypatch, "--resume", str(split), "--epochs", "2", "--out", str(elsewhere))
    assert (split / "checkpoint.pt").read_bytes() == first_epoch  # the resumed run is left as it was
    # Interrupted mid-epoch, then resumed into its own directory.
    train_in_process(monkeypatch, *common, "--epochs", "2", "--max-steps", "3", "--out", str(mid))
    train_in_process(monkeypatch, "--resume", str(mid))
    reference = load(straight)
    assert reference["step"] == 8
    assert_same_run(reference, load(elsewhere))
    assert_same_run(reference, load(mid))


def test_unknown_config_key_is_an_error(tmp_path, monkeypatch, capsys):
    proc = script_in_process(monkeypatch, capsys, "train_sequential.py", "--config", SMOKE,
                             "--set", "feedback.iteration=[1,2]", "--out", str(tmp_path / "r"))
    expect_error(proc, "unknown config key 'feedback.iteration'", "feedback.iterations")


def test_block_list_of_wrong_length_names_both_numbers(tmp_path, monkeypatch, capsys, tiny_npz):
    proc = script_in_process(monkeypatch, capsys, "train_sequential.py", "--config", SMOKE, "--dataset", "npz",
                             "--data-dir", str(tiny_npz), "--set", "feedback.noise=[0.1,0.1,0.1,0.1]",
                             "--out", str(tmp_path / "r"))
    expect_error(proc, "feedback.noise has 4 entries", "5 trainable feedback blocks")


def test_missing_dataset_files_say_what_is_expected_where(tmp_path, monkeypatch, capsys):
    proc = script_in_process(monkeypatch, capsys, "train_sequential.py", "--config", SMOKE, "--dataset", "cifar10",
                             "--data-dir", str(tmp_path), "--out", str(tmp_path / "r"))
    expect_error(proc, "data_batch_1", "--download")
    proc = script_in_process(monkeypatch, capsys, "train_sequential.py", "--config", SMOKE, "--dataset", "imagenet32",
                             "--data-dir", str(tmp_path), "--out", str(tmp_path / "r"))
    expect_error(proc, "train_data_batch_1", "val_data")


@pytest.mark.parametrize("args,fragments", [
    (["--config", "{tmp}/nope.yaml"], ["nope.yaml"]),
    (["--config", SMOKE, "--set", "model.arch=resnet"], ["model.arch"]),
    (["--resume", "{tmp}"], ["no checkpoint"]),
    (["--config", SMOKE, "--set", "model.channels=[8,8,8,8,8,8]", "--out", "{tmp}/r"], ["does not fit 32x32"]),
    (["--config", SMOKE, "--resume", "auto"], ["--resume auto needs --out"]),
    (["--config", SMOKE, "--max-steps", "0", "--out", "{tmp}/r"], ["--max-steps must be positive, got 0"]),
    (["--config", SMOKE, "--max-steps", "-3", "--out", "{tmp}/r"], ["--max-steps must be positive, got -3"]),
])
def test_bad_values_and_resume_paths_are_errors(tmp_path, monkeypatch, capsys, tiny_npz, args, fragments):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--config" in args:  # the tiny data: a network that does not fit it is found without generating shapes
        args += ["--dataset", "npz", "--data-dir", str(tiny_npz)]
    expect_error(script_in_process(monkeypatch, capsys, "train_sequential.py", *args), *fragments)


@pytest.mark.slow
def test_the_script_itself_exits_2_with_one_error_line():
    """The tests above run main() in-process; this one checks the real process's exit code and stderr."""
    expect_error(run_script("train_sequential.py", "--config", SMOKE, "--set", "feedback.iteration=[1,2]"),
                 "unknown config key")


def test_nan_loss_stops_with_an_error_and_keeps_the_checkpoint(tmp_path, monkeypatch, capsys, tiny_npz):
    out = tmp_path / "run"
    common = ["--config", SMOKE, "--dataset", "npz", "--data-dir", str(tiny_npz), "--out", str(out)]
    train_in_process(monkeypatch, *common, "--epochs", "1")
    before = (out / "checkpoint.pt").read_bytes()
    proc = script_in_process(monkeypatch, capsys, "train_sequential.py", "--resume", str(out), "--epochs", "2",
                             "--set", "feedback.lr=[1.0e+30,1.0e-3,1.0e-3,1.0e-3,1.0e-3]")
    expect_error(proc, "not finite", "feedback.lr")
    assert (out / "checkpoint.pt").read_bytes() == before


READY = "SIGUSR1 or SIGTERM stops with a checkpoint"


def start_and_signal_when_ready(out, sig: int, *args: str) -> tuple[int, str, str]:
    """Start a sequential run, send `sig` once it says its handler is installed; return (code, stdout, stderr)."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_sequential.py"), *args, "--out", str(out)],
                            cwd=ROOT, env=script_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if READY in line:
            proc.send_signal(sig)
            break
    stdout, stderr = proc.communicate(timeout=300)
    return proc.returncode, "".join(seen) + stdout, stderr


@pytest.mark.slow
def test_sigusr1_checkpoints_and_resume_continues_exactly(tmp_path, monkeypatch, tiny_npz):
    common = ["--config", SMOKE, "--dataset", "npz", "--data-dir", str(tiny_npz), "--epochs", "50"]
    out, straight = tmp_path / "signalled", tmp_path / "straight"
    code, stdout, stderr = start_and_signal_when_ready(out, signal.SIGUSR1, *common)
    assert code == 0, stderr
    assert "SIGUSR1 received: stopped at step" in stdout + stderr
    stopped_at = load(out)["step"]
    assert 0 < stopped_at < 200
    target = str(stopped_at + 3)
    train_in_process(monkeypatch, "--resume", str(out), "--max-steps", target)
    train_in_process(monkeypatch, *common, "--max-steps", target, "--out", str(straight))
    assert_same_run(load(straight), load(out))


@pytest.mark.slow
def test_sigterm_stops_the_run_with_a_checkpoint_at_the_step_it_reached(tmp_path, tiny_npz):
    out = tmp_path / "run"
    code, stdout, stderr = start_and_signal_when_ready(out, signal.SIGTERM, "--config", SMOKE, "--dataset", "npz",
                                                       "--data-dir", str(tiny_npz), "--epochs", "50")
    assert code == 0, stderr
    line = next(l for l in (stdout + stderr).splitlines() if "SIGTERM received: stopped at step" in l)
    assert load(out)["step"] == int(line.split("stopped at step ")[1].split()[0]) < 200


@pytest.mark.slow
def test_a_kill_in_the_middle_of_writing_a_checkpoint_leaves_the_previous_one(tmp_path):
    """save_checkpoint writes a temporary file and renames it; SIGKILL half-way through the write."""
    killer = f"""
import os, signal, sys, torch
sys.path.insert(0, {str(ROOT)!r})
from dtp.checkpoint import save_checkpoint
save_checkpoint({str(tmp_path)!r}, {{"step": 1, "w": torch.ones(1000)}})
def half_then_die(obj, f):
    f.write(b"x" * 4096)
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = half_then_die
save_checkpoint({str(tmp_path)!r}, {{"step": 2, "w": torch.zeros(1000)}})
"""
    proc = subprocess.run([sys.executable, "-c", killer], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(1000))


class OpensAFile:
    """Unpickling this calls open(path, 'w'): the kind of code a foreign checkpoint could run."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_a_checkpoint_carrying_a_pickled_object_is_refused_without_running_it(tmp_path, monkeypatch, capsys,
                                                                                tiny_npz):
    out, marker = tmp_path / "run", tmp_path / "code-ran"
    train_in_process(monkeypatch, "--config", SMOKE, "--dataset", "npz", "--data-dir", str(tiny_npz),
                     "--max-steps", "1", "--out", str(out))
    state = load(out)
    state["config"]["note"] = OpensAFile(marker)
    torch.save(state, out / "checkpoint.pt")
    proc = script_in_process(monkeypatch, capsys, "train_sequential.py", "--resume", str(out))
    expect_error(proc, "refused", "checkpoint.pt")
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [proc.stderr.strip()]  # one line
    assert not marker.exists()


def cosine_lr(epoch: int, lr: float, t_max: int, eta_min: float) -> float:
    return eta_min + (lr - eta_min) * (1 + math.cos(math.pi * epoch / t_max)) / 2


def test_forward_schedules_step_per_epoch(tmp_path, monkeypatch, capsys, tiny_npz):
    """cosine (T_max, eta_min), step (step_size, gamma) and none; the lr is logged before each epoch's steps.
    BP, as every algorithm's Trainer builds the same forward optimiser and schedule, and BP's step is cheapest."""
    common = ["--config", SMOKE, "--algorithm", "bp", "--dataset", "npz", "--data-dir", str(tiny_npz),
              "--epochs", "3", "--set", "forward.lr=0.04", "--set", "forward.step_size=2", "--set", "forward.gamma=0.5",
              "--set", "forward.t_max=4", "--set", "forward.eta_min=0.001"]
    # lr during epochs 0, 1, 2, and after the third epoch's step of the schedule
    expected = {
        "cosine": ([cosine_lr(e, 0.04, 4, 0.001) for e in range(3)], cosine_lr(3, 0.04, 4, 0.001)),
        "step": ([0.04, 0.04, 0.02], 0.02),
        "none": ([0.04, 0.04, 0.04], 0.04),
    }
    for scheduler, (lrs, after) in expected.items():
        out = tmp_path / scheduler
        train_in_process(monkeypatch, *common, "--set", f"forward.scheduler={scheduler}", "--out", str(out))
        assert load(out)["forward_optimizer"]["param_groups"][0]["lr"] == pytest.approx(after)
        logged = scalar_values(out, "train/forward_lr")
        assert [logged[s] for s in (4, 8, 12)] == pytest.approx(lrs)  # the last step of each epoch
    expect_error(script_in_process(monkeypatch, capsys, "train_sequential.py", *common,
                                   "--set", "forward.scheduler=linear"), "forward.scheduler", "cosine, step, none")


def test_early_stopping_counts_from_the_last_improvement_by_more_than_min_delta():
    stopping = EarlyStopping(patience=2, min_delta=0.01)
    decisions = [stopping.update(top1) for top1 in (0.50, 0.505, 0.52, 0.525, 0.529)]
    # 0.505 is within min_delta of 0.50 (one bad evaluation); 0.52 beats it by more and resets the count;
    # 0.525 and 0.529 are within min_delta of 0.52: the second of them ends the run.
    assert decisions == [False, False, False, False, True]
    assert stopping.best == 0.52
    assert not EarlyStopping(patience=0, min_delta=0.0).update(0.1)  # patience 0 never stops


def test_early_stopping_ends_the_run_and_resumes_with_its_count(tmp_path, monkeypatch, capsys, tiny_npz):
    """A forward lr of 1e-12 leaves val top-1 where it is: the best is the first evaluation, and with
    patience 2 the run stops after the third epoch, also across a resume after the first. BP: the stopping
    rule is the Trainer's, the same for every algorithm."""
    common = ["--config", SMOKE, "--algorithm", "bp", "--dataset", "npz", "--data-dir", str(tiny_npz),
              "--set", "forward.lr=1.0e-12", "--set", "early_stopping.patience=2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    proc = script_in_process(monkeypatch, capsys, "train_sequential.py", *common, "--epochs", "10",
                             "--out", str(straight))
    assert proc.returncode == 0, proc.stderr
    assert "early stopping" in proc.stdout + proc.stderr
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["stopped_early"] and summary["steps"] == 12 and summary["best_val_top1"] == summary["val_top1"]
    train_in_process(monkeypatch, *common, "--epochs", "1", "--out", str(resumed))
    train_in_process(monkeypatch, "--resume", str(resumed), "--epochs", "10")
    assert json.loads((resumed / "summary.json").read_text())["steps"] == 12
    assert_same_run(load(straight), load(resumed))


def test_symmetric_feedback_initialisation_starts_at_the_transposes(tmp_path, monkeypatch, tiny_npz):
    out = tmp_path / "run"
    train_in_process(monkeypatch, "--config", SMOKE, "--dataset", "npz", "--data-dir", str(tiny_npz),
                     "--set", "feedback.init_symmetric=true", "--set", "feedback.iterations=[1,1,1,1,1]",
                     "--set", "feedback.lr=[1.0e-30,1.0e-30,1.0e-30,1.0e-30,1.0e-30]",
                     "--set", "forward.lr=1.0e-30", "--max-steps", "1", "--out", str(out))
    state = load(out)
    conv_f, conv_g = state["forward"]["1.layers.0.weight"], state["feedback"]["1.layers.2.weight"]
    assert torch.allclose(conv_f, conv_g)
    lin_f, lin_g = state["forward"]["5.layers.1.weight"], state["feedback"]["5.layers.0.weight"]
    assert torch.allclose(lin_f, lin_g.t())


@pytest.mark.parametrize("dataset,algorithm,expected", [
    ("imagenet32", "bp", {"batch_size": 256, "forward.lr": 0.01, "forward.scheduler": "step"}),
    ("cifar10", "vanilla_dtp", {"batch_size": 128, "forward.lr": 1e-3, "forward.scheduler": "cosine"}),
    ("cifar10", "parallel_dtp", {"forward.optimizer": "adam", "feedback.optimizer": "adam", "feedback.samples": 10,
                                 "feedback.iterations": [1] * 5, "forward.lr": 3e-4, "forward.scheduler": "none"}),
    ("imagenet32", "parallel_dtp", {"batch_size": 256, "forward.optimizer": "adam", "feedback.weight_decay": 1e-4}),
])
def test_each_dataset_and_algorithm_starts_from_its_published_config(dataset, algorithm, expected):
    from dtp import config as config_lib

    cfg = config_lib.resolve(None, {"dataset": dataset, "algorithm": algorithm}, [])
    for key, value in expected.items():
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)
        assert node == (tuple(value) if isinstance(value, list) else value), key


@pytest.mark.parametrize("sets,message", [
    (["algorithm=parallel_dtp"], "parallel_dtp takes one fused feedback step per batch"),
    (["forward.optimizer=lbfgs"], "forward.optimizer is 'lbfgs'; choose one of sgd, adam"),
    (["feedback.optimizer=Adam"], "feedback.optimizer is 'Adam'; choose one of sgd, adam"),
])
def test_optimizer_and_parallel_dtp_settings_are_checked(sets, message):
    from dtp import config as config_lib
    from dtp.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        config_lib.resolve(SMOKE, {}, sets)


def test_a_checkpoint_from_before_the_newer_options_resumes_with_their_defaults(tmp_path, monkeypatch, tiny_npz):
    out, straight = tmp_path / "old", tmp_path / "straight"
    common = ["--config", SMOKE, "--dataset", "npz", "--data-dir", str(tiny_npz)]
    train_in_process(monkeypatch, *common, "--epochs", "1", "--out", str(out))
    state = load(out)
    del state["early_stopping"], state["config"]["early_stopping"]
    for section, key in (("forward", "scheduler"), ("forward", "step_size"), ("forward", "gamma"),
                         ("feedback", "init_symmetric"), ("forward", "optimizer"), ("feedback", "optimizer"),
                         ("feedback", "weight_decay"), ("model", "hidden")):
        del state["config"][section][key]
    torch.save(state, out / "checkpoint.pt")
    train_in_process(monkeypatch, "--resume", str(out), "--epochs", "2")
    train_in_process(monkeypatch, *common, "--epochs", "2", "--out", str(straight))
    assert_same_run(load(straight), load(out))


@pytest.mark.slow
def test_bf16_autocast_is_applied_and_stays_close_to_fp32(tmp_path, monkeypatch, tiny_npz):
    """--mixed-precision bf16 computes in bf16 (the weights differ from the fp32 run's) and is the same
    algorithm (within bf16's rounding after 3 steps: 1.5e-2 relative measured on the forward weights)."""
    common = ["--config", SMOKE, "--dataset", "npz", "--data-dir", str(tiny_npz), "--max-steps", "3"]
    fp32, bf16 = tmp_path / "fp32", tmp_path / "bf16"
    train_in_process(monkeypatch, *common, "--out", str(fp32))
    assert_ok(run_script("train_sequential.py", *common, "--mixed-precision", "bf16", "--out", str(bf16)))
    a, b = load(fp32), load(bf16)
    assert b["config"]["mixed_precision"] == "bf16"
    assert any(not torch.equal(a["forward"][n], b["forward"][n]) for n in a["forward"])
    assert all(torch.isfinite(t).all() for key in ("forward", "feedback") for t in b[key].values())
    assert max_relative_difference(a, b, "forward") < 0.1


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the switch is valid")
def test_cuda_graphs_on_a_cpu_is_an_error(tmp_path, monkeypatch, capsys, tiny_npz):
    proc = script_in_process(monkeypatch, capsys, "train_sequential.py", "--config", SMOKE, "--dataset", "npz",
                             "--data-dir", str(tiny_npz), "--set", "feedback.cuda_graphs=on", "--out", str(tmp_path / "r"))
    expect_error(proc, "feedback.cuda_graphs is on, but this process computes on cpu")
    assert not (tmp_path / "r").exists()


def test_a_nan_is_caught_within_one_logging_interval_and_named_by_its_first_step(tmp_path, monkeypatch, capsys,
                                                                                 tiny_npz):
    """Losses are checked on the host every log.every steps, not after every step: the NaN of step 4 is
    found at step 6 (log.every 3), reported as step 4's, and the epoch-1 checkpoint stays as it was."""
    out = tmp_path / "run"
    train_in_process(monkeypatch, "--config", SMOKE, "--dataset", "npz", "--data-dir", str(tiny_npz),
                     "--epochs", "1", "--out", str(out))
    before = (out / "checkpoint.pt").read_bytes()
    proc = script_in_process(monkeypatch, capsys, "train_sequential.py", "--resume", str(out), "--epochs", "2",
                             "--set", "log.every=3", "--set", "feedback.lr=[1.0e+30,1.0e-3,1.0e-3,1.0e-3,1.0e-3]")
    expect_error(proc, "NaN/inf loss at step 4: feedback loss of block(s) [1] is not finite")
    assert (out / "checkpoint.pt").read_bytes() == before


def test_a_training_step_reads_nothing_from_the_device(monkeypatch):
    """A GPU step must not wait for the device: no tensor is turned into a Python value during a step
    (the figures are read every log.every steps instead). Counted on the CPU through the conversions."""
    from dtp import config as config_lib
    from dtp.cli import build_network, sequential_trainer
    from dtp.runtime import Runtime

    cfg = config_lib.resolve(SMOKE, {}, ["model.channels=[3,4]", "feedback.iterations=[2,2]",
                                         "feedback.noise=[0.1,0.1]", "feedback.lr=[0.01,0.01]"])
    trainer = sequential_trainer(cfg, build_network(cfg, (3, 8, 8), 10), Runtime(torch.device("cpu")))
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))
    reads = []
    for name in ("__bool__", "__float__", "__int__", "__index__", "item", "tolist"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _name=name, _f=original, **k: (
            reads.append(_name), _f(self, *a, **k))[1])
    for step in range(2):
        trainer.step = step
        trainer.train_batch(x, y)
    assert reads == []
    trainer.finite.check(cfg, 2)
    assert reads  # the check itself does read, which is what counting sees
