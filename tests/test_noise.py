"""Noise injection: statistics, device/dtype, determinism and the inference-side shift."""

from __future__ import annotations

import math

import pytest
import torch

from capdec.errors import InputError
from capdec.noise import NoiseConfig, add_noise, expected_cosine, gap_noise, normalize, shift_embeddings


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
    # CapDec's released inference: normalise, add the shift, decode as is
    raw = shift_embeddings(v, shift=shift, renormalize_shift=False)
    assert torch.allclose(raw, v / v.norm(dim=-1, keepdim=True) + shift, atol=1e-6)


def gap_config(d: int = 24, r: int = 3, seed: int = 0, **kw) -> NoiseConfig:
    """A gap covariance with a strong low-rank part and an uneven diagonal."""
    g = torch.Generator().manual_seed(seed)
    factor = torch.randn(r, d, generator=g) * 0.2
    diag = torch.rand(d, generator=g) * 0.01
    return NoiseConfig(variance=0.0, shape="gap", gap_factor=factor.tolist(), gap_diag=diag.tolist(), **kw)


def sample_covariance(x: torch.Tensor) -> torch.Tensor:
    x = x.double() - x.double().mean(0)
    return x.T @ x / (len(x) - 1)


def test_gap_noise_has_the_gap_covariance():
    cfg = gap_config()
    factor, diag = torch.tensor(cfg.gap_factor), torch.tensor(cfg.gap_diag)
    n = gap_noise((200_000, 24), factor, diag, like=torch.zeros(1), generator=torch.Generator().manual_seed(1))
    expected = factor.double().T @ factor.double() + torch.diag(diag.double())  # written from the definition
    assert torch.allclose(sample_covariance(n), expected, atol=4e-3)
    assert n.mean(0).abs().max() < 3e-3


def test_gap_shaped_training_input_is_text_plus_offset_plus_scaled_gap_noise():
    """Unnormalised, the training input minus (t + offset) has covariance gap_scale · (FᵀF + diag)."""
    offset = torch.linspace(-0.1, 0.1, 24)
    cfg = gap_config(normalize=False, gap_scale=2.5, offset=offset.tolist())
    t = torch.randn(100_000, 24)
    out = add_noise(t, cfg, generator=torch.Generator().manual_seed(2))
    factor, diag = torch.tensor(cfg.gap_factor).double(), torch.tensor(cfg.gap_diag).double()
    expected = 2.5 * (factor.T @ factor + torch.diag(diag))
    residual = out - t - offset
    assert torch.allclose(sample_covariance(residual), expected, atol=1e-2)
    assert residual.mean(0).abs().max() < 5e-3
    # isotropic noise on top adds variance·I
    both = add_noise(t, NoiseConfig(**{**cfg.to_dict(), "variance": 0.01}), generator=torch.Generator().manual_seed(2))
    extra = sample_covariance(both - t - offset) - expected
    assert torch.allclose(extra, 0.01 * torch.eye(24, dtype=torch.float64), atol=1.5e-2)
    assert extra.diagonal().mean().item() == pytest.approx(0.01, abs=3e-3)  # sampling error of the gap part ~1e-3


def test_gap_noise_needs_its_covariance_and_the_right_dimension():
    with pytest.raises(InputError, match="gap covariance"):
        NoiseConfig(shape="gap")
    with pytest.raises(InputError, match="dimension 24 but embeddings have 32"):
        add_noise(unit(4, 32), gap_config(), generator=torch.Generator().manual_seed(0))
    # a recorded covariance is inert unless the shape says gap
    iso = NoiseConfig(**{**gap_config().to_dict(), "shape": "isotropic", "variance": 0.0})
    t = unit(5, 24)
    assert torch.allclose(add_noise(t, iso, generator=torch.Generator().manual_seed(0)), t, atol=1e-6)


def test_scale_spread_draws_one_scale_per_caption_uniformly():
    """Each row's noise is scaled by s ~ U[1 − spread, 1 + spread]: in high d the row norm gives s away."""
    d, var, spread = 4096, 0.01, 0.8
    cfg = NoiseConfig(variance=var, scale_spread=spread, normalize=False)
    n = add_noise(torch.zeros(3000, d), cfg, generator=torch.Generator().manual_seed(3))
    s = n.norm(dim=-1) / math.sqrt(d * var)  # ≈ the row's scale (relative error ~1/√(2d) ≈ 1 %)
    assert s.min().item() == pytest.approx(1 - spread, abs=0.08)
    assert s.max().item() == pytest.approx(1 + spread, abs=0.08)
    assert s.mean().item() == pytest.approx(1.0, abs=0.03)
    # uniform: a quarter of the rows in each quarter of the range
    quarters = torch.histc(s, bins=4, min=1 - spread, max=1 + spread) / len(s)
    assert torch.allclose(quarters, torch.full((4,), 0.25), atol=0.04)


def test_sample_false_keeps_centre_offset_and_normalisation_only():
    t = unit(50, 24) * 3
    offset = torch.full((24,), 0.05)
    cfg = NoiseConfig(variance=0.5, offset=offset.tolist())
    assert torch.allclose(add_noise(t, cfg, sample=False), normalize(normalize(t) + offset), atol=1e-6)
    shaped = gap_config(offset=offset.tolist(), scale_spread=0.5)
    assert torch.allclose(add_noise(t, shaped, sample=False), normalize(normalize(t) + offset), atol=1e-6)


def test_bad_configs_are_refused():
    with pytest.raises(InputError):
        NoiseConfig(variance=-1)
    with pytest.raises(InputError):
        NoiseConfig(variance=math.nan)
    with pytest.raises(InputError):
        NoiseConfig(distribution="laplace")
    for bad in ({"gap_scale": -1.0}, {"scale_spread": 1.5}, {"shape": "cone"},
                {"gap_diag": [0.1, 0.1]}):
        with pytest.raises(InputError):
            NoiseConfig(**bad)
