"""The stage-3 ladder (benchmarks/dcd_ladder.py): scoring against the teacher, and an honest table."""
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from benchmarks import dcd_ladder as lad
from conftest import make_tiny_model
from echo_train.data.synth.findings import sample_findings
from echo_train.data.synth.reports import write_report
from echo_train.stages.dcd_targets import build_dcd_inputs
from echo_train.stages.stage3_dcd import make_trajectory_collate


def _reports(n: int) -> list[str]:
    rng = np.random.default_rng(0)
    return [write_report(rng, sample_findings(rng))["report"] for _ in range(n)]


def test_scores_are_paired_differences_to_the_teacher():
    refs = dict(enumerate(_reports(20)))
    refs = {str(k): v for k, v in refs.items()}
    teacher = dict(refs)  # the teacher writes the references exactly
    broken = {k: (v if i % 2 else "no is no evidence of left pleural no . pleural pleural .") for i, (k, v) in enumerate(refs.items())}
    studies = [SimpleNamespace(id=k, report=v, attributes={"unseen_combination": i < 5}) for i, (k, v) in enumerate(refs.items())]
    s = lad.score_rung(broken, teacher, studies)
    assert s["unseen"]["n"] == 5 and s["all"]["n"] == 20
    v = s["all"]["vs_teacher_validity"]
    assert v["delta"] < 0 and v["ci95"][0] <= v["delta"] <= v["ci95"][1]
    assert s["all"]["vs_teacher_f1"]["delta"] < 0
    same = lad.score_rung(teacher, teacher, studies)["all"]
    assert same["vs_teacher_f1"]["delta"] == 0 and same["vs_teacher_validity"]["ci95"] == (0.0, 0.0)


def test_table_says_not_run_and_never_invents_a_number(tmp_path):
    (tmp_path / "rungs").mkdir()
    text = lad.build_table(tmp_path, {"wide": "needs a 2x teacher"})
    rows = {line.split("|")[1].strip(): line for line in text.splitlines()[2:]}
    assert set(rows) == {r.name for r in lad.RUNGS}
    assert "not run: needs a 2x teacher" in rows["wide"] and "not run" in rows["base"]
    assert not any(ch.isdigit() for ch in rows["base"].split("|", 3)[3])  # no figure in a row that did not run


def test_intermediate_copies_each_draw_a_trajectory_state(tiny_tokenizer):
    tok = tiny_tokenizer
    model = make_tiny_model(tok, stage="rad", block_size=4)
    m = tok.mask_id
    tokens = torch.tensor([7, 8, 9, 10, tok.eos_id, tok.eos_id, tok.eos_id, tok.eos_id])
    states = [torch.tensor([[m] * 4, [7, m, m, m], [7, 8, m, 10], [7, 8, 9, 10]]),
              torch.tensor([[m] * 4, [tok.eos_id] * 4])]
    item = {"pixel_values": torch.zeros(1, 32, 32), "prefix_ids": torch.tensor(tok.prefix_ids(model.n_image_tokens)),
            "response_ids": torch.tensor([7, 8, tok.eos_id]), "id": "a", "teacher": {"tokens": tokens, "states": states}}
    batch = make_trajectory_collate(tok, 4)([item])
    inp = build_dcd_inputs(model, batch, m, torch.Generator().manual_seed(0), p_intermediate=1.0, intermediate_copies=2)
    P, R = len(item["prefix_ids"]), batch["teacher_ids"].shape[1]
    assert inp.targets.shape[1] == P + R + 3 * R  # the all-mask copy and two intermediate copies
    cands = [model.embed_tokens(states[0][i]) for i in (1, 2)]
    for c in range(2):
        start = P + (2 + c) * R
        assert torch.equal(inp.targets[0, start : start + 8], tokens)  # every copy: the teacher's final block
        assert any(torch.allclose(inp.embeds[0, start : start + 4], x) for x in cands)
    one = build_dcd_inputs(model, batch, m, torch.Generator().manual_seed(0), p_intermediate=1.0)
    assert one.targets.shape[1] == P + 3 * R  # the default: one intermediate copy, as before


def test_rung_commands_carry_the_recipe():
    r = lad.BY_NAME["mid100x2"]
    args = r.stage3_args(Path("W"))
    assert args[args.index("--intermediate-copies") + 1] == "2" and args[args.index("--steps") + 1] == str(lad.DEMO_STEPS)
    assert "--student-init" not in args and "--on-policy" not in args
    op = lad.BY_NAME["onpol"].stage3_args(Path("W"))
    assert op[op.index("--student-init") + 1] == str(Path("W/students/base")) and "--on-policy" in op
    cont = lad.BY_NAME["cont"].stage3_args(Path("W"))
    assert cont[cont.index("--student-init") + 1] == str(Path("W/students/base")) and "--on-policy" not in cont
    assert json.dumps([r.__dict__ for r in lad.RUNGS])  # every rung is plain data (written into its JSON)


