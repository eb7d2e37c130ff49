"""modules/sd_vae.py: VAE files by name."""
import os

vae_dict = {}  # name -> path
vae_path = ""


def refresh_vae_list():
    vae_dict.clear()
    if vae_path and os.path.isdir(vae_path):
        for f in sorted(os.listdir(vae_path)):
            if f.endswith((".safetensors", ".ckpt", ".pt")):
                vae_dict[f] = os.path.join(vae_path, f)
