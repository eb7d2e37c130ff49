"""The TrainTrain tab: Gradio Blocks, the same in the Web-UI (gradio 3.41 / 4) and standalone (gradio 4-6).

This is the only module that imports gradio. Every widget of the Train tab is generated from the
settings table (``trainer.config.SETTINGS``); the values the user set go through
``Config.from_dict`` so a bad value gives a message naming the setting and the value, never a
traceback. Jobs run in a :class:`~trainer.jobs.JobQueue` (one at a time, in a worker thread);
a timer polls the queue for the live status line and the live loss plot.

:class:`TrainTrainUI` holds the handlers as plain methods (tests call them with real values);
:meth:`TrainTrainUI.build` wires them to widgets. Use :func:`create_ui` and :func:`launch`.
"""
from __future__ import annotations

import csv
import hashlib
import inspect
import io
import os
import shutil
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Sequence

import gradio as gr

from .atomic import atomic_write
from .config import (
    BLOCK_IDS,
    MODES,
    SETTINGS,
    Config,
    Setting,
    SettingError,
)
from .jobs import ACTIVE, DONE, FINISHED, RUNNING, JobQueue, QueueError, QueueLockedError, host_runner

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_PRESETS = ROOT / "presets"
CSS_FILE = ROOT / "style.css"
GRADIO_VERSION = tuple(int(x) for x in gr.__version__.split(".")[:2] if x.isdigit())
PAIR_MODES = ("Difference", "ADDifT")
PROMPT_MODES = ("iLECO", "Difference", "ADDifT")
QUEUE_HEADERS = ["Job", "Name", "Mode", "Status", "Result", "Model"]
#: Settings a preset leaves alone when it does not set them (empty, or the default name "untitled"):
#: they belong to the user's job, not to the recipe (shipped presets carry "model": "", "lora_data_directory": "").
PRESET_KEEPS = ("lora_data_directory", "save_lora_name")
IMAGE_LABELS = {"original_image": "Original image", "target_image": "Target image"}
#: The preset list's entries for past runs (save_as_json files in jsons/), as the original lists them there.
RUN_PREFIX = "run: "
#: Slider modes: the LoRA at + strength adds the target's difference, at − it takes it away (the original labels
#: the two sides −/+ there, which its users asked for)
SIDE_MODES = ("ADDifT", "Multi-ADDifT")
SIDE_WIDGETS = ("original_prompt", "target_prompt", "original_image", "target_image")
_PLAIN_LABELS = {"original_prompt": "Original prompt", "target_prompt": "Target prompt (iLECO: empty = erase)",
                 **IMAGE_LABELS}
_SIDE_LABELS = {"original_prompt": "Original prompt (− side)", "target_prompt": "Target prompt (+ side)",
                "original_image": "Original image (− side)", "target_image": "Target image (+ side)"}


def side_labels(mode: str) -> dict[str, str]:
    """The labels of the prompt and image widgets in ``mode``: with their −/+ side in the slider modes."""
    return dict(_SIDE_LABELS if mode in SIDE_MODES else _PLAIN_LABELS)


def _setting_label(s: Setting, mode: str) -> str:
    # Multi-ADDifT: the suffix marks the + side image of each pair (the one without it is the − side)
    if s.name == "diff_target_name" and mode == "Multi-ADDifT":
        return f"{s.label} (marks the + side image; the image without it is the − side)"
    return s.label
POLL_SECONDS = 1.0
#: The Image tab's widgets, in the order TrainTrainUI.make_images takes them.
IMAGE_TAB_INPUTS = ("img_source", "img_upload", "img_output", "img_copies", "img_rotate", "img_angle",
                    "img_downscale", "img_min_scale", "img_fix_side", "img_seed")
#: Shown under the Stop buttons: what each does (the original kept running the queue; ours can do both)
STOP_HELP = ("**Stop and save** ends the running job at its next step and saves what it trained as "
             "`<name>_<steps>steps`. **Cancel without saving** ends it and saves nothing of it (files saved "
             "earlier by `save_per_steps` stay). Then the queue pauses (queued jobs wait for *Run Queue*), "
             "or, with *go on with the next job* ticked, the next queued job starts.")
NO_PRESET = ""

#: Rows before network_blocks are the original's "Required parameters", the rest "Option parameters".
_BLOCKS_AT = [s.name for s in SETTINGS].index("network_blocks")
REQUIRED = tuple(s for s in SETTINGS[:_BLOCKS_AT])
OPTIONS = tuple(s for s in SETTINGS[_BLOCKS_AT + 1:])
#: Settings with a widget in the main panel (all but the Difference-2nd-pass-only flag).
PASS1 = tuple(s for s in SETTINGS if any(s.visible_in(m) for m in MODES))
#: Settings of the 2nd-pass panel (Difference only).
PASS2 = tuple(s for s in SETTINGS if s.visible_in("Difference2"))


def _make(cls, *args, **kw):
    """A gradio component with only the keyword arguments this gradio version knows."""
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return cls(*args, **kw)
    return cls(*args, **{k: v for k, v in kw.items() if k in params})


def _upd(**kw) -> dict:
    return gr.update(**kw)


def _no_change() -> dict:
    return gr.update()


def _plain(update: dict) -> dict:
    """An update's fields without gradio's type marker (to add fields to it)."""
    return {k: v for k, v in dict(update).items() if k != "__type__"}


def _ui_value(s: Setting, value: Any) -> Any:
    """A typed setting value as its widget shows it."""
    v = s.format(value)
    if s.widget == "checkgroup":
        return list(v)
    if s.widget == "checkbox":
        return bool(v)
    return "" if v is None else v


def _choices(s: Setting) -> list | None:
    if s.choices is None:
        return None
    return [str(x) for x in s.format(s.choices)] if s.widget == "checkgroup" else [s.format(c) for c in s.choices]


def _fit_blocks(value: Sequence[str] | None, ids: Sequence[str], shown: Sequence[str] | None = None) -> list[str]:
    """A block selection put on a list of ``ids``: every block of the list it was ticked on (``shown``; unknown:
    a family's complete list, e.g. a shipped preset's SD1.5 26) means every block of the new list; otherwise the
    ticked IDs that still exist stay ticked, in the list's order."""
    value = list(value or [])
    full = set(value) == set(shown) if shown else (not set(value) <= set(ids) and _is_full_family_list(value))
    if value and full:
        return list(ids)
    return [b for b in ids if b in value]


def _is_full_family_list(value: Sequence[str]) -> bool:
    from .models.families import Family
    from .networks.targets import family_block_ids

    try:
        return any(set(value) == set(family_block_ids(f)) for f in Family)
    except Exception:  # noqa: BLE001 - a config that cannot be read: no family list to compare with
        return False


