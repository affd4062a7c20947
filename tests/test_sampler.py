"""The sampler's math: DDIM equivalence, oracle reconstructions, conditioning, determinism."""

import math

import pytest
import torch
from diffusers import DDIMScheduler

from cgdiff.model import build_scheduler, build_unet
from cgdiff.sampler import SamplerConfig, gaussian_blur, reconstruct, repaint, suspect_mask, timesteps

ABAR = build_scheduler().alphas_cumprod


def smooth_eps_model(seed=0):
    """A fixed, deterministic, non-trivial noise model (a random conv with a t-dependence)."""
    g = torch.Generator().manual_seed(seed)
    conv = torch.nn.Conv2d(3, 3, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.2)
        conv.bias.zero_()

    def eps(x, t):
        with torch.no_grad():
            return torch.tanh(conv(x)) * (0.5 + t.float().view(-1, 1, 1, 1) / 2000)

    return eps


def oracle(clean):
    """The exact noise model for data that is always `clean`."""

    def eps(x, t):
        a = ABAR[t].view(-1, 1, 1, 1).to(x.dtype)
        return (x - a.sqrt() * clean) / (1 - a).sqrt()

    return eps


def gaussian_prior(mean, var=0.01):
    """The exact (MMSE) noise model for data ~ N(mean, var) per pixel: it trusts x_t only where
    the noise is small against var, so unlike the oracle its output depends on the path."""

    def eps(x, t):
        a = ABAR[t].view(-1, 1, 1, 1).to(x.dtype)
        x0 = mean + a.sqrt() * var / (a * var + 1 - a) * (x - a.sqrt() * mean)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

    return eps


def test_schedule_evenly_spaced_from_t0_to_zero():
    assert timesteps(250, 10, 1000) == [250, 222, 194, 167, 139, 111, 83, 56, 28, 0]
    assert timesteps(900, 10, 1000) == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    assert timesteps(5000, 4, 1000) == [999, 666, 333, 0]  # t0 >= T: from the last step
    assert timesteps(3, 10, 1000) == [3, 2, 1, 0]  # never repeats a step
    assert timesteps(250, 1, 1000) == [250]


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_without_conditioning_and_guidance_it_is_diffusers_ddim(eta):
    """w = 0, s = 0: the sampler must step exactly like diffusers' DDIMScheduler."""
    torch.manual_seed(0)
    y = torch.rand(2, 3, 16, 16) * 1.6 - 0.8
    eps = smooth_eps_model()
    cfg = SamplerConfig(t0=900, steps=10, w=0.0, guidance_scale=0.0, eta=eta, seed=7)
    ours = reconstruct(eps, y, ABAR, cfg)

    ddim = DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                         clip_sample=False, set_alpha_to_one=True, prediction_type="epsilon")
    ddim.set_timesteps(10)
    assert ddim.timesteps.tolist() == timesteps(900, 10, 1000)
    gens = [torch.Generator().manual_seed(7) for _ in range(2)]
    draw = lambda: torch.stack([torch.randn(y.shape[1:], generator=g) for g in gens])  # noqa: E731
    a0 = ABAR[900]
    x = a0.sqrt() * y + (1 - a0).sqrt() * draw()
    for t in ddim.timesteps:
        tb = torch.full((2,), int(t))
        e = eps(x, tb)
        is_last = int(t) == 0
        noise = torch.zeros_like(x) if (eta == 0 or is_last) else draw()
        x = ddim.step(e, int(t), x, eta=eta, variance_noise=noise).prev_sample
    torch.testing.assert_close(ours, x.clamp(-1, 1), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("t0", [250, 999, 1000])
@pytest.mark.parametrize("w", [0.0, 3.0])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_oracle_noise_model_returns_the_clean_image(t0, w, eta):
    torch.manual_seed(1)
    clean = torch.rand(2, 3, 16, 16) * 1.8 - 0.9
    cfg = SamplerConfig(t0=t0, steps=10, w=w, guidance_scale=0.0, eta=eta, seed=3)
    out = reconstruct(oracle(clean), clean, ABAR, cfg)
    torch.testing.assert_close(out, clean, atol=1e-4, rtol=1e-4)


def test_blur_guidance_follows_its_formula():
    flat = torch.full((1, 3, 16, 16), 0.3)
    cfg = SamplerConfig(t0=250, steps=5, w=0.0, guidance_scale=1.0, blur_sigma=1.0)
    torch.testing.assert_close(reconstruct(oracle(flat), flat, ABAR, cfg), flat, atol=1e-4, rtol=1e-4)

    # Guided x0 = A + s (blur(A) - B), with A the x0 estimate at x_t and B the model's x0
    # estimate at the blurred x_tb. An oracle restores the blur completely (B = A), so the
    # guidance moves the estimate by s (blur(x0) - x0); a model that keeps the blur (B =
    # blur(A)) is left unchanged. Checked in one step, where the estimate is the output.
    stripes = torch.zeros(1, 3, 16, 16)
    stripes[..., ::4, :] = 0.5
    for s in (0.5, 1.0):
        out = reconstruct(oracle(stripes), stripes, ABAR, cfg.replace(steps=1, guidance_scale=s))
        expected = (stripes + s * (gaussian_blur(stripes, 1.0) - stripes)).clamp(-1, 1)
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)

    def keeps_blur(x, t):  # predicts the same noise whatever the content: B = blur(A)
        return torch.zeros_like(x)

    plain = reconstruct(keeps_blur, stripes, ABAR, cfg.replace(guidance_scale=0.0))
    guided = reconstruct(keeps_blur, stripes, ABAR, cfg.replace(guidance_scale=2.0))
    torch.testing.assert_close(plain, guided)


