"""DeepSpeed's multi-node launcher (pdsh / ssh) for clusters without Slurm: `python -m launch --hostfile FILE`.

Only DeepSpeed's launcher is used, not its engine: it starts `python -m train` on every host of the hostfile
with RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT in the environment (`--no_local_rank`: the
trainer reads LOCAL_RANK from there), which is what `parallel.init_distributed` reads. Its rendezvous is static:
there are no elastic restarts; after a failure rerun the same command, which resumes from the newest checkpoint.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from launch.commands import Job

_LINE = re.compile(r"^(?P<host>[A-Za-z0-9][A-Za-z0-9._-]*)\s+slots=(?P<slots>\d+)$")


class HostfileError(ValueError):
    """A hostfile that cannot be launched; the message names the file and line."""


def read_hostfile(path: Path) -> list[tuple[str, int]]:
    """[(host, slots)] in file order, from DeepSpeed's format: one `host slots=N` per line; blank lines and
    `#` comments ignored. Every host must have the same number of slots (one mesh, consecutive ranks per node)."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise HostfileError(f"hostfile {path}: {e.strerror or e}") from e
    hosts: list[tuple[str, int]] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _LINE.match(line)
        if m is None:
            raise HostfileError(f"hostfile {path}:{number}: expected 'HOST slots=N', got '{raw.strip()}'")
        host, slots = m["host"], int(m["slots"])
        if slots < 1:
            raise HostfileError(f"hostfile {path}:{number}: slots must be >= 1, got {slots}")
        if any(h == host for h, _ in hosts):
            raise HostfileError(f"hostfile {path}:{number}: host '{host}' is listed twice")
        hosts.append((host, slots))
    if not hosts:
        raise HostfileError(f"hostfile {path}: no hosts")
    slots = {s for _, s in hosts}
    if len(slots) > 1:
        raise HostfileError(f"hostfile {path}: every host needs the same slots (GPUs per node), got "
                            + ", ".join(f"{h}={s}" for h, s in hosts))
    return hosts


def deepspeed_command(job: Job, hostfile: Path, hosts: list[tuple[str, int]], master_port: int) -> list[str]:
    """DeepSpeed's runner (as a module of this interpreter, like torchrun) starting the trainer on every host."""
    return [
        sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile),
        "--num_nodes", str(len(hosts)), "--num_gpus", str(hosts[0][1]), "--master_addr", hosts[0][0],
        "--master_port", str(master_port), "--no_local_rank", "--module",
        "train", "--config", str(job.config), *job.overrides,
    ]
