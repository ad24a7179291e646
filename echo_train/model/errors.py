"""The refusals of the model package: a checkpoint folder or a Hugging Face folder that cannot be
taken in. Here, apart from checkpoint.py and pretrained.py, so that both (and every family under
families/) can raise them without importing each other."""
from __future__ import annotations

from pathlib import Path

SHOW_NAMES = 5  # tensors named in a "do not map" message


class CheckpointError(Exception):
    """A checkpoint folder is missing files or holds the wrong kind of model."""


class PretrainedError(CheckpointError):
    """A Hugging Face folder that cannot be taken in; the message says which and why."""


def names_preview(names: list[str]) -> str:
    """The first SHOW_NAMES names, and how many more."""
    more = f" and {len(names) - SHOW_NAMES} more" if len(names) > SHOW_NAMES else ""
    return ", ".join(names[:SHOW_NAMES]) + more


def refuse_unmapped(folder: str | Path, what: str, unexpected: list[str], missing: list[str], wrong: list[str]) -> None:
    """One PretrainedError naming the first few tensors that do not map onto `what`, if any."""
    if not (unexpected or missing or wrong):
        return
    parts = []
    if unexpected:
        parts.append(f"{len(unexpected)} tensors without a place in {what}: {names_preview(unexpected)}")
    if missing:
        parts.append(f"{len(missing)} parameters of {what} not in the folder: {names_preview(missing)}")
    if wrong:
        parts.append(f"{len(wrong)} of another shape: {names_preview(wrong)}")
    raise PretrainedError(f"{folder}: tensors do not map onto {what}: " + "; ".join(parts))
