"""Web-UI install hook (run by the Web-UI's launcher with its own venv's Python).

Installs what requirements.txt lists that the Web-UI's venv lacks, through the Web-UI's
launch.is_installed / launch.run_pip. What the Web-UI already has (torch, gradio, transformers,
numpy, Pillow, safetensors, ...) is never upgraded or downgraded: a package that is present in any
version is left alone, gradio is never installed here (the Web-UI brings its own), and every pip
call runs with a constraints file pinning each installed distribution to its installed version, so
a new package can never pull in a different version of one the Web-UI has (pip then refuses
instead). diffusers is capped below 0.37 beside transformers older than 4.48 (A1111 pins 4.30.2):
diffusers 0.37+ imports ``transformers.Dinov2WithRegistersConfig`` (new in 4.48) as soon as its models
are imported, so ``from diffusers import AutoencoderKL`` fails there (seen in a real A1111 1.10.1).
"""
import importlib.metadata
import os
import re
import tempfile

import launch

HERE = os.path.dirname(os.path.abspath(__file__))
# Provided by the Web-UI: never touched by this hook, whatever requirements.txt says.
WEBUI_OWNED = {"torch", "torchvision", "gradio", "transformers", "numpy", "pillow", "safetensors", "accelerate",
               "pydantic", "fastapi", "xformers"}
# (transformers below this, diffusers below this): diffusers 0.37 imports Dinov2WithRegistersConfig
# (transformers 4.48) from diffusers.models.autoencoders at import time
DIFFUSERS_CAP = ((4, 48), "0.37")


def requirements(path=os.path.join(HERE, "requirements.txt")):
    """(distribution name, pip requirement) for each line that applies to this platform."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            req, _, marker = line.partition(";")
            if marker.strip() and not _marker_ok(marker.strip()):
                continue
            name = re.split(r"[<>=!~\[ ]", req.strip(), maxsplit=1)[0]
            out.append((name, req.strip()))
    return out


def _marker_ok(marker):
    try:
        from packaging.markers import Marker
    except ImportError:  # pip's vendored copy
        from pip._vendor.packaging.markers import Marker
    return Marker(marker).evaluate()


def _version_tuple(text):
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def installed_pins():
    """name==version for every distribution in this venv."""
    pins = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name and dist.version:
            pins[name.lower()] = f"{name}=={dist.version}"
    return sorted(pins.values())


def main():
    missing = []
    for name, req in requirements():
        if name.lower().replace("_", "-") in WEBUI_OWNED:
            continue
        if launch.is_installed(name):  # any version: never upgrade or downgrade the Web-UI's packages
            continue
        if name.lower() == "diffusers":
            try:
                tf = importlib.metadata.version("transformers")
            except importlib.metadata.PackageNotFoundError:
                tf = None
            if tf and _version_tuple(tf) < DIFFUSERS_CAP[0]:
                req = req + f",<{DIFFUSERS_CAP[1]}"
        missing.append(req)
    if not missing:
        return
    with tempfile.TemporaryDirectory(prefix="traintrain-install-") as tmp:
        constraints = os.path.join(tmp, "constraints.txt")
        with open(constraints, "w", encoding="utf-8") as f:
            f.write("\n".join(installed_pins()) + "\n")
        for req in missing:
            launch.run_pip(f'install -c "{constraints}" "{req}"', f"TrainTrain requirement: {req}")


if __name__ == "__main__":
    main()
