"""`param2moe chat`: an interactive terminal chat that streams tokens, reasoning shown apart (dimmed)."""

from __future__ import annotations

import dataclasses
import sys

from .parsers import ReasoningParser

_DIM, _RESET = "\033[2m", "\033[0m"


def reply_limit(requested: int | None, model_default: int | None, num_prompt: int, max_model_len: int) -> int:
    """The most tokens a reply may have: as asked (--max-tokens), else the model's own default
    (generation_config.json's max_new_tokens), else the rest of the context; never past the context."""
    room = max_model_len - num_prompt
    return min(requested or model_default or room, room)


def run_chat(llm, params, system: str | None = None) -> int:
    """Chat with `llm` until an empty line or end of input; params: each reply's sampling."""
    from .engine import OutputKind
    from .engine.config import default_max_tokens

    engine, tok = llm.llm_engine, llm.get_tokenizer()
    params = dataclasses.replace(params, output_kind=OutputKind.DELTA)
    color = sys.stdout.isatty()
    messages = [{"role": "system", "content": system}] if system else []
    print("param2moe chat. Empty line or Ctrl-D to quit; /reset to clear the conversation.", file=sys.stderr)
    turn = 0
    while True:
        try:
            user = input("\n> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not user.strip():
            return 0
        if user.strip() == "/reset":
            messages = messages[:1] if system else []
            continue
        messages.append({"role": "user", "content": user})
        ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False)
        limit = reply_limit(params.max_tokens, default_max_tokens(engine.generation_config), len(ids),
                            engine.max_model_len)
        if limit < 1:
            print(f"(the conversation fills the context of {engine.max_model_len} tokens; /reset to start again)",
                  file=sys.stderr)
            messages.pop()
            continue
        rid = f"chat-{turn}"
        turn += 1
        engine.add_request(rid, ids, dataclasses.replace(params, max_tokens=limit))
        parser, answer, thinking = ReasoningParser(), [], False
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    reasoning, content = parser.feed(out.outputs[0].text, final=out.finished)
                    if reasoning:
                        if not thinking and color:
                            sys.stdout.write(_DIM)
                        thinking = True
                        sys.stdout.write(reasoning if color else reasoning.replace("\n", "\n  "))
                    if content:
                        if thinking:
                            sys.stdout.write(_RESET + "\n" if color else "\n")
                            thinking = False
                        answer.append(content)
                        sys.stdout.write(content)
                    sys.stdout.flush()
        except KeyboardInterrupt:
            engine.abort(rid)
        if thinking and color:
            sys.stdout.write(_RESET)
        print()
        messages.append({"role": "assistant", "content": "".join(answer)})
