"""The training loop every stage shares: exact resume, DDP under torchrun, progress, checkpoints.

Determinism: the data order of epoch e is a permutation seeded by (seed, e), and the noise of
step s is drawn from a generator seeded by (seed, s, rank). A resumed run therefore replays
exactly the batches and noise an uninterrupted run would have seen.
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from runtime.text import ReportTokenizer

from ..model.checkpoint import load_training_state, load_weights, save_checkpoint
from ..model.echo_model import EchoModel
from .errors import StageError

LossFn = Callable[[EchoModel, dict, torch.Generator], torch.Tensor]


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 16  # global, split across processes
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    save_every: int = 100
    eval_every: int = 100
    eval_batches: int = 4
    log_every: int = 10
    device: str = "auto"
    threads: Optional[int] = None
    stop_after: Optional[int] = None  # stop (with a checkpoint) at this step: tests use it to interrupt
    time_limit_s: Optional[float] = None  # stop (with a checkpoint) after this much training time
    # Fit the whole run into this many seconds, counted from budget_start (default: the start of
    # train()): after budget_probe_steps steps the step count shrinks to what the measured step
    # time leaves, and the learning-rate schedule follows the new count, so a slow CPU (fp32
    # matmuls, no AVX-512) trains a shorter, complete schedule instead of overrunning. Never below
    # budget_min_fraction of `steps`; the plan is kept in the training state, so a resume follows it.
    time_budget_s: Optional[float] = None
    budget_start: Optional[float] = None  # time.time() when the stage command started
    budget_probe_steps: int = 10
    budget_min_fraction: float = 0.25
    freeze: tuple[str, ...] = ()  # parameter-name prefixes kept fixed, e.g. "vision" (tower + projector)
    # Matmul precision of forward and backward (weights and optimiser stay fp32): "bf16" autocast,
    # "fp32", or "auto" = bf16 on CUDA and on CPUs with native bf16 (AVX512-BF16 / AMX), else fp32
    # (there it is faster at the same loss; README's results).
    precision: str = "auto"


PRECISIONS = ("auto", "bf16", "fp32")


def resolve_precision(name: str, device: torch.device) -> str:
    """The precision `train` uses on `device`: "bf16" or "fp32"."""
    if name not in PRECISIONS:
        raise StageError(f"unknown training precision {name!r}; choose from {', '.join(PRECISIONS)}")
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16"
    native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or \
        getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return "bf16" if native else "fp32"


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def maybe_init_distributed(device: torch.device) -> None:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def batch_indices(n: int, step: int, batch_size: int, seed: int, rank: int, world: int) -> list[int]:
    """Dataset indices of global step `step` for this rank: a seeded permutation per epoch."""
    per_epoch = max(1, n // batch_size)
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
    chunk = perm[k * batch_size : (k + 1) * batch_size]
    return chunk[rank::world]


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 64 + rank)


def lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    prog = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, prog))))


def plan_budgeted_steps(requested: int, done: int, step_s: float, remaining_s: float, min_fraction: float) -> int:
    """The step count that fits `remaining_s` at `step_s` per step after `done` steps, within
    [max(done, min_fraction * requested), requested]."""
    fit = done + int(max(0.0, remaining_s) // max(step_s, 1e-9))
    floor = max(done, math.ceil(min_fraction * requested))
    return max(floor, min(requested, fit))


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


class StopRequested(Exception):
    pass


class LossModule(torch.nn.Module):
    """Makes a stage's loss the forward of a module, so DDP can wrap it and sync gradients."""

    def __init__(self, model: EchoModel, loss_fn: LossFn) -> None:
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch: dict, gen: torch.Generator) -> torch.Tensor:
        return self.loss_fn(self.model, batch, gen)


def train(
    model: EchoModel,
    tokenizer: ReportTokenizer,
    train_set: Dataset,
    collate: Callable[[list], dict],
    loss_fn: LossFn,
    cfg: TrainConfig,
    out_dir: str | Path,
    val_set: Optional[Dataset] = None,
    desc: str = "train",
) -> dict:
    """Train `model` for cfg.steps, resuming from out_dir/training_state.pt when present; returns
    the training state (as saved) of where it stopped."""
    run = _Run(model, tokenizer, cfg, Path(out_dir), desc)
    finished = run.resume()
    if finished is not None:
        return finished
    step = run.loop(train_set, collate, loss_fn, val_set)
    model.eval()
    if run.rank == 0:
        (run.out / "train_log.jsonl").write_text("\n".join(json.dumps(h) for h in run.history) + "\n")
    return run.training_state(step, step >= run.run_cfg.steps)


