"""Stage 3: teacher trajectories, the DCD target builder, and a student that learns the teacher's blocks."""
import torch

from conftest import make_tiny_model

from echo_train.data.synth import generate_synth
from echo_train.decoding import fused_onestep_generate, multistep_generate
from echo_train.decoding.run import load_pixels
from echo_train.model.checkpoint import save_checkpoint
from echo_train.stages.common import load_split
from echo_train.stages.dcd_targets import build_dcd_inputs
from echo_train.stages.stage3_dcd import Stage3Config, make_trajectory_collate, run_stage3
from echo_train.stages.trajectories import generate_trajectories, load_trajectories


def _teacher(tok):
    model = make_tiny_model(tok, stage="rad", block_size=4, sharpen=3.0)
    model.cfg.max_response_tokens = 16
    return model


def test_trajectories_are_on_policy_and_resumable(tmp_path, tiny_tokenizer):
    data = tmp_path / "synth"
    generate_synth(data, n_train=6, n_val=2, n_test=2, image_size=32, seed=0, workers=1)
    studies = load_split(data, "train")
    teacher = _teacher(tiny_tokenizer)
    shards = generate_trajectories(teacher, tiny_tokenizer, studies, tmp_path / "traj", 4, 4, shard_size=4, batch_size=3)
    assert len(shards) == 2
    recs = load_trajectories(tmp_path / "traj")
    assert set(recs) == {s.id for s in studies}
    ref = multistep_generate(teacher, tiny_tokenizer, load_pixels(studies, 32), 4, 4, 16)
    for row, s in enumerate(studies):
        r = recs[s.id]
        n = r["tokens"].numel()
        assert torch.equal(r["tokens"], ref.raw[row, :n])  # the teacher's own decoding, block by block
        for k, st in enumerate(r["states"]):
            assert (st[0] == tiny_tokenizer.mask_id).all()  # every block starts all-mask
            assert torch.equal(st[-1], r["tokens"][4 * k : 4 * k + 4])  # and ends at its final tokens
    before = [p.stat().st_mtime_ns for p in shards]
    generate_trajectories(teacher, tiny_tokenizer, studies, tmp_path / "traj", 4, 4, shard_size=4)
    assert [p.stat().st_mtime_ns for p in shards] == before  # finished shards are not redone


def test_dcd_targets_are_the_teachers_final_blocks(tiny_tokenizer):
    tok = tiny_tokenizer
    model = _teacher(tok)
    tokens = torch.tensor([7, 8, 9, 10, 11, 12, tok.eos_id, tok.eos_id])
    m = tok.mask_id
    states = [torch.tensor([[m] * 4, [7, m, m, m], [7, 8, m, 10], [7, 8, 9, 10]]),
              torch.tensor([[m] * 4, [11, 12, tok.eos_id, tok.eos_id]])]
    item = {"pixel_values": torch.zeros(1, 32, 32), "prefix_ids": torch.tensor(tok.prefix_ids(model.n_image_tokens)),
            "response_ids": torch.tensor([7, 8, tok.eos_id]), "id": "a", "teacher": {"tokens": tokens, "states": states}}
    batch = make_trajectory_collate(tok, 4)([item])
    inp = build_dcd_inputs(model, batch, m, torch.Generator().manual_seed(0), p_intermediate=1.0)
    P = len(item["prefix_ids"])
    R = batch["teacher_ids"].shape[1]
    tg = inp.targets[0]
    assert (tg[: P + R] == -100).all()  # prefix and clean copy are never scored
    copy1, copy2 = tg[P + R : P + 2 * R], tg[P + 2 * R :]
    assert torch.equal(copy1[:8], tokens) and torch.equal(copy2[:8], tokens)  # all B positions, joint targets
    assert (copy1[8:] == -100).all()  # blocks after the teacher's EOS block are not scored
    emb_mask = model.embed_tokens(torch.tensor([m]))[0]
    noisy1 = inp.embeds[0, P + R : P + R + 8]
    assert torch.allclose(noisy1, emb_mask.expand(8, -1))  # copy 1: always the all-mask state
    # copy 2, block 0: one of the two intermediate states of the trajectory
    noisy2 = inp.embeds[0, P + 2 * R : P + 2 * R + 4]
    cands = [model.embed_tokens(states[0][i]) for i in (1, 2)]
    assert any(torch.allclose(noisy2, c) for c in cands)
    assert inp.aux_targets is None
    # a causal-context student can also keep stage 1's loss, on the teacher's report in the clean copy
    causal = make_tiny_model(tok, stage="rad", block_size=4, causal_context=True)
    aux = build_dcd_inputs(causal, batch, m, torch.Generator().manual_seed(0), ar_weight=2.0)
    assert aux.aux_weight == 2.0
    assert torch.equal(aux.aux_targets[0, P - 1 : P + 7], tokens)  # position i predicts teacher token i+1
    assert (aux.aux_targets[0, P + 7 :] == -100).all() and (aux.aux_targets[0, : P - 1] == -100).all()