def test_conditioning_pulls_the_reconstruction_toward_the_input():
    torch.manual_seed(2)
    normal = torch.rand(1, 3, 16, 16) * 1.0 - 0.5
    defective = normal.clone()
    defective[..., 4:10, 4:10] = 0.9  # a bright defect the model has never seen
    distances = []
    gap = (normal - defective).abs().mean().item()
    for w in (0.0, 1.0, 3.0, 8.0):
        cfg = SamplerConfig(t0=400, steps=10, w=w, guidance_scale=0.0, seed=0)
        out = reconstruct(gaussian_prior(normal), defective, ABAR, cfg)
        distances.append((out - defective).abs().mean().item())
    # w = 0 removes most of the defect ...
    assert distances[0] > 0.7 * gap
    # ... and each larger w copies clearly more of the input back.
    assert all(a > 1.02 * b for a, b in zip(distances, distances[1:])), distances
    assert distances[-1] < 0.6 * distances[0]


def test_partial_start_keeps_more_of_the_input_than_pure_noise():
    torch.manual_seed(3)
    y = torch.rand(1, 3, 16, 16) * 2 - 1
    prior = gaussian_prior(torch.zeros_like(y), var=0.05)  # a model of a flat texture
    gaps = {}
    for t0 in (100, 250, 1000):
        out = reconstruct(prior, y, ABAR, SamplerConfig(t0=t0, steps=10, w=0.0, guidance_scale=0))
        gaps[t0] = (out - y).abs().mean().item()
    assert gaps[100] < gaps[250] < gaps[1000], gaps


def test_deterministic_for_a_seed_and_independent_of_the_batch():
    torch.manual_seed(0)
    unet = build_unet("tiny", sample_size=32).eval()
    eps = lambda x, t: unet(x, t).sample  # noqa: E731
    y = torch.rand(3, 3, 32, 32) * 2 - 1
    cfg = SamplerConfig(t0=250, steps=3, w=3.0, guidance_scale=0.5, eta=1.0, seed=11)
    a = reconstruct(eps, y, ABAR, cfg)
    b = reconstruct(eps, y, ABAR, cfg)
    assert torch.equal(a, b)
    alone = reconstruct(eps, y[1:2], ABAR, cfg)
    torch.testing.assert_close(alone, a[1:2], atol=1e-5, rtol=1e-4)
    other_seed = reconstruct(eps, y, ABAR, cfg.replace(seed=12))
    assert not torch.allclose(a, other_seed)


def test_model_calls_per_strategy():
    calls = []

    def counting(x, t):
        calls.append(int(t[0]))
        return torch.zeros_like(x)

    y = torch.zeros(1, 3, 8, 8)
    reconstruct(counting, y, ABAR, SamplerConfig(steps=10, guidance_scale=0.5))
    assert len(calls) == 20 == SamplerConfig(steps=10, guidance_scale=0.5).model_calls()
    calls.clear()
    reconstruct(counting, y, ABAR, SamplerConfig(steps=10, guidance_scale=0.0))
    assert len(calls) == 10


