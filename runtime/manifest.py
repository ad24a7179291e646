"""Engine folder manifest: the schema the exporter writes and the runtime checks."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import ManifestError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


@dataclass
class FileEntry:
    size: int
    sha256: str


@dataclass
class Manifest:
    """Everything the runtime needs to know about an engine folder.

    graphs maps a role to its files per precision, e.g.
    graphs["block_step"]["fp16"] = "block_step.fp16.onnx".
    """

    model_config: dict[str, Any]
    block_size: int
    capacity: int
    batch_sizes: list[int]
    vocab_size: int
    prefix_len: int
    image_size: int
    eos_id: int
    mask_id: int
    pad_id: int
    precisions: list[str]
    graphs: dict[str, dict[str, str]]
    files: dict[str, FileEntry] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    opset: int = 18
    exporter: str = "torch.onnx.export(dynamo=True)"
    verified: bool = False
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Manifest":
        if d.get("schema_version") != SCHEMA_VERSION:
            raise ManifestError(
                f"manifest schema version {d.get('schema_version')!r} is not supported (expected {SCHEMA_VERSION})"
            )
        d = dict(d)
        d["files"] = {k: FileEntry(**v) for k, v in d.get("files", {}).items()}
        try:
            return cls(**d)
        except TypeError as e:
            raise ManifestError(f"manifest does not match the schema: {e}") from None


def write_manifest(engine_dir: str | Path, manifest: Manifest, files: list[str]) -> Path:
    """Hash `files` (relative to engine_dir) into the manifest and write it atomically, last."""
    d = Path(engine_dir)
    manifest.files = {f: FileEntry(size=(d / f).stat().st_size, sha256=sha256_file(d / f)) for f in sorted(files)}
    tmp = d / (MANIFEST_NAME + ".tmp")
    tmp.write_text(manifest.to_json())
    os.replace(tmp, d / MANIFEST_NAME)
    return d / MANIFEST_NAME


def load_manifest(engine_dir: str | Path, check_hashes: bool = True) -> Manifest:
    """Read the manifest and refuse the folder if any listed file is missing or altered."""
    d = Path(engine_dir)
    p = d / MANIFEST_NAME
    if not p.is_file():
        raise ManifestError(f"{d}: no {MANIFEST_NAME}; the build did not finish or this is not an engine folder")
    try:
        m = Manifest.from_dict(json.loads(p.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{p}: unreadable manifest ({e})") from None
    for name, entry in m.files.items():
        f = d / name
        if not f.is_file():
            raise ManifestError(f"{f}: listed in the manifest but missing")
        if f.stat().st_size != entry.size:
            raise ManifestError(f"{f}: size {f.stat().st_size} does not match the manifest ({entry.size})")
        if check_hashes and sha256_file(f) != entry.sha256:
            raise ManifestError(f"{f}: sha256 does not match the manifest")
    return m
