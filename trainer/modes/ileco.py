"""iLECO: turn the concept of one prompt into another (or erase it) from prompts alone, no images.

Notation: eps(x, t, c) is the frozen U-Net, eps_D the same with the LoRA at multiplier 1;
c_o = c(original prompt), c_t = c(target prompt) ("" = erase), c_u = c(negative prompt) (default "").

- ``leco_objective = "iLECO"`` (the original's fast objective, spec §3.2):
      loss = w(t) * || eps_D(z, t, c_o) - sg[eps(z, t, c_t)] ||^2
- ``"erase"`` / ``"enhance"`` (the full LECO objective, peers §5.2, guidance g = ``leco_guidance_scale``):
      y = eps(z, t, c_n) -/+ g * (eps(z, t, c_o) - eps(z, t, c_u)),   loss = w(t) * || eps_D(z, t, c_o) - sg[y] ||^2
  The neutral prompt c_n is the target prompt; when that is empty it is c_u for erase (then erase
  with g = 1 is ESD: eps(u) - (eps(o) - eps(u))) and c_o for enhance (amplify the original concept).
  With g = 0 both reduce to the iLECO objective. The three frozen predictions run as one batch.

w(t) is the min-SNR weight (``train_snr_gamma``). Latents: z ~ N(0, I) of ``image_size``/8 is drawn
FRESH AT EVERY STEP (the original drew one latent once and reused it, so the LoRA could fit that one
noise pattern; fresh noise makes it generalise to every seed) and used as-is at a random
t ~ U[train_min_timesteps, train_max_timesteps), like the original; there is no partial denoising
(LECO's sampling of x_t under the LoRA costs k extra U-Net calls per step).

The conditionings are computed once, so no text-encoder adapter can learn anything (spec bug #15):
the network has none and the file holds only U-Net tensors.
"""
from __future__ import annotations

import torch

from ..data.errors import DataError
from ..engine import Pass
from .conditioning import PromptEmbeddings


class ILECOMode:
    name = "iLECO"

    def check(self, cfg) -> None:
        """Input errors, before any work."""
        if not cfg.original_prompt.strip():
            raise DataError('original_prompt is empty: iLECO needs the prompt of the concept to change, e.g. '
                            '--original-prompt "red" --target-prompt "blue" (an empty target prompt erases it).')

    def passes(self, run):
        cfg = run.cfg
        self.check(cfg)
        self.run, self.cfg = run, cfg
        self.objective = cfg.leco_objective
        self.guidance = float(cfg.leco_guidance_scale)
        o, t, u = cfg.original_prompt, cfg.target_prompt, cfg.negative_prompt
        if self.objective == "iLECO":
            self.neutral = t
        else:
            self.neutral = t if t.strip() else (u if self.objective == "erase" else o)
        run.progress(phase="prepare", message="Encoding the prompts")
        self.prompts = PromptEmbeddings(run, [o, t, u, self.neutral], cfg.clip_skip)
        if "BASE" in cfg.network_blocks or cfg.network_train_text_encoder:
            run.log("iLECO trains the U-Net only: the prompts are encoded once, so a text-encoder LoRA "
                    "could not learn anything")
        h, w = sorted(cfg.image_size)
        self.size = (h, w)
        channels = int(run.components.unet.config.in_channels)
        self.shape = (cfg.train_batch_size, channels, h // 8, w // 8)
        b = cfg.train_batch_size
        self.cond_o = self.prompts.cond([o] * b, self.size)
        if self.objective == "iLECO":
            self.cond_frozen = self.prompts.cond([t] * b, self.size)
        else:  # neutral, positive (= original), unconditional: one batch of 3B
            self.cond_frozen = self.prompts.cond([self.neutral] * b + [o] * b + [u] * b, self.size)
        prompts = {"original prompt": o, "target prompt": t}
        if self.objective != "iLECO":
            prompts.update({"negative prompt": u, "objective": f"{self.objective} (guidance {self.guidance:g})"})
        run.summary["prompts"] = prompts
        run.summary["num_train_images"] = 0
        yield Pass(cfg, self.loss, cfg.save_lora_name, train_text_encoder=False)

    def sample_prompts(self, cfg) -> list[str]:
        """Default sample prompts: the original prompt (what the LoRA changes), then the target."""
        return [p for p in (cfg.original_prompt, cfg.target_prompt) if p.strip()]

    def target(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The frozen model's goal for the LoRA'd prediction on (z, t) (no grad)."""
        run = self.run
        with torch.no_grad(), run.network.multiplier(0):
            if self.objective == "iLECO":
                return run.predict(z, t, self.cond_frozen)
            k = z.shape[0]
            e = run.predict(z.repeat(3, 1, 1, 1), t.repeat(3), self.cond_frozen)
            neutral, positive, uncond = e[:k], e[k:2 * k], e[2 * k:]
            sign = -1.0 if self.objective == "erase" else 1.0
            return neutral + sign * self.guidance * (positive - uncond)

    def loss(self, step: int) -> torch.Tensor:
        run = self.run
        z = run.randn(self.shape)
        t = run.timesteps(self.shape[0], self.cfg)
        target = self.target(z, t)
        pred = run.predict(z, t, self.cond_o)
        return run.step_loss(pred, target, t, self.cfg)
