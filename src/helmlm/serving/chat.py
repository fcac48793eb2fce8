"""Conversations: the prompt of a list of turns (:func:`chat_prompt`, shared by ``helmlm chat`` and the API's
``/v1/chat/completions``) and the terminal chat (:class:`Chat`, ``helmlm chat``)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping

from helmlm.generation import SamplingSettings, check_request, complete, fresh_seed

PLAIN_STOPS = ["\nUser:", "\nSystem:"]  # where a plain-turns reply ends


def chat_prompt(tokenizer, turns: list[dict[str, str]]) -> tuple[list[int], list[str]]:
    """The prompt ids of a conversation (``[{"role", "content"}, ...]``) and the stop strings that end the reply:
    the tokenizer's chat template when it has one, else plain ``Role: text`` turns (the reply stops before the
    next ``\\nUser:``)."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True)
        # transformers 5 returns a BatchEncoding (a Mapping, not a dict) here; older releases a list of ids
        return list(ids["input_ids"] if isinstance(ids, Mapping) else ids), []
    text = "".join(f"{t['role'].capitalize()}: {t['content']}\n" for t in turns) + "Assistant:"
    return tokenizer(text, add_special_tokens=False).input_ids, list(PLAIN_STOPS)


class Chat:
    """The terminal chat: read a line, stream the reply, keep the history. ``/reset`` forgets the history (the
    system message stays), ``/system TEXT`` sets the system message, ``/exit`` (or end of input) quits; Ctrl-C
    during a reply stops it (what was said so far stays in the history) and the chat goes on."""

    def __init__(self, model, tokenizer, settings: SamplingSettings, system: str | None = None,
                 read: Callable[[str], str] = input, write: Callable[[str], None] | None = None):
        self.model, self.tokenizer, self.settings = model.eval(), tokenizer, settings
        self.system, self.history = system, []
        self.read = read
        self.write = write or (lambda text: (sys.stdout.write(text), sys.stdout.flush()))

    def turns(self) -> list[dict[str, str]]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def command(self, line: str) -> bool:
        """Handle a ``/command``; ``False`` to quit."""
        name, _, rest = line.partition(" ")
        if name == "/exit":
            return False
        if name == "/reset":
            self.history = []
            self.write("(history cleared)\n")
        elif name == "/system":
            self.system = rest.strip() or None
            self.write(f"(system message {'set' if self.system else 'cleared'})\n")
        else:
            self.write(f"(unknown command {name}; commands: /reset, /system TEXT, /exit)\n")
        return True

    def reply(self, line: str) -> None:
        """Answer ``line``; the turn enters the history once it has been answered (or stopped)."""
        import torch

        turns = self.turns() + [{"role": "user", "content": line}]
        ids, stop = chat_prompt(self.tokenizer, turns)
        room = self.model.config.max_position_embeddings - len(ids)
        if room < 1:
            self.write("(the conversation no longer fits the model's context: /reset to start again)\n")
            return
        settings = SamplingSettings(**{**vars(self.settings), "max_new_tokens": min(self.settings.max_new_tokens,
                                                                                     room)})
        settings.seed = settings.seed if settings.seed is not None else fresh_seed()
        check_request(self.model, [ids], settings)
        said: list[str] = []
        try:  # Ctrl-C stops this reply, not the chat; what was said so far stays
            with torch.inference_mode():
                complete(self.model, self.tokenizer, ids, settings, stop,
                         on_text=lambda piece: (said.append(piece), self.write(piece)))
        except KeyboardInterrupt:
            self.write(" [stopped]")
        self.history = self.history + [{"role": "user", "content": line},
                                       {"role": "assistant", "content": "".join(said).strip()}]
        self.write("\n")

    def run(self) -> None:
        self.write("chat: /reset, /system TEXT, /exit; Ctrl-C stops a reply\n")
        while True:
            try:  # a Ctrl-C anywhere in a turn (at the prompt, before or after the reply) ends that turn only
                line = self.read("> ").strip()
                if not line:
                    continue
                if line.startswith("/"):
                    if not self.command(line):
                        return
                    continue
                self.reply(line)
            except EOFError:
                self.write("\n")
                return
            except KeyboardInterrupt:
                self.write("\n")
