"""Checkpoint folders: config.json, model.safetensors, tokenizer.json, training_state.pt.

Writes go to a sibling temp folder that is renamed into place, so an interrupted save never
leaves a folder that looks complete.

Loading builds the model with its parameters as shapes only (device "meta": no memory, no random
initialisation) and fills them one tensor at a time from model.safetensors, each converted to the
parameter's dtype (an imported bf16 file loads into fp32 parameters): the peak is the model plus
one read chunk, not the model twice (a second state dict) as through safetensors' load_model.
"""
from __future__ import annotations

import json
import mmap
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from safetensors.torch import save_model
from torch import nn

from runtime.text import ReportTokenizer

from .config import EchoConfig
from .echo_model import EchoModel
from .errors import CheckpointError, names_preview
from .safetensors_stream import SafetensorsFormatError, TensorEntry, read_header, read_into

REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def save_checkpoint(
    out_dir: str | Path,
    model: EchoModel,
    tokenizer: ReportTokenizer,
    training_state: Optional[dict[str, Any]] = None,
) -> Path:
    return write_checkpoint(out_dir, model.cfg, lambda p: save_model(model, str(p)), tokenizer, training_state)


def write_checkpoint(
    out_dir: str | Path,
    cfg: EchoConfig,
    write_weights: Callable[[Path], None],
    tokenizer: ReportTokenizer,
    training_state: Optional[dict[str, Any]] = None,
) -> Path:
    """A checkpoint folder whose model.safetensors `write_weights(path)` writes (from a model, or
    streamed from another file by import-hf), built in a sibling folder and renamed into place.
    On any error the half-written sibling is removed and `out_dir` is as it was."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".saving")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        cfg.save(tmp / "config.json")
        write_weights(tmp / "model.safetensors")
        tokenizer.save(tmp / "tokenizer.json")
        if training_state is not None:
            torch.save(training_state, tmp / "training_state.pt")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return swap_into_place(tmp, out)


def swap_into_place(tmp: Path, out: Path) -> Path:
    """Replace folder `out` by the finished folder `tmp` with renames only, never half-written."""
    old = out.with_name(f".{out.name}.old")
    if out.exists():
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
    tmp.rename(out)
    if old.exists():
        shutil.rmtree(old)
    return out


def check_checkpoint_dir(ckpt_dir: str | Path) -> Path:
    d = Path(ckpt_dir)
    if not d.is_dir():
        raise CheckpointError(f"{d}: checkpoint folder not found")
    missing = [f for f in REQUIRED_FILES if not (d / f).is_file()]
    if missing:
        raise CheckpointError(f"{d}: not a complete checkpoint, missing {', '.join(missing)}")
    return d


def load_checkpoint(ckpt_dir: str | Path, map_location: str = "cpu",
                    dtype: Optional[torch.dtype] = None, mapped: bool = False) -> tuple[EchoModel, ReportTokenizer]:
    """The model (in eval mode, on `map_location`) and tokenizer of a checkpoint folder.

    `dtype`: the parameters' dtype (e.g. `checkpoint_dtype(dir)`: a bf16 file loads as bf16, half
    the bytes of fp32; a 7B model is 16.6 GB instead of 33); buffers (rotary tables, masks) stay
    as the constructors make them. Default: the model's own (fp32). `mapped`: parameters stored in
    that dtype are views of the file mapped into memory (see load_weights), for read-only use.

    Refusals (CheckpointError): missing files, a config that is not ECHO's, a model.safetensors
    that is damaged or whose tensors do not match the config's model (named, first few)."""
    d = check_checkpoint_dir(ckpt_dir)
    try:
        cfg = EchoConfig.load(d / "config.json")
    except (json.JSONDecodeError, TypeError, KeyError, ValueError) as e:  # ValueError: a bad prompt template
        raise CheckpointError(f"{d / 'config.json'}: not an ECHO config ({e})") from None
    with parameters_on_meta():
        model = EchoModel(cfg)
    if dtype is not None:
        parameters_to(model, dtype)
    load_weights(model, d / "model.safetensors", device=map_location, mapped=mapped)
    model.eval()
    return model, ReportTokenizer.from_file(d / "tokenizer.json", cfg.prompt_template)


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters as shapes only (device "meta"); load_weights
    gives them storage. Buffers stay real: the non-persistent ones (rotary tables, window masks,
    pixel normalisation, position ids) are computed from the config in the constructors and never
    stored in a checkpoint, so they must come out of construction with their values, which
    building the whole model under torch.device("meta") would not give.

    A parameter is created on the CPU by its module's constructor (torch.empty: no pages touched)
    and replaced by its meta twin as it is registered, so random initialisation then runs on meta
    tensors, at no cost. Tied parameters (lm_head = embed_tokens) stay one object. The patch is
    process-wide while inside: build nothing on another thread meanwhile."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: Optional[nn.Parameter]) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def checkpoint_dtype(ckpt_dir: str | Path) -> torch.dtype:
    """The floating dtype most of model.safetensors' bytes are stored in (bf16 for an import-hf
    checkpoint, fp32 for a trained one): the dtype a build can load it in without widening."""
    sizes: dict[torch.dtype, int] = {}
    for e in read_header(Path(ckpt_dir) / "model.safetensors").values():
        if e.dtype.is_floating_point:
            sizes[e.dtype] = sizes.get(e.dtype, 0) + e.nbytes
    return max(sizes, key=sizes.get) if sizes else torch.float32


