"""`echo-train stage3`."""
from __future__ import annotations

import click

from .stage3_dcd import METHODS, Stage3Config, run_stage3


@click.command("stage3")
@click.option("--data", default="data/synth", show_default=True)
@click.option("--init", default="runs/base", show_default=True, help="Stage-2 teacher checkpoint.")
@click.option("--out", default="runs/echo", show_default=True)
@click.option("--method", type=click.Choice(METHODS), default="dcd", show_default=True,
              help="dcd, or an ablation: factorised distillation, ground-truth one-step.")
@click.option("--trajectories", default=None, help="Folder for teacher trajectory shards (default <out>_trajectories).")
@click.option("--teacher-steps", type=int, default=None, help="Teacher denoising steps per block (default: block size).")
@click.option("--p-intermediate", type=float, default=0.0, show_default=True,
              help="Share of blocks that also train from an intermediate teacher state (a second noisy copy; see Stage3Config).")
@click.option("--diffusion-mix", type=float, default=0.0, show_default=True,
              help="Weight of the stage-2 diffusion loss mixed in (keeps the student's multi-step decoding).")
@click.option("--ar-weight", type=float, default=Stage3Config.ar_weight, show_default=True,
              help="Weight of stage 1's next-token loss on the clean copy (the teacher's report); "
                   "needs a causal-context teacher.")
@click.option("--steps", type=int, default=None, help="Training steps (default 900: the one-step student needs them).")
@click.option("--batch-size", type=int, default=None, help="Default 16.")
@click.option("--lr", type=float, default=None, help="Default 5e-4.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--threads", type=int, default=None)
@click.option("--save-every", type=int, default=100, show_default=True)
@click.option("--stop-after", type=int, default=None)
@click.option("--train-limit", type=int, default=None)
def stage3_command(data, init, out, method, trajectories, teacher_steps, p_intermediate, diffusion_mix, ar_weight, steps,
                   batch_size, lr, seed, device, threads, save_every, stop_after, train_limit) -> None:
    """Stage 3: distil the teacher into a one-step-per-block student (DCD) or train an ablation."""
    cfg = Stage3Config(data=data, init=init, out=out, method=method, trajectories=trajectories,
                       teacher_steps=teacher_steps, p_intermediate=p_intermediate, diffusion_mix=diffusion_mix, ar_weight=ar_weight,
                       train_limit=train_limit)
    for k, v in (("steps", steps), ("batch_size", batch_size), ("lr", lr)):
        if v is not None:
            setattr(cfg.train, k, v)
    cfg.train.seed, cfg.train.device, cfg.train.threads = seed, device, threads
    cfg.train.save_every, cfg.train.stop_after = save_every, stop_after
    run_stage3(cfg)
