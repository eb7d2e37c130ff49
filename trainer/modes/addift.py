"""ADDifT and Multi-ADDifT (spec §3.4, §3.5): learn the difference between an original and a target
image directly, as a slider trained at multipliers +0.25 and -0.25*|r|.

Each step draws one noise eps and one timestep t, shared by both branches. ``diff_timestep_schedule``:
cycle (the default, the original's; its presets were tuned on it): t = lo + (hi - lo)*k/10 for
k = 1, 3, 5, 7, 9 in turn, each value for one +/- pair of steps (``cycle_timestep``); uniform:
t ~ U[lo, hi) every step, one per image. lo, hi = train_min_timesteps, train_max_timesteps. With x_o, x_g the original and target latents, c_o, c_g their conditionings,
eps(x, t, c) the frozen U-Net and eps_{sD} the U-Net with the LoRA at multiplier s:
- odd steps (1, 3, ...), s = +0.25:          a = add_noise(x_o, eps, t), b = add_noise(x_g, eps, t)
- even steps (2, 4, ...), s = -0.25*|r|:     a = add_noise(x_g, eps, t), b = add_noise(x_o, eps, t)
      loss = w(t) * || M * (eps_{sD}(b, t, c_g) - sg[eps(a, t, c_o)]) ||^2   (mean over M)
  r = ``diff_alt_ratio``. r < 0: even steps use the null regulariser of the original: x_o = x_g = eps,
  so the negative direction learns to change nothing on pure noise. r = 0: every step is a + step.
  So with the LoRA at +s, the model's clean-image estimate on the target equals the frozen model's on
  the original plus (x_g - x_o): it adds the difference; at -s it takes it away.
- ``diff_revert_original_target`` swaps the images. ``diff_use_diff_mask``: M = the region where the
  images differ (trainer.data.pairs.difference_mask, at latent resolution, dilated by one latent
  pixel) times the original's alpha mask; without it M = 1 (the original only ever used alpha).
- ``diff_load_1st_pass`` (if set and ``network_resume`` is not) starts the LoRA from that file.

ADDifT (one pair): c_o = c(trigger word, original prompt), c_g = c(trigger word, target prompt),
usually both "". Multi-ADDifT: bucketed pairs from ``lora_data_directory`` (trainer.data.pairs),
each with its caption (trigger word + caption file) as c_o = c_g; each caption is encoded once.
Text-encoder adapters are never made in either mode (the captions do not go through the text
encoder at each step; with an empty trigger word the original dropped BASE for the same reason).
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.cache import LatentCache
from ..data.captions import tag_frequency
from ..data.dataset import BucketBatcher
from ..data.errors import DataError
from ..data.pairs import build_pair_samples, difference_mask, load_image_pair, pair_pixels
from ..engine import Pass
from .base import SizeCond
from .conditioning import PromptEmbeddings, join_prompt
from .difference import encode_pair, find_lora_file

TRAIN_MULTIPLIER = 0.25


def cycle_timestep(step: int, lo: int, hi: int) -> int:
    """The original's ADDifT timestep at ``step`` (1-based): the pair of steps (1, 2), (3, 4), ... number p
    uses lo + (hi - lo)*k/10, k = 1, 3, 5, 7, 9 for p = 0..4, then again. Whole-number arithmetic, so
    (hi - lo)*k/10 rounds down exactly as the original's int(); it stays in [lo, hi), hence below 1000,
    so the original's clamp to 999 never acts."""
    k = 2 * (((step - 1) // 2) % 5) + 1
    return lo + (hi - lo) * k // 10


def latent_alpha(mask: torch.Tensor | None, factor: int = 8) -> torch.Tensor | None:
    """[1,H,W] pixel alpha mask -> [1,H/f,W/f] (a latent pixel counts when most of it is opaque)."""
    if mask is None:
        return None
    return (F.avg_pool2d(mask[None].float(), factor)[0] > 0.5).float()


def loss_mask(original: torch.Tensor, target: torch.Tensor, alpha: torch.Tensor | None, warn,
              what: str) -> torch.Tensor | None:
    """The ADDifT loss mask of one pair ([1,h,w] at latent resolution), None = everywhere."""
    mask = difference_mask(original, target)
    if alpha is not None:
        mask = mask * latent_alpha(alpha)
    if not bool(mask.any()):
        warn(f"diff_use_diff_mask: {what} has no differing region; its loss is not masked")
        return None
    return mask


class _ADDifTObjective:
    """The alternating +/- step shared by ADDifT and Multi-ADDifT."""

    def setup(self, run, cfg) -> None:
        self.run, self.cfg = run, cfg
        self.ratio = float(cfg.diff_alt_ratio)
        self.trace: list[tuple[int, float, torch.Tensor]] = []  # (step, multiplier, timesteps), for tests

    def pass_cfg(self, run, cfg):
        if cfg.diff_load_1st_pass.strip() and not cfg.network_resume:
            path = find_lora_file(cfg.diff_load_1st_pass, run.paths.lora_dir)
            run.log(f"diff_load_1st_pass: training starts from {path}")
            return cfg.replace(network_resume=str(path))
        return cfg

    def pair_loss(self, step: int, x_o, x_g, cond_o, cond_g, mask) -> torch.Tensor:
        run, cfg = self.run, self.cfg
        positive = self.ratio == 0 or step % 2 == 1
        noise = run.randn(x_o.shape)
        if cfg.diff_timestep_schedule == "cycle":  # one t for the whole batch, as in the original
            t = run.to_device(torch.full((x_o.shape[0],), cycle_timestep(step, cfg.train_min_timesteps,
                                                                         cfg.train_max_timesteps), dtype=torch.long))
        else:
            t = run.timesteps(x_o.shape[0], cfg)
        if positive:
            mult, a0, b0 = TRAIN_MULTIPLIER, x_o, x_g
        else:
            mult = -TRAIN_MULTIPLIER * abs(self.ratio)
            a0, b0 = (x_g, x_o) if self.ratio > 0 else (noise, noise)
        a = run.schedule.add_noise(a0, noise, t)
        b = run.schedule.add_noise(b0, noise, t)
        with torch.no_grad(), run.network.multiplier(0):
            target = run.predict(a, t, cond_o)
        run.network.set_multiplier(mult)
        pred = run.predict(b, t, cond_g)
        self.trace.append((step, mult, t))  # t stays on the device: no host sync in the step
        return run.step_loss(pred, target, t, cfg, mask)


class ADDifTMode(_ADDifTObjective):
    name = "ADDifT"

    def check(self, cfg) -> None:
        load_image_pair(cfg.original_image, cfg.target_image)

    def passes(self, run):
        cfg = run.cfg
        orig, targ = load_image_pair(cfg.original_image, cfg.target_image)
        self.setup(run, cfg)
        pass_cfg = self.pass_cfg(run, cfg)
        pair = pair_pixels(orig, targ, warn=run.log)
        if torch.equal(pair.original, pair.target):
            run.log("original_image and target_image are identical: there is no difference to learn")
        self.size = pair.size
        mask = None
        if cfg.diff_use_diff_mask:
            mask = loss_mask(pair.original, pair.target, pair.mask, run.log, "the image pair")
        run.progress(phase="prepare", message="Encoding the images")
        x_o, x_g = encode_pair(run, cfg, pair)
        if cfg.diff_revert_original_target:
            x_o, x_g = x_g, x_o
        b = cfg.train_batch_size
        self.x_o, self.x_g = x_o.expand(b, -1, -1, -1), x_g.expand(b, -1, -1, -1)
        self.mask = mask[None].expand(b, -1, -1, -1).to(run.device) if mask is not None else None
        p_o = join_prompt(cfg.lora_trigger_word, cfg.original_prompt)
        p_g = join_prompt(cfg.lora_trigger_word, cfg.target_prompt)
        prompts = PromptEmbeddings(run, [p_o, p_g], cfg.clip_skip)
        self.cond_o = prompts.cond([p_o] * b, self.size)
        self.cond_g = prompts.cond([p_g] * b, self.size)
        run.summary.update(num_train_images=2, prompts={
            "original image": Path(cfg.original_image).name, "target image": Path(cfg.target_image).name,
            **({"reverted": "yes"} if cfg.diff_revert_original_target else {})})
        yield Pass(pass_cfg, self.loss, cfg.save_lora_name, train_text_encoder=False)

    def sample_prompts(self, cfg) -> list[str]:
        """Default sample prompts: the pair's (often both empty)."""
        return [join_prompt(cfg.lora_trigger_word, cfg.original_prompt), join_prompt(cfg.lora_trigger_word,
                                                                                     cfg.target_prompt)]

    def loss(self, step: int) -> torch.Tensor:
        return self.pair_loss(step, self.x_o, self.x_g, self.cond_o, self.cond_g, self.mask)


class MultiADDifTMode(_ADDifTObjective):
    name = "Multi-ADDifT"

    def check(self, cfg) -> None:
        if not cfg.diff_target_name:
            raise DataError("diff_target_name is empty: set the suffix that marks a pair's target image, e.g. "
                            "--set diff_target_name=_closed for a.png + a_closed.png.")

    def passes(self, run):
        cfg = run.cfg
        self.check(cfg)
        self.setup(run, cfg)
        pass_cfg = self.pass_cfg(run, cfg)
        run.progress(phase="prepare", message=f"Reading image pairs in {cfg.lora_data_directory}")
        samples = build_pair_samples(
            cfg.lora_data_directory, cfg.diff_target_name, image_size=cfg.image_size,
            buckets_step=cfg.image_buckets_step, min_length=cfg.image_min_length, max_ratio=cfg.image_max_ratio,
            num_multiply=cfg.image_num_multiply, sub_image_num=cfg.sub_image_num, mirroring=cfg.image_mirroring,
            disable_upscale=cfg.image_disable_upscale, trigger=cfg.lora_trigger_word,
            use_filename_as_tag=cfg.image_use_filename_as_tag, warn=run.log, check_stop=run.check_stop)
        run.check_stop()
        run.progress(phase="prepare", message=f"Encoding {len(samples)} image pairs")
        cache_dir = run.paths.cache_dir if getattr(cfg, "latent_cache_on_disk", True) else None
        key = f"{run.components.name}|{cfg.train_VAE_precision}|{run.components.scaling_factor}"

        def encode(pixels):
            run.check_stop()  # Stop while caching ends before the next batch
            return run.encode_images(pixels)

        latents = LatentCache(warn=run.log).encode_all(
            [s.original for s in samples] + [s.target for s in samples], encode,
            batch_size=max(1, cfg.train_batch_size), cache_dir=cache_dir, key_extra=key,
            check_stop=run.check_stop)
        run.release_vae()
        on_device: dict[int, torch.Tensor] = {}  # on the device once (repeated samples share one tensor)
        for x in latents:
            if id(x) not in on_device:
                on_device[id(x)] = x.to(run.device)
        latents = [on_device[id(x)] for x in latents]
        n = len(samples)
        self.orig, self.targ = latents[:n], latents[n:]
        if cfg.diff_revert_original_target:
            self.orig, self.targ = self.targ, self.orig
        self.masks = None
        if cfg.diff_use_diff_mask:
            self.masks = []
            for s in samples:
                m = loss_mask(s.original.pixels, s.target.pixels, s.original.mask, run.log,
                              f"the pair {s.original.source.name} + {s.target.source.name}")
                self.masks.append((m if m is not None else torch.ones(1, *self.orig[len(self.masks)].shape[-2:]))
                                  .to(run.device))
        self.captions = [s.caption for s in samples]
        self.buckets = [s.bucket for s in samples]
        self.sizes = [SizeCond(*s.original.size_cond_hw()) for s in samples]  # SDXL: pixels, per sample
        self.prompts = PromptEmbeddings(run, self.captions, cfg.clip_skip)
        self.batcher = BucketBatcher(self.buckets, cfg.train_batch_size, seed=run.seed, warn=run.log)
        run.summary.update(
            num_train_images=len({s.original.source for s in samples}) * 2, num_samples=n,
            tag_frequency={str(cfg.lora_data_directory): tag_frequency(self.captions)},
            buckets=dict(Counter(f"{w}x{h}" for w, h in self.buckets)),
            prompts={"diff target name": cfg.diff_target_name,
                     **({"reverted": "yes"} if cfg.diff_revert_original_target else {})})
        yield Pass(pass_cfg, self.loss, cfg.save_lora_name, train_text_encoder=False)

    def sample_prompts(self, cfg) -> list[str]:
        """Default sample prompts: the first captions of the pairs."""
        return list(self.captions)

    def loss(self, step: int) -> torch.Tensor:
        idx = next(self.batcher)
        x_o = torch.stack([self.orig[i] for i in idx])
        x_g = torch.stack([self.targ[i] for i in idx])
        cond = self.prompts.cond([self.captions[i] for i in idx], [self.sizes[i] for i in idx])
        mask = torch.stack([self.masks[i] for i in idx]) if self.masks is not None else None
        return self.pair_loss(step, x_o, x_g, cond, cond, mask)
