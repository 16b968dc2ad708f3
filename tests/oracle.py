"""Helpers for parity tests against reference implementations: one randomisation for every model, so a swapped
or mis-shaped key cannot hide behind zero- or one-initialised weights, and one error measure."""
from __future__ import annotations

import math
import threading

import torch
import torch.nn as nn

from backbones.attention import attention


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, in fp32."""
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max()).item()


def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Random values for every parameter: matrices scaled by fan-in, norm weights near 1 (so they stay norms),
    biases and the other vectors small; deterministic in `seed`."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


class ThreadSP:
    """`size` sequence-parallel ranks simulated by threads of one process, through the model's seams (its `sp`
    attribute and every module's `attn_op`, the modules `apply_sequence_parallel` wraps). gather is an
    all-gather; `attn_op` stands in for Ulysses by all-gathering q/k/v, so every rank attends over the full
    sequence and keeps its own rows: a wrong slice on any rank changes that rank's tokens."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._local = threading.local()
        self._barrier = threading.Barrier(size)
        self._slots: list[torch.Tensor | None] = [None] * size

    @property
    def rank(self) -> int:
        return self._local.rank

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        self._slots[self.rank] = x
        self._barrier.wait()
        out = torch.cat(self._slots, dim=dim)  # type: ignore[arg-type]
        self._barrier.wait()  # nobody overwrites a slot before all have read it
        return out

    def attn_op(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                k_lens: torch.Tensor | None = None) -> torch.Tensor:
        ll = q.shape[1]
        out = attention(self.gather(q, 1), self.gather(k, 1), self.gather(v, 1), k_lens=k_lens)
        return out[:, self.rank * ll:(self.rank + 1) * ll]

    def run(self, model: nn.Module, *args: object, **kwargs: object) -> list[torch.Tensor]:
        """Each rank's output of model(*args, **kwargs) (no grad)."""
        results: list[torch.Tensor | None] = [None] * self.size
        errors: list[BaseException] = []

        def work(rank: int) -> None:
            self._local.rank = rank
            try:
                with torch.no_grad():  # grad mode is per thread
                    results[rank] = model(*args, **kwargs)
            except BaseException as exc:  # surface in the main thread; free the other ranks
                errors.append(exc)
                self._barrier.abort()

        seams = [m for m in model.modules() if "attn_op" in vars(m)]
        saved = [m.attn_op for m in seams]
        model.sp = self
        for m in seams:
            m.attn_op = self.attn_op
        try:
            threads = [threading.Thread(target=work, args=(r,)) for r in range(self.size)]
            for th in threads:
                th.start()
            for th in threads:
                th.join(timeout=60)
        finally:
            model.sp = None
            for m, op in zip(seams, saved):
                m.attn_op = op
        if errors:
            raise errors[0]
        return results  # type: ignore[return-value]


def torchrun_train(argv: list[str], nproc: int = 2, timeout: int = 600) -> None:
    """`python -m torch.distributed.run --nproc_per_node=nproc train.py *argv` on CPU (gloo, one thread each);
    asserts it exits 0, showing its stderr tail otherwise."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}",
           str(repo / "train.py"), *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    env.pop("WORLD_SIZE", None)
    r = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd)}\n--- stderr\n{r.stderr[-4000:]}"


def assert_same_training(losses_a: list[float], losses_b: list[float], tensors_a: dict[str, torch.Tensor],
                         tensors_b: dict[str, torch.Tensor], lr: float, steps: int) -> None:
    """Two runs of one training: losses within 1e-4 relative; every trained tensor within 2·lr per step, the
    bound of Adam turning rounding-level differences of near-zero gradients into ±lr steps (a zero-initialised
    LoRA B is all such steps, so no relative check)."""
    assert len(losses_a) == len(losses_b) == steps, (losses_a, losses_b)
    assert max(abs(x - y) / abs(y) for x, y in zip(losses_a, losses_b)) < 1e-4, (losses_a, losses_b)
    assert tensors_a.keys() == tensors_b.keys()
    for k in tensors_a:
        assert (tensors_a[k].float() - tensors_b[k].float()).abs().max() <= 2 * steps * lr, k
