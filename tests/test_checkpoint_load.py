"""load_checkpoint fills a shapes-only model tensor by tensor from model.safetensors: the same model
as safetensors' load_model into a randomly initialised one (every state_dict tensor, every buffer,
tied weights still one tensor), bf16 files converted to the fp32 parameters, mismatching files
refused by name, and a peak memory of about one model instead of two. The streaming writer's files
read back through the safetensors library."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import make_tokenizer

from echo_train.model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from echo_train.model.config import EchoConfig, LMConfig, VisionConfig
from echo_train.model.echo_model import EchoModel
from echo_train.model.safetensors_stream import SafetensorsWriter, TensorSpec, read_header

ROOT = Path(__file__).resolve().parents[1]


def _cfg(tok, family: str = "vit", tie: bool = True, hidden: int = 64, layers: int = 1, vocab: int = 0,
         inter: int = 128) -> EchoConfig:
    return EchoConfig(
        lm=LMConfig(vocab_size=max(vocab, tok.vocab_size), hidden_size=hidden, intermediate_size=inter,
                    num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
                    tie_word_embeddings=tie),
        vision=VisionConfig(family=family, image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                            num_attention_heads=2, intermediate_size=64, image_mean=[0.5], image_std=[0.25]))


def _old_load(d: Path) -> EchoModel:
    """The loader this replaces: a randomly initialised model, then safetensors' load_model."""
    from safetensors.torch import load_model

    model = EchoModel(EchoConfig.load(d / "config.json"))
    load_model(model, str(d / "model.safetensors"))
    return model.eval()


def _assert_same(a: EchoModel, b: EchoModel) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    ba, bb = dict(a.named_buffers()), dict(b.named_buffers())
    assert list(ba) == list(bb) and ba  # the non-persistent buffers: built, not loaded
    for k in ba:
        assert ba[k].dtype == bb[k].dtype and torch.equal(ba[k], bb[k]), k
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert p.requires_grad == q.requires_grad and p.device == q.device and q.device.type == "cpu", n


@pytest.mark.parametrize("family,tie", [("vit", True), ("vit", False), ("siglip", True), ("dinov2", False)])
def test_same_model_as_load_model(tmp_path, tiny_tokenizer, family, tie):
    torch.manual_seed(0)
    model = EchoModel(_cfg(tiny_tokenizer, family, tie))
    with torch.no_grad():  # every entry distinct from any initialisation
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    save_checkpoint(tmp_path / "ck", model, tiny_tokenizer)
    new, _ = load_checkpoint(tmp_path / "ck")
    _assert_same(_old_load(tmp_path / "ck"), new)
    _assert_same(model.eval(), new)
    assert not new.training
    emb, head = new.lm.model.embed_tokens.weight, new.lm.lm_head.weight
    assert (head is emb) == tie  # a tied head is the embedding, not a copy of it
    if tie:
        with torch.no_grad():
            emb[0, 0] += 1
        assert head[0, 0] == emb[0, 0]


def test_imported_qwen_vl_buffers_and_tie(tmp_path):
    """A Qwen2.5-VL model (its vision tower's rotary tables and window mask are buffers built
    from the config) loads as load_model loads it, tied and untied."""
    from hf_fixtures import write_qwen_vl

    from echo_train.model.qwen2_5_vl import ImportOptions, import_qwen2_5_vl

    for tie in (True, False):
        write_qwen_vl(tmp_path / f"vl{tie}", tie=tie)
        import_qwen2_5_vl(ImportOptions(folder=str(tmp_path / f"vl{tie}"), out=str(tmp_path / f"ck{tie}"),
                                        image_size=32), log=lambda *a: None)
        new, _ = load_checkpoint(tmp_path / f"ck{tie}")
        _assert_same(_old_load(tmp_path / f"ck{tie}"), new)
        assert {"vision.tower.rot_cos", "vision.tower.rot_sin", "vision.tower.window_mask"} <= set(dict(new.named_buffers()))
        assert (new.lm.lm_head.weight is new.lm.model.embed_tokens.weight) == tie


def test_bf16_file_loads_into_fp32_parameters(tmp_path, tiny_tokenizer):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    model = EchoModel(_cfg(tiny_tokenizer, tie=False))
    save_checkpoint(tmp_path / "ck", model, tiny_tokenizer)
    half = {k: v.to(torch.bfloat16 if i % 2 else torch.float16) for i, (k, v) in enumerate(model.state_dict().items())}
    save_file(half, str(tmp_path / "ck" / "model.safetensors"))
    new, _ = load_checkpoint(tmp_path / "ck")
    got = new.state_dict()
    for k, v in half.items():
        assert got[k].dtype == torch.float32 and torch.equal(got[k], v.float()), k


