"""Engine folder manifest: the schema the exporter writes and the runtime checks.

A folder is accepted when it holds exactly the manifest's files (and manifest.json), each with
its listed size and sha256, and manifest.json still has the checksum the build gave it. The
runtime checks the whole folder when it opens it and each graph again whenever it loads one.

Verified once: hashing gigabytes of weights at every start costs seconds per start, plus the disk
read when cold (measured: docs/results.md, "Measured in code's stead"), so a file of at least STAMP_MIN_BYTES whose whole sha256 matched leaves a stamp in this
user's cache (ECHO_CACHE_DIR, else $XDG_CACHE_HOME/echo, else ~/.cache/echo; `verified/`): its
device, inode, size, mtime_ns and ctime_ns and the sha256 it had. A later check of a file with the
same identity and the manifest's sha256 needs a stat only. Any write to a file changes its ctime,
which no user can set back (utime sets mtime, and ctime to now), so an altered file is hashed again
even with its mtime restored; a copy is a new inode and is hashed once. What a stamp cannot see is
a change that bypasses the file system (raw device writes, media errors, a clock set back):
ECHO_VERIFY=full hashes every file at every start. A stamp is written only for a file whose ctime
is STAMP_SETTLE_NS old, so a write within the same timestamp tick cannot hide behind it.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import ManifestError
from .prompt import PromptTemplate, PromptTemplateError, template_of

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
STAMP_MIN_BYTES = 16 << 20  # smaller files are cheap enough to hash at every check
STAMP_SETTLE_NS = 2 * 10**9  # no stamp for a file changed this recently (file timestamps are coarse)
STAMP_KEEP = 512  # stamps kept in the cache; the oldest go first


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

    graphs maps a role to its files per precision and batch size, e.g.
    graphs["block_step"]["fp16.b1"] = "block_step.fp16.b1.onnx" (what echo_export writes;
    TensorRT plans under "trt-fp16.b1"), or per precision alone for a single batch size,
    graphs["block_step"]["fp16"]. `resolve_graph` reads both.
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
    # int8 quantisation mode and the CPU it was chosen for (see runtime/cpu_features.py); empty without int8
    int8: dict[str, Any] = field(default_factory=dict)
    # per precision, what its converter chose (int4: block size, method, accuracy_level, TensorRT form)
    precision_info: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    # sha256 of this manifest's JSON without this field: catches hand edits (a checksum, not a signature)
    manifest_sha256: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @property
    def prompt_template(self) -> "PromptTemplate | None":
        """The model's own prompt template (model_config["prompt"], runtime/prompt.py), or None:
        ECHO's own prefix."""
        try:
            return template_of(self.model_config)
        except PromptTemplateError as e:
            raise ManifestError(f"manifest model_config: {e}") from None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Manifest":
        if not isinstance(d, dict):
            raise ManifestError(f"manifest is a JSON {type(d).__name__}, not an object")
        if d.get("schema_version") != SCHEMA_VERSION:
            raise ManifestError(
                f"manifest schema version {d.get('schema_version')!r} is not supported (expected {SCHEMA_VERSION})"
            )
        d = dict(d)
        try:
            d["files"] = {k: FileEntry(**v) for k, v in d.get("files", {}).items()}
            if not isinstance(d.get("graphs", {}), dict):
                raise TypeError("graphs must be an object")
            return cls(**d)
        except (TypeError, AttributeError) as e:
            raise ManifestError(f"manifest does not match the schema: {e}") from None


