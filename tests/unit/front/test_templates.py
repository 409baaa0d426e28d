"""Chat templates: the model's own, the named ones, a file, and bad settings."""

import pytest

from services.front.text.templates import ChatFormatter, load_chat_template, named_templates

SEED_SYSTEM = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe. "
    "Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. "
    "Please ensure that your responses are socially unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering something "
    "not correct. If you don't know the answer to a question, please don't share false information."
)
SEED_TEMPLATE = "<s>[INST] <<SYS>>\n" + SEED_SYSTEM + "\n<</SYS>>\n\n{user_prompt} [/INST] "


def render(tokenizer, setting, messages, **options):
    return ChatFormatter(tokenizer, load_chat_template(setting, tokenizer.chat_template)).render(messages, **options)


def test_model_template_is_chatml(tokenizer):
    text = render(tokenizer, "model", [{"role": "user", "content": "Hi"}])
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_llama2_template_renders_the_seed_prompt_exactly(tokenizer):
    prompt = "Explain superconductors like I'm five years old"
    assert render(tokenizer, "llama2", [{"role": "user", "content": prompt}]) == SEED_TEMPLATE.format(user_prompt=prompt)


def test_llama2_template_takes_a_system_message_and_turns(tokenizer):
    text = render(
        tokenizer,
        "llama2",
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "A?"},
            {"role": "assistant", "content": "B."},
            {"role": "user", "content": "C?"},
        ],
    )
    assert text == "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nA? [/INST] B. </s><s>[INST] C? [/INST] "


def test_plain_template_joins_contents(tokenizer):
    assert render(tokenizer, "plain", [{"role": "user", "content": "one"}, {"role": "user", "content": "two"}]) == "one\n\ntwo"


def test_template_from_a_file(tokenizer, tmp_path):
    path = tmp_path / "shout.jinja"
    path.write_text("{% for m in messages %}{{ m['content'] | upper }}{% endfor %}")
    assert render(tokenizer, str(path), [{"role": "user", "content": "hey"}]) == "HEY"


def test_unknown_template_setting_is_refused_with_the_choices(tokenizer):
    with pytest.raises(ValueError, match="llama2"):
        load_chat_template("no-such-template", tokenizer.chat_template)
    assert {"llama2", "plain"} <= set(named_templates())


def test_model_without_template_is_refused():
    with pytest.raises(ValueError, match="no chat template"):
        load_chat_template("model", None)
