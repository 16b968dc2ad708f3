"""The (dp, sp) mesh, the degree checks and the small collectives (4 gloo processes for the layout)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from lora_core import distributed as parallel

from ._procs import spawn


def test_invalid_degrees_raise_with_the_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=r"ulysses\(3\) != WORLD_SIZE\(4\).*\[1, 2, 4\]"):
        parallel.check_degrees(4, 3, 8)
    with pytest.raises(ValueError, match=r"--ulysses 4 does not divide the model's 2 attention heads.*\[1, 2\]"):
        parallel.check_degrees(4, 4, 2)
    with pytest.raises(ValueError, match="must be >= 1"):
        parallel.check_degrees(2, 0, 2)
    assert parallel.check_degrees(4, 2, 2) == 2
    # init_distributed reports it before any process group starts (no MASTER_ADDR is set: starting one
    # would fail differently)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match=r"ulysses\(4\) != WORLD_SIZE\(2\).*\[1, 2\]"):
        parallel.init_distributed(4, 2)
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match="--ulysses 4 does not divide the model's 2 attention heads"):
        parallel.init_distributed(4, 2)
    assert not dist.is_initialized()


def test_backbone_without_sequence_parallel_rejects_ulysses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match=r"--ulysses 2: this backbone does not support sequence parallel.*"
                                         r"use --ulysses 1"):
        parallel.init_distributed(2, None)
    assert not dist.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "1")
    info = parallel.init_distributed(1, None)
    assert (info.world_size, info.sp_size, info.dp_size) == (1, 1, 1)


def test_single_process_is_world_one_without_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = parallel.init_distributed(1, 24)
    assert not info.distributed and info.is_main and info.mesh is None and info.dp_group is None
    x = torch.tensor(3.0)
    assert parallel.all_reduce_mean(x, info) is x
    assert parallel.any_rank(True, info) and not parallel.any_rank(False, info)
    assert parallel.broadcast_object({"a": 1}, info) == {"a": 1}
    assert not dist.is_initialized()


def test_unsupported_combinations_fail_before_training() -> None:
    info = parallel.DistInfo(world_size=2, dp_size=2)
    with pytest.raises(ValueError, match="adamw8bit.*--parallel ddp"):
        parallel.check_options(info, mode="fsdp", optimizer="adamw8bit", validation_every=0)
    parallel.check_options(info, mode="ddp", optimizer="adamw8bit", validation_every=0)
    with pytest.raises(ValueError, match="validation.every=5"):
        parallel.check_options(parallel.DistInfo(world_size=2, sp_size=2), mode="ddp", optimizer="adamw",
                               validation_every=5)
    with pytest.raises(ValueError, match="validation.every=5"):
        parallel.check_options(info, mode="fsdp", optimizer="adamw", validation_every=5)
    parallel.check_options(info, mode="ddp", optimizer="adamw", validation_every=5)


def _members(group: object) -> list[int]:
    ranks: list[int] = [0] * dist.get_world_size(group)
    dist.all_gather_object(ranks, dist.get_rank(), group=group)
    return ranks


def _mesh_worker(rank: int, world: int) -> None:
    info = parallel.init_distributed(ulysses=2, num_heads=4)
    assert (info.dp_size, info.sp_size, info.dp_rank, info.sp_rank) == (2, 2, rank // 2, rank % 2)
    mesh = info.mesh
    assert mesh.mesh_dim_names == ("dp", "sp") and tuple(mesh.shape) == (2, 2)
    assert mesh.mesh.tolist() == [[0, 1], [2, 3]]  # sp inner: a Ulysses group is two neighbouring ranks
    # the groups taken from the mesh are the ones the mesh says
    g = rank // 2
    assert _members(info.sp_group) == [2 * g, 2 * g + 1]
    assert _members(info.dp_group) == [rank % 2, rank % 2 + 2]
    assert info.world_mesh.mesh.tolist() == [0, 1, 2, 3]  # FSDP2 shards over everyone
    assert _members(info.world_mesh.get_group()) == [0, 1, 2, 3]
    # collectives over the world
    mean = parallel.all_reduce_mean(torch.tensor(float(rank)), info)
    assert mean.item() == pytest.approx(1.5)
    assert parallel.any_rank(rank == 3, info) and not parallel.any_rank(False, info)
    assert parallel.broadcast_object({"from": rank}, info) == {"from": 0}
    parallel.barrier(info)
    # a second layout in the same process builds a mesh of its own
    again = parallel.init_distributed(ulysses=1, num_heads=4)
    assert tuple(again.mesh.shape) == (4, 1) and again.dp_rank == rank and again.sp_rank == 0
    assert _members(again.dp_group) == [0, 1, 2, 3] and _members(again.sp_group) == [rank]


def test_mesh_is_dp_by_sp_with_sp_inner() -> None:
    """4 processes, --ulysses 2: the named mesh holds Ulysses groups {0,1}, {2,3} and data-parallel groups
    {0,2}, {1,3}, exactly the grouping the data loader assumes (dp_rank = rank // K)."""
    spawn(_mesh_worker, 4)
