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
    return ("WORLD_SIZE" in os.environ and "RANK" in os.environ) or started_by_srun()


# -- SLURM: srun starts one task per rank ----------------------------------------------------

def started_by_srun(environ: "os._Environ[str] | dict[str, str]" = os.environ) -> bool:
    """True in a task that ``srun`` started as one rank of several (not in the batch script,
    which has SLURM_PROCID too but no SLURM_STEP_ID)."""
    return ("SLURM_PROCID" in environ and "SLURM_STEP_ID" in environ
            and int(environ.get("SLURM_NTASKS", "1")) > 1)


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``scontrol show hostnames``, else parsed here."""
    import shutil
    import subprocess

    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True,
                                 capture_output=True, text=True, timeout=30).stdout.split()
            if out:
                return out[0]
        except (OSError, subprocess.SubprocessError):
            pass
    # "gpu[01-04,07],cpu3" -> "gpu01": the first name, its first range's first number
    head = nodelist.split(",")[0] if "[" not in nodelist.split(",")[0] else nodelist
    if "[" not in head:
        return head
    prefix, rest = head.split("[", 1)
    return prefix + rest.split("]")[0].split(",")[0].split("-")[0]


def adopt_slurm_environment(environ: "os._Environ[str] | dict[str, str]" = os.environ) -> None:
    """Under ``srun``, set torch.distributed's variables from SLURM's (never overriding any
    already set): RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR (first host), MASTER_PORT."""
    if not started_by_srun(environ) or "RANK" in environ:
        return
    environ["RANK"] = environ["SLURM_PROCID"]
    environ["WORLD_SIZE"] = environ["SLURM_NTASKS"]
    environ.setdefault("LOCAL_RANK", environ.get("SLURM_LOCALID", "0"))
    environ.setdefault("LOCAL_WORLD_SIZE", environ.get("SLURM_NTASKS_PER_NODE",
                                                        "1").split("(")[0])
    if "MASTER_ADDR" not in environ:
        nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST") or ""
        environ["MASTER_ADDR"] = first_slurm_host(nodelist) if nodelist else "127.0.0.1"
    # One port per job, so two jobs sharing a node do not collide.
    environ.setdefault("MASTER_PORT", str(20000 + int(environ.get("SLURM_JOB_ID", "0")) % 20000))


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
