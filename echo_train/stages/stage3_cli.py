"""`echo-train stage3`."""
from __future__ import annotations

import click

from .stage3_dcd import METHODS, Stage3Config, run_stage3
from .train_options import train_config_from_options, train_options


@click.command("stage3")
@click.option("--data", default="data/synth", show_default=True)
@click.option("--init", default="runs/base", show_default=True, help="Stage-2 teacher checkpoint.")
@click.option("--out", default="runs/echo", show_default=True)
@click.option("--method", type=click.Choice(METHODS), default="dcd", show_default=True,
              help="dcd, or an ablation: factorised distillation, ground-truth one-step.")
@click.option("--trajectories", default=None, help="Folder for teacher trajectory shards (default <out>_trajectories).")
@click.option("--teacher-steps", type=int, default=None, help="Teacher denoising steps per block (default: block size).")
@click.option("--p-intermediate", type=float, default=Stage3Config.p_intermediate, show_default=True,
              help="Share of blocks that also train from an intermediate teacher state (a second noisy copy; see Stage3Config).")
@click.option("--intermediate-copies", type=int, default=Stage3Config.intermediate_copies, show_default=True,
              help="Noisy copies that carry intermediate teacher states (with --p-intermediate > 0), each drawn independently.")
@click.option("--diffusion-mix", type=float, default=Stage3Config.diffusion_mix, show_default=True,
              help="Weight of the stage-2 diffusion loss mixed in (keeps the student's multi-step decoding).")
@click.option("--ar-weight", type=float, default=Stage3Config.ar_weight, show_default=True,
              help="Weight of stage 1's next-token loss on the clean copy (the teacher's report); "
                   "needs a causal-context teacher.")
@click.option("--student-init", default=None,
              help="Start the student from this stage-3 checkpoint instead of the teacher (a further round).")
@click.option("--on-policy", is_flag=True,
              help="On-policy DCD (needs --student-init): the student writes the training reports one step per "
                   "block, the teacher completes every block in the student's context, and the student trains "
                   "on those records beside the teacher's own trajectories.")
@click.option("--onpolicy-targets", default=None, help="Folder for the on-policy record shards (default <out>_onpolicy).")
@click.option("--onpolicy-anchor", type=int, default=Stage3Config.onpolicy_anchor, show_default=True,
              help="With --on-policy: the teacher starts each block from the student's N most confident tokens "
                   "of it (targets in the wording the student leans to) instead of all-mask.")
@train_options
def stage3_command(data, init, out, method, trajectories, teacher_steps, p_intermediate, intermediate_copies,
                   diffusion_mix, ar_weight, student_init, on_policy, onpolicy_targets, onpolicy_anchor,
                   **kw) -> None:
    """Stage 3: distil the teacher into a one-step-per-block student (DCD) or train an ablation.

    Defaults: 900 steps (the one-step student needs them), batch 16, lr 5e-4.
    """
    cfg = Stage3Config(data=data, init=init, out=out, method=method, trajectories=trajectories,
                       teacher_steps=teacher_steps, p_intermediate=p_intermediate,
                       intermediate_copies=intermediate_copies, diffusion_mix=diffusion_mix,
                       ar_weight=ar_weight, student_init=student_init, on_policy=on_policy,
                       onpolicy_targets=onpolicy_targets, onpolicy_anchor=onpolicy_anchor, train_limit=kw["train_limit"])
    cfg.train = train_config_from_options(cfg.train, kw)
    run_stage3(cfg)
