"""The training options of every `echo-train` stage command, and the TrainConfig they make."""
from __future__ import annotations

import os
import time

import click

from .trainer import PRECISIONS, TrainConfig


def train_options(f):
    """The training options every stage command takes."""
    opts = [
        click.option("--steps", type=int, default=None, help="Optimiser steps (default: the stage's)."),
        click.option("--batch-size", type=int, default=None, help="Global batch size, split across processes."),
        click.option("--lr", type=float, default=None, help="Peak learning rate."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1 ..."),
        click.option("--threads", type=int, default=None, help="torch CPU threads."),
        click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
                     help="Matmul precision (weights stay fp32): auto = bf16 on CUDA and on CPUs with native "
                          "bf16, else fp32."),
        click.option("--save-every", type=int, default=100, show_default=True),
        click.option("--eval-every", type=int, default=100, show_default=True),
        click.option("--time-budget", type=float, default=None, metavar="SECONDS",
                     help="Fit the whole command into this wall time: after a few timed steps the step count "
                          "shrinks to what is left (never below a quarter of --steps) and the learning-rate "
                          "schedule follows it. The plan is printed and kept for a resume."),
        click.option("--stop-after", type=int, default=None, help="Stop (with a checkpoint) at this step."),
        click.option("--train-limit", type=int, default=None, help="Use only the first N training studies."),
        click.option("--freeze", default=None,
                     help="Comma-separated parameter-name prefixes to keep fixed (e.g. vision, vision.tower); "
                          "'none' trains everything. Default: the stage's."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def process_start_time() -> float:
    """When this process started (Linux), so the interpreter's and torch's start-up count against a
    time budget too; elsewhere, now."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: start time since boot
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


def train_config_from_options(default: TrainConfig, kw: dict) -> TrainConfig:
    """A copy of the stage's default TrainConfig with the options given on the command line."""
    cfg = TrainConfig(**{**default.__dict__})
    for k in ("steps", "batch_size", "lr"):
        if kw.get(k) is not None:
            setattr(cfg, k, kw[k])
    cfg.seed, cfg.device, cfg.threads, cfg.precision = kw["seed"], kw["device"], kw["threads"], kw["precision"]
    cfg.save_every, cfg.eval_every, cfg.stop_after = kw["save_every"], kw["eval_every"], kw["stop_after"]
    if kw.get("time_budget") is not None:
        # counted from here, so a stage's own set-up (stage 3's teacher trajectories) is inside it
        cfg.time_budget_s, cfg.budget_start = kw["time_budget"], process_start_time()
    if kw.get("freeze") is not None:
        names = [x.strip() for x in kw["freeze"].split(",") if x.strip()]
        cfg.freeze = () if names == ["none"] else tuple(names)
    return cfg