def _varied_dataset(root, n: int) -> None:
    """The varied models' training images as PNGs in the ECHO evaluation format (train split)."""
    import json

    import numpy as np
    from PIL import Image

    from varied_models import varied_images

    (root / "img").mkdir(parents=True)
    recs = []
    for i, x in enumerate(varied_images(n)):
        Image.fromarray(np.round((x[0] + 1) * 127.5).astype(np.uint8), mode="L").save(root / f"img/{i}.png")
        recs.append({"id": f"s{i}", "images": [f"img/{i}.png"], "split": "train",
                     "ground_truth": {"findings": "Normal heart.", "impression": "No acute process."}})
    (root / "train.json").write_text(json.dumps(recs))


def test_dcd_student_learns_the_teacher_and_a_shuffled_control_does_not(tmp_path, tiny_tokenizer, varied_model):
    """A student trained on the teacher's blocks writes them in one step; the same training on
    the teacher's blocks of OTHER images (shuffled targets) does not. The teacher writes a
    different report per image, so a student that collapses to one token cannot pass."""
    from varied_models import N_IMAGES, as_stage, assert_informative

    tok, B, R = tiny_tokenizer, 4, 32
    data = tmp_path / "data"
    _varied_dataset(data, N_IMAGES)
    teacher = as_stage(varied_model(shifted=True, causal_context=False), "rad", block_size=B)
    teacher.cfg.max_response_tokens = R
    save_checkpoint(tmp_path / "base", teacher, tok)
    studies = load_split(data, "train")
    px = load_pixels(studies, 32)
    target = multistep_generate(teacher, tok, px, B, B, R).raw
    assert_informative(target, tok.eos_id)  # 6 different reports: a one-token student agrees on few positions

    def agreement(model) -> float:
        """Share of the teacher's report positions (through its EOS) the one-step student matches;
        what follows EOS is never trained, so it is not compared."""
        got = fused_onestep_generate(model, tok, px, B, R).raw
        hits = total = 0
        for g, t in zip(got.tolist(), target.tolist()):
            n = t.index(tok.eos_id) + 1 if tok.eos_id in t else len(t)
            g = g[:n] + [-1] * (n - len(g[:n]))
            hits += sum(a == b for a, b in zip(g, t[:n]))
            total += n
        return hits / total

    def train_student(name: str, trajectories) -> float:
        cfg = Stage3Config(data=str(data), init=str(tmp_path / "base"), out=str(tmp_path / name),
                           trajectories=str(trajectories))
        cfg.train.steps, cfg.train.batch_size, cfg.train.lr, cfg.train.warmup_steps, cfg.train.threads = 40, 6, 3e-3, 2, 1
        run_stage3(cfg)
        from echo_train.model.checkpoint import load_checkpoint

        student, _ = load_checkpoint(tmp_path / name)
        assert student.cfg.stage == "dcd"
        return agreement(student)

    learned = train_student("echo", tmp_path / "traj")  # writes the teacher's trajectories, then trains on them
    # control: the same run on the same teacher's trajectories, each study given another study's
    # (stage 3 resumes from finished shards, so it trains on these instead of regenerating them)
    shard = tmp_path / "traj" / f"B{B}_S{B}" / "shard_00000.pt"
    saved = torch.load(shard, weights_only=False)
    ids = sorted(saved["records"])
    saved["records"] = {i: saved["records"][ids[(k + 1) % len(ids)]] for k, i in enumerate(ids)}  # a derangement
    (tmp_path / "traj_shuffled" / shard.parent.name).mkdir(parents=True)
    torch.save(saved, tmp_path / "traj_shuffled" / shard.parent.name / shard.name)
    control = train_student("control", tmp_path / "traj_shuffled")
    print(f"agreement with the teacher: student {learned:.3f}, shuffled control {control:.3f}")
    assert learned >= 0.9 and control <= learned - 0.3, (learned, control)


