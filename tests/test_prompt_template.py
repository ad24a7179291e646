"""runtime.prompt.PromptTemplate: the layout rules every decoder, graph and the runtime rely on."""
from __future__ import annotations

import pytest

from runtime.errors import ManifestError
from runtime.manifest import Manifest
from runtime.prompt import (PAD_AFTER_IMAGE, PAD_START, PREFIX_ALIGN, PromptTemplate, PromptTemplateError,
                            build_prefix_ids, template_of)

IMG, PAD = 7, 0


@pytest.mark.parametrize("n_before,n_after,n_image", [(0, 16, 16), (5, 20, 16), (36, 54, 256), (3, 17, 64)])
def test_start_padded_template_layout(n_before, n_after, n_image):
    t = PromptTemplate(before=range(100, 100 + n_before), after=range(200, 200 + n_after), pad=PAD_START)
    ids = t.prefix_ids(n_image, IMG, PAD)
    n_pad = t.n_pad(n_image)
    assert len(ids) % PREFIX_ALIGN == 0 and 0 <= n_pad < PREFIX_ALIGN
    assert ids[:n_pad] == [PAD] * n_pad  # pads first, then the template exactly
    s = t.image_start(n_image)
    assert s == n_pad + n_before and ids[s: s + n_image] == [IMG] * n_image
    assert ids[s + n_image:] == list(t.after) and IMG not in ids[-PREFIX_ALIGN:]
    assert PromptTemplate.from_dict(t.to_dict()) == t


def test_echo_prefix_is_the_after_image_template():
    ins = [11, 12, 13]
    t = PromptTemplate(before=(), after=(4, *ins), pad=PAD_AFTER_IMAGE)
    for n in (0, 16, 64, 256):
        ids = build_prefix_ids(ins, n, IMG, PAD, 4)
        assert ids == t.prefix_ids(n, IMG, PAD) and t.image_start(n) == 0
        assert ids[:n] == [IMG] * n and ids[-4:] == [4, *ins] and len(ids) % PREFIX_ALIGN == 0
        assert IMG not in ids[-PREFIX_ALIGN:]


def test_refusals():
    with pytest.raises(PromptTemplateError, match="tokens after the image"):
        PromptTemplate(before=(1,), after=range(PREFIX_ALIGN - 1), pad=PAD_START)
    with pytest.raises(PromptTemplateError):
        PromptTemplate(before=(), after=range(20), pad="middle")
    with pytest.raises(PromptTemplateError, match="malformed"):
        template_of({"prompt": {"before": [1]}})
    assert template_of({}) is None and template_of(None) is None
    m = Manifest(model_config={"prompt": {"after": [1]}}, block_size=4, capacity=64, batch_sizes=[1], vocab_size=9,
                 prefix_len=32, image_size=32, eos_id=1, mask_id=2, pad_id=0, precisions=["fp32"], graphs={})
    with pytest.raises(ManifestError, match="prompt template"):
        m.prompt_template