@pytest.mark.parametrize(
    "bad",
    [dict(t0=-1), dict(t0=0), dict(steps=0), dict(w=-1.0), dict(w=math.nan), dict(guidance_scale=-0.1),
     dict(blur_sigma=0.0), dict(eta=2.0), dict(samples=0), dict(samples=1.5), dict(repaint_t0=-1),
     dict(repaint_steps=0)],
)
def test_bad_settings_are_refused_with_a_message(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplerConfig(**bad)


def test_trace_shows_each_step_without_changing_the_result():
    y = torch.rand(2, 3, 16, 16) * 1.6 - 0.8
    eps = smooth_eps_model()
    cfg = SamplerConfig(t0=250, steps=4, w=2.0, guidance_scale=0.5, seed=3)
    steps = []
    traced = reconstruct(eps, y, ABAR, cfg, trace=steps.append)
    torch.testing.assert_close(traced, reconstruct(eps, y, ABAR, cfg))
    assert [s["t"] for s in steps] == timesteps(250, 4, 1000)
    assert [s["next_t"] for s in steps] == timesteps(250, 4, 1000)[1:] + [-1]
    # The first state is the partial-diffusion start: y noised to t0 with the seed's noise.
    z = torch.stack([torch.randn(y.shape[1:], generator=torch.Generator().manual_seed(3)) for _ in range(2)])
    torch.testing.assert_close(steps[0]["x_t"], ABAR[250].sqrt() * y + (1 - ABAR[250]).sqrt() * z)
    for before, after in zip(steps, steps[1:]):
        assert after["x_t"] is before["x_next"]
    torch.testing.assert_close(steps[-1]["x_next"].clamp(-1, 1), traced)
    assert all(s["x0_blurred"] is not None and s["x0"].shape == y.shape for s in steps)
    no_guidance = []
    reconstruct(eps, y, ABAR, cfg.replace(guidance_scale=0.0), trace=no_guidance.append)
    assert all(s["x0_blurred"] is None for s in no_guidance)


def test_samples_average_runs_from_consecutive_seeds(monkeypatch):
    y = torch.rand(2, 3, 16, 16) * 1.6 - 0.8
    eps = smooth_eps_model()
    cfg = SamplerConfig(t0=250, steps=3, w=1.0, guidance_scale=0.5, seed=5, samples=3)
    runs = [reconstruct(eps, y, ABAR, cfg.replace(samples=1, seed=5 + k)) for k in range(3)]
    assert not torch.allclose(runs[0], runs[1])  # a different start noise per run
    torch.testing.assert_close(reconstruct(eps, y, ABAR, cfg), torch.stack(runs).mean(0))
    # progress counts every step of every run; the trace says which run a step belongs to
    seen, steps = [], []
    reconstruct(eps, y, ABAR, cfg, progress=lambda i, n: seen.append((i, n)), trace=steps.append)
    assert seen == [(3, 9), (6, 9), (9, 9)]  # the three runs share each U-Net call (2 x 3 rows)
    assert [s["sample"] for s in steps] == [0, 1, 2] * 3
    for k in range(3):  # each run's steps, as that run traces them alone
        alone = []
        reconstruct(eps, y, ABAR, cfg.replace(samples=1, seed=5 + k), trace=alone.append)
        for mine, ref in zip([s for s in steps if s["sample"] == k], alone, strict=True):
            assert mine["t"] == ref["t"]
            torch.testing.assert_close(mine["x_next"], ref["x_next"])
    batched = reconstruct(eps, y, ABAR, cfg)
    # images that fill a call alone run one run after another, with the same result
    import cgdiff.sampler

    monkeypatch.setattr(cgdiff.sampler, "MAX_BATCH_PIXELS", 2 * 16 * 16)
    seen = []
    out = reconstruct(eps, y, ABAR, cfg, progress=lambda i, n: seen.append((i, n)))
    assert seen == [(i, 9) for i in range(1, 10)]
    torch.testing.assert_close(out, batched)
    assert cfg.model_calls() == 3 * 2 * 3


def test_samples_is_stored_only_when_it_averages():
    # A config that does not average reads as before the setting existed (older versions load it).
    assert "samples" not in SamplerConfig().to_dict()
    assert SamplerConfig(samples=2).to_dict()["samples"] == 2
    assert SamplerConfig(**SamplerConfig(samples=4).to_dict()) == SamplerConfig(samples=4)
    assert SamplerConfig().replace(samples=2.0).samples == 2


def test_the_second_pass_paints_the_mask_over_and_keeps_the_rest_exactly():
    """RePaint's masked DDIM: with the exact noise model of the clean tile, the masked pixels
    come back clean and every other pixel is the input itself."""
    clean = torch.rand(1, 3, 16, 16) * 1.6 - 0.8
    y = clean.clone()
    y[..., 4:9, 5:11] = 0.9  # the defect
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 3:10, 4:12] = 1.0
    calls, seen = [], []

    def counting_oracle(x, t):
        calls.append(int(t[0]))
        return oracle(clean)(x, t)

    cfg = SamplerConfig(repaint_t0=400, repaint_steps=5, seed=2)
    out = repaint(counting_oracle, y, mask, ABAR, cfg, progress=lambda i, n: seen.append((i, n)))
    torch.testing.assert_close(out[..., mask[0, 0] == 0], y[..., mask[0, 0] == 0], atol=0, rtol=0)
    torch.testing.assert_close(out, clean, atol=1e-4, rtol=0)
    assert calls == timesteps(400, 5, 1000) and seen == [(i, 5) for i in range(1, 6)]
    assert cfg.model_calls() == cfg.replace(repaint_t0=0).model_calls() + 5
    # An empty mask returns the input unchanged; the pass needs t2 > 0.
    torch.testing.assert_close(repaint(smooth_eps_model(), y, torch.zeros_like(mask), ABAR, cfg), y, atol=0, rtol=0)
    with pytest.raises(ValueError, match="off"):
        repaint(smooth_eps_model(), y, mask, ABAR, SamplerConfig())
    # Another start: the masked pixels begin from it, the input is still kept outside.
    model = smooth_eps_model()
    torch.testing.assert_close(repaint(model, y, mask, ABAR, cfg, start=y), repaint(model, y, mask, ABAR, cfg))
    other = repaint(model, y, mask, ABAR, cfg, start=clean)
    torch.testing.assert_close(other[..., mask[0, 0] == 0], y[..., mask[0, 0] == 0], atol=0, rtol=0)
    assert not torch.allclose(other, repaint(model, y, mask, ABAR, cfg))
    with pytest.raises(ValueError, match="shaped as the input"):
        repaint(model, y, mask, ABAR, cfg, start=clean[..., :8])