def test_teacher_completes_blocks_in_a_given_context(tiny_tokenizer, varied_model, varied_pixels):
    """multistep_generate(context=...): block k is the teacher's completion after the CONTEXT's blocks
    < k (on-policy DCD's targets). Its own report as context gives its own report back; another
    study's report changes the later blocks; block k never depends on context blocks >= k."""
    from varied_models import as_stage, assert_informative

    tok, B, R = tiny_tokenizer, 4, 32
    teacher = as_stage(varied_model(shifted=True, causal_context=False), "rad", block_size=B)
    own = multistep_generate(teacher, tok, varied_pixels, B, B, R).raw
    assert_informative(own, tok.eos_id)
    same = multistep_generate(teacher, tok, varied_pixels, B, B, R, context=own)
    assert torch.equal(same.raw, own[:, : same.raw.shape[1]])
    other = own.roll(1, 0)  # each image gets another image's report as its context
    got = multistep_generate(teacher, tok, varied_pixels, B, B, R, context=other).raw
    assert torch.equal(got[:, :B], own[:, :B])  # block 0 has no context blocks
    assert not torch.equal(got[:, B:], own[:, B : got.shape[1]])  # later blocks follow the context
    cut = other.clone()
    cut[:, 2 * B :] = tok.eos_id  # context differs from block 2 on: blocks 0..2 unchanged
    got_cut = multistep_generate(teacher, tok, varied_pixels, B, B, R, context=cut).raw
    assert torch.equal(got_cut[:, : 3 * B], got[:, : 3 * B])
    assert got_cut.shape[1] == 3 * B  # every context report ends in block 2, so decoding stops there


