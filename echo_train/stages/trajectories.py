"""On-policy teacher trajectories for DCD, written as resumable shards.

The teacher decodes each training image with its multi-step rule, every block in the context
of its own earlier blocks. Per study we keep the teacher's final tokens and, per block, every
intermediate state (all-mask first, final last). Shard i holds studies [i*S, (i+1)*S); under
torchrun rank r writes the shards i with i % world == r; finished shards are skipped on rerun.
"""
from __future__ import annotations

from pathlib import Path

import torch

from runtime.text import ReportTokenizer

from ..data.study import Study
from ..decoding.block_diffusion import multistep_generate
from ..decoding.run import load_pixels
from ..model.echo_model import EchoModel


def _per_sample(raw: torch.Tensor, traj: list[torch.Tensor], row: int, eos_id: int, block_size: int) -> dict:
    n_blocks = len(traj)
    ids = raw[row]
    end = n_blocks
    for k in range(n_blocks):  # the teacher's own report ends at its first EOS block
        if bool((ids[k * block_size : (k + 1) * block_size] == eos_id).any()):
            end = k + 1
            break
    states = []
    for k in range(end):
        seq = traj[k][row]  # [n_states, B]
        keep = [0] + [i for i in range(1, seq.shape[0]) if not torch.equal(seq[i], seq[i - 1])]
        states.append(seq[keep].clone())
    return {"tokens": ids[: end * block_size].clone(), "states": states}


@torch.no_grad()
def generate_trajectories(
    teacher: EchoModel, tok: ReportTokenizer, studies: list[Study], out_dir: str | Path, block_size: int,
    steps: int, shard_size: int = 64, batch_size: int = 32, device: torch.device = torch.device("cpu"),
    rank: int = 0, world: int = 1,
) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    teacher.to(device).eval()
    n_shards = -(-len(studies) // shard_size)
    mine = [i for i in range(n_shards) if i % world == rank]
    todo = [i for i in mine if not (out / f"shard_{i:05d}.pt").is_file()]
    from tqdm.auto import tqdm

    bar = tqdm(total=len(mine) * shard_size, initial=(len(mine) - len(todo)) * shard_size, desc="teacher trajectories",
               unit="study", dynamic_ncols=True, mininterval=2.0, disable=rank != 0)
    for i in todo:
        chunk = studies[i * shard_size : (i + 1) * shard_size]
        records = {}
        for j in range(0, len(chunk), batch_size):
            sub = chunk[j : j + batch_size]
            res = multistep_generate(teacher, tok, load_pixels(sub, teacher.cfg.vision.image_size, teacher.cfg.vision.preprocess).to(device), block_size,
                                     steps, teacher.cfg.max_response_tokens, keep_trajectory=True)
            for r, s in enumerate(sub):
                records[s.id] = _per_sample(res.raw, res.trajectories, r, tok.eos_id, block_size)
            bar.update(len(sub))
        tmp = out / f"shard_{i:05d}.pt.tmp"
        torch.save({"block_size": block_size, "steps": steps, "records": records}, tmp)
        tmp.rename(out / f"shard_{i:05d}.pt")  # a shard exists only when complete
    bar.close()
    return sorted(out.glob("shard_*.pt"))


def load_trajectories(out_dir: str | Path) -> dict[str, dict]:
    records: dict[str, dict] = {}
    for f in sorted(Path(out_dir).glob("shard_*.pt")):
        records.update(torch.load(f, map_location="cpu", weights_only=False)["records"])
    return records
