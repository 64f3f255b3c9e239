"""Chat templates and how a rendered conversation splits into trained and untrained text.

A conversation is rendered with the tokenizer's Jinja chat template (or the
recipe's ``tokenizer.chat_template``). To know which characters belong to
assistant turns, each assistant turn is located by rendering the conversation
up to it: the text of ``messages[:i]`` with the generation prompt ends where
the reply starts, and the text of ``messages[:i + 1]`` ends where it stops. The
reply and the template's end-of-turn marks (the EOS the model must learn to
emit) carry loss; everything else does not. This works for any template whose
rendering of a prefix is a prefix of the whole; a template that rewrites
earlier turns is rejected with a clear error rather than guessed at.
"""

from __future__ import annotations

from typing import Any

from panda.plugins.api import BadRecord

# Templates a recipe can name in ``tokenizer.chat_template`` instead of writing Jinja.
BUILTIN_TEMPLATES: dict[str, str] = {
    # Stanford Alpaca's prompt; the default for tokenizers without a template.
    "alpaca": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{% else %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
}
DEFAULT_TEMPLATE = "alpaca"
ROLES = ("system", "user", "assistant")


def resolve_template(tokenizer: Any, override: str | None) -> str:
    """The Jinja text to render chats with: the recipe's, else the tokenizer's, else Alpaca."""
    if override:
        return BUILTIN_TEMPLATES.get(override, override)
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: the default one
        own = own.get("default")
    return own or BUILTIN_TEMPLATES[DEFAULT_TEMPLATE]


class ChatRenderer:
    """Renders conversations with one template into (text, trained) pieces.

    transformers' ``apply_chat_template`` costs ~170 us a call, most of it
    around the Jinja rendering; a conversation of n turns needs 2n + 1 renders.
    When transformers' own compiled template is reachable, and renders a probe
    conversation exactly as ``apply_chat_template`` does, it is called
    directly (same environment, same variables); otherwise, and for any
    conversation it fails on, ``apply_chat_template`` is used.
    """

    PROBE = [{"role": "user", "content": "Hi, 你好"}, {"role": "assistant", "content": "Hello."},
             {"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}]

    def __init__(self, tokenizer: Any, template: str):
        self.tokenizer = tokenizer
        self.template = template
        self._direct = self._direct_renderer()

    def _through_tokenizer(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.template,
                                                  tokenize=False,
                                                  add_generation_prompt=generation_prompt)

    def _direct_renderer(self):
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template

            compiled = _compile_jinja_template(self.template)
            variables = dict(self.tokenizer.special_tokens_map)

            def direct(messages: list[dict[str, str]], generation_prompt: bool) -> str:
                return compiled.render(messages=messages, tools=None, documents=None,
                                       add_generation_prompt=generation_prompt, **variables)

            for end in range(1, len(self.PROBE) + 1):
                for generation_prompt in (False, True):
                    probe = [dict(m) for m in self.PROBE[:end]]
                    if direct(probe, generation_prompt) != self._through_tokenizer(
                            probe, generation_prompt):
                        return None
            return direct
        except Exception:  # a private helper that moved, or a template that rejects the probe
            return None

    def render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        try:
            if self._direct is not None:
                try:
                    return self._direct(messages, generation_prompt)
                except Exception:
                    pass  # let transformers render it, and word the error if there is one
            return self._through_tokenizer(messages, generation_prompt)
        except Exception as exc:  # templates raise their own errors (role order, ...)
            raise BadRecord(f"the chat template rejects this conversation: {exc}") from None

    def segments(self, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
        """(text, trained) pieces of a rendered conversation; assistant replies are trained."""
        check_roles(messages)
        full = self.render(messages, False)
        pieces: list[tuple[str, bool]] = []
        done = 0
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = len(self.render(messages[:index], True))
            end_text = self.render(messages[:index + 1], False)
            if not full.startswith(end_text) or start > len(end_text) or start < done:
                raise BadRecord("the chat template renders a conversation differently from its "
                                "beginning, so assistant turns cannot be located; use another "
                                "template (tokenizer.chat_template)")
            pieces.append((full[done:start], False))
            pieces.append((full[start:len(end_text)], True))
            done = len(end_text)
        pieces.append((full[done:], False))
        return [(text, trained) for text, trained in pieces if text]


def check_roles(messages: list[dict[str, str]]) -> None:
    if not messages:
        raise BadRecord("empty conversation")
    for number, message in enumerate(messages):
        if message["role"] not in ROLES:
            raise BadRecord(f"message {number}: unknown role '{message['role']}' (expected "
                            f"{', '.join(ROLES)})")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord("no assistant message: nothing to train on")
