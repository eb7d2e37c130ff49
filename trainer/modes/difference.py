"""Difference ("copy machine", spec §3.3): a copier LoRA for the original image, then, with the
copier applied and frozen, a second LoRA for the target image, which can only learn the difference.

With x_o, x_g the latents of the original and target images (encoded once), c = c(trigger word,
original prompt) (usually ""), eps noise and t ~ U[min, max) drawn each step, y = eps (or v):
- pass 1 (copier D1):      loss = w(t) * || eps_{D1}(add_noise(x_o, eps, t), t, c) - y ||^2
- pass 2 (difference D2):  loss = w(t) * || eps_{D1 + D2}(add_noise(x_g, eps, t), t, c) - y ||^2
  with D1 applied at multiplier 1 and frozen, D2 trained with the 2nd-pass settings
  (``cfg.second_pass or cfg``; ``network_resume`` is a pass-1 setting and is not used by pass 2).
Only D2 is saved as ``<name>.safetensors``. Options:
- ``diff_save_1st_pass``: also save D1 as ``<name>_copy.safetensors``;
- ``diff_1st_pass_only``: train D1 and save it (as ``<name>_copy``) and stop (the original saved nothing);
- ``diff_load_1st_pass``: load D1 from a file (a path, or a name in the LoRA folder, ``.safetensors``
  optional) and skip pass 1; the loaded copier really is applied in pass 2 (the original ignored it).

The images must have the same size (else a DataError before any work); sides that are not multiples
of 8 are centre-cropped (trainer.data.pairs). Text-encoder adapters are never made: the prompt is
encoded once (spec bug #15).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..data.cache import LatentCache
from ..data.dataset import Sample
from ..data.errors import DataError
from ..data.pairs import load_image_pair, pair_pixels
from ..engine import Pass, TrainingError
from .conditioning import PromptEmbeddings, join_prompt


def find_lora_file(name: str, lora_dir: Path) -> Path:
    """A LoRA file given as a path, or as a name (extension optional) under the LoRA folder."""
    raw = Path(name).expanduser()
    candidates = [raw, raw.with_name(raw.name + ".safetensors")]
    if not raw.is_absolute():
        candidates += [lora_dir / raw, lora_dir / (str(raw) + ".safetensors")]
    for c in candidates:
        if c.is_file():
            return c
    if lora_dir.is_dir() and not raw.is_absolute():
        stem = raw.stem if raw.suffix == ".safetensors" else raw.name
        found = sorted(p for p in lora_dir.rglob(f"{stem}.safetensors") if p.is_file())
        if found:
            return found[0]
    raise DataError(f"diff_load_1st_pass: {name!r} is neither a file nor a LoRA in {str(lora_dir)!r}.")


def encode_pair(run, cfg, pair) -> tuple[torch.Tensor, torch.Tensor]:
    """The latents [1,C,h,w] of a PixelPair, each encoded once (and kept in the disk cache if enabled)."""
    cache_dir = run.paths.cache_dir if getattr(cfg, "latent_cache_on_disk", True) else None
    key = f"{run.components.name}|{cfg.train_VAE_precision}|{run.components.scaling_factor}"
    h, w = pair.size
    samples = [Sample(pixels=p, mask=None, caption="", source=Path(s), bucket=(w, h), mirrored=False)
               for p, s in ((pair.original, cfg.original_image), (pair.target, cfg.target_image))]
    latents = LatentCache(warn=run.log).encode_all(samples, run.encode_images, batch_size=2, cache_dir=cache_dir,
                                                   key_extra=key)
    run.release_vae()
    return latents[0][None].to(run.device), latents[1][None].to(run.device)


class DifferenceMode:
    name = "Difference"

    def check(self, cfg) -> None:
        """Input errors, before any work: both images readable and the same size."""
        load_image_pair(cfg.original_image, cfg.target_image)

    def copier_path(self, run) -> Path | None:
        cfg = run.cfg
        return find_lora_file(cfg.diff_load_1st_pass, run.paths.lora_dir) if cfg.diff_load_1st_pass.strip() else None

    def passes(self, run):
        cfg = run.cfg
        cfg2 = (cfg.second_pass or cfg).replace(network_resume="")
        orig, targ = load_image_pair(cfg.original_image, cfg.target_image)
        copier_file = self.copier_path(run)
        save_copier = (cfg.diff_save_1st_pass or cfg.diff_1st_pass_only) and copier_file is None
        copy_name = f"{cfg.save_lora_name}_copy"
        if save_copier and not cfg.save_overwrite and (run.paths.lora_dir / f"{copy_name}.safetensors").exists():
            raise TrainingError(f"save_lora_name: {run.paths.lora_dir / (copy_name + '.safetensors')} already exists; "
                                f"choose another name or turn on save_overwrite")
        if cfg.diff_1st_pass_only and copier_file is not None:
            raise DataError("diff_1st_pass_only and diff_load_1st_pass are both set: there is nothing to train.")
        self.run = run
        pair = pair_pixels(orig, targ, warn=run.log)
        self.size = pair.size
        run.progress(phase="prepare", message="Encoding the images")
        self.x_orig, self.x_targ = encode_pair(run, cfg, pair)
        run.check_stop()
        self.prompt = join_prompt(cfg.lora_trigger_word, cfg.original_prompt)
        self.prompts = PromptEmbeddings(run, [self.prompt], cfg.clip_skip)
        self._conds = {}
        run.summary.update(num_train_images=2, prompts={"original image": Path(cfg.original_image).name,
                                                       "target image": Path(cfg.target_image).name,
                                                       "prompt": self.prompt})
        if copier_file is None:
            run.summary["prompts"] = {**run.summary["prompts"], "pass": "1st (copier of the original image)"}
            yield Pass(cfg, lambda step: self.loss(step, self.x_orig, cfg), copy_name, train_text_encoder=False,
                       save=save_copier)
            if cfg.diff_1st_pass_only or run.stopping:
                return
        else:
            self.load_copier(run, copier_file)
        run.summary["prompts"] = {**run.summary["prompts"], "pass": "2nd (difference)"}
        yield Pass(cfg2, lambda step: self.loss(step, self.x_targ, cfg2), cfg.save_lora_name, train_text_encoder=False)

    def sample_prompts(self, cfg) -> list[str]:
        """Default sample prompt: the one both passes train with (often empty)."""
        return [join_prompt(cfg.lora_trigger_word, cfg.original_prompt)]

    def load_copier(self, run, path: Path) -> None:
        """Apply the copier from a file, frozen at multiplier 1, under the network pass 2 trains."""
        from ..networks.files import load_network_file
        from ..networks.network import Network

        tensors, _ = load_network_file(path)
        unet_only = {k: v for k, v in tensors.items() if k.startswith("lora_unet_")}
        if len(unet_only) < len(tensors):
            n_te = len({k.partition(".")[0] for k in tensors if k.startswith("lora_te")})
            run.log(f"diff_load_1st_pass: skipped {n_te} text-encoder module(s) of {path} (the prompt is "
                    f"encoded once, so the copier's text encoder is not used)")
        if not unet_only:
            raise DataError(f"diff_load_1st_pass: {str(path)!r} has no U-Net tensors.")
        net = Network(run.components.unet, (), unet_key_style=run.unet_key_style, dtype=run.lora_dtype,
                      ldm_map=_ldm_map(run))
        try:
            net.load_kohya(unet_only)
        except ValueError as e:
            raise DataError(f"diff_load_1st_pass: {str(path)!r} does not fit this model: {e}") from e
        net.to(run.device)
        net.requires_grad_(False)
        net.set_multiplier(1.0)
        net.apply()
        run.networks.append(net)
        run.log(f"Copier loaded from {path} ({len(list(net.adapters()))} modules); pass 1 skipped")

    def loss(self, step: int, x0: torch.Tensor, cfg) -> torch.Tensor:
        run = self.run
        b = cfg.train_batch_size
        x0 = x0.expand(b, -1, -1, -1)
        noise = run.randn(x0.shape)
        t = run.timesteps(b, cfg)
        if b not in self._conds:
            self._conds[b] = self.prompts.cond([self.prompt] * b, self.size)
        pred = run.predict(run.schedule.add_noise(x0, noise, t), t, self._conds[b])
        return run.step_loss(pred, run.schedule.target(x0, noise, t), t, cfg)


def _ldm_map(run):
    if run.unet_key_style == "sgm":
        from ..networks.targets import default_ldm_map
        return default_ldm_map(run.components.unet)
    return None
