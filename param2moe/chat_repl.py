"""`param2moe chat`: an interactive terminal chat that streams tokens, reasoning shown apart (dimmed)."""

from __future__ import annotations

import dataclasses
import sys

from .parsers import ReasoningParser

_DIM, _RESET = "\033[2m", "\033[0m"


def run_chat(llm, params, system: str | None = None) -> int:
    """Chat with `llm` until an empty line or end of input; params: each reply's sampling."""
    from .engine import OutputKind

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
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
        rid = f"chat-{turn}"
        turn += 1
        engine.add_request(rid, tok.encode(prompt, add_special_tokens=False), params)
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
