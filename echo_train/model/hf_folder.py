"""Reading a local Hugging Face folder: its JSON files, its safetensors shards, its tensors mapped
onto a module, and the embedding rows grown for tokens ECHO adds. Every failure is a
PretrainedError naming the file and what is wrong with it."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from .errors import PretrainedError, refuse_unmapped

# the tensors whose rows are the vocabulary: grown when ECHO's tokens are added to a tokenizer
EMBEDDING_ROWS = ("model.embed_tokens.weight", "lm_head.weight")
ROW_BLOCK_ELEMENTS = 1 << 22  # the rows summed at a time by a row mean (32 MB of float64)


def read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise PretrainedError(f"{path.parent}: no {path.name} ({what})")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PretrainedError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise PretrainedError(f"{path}: expected a JSON object")
    return d


def check_folder(folder: str | Path, option: str) -> Path:
    d = Path(folder)
    if not d.is_dir():
        raise PretrainedError(f"{option} {d}: folder not found")
    return d


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder; with an index, every shard it names must be there."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index, "the shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise PretrainedError(f"{index}: no weight_map")
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise PretrainedError(f"{folder}: missing shard{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                                  f"(of {len(names)} named in {index.name}); download the whole folder again")
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise PretrainedError(f"{folder}: no *.safetensors weights (PyTorch .bin files are not read: convert them "
                              "with transformers' save_pretrained(safe_serialization=True))")
    return files


def read_tensors(files: Iterable[Path], keep: Callable[[str], bool] = lambda name: True) -> dict[str, torch.Tensor]:
    """All tensors of these files whose name `keep` accepts (read lazily, one at a time)."""
    from safetensors import SafetensorError, safe_open

    out: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    if keep(name):
                        out[name] = st.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise PretrainedError(f"{f}: unreadable safetensors file ({e})") from None
    return out


def load_mapped(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], folder: Path, what: str) -> None:
    """Copy `state` into `own` (a module's state_dict, sharing its storage); every tensor must map
    to an entry of the same shape, and every entry must be given."""
    unexpected = sorted(k for k in state if k not in own)
    missing = sorted(k for k in own if k not in state)
    wrong = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in state
                   if k in own and state[k].shape != own[k].shape)
    refuse_unmapped(folder, what, unexpected, missing, wrong)
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v.to(own[k].dtype))


# ---------------------------------------------------------------------------- growing the embedding rows
def row_block(width: int) -> int:
    """Rows per block of a row mean over rows of `width` (the same blocks everywhere: the same sum)."""
    return max(1, ROW_BLOCK_ELEMENTS // max(width, 1))


class RowMean:
    """The mean of a matrix's rows from blocks of rows (row_block at a time), summed in float64: a
    bf16 embedding of 152k rows is never copied whole to a wider type, and streamed rows give the
    same mean as the whole matrix."""

    def __init__(self, width: int) -> None:
        self.sum = torch.zeros(width, dtype=torch.float64)
        self.n = 0

    def add(self, rows: torch.Tensor) -> None:
        self.sum += rows.to(torch.float64).sum(0)
        self.n += rows.shape[0]

    def mean(self, dtype: torch.dtype) -> torch.Tensor:
        """[1, width] in `dtype` (through float32, the precision the rows are used in)."""
        return (self.sum / max(self.n, 1)).to(torch.float32).to(dtype)[None]


def grown_row_blocks(read_block: Callable[[int, int], torch.Tensor], shape: tuple[int, ...], rows: int,
                     dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """The row blocks of a [n, d] matrix (`read_block(a, b)` gives rows a..b-1), then rows n..rows-1,
    each the mean of the n rows: the one growth rule of an embedding, whether the matrix is in
    memory (grow_rows) or streamed from file to file (import-hf)."""
    n, width = shape[0], shape[1]
    acc, step = RowMean(width), row_block(width)
    for a in range(0, n, step):
        block = read_block(a, min(a + step, n))
        acc.add(block)
        yield block
    if rows > n:
        yield acc.mean(dtype).expand(rows - n, -1).contiguous()


def grow_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """`weight` [n, d] with rows n..rows-1 appended, each the mean of the existing rows."""
    if rows <= weight.shape[0]:
        return weight
    return torch.cat(list(grown_row_blocks(lambda a, b: weight[a:b], tuple(weight.shape), rows, weight.dtype)), 0)
