"""trainer.sampling: the scheduler maths against diffusers, determinism, guidance, networks, files."""
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler
from PIL import Image

from trainer.diffusion import scaled_linear_alphas_cumprod
from trainer.models.families import Family, ModelInfo
from trainer.models.loading import Components
from trainer.models.prompts import encode_prompts
from trainer.models.tiny import tiny_components
from trainer.networks import Network
from trainer.sampling import (
    ddim_step, ddim_timesteps, euler_sigmas, generate, initial_noise, make_grid, save_grid, save_images,
)

SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _ddim(prediction="epsilon"):
    return DDIMScheduler(**SD_SCHEDULE, timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False,
                         prediction_type=prediction)


def _euler(prediction="epsilon"):
    return EulerDiscreteScheduler(**SD_SCHEDULE, timestep_spacing="linspace", prediction_type=prediction)


@pytest.fixture(scope="module")
def tiny():
    return tiny_components(0)


def _close(a, b, rtol=1e-5):
    """Equal up to float32 rounding, relative to the size of the values."""
    return float((a - b).abs().max()) <= rtol * max(1.0, float(b.abs().max()))


# ---------------------------------------------------------------- scheduler maths


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_ddim_step_equals_diffusers(prediction):
    sched = _ddim(prediction)
    sched.set_timesteps(20)
    ab = scaled_linear_alphas_cumprod()
    assert torch.allclose(sched.alphas_cumprod.double(), ab, rtol=1e-6)
    ts = ddim_timesteps(20)
    assert ts == sched.timesteps.tolist() == list(range(999, 0, -50))
    g = torch.Generator().manual_seed(0)
    for i, t in enumerate(ts):
        x = torch.randn(2, 4, 8, 8, generator=g) * 3
        out = torch.randn(2, 4, 8, 8, generator=g)
        want = sched.step(out, t, x).prev_sample
        ab_prev = float(ab[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        got = ddim_step(out, x, float(ab[t]), ab_prev, v_prediction=prediction == "v_prediction")
        assert _close(got, want), (t, float((got - want).abs().max()))


def test_euler_sigmas_equal_diffusers():
    sched = _euler()
    sched.set_timesteps(15)
    ts, sigmas = euler_sigmas(scaled_linear_alphas_cumprod(), 15)
    assert torch.allclose(ts.float(), sched.timesteps.float(), atol=1e-4)
    assert torch.allclose(sigmas.float(), sched.sigmas.float(), rtol=1e-4)  # diffusers computes in float32
    assert float(sched.init_noise_sigma) == pytest.approx(float(sigmas[0]), rel=1e-5)


def test_timesteps_for_steps_that_do_not_divide_1000():
    ts = ddim_timesteps(30)
    assert len(ts) == 30 and ts[0] == 999 and ts == sorted(set(ts), reverse=True) and ts[-1] >= 0
    with pytest.raises(ValueError):
        ddim_timesteps(0)


def _diffusers_loop(comps, sched, prompts, negative, guidance, seed, steps, added=None):
    """Reference: the textbook diffusers sampling loop with classifier-free guidance."""
    sched.set_timesteps(steps)
    x = initial_noise(len(prompts), (4, 8, 8), seed) * sched.init_noise_sigma
    with torch.no_grad():
        cond = encode_prompts(comps, prompts).hidden
        hidden = torch.cat([encode_prompts(comps, [negative] * len(prompts)).hidden, cond])
        for t in sched.timesteps:
            inp = sched.scale_model_input(torch.cat([x, x]), t)
            kw = {"added_cond_kwargs": added} if added is not None else {}
            out = comps.unet(inp, t, encoder_hidden_states=hidden, **kw).sample
            uncond, c = out.chunk(2)
            x = sched.step(uncond + guidance * (c - uncond), t, x).prev_sample
    return x


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
@pytest.mark.parametrize("v_pred", [False, True])
def test_generate_follows_the_diffusers_loop(tiny, scheduler, v_pred):
    comps = Components(**{**tiny.__dict__, "info": ModelInfo(Family.SD1, v_pred)})
    prompts = ["red circle", "blue square"]
    prediction = "v_prediction" if v_pred else "epsilon"
    sched = _ddim(prediction) if scheduler == "ddim" else _euler(prediction)
    want = _diffusers_loop(comps, sched, prompts, "grey", 3.0, seed=7, steps=8)
    got = generate(comps, prompts, negative_prompt="grey", guidance=3.0, seed=7, steps=8, scheduler=scheduler,
                   decode=False)
    assert _close(got, want, rtol=2e-5), float((got - want).abs().max())


# ---------------------------------------------------------------- behaviour


def test_images_shape_range_and_determinism(tiny):
    a = generate(tiny, ["red circle", "blue square"], steps=4, seed=3)
    b = generate(tiny, ["red circle", "blue square"], steps=4, seed=3)
    c = generate(tiny, ["red circle", "blue square"], steps=4, seed=4)
    assert a.shape == (2, 3, 64, 64) and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


def test_an_image_does_not_depend_on_its_batch(tiny):
    both = generate(tiny, ["red circle", "blue square"], steps=4, seed=3, decode=False)
    second = generate(tiny, ["blue square"], steps=4, seed=4, decode=False)  # image i uses seed + i
    assert _close(both[1:], second, rtol=1e-4)


def test_size_is_chosen_and_checked(tiny):
    assert generate(tiny, "red", steps=2, height=32, width=48).shape == (1, 3, 32, 48)
    with pytest.raises(ValueError, match="multiples of 8"):
        generate(tiny, "red", steps=2, height=60, width=64)
    with pytest.raises(ValueError, match="scheduler"):
        generate(tiny, "red", steps=2, scheduler="plms")
    with pytest.raises(ValueError, match="negative_prompt"):
        generate(tiny, ["a", "b", "c"], negative_prompt=["x", "y"], steps=2)


def test_guidance_one_is_the_conditional_prediction_alone(tiny):
    a = generate(tiny, ["red circle"], guidance=1.0, negative_prompt="", steps=5, decode=False)
    b = generate(tiny, ["red circle"], guidance=1.0, negative_prompt="blue square", steps=5, decode=False)
    assert torch.equal(a, b)  # the unconditional branch is not even computed
    # the conditional-only DDIM loop, written out
    ab = scaled_linear_alphas_cumprod()
    ts = ddim_timesteps(5)
    x = initial_noise(1, (4, 8, 8), 0)
    with torch.no_grad():
        hidden = encode_prompts(tiny, ["red circle"]).hidden
        for i, t in enumerate(ts):
            eps = tiny.unet(x, torch.tensor([t]), encoder_hidden_states=hidden).sample
            x = ddim_step(eps, x, float(ab[t]), float(ab[ts[i + 1]]) if i + 1 < len(ts) else 1.0)
    assert _close(a, x)
    c = generate(tiny, ["red circle"], guidance=4.0, negative_prompt="blue square", steps=5, decode=False)
    assert (c - a).abs().max() > 1e-2


def test_long_prompts_are_chunked_and_padded(tiny):
    long = "red circle, " * 40  # more than 75 tokens: two chunks against a one-chunk negative
    img = generate(tiny, [long, "blue"], negative_prompt="grey", steps=2)
    assert img.shape == (2, 3, 64, 64) and torch.isfinite(img).all()


def _lora(comps, seed=0):
    net = Network.create(comps.unet, comps.text_encoders, rank=4, alpha=4)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_up" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return net


def test_networks_are_applied_for_the_call_and_removed_after(tiny):
    net = _lora(tiny)
    base = generate(tiny, "red circle", steps=4)
    with_lora = generate(tiny, "red circle", steps=4, networks=net)
    assert not net.applied
    assert (with_lora - base).abs().mean() > 1e-3
    assert torch.equal(generate(tiny, "red circle", steps=4), base)  # the model is as it was
    assert torch.equal(generate(tiny, "red circle", steps=4, networks=[(net, 1.0)]), with_lora)
    assert torch.allclose(generate(tiny, "red circle", steps=4, networks=[(net, 0.0)]), base, atol=1e-6)
    half = generate(tiny, "red circle", steps=4, networks=(net, 0.5))
    assert 1e-4 < (half - base).abs().mean() and net.current_multiplier == (1.0, 1.0)


def test_an_applied_network_stays_applied(tiny):
    net = _lora(tiny, seed=1)
    with net.apply():
        inside = generate(tiny, "blue square", steps=3, networks=[net])
        assert net.applied
        assert torch.equal(generate(tiny, "blue square", steps=3), inside)
    assert torch.equal(generate(tiny, "blue square", steps=3, networks=net), inside)


def _tiny_sdxl(tiny):
    """Tiny SDXL-shaped parts: two small text encoders (pooled 16) and a U-Net with text_time embedding."""
    from diffusers import UNet2DConditionModel

    from trainer.models.configs import CLIP_TEXT, CLIP_TEXT_PROJ, build_text_encoder
    from trainer.models.tokenizer import clip_tokenizer

    def te(hidden, cls, proj, seed):
        torch.manual_seed(seed)
        cfg = dict(vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                   num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu", projection_dim=proj,
                   bos_token_id=49406, eos_token_id=49407, pad_token_id=0)
        return build_text_encoder(cfg, cls).eval()

    torch.manual_seed(3)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=8,
        cross_attention_dim=16 + 24, attention_head_dim=2, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8,
    ).eval()
    return Components(info=ModelInfo(Family.SDXL, False), unet=unet, vae=tiny.vae,
                      text_encoders=[te(16, CLIP_TEXT, 16, 1), te(24, CLIP_TEXT_PROJ, 16, 2)],
                      tokenizers=[clip_tokenizer("<|endoftext|>"), clip_tokenizer("!")], scaling_factor=0.13,
                      name="tiny-sdxl")


def test_sdxl_gets_pooled_embeddings_and_size_ids(tiny):
    comps = _tiny_sdxl(tiny)
    prompts = ["red circle", "blue"]
    with torch.no_grad():
        pooled = encode_prompts(comps, prompts).pooled
        neg_pooled = encode_prompts(comps, ["", ""]).pooled
    ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]]).expand(4, -1)
    added = {"text_embeds": torch.cat([neg_pooled, pooled]), "time_ids": ids}
    want = _diffusers_loop(comps, _ddim(), prompts, "", 2.0, seed=0, steps=4, added=added)
    got = generate(comps, prompts, guidance=2.0, steps=4, decode=False)
    assert _close(got, want, rtol=2e-5)
    # explicit added_cond_kwargs (one row per prompt) are used as given, for both branches
    other = {"text_embeds": pooled, "time_ids": torch.tensor([[128.0, 32, 0, 0, 128, 32]]).expand(2, -1)}
    changed = generate(comps, prompts, guidance=2.0, steps=4, decode=False, added_cond_kwargs=other)
    assert (changed - got).abs().max() > 1e-4


# ---------------------------------------------------------------- files


def test_save_images_and_grid(tmp_path):
    imgs = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    paths = save_images(imgs, tmp_path / "s", prefix="x")
    assert [p.name for p in paths] == [f"x_{i:03d}.png" for i in range(5)]
    back = np.asarray(Image.open(paths[2]))
    assert back.shape == (16, 16, 3)
    assert np.abs(back / 255.0 - imgs[2].permute(1, 2, 0).numpy()).max() <= 0.5 / 255 + 1e-6
    grid = save_grid(imgs, tmp_path / "g.png", nrow=3, pad=2, scale=2)
    assert Image.open(grid).size == (3 * (32 + 2) + 2, 2 * (32 + 2) + 2)
    labelled = make_grid(imgs, nrow=5, labels=["a"] * 5)
    assert labelled.size[1] > 16 + 4
    assert not list(tmp_path.glob("**/*.tmp"))
