"""A deployment's chat template, rendered as transformers' `apply_chat_template` does.

The template is `chat_template` in the model directory's `tokenizer_config.json` (a string, or a
list of `{name, template}` where "default" is used). It runs in Jinja2's immutable sandbox with
`trim_blocks`, `lstrip_blocks` and the loop controls (`break`, `continue`), a `tojson` that keeps
non-ASCII text as it is, gets `messages`, `add_generation_prompt=True`, `bos_token`,
`eos_token` and `raise_exception`, and its text is tokenised without added special tokens (the
template writes them). A model without a template is an OpenAIError 400, never a guessed format.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from shardwright.api.openai_schema import OpenAIError


def _raise(message: str):
    raise TemplateError(message)


def _tojson(value, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _token(value) -> str:
    return value.get("content", "") if isinstance(value, dict) else (value or "")


@lru_cache(maxsize=32)
def _load(model_dir: str) -> tuple[str | None, str, str]:
    path = Path(model_dir) / "tokenizer_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    template = config.get("chat_template")
    if isinstance(template, list):
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template, _token(config.get("bos_token")), _token(config.get("eos_token"))


def render_chat(model: str, model_dir: str, messages: list[dict]) -> str:
    """The prompt text of `messages` for deployment `model`; OpenAIError 400 without a template."""
    template, bos, eos = _load(str(model_dir))
    if not template:
        raise OpenAIError(400, f"model {model!r} has no chat template (no chat_template in "
                          f"{model_dir}/tokenizer_config.json): use /v1/completions with a prompt, or deploy "
                          "a model directory whose tokenizer_config.json has one", param="messages",
                          code="no_chat_template")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = _raise
    env.filters["tojson"] = _tojson
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=True,
                                                bos_token=bos, eos_token=eos)
    except TemplateError as err:
        raise OpenAIError(400, f"model {model!r}'s chat template refused the messages: {err}",
                          param="messages", code="chat_template_error") from err