def _content_sha256(d: dict[str, Any]) -> str:
    """sha256 of a manifest's JSON object with its own checksum left out (key order does not matter)."""
    body = {k: v for k, v in d.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_manifest(engine_dir: str | Path, manifest: Manifest, files: list[str]) -> Path:
    """Hash `files` (relative to engine_dir) into the manifest and write it atomically, last."""
    d = Path(engine_dir)
    manifest.files = {f: FileEntry(size=(d / f).stat().st_size, sha256=sha256_file(d / f)) for f in sorted(files)}
    manifest.manifest_sha256 = ""
    manifest.manifest_sha256 = _content_sha256(json.loads(manifest.to_json()))  # as it will read back
    tmp = d / (MANIFEST_NAME + ".tmp")
    tmp.write_text(manifest.to_json())
    os.replace(tmp, d / MANIFEST_NAME)
    return d / MANIFEST_NAME


def _stamps_dir() -> Path:
    root = os.environ.get("ECHO_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "echo")
    return Path(root) / "verified"


def stamps_enabled() -> bool:
    """False when ECHO_VERIFY=full: every check hashes the whole file."""
    return os.environ.get("ECHO_VERIFY", "stamp").strip().lower() != "full"


def _identity(st: os.stat_result) -> dict[str, int]:
    return {"dev": st.st_dev, "ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns}


def _stamp_path(st: os.stat_result) -> Path:
    return _stamps_dir() / f"{st.st_dev}-{st.st_ino}.json"


def is_stamped(st: os.stat_result, sha256: str) -> bool:
    """A stamp says this very file (same inode, size, mtime and ctime) had this sha256."""
    try:
        d = json.loads(_stamp_path(st).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and d.get("identity") == _identity(st) and d.get("sha256") == sha256


def _write_stamp(f: Path, before: os.stat_result, sha256: str) -> None:
    """Remember that `f` hashed to sha256, unless it changed while it was read or too recently to
    tell a later write apart; a cache that cannot be written only means hashing again next time."""
    st = f.stat()
    if _identity(st) != _identity(before) or time.time_ns() - st.st_ctime_ns < STAMP_SETTLE_NS:
        return
    d = _stamps_dir()
    try:
        d.mkdir(parents=True, exist_ok=True)
        p = _stamp_path(st)
        tmp = p.with_name(f"{p.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"identity": _identity(st), "sha256": sha256, "path": str(f.resolve())}))
        os.replace(tmp, p)
        stamps = sorted(d.glob("*.json"), key=lambda q: q.stat().st_mtime_ns)
        for old in stamps[: max(0, len(stamps) - STAMP_KEEP)]:
            old.unlink(missing_ok=True)
    except OSError:
        pass


def check_file(engine_dir: str | Path, manifest: Manifest, name: str, check_hash: bool = True) -> Path:
    """The path of `name` in the folder; ManifestError unless the manifest lists it and the file
    has the listed size and (check_hash) sha256. Call it again whenever the file is opened.
    A file of at least STAMP_MIN_BYTES that this user has verified since it last changed is not
    hashed again (see the module docstring)."""
    d = Path(engine_dir)
    entry = manifest.files.get(name)
    f = d / name
    if entry is None:
        raise ManifestError(f"{f}: not listed (hashed) in the manifest")
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise ManifestError(f"{d}: manifest lists {name!r}, which is outside the engine folder")
    if not f.is_file():
        raise ManifestError(f"{f}: listed in the manifest but missing")
    st = f.stat()
    if st.st_size != entry.size:
        raise ManifestError(f"{f}: size {st.st_size} does not match the manifest ({entry.size})")
    if not check_hash:
        return f
    stamp = stamps_enabled() and st.st_size >= STAMP_MIN_BYTES
    if stamp and is_stamped(st, entry.sha256):
        return f
    if sha256_file(f) != entry.sha256:
        raise ManifestError(f"{f}: sha256 does not match the manifest")
    if stamp:
        _write_stamp(f, st, entry.sha256)
    return f


def load_manifest(engine_dir: str | Path, check_hashes: bool = True) -> Manifest:
    """Read the manifest and refuse the folder unless it holds exactly the listed files, each
    unaltered (sizes always, sha256 with check_hashes), and manifest.json is as built."""
    d = Path(engine_dir)
    p = d / MANIFEST_NAME
    if not p.is_file():
        raise ManifestError(f"{d}: no {MANIFEST_NAME}; the build did not finish or this is not an engine folder")
    try:
        raw = json.loads(p.read_text())
        m = Manifest.from_dict(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{p}: unreadable manifest ({e})") from None
    except ManifestError as e:
        raise ManifestError(f"{p}: {e}") from None
    # folders built before manifests carried a checksum have none: their files are still checked
    if m.manifest_sha256 and m.manifest_sha256 != _content_sha256(raw):
        raise ManifestError(f"{p}: edited after the build (its checksum does not match its content)")
    for name in m.files:
        check_file(d, m, name, check_hashes)
    present = {f.relative_to(d).as_posix() for f in d.rglob("*") if not f.is_dir()}
    extra = sorted(present - set(m.files) - {MANIFEST_NAME})
    if extra:
        raise ManifestError(f"{d}: holds files the manifest does not list: {', '.join(extra)}")
    return m


def graph_entries(manifest: Manifest, role: str) -> dict[tuple[str, int | None], str]:
    """(precision, batch) -> filename for one role; batch None when the key names no batch.

    Accepts both layouts of `graphs[role]`: "fp16.b2" -> file (several batch sizes) and
    "fp16" -> file (one batch size). A "fp16" key is read as batch None (any built size).
    """
    out: dict[tuple[str, int | None], str] = {}
    for key, fname in (manifest.graphs.get(role) or {}).items():
        prec, _, rest = key.partition(".")
        if rest.startswith("b") and rest[1:].isdigit():
            out[(prec, int(rest[1:]))] = fname
        elif not rest:
            out[(prec, None)] = fname
        else:
            raise ManifestError(f"manifest graphs[{role!r}] has an unreadable key {key!r}")
    return out


def resolve_graph(manifest: Manifest, role: str, precision: str, batch: int) -> str:
    """The file of `role` at `precision` built for `batch`; ManifestError names what exists."""
    entries = graph_entries(manifest, role)
    if not entries:
        raise ManifestError(f"engine folder has no {role} graph")
    for key in ((precision, batch), (precision, None)):
        if key in entries:
            if key[1] is None and len(manifest.batch_sizes) > 1 and batch not in manifest.batch_sizes:
                break
            return entries[key]
    have = ", ".join(f"{p}" + (f" batch {b}" if b is not None else "") for p, b in sorted(entries, key=str))
    raise ManifestError(f"engine folder has no {role} graph for {precision} at batch {batch} (it has: {have})")


def graph_batch_sizes(manifest: Manifest, role: str, precision: str) -> list[int]:
    """Batch sizes built for (role, precision)."""
    bs = sorted({b for p, b in graph_entries(manifest, role) if p == precision and b is not None})
    if not bs and (precision, None) in graph_entries(manifest, role):
        bs = sorted(manifest.batch_sizes) or [1]
    return bs
