"""The report tokenizer: special ids, round trip, prefix alignment, loading checkpoints."""
from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from echo_train.data.synth.generate import plan_studies
from echo_train.data.study import format_report
from echo_train.data.tokenizer import load_tokenizer, train_tokenizer
from runtime.errors import EchoRuntimeError
from runtime.prompt import PREFIX_ALIGN, PROMPT_TEXT
from runtime.special_tokens import SPECIAL_TOKENS


@pytest.fixture(scope="module")
def reports():
    plan = plan_studies(200, 20, 40, seed=1)
    return {s: [format_report(r["ground_truth"]["findings"], r["ground_truth"]["impression"]) for r in recs]
            for s, recs in plan.items()}


@pytest.fixture(scope="module")
def tok(reports):
    return train_tokenizer(reports["train"], vocab_size=1024)


def test_special_token_ids(tok):
    assert [tok.tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert (tok.pad_id, tok.eos_id, tok.mask_id, tok.image_id, tok.bos_id) == (0, 1, 2, 3, 4)
    assert 300 < tok.vocab_size <= 1024
    # special tokens never come out of plain text encoding except when written literally
    assert not set(tok.encode(format_report("the lungs are clear.", ""))) & {0, 1, 2, 3, 4}


def test_round_trip(tok, reports):
    texts = reports["test"] + [
        PROMPT_TEXT,
        "FINDINGS: Unseen words, CAPITALS and numbers 3.5 cm; émigré – ünïcode ✓. IMPRESSION: none.",
        "  leading and   repeated   spaces  ",
    ]
    for t in texts:
        ids = tok.encode(t)
        assert " ".join(tok.decode(ids).split()) == " ".join(t.split())
        resp = tok.encode_response(t)
        assert resp[-1] == tok.eos_id and tok.decode(resp + [5, 6]) == tok.decode(ids)


def test_prompt_and_reports_are_compact(tok, reports):
    assert len(tok.encode(" " + PROMPT_TEXT)) <= 14
    lengths = [len(tok.encode(r)) for r in reports["test"]]
    assert max(lengths) < 200


@pytest.mark.parametrize("n_image", [1, 4, 16, 17, 64, 100])
def test_prefix_ids_aligned(tok, n_image):
    ids = tok.prefix_ids(n_image)
    assert len(ids) % PREFIX_ALIGN == 0
    assert ids[:n_image] == [tok.image_id] * n_image
    assert tok.image_id not in ids[-PREFIX_ALIGN:]
    assert tok.bos_id in ids


def test_train_is_deterministic(reports):
    a = train_tokenizer(reports["train"], vocab_size=512)
    b = train_tokenizer(reports["train"], vocab_size=512)
    assert a.tok.to_str() == b.tok.to_str()


def test_load_tokenizer(tmp_path, tok, reports):
    tok.save(tmp_path / "tokenizer.json")
    again = load_tokenizer(tmp_path)  # a checkpoint folder
    assert again.added_special_tokens == []
    assert again.encode(reports["test"][0]) == tok.encode(reports["test"][0])
    assert (again.eos_id, again.mask_id) == (1, 2)

    # a "real checkpoint" tokenizer without our special tokens: they are added after its vocabulary
    foreign = Tokenizer(models.BPE())
    foreign.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    foreign.decoder = decoders.ByteLevel()
    foreign.train_from_iterator(reports["train"], trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    n = foreign.get_vocab_size()
    foreign.save(str(tmp_path / "foreign.json"))
    loaded = load_tokenizer(tmp_path / "foreign.json")
    assert loaded.added_special_tokens == list(SPECIAL_TOKENS)
    assert sorted([loaded.pad_id, loaded.eos_id, loaded.mask_id, loaded.image_id, loaded.bos_id]) == list(range(n, n + 5))
    t = reports["test"][1]
    assert loaded.decode(loaded.encode_response(t)) == " ".join(t.split())
    with pytest.raises(EchoRuntimeError):
        load_tokenizer(tmp_path / "foreign.json", add_missing=False)
    with pytest.raises(EchoRuntimeError):
        load_tokenizer(tmp_path / "nothing_here")
