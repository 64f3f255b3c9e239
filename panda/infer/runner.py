"""What ``panda infer`` does, as library calls: open a backend, answer a prompt or a file."""

from __future__ import annotations

import sys
import time
import tomllib
from typing import Any, Callable, TextIO

from pydantic import ValidationError

from panda.errors import UsageError
from panda.infer.generation import Completion, collect, stream_batches
from panda.infer.sampling import Sampling


def parse_options(pairs: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; VALUE is read as TOML (true, 3, "x"), else kept as text."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--option {pair}: expected KEY=VALUE")
        try:
            options[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            options[key.strip()] = value
    return options


def open_backend(name: str, options: dict[str, Any], model: str, adapter: str | None) -> Any:
    """The named infer backend, its options validated, with the model loaded."""
    from panda import registry

    backend_class = registry.get("infer_backend", name)
    try:
        backend = backend_class(backend_class.Options(**options))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise UsageError(f"--option for backend '{name}': {problems}",
                         hint=f"`panda plugins show {name} --kind infer_backend` lists its "
                         "options") from None
    _quiet_transformers()
    backend.load(model, adapter=adapter)
    return backend


def _quiet_transformers() -> None:
    """Weight-loading progress bars and advice are noise on a command's stderr."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def encode_request(backend: Any, *, prompt: str | None = None, system: str | None = None,
                   messages: list[dict[str, str]] | None = None, chat_template: bool = True
                   ) -> list[int]:
    from panda.infer.prompting import encode_prompt

    return encode_prompt(backend.tokenizer, prompt, messages=messages, system=system,
                         chat_template=chat_template)


def answer_prompt(backend: Any, prompt_ids: list[int], sampling: Sampling, *,
                  out: TextIO = sys.stdout, stream: bool = False) -> Completion:
    """One prompt; prints the answer (piece by piece with ``stream``) on the main rank."""
    completion = Completion(0, prompt_tokens=len(prompt_ids))
    show = backend.is_main_process
    for finished in collect(_print_pieces(stream_batches(backend, [prompt_ids], sampling),
                                          out if (stream and show) else None), [completion]):
        if show and not stream:
            out.write(finished.text)
    if show:
        out.write("\n")
        out.flush()
    return completion


def _print_pieces(chunks, out: TextIO | None):
    for chunk in chunks:
        if out is not None and chunk.text:
            out.write(chunk.text)
            out.flush()
        yield chunk


def answer_file(backend: Any, input_path: str, output_path: str, sampling: Sampling, *,
                batch_size: int = 8, chat_template: bool = True,
                log: Callable[[str], None] | None = None) -> tuple[int, int]:
    """Answer every request of IN.jsonl not yet in OUT.jsonl; returns (answered now, skipped)."""
    from panda.infer.batch_file import OutputWriter, answered_ids, pending, read_requests

    requests = read_requests(input_path)  # every line is checked before any work starts
    done = answered_ids(output_path) if backend.is_main_process else set()
    done = _share(done)
    todo = list(pending(requests, done))
    skipped = len(requests) - len(todo)
    log = log or (lambda message: None)
    if skipped:
        log(f"resuming: {skipped} of {len(requests)} already answered in {output_path}")
    prompts = [encode_request(backend, prompt=r.prompt, system=r.system, messages=r.messages,
                              chat_template=chat_template) for r in todo]
    completions = [Completion(i, prompt_tokens=len(p)) for i, p in enumerate(prompts)]
    writer = OutputWriter(output_path) if backend.is_main_process else None
    started, answered = time.monotonic(), 0
    try:
        chunks = stream_batches(backend, prompts, sampling, batch_size=batch_size)
        for finished in collect(chunks, completions):
            answered += 1
            if writer is not None:
                writer.write({"id": todo[finished.index].id, "output": finished.text,
                              "finish_reason": finished.finish_reason,
                              "prompt_tokens": finished.prompt_tokens,
                              "completion_tokens": finished.completion_tokens})
            if answered % max(1, batch_size) == 0 or answered == len(todo):
                log(f"answered {answered}/{len(todo)} ({time.monotonic() - started:.1f}s)")
    finally:
        if writer is not None:
            writer.close()
    return answered, skipped


def _share(value: Any) -> Any:
    from panda.infer.distributed import share_from_main

    return share_from_main(value)