def test_the_suspect_mask_ramps_with_the_map_and_covers_the_rim():
    relative = torch.zeros(2, 32, 32)
    relative[1, 8:16, 8:16] = 1.2  # above the threshold
    m = suspect_mask(relative)
    assert m.shape == (2, 1, 32, 32) and m.min() >= 0 and m.max() <= 1
    assert m[0].max() == 0  # a map well under the threshold paints nothing
    assert m[1, 0, 12, 12] > 0.99 and m[1, 0, 7, 12] > 0.5  # the defect and its rim
    assert m[1, 0, 0, 0] < 1e-3 and m[1, 0, 28, 28] < 1e-3  # the rest of the tile stays
    assert suspect_mask(torch.full((1, 8, 8), 0.5)).max() == 0
    # Without growing and blurring it is the ramp alone: 0 at `low`, 1 from `high` on.
    ramp = suspect_mask(torch.tensor([[[0.5, 0.7, 0.9, 1.2]]]), low=0.7, high=0.9, grow=0, sigma=0)
    torch.testing.assert_close(ramp, torch.tensor([[[[0.0, 0.0, 1.0, 1.0]]]]))
    assert suspect_mask(relative, grow=0, sigma=0)[1, 0, 7, 12] == 0  # no rim
    for bad in (dict(low=0.9, high=0.9), dict(grow=-1), dict(sigma=-1.0)):
        with pytest.raises(ValueError, match="low < high"):
            suspect_mask(relative, **bad)


def test_the_second_pass_is_stored_only_when_it_is_on():
    assert "repaint_t0" not in SamplerConfig().to_dict() and "repaint_steps" not in SamplerConfig().to_dict()
    on = SamplerConfig(repaint_t0=400, repaint_steps=6)
    assert SamplerConfig(**on.to_dict()) == on
    assert on.model_calls() == SamplerConfig().model_calls() + 6
    assert SamplerConfig(repaint_t0=3, repaint_steps=8).repaint_model_calls() == 4  # no more steps than t2 + 1
