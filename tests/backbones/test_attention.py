import pytest
import torch

from backbones.attention import attention, get_attention_backend, set_attention_backend


def test_sdpa_matches_reference_with_key_padding():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 5, 3, 8) for _ in range(3))
    k_lens = torch.tensor([5, 3])
    out = attention(q, k, v, k_lens=k_lens)
    for b in range(2):
        n = int(k_lens[b])
        s = torch.einsum("qhd,khd->hqk", q[b], k[b, :n]) / 8 ** 0.5
        ref = torch.einsum("hqk,khd->qhd", s.softmax(-1), v[b, :n])
        torch.testing.assert_close(out[b], ref, rtol=1e-5, atol=1e-5)


def test_backend_choice_is_validated():
    assert get_attention_backend() == "auto"
    with pytest.raises(ValueError, match="flash"):
        set_attention_backend("flash")
    try:
        import xformers.ops  # noqa: F401
    except Exception:
        with pytest.raises(ValueError, match="not installed"):
            set_attention_backend("xformers")
    set_attention_backend("sdpa")
    set_attention_backend("auto")
