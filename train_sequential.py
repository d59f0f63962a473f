"""Single-process DTP / TP / BP training.

    python train_sequential.py --config configs/shapes.yaml --out runs/shapes
    python train_sequential.py --dataset cifar10 --data-dir data --download
"""
from __future__ import annotations

from accelerate import Accelerator
from accelerate.utils import set_seed

from dtp.cli import build_network, build_parser, exit_on_user_error, load_data, resolve_run, sequential_trainer
from dtp.config import to_yaml
from dtp.graphs import graphs_enabled
from dtp.runtime import Runtime, autocast_for


def main() -> None:
    args = build_parser(__doc__.splitlines()[0]).parse_args()
    run = resolve_run(args)
    cfg = run.cfg
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    set_seed(cfg.seed)
    device = accelerator.device
    graphed = graphs_enabled(cfg.feedback.cuda_graphs, device)
    # A captured graph needs autocast's weight-cast cache off, which Accelerate's autocast keeps on.
    autocast = autocast_for(device, cfg.mixed_precision, cache_enabled=False) if graphed else accelerator.autocast
    runtime = Runtime(device, autocast, graphed)
    print(to_yaml(cfg), end="")
    data = load_data(cfg)
    network = build_network(cfg, data.input_shape, data.num_classes).to(runtime.device)
    trainer = sequential_trainer(cfg, network, runtime)
    if run.resume_state is not None:
        trainer.load_state_dict(run.resume_state)
    result = trainer.fit(data, run.out_dir, run.max_steps)
    if result.summary is None:  # stopped by a signal, with a checkpoint to resume from
        return
    summary = result.summary
    print(f"done: val top-1 {summary['val_top1']:.4f}, {summary['steps']} steps, "
          f"{summary['wall_time_s']:.1f} s; outputs in {run.out_dir}")


if __name__ == "__main__":
    exit_on_user_error(main)
