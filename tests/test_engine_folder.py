"""Every way an engine folder is refused, on a real folder from `echo-export build`.

The folder is built once per module (tiny model, fp32, fused and AR graphs) and copied per
test; each test breaks its copy in one way and checks the refusal names the file and reason.
A pristine copy opens and decodes in both modes, so no refusal passes by refusing everything.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import make_tiny_model, make_tokenizer

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("torch")

BLOCK, MAX_NEW = 4, 8
FUSED_STEP, AR_STEP = "block_step.fp32.b1.onnx", "ar_step.fp32.b1.onnx"
AR_STEP_CPU = "ar_step_inplace.fp32.b1.onnx"  # the AR step the runtime loads on onnxruntime's CPU


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    from echo_export.build import BuildOptions, build
    from echo_train.model.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("engine_folder")
    tok = make_tokenizer()
    model = make_tiny_model(tok, stage="dcd", block_size=BLOCK)
    model.cfg.max_response_tokens = MAX_NEW
    save_checkpoint(root / "ckpt", model, tok)
    model.cfg.stage = "ar"
    save_checkpoint(root / "ar", model, tok)
    return build(BuildOptions(ckpt=root / "ckpt", out=root / "engine", precisions=["fp32"], ar_ckpt=root / "ar",
                              capacity=96, verify_n=0), log=lambda s: None)


@pytest.fixture
def folder(built, tmp_path) -> Path:
    return Path(shutil.copytree(built, tmp_path / "engine"))


def _image() -> np.ndarray:
    yy, xx = np.mgrid[0:32, 0:32] / 31
    return (np.sin(3 * xx) * np.cos(2 * yy))[None].astype(np.float32)


def _flip_a_byte(path: Path) -> None:
    """Same size, different content: only the sha256 can tell."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _edit_manifest(folder: Path, edit) -> None:
    """Edit manifest.json by hand (its checksum is left as the build wrote it)."""
    p = folder / "manifest.json"
    d = json.loads(p.read_text())
    edit(d)
    p.write_text(json.dumps(d, indent=2, sort_keys=True))


def _rewrite_manifest(folder: Path, change, drop: tuple[str, ...] = ()) -> None:
    """A consistent manifest (hashes and checksum recomputed) with `change` applied."""
    from runtime.manifest import load_manifest, write_manifest

    m = load_manifest(folder)
    change(m)
    write_manifest(folder, m, [f for f in m.files if f not in drop])


def test_a_pristine_copy_opens_and_decodes_in_both_modes(folder):
    from runtime import EchoRuntime
    from runtime.manifest import load_manifest

    m = load_manifest(folder)
    assert len(m.manifest_sha256) == 64
    assert {FUSED_STEP, AR_STEP, "tokenizer.json"} <= set(m.files)
    assert sorted(p.name for p in folder.iterdir()) == sorted([*m.files, "manifest.json"])
    rt = EchoRuntime(folder, threads=1)
    assert rt.generate([_image()])[0].ok and rt.generate_ar([_image()])[0].ok


@pytest.mark.parametrize("name", [FUSED_STEP, "vision_prefill.fp32.b1.onnx", AR_STEP, "tokenizer.json"])
def test_an_altered_file_is_refused(folder, name):
    from runtime import EchoRuntime, ManifestError

    _flip_a_byte(folder / name)
    with pytest.raises(ManifestError, match=rf"{name}: sha256 does not match the manifest"):
        EchoRuntime(folder)  # the AR graph too, though fused mode would not load it yet


def test_an_edited_tokenizer_is_refused(folder):
    from runtime import EchoRuntime, ManifestError

    p = folder / "tokenizer.json"
    tok = json.loads(p.read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab)[-2:]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two ids swapped: still a valid tokenizer
    p.write_text(json.dumps(tok, ensure_ascii=False))
    with pytest.raises(ManifestError, match=r"tokenizer\.json: (size \d+ does not match|sha256 does not match)"):
        EchoRuntime(folder)


def test_a_tokenizer_with_other_special_ids_and_a_matching_manifest_is_refused(folder):
    """Hashes can be rewritten; the special ids must still agree with the manifest's."""
    from runtime import EchoRuntime, ManifestError

    def shift_eos(m):
        m.eos_id += 1

    _rewrite_manifest(folder, shift_eos)
    with pytest.raises(ManifestError, match="tokenizer special ids do not match the manifest"):
        EchoRuntime(folder)


def test_a_size_mismatch_is_refused_even_without_hashing(folder):
    from runtime import EchoRuntime, ManifestError
    from runtime.manifest import load_manifest

    with open(folder / AR_STEP, "ab") as f:
        f.write(b"\0")
    size = (folder / AR_STEP).stat().st_size
    with pytest.raises(ManifestError, match=rf"{AR_STEP}: size {size} does not match the manifest \({size - 1}\)"):
        load_manifest(folder, check_hashes=False)  # what a cheap check (benchmarks) still sees
    with pytest.raises(ManifestError, match="does not match the manifest"):
        EchoRuntime(folder)