def test_onpolicy_records_pair_the_students_report_with_the_teachers_blocks(tmp_path, tiny_tokenizer, varied_model):
    """generate_onpolicy_targets: the record's context is the student's own one-step report (to its EOS
    block), its tokens the teacher's blocks in that context; the collate and the target builder put the
    context in the clean copy and the teacher's blocks in the targets."""
    from varied_models import N_IMAGES, as_stage

    from echo_train.stages.trajectories import generate_onpolicy_targets

    tok, B, R = tiny_tokenizer, 4, 32
    data = tmp_path / "data"
    _varied_dataset(data, N_IMAGES)
    studies = load_split(data, "train")
    teacher = as_stage(varied_model(shifted=True, causal_context=False), "rad", block_size=B)
    teacher.cfg.max_response_tokens = R
    student = as_stage(varied_model(shifted=True, causal_context=False), "dcd", block_size=B)
    student.cfg.max_response_tokens = R
    generate_onpolicy_targets(student, teacher, tok, studies, tmp_path / "op", B, B, shard_size=4, batch_size=4)
    recs = load_trajectories(tmp_path / "op")
    px = load_pixels(studies, 32)
    ctx = fused_onestep_generate(student, tok, px, B, R).raw
    want = multistep_generate(teacher, tok, px, B, B, R, context=ctx).raw
    assert not torch.equal(ctx[:, : want.shape[1]], want)  # naive one-step student != teacher: a real relabel
    for row, s in enumerate(studies):
        r = recs[s.id]
        n = r["tokens"].numel()
        eos_block = next((k for k in range(R // B) if (ctx[row, k * B : (k + 1) * B] == tok.eos_id).any()), R // B - 1)
        assert n == (eos_block + 1) * B  # ends with the STUDENT's report
        assert torch.equal(r["context"], ctx[row, :n]) and torch.equal(r["tokens"], want[row, :n])
        assert all(torch.equal(st[-1], r["tokens"][B * k : B * k + B]) for k, st in enumerate(r["states"]))
    # anchored (mode-seeking): every block starts from the student's 2 surest ids of it, kept in the target
    generate_onpolicy_targets(student, teacher, tok, studies, tmp_path / "opA", B, B, shard_size=4, batch_size=4, anchor=2)
    for s in studies:
        r = load_trajectories(tmp_path / "opA")[s.id]
        for k, st in enumerate(r["states"]):
            kept = st[0] != tok.mask_id
            assert int(kept.sum()) == 2 and torch.equal(st[0][kept], r["context"][B * k : B * k + B][kept])
            assert torch.equal(st[-1][kept], st[0][kept])
    items = [{"pixel_values": px[0], "prefix_ids": torch.tensor(tok.prefix_ids(teacher.n_image_tokens)),
              "response_ids": torch.tensor([tok.eos_id]), "id": studies[0].id, "teacher": recs[studies[0].id]}]
    batch = make_trajectory_collate(tok, B)(items)
    inp = build_dcd_inputs(student, batch, tok.mask_id, torch.Generator().manual_seed(0))
    P, n = len(items[0]["prefix_ids"]), recs[studies[0].id]["tokens"].numel()
    assert torch.allclose(inp.embeds[0, P : P + n], student.embed_tokens(recs[studies[0].id]["context"]))
    assert torch.equal(inp.targets[0, P + batch["teacher_ids"].shape[1] :][:n], recs[studies[0].id]["tokens"])


def test_onpolicy_stage3_needs_a_student_and_trains_on_both_record_sets(tmp_path, tiny_tokenizer, varied_model, capsys):
    from varied_models import N_IMAGES, as_stage

    from echo_train.stages.errors import StageError

    tok, B = tiny_tokenizer, 4
    data = tmp_path / "data"
    _varied_dataset(data, N_IMAGES)
    teacher = as_stage(varied_model(shifted=True, causal_context=False), "rad", block_size=B)
    teacher.cfg.max_response_tokens = 32
    save_checkpoint(tmp_path / "base", teacher, tok)

    def cfg(name: str, **kw) -> Stage3Config:
        c = Stage3Config(data=str(data), init=str(tmp_path / "base"), out=str(tmp_path / name),
                         trajectories=str(tmp_path / "traj"), **kw)
        c.train.steps, c.train.batch_size, c.train.threads = 2, 4, 1
        return c

    try:
        run_stage3(cfg("x", on_policy=True))
        raise AssertionError("on-policy without a student ran")
    except StageError as e:
        assert "--student-init" in str(e)
    try:  # the teacher is not a stage-3 student
        run_stage3(cfg("y", on_policy=True, student_init=str(tmp_path / "base")))
        raise AssertionError("a stage-2 checkpoint was taken as the student")
    except StageError as e:
        assert "'rad' checkpoint" in str(e)
    run_stage3(cfg("first"))
    assert f"{N_IMAGES} training records" in capsys.readouterr().out
    run_stage3(cfg("second", on_policy=True, student_init=str(tmp_path / "first")))
    assert f"{2 * N_IMAGES} training records" in capsys.readouterr().out  # the teacher's and the student's contexts
    assert len(load_trajectories(tmp_path / "second_onpolicy" / f"B{B}_S{B}")) == N_IMAGES
    assert (tmp_path / "second" / "model.safetensors").is_file()


def test_anchor_states_keep_each_blocks_surest_generated_tokens():
    from runtime.schedule import BlockLayout

    from echo_train.stages.trajectories import anchor_states

    m = 99
    raw = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    conf = torch.tensor([[0.5, 0.9, 0.1, 0.8, 0.3, 0.2, 0.95, 0.4]])
    got = anchor_states(raw, conf, BlockLayout(8, 4), 2, m)  # no prompt tail: blocks [0, 4), [4, 8)
    assert got.tolist() == [[m, 2, m, 4, m, m, 7, 8]]
    # a prompt tail of 2: grid block 0 holds 2 prompt ids and raw[0:2], block 1 raw[2:6], block 2 raw[6:8]
    got = anchor_states(raw, conf, BlockLayout(6, 4), 1, m)
    assert got.tolist() == [[m, 2, m, 4, m, m, 7, m]]


def test_start_states_are_kept_and_the_teacher_completes_around_them(tiny_tokenizer, varied_model, varied_pixels):
    from varied_models import as_stage

    tok, B, R = tiny_tokenizer, 4, 32
    teacher = as_stage(varied_model(shifted=True, causal_context=False), "rad", block_size=B)
    own = multistep_generate(teacher, tok, varied_pixels, B, B, R).raw
    none = torch.full_like(own, tok.mask_id)
    assert torch.equal(multistep_generate(teacher, tok, varied_pixels, B, B, R, context=own, start=none).raw,
                       multistep_generate(teacher, tok, varied_pixels, B, B, R, context=own).raw)
    start = none.clone()
    start[:, 1] = own.roll(1, 0)[:, 1]  # position 1 of block 0 from another image's report
    start[:, B + 2] = own[:, B + 2]
    got = multistep_generate(teacher, tok, varied_pixels, B, B, R, context=own, start=start).raw
    assert torch.equal(got[:, 1], start[:, 1]) and torch.equal(got[:, B + 2], own[:, B + 2])
    changed = own[:, 1] != start[:, 1]
    assert changed.any() and not torch.equal(got[changed, :B], own[changed, :B])


def test_onestep_decoder_reports_the_confidence_of_each_id(tiny_tokenizer, varied_model, varied_pixels):
    from varied_models import as_stage

    tok, B, R = tiny_tokenizer, 4, 32
    student = as_stage(varied_model(shifted=True, causal_context=False), "dcd", block_size=B)
    assert fused_onestep_generate(student, tok, varied_pixels, B, R).confidence is None  # only when asked
    res = fused_onestep_generate(student, tok, varied_pixels, B, R, keep_confidence=True)
    c = res.confidence
    assert c.shape == res.raw.shape and bool((c > 0).all()) and bool((c <= 1).all())
    assert bool((c < 0.999).any()) and bool((c > 0.5).any())  # real probabilities, not a constant
    # block 0 in one step from the prompt: the naive one-step decoder's first pass is the same forward
    logits_free = multistep_generate(student, tok, varied_pixels, B, 1, B)
    assert torch.equal(logits_free.raw[:, :B], res.raw[:, :B])
