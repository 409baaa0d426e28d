"""Chat templates: the model's own, a named one shipped here, or a Jinja file from configuration.

Templates are Hugging Face chat templates (Jinja over `messages`), rendered by transformers'
`apply_chat_template`, so any model's own template works unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

NAMED_TEMPLATES = Path(__file__).parent / "chat_templates"


def named_templates() -> list[str]:
    return sorted(path.stem for path in NAMED_TEMPLATES.glob("*.jinja"))


def load_chat_template(setting: str, model_template: str | None) -> str:
    """The template text for a `chat_template` setting; raises ValueError for a bad setting."""
    if setting == "model":
        if not model_template:
            raise ValueError(
                "the model has no chat template: set PIPELINE_CHAT_TEMPLATE to one of "
                f"{named_templates()} or to a Jinja file"
            )
        return model_template
    named = NAMED_TEMPLATES / f"{setting}.jinja"
    if named.is_file():
        return named.read_text()
    if Path(setting).is_file():
        return Path(setting).read_text()
    raise ValueError(
        f"PIPELINE_CHAT_TEMPLATE={setting!r} is neither 'model', a named template "
        f"{named_templates()}, nor an existing file"
    )


class ChatFormatter:
    """Renders a conversation into the prompt text the model was trained on."""

    def __init__(self, tokenizer: Any, template: str) -> None:
        self._tokenizer = tokenizer
        self.template = template

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        template_kwargs: dict[str, Any] | None = None,
    ) -> str:
        return self._tokenizer.apply_chat_template(
            messages,
            chat_template=self.template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            **(template_kwargs or {}),
        )
