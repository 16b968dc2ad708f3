"""Run a test body in `world` gloo processes on this CPU (torch.multiprocessing spawn, one thread each)."""
from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, body: Callable[..., None], args: tuple[Any, ...]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from lora_core import distributed as parallel
    try:
        body(rank, world, *args)
        import torch.distributed as dist
        if dist.is_initialized():
            dist.barrier()  # nobody tears the group down while a peer is still in a collective (a gloo abort)
    finally:
        parallel.shutdown()


def spawn(body: Callable[..., None], world: int, *args: Any) -> None:
    """body(rank, world, *args) in every process (a module-level function, so the children can import it);
    the first failure is raised here with its traceback."""
    mp.spawn(_entry, args=(world, free_port(), body, args), nprocs=world, join=True)
