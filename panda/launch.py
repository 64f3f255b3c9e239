"""Start N training processes through torch.distributed.run, never a launcher of our own.

``panda train RECIPE --nproc 4`` re-executes itself as::

    python -m torch.distributed.run --nproc-per-node 4 --standalone -m panda train RECIPE ...

so torchrun's elastic agent owns rendezvous, environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT), signal forwarding and exit codes. A process that
torchrun (or srun, or the DeepSpeed launcher) already started has WORLD_SIZE
set and is never re-launched.
"""

from __future__ import annotations

import os
import sys


def inside_distributed_run() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def torchrun_argv(nproc: int, panda_args: list[str]) -> list[str]:
    """The command that runs ``panda <panda_args>`` in ``nproc`` local processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--standalone", "-m", "panda", *panda_args]


def without_option(args: list[str], name: str) -> list[str]:
    """``args`` minus ``name VALUE`` / ``name=VALUE`` (so the relaunched command does not loop)."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out


def relaunch_if_needed(nproc: int | None, argv: list[str] | None = None) -> None:
    """Replace this process with torchrun when ``nproc`` > 1 and no launcher started us.

    Returns (doing nothing) when there is nothing to launch. ``argv`` is the
    command line after the program name; default ``sys.argv[1:]``.
    """
    if not nproc or nproc <= 1 or inside_distributed_run():
        return
    args = without_option(list(sys.argv[1:] if argv is None else argv), "--nproc")
    command = torchrun_argv(nproc, args)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)
