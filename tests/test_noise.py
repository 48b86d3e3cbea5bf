"""Noise injection: statistics, device/dtype, determinism and the inference-side shift."""

from __future__ import annotations

import math

import pytest
import torch

from capdec.errors import InputError
from capdec.noise import NoiseConfig, add_noise, expected_cosine, normalize, shift_embeddings


def unit(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("d,var", [(128, 0.016), (512, 0.016), (512, 0.001), (640, 0.1)])
def test_expected_cosine_between_clean_and_noisy(d, var):
    t = unit(4000, d)
    noisy = add_noise(t, NoiseConfig(variance=var), generator=torch.Generator().manual_seed(1))
    cos = (t * noisy).sum(-1)
    assert cos.mean().item() == pytest.approx(expected_cosine(d, var), abs=0.01)
    assert torch.allclose(noisy.norm(dim=-1), torch.ones(len(t)), atol=1e-5)


def test_gaussian_noise_has_the_requested_variance():
    cfg = NoiseConfig(variance=0.04, normalize=False)
    t = torch.zeros(2000, 256)
    n = add_noise(t, cfg, generator=torch.Generator().manual_seed(0))
    assert n.var().item() == pytest.approx(0.04, rel=0.02)
    assert n.mean().abs().item() < 0.002


def test_uniform_ball_noise_stays_in_the_ball_and_fills_it():
    eps = 0.3
    cfg = NoiseConfig(variance=eps**2, distribution="uniform", normalize=False)
    n = add_noise(torch.zeros(5000, 64), cfg, generator=torch.Generator().manual_seed(0))
    r = n.norm(dim=-1)
    assert r.max().item() <= eps + 1e-6
    # radius of a uniform point in a d-ball: P(r < R·q) = q^d, so the median radius is R·0.5^(1/d)
    assert r.median().item() == pytest.approx(eps * 0.5 ** (1 / 64), rel=0.01)


def test_zero_variance_is_only_normalisation():
    t = torch.randn(10, 32) * 3
    assert torch.allclose(add_noise(t, NoiseConfig(variance=0.0)), normalize(t))


def test_offset_moves_embeddings_toward_it():
    t = unit(500, 64)
    offset = normalize(torch.randn(64)) * 0.5
    out = add_noise(t, NoiseConfig(variance=0.0, offset=offset.tolist()))
    assert (out @ normalize(offset)).mean() > (t @ normalize(offset)).mean() + 0.2
    with pytest.raises(InputError, match="dimension"):
        add_noise(t, NoiseConfig(variance=0.0, offset=[0.0] * 10))


def test_centering_subtracts_the_mean():
    t = unit(300, 16) + 2.0
    cfg = NoiseConfig(variance=0.0, center=True, text_mean=t.mean(0).tolist())
    out = add_noise(t, cfg)
    assert out.mean(0).norm() < normalize(t).mean(0).norm() * 0.5


def test_device_dtype_follow_input_and_generator_makes_it_reproducible():
    t = unit(8, 32).half()
    a = add_noise(t, NoiseConfig(), generator=torch.Generator().manual_seed(5))
    b = add_noise(t, NoiseConfig(), generator=torch.Generator().manual_seed(5))
    c = add_noise(t, NoiseConfig(), generator=torch.Generator().manual_seed(6))
    assert a.dtype == torch.float16 and a.device == t.device
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_shift_embeddings_is_normalise_shift_normalise():
    v = unit(20, 32) * 4
    shift = torch.randn(32) * 0.1
    out = shift_embeddings(v, shift=shift)
    assert torch.allclose(out, normalize(normalize(v) + shift), atol=1e-6)
    mean = v.mean(0)
    assert torch.allclose(shift_embeddings(v, mean=mean), normalize(v - mean), atol=1e-6)


def test_bad_configs_are_refused():
    with pytest.raises(InputError):
        NoiseConfig(variance=-1)
    with pytest.raises(InputError):
        NoiseConfig(variance=math.nan)
    with pytest.raises(InputError):
        NoiseConfig(distribution="laplace")
