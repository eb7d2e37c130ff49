"""modules/shared.py: the Web-UI's process-wide objects (only what extensions read here)."""
from types import SimpleNamespace

from modules import shared_state

cmd_opts = SimpleNamespace(lora_dir=None, data_dir=".", ckpt_dir=None, no_half=True, precision="full")
opts = SimpleNamespace(sd_model_checkpoint=None, localization="None", sd_checkpoints_limit=1,
                       CLIP_stop_at_last_layers=1)  # Settings > Stable Diffusion > Clip skip
state = shared_state.State()
sd_model = None  # A1111: a property that returns sd_models.model_data.get_sd_model()
demo = None
