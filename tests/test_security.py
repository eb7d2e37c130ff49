"""Model-file metadata (``traintrain.configs``) and diffusers-folder configs are data, never instructions:
the text-encoder class is allow-listed (a file naming ``pipeline`` must not make us call
``transformers.pipeline``), only the constructor keywords of the part are accepted, and every value that
sizes the model is bounded (``num_hidden_layers=3000000`` is refused at once, not built). Each refusal
names the key and the value (issue 10, Security)."""
import json
import time

import pytest
import torch
from safetensors.torch import save_file

from trainer.models.configs import ConfigError, check_configs
from trainer.models.errors import ModelError
from trainer.models.loading import META_CONFIGS, load_components
from trainer.models.tiny import tiny_components


@pytest.fixture(scope="module")
def tiny_meta():
    """The configs a saved tiny model carries (what save_ldm_checkpoint writes)."""
    c = tiny_components().configs
    return {"name": c.name, "family": c.family.value, "unet": c.unet, "vae": c.vae,
            "text_encoders": list(c.text_encoders), "text_encoder_classes": list(c.text_encoder_classes),
            "pad_tokens": list(c.pad_tokens), "scaling_factor": c.scaling_factor}


def crafted(tmp_path, meta: dict, name="crafted.safetensors"):
    """A small checkpoint file whose metadata carries ``meta`` as its configs."""
    path = tmp_path / name
    save_file({"model.diffusion_model.x": torch.zeros(1)}, str(path), metadata={META_CONFIGS: json.dumps(meta)})
    return path


def edit(meta, **changes):
    out = json.loads(json.dumps(meta))
    for dotted, value in changes.items():
        where, *keys = dotted.split("__")
        target = out
        for k in [where, *keys][:-1]:
            target = target[int(k)] if isinstance(target, list) else target[k]
        last = [where, *keys][-1]
        if isinstance(target, list):
            target[int(last)] = value
        else:
            target[last] = value
    return out


def test_the_tiny_models_own_configs_pass(tiny_meta):
    cfgs = check_configs(json.loads(json.dumps(tiny_meta)), "tiny")
    assert cfgs.text_encoder_classes == ("CLIPTextModel",) and cfgs.unet["layers_per_block"] == 2


def test_a_file_naming_transformers_pipeline_is_refused_and_nothing_is_called(tmp_path, tiny_meta, monkeypatch):
    import transformers

    called = []
    monkeypatch.setattr(transformers, "pipeline", lambda *a, **k: called.append(a) or pytest.fail("called"),
                        raising=False)
    path = crafted(tmp_path, edit(tiny_meta, text_encoder_classes=["pipeline"]))
    with pytest.raises(ModelError) as e:
        load_components(path)
    assert "text_encoder_classes[0] = 'pipeline': not allowed" in str(e.value) and str(path) in str(e.value)
    assert called == []


@pytest.mark.parametrize("change, named", [
    ({"text_encoders__0__num_hidden_layers": 3_000_000}, "text_encoders[0].num_hidden_layers = 3000000: out of bounds"),
    ({"unet__layers_per_block": 3_000_000}, "unet.layers_per_block = 3000000: out of bounds"),
    ({"unet__block_out_channels": [32, 32, 64, 10**9]}, "unet.block_out_channels = [32, 32, 64, 1000000000]"),
    ({"vae__latent_channels": 10**6}, "vae.latent_channels = 1000000: out of bounds"),
    ({"unet__down_block_types": ["os.system"] * 4}, "unet.down_block_types = ['os.system'"),
    ({"unet__not_a_keyword": 1}, "unet.not_a_keyword = 1: not an allowed setting"),
    ({"text_encoders__0__auto_map": {"AutoModel": "evil.Model"}}, "text_encoders[0].auto_map = "),
    ({"unet__num_class_embeds": 10**9}, "unet.num_class_embeds = 1000000000: out of bounds"),
    ({"text_encoders__0__id2label": {"0": "x" * 10**5}}, "text_encoders[0].id2label = "),
    ({"pad_tokens": ["<|evil|>"]}, "pad_tokens[0] = '<|evil|>': not allowed"),
    ({"family": "flux-pro"}, "family = 'flux-pro': unknown"),
    ({"scaling_factor": float("nan")}, "scaling_factor = nan: out of bounds"),
    ({"extra": 1}, "extra = 1: not an allowed key"),
])
def test_every_config_value_from_a_file_is_allow_listed_and_bounded(tmp_path, tiny_meta, change, named):
    path = crafted(tmp_path, edit(tiny_meta, **change))
    t0 = time.perf_counter()
    with pytest.raises(ModelError) as e:
        load_components(path)
    assert time.perf_counter() - t0 < 5  # refused at once, before anything is built
    assert named in str(e.value), str(e.value)


def test_the_cli_refuses_such_a_file_with_one_line(tmp_path, tiny_meta, capsys):
    from trainer.__main__ import main

    path = crafted(tmp_path, edit(tiny_meta, text_encoders__0__num_hidden_layers=3_000_000))
    code = main(["train", "--mode", "iLECO", "--original-prompt", "a cat", "--target-prompt", "a dog",
                 "--model", str(path), "--workdir", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert code == 2 and "num_hidden_layers = 3000000: out of bounds (allowed: a whole number from 1 to 48)" in err
    assert "Traceback" not in err


def test_a_diffusers_folder_config_is_bounded_too(tmp_path):
    folder = tmp_path / "folder"
    for sub in ("unet", "vae", "text_encoder"):
        (folder / sub).mkdir(parents=True)
    (folder / "unet" / "config.json").write_text(json.dumps({"layers_per_block": 3_000_000, "cross_attention_dim": 768}))
    (folder / "vae" / "config.json").write_text("{}")
    (folder / "text_encoder" / "config.json").write_text("{}")
    with pytest.raises(ModelError, match=r"unet/config.json: unet.layers_per_block = 3000000: out of bounds"):
        load_components(folder)


def test_only_allowed_text_encoder_classes_are_built():
    from trainer.models.configs import build_text_encoder

    with pytest.raises(ConfigError, match="'pipeline' is not allowed"):
        build_text_encoder({}, "pipeline")
