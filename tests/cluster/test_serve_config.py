"""The serve config: configs/serve.yaml mirrors ServeConfig and is a valid Ray Serve config whose builder
builds the app (what `serve run configs/serve.yaml` does); validation; the request schema without a server."""

from __future__ import annotations

import pytest

from cluster.openai_protocol import ApiError, parse_request
from cluster.serve_config import ServeConfig, SparsityBounds, read_serve_yaml
from dynllava.config import SparsityConfig
from tests.conftest import REPO_ROOT

SERVE_YAML = REPO_ROOT / "configs" / "serve.yaml"


def test_yaml_mirrors_the_defaults_and_is_a_serve_config():
    from ray.serve.schema import ServeDeploySchema

    data = read_serve_yaml(SERVE_YAML)
    ServeDeploySchema.model_validate(data)  # what `serve run` / `serve deploy` accept
    app = data["applications"][0]
    assert ServeConfig.from_dict(app["args"]) == ServeConfig()
    assert ServeConfig.from_dict(ServeConfig().to_dict()) == ServeConfig()
    module, _, name = app["import_path"].partition(":")
    builder = getattr(__import__(module, fromlist=[name]), name)
    built = builder(app["args"])
    assert type(built).__name__ == "Application"


def test_bad_values_are_rejected():
    with pytest.raises(ValueError, match="unknown args keys"):
        ServeConfig.from_dict({"max_batchsize": 3})
    with pytest.raises(ValueError, match="batching"):
        ServeConfig(batching="dynamic")
    with pytest.raises(ValueError, match="kv_cache"):
        ServeConfig(sparsity=SparsityConfig(mode="no_cache"))
    with pytest.raises(ValueError, match="NO_SUCH_VAR"):
        ServeConfig(api_key_env="NO_SUCH_VAR")
    with pytest.raises(ValueError, match="default_max_tokens"):
        ServeConfig.from_dict({"limits": {"max_tokens": 10, "default_max_tokens": 20}})


def test_sparsity_bounds():
    bounds = SparsityBounds(min_vision_keep=0.1, min_text_keep=0.5, text_scorers=("learned",))
    bounds.check(SparsityConfig(vision_keep=0.1, text_keep=0.5))
    for bad, match in ((SparsityConfig(vision_keep=0.05), "floor"), (SparsityConfig(text_keep=0.4), "floor"),
                       (SparsityConfig(text_keep=0.5, text_scorer="recent"), "not allowed")):
        with pytest.raises(ValueError, match=match):
            bounds.check(bad)


@pytest.mark.parametrize("body, where", [
    (b"not json", "malformed JSON"), (b"[1, 2]", "body"), (b'{"messages": [{"role": "robot", "content": "x"}]}',
                                                           "messages.0.role"),
    (b'{"messages": [{"role": "user", "content": "x"}], "temperature": 3}', "temperature"),
    (b'{"messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}', "stop"),
])
def test_request_schema_errors_name_the_field(body, where):
    with pytest.raises(ApiError) as info:
        parse_request(body)
    assert info.value.status == 400 and where in info.value.message


def test_chat_messages_in_a_template_that_takes_parts_and_in_one_that_takes_strings():
    """The OpenAI messages become the model's prompt: llava-hf's LLaVA-NeXT/OneVision templates read a
    message's parts and place the images themselves; LLaVA-1.5's string template gets `<image>` lines."""
    import base64
    import io

    from PIL import Image

    from cluster.chat_inputs import to_prompt
    from cluster.openai_protocol import Message
    from cluster.serve_config import Limits
    from dynllava.config import ModelSpec, TextShape
    from dynllava.loading import processor_for_spec

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    messages = [Message(role="system", content="Be brief."),
                Message(role="user", content=[{"type": "image_url", "image_url": {"url": url}},
                                              {"type": "text", "text": "What is it?"}]),
                Message(role="assistant", content="A square."), Message(role="user", content="Sure?")]
    processor = processor_for_spec(ModelSpec(name="t", image_token_id=300, text=TextShape(vocab_size=320)))
    prompt, images = to_prompt(processor, messages, Limits(), allow_remote=False)
    assert prompt == "Be brief.\nUSER: <image>\nWhat is it? ASSISTANT: A square.</s>USER: Sure? ASSISTANT:"
    assert len(images) == 1
    processor.chat_template = (  # llava-v1.6-mistral-7b-hf's shape: content is a list of parts
        "{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' }}"
        "{% for c in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
        "{% for c in message['content'] | selectattr('type', 'equalto', 'text') %}{{ c['text'] }}{% endfor %}"
        "{{ ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'][0]['text'] }}"
        "{% else %}{{ message['content'][0]['text'] + '\\n' }}{% endif %}{% endfor %}")
    prompt, _ = to_prompt(processor, messages, Limits(), allow_remote=False)
    assert prompt == "Be brief.\n[INST] <image>\nWhat is it? [/INST] A square.[INST] Sure? [/INST]"
