"""Chat templates rendered by api/chat_template.py equal transformers' `apply_chat_template` of
the same template, messages and special tokens (exact text), for three templates: a Llama-3-style
one, ChatML, a Llama-2-style one with a system prompt and `raise_exception`, and one with loop
controls and `tojson`.
"""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from shardwright.api.chat_template import render_chat
from shardwright.api.openai_schema import OpenAIError

LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}"
          "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + "
          "message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
          "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA2 = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
          "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
          "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
          "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
          "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
          "{% if loop.index0 == 0 and system_message != false %}"
          "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
          "{% else %}{% set content = message['content'] %}{% endif %}"
          "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
          "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
# loop controls and tojson, as tool-calling templates use them
TOOLISH = ("{% for message in messages %}{% if message['role'] == 'system' %}{% continue %}{% endif %}"
           "<{{ message['role'] }}>{{ message | tojson }}\n{% if loop.index > 3 %}{% break %}{% endif %}"
           "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
CONVERSATION = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "  Hi there "},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Ünïcode & <tags>?"},
                {"role": "assistant", "content": "Bye."}]


def _transformers_render(template: str, messages: list[dict]) -> str:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")),
                                  bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.chat_template = template
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _model_dir(tmp_path, template: str):
    config = {"chat_template": template, "bos_token": "<s>", "eos_token": {"content": "</s>"}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return str(tmp_path)


@pytest.mark.parametrize("name, template", [("llama3", LLAMA3), ("chatml", CHATML), ("llama2", LLAMA2),
                                            ("toolish", TOOLISH)])
def test_rendering_equals_transformers(tmp_path, name, template):
    ours = render_chat(name, _model_dir(tmp_path, template), CONVERSATION)
    assert ours == _transformers_render(template, CONVERSATION)
    assert "Ünïcode & <tags>?" in ours and (name == "toolish") != ("Bye." in ours)  # unescaped; break


def test_raise_exception_is_a_400_naming_the_templates_message(tmp_path):
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(Exception, match="roles must alternate"):
        _transformers_render(LLAMA2, bad)
    with pytest.raises(OpenAIError) as err:
        render_chat("llama2", _model_dir(tmp_path, LLAMA2), bad)
    assert err.value.status == 400 and "roles must alternate" in err.value.message


def test_the_sandbox_refuses_attribute_escapes(tmp_path):
    escape = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(OpenAIError) as err:
        render_chat("evil", _model_dir(tmp_path, escape), CONVERSATION)
    assert err.value.status == 400 and err.value.code == "chat_template_error"