@torch.no_grad()
def parameters_to(model: nn.Module, dtype: torch.dtype) -> None:
    """Give every floating parameter `dtype` in place (on meta: shapes only, nothing allocated),
    buffers left alone: model.to(dtype) would also round the fp32 rotary frequencies. Tied
    parameters stay one object."""
    done: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None or not p.is_floating_point() or p.dtype == dtype:
                continue
            if id(p) not in done:
                done[id(p)] = nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad)
            module._parameters[name] = done[id(p)]


def _state_slots(model: nn.Module) -> list[tuple[list[str], list[tuple[nn.Module, str]], torch.Tensor]]:
    """The model's state_dict entries grouped by the tensor they are: (names, (module, attribute)
    holding it, the tensor). Tied weights are one group of two names (safetensors files keep one)."""
    groups: dict[int, tuple[list[str], list[tuple[nn.Module, str]], torch.Tensor]] = {}
    for name in model.state_dict(keep_vars=True):
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        t = module._parameters.get(attr) if attr in module._parameters else module._buffers.get(attr)
        names, holders, _ = groups.setdefault(id(t), ([], [], t))
        names.append(name)
        holders.append((module, attr))
    return list(groups.values())


def _mapped_tensor(mm: mmap.mmap, entry, like: torch.Tensor) -> Optional[torch.Tensor]:
    """`entry`'s bytes in the mapped file as a tensor shaped like `like`, where the dtypes match and
    the offset is aligned for it; else None (the caller reads a copy)."""
    item = torch.empty(0, dtype=like.dtype).element_size()
    if entry.dtype != like.dtype or entry.begin % item or entry.numel == 0:
        return None
    return torch.frombuffer(mm, dtype=like.dtype, count=entry.numel, offset=entry.begin).view(like.shape)


# one tensor of the file to read: its header entry, the (module, attribute) places that hold it, the tensor there
_Read = tuple[TensorEntry, list[tuple[nn.Module, str]], torch.Tensor]


