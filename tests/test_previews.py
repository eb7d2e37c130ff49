"""Issue 12, before and after training, through the tab's handlers on the tiny built-in model:
iLECO's Generate Original / Target / All (and the pair modes' prompts) show what each prompt gives on the
chosen model, same seed, saved under samples/_previews/; a finished job's Try it draws its LoRA's strength
grid; neither runs while a job trains; inside the Web-UI a preview goes through the host (its lock held,
its model off the device, restored after)."""
import threading
from pathlib import Path

import numpy as np
from PIL import Image

from test_samples import tile
from test_ui import set_value, values_for
from test_webui_adapter import tiny_ckpt, webui  # noqa: F401  (fixtures: the fake Web-UI, the tiny checkpoint)
from trainer.config import Config
from trainer.demo import draw_demo_images
from trainer.jobs import DONE
from trainer.samples import read_grid_info
from trainer.ui import TrainTrainUI

# one U-Net call per image at 64 px: what is tested is what is drawn, where it goes and when it is refused
FAST = dict(sample_steps=1, sample_cfg_scale=1, sample_size="64", sample_seed="3")
SMALL = dict(image_size="64", image_min_length=64, image_buckets_step=64, network_rank=2, network_alpha=2,
             train_iterations=2, train_seed=0, train_model_precision="fp32", save_precision="fp32",
             latent_cache_on_disk=False, train_batch_size=1)


def ileco_values(ui, **settings):
    cfg = Config.defaults("iLECO").replace(original_prompt="a cat", target_prompt="a dog").with_overrides(
        {**FAST, **settings})
    return values_for(ui, cfg)


def saved_path(message: str) -> Path:
    assert not message.startswith("Error"), message
    return Path(message.split(": ", 1)[1].split(" (", 1)[0])


def test_generate_original_target_and_all_show_each_prompt_on_the_same_seed(ui, tmp_path):
    values = ileco_values(ui)
    shown = {}
    for which, handler in (("original", ui.preview_original), ("target", ui.preview_target),
                           ("all", ui.preview_all)):
        message, image = handler(*values)
        path = saved_path(message)
        assert path.parent == tmp_path / "samples" / "_previews" and path.name.endswith(f"-{which}.png")
        assert image["value"].size == Image.open(path).size  # the tab shows the grid it saved
        shown[which] = path
    rows = {w: [p for p, _ in read_grid_info(p)["rows"]] for w, p in shown.items()}
    assert rows == {"original": ["a cat"], "target": ["a dog"], "all": ["a cat", "a dog"]}
    assert read_grid_info(shown["all"])["rows"] == [["a cat", 3], ["a dog", 3]]
    # same seed: All's rows are the Original and the Target previews (up to rounding of a batch of two);
    # the prompts differ, so do their images
    cat, dog = tile(shown["original"], 0, 0), tile(shown["target"], 0, 0)
    assert np.abs(tile(shown["all"], 0, 0) - cat).max() <= 2 / 255
    assert np.abs(tile(shown["all"], 1, 0) - dog).max() <= 2 / 255
    assert np.abs(cat - dog).mean() > 1 / 255
    # a second press the same second never overwrites the first grid
    again = saved_path(ui.preview_original(*values)[0])
    assert again != shown["original"] and shown["original"].is_file()


def test_an_empty_target_previews_the_empty_prompt_ileco_erases_towards(ui):
    message, _ = ui.preview_target(*set_value(ui, ileco_values(ui), "target_prompt", ""))
    assert read_grid_info(saved_path(message))["rows"] == [["", 3]]


def test_pair_modes_preview_their_prompts_and_lora_mode_has_none(ui, tmp_path):
    cfg = Config.defaults("ADDifT").replace(original_prompt="red", target_prompt="blue").with_overrides(FAST)
    message, _ = ui.preview_all(*values_for(ui, cfg))
    assert [p for p, _ in read_grid_info(saved_path(message))["rows"]] == ["red", "blue"]
    message, image = ui.preview_all(*values_for(ui, Config.defaults("LoRA").with_overrides(FAST)))
    assert message.startswith("Error: LoRA mode has no prompt boxes to preview") and "value" not in image


def test_a_bad_sample_setting_names_itself_and_draws_nothing(ui, tmp_path):
    values = set_value(ui, ileco_values(ui), "1:sample_steps", "many")
    message, _ = ui.preview_all(*values)
    assert message.startswith("Error: sample_steps") and "many" in message
    assert not (tmp_path / "samples").exists()


def test_no_preview_while_a_job_trains_on_the_device(ui, tmp_path):
    images = draw_demo_images(tmp_path / "rings", count=2)
    reached, release = threading.Event(), threading.Event()

    def hold(p):  # the job waits at its first step until the test has pressed the buttons
        if p.phase == "train" and p.step >= 1:
            reached.set()
            release.wait(60)

    ui.host.on_progress = hold
    ui.queue.add(Config.defaults("LoRA").with_overrides({**SMALL, "lora_data_directory": str(images),
                                                         "save_lora_name": "busy"}))
    ui.queue.start()
    try:
        assert reached.wait(300)
        message, image = ui.preview_all(*ileco_values(ui))
        tried, _ = ui.try_job("1: busy (running)")
    finally:
        release.set()
    assert ui.queue.wait(300)
    assert message.startswith("Error: Generate All is not drawn while busy (job 1) trains on this device")
    assert "value" not in image and not (tmp_path / "samples" / "_previews").exists()
    assert tried == "Error: Try it needs a finished job: busy (job 1) is running"


