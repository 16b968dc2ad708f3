"""The attention seam: SDPA numerics, which kernel a call runs, and how a missing or broken xformers is told.

xformers is faked (a module in sys.modules, or a package on sys.path whose import fails), and the CUDA test
is injected through `choose_backend`, so every path runs on a CPU.
"""
from __future__ import annotations

import logging
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import backbones.attention as seam
from backbones.attention import attention, choose_backend, get_attention_backend, set_attention_backend


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """The seam with its xformers probe, warning flag and backend reset (restored afterwards)."""
    monkeypatch.setattr(seam, "_XFORMERS", None)
    monkeypatch.setattr(seam, "_XFORMERS_ERROR", None)
    monkeypatch.setattr(seam, "_WARNED_BROKEN", False)
    monkeypatch.setattr(seam, "_BACKEND", "auto")
    return seam


@pytest.fixture
def fake_xformers(fresh: types.ModuleType, monkeypatch: pytest.MonkeyPatch) -> list[tuple[torch.Tensor, ...]]:
    """An importable `xformers.ops` whose memory_efficient_attention records its arguments and computes
    softmax attention on [B, L, H, D] by hand (not through SDPA, which the tests count). Returns the list
    of recorded calls."""
    calls: list[tuple[torch.Tensor, ...]] = []

    def memory_efficient_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                   scale: float | None = None) -> torch.Tensor:
        calls.append((q, k, v))
        s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * (scale or q.shape[-1] ** -0.5)
        return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v.float()).to(q.dtype)

    pkg, ops = types.ModuleType("xformers"), types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = memory_efficient_attention  # type: ignore[attr-defined]
    pkg.ops = ops  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "xformers", pkg)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    return calls


@pytest.fixture
def sdpa_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """Shapes of q in every torch SDPA call made through the seam."""
    shapes: list[tuple[int, ...]] = []
    real = F.scaled_dot_product_attention

    def recording(q: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        shapes.append(tuple(q.shape))
        return real(q, *args, **kwargs)

    monkeypatch.setattr(seam.F, "scaled_dot_product_attention", recording)
    return shapes


class _Absent:
    """A meta-path finder for which `package` does not exist."""

    def __init__(self, package: str) -> None:
        self.package = package

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name == self.package or name.startswith(self.package + "."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


def _qkv(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(2, 5, 3, 8, generator=g).to(dtype) for _ in range(3))  # [B=2, L=5, H=3, D=8]


def test_sdpa_matches_reference_with_key_padding(sdpa_calls: list[tuple[int, ...]]) -> None:
    q, k, v = _qkv()
    k_lens = torch.tensor([5, 3])
    out = attention(q, k, v, k_lens=k_lens)
    for b in range(2):
        n = int(k_lens[b])
        s = torch.einsum("qhd,khd->hqk", q[b], k[b, :n]) / 8 ** 0.5
        ref = torch.einsum("hqk,khd->qhd", s.softmax(-1), v[b, :n])
        torch.testing.assert_close(out[b], ref, rtol=1e-5, atol=1e-5)
    assert sdpa_calls == [(2, 3, 5, 8)]  # SDPA really ran, on [B, H, L, D]
    assert seam.last_backend() == "sdpa"


def test_auto_picks_xformers_only_for_cuda_half_unpadded(fake_xformers: list) -> None:
    half = (torch.float16, torch.bfloat16)
    for dtype in half:
        assert choose_backend(is_cuda=True, dtype=dtype, padded=False) == "xformers"
        assert choose_backend(is_cuda=True, dtype=dtype, padded=False, backend="xformers") == "xformers"
        assert choose_backend(is_cuda=True, dtype=dtype, padded=True) == "sdpa"       # key padding
        assert choose_backend(is_cuda=False, dtype=dtype, padded=False) == "sdpa"     # CPU
        assert choose_backend(is_cuda=True, dtype=dtype, padded=False, backend="sdpa") == "sdpa"
    assert choose_backend(is_cuda=True, dtype=torch.float32, padded=False) == "sdpa"
    # without xformers, the same eligible call goes to SDPA
    seam._XFORMERS = False
    assert choose_backend(is_cuda=True, dtype=torch.bfloat16, padded=False) == "sdpa"


def test_xformers_path_gets_blhd_tensors(fake_xformers: list, sdpa_calls: list,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """With the device test forced to CUDA, a bf16 call really reaches memory_efficient_attention with the
    seam's own [B, L, H, D] tensors (L=5 != H=3, so a transposed layout would show) and returns its output;
    a padded call of the same kind goes to SDPA instead."""
    real = seam.choose_backend
    monkeypatch.setattr(seam, "choose_backend", lambda **kw: real(**{**kw, "is_cuda": True}))
    q, k, v = _qkv(torch.bfloat16)
    out = attention(q, k, v)
    assert len(fake_xformers) == 1 and sdpa_calls == []
    fq, fk, fv = fake_xformers[0]
    assert fq is q and fk is k and fv is v and fq.shape == (2, 5, 3, 8)
    assert seam.last_backend() == "xformers"
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)  # the fake's output, in [B, L, H, D]
    sdpa_calls.clear()
    attention(q, k, v, k_lens=torch.tensor([5, 4]))
    assert len(fake_xformers) == 1 and sdpa_calls == [(2, 3, 5, 8)] and seam.last_backend() == "sdpa"


def test_cpu_calls_take_sdpa_even_with_xformers_installed(fake_xformers: list, sdpa_calls: list) -> None:
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = _qkv(dtype)
        attention(q, k, v)
    assert fake_xformers == [] and sdpa_calls == [(2, 3, 5, 8)] * 2 and seam.last_backend() == "sdpa"


def test_backend_choice_is_validated(fresh: types.ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    assert get_attention_backend() == "auto"
    with pytest.raises(ValueError, match="flash"):
        set_attention_backend("flash")
    # not installed, even on a machine where it is: the import fails as it does when nothing is found
    monkeypatch.setattr(sys, "meta_path", [_Absent("xformers"), *sys.meta_path])
    for name in ("xformers", "xformers.ops"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.raises(ValueError, match="xformers is not installed"):
        set_attention_backend("xformers")
    assert get_attention_backend() == "auto"
    set_attention_backend("sdpa")
    assert get_attention_backend() == "sdpa"
    set_attention_backend("auto")


@pytest.mark.parametrize("body,shown", [
    ('raise ImportError("libxformers_C.so: cannot open shared object file")', "ImportError: libxformers_C.so"),
    ('raise RuntimeError("xformers was built for torch 2.1")', "RuntimeError: xformers was built for torch 2.1"),
    ("import triton_missing_for_the_test", "No module named 'triton_missing_for_the_test'"),
])
def test_broken_xformers_is_reported_not_called_missing(body: str, shown: str, fresh: types.ModuleType,
                                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """An installed xformers whose import fails names the failure; auto warns once and runs SDPA."""
    pkg = tmp_path / "xformers"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(body + "\n")
    (pkg / "ops.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("xformers", "xformers.ops"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.raises(ValueError, match="installed but failed to import") as err:
        set_attention_backend("xformers")
    assert shown in str(err.value) and "not installed" not in str(err.value)
    with caplog.at_level(logging.WARNING, logger=seam.__name__):
        for _ in range(3):
            assert choose_backend(is_cuda=True, dtype=torch.bfloat16, padded=False) == "sdpa"
    warnings = [r for r in caplog.records if "failed to import" in r.getMessage()]
    assert len(warnings) == 1 and shown in warnings[0].getMessage()