def _hms(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class TrainTrainUI:
    """The Train, Queue and Plot tabs over one host and one queue."""

    def __init__(self, host, *, queue: JobQueue | None = None, lang: str | None = None,
                 preset_dirs: Sequence[Path] | None = None, user_preset_dir: Path | None = None):
        self.host = host
        paths = host.paths()
        self.paths = paths
        # the host may say where the queue's console lines go (the Web-UI: its console)
        self.queue = queue if queue is not None else self._own_queue(host, paths)
        self.lang = lang or getattr(host, "lang", "en")
        workdir = Path(getattr(host, "workdir", ROOT))
        self.user_preset_dir = Path(user_preset_dir) if user_preset_dir else workdir / "presets"
        dirs = list(preset_dirs) if preset_dirs else [SHIPPED_PRESETS]
        self.preset_dirs = [d for d in dirs if Path(d).resolve() != self.user_preset_dir.resolve()]
        self._live_dir = Path(tempfile.mkdtemp(prefix="traintrain-live-"))
        weakref.finalize(self, shutil.rmtree, str(self._live_dir), True)
        self.blocks = None
        self.widgets: dict[str, Any] = {}
        self._initial_blocks: tuple = tuple(BLOCK_IDS)  # the default model's blocks, set by build()
        # held while a prompt preview or a Try it grid is drawn: one at a time, and no training meanwhile
        self._drawing = threading.Lock()

    @staticmethod
    def _own_queue(host, paths) -> JobQueue:
        """The workdir's queue. Standalone, a second app on one workdir is refused (QueueLockedError). Two
        Web-UIs started from one install share this folder: the second keeps a queue of its own beside the
        first's, and says so, rather than losing its tab or rewriting the other's queue."""
        runner, console = host_runner(host), getattr(host, "console", None)
        try:
            return JobQueue(paths.json_dir, runner, console=console)
        except QueueLockedError as e:
            if getattr(host, "name", "") != "webui":
                raise
            own = Path(paths.json_dir) / f"instance-{os.getpid()}"
            queue = JobQueue(own, runner, console=console)
            queue.notice = " ".join(filter(None, [f"{e}. This Web-UI keeps its own queue in {own}.", queue.notice]))
            return queue

    # ------------------------------------------------------------------------------------
    # Values <-> Config
    # ------------------------------------------------------------------------------------
    @property
    def input_names(self) -> list[str]:
        """The order of the values every settings handler takes (the widgets' order)."""
        return (["mode", "model", "vae"] + [f"1:{s.name}" for s in PASS1] + [f"2:{s.name}" for s in PASS2]
                + ["original_prompt", "target_prompt", "negative_prompt", "original_image", "target_image"])

    def values_dict(self, values: Sequence[Any]) -> dict[str, Any]:
        names = self.input_names
        if len(values) != len(names):  # a wiring error, not a user error
            raise RuntimeError(f"TrainTrain UI: {len(values)} values for {len(names)} widgets")
        return dict(zip(names, values))

    def config_from_values(self, values: Sequence[Any]) -> tuple[Config, dict[str, str]]:
        """The widget values -> (Config, image files to keep). Raises SettingError."""
        v = self.values_dict(values)
        mode = v["mode"] or "LoRA"
        d: dict[str, Any] = {"mode": mode, "model": self.host.model_value(v["model"]),
                             "vae": "" if v["vae"] in (None, "", "None") else v["vae"]}
        for s in PASS1:
            d[s.key] = self._raw(s, v[f"1:{s.name}"])
        use_second = bool(v["2:use_2nd_pass_settings"])
        d["use_2nd_pass_settings"] = use_second
        if mode == "Difference" and use_second:
            d["2nd pass"] = {s.key: self._raw(s, v[f"2:{s.name}"]) for s in PASS2}
        else:
            d["2nd pass"] = None
        for attr in ("original_prompt", "target_prompt", "negative_prompt"):
            d[attr] = v[attr] or ""
        files = {}
        for attr in ("original_image", "target_image"):
            path = _image_path(v[attr], attr) if mode in PAIR_MODES else ""  # hidden widgets do not count
            if path:
                files[attr] = path
                d[attr] = path
        return Config.from_dict(d), files

    @staticmethod
    def _raw(s: Setting, value: Any) -> Any:
        if s.widget == "checkgroup":
            return list(value or [])
        if value is None:
            return "" if s.type is not bool else False
        return value

    def precheck(self, cfg: Config) -> None:
        """What can be known before a job is queued: the inputs its mode needs, and an existing file."""
        mode = cfg.mode
        if mode in ("LoRA", "Multi-ADDifT"):
            folder = cfg.lora_data_directory
            if not folder:
                raise SettingError("lora_data_directory: empty (allowed: a folder of training images)",
                                   setting="lora_data_directory", value=folder)
            if not Path(folder).expanduser().is_dir():
                raise SettingError(f'lora_data_directory: "{folder}" is not a folder (allowed: a folder of '
                                   f"training images)", setting="lora_data_directory", value=folder)
        if mode in PAIR_MODES:
            for attr in ("original_image", "target_image"):
                if not getattr(cfg, attr):
                    raise SettingError(f"{attr.replace('_', ' ')}: no image (allowed: an image file; "
                                       f"{mode} needs an original and a target image)", setting=attr, value="")
        if not cfg.save_overwrite:
            out = Path(self.paths.lora_dir) / f"{cfg.save_lora_name}.safetensors"
            if out.exists():
                raise SettingError(f'save_lora_name: "{cfg.save_lora_name}": {out} already exists; choose '
                                   f"another name or turn on save_overwrite", setting="save_lora_name",
                                   value=cfg.save_lora_name)
        from .preflight import check_inputs

        try:  # the mode's inputs, then optimizer / scheduler arguments, network_resume
            check_inputs(cfg)
        except SettingError as e:
            raise SettingError(_name_uploads(str(e), cfg), setting=e.setting, value=e.value) from None
        except ValueError as e:
            raise SettingError(_name_uploads(str(e), cfg)) from None

    def config_updates(self, cfg: Config, model: str | None = None) -> list:
        """Updates for every settings widget (input_names order) showing ``cfg``, with the visibility of its mode.
        ``model``: the Model list's entry now (the preset's own when it sets one): the block lists show its blocks."""
        second = cfg.second_pass or cfg
        # an empty model / VAE means "not set here": the user's choice stays (never the tiny test model)
        out = [_upd(value=cfg.mode), _no_change(), _no_change()]
        model_label = self.host.model_label(cfg.model)
        if cfg.model and model_label in self.host.model_choices():
            out[1] = _upd(value=model_label)
        if cfg.vae and cfg.vae != "None":
            out[2] = _upd(value=cfg.vae)
        defaults = {s.name: s.default for s in PASS1}
        for s in PASS1:
            value = getattr(cfg, s.name)
            label = {"label": _setting_label(s, cfg.mode)} if s.name == "diff_target_name" else {}
            if s.name in PRESET_KEEPS and (value in ("", None) or value == defaults[s.name]):
                out.append(_upd(visible=s.visible_in(cfg.mode), **label))
            else:
                out.append(_upd(value=_ui_value(s, value), visible=s.visible_in(cfg.mode), **label))
        out += [_upd(value=_ui_value(s, getattr(second, s.name))) for s in PASS2]
        if cfg.model and model_label in self.host.model_choices():
            model = model_label
        if model is not None:  # the preset's blocks (SD1.5-style IDs in the shipped ones) on the model's list
            ids = self.block_ids_for(model)
            names = self.input_names
            for key in ("1:network_blocks", "2:network_blocks"):
                i = names.index(key) if key in names else None
                if i is not None:
                    out[i] = _upd(**{**_plain(out[i]), "choices": list(ids),
                                     "value": _fit_blocks(_plain(out[i]).get("value"), ids)})
        labels = side_labels(cfg.mode)
        out += [_upd(value=cfg.original_prompt, label=labels["original_prompt"]),
                _upd(value=cfg.target_prompt, label=labels["target_prompt"]), _upd(value=cfg.negative_prompt)]
        for attr in ("original_image", "target_image"):
            path = getattr(cfg, attr)
            # the picture, not its path: a past run's image lies outside the folders gradio serves, and a path
            # there turned every widget into an "Error" badge; a missing one is left empty (load_preset says so)
            keep = {"value": _read_picture(path)} if path and Path(path).is_file() else {}
            out.append(_upd(label=labels[attr], **keep))
        return out

    # ------------------------------------------------------------------------------------
    # Handlers (plain methods; build() wires them)
    # ------------------------------------------------------------------------------------
    def change_mode(self, mode: str) -> list:
        """Visibility of every pass-1 widget, the labels of the SIDE_WIDGETS (−/+ in slider modes), then the
        2nd-pass panel, the prompt group, the image group (the groups last: load_preset takes those three)."""
        mode = mode if mode in MODES else "LoRA"
        out = [_upd(visible=s.visible_in(mode), label=_setting_label(s, mode)) if s.name == "diff_target_name"
               else _upd(visible=s.visible_in(mode)) for s in PASS1]
        labels = side_labels(mode)
        out += [_upd(label=labels[name]) for name in SIDE_WIDGETS]
        out += [_upd(visible=mode == "Difference"), _upd(visible=mode in PROMPT_MODES),
                _upd(visible=mode in PAIR_MODES)]
        return out

    def copy_first_pass(self, *values) -> list:
        """'Copy settings from 1st pass': the pass-1 values into the 2nd-pass panel."""
        v = self.values_dict(values)
        return [_upd(value=True) if s.name == "use_2nd_pass_settings" else _upd(value=v[f"1:{s.name}"])
                for s in PASS2]

    def start(self, *values) -> list:
        """Start Training: validate, queue, and run the queue. -> [message, queue table, job choices]."""
        return self._enqueue(values, run=True)

    def add_to_queue(self, *values) -> list:
        return self._enqueue(values, run=False)

    def _enqueue(self, values, run: bool) -> list:
        try:
            cfg, files = self.config_from_values(values)
            self.precheck(cfg)
            job = self.queue.add(cfg, files)
        except (SettingError, QueueError) as e:
            return [f"Error: {e}"] + self.queue_view()
        except OSError as e:
            return [f"Error: could not keep the input files ({e})"] + self.queue_view()
        ahead = [j for j in self.queue.jobs() if j.status in ACTIVE and j.id != job.id]
        if run:
            started = not self._drawing.locked() and self.queue.start()
            if self._drawing.locked():  # two jobs on one device: the preview finishes first
                msg = (f"A preview is being drawn on this device: {job.name} (job {job.id}) is queued; press "
                       f"Run Queue when the preview shows")
            elif started and not ahead:
                msg = f"Started {job.name} (job {job.id}, {job.mode})"
            elif started:
                msg = f"Started the queue; {job.name} (job {job.id}) runs after {len(ahead)} job(s) ahead of it"
            else:
                msg = f"Training is running: {job.name} (job {job.id}) is queued behind {len(ahead)} job(s)"
        else:
            msg = f"Added {job.name} to the queue (job {job.id})"
            msg += "; it runs after the current job" if self.queue.busy else "; press Run Queue or Start Training"
        return [f"{msg} · model: {self.job_model(job)}"] + self.queue_view()

    def job_model(self, job) -> str:
        """The model a job trains on, as the Model list names it."""
        return self.host.model_label((job.settings or {}).get("model") or "")

    def stop(self, go_on: bool = False) -> str:
        """Stop and save: the running job saves what it trained; the queue pauses unless ``go_on``."""
        return self.queue.stop(save=True, go_on=bool(go_on))

    def cancel(self, go_on: bool = False) -> str:
        """Cancel without saving: the running job ends and writes nothing more; the queue pauses unless ``go_on``."""
        return self.queue.stop(save=False, go_on=bool(go_on))

    def run_queue(self) -> list:
        if self.queue.busy:
            msg = "The queue is already running"
        elif self._drawing.locked():
            msg = "A preview is being drawn on this device: press Run Queue again when it shows"
        elif self.queue.start():
            msg = f"Running the queue ({len(self.queue.pending())} job(s))"
        else:
            msg = "Nothing is queued"
        return [msg] + self.queue_view()

    def delete_job(self, choice: str | None) -> list:
        if not choice:
            return ["Choose a job to delete"] + self.queue_view()
        try:
            job = self.queue.delete(choice)
        except QueueError as e:
            return [f"Error: {e}"] + self.queue_view()
        return [f"Deleted job {job.id} ({job.name}, {job.status})"] + self.queue_view()

    def clear_finished(self) -> list:
        n = self.queue.clear_finished()
        return [f"Removed {n} finished job(s) from the list"] + self.queue_view()

    def queue_view(self) -> list:
        """[queue table rows, job-choice dropdown update]."""
        rows, choices = [], []
        for j in self.queue.jobs():
            result = j.message
            if j.status == RUNNING:
                lp = self.queue.live()
                if lp and lp.total:
                    result = f"step {lp.step}/{lp.total}"
            rows.append([str(j.id), j.name, j.mode, j.status, result, self.job_model(j)])
            choices.append(f"{j.id}: {j.name} ({j.status})")
        table = _upd(value=rows or [["", "", "", "", "(the queue is empty)", ""]])
        return [table, _upd(choices=choices, value=None)]

    # --- presets ---------------------------------------------------------------------------
    def preset_names(self) -> list[str]:
        """Presets, then the past runs' settings (save_as_json files in jsons/, newest first) as "run: NAME"."""
        names = set()
        for d in [*self.preset_dirs, self.user_preset_dir]:
            if Path(d).is_dir():
                names.update(p.stem for p in Path(d).glob("*.json"))
        return sorted(names, key=str.casefold) + [RUN_PREFIX + p.stem for p in self._past_runs()]

    def _past_runs(self) -> list[Path]:
        folder = Path(self.host.paths().json_dir)
        try:  # the queue's own files (queue.json, queue.broken-*.json) are not runs
            runs = [p for p in folder.glob("*.json") if not p.name.startswith("queue")]
            return sorted(runs, key=lambda p: p.stat().st_mtime, reverse=True)
        except OSError:
            return []

    def preset_path(self, name: str) -> Path | None:
        """The preset file of a listed name; a name that leaves its folder (a crafted request under gradio 3.41,
        which does not check a dropdown's value against its choices) is never opened."""
        if name.startswith(RUN_PREFIX):  # a past run's save_as_json file
            p = _inside(Path(self.host.paths().json_dir), f"{name[len(RUN_PREFIX):]}.json")
            return p if p is not None and p.is_file() else None
        for d in [self.user_preset_dir, *self.preset_dirs]:
            p = _inside(Path(d), f"{name}.json")
            if p is not None and p.is_file():
                return p
        return None

    def refresh_presets(self, current: str | None = None) -> dict:
        names = self.preset_names()
        return _upd(choices=names, value=current if current in names else None)

    def load_preset(self, name: str | None, model: str | None = None) -> list:
        """-> [message] + config_updates(preset) + change_mode(preset mode). ``model``: the Model list's entry."""
        n = len(self.input_names) + 3
        if not name:
            return ["Choose a preset to load"] + [_no_change()] * n
        path = self.preset_path(name)
        if path is None:
            return [f"Error: preset {name!r} was not found in {self.user_preset_dir}"] + [_no_change()] * n
        try:
            cfg = Config.load_preset(path)
        except SettingError as e:
            return [f"Error: {e}"] + [_no_change()] * n
        updates = self.config_updates(cfg, model)
        missing = [f"{IMAGE_LABELS[a]} {getattr(cfg, a)} is gone (upload it again)"
                   for a in ("original_image", "target_image") if getattr(cfg, a) and not Path(getattr(cfg, a)).is_file()]
        what = "past run" if name.startswith(RUN_PREFIX) else "preset"
        return ([f"Loaded {what} {name.removeprefix(RUN_PREFIX)} ({cfg.mode})" + "".join(f"; {m}" for m in missing)]
                + updates + self.change_mode(cfg.mode)[-3:])

    def save_preset(self, name: str, overwrite: bool, *values) -> list:
        """-> [message, preset dropdown update]."""
        try:
            cfg, _files = self.config_from_values(values)
        except SettingError as e:
            return [f"Error: {e}", _no_change()]
        name = (name or "").strip() or cfg.save_lora_name
        bad = set('<>:"/\\|?*') & set(name)
        if bad or name in (".", ".."):
            return [f'Error: preset name "{name}" contains characters a file name cannot have', _no_change()]
        # images and prompts are the job's inputs, not the preset's
        cfg = cfg.replace(original_image="", target_image="")
        path = self.user_preset_dir / f"{name}.json"
        try:
            cfg.save_preset(path, overwrite=bool(overwrite))
        except FileExistsError:
            return [f"Error: preset {name} exists ({path}); tick 'overwrite' or choose another name",
                    _no_change()]
        except OSError as e:
            return [f"Error: could not save {path}: {e}", _no_change()]
        return [f"Preset saved: {path}", self.refresh_presets(name)]

    # --- models ----------------------------------------------------------------------------
    def block_ids_for(self, model: str | None) -> tuple:
        """The block IDs of a Model-list entry's family (SDXL: BASE, IN00–IN08, M00, OUT00–OUT08), asked of the
        host (standalone: the file's header); SD1.5's list when the host cannot tell (the engine maps it)."""
        ask = getattr(self.host, "model_family", None)
        try:
            family = ask(model) if callable(ask) else None
            if family is None:
                return tuple(BLOCK_IDS)
            from .networks.targets import family_block_ids

            return tuple(family_block_ids(family))
        except Exception:  # noqa: BLE001 - a list shown ahead of training never breaks the tab
            return tuple(BLOCK_IDS)

    def change_model(self, model: str | None, blocks1: Sequence[str] | None = None,
                     blocks2: Sequence[str] | None = None, shown: Sequence[str] | None = None) -> list:
        """Model chosen -> [pass-1 block list, 2nd-pass block list, the IDs now shown]: that family's blocks,
        keeping what is ticked (all ticked stays all). ``shown``: the IDs the lists showed until now."""
        ids = list(self.block_ids_for(model))
        shown = list(shown) if shown else list(self._initial_blocks or ())
        return [_upd(choices=ids, value=_fit_blocks(blocks1, ids, shown)),
                _upd(choices=ids, value=_fit_blocks(blocks2, ids, shown)), ids]

    def refresh_models(self, current: str | None = None) -> list:
        if hasattr(self.host, "refresh"):
            self.host.refresh()
        models = self.host.model_choices()
        model = current if current in models else self.host.default_model()
        return [_upd(choices=models, value=model)]

    def refresh_vaes(self, current: str | None = None) -> list:
        if hasattr(self.host, "refresh"):
            self.host.refresh()
        vaes = self.host.vae_choices()
        return [_upd(choices=vaes, value=current if current in vaes else "None")]

    # --- live status and plot ----------------------------------------------------------------
    def status_line(self) -> str:
        lp = self.queue.live()
        queued = len(self.queue.pending())
        tail = f" · {queued} queued" if queued else ""
        if lp is None:
            jobs = [j for j in self.queue.jobs() if j.status in FINISHED]
            if jobs:
                last = max(jobs, key=lambda j: j.finished_at or 0)
                return f"Idle · last: {last.name} (job {last.id}) {last.status}: {last.message}{tail}"
            if self.queue.notice and not self.queue.jobs():  # until the first new job: the old queue is not lost
                return f"Idle · {self.queue.notice}"
            return f"Idle{tail}"
        try:
            model = f" · model: {self.job_model(self.queue.get(lp.job_id))}"
        except QueueError:
            model = ""
        if lp.phase == "train" and lp.total:
            lrs = " ".join(f"{x:.2e}" for x in lp.lrs) or "?"
            sampling = f" · sampling {_hms(lp.sample_s)}" if getattr(lp, "sample_s", 0) else ""
            name = lp.pass_name or lp.name
            return (f"Training {name} (job {lp.job_id}) · step {lp.step}/{lp.total} · loss {lp.loss:.4f} "
                    f"(avg {lp.loss_avg:.4f}) · lr {lrs} · {lp.sec_per_it:.2f} s/it · ETA {_hms(lp.eta_s)}{sampling}{model}{tail}")
        what = {"prepare": "Preparing", "save": "Saving", "done": "Finishing"}.get(lp.phase, lp.phase.title())
        msg = f": {lp.message}" if lp.message else ""
        return f"{what} {lp.name} (job {lp.job_id}){msg}{model}{tail}"

    def job_log(self) -> str:
        """The running or last job's log lines (settings saved, skipped images, warnings, a failure's traceback)."""
        job_id = self.queue.log_job()
        lines = self.queue.log_lines(200)
        if job_id is None:
            return self.queue.notice
        try:
            job = self.queue.get(job_id)
            head = f"Job {job.id} ({job.name}, {job.status}) · model: {self.job_model(job)}"
        except QueueError:
            head = f"Job {job_id}"
        return "\n".join([head, *lines])

    def live_plot(self, last_key: Any = None) -> tuple[Any, Any]:
        """-> (Figure or None when there is nothing new, key of what is drawn)."""
        lp = self.queue.live()
        if lp is None or len(lp.history) < 2:
            return None, last_key
        key = (lp.job_id, lp.pass_name, len(lp.history))
        if key == last_key:
            return None, last_key
        path = self._live_dir / f"job{lp.job_id}.csv"
        _write_history_csv(path, lp.pass_name or lp.name, lp.history)
        from .plot import plot_log

        return plot_log(path), key

    def poll(self, state: dict | None) -> list:
        """Timer tick -> [status line, live plot, queue table, job choices, job log, state]."""
        state = dict(state or {})
        status = self.status_line()
        fig, key = self.live_plot(state.get("plot"))
        plot = _upd(value=fig) if fig is not None else _no_change()
        state["plot"] = key
        version = (self.queue.version, self.queue.live().step if self.queue.live() else None)
        if state.get("queue") != version:
            state["queue"] = version
            table, choices = self.queue_view()
        else:
            table, choices = _no_change(), _no_change()
        text = self.job_log()
        log = _no_change()
        if state.get("log") != text:
            state["log"] = text
            log = _upd(value=text)
        return [status, plot, table, choices, log, state]

    def sample_grids(self, state: dict | None = None) -> list:
        """Timer tick -> [gallery update, state]: the sample grids of the running (else the last) job,
        newest first, so the latest grid shows while training and every grid of the job afterwards."""
        state = dict(state or {})
        job_id = self.queue.live().job_id if self.queue.live() else self.queue.log_job()
        files: list = []
        if job_id is not None:
            try:
                job = self.queue.get(job_id)
                paths = self.host.paths()
                folder = (paths.sample_dir or paths.log_dir.parent / "samples") / job.config().save_lora_name
                since = (job.started_at or 0) - 1  # this job's grids, not an earlier job's of the same name
                files = sorted((f for f in folder.glob("*.png") if f.stat().st_mtime >= since), reverse=True)
            except (QueueError, OSError, ValueError):
                files = []
        key = [str(f) for f in files]
        if state.get("samples") == key:
            return [_no_change(), state]
        state["samples"] = key
        # Sent as pictures, not paths: the standalone app blocks the workdir from gradio's file route
        # (blocked_paths), so a path under samples/ would be refused when the gallery is shown.
        return [_upd(value=[(_read_png(f), Path(f).stem) for f in key] if key else None), state]

    # --- prompt previews (Generate Original / Target / All) and Try it ---------------------------
    def preview_original(self, *values) -> list:
        return self.preview("original", *values)

    def preview_target(self, *values) -> list:
        return self.preview("target", *values)

    def preview_all(self, *values) -> list:
        return self.preview("all", *values)

    def preview(self, which: str, *values) -> list:
        """Generate Original / Target / All -> [message, image]: what the chosen model alone draws for the
        prompt boxes (same seeds for each, the sample_* settings), saved under samples/_previews/."""
        try:
            cfg, _ = self.config_from_values(values)
        except SettingError as e:
            return [f"Error: {e}", _no_change()]
        if cfg.mode not in PROMPT_MODES:
            return [f"Error: {cfg.mode} mode has no prompt boxes to preview (Generate Original / Target / All "
                    f"are for {', '.join(PROMPT_MODES)})", _no_change()]
        boxes = {"original": cfg.original_prompt, "target": cfg.target_prompt}
        roles = list(boxes) if which == "all" else [which]
        from .samples import GridSpec

        spec = GridSpec(prompts=[boxes[r] for r in roles], multipliers=[0.0], seeds=list(cfg.sample_seed),
                        negative_prompt=cfg.sample_negative_prompt or cfg.negative_prompt, steps=cfg.sample_steps,
                        cfg_scale=cfg.sample_cfg_scale, sampler=cfg.sample_sampler,
                        size=tuple(cfg.sample_size or cfg.image_size), clip_skip=cfg.clip_skip,
                        zero_terminal_snr=cfg.model_zero_terminal_snr, v_prediction=cfg.model_v_pred or None)
        model = self.host.model_label(cfg.model)
        title = model  # one line over one column: the rest (sampler, steps, CFG) is in the message and the PNG
        path = _fresh(self._sample_root() / "_previews" / f"{time.strftime('%Y%m%d_%H%M%S')}-{which}.png")

        def draw(components, device):
            from .samples import prompt_preview

            return prompt_preview(components, spec, path, [f"{r.title()} prompt" for r in roles], title)

        return self._draw(f"Generate {which.title()}", cfg, draw,
                          f"seed {', '.join(map(str, spec.seeds))}, {spec.sampler} {spec.steps} steps, "
                          f"CFG {spec.cfg_scale:g}")

    def try_job(self, choice: str | None, prompts: str = "", multipliers: str = "", seeds: str = "") -> list:
        """Try it -> [message, image]: a strength grid (multipliers x prompts x seeds) of a finished job's LoRA
        on the job's model, saved under samples/<save_lora_name>/."""
        if not choice:
            return ["Error: Job: choose a finished job in the Job list, then press Try it", _no_change()]
        try:
            job = self.queue.get(int(str(choice).split(":", 1)[0]))
        except (ValueError, QueueError):
            return [f"Error: Job: {choice!r} is not in the queue (press Try it on a job of the list)", _no_change()]
        if job.status != DONE:
            return [f"Error: Try it needs a finished job: {job.name} (job {job.id}) is {job.status}", _no_change()]
        cfg = job.config()
        lora = _job_lora(job, cfg)
        if lora is None:
            return [f"Error: the LoRA of {job.name} (job {job.id}) is gone ({', '.join(job.files) or 'no file'})",
                    _no_change()]
        from .samples import GridSpec, config_multipliers

        try:
            spec = GridSpec(
                prompts=_lines(prompts) or _default_prompts(cfg),
                multipliers=list(_parse("Try it strengths", "sample_multipliers", multipliers)
                                 or config_multipliers(cfg)),
                seeds=list(_parse("Try it seeds", "sample_seed", seeds) or cfg.sample_seed),
                negative_prompt=cfg.sample_negative_prompt, steps=cfg.sample_steps, cfg_scale=cfg.sample_cfg_scale,
                sampler=cfg.sample_sampler, size=tuple(cfg.sample_size or cfg.image_size), clip_skip=cfg.clip_skip,
                zero_terminal_snr=cfg.model_zero_terminal_snr, v_prediction=cfg.model_v_pred or None)
        except SettingError as e:
            return [f"Error: {e}", _no_change()]
        title = f"{lora.name} on {self.job_model(job)}"  # one line: sampler, steps and CFG go in the message
        path = _fresh(self._sample_root() / cfg.save_lora_name / f"{time.strftime('%Y%m%d_%H%M%S')}-tryit.png")

        def draw(components, device):
            import torch

            from .networks.network import Network
            from .samples import strength_grid

            network = Network.from_file(lora, components.unet, components.text_encoders, dtype=torch.float32)
            network.to(device)
            return strength_grid(components, network, spec, path, title=title)

        return self._draw("Try it", cfg, draw, f"{len(spec.rows)} x {len(spec.multipliers)} images, {spec.sampler} "
                                               f"{spec.steps} steps, CFG {spec.cfg_scale:g}")

    def _sample_root(self) -> Path:
        paths = self.host.paths()
        return Path(getattr(paths, "sample_dir", None) or Path(paths.log_dir).parent / "samples")

    def _draw(self, what: str, cfg: Config, draw, detail: str = "") -> list:
        """Load ``cfg``'s model through the host (inside the Web-UI: under its lock, as training does), run
        ``draw(components, device)`` and show the PNG it saved. Refused while the queue trains: one device,
        one job."""
        running = self.queue.running
        if self.queue.busy:
            who = f"{running.name} (job {running.id})" if running else "the queue"
            return [f"Error: {what} is not drawn while {who} trains on this device; press it again when the "
                    f"queue is idle (Stop ends the job)", _no_change()]
        if not self._drawing.acquire(blocking=False):
            return [f"Error: {what}: another preview is being drawn; wait until it shows", _no_change()]
        t0 = time.perf_counter()
        try:
            if self.queue.busy:  # started between the check above and the lock
                return [f"Error: {what} is not drawn while the queue trains on this device", _no_change()]
            log: list = []
            with self.host.session(cfg, _DrawControl(log)) as components:
                from .samples import sampling_device

                device = sampling_device(components, getattr(self.host, "device", None))
                path = draw(components, device)
                components = None  # the host frees the model when the session ends
        except (ValueError, OSError) as e:  # HostError, a LoRA that does not fit the model, a full disk
            return [f"Error: {what}: {e}", _no_change()]
        except RuntimeError as e:
            from .engine import is_out_of_memory

            if not is_out_of_memory(e):
                raise
            return [f"Error: {what}: out of memory; lower sample_size (now {cfg.sample_size or cfg.image_size}) "
                    f"or the number of prompts and seeds", _no_change()]
        finally:
            self._drawing.release()
        picture = _read_png(path)  # the picture itself: the workdir is not served by the standalone app
        notes = "; ".join(filter(None, [detail, f"{time.perf_counter() - t0:.1f} s", *log]))
        return [f"{what}: {path} ({notes})", _upd(value=picture)]

    # --- Data check (Train tab, LoRA) -------------------------------------------------------
    def check_data(self, *values) -> str:
        """The dataset as training will read it with these settings: counts, buckets, captions, skips."""
        from .data.errors import DataError
        from .data.preview import preview_dataset

        try:
            cfg, _files = self.config_from_values(values)
        except SettingError as e:
            return f"Error: {e}"
        if cfg.mode != "LoRA":
            return f"Check data reads the LoRA mode's image folder; the mode is {cfg.mode}."
        folder = str(cfg.lora_data_directory or "").strip()
        if not folder:
            return "Error: lora_data_directory: empty (allowed: a folder of training images)"
        try:
            report = preview_dataset(
                Path(folder).expanduser(), image_size=cfg.image_size, buckets_step=cfg.image_buckets_step,
                min_length=cfg.image_min_length, max_ratio=cfg.image_max_ratio, num_multiply=cfg.image_num_multiply,
                sub_image_num=cfg.sub_image_num, mirroring=cfg.image_mirroring,
                disable_upscale=cfg.image_disable_upscale, trigger=cfg.lora_trigger_word,
                use_filename_as_tag=cfg.image_use_filename_as_tag)
        except DataError as e:
            return f"Error: {e}"
        return report.text()

    # --- Image tab ---------------------------------------------------------------------------
    def make_images(self, source: str | None, upload: Any, output: str | None, copies: float, rotate: bool,
                    max_angle: float, downscale: bool, min_scale: float, fix_side: str | None, seed: str | None):
        """Dataset preparation (trainer.data.prepare); yields the progress, then the summary."""
        from .data.errors import DataError
        from .data.prepare import PrepareOptions, iter_prepare

        if isinstance(upload, _BadUpload):
            yield f"Error: {upload.message('Or upload one image')}"
            return
        raw_seed = str(seed or "").strip()
        try:
            seed_value = int(raw_seed) if raw_seed else None
        except ValueError:
            yield f'Error: Seed: "{raw_seed}" is not a whole number (or leave it empty for a random one)'
            return
        count = float(copies or 0)
        options = PrepareOptions(copies=int(count) if count.is_integer() else count, rotate=bool(rotate),
                                 max_angle=float(max_angle or 0), downscale=bool(downscale),
                                 min_scale=float(min_scale or 0), fix_side=fix_side or "none", seed=seed_value)
        with tempfile.TemporaryDirectory(prefix="traintrain-image-") as tmp:
            if not str(source or "").strip() and upload is not None:
                source = str(Path(tmp) / "upload.png")  # the copies are named upload_id_<n>.png
                upload.save(source, format="PNG")
            try:
                last = 0.0
                result = None
                for done, total, path, result in iter_prepare(source, output, options):
                    if time.monotonic() - last > 0.5 and done < total:  # not every image: the page keeps up
                        last = time.monotonic()
                        yield f"{done} of {total} inputs done ({len(result.written)} images written): {path.name}"
            except DataError as e:
                yield f"Error: {e}"
                return
            except OSError as e:  # a full disk, an unwritable output folder
                yield f"Error: writing to the output folder {output!r}: {e}"
                return
        yield result.summary() if result is not None else "Nothing was done."

    # --- Plot tab ----------------------------------------------------------------------------
    def log_files(self) -> list[str]:
        """CSV logs under logs/ (only there: bug #20), newest first, relative to it."""
        root = Path(self.paths.log_dir)
        if not root.is_dir():
            return []
        files = sorted(root.rglob("*.csv"), key=lambda p: p.stat().st_mtime, reverse=True)
        return [str(p.relative_to(root)) for p in files]

    def refresh_logs(self) -> dict:
        files = self.log_files()
        return _upd(choices=files, value=files[0] if files else None)

    def draw_log(self, name: str | None) -> list:
        """-> [plot, message]."""
        from .plot import plot_log

        if not name:
            files = self.log_files()
            if not files:
                return [None, f"No CSV logs in {self.paths.log_dir} yet (turn on logging_save_csv)"]
            name = files[0]
        root = Path(self.paths.log_dir).resolve()
        path = (root / name).resolve()
        if root not in path.parents or not path.is_file():
            return [None, f"Error: {name} is not a log file in {root}"]
        try:
            fig = plot_log(path)
        except (OSError, ValueError) as e:
            return [None, f"Error: {e}"]
        return [fig, f"{path}"]

    # ------------------------------------------------------------------------------------
    # Layout and wiring
    # ------------------------------------------------------------------------------------
    def _widget(self, s: Setting, prefix: str, mode: str, value: Any = None):
        value = _ui_value(s, s.default if value is None else value)
        help_text = s.help_ja if self.lang == "ja" else s.help_en
        common = dict(label=s.label if prefix == "tt2_" else _setting_label(s, mode), elem_id=f"{prefix}{s.name}",
                      info=help_text,
                      visible=prefix == "tt2_" or s.visible_in(mode))
        if s.widget == "dropdown":
            return _make(gr.Dropdown, choices=_choices(s), value=value, allow_custom_value=not s.strict_choices
                         or s.allow_empty, **common)
        if s.widget == "checkbox":
            return _make(gr.Checkbox, value=value, **common)
        if s.widget == "checkgroup" and s.name == "network_blocks":  # the default model's family's blocks
            ids = list(self._initial_blocks)
            return _make(gr.CheckboxGroup, choices=ids, value=_fit_blocks(value, ids), **common)
        if s.widget == "checkgroup":
            return _make(gr.CheckboxGroup, choices=_choices(s), value=value, **common)
        if s.widget == "radio":
            return _make(gr.Radio, choices=_choices(s), value=value, **common)
        multiline = s.type is dict or s.name == "sample_prompts"  # one prompt a line
        return _make(gr.Textbox, value=value, lines=2 if multiline else 1, max_lines=8 if multiline else 1, **common)

    def _grid(self, rows: Sequence[Setting], prefix: str, mode: str, out: dict) -> None:
        cols = 3
        per = -(-len(rows) // cols)
        with gr.Row():
            for c in range(cols):
                with _make(gr.Column, min_width=240):
                    for s in rows[c * per:(c + 1) * per]:
                        out[s.name] = self._widget(s, prefix, mode)

    def build(self, mode: str = "LoRA") -> "gr.Blocks":
        w = self.widgets
        self._initial_blocks = self.block_ids_for(self.host.default_model())
        blocks_kw = {"analytics_enabled": False, "title": "TrainTrain"}
        if GRADIO_VERSION < (5, 0) and CSS_FILE.is_file():
            blocks_kw["css"] = CSS_FILE.read_text(encoding="utf-8")
        with _make(gr.Blocks, **blocks_kw) as blocks:
            with gr.Tabs(elem_id="tt_tabs"):
                with gr.Tab("Train", elem_id="tt_tab_train"):
                    self._build_train(w, mode)
                with gr.Tab("Plot", elem_id="tt_tab_plot"):
                    self._build_plot(w)
                with gr.Tab("Image", elem_id="tt_tab_image"):
                    self._build_image(w)
            self._wire(blocks, w)
        self.blocks = blocks
        return blocks

    def _build_train(self, w: dict, mode: str) -> None:
        with gr.Row(elem_id="tt_top"):
            with _make(gr.Column, scale=3):
                w["message"] = _make(gr.Textbox, label="Message", elem_id="tt_message", interactive=False, lines=1,
                                     max_lines=6, value=self.queue.notice)
                w["status"] = _make(gr.Textbox, label="Status", elem_id="tt_status", interactive=False,
                                    value=self.status_line(), lines=1, max_lines=2)
            with _make(gr.Column, scale=2, min_width=320):
                with gr.Row():
                    w["start"] = _make(gr.Button, "Start Training", variant="primary", elem_id="tt_start")
                    w["stop"] = _make(gr.Button, "Stop and save", variant="stop", elem_id="tt_stop")
                    w["queue_add"] = _make(gr.Button, "Add to Queue", elem_id="tt_queue_add")
                with gr.Row(elem_id="tt_stop_row"):
                    w["cancel"] = _make(gr.Button, "Cancel without saving", variant="stop", elem_id="tt_cancel",
                                        size="sm")
                    w["stop_go_on"] = _make(gr.Checkbox, label="go on with the next job after Stop / Cancel",
                                            value=False, elem_id="tt_stop_go_on")
                w["stop_help"] = _make(gr.Markdown, STOP_HELP, elem_id="tt_stop_help")
                with gr.Row(elem_id="tt_preset_row"):
                    w["preset"] = _make(gr.Dropdown, choices=self.preset_names(), value=None, label="Preset",
                                        elem_id="tt_preset", scale=3)
                    w["preset_load"] = _make(gr.Button, "Load", elem_id="tt_preset_load", size="sm",
                                             elem_classes=["tt-tool"])
                    w["preset_refresh"] = _make(gr.Button, "Refresh", elem_id="tt_preset_refresh", size="sm",
                                                elem_classes=["tt-tool"])
                with gr.Row(elem_id="tt_preset_save_row"):
                    w["preset_name"] = _make(gr.Textbox, label="Save preset as", elem_id="tt_preset_name",
                                             placeholder="empty: the save_lora_name", scale=3)
                    w["preset_overwrite"] = _make(gr.Checkbox, label="overwrite", value=False,
                                                  elem_id="tt_preset_overwrite")
                    w["preset_save"] = _make(gr.Button, "Save", elem_id="tt_preset_save", size="sm",
                                             elem_classes=["tt-tool"])
        with gr.Row():
            with _make(gr.Column, scale=3):
                w["live_plot"] = _make(gr.Plot, label="Loss (live)", elem_id="tt_live_plot")
                w["samples"] = _make(gr.Gallery, label="Sample grids (sample_every_n_steps; newest first)",
                                     elem_id="tt_samples", columns=2, height="auto", object_fit="contain",
                                     format="png")  # sharp labels (gradio 4+: webp)
                w["samples_state"] = gr.State({})
                with _make(gr.Accordion, "Job log", open=False, elem_id="tt_log_acc"):
                    w["job_log"] = _make(gr.Textbox, label="Running or last job", elem_id="tt_job_log",
                                         interactive=False, lines=6, max_lines=20, value=self.job_log())
            with _make(gr.Column, scale=2):
                with _make(gr.Accordion, "Queue", open=True, elem_id="tt_queue_acc"):
                    w["queue_table"] = _make(gr.Dataframe, headers=QUEUE_HEADERS, value=self.queue_view()[0]["value"],
                                             interactive=False, wrap=True, elem_id="tt_queue_table",
                                             datatype=["str"] * len(QUEUE_HEADERS))
                    with gr.Row():
                        w["job_choice"] = _make(gr.Dropdown, choices=self.queue_view()[1]["choices"], value=None,
                                                label="Job", elem_id="tt_job_choice", scale=3)
                        w["job_delete"] = _make(gr.Button, "Delete", elem_id="tt_job_delete", size="sm")
                        w["try_run"] = _make(gr.Button, "Try it", elem_id="tt_try_run", size="sm")
                    with gr.Row():
                        w["queue_run"] = _make(gr.Button, "Run Queue", elem_id="tt_queue_run", size="sm")
                        w["queue_clear"] = _make(gr.Button, "Clear finished", elem_id="tt_queue_clear", size="sm")
                with _make(gr.Accordion, "Try it: the chosen finished job's LoRA at several strengths", open=False,
                           elem_id="tt_try_acc"):
                    w["try_prompts"] = _make(gr.Textbox, label="Try it prompts (one a line)", lines=2, max_lines=8,
                                             elem_id="tt_try_prompts", placeholder="empty: the job's sample prompts")
                    with gr.Row():
                        w["try_multipliers"] = _make(gr.Textbox, label="Try it strengths", elem_id="tt_try_multipliers",
                                                     placeholder="e.g. 0, 0.5, 1; empty: the job's sample_multipliers")
                        w["try_seeds"] = _make(gr.Textbox, label="Try it seeds", elem_id="tt_try_seeds",
                                               placeholder="e.g. 0, 1; empty: the job's sample_seed")
                w["try_image"] = _make(gr.Image, label="Try it grid (rows: prompt x seed, columns: strength)",
                                       type="pil", interactive=False, elem_id="tt_try_image",
                                       format="png")  # sharp labels (gradio 4+: webp)
        w["mode"] = _make(gr.Radio, choices=list(MODES), value=mode, label="Mode", elem_id="tt_mode")
        with gr.Row():
            w["model"] = _make(gr.Dropdown, choices=self.host.model_choices(), value=self.host.default_model(),
                               label="Model", elem_id="tt_model", scale=4)
            w["model_refresh"] = _make(gr.Button, "Refresh", elem_id="tt_model_refresh", size="sm",
                                       elem_classes=["tt-tool"])
            w["vae"] = _make(gr.Dropdown, choices=self.host.vae_choices(), value="None", label="VAE",
                             elem_id="tt_vae", scale=3)
            w["vae_refresh"] = _make(gr.Button, "Refresh", elem_id="tt_vae_refresh", size="sm", elem_classes=["tt-tool"])
        with _make(gr.Column, visible=mode in PROMPT_MODES, elem_id="tt_prompts") as w["prompt_group"]:
            with gr.Row():
                w["original_prompt"] = _make(gr.Textbox, label=side_labels(mode)["original_prompt"], lines=2,
                                             elem_id="tt_original_prompt")
                w["target_prompt"] = _make(gr.Textbox, label=side_labels(mode)["target_prompt"], lines=2,
                                           elem_id="tt_target_prompt")
                w["negative_prompt"] = _make(gr.Textbox, label="Negative prompt", lines=2,
                                             elem_id="tt_negative_prompt")
            # the original's buttons: see what each prompt gives on the model before training on it
            with gr.Row(elem_id="tt_preview_row"):
                w["gen_original"] = _make(gr.Button, "Generate Original", elem_id="tt_gen_original", size="sm")
                w["gen_target"] = _make(gr.Button, "Generate Target", elem_id="tt_gen_target", size="sm")
                w["gen_all"] = _make(gr.Button, "Generate All", elem_id="tt_gen_all", size="sm")
            w["preview_image"] = _make(gr.Image, label="Prompt preview: the model alone, same seed (sample_* settings)",
                                       type="pil", interactive=False, elem_id="tt_preview_image",
                                       format="png")  # sharp labels (gradio 4+: webp)
        with _make(gr.Column, visible=mode in PAIR_MODES, elem_id="tt_images") as w["image_group"]:
            with gr.Row():
                # type="pil", not "filepath": Forge replaces gradio 4's save_pil_to_cache with a function
                # without its name= argument, so a "filepath" image fails in gradio before any handler runs
                w["original_image"] = _make(gr.Image, label=side_labels(mode)["original_image"], type="pil",
                                            image_mode="RGBA", elem_id="tt_original_image")
                w["target_image"] = _make(gr.Image, label=side_labels(mode)["target_image"], type="pil",
                                          image_mode="RGBA", elem_id="tt_target_image")
                for attr in IMAGE_LABELS:
                    _guard_preprocess(w[attr], IMAGE_LABELS[attr])
        pass1: dict[str, Any] = {}
        _make(gr.Markdown, "### Required parameters")
        self._grid([s for s in REQUIRED if s in PASS1], "tt_", mode, pass1)
        # LoRA data check: what training will read (buckets, captions, skips), seconds, no model
        with _make(gr.Column, visible=mode == "LoRA", elem_id="tt_data_check") as w["data_check_group"]:
            w["data_check"] = _make(gr.Button, "Check data", elem_id="tt_data_check_button", size="sm")
            w["data_report"] = _make(gr.Textbox, label="Data check (lora_data_directory with the current settings)",
                                     interactive=False, lines=1, max_lines=20, elem_id="tt_data_report")
        blocks_setting = next(s for s in PASS1 if s.name == "network_blocks")
        pass1["network_blocks"] = self._widget(blocks_setting, "tt_", mode)
        _make(gr.Markdown, "### Option parameters")
        self._grid([s for s in OPTIONS if s in PASS1], "tt_", mode, pass1)
        w["pass1"] = [pass1[s.name] for s in PASS1]
        pass2: dict[str, Any] = {}
        with _make(gr.Column, visible=mode == "Difference", elem_id="tt_second") as w["second_group"]:
            with _make(gr.Accordion, "2nd pass (Difference)", open=False, elem_id="tt_second_acc"):
                w["copy_first"] = _make(gr.Button, "Copy settings from 1st pass", elem_id="tt_copy_first", size="sm")
                flag = next(s for s in PASS2 if s.name == "use_2nd_pass_settings")
                pass2[flag.name] = self._widget(flag, "tt2_", mode)
                self._grid([s for s in PASS2 if s is not flag], "tt2_", mode, pass2)
        w["pass2"] = [pass2[s.name] for s in PASS2]
        w["settings"] = ([w["mode"], w["model"], w["vae"]] + w["pass1"] + w["pass2"]
                         + [w[k] for k in ("original_prompt", "target_prompt", "negative_prompt",
                                           "original_image", "target_image")])
        w["poll_state"] = gr.State({})
        w["blocks_shown"] = gr.State(list(self._initial_blocks))  # the block IDs the lists show (per page)

    def _build_plot(self, w: dict) -> None:
        files = self.log_files()
        with gr.Row():
            w["log_file"] = _make(gr.Dropdown, choices=files, value=files[0] if files else None,
                                  label=f"Log file (CSV in {self.paths.log_dir})", elem_id="tt_log_file", scale=4)
            w["log_refresh"] = _make(gr.Button, "Refresh", elem_id="tt_log_refresh", size="sm", elem_classes=["tt-tool"])
            w["log_draw"] = _make(gr.Button, "Draw", elem_id="tt_log_draw", variant="primary")
        w["log_message"] = _make(gr.Textbox, label="File", interactive=False, elem_id="tt_log_message")
        w["log_plot"] = _make(gr.Plot, label="Loss and learning rate", elem_id="tt_log_plot")

    def _build_image(self, w: dict) -> None:
        from .data.prepare import FIX_SIDES, MAX_COPIES, PrepareOptions

        d = PrepareOptions()
        _make(gr.Markdown, "Make a dataset bigger: randomly rotated and/or downscaled copies of each image (PNG "
                           "with transparency, which training masks out), captions copied along. The inputs are "
                           "never changed and no existing file is overwritten.")
        with gr.Row():
            w["img_source"] = _make(gr.Textbox, label="Input: a folder of images or one image file",
                                    elem_id="tt_img_source", scale=3)
            w["img_output"] = _make(gr.Textbox, label="Output folder (not the input folder)", elem_id="tt_img_output",
                                    scale=3)
        w["img_upload"] = _make(gr.Image, label="Or upload one image (used when Input is empty)", type="pil",
                                image_mode="RGBA", elem_id="tt_img_upload")
        _guard_preprocess(w["img_upload"], "Image tab")
        with gr.Row():
            w["img_copies"] = _make(gr.Slider, minimum=1, maximum=MAX_COPIES, step=1, value=d.copies,
                                    label="Number of images per input", elem_id="tt_img_copies")
            w["img_seed"] = _make(gr.Textbox, label="Seed (empty: random)", elem_id="tt_img_seed")
        with gr.Row():
            w["img_rotate"] = _make(gr.Checkbox, value=d.rotate, label="Random rotation", elem_id="tt_img_rotate")
            w["img_angle"] = _make(gr.Slider, minimum=0, maximum=180, step=1, value=d.max_angle,
                                   label="Max tilting angle (degrees, either way)", elem_id="tt_img_angle")
        with gr.Row():
            w["img_downscale"] = _make(gr.Checkbox, value=d.downscale, label="Random downscale",
                                       elem_id="tt_img_downscale")
            w["img_min_scale"] = _make(gr.Slider, minimum=0.05, maximum=1, step=0.05, value=d.min_scale,
                                       label="Min scale", elem_id="tt_img_min_scale")
            w["img_fix_side"] = _make(gr.Radio, choices=list(FIX_SIDES), value=d.fix_side,
                                      label="Fix side (where the downscaled picture sits)", elem_id="tt_img_fix_side")
        w["img_run"] = _make(gr.Button, "Make images", variant="primary", elem_id="tt_img_run")
        w["img_message"] = _make(gr.Textbox, label="Result", interactive=False, lines=1, max_lines=20,
                                 elem_id="tt_img_message")

    def _wire(self, blocks, w: dict) -> None:
        settings = w["settings"]
        queue_out = [w["message"], w["queue_table"], w["job_choice"]]
        visibility = (w["pass1"] + [w[name] for name in SIDE_WIDGETS]
                      + [w["second_group"], w["prompt_group"], w["image_group"]])
        w["mode"].change(self.change_mode, inputs=[w["mode"]], outputs=visibility)
        w["mode"].change(lambda m: _upd(visible=m == "LoRA"), inputs=[w["mode"]], outputs=[w["data_check_group"]])
        w["data_check"].click(self.check_data, inputs=settings, outputs=[w["data_report"]])
        w["start"].click(self.start, inputs=settings, outputs=queue_out)
        w["queue_add"].click(self.add_to_queue, inputs=settings, outputs=queue_out)
        # Stop bypasses the event queue, so it is not held up behind the polling events
        w["stop"].click(self.stop, inputs=[w["stop_go_on"]], outputs=[w["message"]], **_unqueued(w["stop"].click))
        w["cancel"].click(self.cancel, inputs=[w["stop_go_on"]], outputs=[w["message"]],
                          **_unqueued(w["cancel"].click))
        w["queue_run"].click(self.run_queue, inputs=None, outputs=queue_out)
        w["queue_clear"].click(self.clear_finished, inputs=None, outputs=queue_out)
        w["job_delete"].click(self.delete_job, inputs=[w["job_choice"]], outputs=queue_out)
        w["try_run"].click(self.try_job, inputs=[w["job_choice"], w["try_prompts"], w["try_multipliers"],
                                                 w["try_seeds"]], outputs=[w["message"], w["try_image"]])
        for which in ("original", "target", "all"):
            w[f"gen_{which}"].click(getattr(self, f"preview_{which}"), inputs=settings,
                                    outputs=[w["message"], w["preview_image"]])
        w["preset_refresh"].click(self.refresh_presets, inputs=[w["preset"]], outputs=[w["preset"]])
        w["preset_load"].click(self.load_preset, inputs=[w["preset"], w["model"]],
                               outputs=[w["message"]] + settings + visibility[-3:])
        w["preset_save"].click(self.save_preset, inputs=[w["preset_name"], w["preset_overwrite"]] + settings,
                               outputs=[w["message"], w["preset"]])
        w["copy_first"].click(self.copy_first_pass, inputs=settings, outputs=w["pass2"])
        w["model_refresh"].click(self.refresh_models, inputs=[w["model"]], outputs=[w["model"]])
        blocks_lists = [p for p in (w["pass1"] + w["pass2"]) if getattr(p, "elem_id", "").endswith("_network_blocks")]
        w["model"].change(self.change_model, inputs=[w["model"], *blocks_lists, w["blocks_shown"]],
                          outputs=[*blocks_lists, w["blocks_shown"]])
        w["vae_refresh"].click(self.refresh_vaes, inputs=[w["vae"]], outputs=[w["vae"]])
        w["log_refresh"].click(self.refresh_logs, inputs=None, outputs=[w["log_file"]])
        w["img_run"].click(self.make_images, inputs=[w[k] for k in IMAGE_TAB_INPUTS], outputs=[w["img_message"]])
        w["log_draw"].click(self.draw_log, inputs=[w["log_file"]], outputs=[w["log_plot"], w["log_message"]])
        w["log_file"].change(self.draw_log, inputs=[w["log_file"]], outputs=[w["log_plot"], w["log_message"]])
        poll_out = [w["status"], w["live_plot"], w["queue_table"], w["job_choice"], w["job_log"], w["poll_state"]]
        if hasattr(gr, "Timer"):  # gradio >= 4.40 (Forge, standalone)
            w["timer"] = gr.Timer(POLL_SECONDS)
            w["timer"].tick(self.poll, inputs=[w["poll_state"]], outputs=poll_out, **_quiet(w["timer"].tick))
            w["timer"].tick(self.sample_grids, inputs=[w["samples_state"]], outputs=[w["samples"], w["samples_state"]],
                            **_quiet(w["timer"].tick))
        else:  # gradio 3.41 (A1111): a load event that repeats; needs the queue, which the Web-UI enables
            blocks.load(self.poll, inputs=[w["poll_state"]], outputs=poll_out, every=POLL_SECONDS,
                        **_quiet(blocks.load))
            blocks.load(self.sample_grids, inputs=[w["samples_state"]], outputs=[w["samples"], w["samples_state"]],
                        every=POLL_SECONDS, **_quiet(blocks.load))


class _DrawControl:
    """What host.session asks of a job's control, for a preview: its log lines are kept for the message."""

    stop_requested = False

    def __init__(self, lines: list):
        self.lines = lines

    def log(self, message: str) -> None:
        self.lines.append(message)

    def progress(self, p) -> None:
        pass


def _fresh(path: Path) -> Path:
    """``path``, or ``path`` with -2, -3 ... when a grid of the same second exists (never overwritten)."""
    n, out = 1, path
    while out.exists():
        n += 1
        out = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return out


def _lines(text: str | None) -> list[str]:
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def _parse(label: str, setting: str, raw: str | None):
    """A Try it box parsed like the setting it mirrors; empty = None. Errors name the box."""
    from .config import get_setting

    if not (raw or "").strip():
        return None
    try:
        return get_setting(setting).parse(raw)
    except SettingError as e:
        raise SettingError(f"{label}{str(e)[len(setting):]}", setting=setting, value=raw) from None


def _default_prompts(cfg: Config) -> list[str]:
    """Try it's prompts when the box is empty: the job's sample_prompts, its mode's prompts, its trigger word."""
    from .samples import config_prompts

    if cfg.sample_prompts.strip():
        return config_prompts(cfg)
    try:
        from .modes import mode_for

        prompts = [p for p in mode_for(cfg.mode).sample_prompts(cfg) if p.strip()]
    except (AttributeError, NotImplementedError):  # modes whose prompts come from data read while training
        prompts = []
    return list(dict.fromkeys(prompts))[:2] or [cfg.lora_trigger_word.strip()]


def _job_lora(job, cfg: Config) -> Path | None:
    """The LoRA a finished job saved: the file named save_lora_name (Difference also saves a copier)."""
    files = [Path(f) for f in job.files if str(f).endswith(".safetensors") and Path(f).is_file()]
    named = [f for f in files if f.stem == cfg.save_lora_name]
    return (named or files or [None])[-1]


def _unqueued(listener) -> dict:
    try:
        params = inspect.signature(listener).parameters
    except (TypeError, ValueError):
        return {}
    return {"queue": False} if "queue" in params else {}


def _quiet(listener) -> dict:
    """Event options that keep a polling event from flashing the progress overlay."""
    try:
        params = inspect.signature(listener).parameters
    except (TypeError, ValueError):
        return {}
    return {"show_progress": "hidden"} if "show_progress" in params else {}


class _BadUpload:
    """What an image widget gives the handler when gradio could not read the upload (a decompression bomb,
    a damaged file): the handler answers with one line naming the widget instead of a gradio toast."""

    def __init__(self, label: str, error: BaseException):
        self.label, self.error = label, error

    def message(self, attr: str) -> str:
        return (f"{attr}: the {self.label} upload could not be read ({type(self.error).__name__}: {self.error}); "
                f"allowed: a PNG/JPEG/WebP image below Pillow's limit of {_pixel_limit()} pixels")


def _pixel_limit() -> str:
    from PIL import Image

    return f"{Image.MAX_IMAGE_PIXELS:,}" if Image.MAX_IMAGE_PIXELS else "no"


def _guard_preprocess(widget, label: str) -> None:
    """Wrap the widget's preprocess (gradio 3.41, 4, 6 all call ``block.preprocess``) so an unreadable upload
    reaches the handler as a _BadUpload."""
    inner = widget.preprocess

    def preprocess(payload):
        try:
            return inner(payload)
        except Exception as e:  # noqa: BLE001 - any decoding error of the upload
            return _BadUpload(label, e)

    widget.preprocess = preprocess


def _upload_roots() -> list[Path]:
    """Where an image a request names by path may be: the tab's own uploads and gradio's upload cache."""
    tmp = Path(tempfile.gettempdir())
    roots = [tmp / "traintrain-uploads", tmp / "gradio"]
    if os.environ.get("GRADIO_TEMP_DIR"):
        roots.append(Path(os.environ["GRADIO_TEMP_DIR"]))
    return [r.resolve() for r in roots]


def _inside(root: Path, name: str) -> Path | None:
    """``root/name`` resolved, or None when it is not inside ``root`` (``..``, an absolute name, a link out)."""
    if not name or "\x00" in name:
        return None
    root = root.resolve()
    path = (root / name).resolve()
    return path if root in path.parents else None


def _image_path(value: Any, attr: str = "original_image") -> str:
    """A path for an image widget's value: gr.Image(type="pil") gives a PIL image (saved here as a PNG
    named by its content, the queue then copies it). A path, or a dict with "path"/"name", is kept only
    inside the upload folders: a request must not make the queue copy an arbitrary file."""
    if isinstance(value, _BadUpload):
        raise SettingError(value.message(attr), setting=attr, value=value.label)
    if hasattr(value, "save") and hasattr(value, "mode"):  # a PIL image
        return _save_upload(value)
    if not value:
        return ""
    if isinstance(value, dict):
        value = value.get("path") or value.get("name") or ""
    path = Path(str(value)).resolve()
    if not any(root in path.parents for root in _upload_roots()):
        raise SettingError(f"{attr}: {str(value)!r} is not an image uploaded in the {IMAGE_LABELS[attr]} widget "
                           f"(allowed: an upload of this tab)", setting=attr, value=str(value))
    return str(path)


def _name_uploads(message: str, cfg: Config) -> str:
    """Error messages name the widgets ("Original image"), not the temp files the uploads were saved as."""
    for attr, label in IMAGE_LABELS.items():
        path = getattr(cfg, attr, "")
        if path and any(root in Path(path).resolve().parents for root in _upload_roots()):
            message = message.replace(repr(str(path)), label).replace(str(path), label)
    return message


def _save_upload(img) -> str:
    """``img`` as a PNG in the temp folder's traintrain-uploads/, named by its bytes (the same image, the same file)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    data = buf.getvalue()
    path = Path(tempfile.gettempdir()) / "traintrain-uploads" / f"{hashlib.sha1(data).hexdigest()[:20]}.png"
    if not path.is_file():
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    return str(path)


def _write_history_csv(path: Path, name: str, history: list) -> None:
    """The running pass's history in the engine's CSV layout, for plot_log."""
    n_lr = max((len(h[3]) for h in history), default=0)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        wr = csv.writer(f)
        wr.writerow(["save_lora_name", name])
        wr.writerow(["Step", "Loss", "Loss (smoothed)"] + [f"Learning Rate {i + 1}" for i in range(n_lr)])
        for step, loss, smooth, lrs in history:
            wr.writerow([step, f"{loss:.6g}", f"{smooth:.6g}"] + [f"{x:.6g}" for x in lrs])
    os.replace(tmp, path)


def create_ui(host, **kw) -> TrainTrainUI:
    """A TrainTrainUI over ``host`` with its Blocks built (``ui.blocks``)."""
    ui = TrainTrainUI(host, **kw)
    ui.build()
    return ui


def _read_picture(path):
    """An image file as a PIL picture for an image widget (RGBA kept), the file closed again; None if unreadable."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except (OSError, ValueError):
        return None


def _read_png(path):
    """A grid PNG as an RGB picture, the file closed again."""
    from PIL import Image

    with Image.open(path) as img:
        return img.convert("RGB")


def blocked_paths(host) -> list[str]:
    """Folders the standalone app never serves through gradio's file route: the queue and settings JSONs
    (every job's settings and absolute paths), logs, LoRAs, cache, presets, models, the uploads. The page
    needs none of them (plots are sent as images, uploads go through gradio's own cache). gradio 6 serves
    only allowed and created files; 3.41 and 4.x also serve the current folder, hence the block list."""
    paths = host.paths()
    gradio_tmp = Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio").resolve()
    out = [paths.json_dir, paths.log_dir, paths.lora_dir, getattr(paths, "cache_dir", None),
           Path(tempfile.gettempdir()) / "traintrain-uploads", getattr(host, "model_dir", None),
           getattr(host, "vae_dir", None)]
    workdir = getattr(host, "workdir", None)
    for folder in (workdir, Path.cwd()):
        # the whole folder too, unless gradio's own upload cache is inside it (uploads must still show)
        if folder is not None and not (gradio_tmp == Path(folder).resolve() or Path(folder).resolve() in gradio_tmp.parents):
            out.append(folder)
    if workdir is not None:
        out.append(Path(workdir) / "presets")
    return sorted({str(Path(p).resolve()) for p in out if p})


def launch(host, *, port: int = 7860, listen: bool = False, lang: str = "en", block: bool = True,
           auth: tuple[str, str] | None = None) -> TrainTrainUI:
    """Serve the tab standalone on 127.0.0.1 (all interfaces only with ``listen``); ``auth`` = (user, password)
    turns on gradio's own login."""
    ui = create_ui(host, lang=lang)
    blocks = ui.blocks
    blocks.queue()
    kw: dict[str, Any] = dict(server_name="0.0.0.0" if listen else "127.0.0.1", server_port=port,
                              prevent_thread_lock=not block, show_error=True)
    params = inspect.signature(blocks.launch).parameters
    if "css" in params and CSS_FILE.is_file() and GRADIO_VERSION >= (5, 0):
        kw["css"] = CSS_FILE.read_text(encoding="utf-8")
    if "blocked_paths" in params:
        kw["blocked_paths"] = blocked_paths(host)
    if auth:
        kw["auth"] = auth
    blocks.launch(**{k: v for k, v in kw.items() if k in params})
    return ui
