"""On-policy teacher trajectories for DCD, written as resumable shards.

The teacher decodes each training image with its multi-step rule, every block in the context
of its own earlier blocks. Per study we keep the teacher's final tokens and, per block, every
intermediate state (all-mask first, final last). On-policy records (DAgger) put the student's own
one-step report in the teacher's place as the context of each block. Shard i holds studies [i*S, (i+1)*S); under
torchrun rank r writes the shards i with i % world == r; finished shards are skipped on rerun.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch

from runtime.schedule import BlockLayout
from runtime.text import ReportTokenizer

from ..data.study import Study
from ..decoding.block_diffusion import fused_onestep_generate, multistep_generate
from ..decoding.run import load_pixels
from ..model.echo_model import EchoModel


def _report_blocks(ids: torch.Tensor, eos_id: int, block_size: int) -> int:
    """Blocks of a report: up to and including its first block that holds EOS."""
    n_blocks = -(-ids.numel() // block_size)
    for k in range(n_blocks):
        if bool((ids[k * block_size : (k + 1) * block_size] == eos_id).any()):
            return k + 1
    return n_blocks


def _per_sample(raw: torch.Tensor, traj: list[torch.Tensor], row: int, eos_id: int, block_size: int,
                context: Optional[torch.Tensor] = None) -> dict:
    """One study's record: the teacher's final tokens and each block's states, up to the end of the
    teacher's own report, or (on-policy) of the student's report in `context`, kept as "context"."""
    ends = raw[row] if context is None else context[row]
    end = min(_report_blocks(ends, eos_id, block_size), len(traj))
    states = []
    for k in range(end):
        seq = traj[k][row]  # [n_states, B]
        keep = [0] + [i for i in range(1, seq.shape[0]) if not torch.equal(seq[i], seq[i - 1])]
        states.append(seq[keep].clone())
    rec = {"tokens": raw[row, : end * block_size].clone(), "states": states}
    if context is not None:
        rec["context"] = context[row, : end * block_size].clone()
    return rec


def _write_shards(studies: list[Study], out_dir: str | Path, records_of: Callable[[list[Study]], dict],
                  desc: str, shard_size: int, batch_size: int, rank: int, world: int) -> list[Path]:
    """Shard i holds records_of(studies [i*S, (i+1)*S)), written atomically; finished shards are skipped."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_shards = -(-len(studies) // shard_size)
    mine = [i for i in range(n_shards) if i % world == rank]
    todo = [i for i in mine if not (out / f"shard_{i:05d}.pt").is_file()]
    from tqdm.auto import tqdm

    bar = tqdm(total=len(mine) * shard_size, initial=(len(mine) - len(todo)) * shard_size, desc=desc,
               unit="study", dynamic_ncols=True, mininterval=2.0, disable=rank != 0)
    for i in todo:
        chunk = studies[i * shard_size : (i + 1) * shard_size]
        records = {}
        for j in range(0, len(chunk), batch_size):
            sub = chunk[j : j + batch_size]
            records.update(records_of(sub))
            bar.update(len(sub))
        tmp = out / f"shard_{i:05d}.pt.tmp"
        torch.save({"records": records}, tmp)
        tmp.rename(out / f"shard_{i:05d}.pt")  # a shard exists only when complete
    bar.close()
    return sorted(out.glob("shard_*.pt"))


@torch.no_grad()
def generate_trajectories(
    teacher: EchoModel, tok: ReportTokenizer, studies: list[Study], out_dir: str | Path, block_size: int,
    steps: int, shard_size: int = 64, batch_size: int = 32, device: torch.device = torch.device("cpu"),
    rank: int = 0, world: int = 1,
) -> list[Path]:
    teacher.to(device).eval()

    def records_of(sub: list[Study]) -> dict:
        res = multistep_generate(teacher, tok, _pixels(teacher, sub, device), block_size, steps,
                                 teacher.cfg.max_response_tokens, keep_trajectory=True)
        return {s.id: _per_sample(res.raw, res.trajectories, r, tok.eos_id, block_size) for r, s in enumerate(sub)}

    return _write_shards(studies, out_dir, records_of, "teacher trajectories", shard_size, batch_size, rank, world)


@torch.no_grad()
def generate_onpolicy_targets(
    student: EchoModel, teacher: EchoModel, tok: ReportTokenizer, studies: list[Study], out_dir: str | Path,
    block_size: int, steps: int, shard_size: int = 64, batch_size: int = 32, device: torch.device = torch.device("cpu"),
    rank: int = 0, world: int = 1, anchor: int = 0,
) -> list[Path]:
    """On-policy DCD's records (DAgger): the student writes each report one step per block, then the
    teacher, with its multi-step rule, writes every block k in the context of the STUDENT's blocks < k.
    Record: the student's report as "context", the teacher's blocks as "tokens" (and their states).

    anchor > 0 (mode-seeking targets): the teacher starts block k from the student's `anchor` most
    confident tokens of it instead of all-mask, so where two wordings are open the target is the one
    the student already leans to, not one it cannot tell from the other."""
    student.to(device).eval()
    teacher.to(device).eval()
    grid = BlockLayout(len(tok.prefix_ids(student.n_image_tokens)), block_size)

    def records_of(sub: list[Study]) -> dict:
        px = _pixels(teacher, sub, device)
        mine = fused_onestep_generate(student, tok, px, block_size, student.cfg.max_response_tokens,
                                      keep_confidence=anchor > 0)
        own = mine.raw
        start = anchor_states(own, mine.confidence, grid, anchor, tok.mask_id) if anchor > 0 else None
        res = multistep_generate(teacher, tok, px, block_size, steps, teacher.cfg.max_response_tokens,
                                 keep_trajectory=True, context=own, start=start)
        return {s.id: _per_sample(res.raw, res.trajectories, r, tok.eos_id, block_size, context=own)
                for r, s in enumerate(sub)}

    return _write_shards(studies, out_dir, records_of, "on-policy targets", shard_size, batch_size, rank, world)


def anchor_states(raw: torch.Tensor, confidence: torch.Tensor, grid: BlockLayout, anchor: int, mask_id: int) -> torch.Tensor:
    """Response tokens [b, R]: in every grid block, the `anchor` ids of `raw` written with the highest
    confidence, mask_id elsewhere (the prompt's tail in block 0 is never picked)."""
    b, B, tail = raw.shape[0], grid.block_size, grid.tail
    n = -(-(tail + raw.shape[1]) // B) * B
    conf = torch.full((b, n), -1.0)
    conf[:, tail : tail + raw.shape[1]] = confidence.float()
    keep = torch.zeros(b, n, dtype=torch.bool)
    top = conf.reshape(b, n // B, B).topk(min(anchor, B), -1).indices
    keep.reshape(b, n // B, B).scatter_(-1, top, True)
    keep &= conf >= 0
    return torch.where(keep[:, tail : tail + raw.shape[1]], raw, torch.full_like(raw, mask_id))


def _pixels(model: EchoModel, studies: list[Study], device: torch.device) -> torch.Tensor:
    return load_pixels(studies, model.cfg.vision.image_size, model.cfg.vision.preprocess).to(device)


def load_trajectories(out_dir: str | Path) -> dict[str, dict]:
    records: dict[str, dict] = {}
    for f in sorted(Path(out_dir).glob("shard_*.pt")):
        records.update(torch.load(f, map_location="cpu", weights_only=False)["records"])
    return records