def test_mismatching_files_are_refused_by_name(tmp_path, tiny_tokenizer):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(2)
    save_checkpoint(tmp_path / "ck", EchoModel(_cfg(tiny_tokenizer, tie=False)), tiny_tokenizer)
    f = tmp_path / "ck" / "model.safetensors"
    good = load_file(str(f))

    def refused(state, *needles):
        save_file(state, str(f))
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(tmp_path / "ck")
        for n in needles:
            assert n in str(e.value), str(e.value)

    refused({k: v for k, v in good.items() if k != "lm.model.norm.weight"}, "not in the file", "lm.model.norm.weight")
    refused({**good, "lm.extra.weight": torch.zeros(2)}, "without a place", "lm.extra.weight")
    refused({**good, "lm.model.norm.weight": torch.zeros(3)}, "of another shape", "lm.model.norm.weight [3] vs [64]")
    # a tied pair stored under both names: which one is meant is not for the loader to guess
    tied = tmp_path / "tied"
    save_checkpoint(tied, EchoModel(_cfg(tiny_tokenizer, tie=True)), tiny_tokenizer)
    state = load_file(str(tied / "model.safetensors"))
    state["lm.model.embed_tokens.weight"] = state["lm.lm_head.weight"].clone()
    save_file(state, str(tied / "model.safetensors"))
    with pytest.raises(CheckpointError, match="without a place"):
        load_checkpoint(tied)
    # damaged files: cut short, and not safetensors at all
    save_file(good, str(f))
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(tmp_path / "ck")
    f.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(tmp_path / "ck")


def test_streaming_writer_is_read_by_the_library(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    torch.manual_seed(3)
    tensors = {"b": torch.randn(3, 5).to(torch.bfloat16), "a.scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4),
               "ids": torch.arange(7), "mask": torch.rand(2, 3) > 0.5, "h": torch.randn(17).half()}
    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    with SafetensorsWriter(tmp_path / "w.safetensors", specs, {"format": "pt"}) as w:
        for k, v in tensors.items():
            if k == "b":  # in byte chunks, as import-hf copies a tensor
                w.start(k)
                raw = v.view(torch.uint8).reshape(-1).numpy()
                w.write_bytes(raw[:7])
                w.write_bytes(raw[7:])
            else:
                w.write_tensor(k, v)
    back = load_file(str(tmp_path / "w.safetensors"))
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as st:
        assert st.metadata() == {"format": "pt"}
    raw = (tmp_path / "w.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert n % 8 == 0 and len(raw) == w.total and json.loads(raw[8:8 + n])["b"]["dtype"] == "BF16"
    assert [e.name for e in read_header(tmp_path / "w.safetensors").values()] == list(tensors)
    # out of order, too many bytes, too few: refused
    with pytest.raises(ValueError, match="out of order"):
        with SafetensorsWriter(tmp_path / "x.safetensors", specs) as w:
            w.write_tensor("ids", tensors["ids"])
    w = SafetensorsWriter(tmp_path / "x.safetensors", specs)
    w.start("b")
    with pytest.raises(ValueError, match="bytes given"):
        w.write_bytes(bytes(31))
    with pytest.raises(ValueError, match="closed before b"):
        w.close()


PEAK_SCRIPT = textwrap.dedent("""
    import sys, time
    import torch

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    from echo_train.model.checkpoint import load_checkpoint
    load_checkpoint(sys.argv[2])  # a tiny one first: imports and allocator pools are not the load's memory
    from safetensors.torch import load_model
    from echo_train.model.config import EchoConfig
    from echo_train.model.echo_model import EchoModel
    base = status("VmRSS")
    t = time.perf_counter()
    if sys.argv[3] == "old":
        model = EchoModel(EchoConfig.load(sys.argv[1] + "/config.json"))
        load_model(model, sys.argv[1] + "/model.safetensors")
    else:
        model, _ = load_checkpoint(sys.argv[1])
    s = time.perf_counter() - t
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(status("VmHWM") - base, weights, s)
""")


def _peak(ck: Path, tiny: Path, how: str) -> tuple[int, int, float]:
    r = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(ck), str(tiny), how], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    extra, weights, s = r.stdout.split()[-3:]
    return int(extra), int(weights), float(s)


def test_peak_memory_is_one_model_not_two(tmp_path):
    """A ~110M-parameter model (440 MB of fp32 weights) loads with a peak of about its own size
    above the process's baseline; load_model into a built model peaks at about twice that."""
    if not Path("/proc/self/status").is_file():
        pytest.skip("peak resident memory is read from /proc/self/status (Linux)")
    tok = make_tokenizer()
    save_checkpoint(tmp_path / "tiny", EchoModel(_cfg(tok)), tok)
    cfg = _cfg(tok, tie=True, hidden=1024, layers=6, vocab=32000, inter=2816)
    save_checkpoint(tmp_path / "big", EchoModel(cfg), tok)
    new, weights, new_s = _peak(tmp_path / "big", tmp_path / "tiny", "new")
    old, _, old_s = _peak(tmp_path / "big", tmp_path / "tiny", "old")
    print(f"\n[load] {weights / 1e6:.0f} MB of fp32 weights: peak above baseline {new / 1e6:.0f} MB = "
          f"{new / weights:.2f}x in {new_s:.1f} s (load_model into a built model: {old / 1e6:.0f} MB = "
          f"{old / weights:.2f}x in {old_s:.1f} s)")
    assert weights > 400e6
    assert new < 1.3 * weights
    assert old > 1.7 * weights  # the measurement sees the second copy where there is one
