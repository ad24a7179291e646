"""`echo-export inspect`: the contents of an engine folder, read from its manifest and graphs."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from runtime.errors import ManifestError
from runtime.manifest import MANIFEST_NAME, Manifest, load_manifest

from .verify_table import print_table

_TYPES = {1: "f32", 10: "f16", 7: "i64", 6: "i32", 9: "bool", 2: "u8", 3: "i8"}


def graph_io(path: Path) -> tuple[list[str], list[str]]:
    import onnx

    m = onnx.load(str(path), load_external_data=False)

    def fmt(v) -> str:
        t = v.type.tensor_type
        dims = [str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
        return f"{v.name} {_TYPES.get(t.elem_type, t.elem_type)}[{','.join(dims)}]"

    return [fmt(i) for i in m.graph.input], [fmt(o) for o in m.graph.output]


def inspect_engine(engine_dir: str | Path, log: Callable[[str], None] = print) -> bool:
    """Print the folder's contents; True when the manifest and every hash check out."""
    d = Path(engine_dir)
    if not (d / MANIFEST_NAME).is_file():
        raise ManifestError(f"{d}: no {MANIFEST_NAME}; the build did not finish or this is not an engine folder")
    ok = True
    try:
        m = load_manifest(d, check_hashes=True)
        log(f"{d}: manifest OK, {len(m.files)} files, every sha256 matches")
    except ManifestError as e:
        ok = False
        log(f"{d}: HASH CHECK FAILED: {e}")
        m = Manifest.from_dict(json.loads((d / MANIFEST_NAME).read_text()))
    _log_model(m, log)
    _log_files(d, m, log)
    vj = d / "verify.json"
    if vj.is_file():
        rep = json.loads(vj.read_text())
        log(f"  verification on {rep.get('n_images')} images:")
        print_table(rep, lambda line: log("  " + line))
    return ok


def _log_model(m: Manifest, log: Callable[[str], None]) -> None:
    """The manifest's model, decode settings, ids, precisions and versions."""
    cfg = m.model_config
    lm = cfg.get("lm", {})
    log(f"  model: stage {cfg.get('stage')}, {lm.get('num_hidden_layers')} layers, hidden {lm.get('hidden_size')}, "
        f"kv heads {lm.get('num_key_value_heads')}, head dim {lm.get('head_dim')}, vocab {m.vocab_size}")
    log(f"  block size {m.block_size}, capacity {m.capacity}, prefix {m.prefix_len}, image {m.image_size}px, "
        f"batch sizes {m.batch_sizes}")
    log(f"  ids: eos {m.eos_id}, mask {m.mask_id}, pad {m.pad_id}")
    log(f"  precisions {', '.join(m.precisions)}; opset {m.opset}; exporter {m.exporter}")
    log(f"  versions: " + ", ".join(f"{k} {v}" for k, v in sorted(m.versions.items())))
    log(f"  verified: {m.verified}")
    if m.int8:
        log(f"  int8: mode {m.int8.get('mode')}, made for CPUs of kind {m.int8.get('chosen_for')} "
            f"(built on {m.int8.get('build_cpu', {}).get('int8_kind')})")


def _log_files(d: Path, m: Manifest, log: Callable[[str], None]) -> None:
    """The weights files, then each role's graphs with their inputs and outputs."""
    data = sorted(f for f in m.files if f.endswith(".bin"))
    if data:
        log("  weights (external data, one file read by every graph of its precision):")
        for f in data:
            log(f"    {f} ({m.files[f].size / 1e6:.2f} MB)")
    for role, entries in sorted(m.graphs.items()):
        log(f"  {role}:")
        for key, fname in sorted(entries.items()):
            size = m.files[fname].size if fname in m.files else None
            log(f"    {key:<12} {fname} ({'?' if size is None else f'{size / 1e6:.2f} MB'})")
            if fname.endswith(".onnx") and (d / fname).is_file():
                ins, outs = graph_io(d / fname)
                log(f"      in : {'; '.join(ins)}")
                log(f"      out: {'; '.join(outs)}")