@torch.no_grad()
def load_weights(model: nn.Module, path: str | Path, device: str | torch.device | None = None,
                 mapped: bool = False) -> None:
    """Fill every state_dict entry of `model` from the safetensors file `path`, one tensor at a time.

    Meta parameters (parameters_on_meta) get new storage on `device` (default the CPU); real ones
    are overwritten in place, on their own device. Each tensor is converted to the entry's dtype.
    `mapped` (CPU, meta parameters of the stored dtype): a parameter is a view of the file mapped
    copy-on-write, not a copy: its pages are the page cache's, read when touched and dropped by the
    kernel under memory pressure (read again when needed), so a 16.6 GB 7B model can be exported on
    a machine where less than that is free. Writing to such a parameter copies only the pages
    written, never the file.
    Everything is checked before anything is read: a tensor the model lacks, an entry the file
    lacks, another shape, a tied pair stored twice -> CheckpointError naming them."""
    p = Path(path)
    try:
        entries = read_header(p)
    except (SafetensorsFormatError, OSError) as e:
        raise CheckpointError(f"{p}: not a readable safetensors file ({e})") from None
    plan = _read_plan(model, entries, p)
    target = torch.device(device) if device is not None else torch.device("cpu")
    try:
        with open(p, "rb", buffering=0) as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if mapped and target.type == "cpu" else None
            for entry, holders, t in plan:
                _read_one(f, mm, entry, holders, t, target)
    except (SafetensorsFormatError, OSError) as e:
        raise CheckpointError(f"{p}: {e}") from None
    left = [n for n, v in (*model.named_parameters(), *model.named_buffers()) if v.device.type == "meta"]
    if left:  # a parameter outside the state_dict (no module of ours has one): never leave it shapes-only
        raise CheckpointError(f"{p}: {names_preview(left)} not loaded (not in the model's state_dict)")
    if device is not None:
        model.to(target)  # the buffers built on the CPU


def _read_plan(model: nn.Module, entries: dict[str, TensorEntry], p: Path) -> list[_Read]:
    """What to read into which tensor of `model`; refused naming every entry that does not match."""
    plan, missing, unexpected, wrong = [], [], set(entries), []
    for names, holders, t in _state_slots(model):
        stored = [n for n in names if n in entries]
        unexpected.difference_update(stored)
        if not stored:
            missing.append(names[0])
            continue
        if len(stored) > 1:  # one tensor in the model, two in the file: which one is meant?
            unexpected.update(stored[1:])
        e = entries[stored[0]]
        if e.shape != tuple(t.shape):
            wrong.append(f"{stored[0]} {list(e.shape)} vs {list(t.shape)}")
            continue
        plan.append((e, holders, t))
    if missing or unexpected or wrong:
        what = type(model).__name__
        parts = [f"{len(missing)} tensors of the {what} not in the file: {names_preview(sorted(missing))}"] if missing else []
        if unexpected:
            parts.append(f"{len(unexpected)} tensors without a place in the {what}: {names_preview(sorted(unexpected))}")
        if wrong:
            parts.append(f"{len(wrong)} of another shape: {names_preview(sorted(wrong))}")
        raise CheckpointError(f"{p}: does not match the model of its config: " + "; ".join(parts))
    return plan


def _read_one(f, mm: Optional[mmap.mmap], entry: TensorEntry, holders: list[tuple[nn.Module, str]],
              t: torch.Tensor, target: torch.device) -> None:
    """One tensor from the open file: into `t` in place, or (`t` on meta) into new storage on
    `target` (a view of the mapped file `mm` where it can be) that every holder of it (both names
    of a tied weight) gets."""
    if t.device.type != "meta":
        read_into(f, entry, t)
        return
    new = _mapped_tensor(mm, entry, t) if mm is not None else None
    if new is None:
        new = torch.empty(t.shape, dtype=t.dtype, device=target)
        read_into(f, entry, new)
    if isinstance(t, nn.Parameter):
        new = nn.Parameter(new, requires_grad=t.requires_grad)
    for module, attr in holders:
        getattr(module, "_parameters" if isinstance(t, nn.Parameter) else "_buffers")[attr] = new


def load_training_state(ckpt_dir: str | Path) -> Optional[dict[str, Any]]:
    p = Path(ckpt_dir) / "training_state.pt"
    return torch.load(p, map_location="cpu", weights_only=False) if p.is_file() else None
