"""Command-line flags shared by train_sequential.py and train_parallel.py, and the wiring they share."""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from dtp import config as config_lib
from dtp.algorithm import VARIANTS
from dtp.checkpoint import CHECKPOINT, load_checkpoint
from dtp.data import DATASETS, DatasetSplits, load_dataset
from dtp.drl_training import DirectFeedback
from dtp.errors import UserError, report_error
from dtp.feedback import LocalFeedback, make_feedback_optimizers
from dtp.models import DTPNetwork
from dtp.parallel.planning import parse_split
from dtp.runtime import Runtime
from dtp.trainer import Trainer


def build_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", help="YAML config (default: configs/<dataset>_<algorithm>.yaml or configs/<dataset>.yaml)")
    p.add_argument("--dataset", choices=DATASETS)
    p.add_argument("--data-dir", help="dataset folder (cifar10, imagenet32, mnist, fashion_mnist) or .npz file (npz)")
    p.add_argument("--download", action="store_true", default=None,
                   help="download CIFAR-10, MNIST or Fashion-MNIST into --data-dir")
    p.add_argument("--algorithm", choices=config_lib.ALGORITHMS)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--mixed-precision", choices=config_lib.MIXED_PRECISION)
    p.add_argument("--out", help="run directory for TensorBoard events, checkpoint.pt, summary.json")
    p.add_argument("--max-steps", type=int, help="stop after this many training steps in total")
    p.add_argument("--resume", metavar="DIR",
                   help="continue the run saved in DIR (its checkpoint.pt); 'auto': resume --out if it has one")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, value parsed as YAML, e.g. --set feedback.iterations=[25,35,40,60,25]")
    return p


def add_parallel_flags(p: argparse.ArgumentParser) -> None:
    """The flags train_parallel.py adds to the shared ones."""
    p.add_argument("--replicas", type=int, default=1,
                   help="data-parallel copies of the layer-parallel group; WORLD_SIZE must be a multiple")
    p.add_argument("--split", type=parse_split, default="auto",
                   help="split heavy feedback blocks' rows over several ranks: auto (by measured cost), none, "
                        "or parts per block within a group, e.g. 2,1,1,1,1")
    p.add_argument("--timeout-s", type=float, default=1800.0,
                   help="seconds a rank waits on a peer before the job fails (collective timeout)")


@dataclass
class Run:
    cfg: config_lib.Config
    out_dir: Path
    max_steps: int | None
    resume_state: dict[str, Any] | None
    resume_dir: Path | None = None  # where resume_state came from: its metrics.jsonl is continued


def resolve_run(args: argparse.Namespace) -> Run:
    """The resolved config and run options; a resumed run starts from the checkpoint's own config."""
    resume_dir = args.resume
    if resume_dir == "auto":
        # Requeued cluster jobs: continue from --out if it holds a checkpoint, else start fresh.
        if not args.out:
            raise UserError("--resume auto needs --out DIR: it resumes DIR/checkpoint.pt when it exists")
        resume_dir = args.out if (Path(args.out) / CHECKPOINT).is_file() else None
    resume_state = load_checkpoint(resume_dir) if resume_dir else None
    overrides = {
        "dataset": args.dataset, "data_dir": args.data_dir, "download": args.download,
        "algorithm": args.algorithm, "epochs": args.epochs, "batch_size": args.batch_size,
        "seed": args.seed, "mixed_precision": args.mixed_precision,
    }
    base = resume_state["config"] if resume_state else None
    cfg = config_lib.resolve(args.config, overrides, args.sets, base=base)
    if args.max_steps is not None and args.max_steps <= 0:
        raise UserError(f"--max-steps must be positive, got {args.max_steps}")
    out = args.out or resume_dir or f"runs/{cfg.dataset}-{cfg.algorithm}"
    return Run(cfg, Path(out), args.max_steps, resume_state, Path(resume_dir) if resume_dir else None)


def build_network(cfg: config_lib.Config, input_shape: tuple[int, int, int], num_classes: int) -> DTPNetwork:
    """The network for this data, in cfg.precision, with per-block lists checked against its blocks."""
    variant = VARIANTS[cfg.algorithm]
    network = DTPNetwork(cfg.model, input_shape, num_classes, cfg.seed, variant.feedback)
    config_lib.check_forward_lists(cfg, len(network.forward_blocks))
    if variant.trains_feedback:
        config_lib.check_block_lists(cfg, network.n_feedback)
    if cfg.feedback.init_symmetric:
        network.init_feedback_symmetric()
    return network.to(getattr(torch, cfg.precision))


def sequential_trainer(cfg: config_lib.Config, network: DTPNetwork, runtime: Runtime) -> Trainer:
    """The Trainer train_sequential.py runs: every feedback module trained in this process (none for bp)."""
    variant = VARIANTS[cfg.algorithm]
    if not variant.trains_feedback:
        return Trainer(cfg, network, [], None, runtime)
    inverted = variant.feedback.inverts_forward  # DRL's direct maps train eagerly, never in a CUDA graph
    feedback_optimizers = make_feedback_optimizers(network, cfg, runtime.cuda_graphs and inverted)
    phase = LocalFeedback if inverted else DirectFeedback
    return Trainer(cfg, network, feedback_optimizers, phase(network, feedback_optimizers, cfg, runtime), runtime)


def load_data(cfg: config_lib.Config) -> DatasetSplits:
    return load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download, seed=cfg.seed)


def exit_on_user_error(main: Callable[[], None], show: bool = True) -> None:
    """Run main; a UserError ends the process with its message and exit code 2, not a traceback."""
    try:
        main()
    except UserError as exc:
        report_error(exc, show)
        sys.exit(2)