def test_training_waits_while_a_preview_is_drawn(ui, tmp_path):
    images = draw_demo_images(tmp_path / "rings", count=2)
    cfg = Config.defaults("LoRA").with_overrides({**SMALL, "lora_data_directory": str(images),
                                                  "save_lora_name": "later"})
    with ui._drawing:  # what a preview holds while it draws
        message = ui.start(*values_for(ui, cfg))[0]
        assert "A preview is being drawn on this device: later (job 1) is queued" in message
        assert not ui.queue.busy and ui.queue.jobs()[0].status == "queued"
        assert ui.preview_all(*ileco_values(ui))[0] == \
            "Error: Generate All: another preview is being drawn; wait until it shows"


def test_try_it_draws_a_finished_jobs_lora_at_each_strength(ui, tmp_path):
    images = draw_demo_images(tmp_path / "rings", count=2)  # captioned "orange ring"
    cfg = Config.defaults("LoRA").with_overrides({**SMALL, **FAST, "lora_data_directory": str(images),
                                                  "save_lora_name": "rings", "lora_trigger_word": "ttdemo"})
    ui.queue.add(cfg)
    ui.queue.start()
    assert ui.queue.wait(300) and ui.queue.jobs()[0].status == DONE, ui.queue.jobs()[0].message
    choice = ui.queue_view()[1]["choices"][0]
    message, image = ui.try_job(choice, "ttdemo\nttdemo, orange ring", "0, 1", "5, 6")
    path = saved_path(message)
    assert path.parent == tmp_path / "samples" / "rings" and path.name.endswith("-tryit.png")
    info = read_grid_info(path)
    assert info["rows"] == [["ttdemo", 5], ["ttdemo", 6], ["ttdemo, orange ring", 5], ["ttdemo, orange ring", 6]]
    assert info["multipliers"] == [0, 1] and info["size"] == [64, 64]
    assert info["title"].startswith("rings.safetensors on ") and image["value"].size == Image.open(path).size
    # empty boxes: the job's own prompt (its trigger word), strengths and seed
    info = read_grid_info(saved_path(ui.try_job(choice)[0]))
    assert info["rows"] == [["ttdemo", 3]] and info["multipliers"] == [0, 0.5, 1]
    # bad boxes name themselves; nothing more is drawn
    before = sorted(path.parent.iterdir())
    assert ui.try_job(choice, "", "0, x")[0].startswith('Error: Try it strengths: "0, x" contains "x"')
    assert ui.try_job(choice, "", "", "-1")[0].startswith("Error: Try it seeds")
    assert ui.try_job(None)[0] == "Error: Job: choose a finished job in the Job list, then press Try it"
    Path(ui.queue.jobs()[0].files[-1]).unlink()
    assert ui.try_job(choice)[0].startswith("Error: the LoRA of rings (job 1) is gone")
    assert sorted(path.parent.iterdir()) == before


def test_inside_the_webui_a_preview_holds_it_like_training(webui, tmp_path, monkeypatch):  # noqa: F811
    from modules import call_queue, shared

    import trainer.samples as samples
    from trainer.host.webui import WebUIHost

    ui = TrainTrainUI(WebUIHost(tmp_path / "ext"))
    seen, draw_rows = [], samples.draw_rows

    def spy(components, spec, **kw):
        seen.append((call_queue.queue_lock.locked(), shared.sd_model.placement))
        return draw_rows(components, spec, **kw)

    monkeypatch.setattr(samples, "draw_rows", spy)
    cfg = Config.defaults("iLECO").replace(original_prompt="a cat", target_prompt="").with_overrides(FAST)
    message, image = ui.preview_all(*values_for(ui, cfg))
    path = saved_path(message)
    assert path.parent == tmp_path / "ext" / "samples" / "_previews"
    assert read_grid_info(path)["rows"] == [["a cat", 3], ["", 3]]
    assert seen == [(True, "cpu")]  # drawn under the Web-UI's lock, its model off the device
    assert shared.sd_model.placement == "device" and not call_queue.queue_lock.locked()


def test_the_buttons_sit_with_the_prompt_boxes_and_try_it_with_the_job_list(ui):
    def inside(block):
        yield block
        for child in getattr(block, "children", None) or []:
            yield from inside(child)

    w = ui.widgets
    prompts = list(inside(w["prompt_group"]))
    assert [w[k].value for k in ("gen_original", "gen_target", "gen_all")] == \
        ["Generate Original", "Generate Target", "Generate All"]
    assert all(w[k] in prompts for k in ("gen_original", "gen_target", "gen_all", "preview_image"))
    shown = {m: ui.change_mode(m)[-2]["visible"] for m in ("LoRA", "iLECO", "Difference", "ADDifT", "Multi-ADDifT")}
    assert shown == {"LoRA": False, "iLECO": True, "Difference": True, "ADDifT": True, "Multi-ADDifT": False}
    assert w["try_run"].value == "Try it" and getattr(w["preview_image"], "format", "png") == "png"
