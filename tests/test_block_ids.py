"""Block IDs follow the loaded family: SDXL has IN00–IN08, M00, OUT00–OUT08 (spec Appendix A), and
an SD1.5-style selection on SDXL selects what it selected in the original, saying which IDs it lacks."""
import re

import pytest

from trainer.config import BLOCK_IDS
from trainer.models.tiny import tiny_components
from trainer.networks.network import Network
from trainer.networks.targets import family_block_ids

from _modes_helpers import config, draw, train

# the original's SD1 attention-block list (BLOCKID17, spec Appendix A), a selection its users saved
SD1_ATTENTION = ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00") + tuple(
    f"OUT{i:02d}" for i in range(3, 12))


@pytest.fixture(scope="module")
def sdxl():
    return tiny_components(family="sdxl")


def _blocks(net):
    """The SGM block of every U-Net adapter, as IN04 / M00 / OUT03 ..."""
    out = set()
    for m in net.unet_modules:
        hit = re.match(r"lora_unet_(input_blocks|output_blocks)_(\d+)_|lora_unet_middle_block_", m.lora_name)
        out.add("M00" if not hit.group(1) else f"{'IN' if hit.group(1) == 'input_blocks' else 'OUT'}{int(hit.group(2)):02d}")
    return out


def test_each_family_lists_its_own_blocks():
    xl = ("BASE",) + tuple(f"IN{i:02d}" for i in range(9)) + ("M00",) + tuple(f"OUT{i:02d}" for i in range(9))
    assert family_block_ids("sdxl") == xl
    assert family_block_ids("sd1") == family_block_ids("sd2") == BLOCK_IDS


def test_sd15_ids_on_sdxl_select_the_same_numbered_blocks_and_name_the_missing_ones_once(sdxl):
    logs = []
    net = Network.create(sdxl.unet, blocks=SD1_ATTENTION, unet_key_style="sgm", warn=logs.append)
    # the original's numbers on SDXL: SGM input/output block numbers (lierla: attention blocks only)
    assert _blocks(net) == {"IN04", "IN05", "IN07", "IN08", "M00", "OUT03", "OUT04", "OUT05"}
    assert len(logs) == 1, logs
    assert "network_blocks" in logs[0] and "no block OUT09, OUT10, OUT11" in logs[0]
    assert "IN00–IN08, M00, OUT00–OUT08" in logs[0]


def test_the_full_sd15_list_means_every_sdxl_block_without_a_warning(sdxl):
    logs = []
    every_unet_id = tuple(b for b in BLOCK_IDS if b != "BASE")  # what the shipped XL presets hold
    net = Network.create(sdxl.unet, blocks=every_unet_id, unet_key_style="sgm", warn=logs.append)
    assert logs == []
    assert net.counts() == Network.create(sdxl.unet, blocks=None, unet_key_style="sgm").counts()


def test_sd1_has_every_id_so_nothing_is_said():
    logs = []
    Network.create(tiny_components().unet, blocks=SD1_ATTENTION, warn=logs.append)
    assert logs == []


def test_a_training_run_on_sdxl_logs_the_missing_ids(sdxl, tmp_path):
    red, blue = draw(tmp_path / "red.png", (220, 30, 30)), draw(tmp_path / "blue.png", (30, 30, 220))
    cfg = config("ADDifT_Action_XL.json", original_image=red, target_image=blue, train_iterations=1,
                 network_blocks="IN04,IN10,OUT02,OUT11")
    logs = []
    from trainer.modes.addift import ADDifTMode
    _, result, _ = train(cfg, tmp_path, ADDifTMode(), sdxl, logs)
    assert result.ok, result.message
    said = [line for line in logs if "no block" in line]
    assert len(said) == 1 and "IN10, OUT11" in said[0], logs