def _optimizer(model: EchoModel, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the parameters cfg.freeze leaves trainable, without weight decay on vectors."""
    frozen = [n for n, p in model.named_parameters() if n.startswith(tuple(cfg.freeze))] if cfg.freeze else []
    if cfg.freeze and not frozen:
        raise StageError(f"--freeze {','.join(cfg.freeze)} matches no parameter of the model")
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.ndim >= 2]
    no_decay = [p for n, p in trainable if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )


class _Run:
    """One call of train(): the model on its device with its optimiser, the step schedule (cut
    short by a time budget), the history, and how it saves and resumes."""

    def __init__(self, model: EchoModel, tokenizer: ReportTokenizer, cfg: TrainConfig, out: Path, desc: str) -> None:
        self.model, self.tokenizer, self.cfg, self.out, self.desc = model, tokenizer, cfg, out, desc
        self.device = pick_device(cfg.device)
        self.precision = resolve_precision(cfg.precision, self.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        maybe_init_distributed(self.device)
        self.rank, self.world = dist_info()
        model.to(self.device)
        self.opt = _optimizer(model, cfg)
        self.start, self.history = 0, []
        self.budget_t0 = cfg.budget_start if cfg.budget_start is not None else time.time()
        self.planned: Optional[int] = None  # the step count a time budget chose
        self.run_cfg = cfg  # the schedule: cfg with the planned step count
        self.probe: Optional[tuple[int, float]] = None  # (step, time) where the step-time probe began
        self.replanning = False  # this process planned, so it keeps planning (a resumed plan is kept as it is)
        self.stop_requested = False  # Ctrl-C / kill: finish the step, save, exit
        self.bar = None

    def log(self, text: str) -> None:
        if self.rank == 0:
            print(text, flush=True)

    # ------------------------------------------------------------------------ saving and resuming
    def training_state(self, step: int, finished: bool) -> dict:
        return {
            "step": step, "finished": finished, "optimizer": self.opt.state_dict(), "train_config": asdict(self.cfg),
            "torch_rng": torch.get_rng_state(), "numpy_rng": np.random.get_state(), "python_rng": random.getstate(),
            "history": self.history, "world_size": self.world, "stage": self.model.cfg.stage,
            "precision": self.precision, "requested_steps": self.cfg.steps, "planned_steps": self.planned,
        }

    def checkpoint(self, step: int, finished: bool) -> None:
        if self.rank == 0:
            save_checkpoint(self.out, self.model, self.tokenizer, self.training_state(step, finished))
        if self.world > 1:
            dist.barrier()

    def resume(self) -> Optional[dict]:
        """Continue from out/training_state.pt where there is one: weights, optimiser, step, plan and
        every random state. Returns the saved state of a run that already finished (None: train)."""
        state = load_training_state(self.out)
        if state is None:
            return None
        budget_done = state.get("planned_steps") is not None and state.get("requested_steps") == self.cfg.steps
        if state.get("finished") and (state["step"] >= self.cfg.steps or (budget_done and state["step"] >= state["planned_steps"])):
            self.log(f"[{self.desc}] {self.out} already finished at step {state['step']}; reusing it")
            return state
        load_weights(self.model, self.out / "model.safetensors")  # in place, one tensor at a time
        self.opt.load_state_dict(state["optimizer"])
        self.start, self.history = state["step"], state.get("history", [])
        if budget_done:
            self.planned = int(state["planned_steps"])
            self.run_cfg = replace(self.cfg, steps=self.planned)  # the schedule follows the plan
        torch.set_rng_state(state["torch_rng"])
        np.random.set_state(state["numpy_rng"])
        random.setstate(state["python_rng"])
        self.log(f"[{self.desc}] resuming {self.out} from step {self.start}")
        return None

    # ------------------------------------------------------------------------ the loop
    def loop(self, train_set: Dataset, collate: Callable[[list], dict], loss_fn: LossFn,
             val_set: Optional[Dataset]) -> int:
        """Steps from self.start until the schedule ends or a stop is asked for; returns the step reached."""
        cfg = self.cfg
        loss_module: torch.nn.Module = LossModule(self.model, loss_fn)
        if self.world > 1:
            loss_module = torch.nn.parallel.DistributedDataParallel(loss_module)
        old = signal.signal(signal.SIGINT, self._on_signal) if self.rank == 0 else None
        amp = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")
        self._open_bar()
        t0, seen, step = time.time(), 0, self.start
        try:
            self.model.train()
            while step < self.run_cfg.steps:
                if cfg.time_budget_s is not None and (self.planned is None or self.replanning) and self._replan(step):
                    break
                n, loss = self._step(train_set, collate, loss_module, amp, step)
                step, seen = step + 1, seen + n * self.world
                self._show_progress(step, loss, seen / max(1e-9, time.time() - t0))
                rec = {"step": step, "loss": float(loss.item()), "time": time.time() - t0}
                if val_set is not None and (step % cfg.eval_every == 0 or step == self.run_cfg.steps):
                    rec["val_loss"] = evaluate_loss(self.model, val_set, collate, loss_fn, cfg, self.device)
                    self.model.train()
                self.history.append(rec)
                if step % cfg.save_every == 0 and step < self.run_cfg.steps:
                    self.checkpoint(step, False)
                out_of_time = cfg.time_limit_s is not None and time.time() - t0 >= cfg.time_limit_s
                if self.stop_requested or out_of_time or (cfg.stop_after is not None and step >= cfg.stop_after):
                    self.checkpoint(step, False)
                    raise StopRequested
            self.checkpoint(step, True)
        except StopRequested:
            self.log(f"\n[{self.desc}] stopped at step {step}; checkpoint saved to {self.out}; run the same command "
                     "to resume")
        finally:
            if self.bar is not None:
                self.bar.close()
            if old is not None:
                signal.signal(signal.SIGINT, old)
        return step

    def _on_signal(self, signum, frame) -> None:
        self.stop_requested = True

    def _step(self, train_set: Dataset, collate: Callable[[list], dict], loss_module: torch.nn.Module, amp,
              step: int) -> tuple[int, torch.Tensor]:
        """One optimiser step on this rank's part of global step `step`'s batch: (its size, the loss)."""
        cfg = self.cfg
        idx = batch_indices(len(train_set), step, cfg.batch_size, cfg.seed, self.rank, self.world)
        batch = _to_device(collate([train_set[i] for i in idx]), self.device)
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.run_cfg, step)
        with amp:
            loss = loss_module(batch, step_generator(cfg.seed, step, self.rank))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.opt.step()
        return len(idx), loss

    # ------------------------------------------------------------------------ progress and the time budget
    def _open_bar(self) -> None:
        if self.rank == 0:
            from tqdm.auto import tqdm

            print(f"[{self.desc}] {self.device.type}, {self.precision} matmuls, {torch.get_num_threads()} threads",
                  flush=True)
            self.bar = tqdm(total=self.cfg.steps, initial=self.start, desc=self.desc, dynamic_ncols=True,
                            mininterval=2.0)

    def _show_progress(self, step: int, loss: torch.Tensor, samples_s: float) -> None:
        if self.bar is None:
            return
        self.bar.update(1)
        if step % self.cfg.log_every == 0 or step == self.run_cfg.steps:
            self.bar.set_postfix(loss=f"{loss.item():.3f}", samples_s=f"{samples_s:.1f}")

    def _replan(self, step: int) -> bool:
        """Under a time budget: time the steps after the first of a (re)start (it is slow: allocation,
        caches), plan the step count after budget_probe_steps of them, then again every 5x as many
        (step times drift). True when the plan ends at or before `step`: stop here."""
        cfg = self.cfg
        timed = step - self.probe[0] if self.probe is not None else 0
        if self.probe is None and step > self.start:
            self.probe = (step, time.time())
            return False
        if not (timed >= cfg.budget_probe_steps and (self.planned is None or timed % (5 * cfg.budget_probe_steps) == 0)):
            return False
        step_s = (time.time() - self.probe[1]) / timed
        remaining = cfg.time_budget_s - (time.time() - self.budget_t0) - 3 * step_s  # last eval and save
        new = _agree(plan_budgeted_steps(cfg.steps, step, step_s, remaining, cfg.budget_min_fraction),
                     self.device, self.world)
        if self.planned is None or abs(new - self.planned) > 0.01 * self.planned:
            verdict = "all fit" if new == cfg.steps else f"training {new} of {cfg.steps} steps"
            self.log(f"\n[{self.desc}] time budget {cfg.time_budget_s:.0f} s: {step_s:.2f} s/step measured, "
                     f"{max(0.0, remaining):.0f} s left -> {verdict}")
        self.planned, self.replanning = new, True
        self.run_cfg = replace(cfg, steps=new)
        if self.bar is not None:
            self.bar.total = new
            self.bar.refresh()
        return step >= new


def _agree(n: int, device: torch.device, world: int) -> int:
    """Rank 0's value of n on every process (DDP ranks must run the same number of steps)."""
    if world == 1:
        return n
    t = torch.tensor([n], dtype=torch.long, device=device)
    dist.broadcast(t, 0)
    return int(t.item())


@torch.no_grad()
def evaluate_loss(model: EchoModel, val_set: Dataset, collate, loss_fn: LossFn, cfg: TrainConfig, device) -> float:
    """Mean loss on the first eval_batches of the validation set, with fixed noise."""
    model.eval()
    losses = []
    n = len(val_set)
    for k in range(cfg.eval_batches):
        idx = list(range(k * cfg.batch_size, min(n, (k + 1) * cfg.batch_size)))
        if not idx:
            break
        batch = _to_device(collate([val_set[i] for i in idx]), device)
        losses.append(float(loss_fn(model, batch, torch.Generator().manual_seed(12345 + k))))
    return float(np.mean(losses)) if losses else float("nan")
