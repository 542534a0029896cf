"""The torchrun command lines `python -m launch` runs: pure functions from a `Job` to argv lists.

torchrun is run as `<this interpreter> -m torch.distributed.run` (what the `torchrun` script does), so every
node uses the Python environment the launcher ran in, whatever `torchrun` happens to be first on PATH.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

# The checkout holding `launch/` and `train/`: put first on PYTHONPATH wherever a command runs on a node
# this process did not start, so that `-m train` is this checkout's trainer.
ROOT = Path(__file__).resolve().parents[1]

# Signals torchrun catches and forwards to every rank (then waits --shutdown-timeout seconds before
# SIGKILL). Its default list lacks SIGUSR1, the signal Slurm sends before the time limit; without it a
# SIGUSR1 kills torchrun, and with it the ranks that are still writing their checkpoint.
FORWARDED_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1")


@dataclass(frozen=True)
class Job:
    """What to run (the trainer with a config and overrides) and on how many processes."""

    config: Path  # absolute: commands may run from another directory or machine
    overrides: tuple[str, ...] = ()  # key=value, passed to the trainer verbatim
    nodes: int = 1
    nproc_per_node: int = 1  # GPUs per node; on CPU, processes per node (gloo)
    max_restarts: int = 0  # torchrun restarts of the whole worker group after a failure
    grace_s: int = 300  # seconds a signalled trainer gets to checkpoint before SIGKILL

    @property
    def world(self) -> int:
        return self.nodes * self.nproc_per_node


def torchrun() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run"]


def trainer_args(job: Job) -> list[str]:
    return ["-m", "train", "--config", str(job.config), *job.overrides]


def torchrun_command(job: Job, rendezvous: list[str], nnodes: str | None = None) -> list[str]:
    """torchrun + `rendezvous` flags + the trainer; `nnodes` defaults to `job.nodes`."""
    return [
        *torchrun(), "--nnodes", nnodes or str(job.nodes), "--nproc-per-node", str(job.nproc_per_node),
        *rendezvous, "--max-restarts", str(job.max_restarts),
        "--signals-to-handle", ",".join(FORWARDED_SIGNALS), "--shutdown-timeout", str(job.grace_s),
        *trainer_args(job),
    ]


def local_command(job: Job) -> list[str]:
    """One node: torchrun's standalone rendezvous (a local store on a free port, nothing to configure)."""
    return torchrun_command(job, ["--standalone"], nnodes="1")


def c10d_rendezvous(endpoint: str, rdzv_id: str) -> list[str]:
    return ["--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", rdzv_id]


def node_command(job: Job, endpoint: str, rdzv_id: str) -> list[str]:
    """The command for every node of a multi-node job: the same on each. With the c10d rendezvous the
    torchrun whose host is `endpoint` serves the store, the others join it, and the rendezvous hands out
    the node ranks, so no node needs its own rank or a start order."""
    return torchrun_command(job, c10d_rendezvous(endpoint, rdzv_id))


def check_endpoint(endpoint: str) -> str:
    """`HOST[:PORT]` (torchrun's c10d default port is 29400); raises ValueError naming the problem."""
    host, sep, port = endpoint.rpartition(":") if ":" in endpoint else (endpoint, "", "")
    if not host or (sep and not (port.isdigit() and 0 < int(port) < 65536)):
        raise ValueError(f"--rdzv-endpoint must look like HOST or HOST:PORT (e.g. node001:29400), got "
                         f"'{endpoint}'")
    return endpoint


# torchrun's rendezvous store is shared with the ranks by default; after an elastic restart the new ranks can
# then read the dead ranks' addresses from the first attempt and fail to connect (pytorch/pytorch#135712).
TORCHRUN_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def env_prefix() -> str:
    """`NAME=value ...` for `TORCHRUN_ENV`, to put before a command in a shell."""
    return " ".join(f"{k}={shlex.quote(v)}" for k, v in TORCHRUN_ENV.items())


def pythonpath_prefix() -> str:
    """`PYTHONPATH=<ROOT>${PYTHONPATH:+:$PYTHONPATH}`, a shell assignment keeping any existing value."""
    return f"PYTHONPATH={shlex.quote(str(ROOT))}" + "${PYTHONPATH:+:$PYTHONPATH}"


def shell_line(argv: list[str], workdir: Path) -> str:
    """`cd <workdir> && PYTHONPATH=<ROOT>... <argv>`: paste it into a shell on any node."""
    return f"cd {shlex.quote(str(workdir))} && {pythonpath_prefix()} {env_prefix()} {shlex.join(argv)}"
