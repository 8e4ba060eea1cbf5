"""Joining the process group torchrun describes in the environment."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def init_from_env(device: str) -> tuple[int, int]:
    """Initialize torch.distributed from torchrun's variables; ``(rank, world_size)``.

    Without them (a plain ``python -m syncnorm train``) this is one process and
    nothing is initialized.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1 or dist.is_initialized():
        return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    use_nccl = device in ("cuda", "auto") and torch.cuda.is_available()
    dist.init_process_group(
        "nccl" if use_nccl else "gloo",
        # The collective layer has its own, shorter bound (SYNCNORM_TIMEOUT_S);
        # this one covers set-up and DDP.
        timeout=datetime.timedelta(minutes=10),
    )
    return dist.get_rank(), dist.get_world_size()
