"""The stage-3 ladder (benchmarks/dcd_ladder.py): scoring against the teacher, and an honest table."""
import json
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
    args = r.stage3_args()
    assert args[args.index("--intermediate-copies") + 1] == "2" and args[args.index("--steps") + 1] == str(lad.DEMO_STEPS)
    assert json.dumps([r.__dict__ for r in lad.RUNGS])  # every rung is plain data (written into its JSON)
