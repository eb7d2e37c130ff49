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

w(t) is the min-SNR weight (``train_snr_gamma``). Latents, by ``leco_trajectory_steps``:

- 0 (the default, the original's): z ~ N(0, I) of ``image_size``/8 is drawn FRESH AT EVERY STEP (the
  original drew one latent once and reused it, so the LoRA could fit that one noise pattern; fresh
  noise makes it generalise to every seed) and used as-is at a random t ~ U[train_min_timesteps,
  train_max_timesteps). At low t pure noise is nothing the model meets when it draws an image.
- N: LECO's way (peers §5.2). Each sample stops at a random step j of an N-step DDIM trajectory
  (trailing spacing, t_j within the timestep range) that starts from fresh noise and denoises the
  original prompt with the LoRA as it is now (guidance ``TRAJECTORY_GUIDANCE`` against the negative
  prompt, no grad); z = x_{t_j}, t = t_j. The LoRA then learns on the partly drawn images it will
  change at inference, including what it already changed. Cost: max_j <= N guided calls per step.

The conditionings are computed once, so no text-encoder adapter can learn anything (spec bug #15):
the network has none and the file holds only U-Net tensors.
"""
from __future__ import annotations

import torch

from ..data.errors import DataError
from ..engine import Pass
from ..sampling import ddim_step, ddim_timesteps
from .conditioning import PromptEmbeddings

#: Classifier-free guidance of the trajectory that iLECO's latents come from (LECO's value).
TRAJECTORY_GUIDANCE = 3.0


class ILECOMode:
    name = "iLECO"

    def check(self, cfg) -> None:
        """Input errors, before any work."""
        if not cfg.original_prompt.strip():
            raise DataError('original_prompt is empty: iLECO needs the prompt of the concept to change, e.g. '
                            '--original-prompt "red" --target-prompt "blue" (an empty target prompt erases it).')
        n = cfg.leco_trajectory_steps
        if n and not trajectory_stops(n, cfg.train_min_timesteps, cfg.train_max_timesteps):
            raise DataError(f"leco_trajectory_steps: {n} DDIM steps ({ddim_timesteps(n)}) have no timestep in "
                            f"train_min_timesteps..train_max_timesteps ({cfg.train_min_timesteps}.."
                            f"{cfg.train_max_timesteps - 1}): use more steps or a wider range.")

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
        self.stops = trajectory_stops(cfg.leco_trajectory_steps, cfg.train_min_timesteps, cfg.train_max_timesteps)
        if self.stops:
            self.cond_guided = self.prompts.cond([u] * b + [o] * b, self.size)
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

    def latents(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, t): pure noise at random timesteps, or points of the LoRA'd model's own trajectory."""
        run, b = self.run, self.shape[0]
        if not self.stops:
            return run.randn(self.shape), run.timesteps(b, self.cfg)
        ts = ddim_timesteps(self.cfg.leco_trajectory_steps)
        pick = torch.randint(len(self.stops), (b,), generator=run.generator)
        stops = torch.tensor(self.stops)[pick]  # sample i stops before DDIM step stops[i]
        x = run.randn(self.shape)
        z = x.clone()
        ab = run.schedule.alphas_cumprod
        with torch.no_grad():
            for j in range(int(stops.max())):
                t = torch.full((2 * b,), ts[j], device=x.device, dtype=torch.long)
                uncond, cond = run.predict(torch.cat([x, x]), t, self.cond_guided).chunk(2)
                eps = uncond + TRAJECTORY_GUIDANCE * (cond - uncond)
                x = ddim_step(eps, x, float(ab[ts[j]]), float(ab[ts[j + 1]]), run.schedule.v_prediction)
                done = (stops == j + 1).to(x.device)
                z[done] = x[done]
        return z, run.to_device(torch.tensor([ts[int(s)] for s in stops]))

    def loss(self, step: int) -> torch.Tensor:
        run = self.run
        z, t = self.latents()
        target = self.target(z, t)
        pred = run.predict(z, t, self.cond_o)
        return run.step_loss(pred, target, t, self.cfg)


def trajectory_stops(steps: int, low: int, high: int) -> list[int]:
    """Indices j of an ``steps``-step DDIM trajectory (see ``ddim_timesteps``) whose timestep lies in
    [low, high): where a sample may stop; [] when ``steps`` is 0."""
    return [j for j, t in enumerate(ddim_timesteps(steps)) if low <= t < high] if steps else []
