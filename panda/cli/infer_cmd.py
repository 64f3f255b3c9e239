"""``panda infer``: answer one prompt, or every line of a JSONL file (resumable)."""

from __future__ import annotations

import click

from panda.cli.infer_options import model_options, sampling_options


@click.command()
@model_options
@click.option("--prompt", default=None, metavar="TEXT", help="Answer this one prompt.")
@click.option("--input", "input_path", default=None, metavar="IN.jsonl",
              type=click.Path(dir_okay=False),
              help="Requests, one JSON object a line: {\"id\", \"prompt\" | \"messages\", "
              "\"system\"}.")
@click.option("--output", "output_path", default=None, metavar="OUT.jsonl",
              type=click.Path(dir_okay=False),
              help="Answers, one line per request with its id; a rerun skips ids already there.")
@click.option("--system", default=None, metavar="TEXT", help="System message for --prompt.")
@sampling_options
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Requests decoded together (grouped by length).")
@click.option("--stream", is_flag=True, help="Print the answer to --prompt as it is generated.")
def infer(model, adapter, backend, backend_options, nproc, prompt, input_path, output_path,
          system, batch_size, stream, no_chat_template, **sampling_params):
    """Generate text with a trained model: --prompt TEXT, or --input IN.jsonl --output OUT.jsonl."""
    from panda.cli.infer_options import relaunch_if_needed, sampling_from
    from panda.infer.loading import check_adapter_folder, check_model_folder
    from panda.errors import UsageError

    if (prompt is None) == (input_path is None):
        raise UsageError("give exactly one of --prompt TEXT or --input IN.jsonl")
    if input_path is not None and output_path is None:
        raise UsageError("--input needs --output OUT.jsonl (answers are appended there)")
    if stream and input_path is not None:
        raise UsageError("--stream prints one answer as it comes; use it with --prompt")
    sampling = sampling_from(sampling_params)
    if input_path is not None:
        from panda.infer.batch_file import read_requests

        read_requests(input_path)  # a bad line fails now, before a model is loaded
    check_model_folder(model)
    if adapter:
        check_adapter_folder(adapter)
    relaunch_if_needed(backend, nproc)

    from panda.infer.runner import answer_file, answer_prompt, encode_request, open_backend, \
        parse_options

    loaded = open_backend(backend, parse_options(backend_options), model, adapter)
    try:
        if prompt is not None:
            ids = encode_request(loaded, prompt=prompt, system=system,
                                 chat_template=not no_chat_template)
            answer_prompt(loaded, ids, sampling, stream=stream)
            return
        log = (lambda message: click.echo(message, err=True)) if loaded.is_main_process \
            else None
        answered, skipped = answer_file(loaded, input_path, output_path, sampling,
                                        batch_size=batch_size,
                                        chat_template=not no_chat_template, log=log)
        if loaded.is_main_process:
            click.echo(f"wrote {answered} answers to {output_path}"
                       + (f" ({skipped} already there)" if skipped else ""), err=True)
    finally:
        loaded.close()
