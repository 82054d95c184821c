"""Which process this is, from the launcher's environment alone (torchrun, or SLURM's srun without it).

No torch here: the CLI reads it before anything imports torch (which rank writes the console and train.log).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from mptrain.errors import ConfigError


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_info() -> DistInfo:
    env = os.environ
    if "RANK" not in env and int(env.get("SLURM_NTASKS", 1)) > 1 and "SLURM_PROCID" in env:
        return DistInfo(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"]))
    return DistInfo(int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1)))


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu[03-05,09],cpu1" -> "gpu03"."""
    head = re.match(r"[^,\[]*(\[[^\]]*\])?", nodelist.strip()).group(0)
    if "[" not in head:
        return head
    prefix, ranges = head[:-1].split("[", 1)
    return prefix + re.split(r"[-,]", ranges)[0]


def rendezvous_env(info: DistInfo) -> None:
    """Under SLURM without torchrun: the variables torch.distributed's env:// rendezvous reads."""
    env = os.environ
    if "RANK" in env:  # torchrun set them
        return
    env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = str(info.rank), str(info.world_size), str(info.local_rank)
    if "MASTER_ADDR" not in env:
        if "SLURM_JOB_NODELIST" not in env:
            raise ConfigError("SLURM without torchrun: set MASTER_ADDR (and MASTER_PORT), or run under a SLURM "
                              "allocation that sets SLURM_JOB_NODELIST")
        env["MASTER_ADDR"] = first_host(env["SLURM_JOB_NODELIST"])
    # a port per job, so two jobs sharing a node do not meet
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", 9500)) % 20000))
