"""The ``panda chat`` loop: read a message, stream the reply, handle slash commands.

Input, one message at a time:

* a line is a message; a line ending in ``\\`` continues on the next line;
* a line holding only ``\"\"\"`` starts a paste: every line up to the next
  ``\"\"\"`` line is one message (blank lines included);
* ``/reset`` clears the history, ``/system TEXT`` sets the system message
  (``/system`` alone removes it), ``/history`` prints the conversation,
  ``/help`` lists commands, ``/exit`` (or end of input, Ctrl-D) leaves.

Replies go to stdout; notices (history cleared, ...) to stderr, so
``panda chat < questions.txt > answers.txt`` keeps only the answers.
"""

from __future__ import annotations

from typing import Callable, TextIO

from panda.infer.chat import ChatSession

PASTE_FENCE = '"""'
HELP = ("commands: /reset (clear history), /system TEXT (set; /system alone removes it), "
        "/history, /help, /exit\n"
        'multi-line: end a line with \\ to continue it, or paste between two lines of """')

ReadLine = Callable[[str], "str | None"]  # prompt -> line without "\n", None at end of input


def read_message(read_line: ReadLine, prompt: str = ">>> ", more: str = "... ") -> str | None:
    """One message from the user (see the module doc for the rules); None at end of input."""
    line = read_line(prompt)
    if line is None:
        return None
    if line.strip() == PASTE_FENCE:
        pasted: list[str] = []
        while (line := read_line(more)) is not None and line.strip() != PASTE_FENCE:
            pasted.append(line)
        return "\n".join(pasted)
    parts: list[str] = []
    while line is not None and line.endswith("\\"):
        parts.append(line[:-1])
        line = read_line(more)
    if line is not None:
        parts.append(line)
    return "\n".join(parts)


def stdin_reader(stream: TextIO, interactive: bool) -> ReadLine:
    """Lines from ``stream``; on a terminal through ``input`` (line editing, prompts)."""
    if interactive:
        try:
            import readline  # noqa: F401  (gives input() history and editing)
        except ImportError:
            pass

        def read_interactive(prompt: str) -> str | None:
            try:
                return input(prompt)
            except EOFError:
                return None

        return read_interactive

    def read_piped(prompt: str) -> str | None:
        line = stream.readline()
        return None if line == "" else line.rstrip("\n").rstrip("\r")

    return read_piped


def run_chat(session: ChatSession, read_line: ReadLine, out: TextIO, notices: TextIO, *,
             share: Callable = lambda value: value, show: bool = True) -> int:
    """The loop; returns the exit code. ``share`` hands rank 0's input to every rank."""

    def say(text: str) -> None:
        if show:
            notices.write(text + "\n")
            notices.flush()

    while True:
        message = share(read_message(read_line) if show else None)
        if message is None:
            return 0
        if not message.strip():
            continue
        if message.startswith("/"):
            command, _, argument = message[1:].partition(" ")
            if command in ("exit", "quit"):
                return 0
            if command == "reset":
                session.reset()
                say("(history cleared)")
            elif command == "system":
                session.set_system(argument.strip())
                say("(system message set)" if argument.strip() else "(system message removed)")
            elif command == "history":
                if show:
                    for turn in session.messages():
                        out.write(f"[{turn['role']}] {turn['content']}\n")
                    out.flush()
            elif command == "help":
                say(HELP)
            else:
                say(f"unknown command /{command}\n{HELP}")
            continue
        for piece in session.reply(message):
            if show:
                out.write(piece)
                out.flush()
        if show:
            out.write("\n")
            out.flush()
