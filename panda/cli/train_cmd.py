"""``panda train RECIPE``: train (or resume) from a recipe, on one or several processes."""

from __future__ import annotations

import click

from panda.cli.options import recipe_argument, set_option


@click.command()
@recipe_argument
@set_option
@click.option("--resume", default="auto", show_default=True, metavar="auto|never|PATH",
              help="auto: continue from the newest complete checkpoint in run.output_dir "
              "if there is one; never: start over; PATH: that checkpoint.")
@click.option("--overwrite", is_flag=True, help="Start over in a non-empty run.output_dir "
              "(panda's own outputs there are replaced).")
@click.option("--nproc", type=click.IntRange(min=1), default=None,
              help="Processes on this machine (re-runs under torch.distributed.run).")
@click.option("--nnodes", type=click.IntRange(min=1), default=None,
              help="Machines in the run; start the same command on each.")
@click.option("--node-rank", type=click.IntRange(min=0), default=None,
              help="This machine's index (0 on the --master-addr machine).")
@click.option("--master-addr", default=None, help="Address of the node-rank-0 machine.")
@click.option("--master-port", type=click.IntRange(1, 65535), default=None,
              help="Free port on the --master-addr machine (default 29500).")
@click.option("--launcher", type=click.Choice(["torchrun", "deepspeed"]), default="torchrun",
              show_default=True, help="Start the processes with torch.distributed.run or "
              "DeepSpeed's launcher.")
@click.option("--max-restarts", type=click.IntRange(min=0), default=0, show_default=True,
              help="Restart all processes this many times after a failure (torchrun).")
def train(recipe: str, overrides: tuple[str, ...], resume: str, overwrite: bool,
          nproc: int | None, nnodes: int | None, node_rank: int | None,
          master_addr: str | None, master_port: int | None, launcher: str,
          max_restarts: int) -> None:
    """Train the model that RECIPE describes; SIGTERM/Ctrl-C saves and stops cleanly."""
    from pathlib import Path

    from panda.job import resolve_resume, resume_command
    from panda.launch import inside_distributed_run, relaunch_if_needed
    from panda.recipe import load

    # Check the recipe and the output folder once, here, before N processes would each
    # report the same mistake.
    resolved = load(recipe, overrides)
    if not inside_distributed_run():
        resolve_resume(Path(resolved.run.output_dir), resume, overwrite)
    relaunch_if_needed(nproc, nnodes=nnodes, node_rank=node_rank, master_addr=master_addr,
                       master_port=master_port, launcher=launcher, max_restarts=max_restarts)

    from panda.job import train as run_training

    command = resume_command(recipe, list(overrides), nproc)
    run_training(resolved, resume=resume, overwrite=overwrite, command=command)