@pytest.mark.parametrize("extra", ["notes.txt", "block_step.fp32.b8.onnx", "sub/weights.bin"])
def test_an_extra_file_is_refused(folder, extra):
    from runtime import EchoRuntime, ManifestError
    from runtime.manifest import load_manifest

    (folder / extra).parent.mkdir(exist_ok=True)
    (folder / extra).write_bytes(b"not in the manifest")
    with pytest.raises(ManifestError, match=rf"holds files the manifest does not list: {extra}$"):
        load_manifest(folder, check_hashes=False)
    with pytest.raises(ManifestError, match="does not list"):
        EchoRuntime(folder)


def test_a_missing_file_is_refused(folder):
    from runtime import EchoRuntime, ManifestError

    (folder / AR_STEP).unlink()
    with pytest.raises(ManifestError, match=rf"{AR_STEP}: listed in the manifest but missing"):
        EchoRuntime(folder)


def test_a_graph_the_manifest_does_not_list_is_refused_when_loaded(folder):
    """graphs[] names it, files[] does not (and the folder no longer holds it): fused mode
    opens, the AR mode is refused when it loads its graph."""
    from runtime import EchoRuntime, ManifestError

    _rewrite_manifest(folder, lambda m: None, drop=(AR_STEP_CPU,))
    (folder / AR_STEP_CPU).unlink()
    rt = EchoRuntime(folder, threads=1)
    assert rt.generate([_image()])[0].ok
    with pytest.raises(ManifestError, match=rf"{AR_STEP_CPU}: not listed \(hashed\) in the manifest"):
        rt.generate_ar([_image()])


def test_an_unlisted_graph_still_in_the_folder_is_refused_at_once(folder):
    from runtime import EchoRuntime, ManifestError

    _rewrite_manifest(folder, lambda m: None, drop=(AR_STEP,))
    with pytest.raises(ManifestError, match=rf"does not list: {AR_STEP}"):
        EchoRuntime(folder)


def test_a_graph_altered_after_the_runtime_opened_is_refused_when_loaded(folder):
    """The AR graphs load on first use: they are checked then, not only when the folder opened."""
    from runtime import EchoRuntime, ManifestError

    rt = EchoRuntime(folder, threads=1)  # fused: block_step and vision_prefill loaded and checked
    _flip_a_byte(folder / AR_STEP_CPU)
    with pytest.raises(ManifestError, match=rf"{AR_STEP_CPU}: sha256 does not match the manifest"):
        rt.generate_ar([_image()])
    assert rt.generate([_image()])[0].ok  # graphs loaded before the change are the checked ones


def test_a_graph_grown_after_the_runtime_opened_is_refused_when_loaded(folder):
    from runtime import EchoRuntime, ManifestError

    rt = EchoRuntime(folder, mode="ar", threads=1)
    with open(folder / "vision_prefill.fp32.b1.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ManifestError, match=r"vision_prefill\.fp32\.b1\.onnx: size"):
        rt.generate([_image()], mode="fused")


@pytest.mark.parametrize("version", [2, 0, None, "1"])
def test_a_wrong_schema_version_is_refused(folder, version):
    from runtime import EchoRuntime, ManifestError

    _edit_manifest(folder, lambda d: d.update(schema_version=version) if version is not None else d.pop("schema_version"))
    with pytest.raises(ManifestError, match=rf"manifest\.json: manifest schema version {version!r} is not supported"):
        EchoRuntime(folder)


@pytest.mark.parametrize("edit", [
    lambda d: d.update(verified=not d["verified"]),
    lambda d: d.update(capacity=d["capacity"] * 2),
    lambda d: d["files"][AR_STEP].update(sha256="0" * 64),
    lambda d: d["graphs"]["ar_step"].update({"fp32.b1": FUSED_STEP}),
], ids=["verified", "capacity", "a file's sha256", "a graph's file"])
def test_a_hand_edited_manifest_is_refused(folder, edit):
    from runtime import EchoRuntime, ManifestError

    _edit_manifest(folder, edit)
    with pytest.raises(ManifestError, match=r"manifest\.json: edited after the build"):
        EchoRuntime(folder)


def test_the_manifest_checksum_ignores_layout_and_older_folders_have_none(folder):
    from runtime import EchoRuntime, ManifestError
    from runtime.manifest import load_manifest

    p = folder / "manifest.json"
    p.write_text(json.dumps(json.loads(p.read_text())))  # one line, same content
    assert load_manifest(folder).manifest_sha256
    _edit_manifest(folder, lambda d: d.pop("manifest_sha256"))  # as built before the checksum existed
    assert EchoRuntime(folder, threads=1).generate([_image()])[0].ok
    _flip_a_byte(folder / FUSED_STEP)  # its files are still checked
    with pytest.raises(ManifestError, match="sha256 does not match"):
        EchoRuntime(folder)


def test_a_manifest_that_disagrees_with_its_graphs_is_refused(folder):
    """A consistent (re-hashed) manifest whose block size is not the graphs': refused when the
    buffers are bound, naming the tensor, not by an onnxruntime error in the first pass."""
    from runtime import EchoRuntime, EchoRuntimeError

    def halve_block(m):
        m.block_size //= 2

    _rewrite_manifest(folder, halve_block)
    with pytest.raises(EchoRuntimeError, match=r"fp32\.b1\.onnx: \w+ is \w+\[[\d, ]+\] in the graph, the runtime made"):
        EchoRuntime(folder)
