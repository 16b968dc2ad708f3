"""Distributed training, one module per concern: `mesh` (the (dp, sp) DeviceMesh and collectives),
`ulysses` (token sharding and the sequence-parallel attention), `parallelize` (SP -> checkpointing ->
FSDP2/DDP, gradient-sync skipping), `state` (full weights, trained parameters and optimizer state)."""
from .mesh import (DistInfo, all_reduce_mean, any_rank, barrier, broadcast_object, check_degrees, check_options,
                   init_distributed, shutdown)
from .parallelize import (apply_activation_checkpointing, apply_ddp, apply_fsdp, gradient_sync,
                          maybe_offload_activations, parallelize, shards_weights)
from .state import (_is_dtensor, clip_grad_norm, full_lora, full_trainable, is_sharded, load_full_state,
                    load_optimizer_state_dict, optimizer_state_dict)
from .ulysses import (UlyssesAttention, UlyssesGroup, apply_sequence_parallel, gather_sequence, sequence_layout,
                      shard_sequence)

__all__ = ["DistInfo", "init_distributed", "check_degrees", "check_options", "barrier", "all_reduce_mean", "any_rank",
           "broadcast_object", "shutdown", "parallelize", "apply_activation_checkpointing", "maybe_offload_activations",
           "apply_fsdp", "apply_ddp", "shards_weights", "gradient_sync", "load_full_state", "full_lora",
           "full_trainable", "optimizer_state_dict", "load_optimizer_state_dict", "clip_grad_norm", "is_sharded",
           "UlyssesGroup", "UlyssesAttention", "apply_sequence_parallel", "shard_sequence", "gather_sequence",
           "sequence_layout"]
