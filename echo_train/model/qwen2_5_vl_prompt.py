"""The prompt an imported Qwen2.5-VL-family checkpoint was trained on, from its own chat template.

`echo-train import-hf` renders the folder's chat template (chat_template.jinja, chat_template.json
or tokenizer_config.json "chat_template", as `transformers` looks for them) for one conversation:
an optional system turn (--system; without it the template's own default, Qwen's "You are a
helpful assistant."), a user turn holding the image and then the instruction (--instruction,
default runtime.prompt.PROMPT_TEXT), and the assistant header (add_generation_prompt). The text
is cut at the image placeholder and each side tokenised with the folder's own tokenizer; the ids
become a runtime.prompt.PromptTemplate, with the pads that align the prefix to blocks at the start.

Rendering follows `transformers`' apply_chat_template: a sandboxed jinja2 environment with
trim_blocks, lstrip_blocks, loop controls, raise_exception and a JSON tojson.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from runtime.prompt import PAD_START, PROMPT_TEXT, PromptTemplate, PromptTemplateError

from .errors import PretrainedError
from .hf_folder import read_json


def find_chat_template(folder: Path) -> Optional[tuple[str, str]]:
    """(template text, the file it came from), or None when the folder has none."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(), jinja.name
    for name in ("chat_template.json", "tokenizer_config.json"):
        p = folder / name
        if not p.is_file():
            continue
        t = read_json(p, "").get("chat_template")
        if isinstance(t, list):  # named templates: the default one
            t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), None)
        if isinstance(t, str) and t.strip():
            return t, name
    return None


def render_chat_template(template: str, messages: list[dict[str, Any]], **context: Any) -> str:
    try:
        import jinja2
        import jinja2.ext  # a submodule `import jinja2` does not load: the CLI crashed where nothing else had
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise PretrainedError("rendering the folder's chat template needs jinja2 (pip install jinja2)") from None

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=True, **context)
    except jinja2.exceptions.TemplateError as e:
        raise PretrainedError(f"the folder's chat template does not render ({e})") from None


def chat_messages(instruction: str, system: Optional[str]) -> list[dict[str, Any]]:
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}
    return ([{"role": "system", "content": system}] if system is not None else []) + [user]


def chat_prompt_template(folder: Path, tokenizer, image_token: str, instruction: Optional[str] = None,
                         system: Optional[str] = None, pad: str = PAD_START) -> Optional[PromptTemplate]:
    """The folder's chat prompt for one image + the instruction as ids around the image, or None
    when the folder has no chat template. `tokenizer`: the folder's own (`tokenizers`) tokenizer,
    before any token takes one of ECHO's role names."""
    found = find_chat_template(folder)
    if found is None:
        return None
    template, source = found
    instruction = PROMPT_TEXT if instruction is None else instruction
    tcfg = read_json(folder / "tokenizer_config.json", "") if (folder / "tokenizer_config.json").is_file() else {}
    specials = {k: (v.get("content") if isinstance(v, dict) else v) for k, v in tcfg.items()
                if k.endswith("_token") and isinstance(v, (str, dict))}
    text = render_chat_template(template, chat_messages(instruction, system), **specials)
    if text.count(image_token) != 1:
        raise PretrainedError(f"{folder / source}: the chat template rendered {text.count(image_token)} image "
                              f"placeholders {image_token!r} for one image, expected 1")
    before_text, after_text = text.split(image_token)
    before = tokenizer.encode(before_text, add_special_tokens=False).ids
    after = tokenizer.encode(after_text, add_special_tokens=False).ids
    for part, ids in ((before_text, before), (after_text, after)):
        back = tokenizer.decode(ids, skip_special_tokens=False)
        if back != part:
            raise PretrainedError(f"{folder / 'tokenizer.json'}: the tokenizer does not encode the chat prompt "
                                  f"faithfully ({part!r} -> {back!r})")
    info = {"source": source, "text": text, "instruction": instruction, "system": system}
    try:
        return PromptTemplate(before=tuple(before), after=tuple(after), pad=pad, info=info)
    except PromptTemplateError as e:
        raise PretrainedError(f"{folder}: {e}") from None
