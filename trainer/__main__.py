"""`python -m trainer train|demo|plot|settings|ui`."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path


class ProgressPrinter:
    """One updating line on a terminal (a line per update elsewhere, throttled)."""

    def __init__(self, stream=None, every_s: float = 0.5):
        self.stream = stream or sys.stderr  # the stderr of now, not of the import (tests swap it)
        self.tty = self.stream.isatty()
        self.every_s = every_s if self.tty else 5.0
        self._last = 0.0

    def __call__(self, p) -> None:
        if p.phase != "train":
            if p.message and p.phase != "save":  # the engine says "Saved <path>" (or why not) itself
                self._line(f"{p.phase}: {p.message}", final=True)
            return
        now = time.monotonic()
        if p.step < p.total and now - self._last < self.every_s:
            return
        self._last = now
        width = 24
        filled = int(width * p.step / max(1, p.total))
        lrs = " ".join(f"{lr:.2e}" for lr in p.lrs)
        text = (f"[{'#' * filled}{'.' * (width - filled)}] {p.step}/{p.total} loss {p.loss:.4f} "
                f"(avg {p.loss_avg:.4f}) lr {lrs} {p.sec_per_it:.2f} s/it ETA {_hms(p.eta_s)}")
        if getattr(p, "sample_s", 0):
            text += f" (sampling {_hms(p.sample_s)})"
        self._line(text, final=p.step >= p.total)

    def _line(self, text: str, final: bool) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


def _hms(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    from .config import add_arguments

    p.add_argument("--preset", help="a preset JSON (presets/*.json or one saved with save_as_json)")
    p.add_argument("--mode", help="training mode; overrides the preset's")
    p.add_argument("--model", default=None, help="checkpoint file or diffusers folder; empty: the tiny built-in model")
    p.add_argument("--vae", default=None, help="separate VAE file (optional)")
    p.add_argument("--model-dir", type=Path, default=None, help="folder to look for --model and --vae names in")
    p.add_argument("--embeddings-dir", type=Path, default=None,
                   help="folder of textual-inversion embeddings (.safetensors) whose names prompts and captions may use")
    p.add_argument("--data", default=None, help="image folder (sets lora_data_directory)")
    p.add_argument("--original-prompt", default=None)
    p.add_argument("--target-prompt", default=None)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--original-image", default=None)
    p.add_argument("--target-image", default=None)
    p.add_argument("--workdir", type=Path, default=Path("."),
                   help="where output/ (LoRA files), logs/, jsons/ and cache/ go (default: the current folder)")
    p.add_argument("--output-dir", type=Path, default=None, help="where LoRA files go (default: WORKDIR/output)")
    p.add_argument("--json-only", action="store_true", help="write the settings JSON and stop")
    add_arguments(p)


def build_config(args):
    from .config import Config

    cfg = Config.load_preset(args.preset) if args.preset else Config.defaults(args.mode or "LoRA")
    fields = {"mode": args.mode, "model": args.model, "vae": args.vae, "original_prompt": args.original_prompt,
              "target_prompt": args.target_prompt, "negative_prompt": args.negative_prompt,
              "original_image": args.original_image, "target_image": args.target_image}
    cfg = cfg.replace(**{k: v for k, v in fields.items() if v is not None})
    overrides = list(args.set or [])
    if args.data is not None:
        overrides.append(f"lora_data_directory={args.data}")
    pairs = overrides + shortcut_overrides(args)
    cfg = cfg.with_overrides(pairs)
    unused = cfg.unused_in_mode(pairs)
    if unused:
        print(unused, file=sys.stderr)
    return cfg


def shortcut_overrides(args) -> list[str]:
    from .config import shortcut_overrides as so

    return so(args)


def cmd_train(args) -> int:
    from .config import SettingError
    from .engine import OutputPaths, TrainingRun, output_problem, write_settings_json
    from .host.standalone import HostError, load_components
    from .preflight import check_inputs

    try:
        cfg = build_config(args)
    except SettingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        # bad inputs (images, prompts, optimizer / scheduler arguments, network_resume) first: they cost
        # nothing to check and leave no trace, not even an output folder
        mode = check_inputs(cfg, mode_inputs=not args.json_only)  # a settings file may precede its data
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    paths = OutputPaths.under(args.workdir)
    if args.output_dir:
        paths.lora_dir = args.output_dir
    # every folder the run writes to takes a file, before the model loads (a bad one costs no training)
    names = {"lora_dir": "--output-dir" if args.output_dir else "--workdir (its output/ folder for the LoRA files)",
             "log_dir": "--workdir (its logs/ folder, for logging_save_csv)",
             "json_dir": "--workdir (its jsons/ folder, for save_as_json)"}
    problem = output_problem(cfg, paths, names, which=("json_dir",) if args.json_only else None)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.json_only or cfg.save_as_json:
        path = write_settings_json(cfg, paths, time.time())
        print(f"Settings saved to {path}")
        if args.json_only:
            return 0
    try:
        components = load_components(cfg.model or None, cfg.vae or None, model_dir=args.model_dir,
                                     v_pred=cfg.model_v_pred or None)
        if args.embeddings_dir:
            components.embeddings = _embeddings(args.embeddings_dir)
    except (HostError, NotImplementedError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("Interrupted before training began; nothing was saved", file=sys.stderr)
        return 130
    said = set()

    def log(message: str) -> None:
        said.add(message)
        print(message, file=sys.stderr)

    run = TrainingRun(cfg, components, paths, on_progress=ProgressPrinter(), log=log)
    ctrl_c = _CtrlCStops(run)
    try:
        with ctrl_c:
            result = run.run(mode)
    except KeyboardInterrupt:
        saved = ", ".join(str(f) for f in run.files)
        print(f"Interrupted: quit at once; {'saved before: ' + saved if saved else 'nothing was saved'}",
              file=sys.stderr)
        return 130
    except ValueError as e:  # bad input found while preparing (images, captions, settings)
        print(f"error: {e}", file=sys.stderr)
        return 2
    for f in result.files:
        print(f)
    if result.csv:
        print(result.csv)
    for f in run.sampler.files if run.sampler else []:
        print(f)
    if result.message not in said:  # "Saved ..." and out-of-memory advice were logged already
        print(result.message, file=sys.stderr)
    if ctrl_c.pressed:
        return 130
    return 0 if result.ok else 1


def _embeddings(folder):
    """--embeddings-dir read; pickled files are named once here (a prompt using one is refused later)."""
    from .models.embeddings import load_embeddings_dir

    try:
        embeddings = load_embeddings_dir(folder)
    except ValueError as e:
        raise ValueError(f"--embeddings-dir {folder}: {e}") from None
    if embeddings.refused:
        print(f"--embeddings-dir: not read (pickles; only .safetensors are): {', '.join(sorted(embeddings.refused))}",
              file=sys.stderr)
    return embeddings


class _CtrlCStops:
    """While training, the first Ctrl-C does what the tab's Stop does: the step in progress finishes and
    what was trained is saved as <name>_<N>steps (nothing before step 1 finished). A second Ctrl-C quits
    at once (KeyboardInterrupt; a save in progress leaves no partial file)."""

    def __init__(self, run):
        self.run = run
        self.pressed = 0
        self._previous = None

    def __call__(self, signum, frame) -> None:
        self.pressed += 1
        if self.pressed > 1:
            raise KeyboardInterrupt
        self.run.stop()
        print("\nCtrl-C: stopping after this step and saving what was trained; press Ctrl-C again to quit "
              "at once", file=sys.stderr)

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGINT, self)
        except ValueError:  # not the main thread: Ctrl-C keeps its default
            self._previous = None
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def cmd_plot(args) -> int:
    from .plot import PlotError, plot_log

    out = args.png or Path(args.csv).with_suffix(".png")
    try:
        plot_log(args.csv, out, warn=lambda m: print(m, file=sys.stderr))
    except PlotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


def cmd_prepare(args) -> int:
    from .data.errors import DataError
    from .data.prepare import PrepareOptions, prepare_images

    options = PrepareOptions(copies=args.copies, rotate=not args.no_rotate, max_angle=args.max_angle,
                             downscale=not args.no_downscale, min_scale=args.min_scale, fix_side=args.fix_side,
                             seed=args.seed)
    try:
        result = prepare_images(args.input, args.output, options,
                                progress=lambda done, total, path: print(f"{done}/{total} {path}", file=sys.stderr))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, an unwritable output folder
        print(f"error: writing to {args.output}: {e}", file=sys.stderr)
        return 1
    print(result.summary())
    return 0


def cmd_settings(args) -> int:
    from .config import describe_settings

    print(describe_settings(args.mode, lang=args.lang))
    return 0


def cmd_sample(args) -> int:
    from .samples import sample_command

    return sample_command(args)


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args.workdir, steps=args.steps)


def _console_logging() -> None:
    """The standalone app's console: TrainTrain's own lines (job started/failed with its traceback, settings
    saved, skipped images, caption warnings, a set-aside queue file). Only here, never at import: inside the
    Web-UI the host owns logging."""
    import logging

    if not logging.root.handlers:
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    for name in ("traintrain", "trainer"):
        logging.getLogger(name).setLevel(logging.INFO)


def _port_problem(host: str, port: int) -> str:
    """Why the app cannot serve on host:port, or "" (checked before gradio starts, which would raise)."""
    import socket

    if not 1 <= port <= 65535:
        return f"--port {port}: out of range (allowed: 1 to 65535)"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        if os.name != "nt":  # as the server will bind (a port in TIME_WAIT is free); on Windows this would steal it
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            return f"--port {port}: {host}:{port} cannot be used ({e.strerror or e}); choose another port"
    return ""


def cmd_ui(args) -> int:
    from .jobs import QueueError, StandaloneHost
    from .ui import launch

    auth = None
    if args.auth is not None:
        user, sep, password = args.auth.partition(":")
        if not sep or not user or not password:
            print(f"error: --auth {args.auth!r}: expected user:password (both non-empty)", file=sys.stderr)
            return 2
        auth = (user, password)
    server = "0.0.0.0" if args.listen else "127.0.0.1"
    problem = _port_problem(server, args.port)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    _console_logging()
    host = StandaloneHost(args.workdir, model_dir=args.model_dir, lora_dir=args.lora_dir)
    host.embeddings_dir = args.embeddings_dir
    where = "0.0.0.0 (all interfaces)" if args.listen else "127.0.0.1"
    print(f"TrainTrain UI on {where}:{args.port}; LoRAs go to {host.paths().lora_dir}", file=sys.stderr)
    if args.listen and auth is None:
        print("warning: --listen without --auth: anyone who can reach this machine can start trainings and read "
              "your settings; add --auth user:password", file=sys.stderr)
    try:
        launch(host, port=args.port, listen=args.listen, lang=args.lang, auth=auth)
    except QueueError as e:  # another app owns this workdir's queue
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the port was taken between the check and the start
        print(f"error: --port {args.port}: could not serve on {server}:{args.port} ({e})", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer", description="TrainTrain: LoRA training for Stable Diffusion")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train one job")
    _add_train_arguments(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("demo", help="train a LoRA on the tiny built-in model and generated images")
    p.add_argument("--workdir", type=Path, default=Path("demo_output"))
    p.add_argument("--steps", type=int, default=None)
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("sample", help="a strength grid of a LoRA file on a model: multipliers x prompts x seeds")
    p.add_argument("--lora", required=True, type=Path, help="the LoRA file (.safetensors, kohya format)")
    p.add_argument("--model", default=None, help="checkpoint file or diffusers folder; empty: the tiny built-in model")
    p.add_argument("--vae", default=None, help="separate VAE file (optional)")
    p.add_argument("--model-dir", type=Path, default=None, help="folder to look for --model and --vae names in")
    p.add_argument("--prompt", action="append", default=None,
                   help="a prompt (repeatable; default: the LoRA's trigger word, else the empty prompt)")
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument("--multipliers", default="0, 0.5, 1", help='LoRA strengths, one column each (default "0, 0.5, 1")')
    p.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per prompt: SEED, SEED+1, ... (default 1)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    p.add_argument("--cfg", type=float, default=7.0, help="CFG scale (default 7)")
    p.add_argument("--sampler", default="euler", help="euler or ddim (default euler)")
    p.add_argument("--size", default="", help='"N" or "H,W" in pixels (default: the model\'s native size)')
    p.add_argument("--clip-skip", type=int, default=1)
    p.add_argument("--out", type=Path, default=None,
                   help="the PNG to write (default: WORKDIR/samples/<LoRA name>/<time>-strength.png)")
    p.add_argument("--workdir", type=Path, default=Path("."))
    p.set_defaults(func=cmd_sample)
    p = sub.add_parser("plot", help="draw a training log (CSV) as a PNG")
    p.add_argument("csv", type=Path)
    p.add_argument("--png", type=Path, default=None)
    p.set_defaults(func=cmd_plot)
    p = sub.add_parser("prepare", help="the Image tab: rotated / downscaled copies of a folder or an image, "
                                       "captions copied along, into another folder (never overwriting)")
    p.add_argument("input", help="a folder of images (read recursively) or one image file")
    p.add_argument("output", help="the folder for the new images (not the input folder)")
    p.add_argument("--copies", type=int, default=5, help="new images per input (1-1000, default 5)")
    p.add_argument("--no-rotate", action="store_true", help="no random rotation")
    p.add_argument("--max-angle", type=float, default=180.0, help="rotation within +-this many degrees (default 180)")
    p.add_argument("--no-downscale", action="store_true", help="no random downscale")
    p.add_argument("--min-scale", type=float, default=0.4, help="downscale by a factor in [this, 1] (default 0.4)")
    p.add_argument("--fix-side", default="none", help="none, right, left, top or bottom: where a downscaled "
                                                       "picture sits (default none: anywhere)")
    p.add_argument("--seed", type=int, default=None, help="for the same result again (default: random)")
    p.set_defaults(func=cmd_prepare)
    p = sub.add_parser("settings", help="list every setting with its default and help")
    p.add_argument("--mode", default=None)
    p.add_argument("--lang", default="en", choices=["en", "ja"])
    p.set_defaults(func=cmd_settings)
    p = sub.add_parser("ui", help="serve the TrainTrain tab in a browser (standalone)")
    p.add_argument("--model-dir", type=Path, default=None, help="folder of checkpoints for the Model list")
    p.add_argument("--lora-dir", type=Path, default=None, help="where LoRA files go (default: WORKDIR/output)")
    p.add_argument("--embeddings-dir", type=Path, default=None,
                   help="folder of textual-inversion embeddings (.safetensors) whose names prompts and captions may use")
    p.add_argument("--workdir", type=Path, default=Path("."), help="where logs/, jsons/, presets/, cache/ go")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--listen", action="store_true", help="serve on all interfaces, not only 127.0.0.1")
    p.add_argument("--auth", default=None, metavar="USER:PASSWORD",
                   help="ask for this user name and password (gradio's login); use it with --listen")
    p.add_argument("--lang", default="en", choices=["en", "ja"], help="language of the settings' help")
    p.set_defaults(func=cmd_ui)
    args = parser.parse_args(argv)
    threads = os.environ.get("TT_THREADS", "").strip()
    if threads:  # e.g. TT_THREADS=1 on a shared machine, where two threads collapse
        if not threads.isdigit() or not 1 <= int(threads) <= 1024:
            print(f"error: TT_THREADS={threads!r} is not a number of CPU threads (allowed: a whole number "
                  f"from 1 to 1024; unset it to let torch choose)", file=sys.stderr)
            return 2
        import torch

        torch.set_num_threads(int(threads))
    return args.func(args)


if __name__ == "__main__":
    from trainer.optim import keep_bitsandbytes_unloaded

    # this process only (not a caller of main()): bitsandbytes loads when an 8-bit optimizer is chosen
    if sys.argv[1:2] and sys.argv[1] in ("train", "demo", "ui", "queue"):  # plot/settings never load diffusers
        keep_bitsandbytes_unloaded()
    sys.exit(main())
