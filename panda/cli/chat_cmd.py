"""``panda chat``: talk to a model interactively, or answer one --query and exit."""

from __future__ import annotations

import click

from panda.cli.infer_options import model_options, sampling_options


@click.command()
@model_options
@click.option("--system", default=None, metavar="TEXT", help="System message.")
@click.option("--query", default=None, metavar="TEXT",
              help="Answer this one message and exit (no interactive loop).")
@sampling_options
def chat(model, adapter, backend, backend_options, nproc, system, query, no_chat_template,
         **sampling_params):
    """Chat with a model: history, streaming, /reset, /system TEXT, /history, /exit.

    End a line with \\ to continue it, or paste several lines between two
    lines of three double quotes. Replies go to stdout, notices to stderr.
    """
    import sys

    from panda.cli.infer_options import relaunch_if_needed, sampling_from
    from panda.infer.loading import check_adapter_folder, check_model_folder

    sampling = sampling_from(sampling_params)
    check_model_folder(model)
    if adapter:
        check_adapter_folder(adapter)
    relaunch_if_needed(backend, nproc)

    from panda.infer.chat import ChatSession
    from panda.infer.chat_repl import HELP, run_chat, stdin_reader
    from panda.infer.distributed import share_from_main
    from panda.infer.runner import open_backend, parse_options

    loaded = open_backend(backend, parse_options(backend_options), model, adapter)
    session = ChatSession(loaded, sampling, system=system, chat_template=not no_chat_template)
    try:
        if query is not None:
            for piece in session.reply(query):
                if loaded.is_main_process:
                    click.echo(piece, nl=False)
            if loaded.is_main_process:
                click.echo()
            return
        interactive = sys.stdin.isatty()
        if interactive and loaded.is_main_process:
            click.echo(f"chatting with {model} ({backend}). {HELP}", err=True)
        code = run_chat(session, stdin_reader(sys.stdin, interactive), sys.stdout, sys.stderr,
                        share=share_from_main, show=loaded.is_main_process)
    finally:
        loaded.close()
    raise SystemExit(code)