def test_row_passes_count_only_what_each_report_needed():
    m, e = 99, 2
    # block 0: row 0 all confident after one pass, row 1 needs a second; block 1: row 0 ends (EOS), row 1 needs two
    traj = [torch.tensor([[[m] * 4, [5, 6, 7, 8], [5, 6, 7, 8]], [[m] * 4, [5, m, 7, m], [5, 6, 7, 8]]]),
            torch.tensor([[[m] * 4, [e, e, e, e], [e, e, e, e]], [[m] * 4, [5, m, m, 8], [5, 6, 7, 8]]]),
            torch.tensor([[[m] * 4, [e] * 4, [e] * 4], [[m] * 4, [e] * 4, [e] * 4]])]
    raw = torch.tensor([[5, 6, 7, 8, e, e, e, e, e, e, e, e], [5, 6, 7, 8, 5, 6, 7, 8, e, e, e, e]])
    assert lad._row_passes(raw[0], traj, 0, e, m, 4) == (2, 2)  # stops at its EOS block
    assert lad._row_passes(raw[1], traj, 1, e, m, 4) == (3, 5)


def _tiny_setup(tmp_path, tok):
    from conftest import write_tiny_dataset
    from echo_train.model.checkpoint import save_checkpoint
    from echo_train.stages.common import load_split

    model = make_tiny_model(tok, stage="rad", block_size=8, sharpen=4.0)
    model.cfg.max_response_tokens = 24
    save_checkpoint(tmp_path / "ckpt", model, tok)
    data = write_tiny_dataset(tmp_path / "data", 3, 3)
    return model, load_split(str(data), "test", None)


def test_fixup_decode_is_the_multistep_decoder_and_counts_its_passes(tmp_path, tiny_tokenizer):
    from echo_train.decoding.run import DecodeSpec, decode_studies

    model, studies = _tiny_setup(tmp_path, tiny_tokenizer)
    ckpt = str(tmp_path / "ckpt")
    one, s1 = lad.decode_fixup_cached(ckpt, 1, "dynamic", studies, tmp_path / "d1.json")
    two, s2 = lad.decode_fixup_cached(ckpt, 2, "dynamic", studies, tmp_path / "d2.json")
    ref, _ = decode_studies(model, tiny_tokenizer, studies, DecodeSpec("multistep", 8, steps=2, rule="dynamic",
                                                                    max_new_tokens=24), progress=False)
    assert two == ref
    assert s1["passes_per_block"] == 1.0 and 1.0 <= s2["passes_per_block"] <= 2.0
    assert abs(s2["second_pass_share"] - (s2["passes_per_block"] - 1)) < 1e-9
    assert lad.decode_fixup_cached(ckpt, 2, "dynamic", studies, tmp_path / "d2.json")[0] == two  # cached


def test_teacher_forced_student_equal_to_its_one_step_teacher_matches_every_block(tmp_path, tiny_tokenizer):
    """A teacher decoding one step per block writes, per block, its all-mask argmax in the context of its own
    earlier blocks: the same model scored in DCD's training layout on those trajectories must match it exactly."""
    from echo_train.stages.trajectories import generate_trajectories

    model, studies = _tiny_setup(tmp_path, tiny_tokenizer)
    generate_trajectories(model, tiny_tokenizer, studies, tmp_path / "traj", 8, 1)
    with torch.no_grad():
        s = lad.forced_scores(model, tiny_tokenizer, studies, tmp_path / "traj")
    assert s["studies"] == len(studies)
    assert s["token_accuracy"] == 1.0 and s["exact_blocks"] == 1.0


def test_table_shows_passes_and_the_wide_rung_against_base(tmp_path):
    (tmp_path / "rungs").mkdir()
    delta = {"delta": 0.01, "ci95": [-0.01, 0.03]}
    sub = {"n": 10, "valid_sentence_rate": 0.8, "valid_report_rate": 0.5, "repeat_or_contradiction_rate": 0.1,
           "finding_micro_f1": 0.6, "vs_teacher_f1": delta, "vs_teacher_validity": delta}
    scores = {"all": sub, "unseen": sub}
    for name, extra in (("teacher-demo", {}), ("teacher-wide", {}), ("base", {}),
                        ("wide", {"vs_base": {k: {"validity": delta, "f1": delta} for k in ("all", "unseen")}}),
                        ("fix2", {"decoding": {"passes_per_block": 1.4, "second_pass_share": 0.4}})):
        (tmp_path / "rungs" / f"{name}.json").write_text(json.dumps({"name": name, "what": name, "scores": scores, **extra}))
    rows = {line.split("|")[1].strip(): line.split("|") for line in lad.build_table(tmp_path, {}).splitlines()[2:]}
    assert rows["fix2"][-2].strip() == "1.40" and rows["base"][-2].strip() == "1" and rows["teacher-wide"][-2].strip() == "<= 8"
    assert rows["wide"][11].strip() == "+1.0 [-1.0, +3.0] / +1.0 [-1.0, +3.0]"
    assert all(len(r) == len(rows["base"]) for r in rows.values())


def test_teacher_reports_from_trajectories_are_its_multistep_decode(tmp_path, tiny_tokenizer):
    from echo_train.decoding.run import DecodeSpec, decode_studies

    model, studies = _tiny_setup(tmp_path, tiny_tokenizer)
    preds = lad.teacher_decode_from_trajectories(str(tmp_path / "ckpt"), studies, tmp_path / "traj", tmp_path / "t.json")
    ref, _ = decode_studies(model, tiny_tokenizer, studies, DecodeSpec("multistep", 8, max_new_tokens=24), progress=False)
    assert preds == ref
    assert lad.decode_cached(str(tmp_path / "ckpt"), "multistep", studies, tmp_path / "t.json") == ref  # where it looks
