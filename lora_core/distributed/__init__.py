"""Process groups, the parallelize step (sequence parallel -> checkpointing -> FSDP2/DDP), state gathering."""
from .parallelize import *  # noqa: F401,F403
from .parallelize import _is_dtensor  # noqa: F401
