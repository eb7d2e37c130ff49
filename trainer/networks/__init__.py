"""Networks: LoRA (lierla), LoCon (c3lier), LoHa adapters; target selection; kohya-format files."""

from .files import NetworkFileExists, build_metadata, load_network_file, save_network
from .modules import AdapterModule, LoHaModule, LoRAModule
from .network import LoadResult, Network
from .targets import BLOCK_IDS

__all__ = [
    "AdapterModule", "LoRAModule", "LoHaModule", "Network", "LoadResult", "BLOCK_IDS",
    "save_network", "load_network_file", "build_metadata", "NetworkFileExists",
]
