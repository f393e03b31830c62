"""The built-in LFM2 chat format against LFM2's own Jinja template, rendered as transformers does."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

import lfm2np
from lfm2np.io.tokenizer import format_chat, render_template

TEMPLATE = (Path(__file__).parent / "data" / "lfm2_chat_template.jinja").read_text(encoding="utf-8")

text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
json_value = st.recursive(st.none() | st.booleans() | st.integers(-1000, 1000) | text,
                          lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
                          max_leaves=6)
tool = st.fixed_dictionaries({"name": text, "description": text,
                              "parameters": st.dictionaries(text, json_value, max_size=3)}) | text
message = st.builds(lambda role, content: {"role": role, "content": content},
                    st.sampled_from(["user", "assistant", "tool"]),
                    text | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": text}), max_size=2))
system = st.builds(lambda content: {"role": "system", "content": content}, text)


@settings(max_examples=300, deadline=None)
@given(sys_msg=st.none() | system, messages=st.lists(message, max_size=6),
       tools=st.none() | st.lists(tool, max_size=3), add_generation_prompt=st.booleans())
def test_builtin_format_equals_the_template(sys_msg, messages, tools, add_generation_prompt):
    conversation = ([sys_msg] if sys_msg else []) + messages
    if not conversation:  # the template cannot render an empty conversation; neither do we
        with pytest.raises(lfm2np.Lfm2npError, match="chat template"):
            render_template(TEMPLATE, conversation, tools, add_generation_prompt, bos_token="<|startoftext|>")
        with pytest.raises(lfm2np.Lfm2npError, match="messages is empty"):
            format_chat(conversation, tools, add_generation_prompt)
        return
    ours = format_chat(conversation, tools, add_generation_prompt)
    ref = render_template(TEMPLATE, conversation, tools, add_generation_prompt, bos_token="<|startoftext|>")
    assert ours == ref


def test_the_documented_example():
    tools = [{"name": "get_weather", "parameters": {"city": {"type": "string"}}}]
    conversation = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": '<|tool_call_start|>[get_weather(city="Paris")]<|tool_call_end|>'},
        {"role": "tool", "content": '{"temp": 21}'},
    ]
    expected = (
        "<|startoftext|><|im_start|>system\nYou are helpful.\nList of tools: <|tool_list_start|>"
        '[{"name": "get_weather", "parameters": {"city": {"type": "string"}}}]<|tool_list_end|><|im_end|>\n'
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        '<|im_start|>assistant\n<|tool_call_start|>[get_weather(city="Paris")]<|tool_call_end|><|im_end|>\n'
        '<|im_start|>tool\n<|tool_response_start|>{"temp": 21}<|tool_response_end|><|im_end|>\n'
        "<|im_start|>assistant\n"
    )
    assert format_chat(conversation, tools) == expected
    assert render_template(TEMPLATE, conversation, tools, bos_token="<|startoftext|>") == expected


@pytest.mark.parametrize("messages, message", [
    ([{"role": "robot", "content": "hi"}], "role 'robot'"),
    ([{"content": "hi"}], "message 0 must have 'role' and 'content'"),
    ("hello", "messages must be a list"),
    ([{"role": "system", "content": ["x"]}], "system message's content must be a string"),
])
def test_bad_messages(messages, message):
    with pytest.raises(lfm2np.Lfm2npError, match=message):
        format_chat(messages)


def test_template_errors_are_lfm2np_errors():
    with pytest.raises(lfm2np.Lfm2npError, match="chat template"):
        render_template("{{ raise_exception('no tools here') }}", [])
    with pytest.raises(lfm2np.Lfm2npError, match="chat template"):
        render_template("{% if %}", [])


def test_without_jinja2_a_checkpoints_own_template_is_replaced_by_the_builtin_one_with_a_warning(monkeypatch):
    import lfm2np.io.tokenizer as T
    from lfm2np.embedded import embedded_model_path

    tok = T.Tokenizer.from_dir(embedded_model_path())
    assert tok.chat_template is not None
    monkeypatch.setattr(T, "have_jinja2", lambda: False)
    messages = [{"role": "user", "content": "hi"}]
    with pytest.warns(UserWarning, match="its own chat template, but jinja2, a dependency of lfm2np, is missing"
                                         ".*pip install jinja2"):
        text = tok.apply_chat_template(messages)
    assert text == T.format_chat(messages, None, True, tok.special["bos_token"])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per tokenizer, not at every turn
        tok.apply_chat_template(messages)


def test_without_jinja2_rendering_a_template_says_it_is_a_dependency(monkeypatch):
    import sys

    from lfm2np.io.chat_template import render_template

    monkeypatch.setitem(sys.modules, "jinja2", None)  # a broken installation: the import fails
    with pytest.raises(lfm2np.Lfm2npError, match="needs jinja2, a dependency of lfm2np .*: pip install jinja2$"):
        render_template("{{ messages[0].content }}", [{"role": "user", "content": "hi"}])


def test_a_tokenizer_and_a_state_are_shared_between_threads():
    """docs/reliability.md, threads: one Tokenizer (fresh: its lazily computed values are computed by the threads) and
    one State snapshot, used by four threads at once, give in each thread what they give alone."""
    import sys
    import threading

    import numpy as np

    from lfm2np.embedded import embedded_model_path
    from lfm2np.io.tokenizer import Tokenizer

    model = lfm2np.load("embedded")
    _, snapshot = model.step([1, 6, 42])
    texts = [f'What is the "{w}" statement? naïve café {i}' for i, w in enumerate(["for", "while", "try", "with"])]

    def work(tok, t):
        ids = tok.encode(texts[t])
        chat = tok.encode_chat([{"role": "user", "content": texts[t]}])
        return ids, tok.decode(ids), chat, "".join(tok.stream(chat)), tok.stop_ids(), tok.decode([3000, 7])

    alone = Tokenizer.from_dir(embedded_model_path())
    want = [(work(alone, t), model.step(alone.encode(texts[t]), snapshot)[0]) for t in range(4)]
    shared, errors = Tokenizer.from_dir(embedded_model_path()), []

    def run(t):
        try:
            for _ in range(30):
                assert work(shared, t) == want[t][0]
            logits, state = model.step(shared.encode(texts[t]), snapshot)
            np.testing.assert_array_equal(logits, want[t][1])
            assert state.position == 3 + len(shared.encode(texts[t])) and snapshot.position == 3
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads take turns as often as the interpreter allows: races show
    try:
        threads = [threading.Thread(target=run, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        sys.setswitchinterval(switch)
    assert not errors, errors
