"""A chat request's input, made ready for the chat template: messages checked and normalised (content
parts joined, `developer` read as `system`), tools and tool_choice resolved, and the template rendered.
Nothing here touches the event loop: `render_chat` may run on a worker thread."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from .protocol import ChatMessage, NamedToolChoice, RequestError, Tool

_RESERVED_TEMPLATE_KWARGS = {"messages", "tools", "add_generation_prompt"}


@dataclass
class ChatInput:
    messages: list[dict]
    tools: list[dict] | None = None  # what the template shows the model
    parse_tools: bool = False  # read tool calls out of the reply
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    template_kwargs: dict = field(default_factory=dict)

    @property
    def size(self) -> int:
        """Characters of text to render (how long rendering takes)."""
        return sum(len(m["content"]) for m in self.messages) + (len(json.dumps(self.tools)) if self.tools else 0)


def _message_text(content, i: int) -> str | None:
    if content is None or isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.type != "text" or part.text is None:
            raise RequestError(f"messages[{i}].content: only text parts are supported (got {part.type!r})",
                               "messages")
        parts.append(part.text)
    return "\n".join(parts)


def normalize_messages(messages: list[ChatMessage]) -> list[dict]:
    """The messages as the chat template takes them (plain dicts, extra fields kept)."""
    out = []
    for i, msg in enumerate(messages):
        m = msg.model_dump(exclude_none=True)
        if m["role"] == "developer":
            m["role"] = "system"
        m["content"] = _message_text(msg.content, i) or ""
        if m.get("tool_calls") is not None and m["role"] != "assistant":
            raise RequestError(f"messages[{i}].tool_calls: on assistant messages only", "messages")
        out.append(m)
    return out


def resolve_tools(tools: list[Tool] | None, tool_choice) -> tuple[list[dict] | None, bool]:
    """(tools for the template, whether to parse tool calls) for the request's tools and tool_choice."""
    if not tools:
        if isinstance(tool_choice, NamedToolChoice) or tool_choice == "required":
            raise RequestError("tool_choice: needs tools", "tool_choice")
        return None, False
    if tool_choice == "none":
        return None, False
    listed = [t.model_dump(exclude_none=True) for t in tools]
    if isinstance(tool_choice, NamedToolChoice):
        name = tool_choice.function.name
        chosen = [t for t in listed if t["function"]["name"] == name]
        if not chosen:
            raise RequestError(f"tool_choice: no tool named {name!r} in tools", "tool_choice")
        return chosen, True
    return listed, True


def chat_input(messages: list[ChatMessage], tools: list[Tool] | None, tool_choice, *, add_generation_prompt: bool,
               continue_final_message: bool, template_kwargs: dict | None) -> ChatInput:
    """The checked input of a chat (or of /tokenize with messages)."""
    normal = normalize_messages(messages)
    if continue_final_message:
        if not normal or normal[-1]["role"] != "assistant":
            raise RequestError("continue_final_message: the last message must be the assistant's",
                               "continue_final_message")
        add_generation_prompt = False
    shown, parse = resolve_tools(tools, tool_choice)
    kwargs = {k: v for k, v in (template_kwargs or {}).items() if k not in _RESERVED_TEMPLATE_KWARGS}
    return ChatInput(normal, shown, parse, add_generation_prompt, continue_final_message, kwargs)


def render_chat(tokenizer, chat: ChatInput) -> str:
    """The prompt text: the chat template over the messages (cut after the final message when continuing it)."""
    try:
        text = tokenizer.apply_chat_template(chat.messages, tools=chat.tools,
                                             add_generation_prompt=chat.add_generation_prompt, **chat.template_kwargs)
    except Exception as e:  # the template raised (raise_exception, a missing key, the sandbox)
        raise RequestError(f"the chat template failed on these messages: {type(e).__name__}: {e}",
                           "messages") from None
    if chat.continue_final_message:
        final = chat.messages[-1]["content"]
        cut = text.rfind(final) if final else -1
        if cut < 0:
            raise RequestError("continue_final_message: the final message is not in the rendered prompt",
                               "continue_final_message")
        text = text[: cut + len(final)]
    return text
