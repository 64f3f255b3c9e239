"""Click options shared by ``panda infer`` and ``panda chat`` (click only: imported by --help)."""

from __future__ import annotations

import sys
from typing import Any, Callable

import click

BACKEND_HELP = ("Inference backend: hf (one process; device_map=auto over several GPUs), "
                "torch-tp (torch tensor parallel, with --nproc), ds (DeepSpeed inference, with "
                "--nproc), tp (unmaintained package; explains the alternatives).")


def model_options(command: Callable) -> Callable:
    options = [
        click.option("--model", "model", required=True, metavar="PATH",
                     help="Local Hugging Face model folder (e.g. what `panda train` exported)."),
        click.option("--adapter", metavar="PATH", default=None,
                     help="peft/LoRA adapter folder, merged into the weights at load."),
        click.option("--backend", default="hf", show_default=True, metavar="NAME",
                     help=BACKEND_HELP),
        click.option("--option", "-o", "backend_options", multiple=True, metavar="KEY=VALUE",
                     help="Backend option, VALUE read as TOML (e.g. -o dtype=float16, "
                     "-o fast_decode=off); `panda plugins show NAME --kind infer_backend` "
                     "lists them."),
        click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Processes (GPUs) for a tensor-parallel backend; starts torchrun."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def sampling_options(command: Callable) -> Callable:
    options = [
        click.option("--max-new-tokens", type=int, default=256, show_default=True,
                     help="Most tokens to generate per answer."),
        click.option("--temperature", type=float, default=0.7, show_default=True,
                     help="Sampling temperature; 0 = greedy (deterministic)."),
        click.option("--top-p", type=float, default=0.9, show_default=True,
                     help="Nucleus sampling: keep the most likely tokens up to this mass."),
        click.option("--top-k", type=int, default=0, show_default=True,
                     help="Keep only the K most likely tokens (0 = off)."),
        click.option("--repetition-penalty", type=float, default=1.0, show_default=True,
                     help="Above 1 discourages tokens already in the text."),
        click.option("--seed", type=int, default=None, help="Seed for sampling."),
        click.option("--no-chat-template", "no_chat_template", is_flag=True,
                     help="Feed the text as is, even when the model has a chat template."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def sampling_from(params: dict[str, Any]):
    from panda.infer.sampling import Sampling

    return Sampling(max_new_tokens=params["max_new_tokens"], temperature=params["temperature"],
                    top_p=params["top_p"], top_k=params["top_k"],
                    repetition_penalty=params["repetition_penalty"], seed=params["seed"])


def relaunch_if_needed(backend: str, nproc: int) -> None:
    """With --nproc > 1, re-run this very command under torchrun and exit with its code."""
    from panda import registry
    from panda.errors import UsageError
    from panda.infer.distributed import inside_torchrun, relaunch_under_torchrun

    if nproc == 1 or inside_torchrun():
        return
    backend_class = registry.get("infer_backend", backend)
    if not getattr(backend_class, "multi_process", False):
        raise UsageError(f"--nproc {nproc}: backend '{backend}' runs in one process",
                         hint="use --backend torch-tp or --backend ds for one process per GPU "
                         "(hf spreads a model over several GPUs by itself)")
    raise SystemExit(relaunch_under_torchrun(nproc, _args_without_nproc(sys.argv[1:])))


def _args_without_nproc(args: list[str]) -> list[str]:
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            kept.append(arg)
    return kept
