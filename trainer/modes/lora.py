"""LoRA mode: learn a subject or style from a folder of images and their captions.

Loss per step: || eps_theta+Delta(x_t, t, c(caption)) - target ||, with x_t the cached latent
noised to a random t, and target the noise (or v for v-prediction models).

With ``lora_trigger_preservation`` W > 0 (ai-toolkit's differential output preservation), plus
W * || eps_theta+Delta(x_t, t, c(caption - trigger)) - sg[eps_theta(x_t, t, c(caption - trigger))] ||:
the same noisy latents under the caption without its trigger word must give what the frozen model
gives, so what the captions do not name (a background, a colour) is tied to the trigger word only.
"""
from __future__ import annotations

from collections import Counter

import torch

from ..data.cache import LatentCache
from ..data.errors import DataError
from ..data.captions import tag_frequency, without_trigger
from ..data.dataset import BucketBatcher, build_samples
from ..engine import Pass, place
from ..models.prompts import chunk_prompt, encode_prompts
from .base import SizeCond, UNetCond, pad_chunks, unet_cond


class LoRAMode:
    name = "LoRA"

    def check(self, cfg) -> None:
        if cfg.lora_trigger_preservation > 0 and not cfg.lora_trigger_word.strip():
            raise DataError(f"lora_trigger_preservation: {cfg.lora_trigger_preservation:g} keeps prompts without the "
                            "trigger word unchanged, but lora_trigger_word is empty: set a trigger word or set "
                            "lora_trigger_preservation to 0.")

    def passes(self, run):
        cfg = run.cfg
        self.check(cfg)
        train_te = "BASE" in cfg.network_blocks
        self.prepare(run, train_te)
        yield Pass(cfg, self.loss, cfg.save_lora_name, train_text_encoder=train_te)

    def prepare(self, run, train_te: bool) -> None:
        cfg = run.cfg
        run.progress(phase="prepare", message=f"Reading images in {cfg.lora_data_directory}")
        samples = build_samples(
            cfg.lora_data_directory, image_size=cfg.image_size, buckets_step=cfg.image_buckets_step,
            min_length=cfg.image_min_length, max_ratio=cfg.image_max_ratio, num_multiply=cfg.image_num_multiply,
            sub_image_num=cfg.sub_image_num, mirroring=cfg.image_mirroring, disable_upscale=cfg.image_disable_upscale,
            trigger=cfg.lora_trigger_word, use_filename_as_tag=cfg.image_use_filename_as_tag, warn=run.log,
            check_stop=run.check_stop)
        run.check_stop()
        run.progress(phase="prepare", message=f"Encoding {len(samples)} images")
        cache_dir = run.paths.cache_dir if getattr(cfg, "latent_cache_on_disk", True) else None
        key = f"{run.components.name}|{cfg.train_VAE_precision}|{run.components.scaling_factor}"

        def encode(pixels):
            run.check_stop()  # Stop while caching ends before the next batch; cached files stay whole
            return run.encode_images(pixels)

        latents = LatentCache(warn=run.log).encode_all(
            samples, encode, batch_size=max(1, cfg.train_batch_size), cache_dir=cache_dir, key_extra=key,
            check_stop=run.check_stop)
        run.release_vae()
        # On the device once (repeated samples share one tensor), not copied there at every step
        on_device: dict[int, torch.Tensor] = {}
        for x in latents:
            if id(x) not in on_device:
                on_device[id(x)] = x.to(run.device)
        self.latents = [on_device[id(x)] for x in latents]
        self.captions = [s.caption for s in samples]
        self.preserve = float(cfg.lora_trigger_preservation)
        self.plain = [without_trigger(c, cfg.lora_trigger_word) for c in self.captions] if self.preserve else []
        self.buckets = [s.bucket for s in samples]
        self.sizes = [SizeCond(*s.size_cond_hw()) for s in samples]  # SDXL: pixels, per sample
        self.batcher = BucketBatcher(self.buckets, cfg.train_batch_size, seed=run.seed, warn=run.log)
        self.train_te = train_te
        self.run = run
        run.summary.update(
            num_train_images=len({s.source for s in samples}), num_samples=len(samples),
            tag_frequency={str(cfg.lora_data_directory): tag_frequency(self.captions)},
            buckets=dict(Counter(f"{w}x{h}" for w, h in self.buckets)))
        if not train_te:
            # The text encoder stays frozen: encode every distinct caption once, then free it.
            encoders = run.components.text_encoders
            for te in encoders:
                place(te, run.device, run.dtype)
            self.embeddings = encode_captions(run, sorted(set(self.captions) | set(self.plain) | {""}), cfg.clip_skip,
                                              emphasis=cfg.caption_emphasis)
            for te in encoders:
                place(te, "cpu")

    def sample_prompts(self, cfg) -> list[str]:
        """Default sample prompts: the trigger word alone, then the first captions."""
        return [p for p in [cfg.lora_trigger_word.strip(), *self.captions] if p]

    def _cond(self, captions: list[str], sizes: list[SizeCond]) -> UNetCond:
        run = self.run
        if self.train_te:
            with run.autocast():
                cond = encode_prompts(run.components, captions, clip_skip=run.cfg.clip_skip,
                                      emphasis=run.cfg.caption_emphasis)
            return unet_cond(cond.hidden, cond.pooled, sizes)
        cached = [self.embeddings[c] for c in captions]
        hidden = pad_chunks([h for h, _ in cached], self.embeddings[""][0]).to(run.device)
        pooled = None if cached[0][1] is None else torch.cat([p for _, p in cached]).to(run.device)
        return unet_cond(hidden, pooled, sizes)

    def loss(self, step: int) -> torch.Tensor:
        run = self.run
        idx = next(self.batcher)
        x0 = torch.stack([self.latents[i] for i in idx])
        noise = run.randn(x0.shape)
        t = run.timesteps(x0.shape[0])
        noisy = run.schedule.add_noise(x0, noise, t)
        sizes = [self.sizes[i] for i in idx]
        pred = run.predict(noisy, t, self._cond([self.captions[i] for i in idx], sizes))
        loss = run.step_loss(pred, run.schedule.target(x0, noise, t), t)
        if self.preserve:
            loss = loss + self.preserve * self.preservation_loss(noisy, t, self._cond([self.plain[i] for i in idx],
                                                                                        sizes))
        return loss

    def preservation_loss(self, noisy: torch.Tensor, t: torch.Tensor, plain: UNetCond) -> torch.Tensor:
        """The LoRA'd model against the frozen one on the captions without the trigger word."""
        run = self.run
        with torch.no_grad(), run.network.multiplier(0):
            frozen = run.predict(noisy, t, plain)
        return run.step_loss(run.predict(noisy, t, plain), frozen, t)


def encode_captions(run, texts: list[str], clip_skip: int, batch: int = 16, emphasis: bool = False) -> dict:
    """{text: (hidden [1, 77k, D], pooled [1, P] | None)}, each text through the frozen text encoder(s)
    once, in batches of texts with the same number of 75-token chunks (so nothing is padded and each
    result is what encoding it alone gives): 1.45x less CPU time than one at a time, fewer GPU launches."""
    groups: dict[int, list[str]] = {}
    tokenizer = run.components.tokenizers[0]
    for text in texts:
        groups.setdefault(len(chunk_prompt(tokenizer, text, emphasis)), []).append(text)
    out = {}
    with torch.no_grad(), run.autocast():
        for group in groups.values():
            for i in range(0, len(group), batch):
                run.check_stop()
                chunk = group[i:i + batch]
                cond = encode_prompts(run.components, chunk, clip_skip=clip_skip, emphasis=emphasis)
                for j, text in enumerate(chunk):
                    pooled = cond.pooled[j:j + 1].float().clone() if cond.pooled is not None else None
                    out[text] = (cond.hidden[j:j + 1].float().clone(), pooled)
    return out
