"""The multi-step teacher (ECHO Base) as an engine writes the official multi-step decoder's tokens
(issue 29): tiny random Qwen2.5-VL folders imported as stage rad -> echo-export build (fp32, its
block_denoise / block_commit graphs) -> EchoRuntime in multistep mode, against
`official_reference.official_multistep` around transformers' Qwen2_5_VLForConditionalGeneration,
for block 4 and 8, steps B, B/2 and 1, and the three official remasking rules."""
from __future__ import annotations

import json

import pytest

from official_reference import official_multistep
from test_official_layout import GEN, _engine, _hf_inputs, _instruction_for, folder, images, some  # noqa: F401

transformers = pytest.importorskip("transformers")
RULES = ("sequential", "low_confidence_static", "low_confidence_dynamic")
CASES: list[str] = []


@pytest.mark.parametrize("block", [4, 8])
def test_teacher_engine_writes_the_official_multistep_tokens(folder, images, block, tmp_path):  # noqa: F811
    from runtime.engine import EchoRuntime
    from runtime.multistep import MultistepOptions

    path, ids = folder
    images = some(images)
    instruction = _instruction_for(path, ids, images[0], block, block - 1)
    rt = EchoRuntime(_engine(path, tmp_path, instruction, block, stage="rad"), mode="multistep")
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(path, attn_implementation="eager").eval()
    mask_id = json.loads((path / "config.json").read_text())["mask_token_id"]
    inputs = [_hf_inputs(path, ids, instruction, p) for p in images]
    for steps in sorted({block, block // 2, 1}, reverse=True):
        for rule in RULES:
            want = [official_multistep(model, x, mask_id=mask_id, eos_id=ids["<|im_end|>"],
                                       image_id=ids["<|image_pad|>"], block=block, gen_length=GEN, steps=steps,
                                       rule=rule) for x in inputs]
            got = [r.tokens for r in rt.generate([str(p) for p in images], max_new_tokens=GEN, mode="multistep",
                                                 multistep=MultistepOptions(steps, rule))]
            CASES.append(f"B={block} steps={steps} {rule}")
            assert got == want, f"block {block}, {steps} steps, {rule}"
    assert len({tuple(t) for t in got}) > 1


def test_print_teacher_cases():
    print(f"\n[teacher engine] engine tokens == official multi-step reference in {len(CASES)} cases "
          f"({len(CASES) * 4} image decodes): " + "; ".join(CASES))


def test_serve_pool_takes_steps_and_rule_per_image_bounded(folder, images, tmp_path):  # noqa: F811
    """echo-serve's pool: an image with steps / rule decodes with the teacher's passes (the runtime's
    tokens), one without them one-step, side by side in one call; out-of-bounds settings fail that
    image alone."""
    from echo_serve.pool import EnginePool, Item
    from runtime.engine import EchoRuntime
    from runtime.multistep import MultistepOptions

    path, ids = folder
    engine = _engine(path, tmp_path, _instruction_for(path, ids, images[0], 4, 1), 4, stage="rad")
    pool = EnginePool(engine, allow_unverified=True, max_new_tokens=GEN)
    data = [p.read_bytes() for p in images[:2]]
    items = [Item(data[0], "a.png", steps=2, rule="sequential"), Item(data[1], "b.png"),
             Item(data[0], "c.png", steps=5), Item(data[0], "d.png", rule="bogus")]
    got = pool.decode(items)
    rt = EchoRuntime(engine)
    want_teacher = rt.generate([str(images[0])], GEN, mode="multistep", multistep=MultistepOptions(2, "sequential"))
    assert got[0].report.tokens == want_teacher[0].tokens
    assert got[1].report.tokens == rt.generate([str(images[1])], GEN)[0].tokens
    assert got[0].report.tokens != rt.generate([str(images[0])], GEN)[0].tokens  # really the teacher's passes
    assert "steps must be in [1, 4]" in got[2].report.error and "unknown unmask rule" in got[3].report.error


def test_teacher_build_verifies_its_passes_at_fp32_and_int4(folder, images, tmp_path):  # noqa: F811
    """echo-export build of a teacher verifies block_denoise / block_commit against the PyTorch
    multi-step decoder: fp32 identical (else no manifest), int4 reported."""
    from conftest import write_tiny_dataset
    from echo_export.build import BuildOptions, build
    from echo_train.model.qwen2_5_vl import ImportOptions, import_qwen2_5_vl

    path, ids = folder
    import_qwen2_5_vl(ImportOptions(folder=str(path), out=str(tmp_path / "ck"), block_size=4, stage="rad",
                                    instruction=_instruction_for(path, ids, images[0], 4, 2), max_response_tokens=GEN),
                      log=lambda *a: None)
    data = write_tiny_dataset(tmp_path / "data", n_train=2, n_test=3)
    lines: list[str] = []
    build(BuildOptions(ckpt=tmp_path / "ck", out=tmp_path / "engine", precisions=["fp32", "int4"], verify_n=3,
                       data=data), log=lines.append)
    rep = json.loads((tmp_path / "engine" / "verify.json").read_text())["variants"]
    print("\n" + "\n".join(x for x in lines if "multistep" in x))
    assert rep["multistep.fp32.b1"]["identical"] and rep["multistep.fp32.b1"]["n_images"] == 3
    assert "multistep.int4.b1" in rep and rep["block.fp32.b1"]["identical"]
