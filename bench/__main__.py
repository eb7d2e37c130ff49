"""`python -m bench`: step time and peak memory of the engine against the bare model, and time to the
first step. Each configuration runs in its own process (one real model in memory at a time, and a clean
peak-memory window); the rows of a Markdown table are printed as each finishes.

  python -m bench                      # default: SD1.5 (random weights) 256 px, batch 1, fp16 (as the app
                                       # runs it here), GC off/on, 3 steps: about 4 minutes on a quiet CPU
  python -m bench steps --size 512 --batch 1 4 --precision bf16 --gc on --steps 2
  python -m bench steps --mode iLECO Difference
  python -m bench startup              # 100 images, SD1.5 VAE at 256 px: cold and with the on-disk latent cache
  python -m bench sampling --model sd15 --size 256 --every 10   # cost of sample grids during training

"ours" is one engine step (the mode's loss, backward, optimizer, scheduler, NaN guard, CSV row, progress);
"bare" is the same model with the same network, timed between the engine's steps on the same process:
random inputs, the U-Net forward (plus one frozen forward without grad for iLECO / ADDifT), MSE, backward,
AdamW step; no engine, no data loading. Medians over the measured steps after one warm-up step.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ALL_BLOCKS_BUT_BASE = ",".join([f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)])
FROZEN_FORWARD_MODES = {"iLECO", "ADDifT", "Multi-ADDifT"}  # one no-grad forward + one trained forward per step


def _setup_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# --- one configuration, in a child process ----------------------------------------------------------
def _mode_config(spec: dict, data: Path, workdir: Path):
    from trainer.config import Config

    mode = spec["mode"]
    total = spec["warmup"] + spec["steps"]
    values = {
        "save_lora_name": f"bench_{mode}", "save_overwrite": True, "train_seed": 0,
        "image_size": str(spec["size"]), "image_min_length": min(spec["size"], 256), "image_buckets_step": 64,
        "network_rank": spec["rank"], "network_alpha": spec["rank"] / 2, "network_blocks": ALL_BLOCKS_BUT_BASE,
        "train_batch_size": spec["batch"], "train_iterations": total,
        "train_model_precision": spec["precision"], "use_gradient_checkpointing": spec["gc"],
        "logging_save_csv": True, "train_optimizer": spec.get("optimizer", "AdamW"),
    }
    if mode == "LoRA":
        values["lora_data_directory"] = str(data)
    cfg = Config.defaults(mode).with_overrides(values)
    if mode == "iLECO":
        cfg = cfg.replace(original_prompt="a photo of a cat", target_prompt="")
    if mode in ("Difference", "ADDifT"):
        images = sorted(data.glob("*.png"))
        cfg = cfg.replace(original_image=str(images[0]), target_image=str(images[1]))
    if mode == "Multi-ADDifT":
        raise SystemExit("Multi-ADDifT is not benchmarked yet")
    if cfg.second_pass is not None:  # Difference: the same length and batch in both passes
        cfg = cfg.with_overrides({"2nd.train_iterations": total, "2nd.train_batch_size": spec["batch"]})
    return cfg


def child_steps(spec: dict) -> dict:
    _setup_threads(spec["threads"])
    import torch

    from bench.common import (PeakRSS, attention_processors, cuda_peak, cuda_peak_reset, environment, make_images,
                              random_components)
    from trainer.engine import OutputPaths, TrainingRun
    from trainer.modes import mode_for

    workdir = Path(spec["workdir"])
    peak = PeakRSS()
    t0 = time.perf_counter()
    components = random_components(spec["model"])
    build_s = time.perf_counter() - t0
    rss_model = peak.current()
    count = max(spec["batch"], 2)
    data = make_images(workdir / f"images_{spec['size']}_{count}", count, spec["size"])
    cfg = _mode_config(spec, data, workdir)
    mode = mode_for(spec["mode"])
    paths = OutputPaths.under(workdir / "out")
    paths.cache_dir = workdir / "latent_cache"
    device = torch.device(spec["device"])
    ours, bare, ours_peak, bare_peak, passes, ours_cpu, bare_cpu = [], [], [], [], [], [], []
    ours_vram, bare_vram = [], []  # torch.cuda.max_memory_allocated, GB (CUDA only)
    state: dict = {"end": None, "end_cpu": None, "bare": None}
    frozen = spec["mode"] in FROZEN_FORWARD_MODES

    def bare_step(run) -> None:
        st = state["bare"]
        if st is None or st["net"] is not run.network:
            b = spec["batch"]
            h = w = spec["size"] // 8
            gen = torch.Generator().manual_seed(1)
            st = state["bare"] = {
                "net": run.network,
                "opt": torch.optim.AdamW([q for q in run.network.parameters() if q.requires_grad], lr=1e-7),
                "x": torch.randn(b, 4, h, w, generator=gen).to(device, run.dtype),
                "noise": torch.randn(b, 4, h, w, generator=gen).to(device),
                "t": torch.randint(0, 1000, (b,), generator=gen).to(device),
                "c": torch.randn(b, 77, run.components.unet.config.cross_attention_dim, generator=gen).to(device, run.dtype),
                "added": {},
            }
            if run.components.unet.config.addition_embed_type == "text_time":  # SDXL: pooled text + size ids
                pooled = run.components.unet.config.projection_class_embeddings_input_dim - 6 * 256
                st["added"] = {"added_cond_kwargs": {
                    "text_embeds": torch.randn(b, pooled, generator=gen).to(device, run.dtype),
                    "time_ids": torch.tensor([[h * 8, w * 8, 0, 0, h * 8, w * 8]] * b, dtype=run.dtype).to(device)}}
        unet = run.components.unet
        if frozen:  # the frozen model's prediction (the network off), as iLECO / ADDifT make it
            with torch.no_grad(), run.autocast(), run.network.multiplier(0):
                unet(st["x"], st["t"], encoder_hidden_states=st["c"], **st["added"]).sample
        with run.autocast():
            pred = unet(st["x"], st["t"], encoder_hidden_states=st["c"], **st["added"]).sample
        loss = torch.nn.functional.mse_loss(pred.float(), st["noise"])
        loss.backward()
        st["opt"].step()
        st["opt"].zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    holder: dict = {}

    def on_progress(p) -> None:
        if p.phase != "train":
            return
        if device.type == "cuda":
            torch.cuda.synchronize()
        now, cpu = time.perf_counter(), time.process_time()
        run = holder["run"]
        measured = state["end"] is not None and p.step > spec["warmup"]
        if measured:
            ours.append(now - state["end"])
            ours_cpu.append(cpu - state["end_cpu"])
            ours_peak.append(peak.read())
            ours_vram.append(cuda_peak())
            passes.append(p.message)
        peak.reset()
        cuda_peak_reset()
        t, c = time.perf_counter(), time.process_time()
        bare_step(run)
        if measured:
            bare.append(time.perf_counter() - t)
            bare_cpu.append(time.process_time() - c)
            bare_peak.append(peak.read())
            bare_vram.append(cuda_peak())
        peak.reset()
        cuda_peak_reset()
        state["end"], state["end_cpu"] = time.perf_counter(), time.process_time()

    run = TrainingRun(cfg, components, paths, on_progress=on_progress, log=lambda m: None, device=device)
    holder["run"] = run
    t0 = time.perf_counter()
    result = run.run(mode)
    total_s = time.perf_counter() - t0
    if not result.ok:
        raise SystemExit(f"engine run failed: {result.message}")
    return {**spec, "ours": ours, "bare": bare, "ours_cpu": ours_cpu, "bare_cpu": bare_cpu,
            "ours_peak": ours_peak, "bare_peak": bare_peak, "ours_vram": ours_vram, "bare_vram": bare_vram,
            "passes": passes, "load": os.getloadavg(),
            "build_s": build_s, "rss_model_gb": rss_model, "run_s": total_s, "exact_peak": peak.exact,
            "attention": attention_processors(components.unet), "env": environment(),
            "dtype": str(run.dtype).replace("torch.", "")}


def child_startup(spec: dict) -> dict:
    _setup_threads(spec["threads"])
    import shutil

    import torch

    from bench.common import PeakRSS, environment, make_images, random_components
    from trainer.config import Config
    from trainer.engine import OutputPaths, TrainingRun
    from trainer.modes.lora import LoRAMode

    workdir = Path(spec["workdir"])
    components = random_components(spec["model"])
    data = make_images(workdir / f"startup_{spec['images']}_{spec['source']}", spec["images"], spec["source"])
    cfg = Config.defaults("LoRA").with_overrides({
        "lora_data_directory": str(data), "save_lora_name": "bench_startup", "save_overwrite": True,
        "image_size": str(spec["size"]), "image_min_length": min(spec["size"], 256), "image_buckets_step": 64,
        "network_rank": 16, "network_alpha": 8, "network_blocks": ALL_BLOCKS_BUT_BASE, "train_batch_size": 1,
        "train_iterations": 1, "train_model_precision": spec["precision"], "train_seed": 0,
        "train_VAE_precision": spec["vae_precision"]})
    cache = workdir / "startup_cache"
    shutil.rmtree(cache, ignore_errors=True)
    out = {}
    for label in ("cold", "cached"):
        marks: dict = {}

        class Timed(LoRAMode):
            def loss(self, step):
                marks.setdefault("step_start", time.perf_counter())
                return super().loss(step)

        def on_progress(p, marks=marks) -> None:
            key = {"prepare": p.message.split(" ")[0].lower()}.get(p.phase, p.phase)
            marks.setdefault(key, time.perf_counter())

        paths = OutputPaths.under(workdir / "startup_out")
        paths.cache_dir = cache
        run = TrainingRun(cfg, components, paths, on_progress=on_progress, log=lambda m: None,
                          device=torch.device(spec["device"]))
        release = run.release_vae

        def release_vae(release=release, marks=marks) -> None:  # the latents are ready
            marks.setdefault("latents", time.perf_counter())
            release()

        run.release_vae = release_vae
        peak = PeakRSS()
        peak.reset()
        t0 = time.perf_counter()
        result = run.run(Timed())
        if not result.ok:
            raise SystemExit(f"engine run failed: {result.message}")
        out[label] = {k: v - t0 for k, v in marks.items()}
        out[label]["peak_gb"] = peak.read()
    return {**spec, **out, "env": environment()}


def child_sampling(spec: dict) -> dict:
    """A LoRA run with sample grids on: the time of each grid (from the engine's 'sample' events) and of a
    training step (the engine's s/it, which leaves sampling out)."""
    _setup_threads(spec["threads"])
    import torch

    from bench.common import environment, make_images, random_components
    from trainer.engine import OutputPaths, TrainingRun
    from trainer.modes import mode_for

    workdir = Path(spec["workdir"])
    components = random_components(spec["model"])
    data = make_images(workdir / f"images_{spec['size']}_2", 2, spec["size"])
    cfg = _mode_config({**spec, "mode": "LoRA", "warmup": 0, "batch": 1, "gc": False, "rank": 16}, data, workdir)
    cfg = cfg.with_overrides({
        "sample_every_n_steps": spec["every"], "sample_steps": spec["sample_steps"],
        "sample_prompts": "\n".join(f"a photo of thing {i}" for i in range(spec["prompts"])),
        "sample_multipliers": spec["multipliers"], "sample_cfg_scale": spec["cfg"], "save_overwrite": True})
    grids, rates = [], []

    def on_progress(p) -> None:
        if p.phase == "sample":
            grids.append(p.sample_s - sum(grids))
        elif p.phase == "train":
            rates.append(p.sec_per_it)

    paths = OutputPaths.under(workdir / "sampling_out")
    run = TrainingRun(cfg, components, paths, on_progress=on_progress, log=lambda m: None,
                      device=torch.device(spec["device"]))
    t0 = time.perf_counter()
    result = run.run(mode_for("LoRA"))
    if not result.ok:
        raise SystemExit(f"engine run failed: {result.message}")
    n_mult = len(cfg.sample_multipliers)
    return {**spec, "grids": grids, "step_s": rates[-1], "run_s": time.perf_counter() - t0,
            "images": spec["prompts"] * n_mult, "cached_zero": 0.0 in cfg.sample_multipliers,
            "dtype": str(run.dtype).replace("torch.", ""), "env": environment()}


def cmd_sampling(args) -> int:
    spec = {"model": args.model, "size": args.size, "precision": args.precision, "steps": args.train_steps,
            "every": args.every, "sample_steps": args.sample_steps, "prompts": args.prompts,
            "multipliers": args.multipliers, "cfg": args.cfg, "threads": args.threads, "workdir": str(args.workdir),
            "device": args.device}
    print(f"# sampling cost: model {args.model} (random weights) at {args.size} px, {args.train_steps} LoRA steps, "
          f"a grid every {args.every} steps + before + at the end, {args.prompts} prompt(s) x multipliers "
          f"{args.multipliers}, {args.sample_steps} sampler steps, CFG {args.cfg:g}, {args.threads} thread(s), "
          f"{args.device}; command: python -m bench {' '.join(sys.argv[1:])}", flush=True)
    r = _spawn("sampling", spec)
    if isinstance(r, str):
        print(r)
        return 1
    first, later = r["grids"][0], r["grids"][1:]
    per_grid = _median(later) if later else first
    drawn = r["images"] - (args.prompts if r["cached_zero"] else 0)  # strength 0 is drawn once per run
    print("| model | px | precision | grids | first grid s | later grids s (median) | s/image drawn | train s/step "
          f"| sampling overhead every {args.every} steps | sampling share of this run |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.model} | {args.size} | {args.precision} (ran as {r['dtype']}) | {len(r['grids'])} | {first:.2f} "
          f"| {per_grid:.2f} | {per_grid / max(1, drawn):.2f} | {r['step_s']:.2f} "
          f"| {per_grid / (args.every * r['step_s']):.0%} | {sum(r['grids']) / r['run_s']:.0%} |")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))
    return 0


# --- the parent: configurations, processes, tables -------------------------------------------------
def _median(xs):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def _spawn(kind: str, spec: dict) -> dict | str:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": str(spec["threads"])}
    cmd = [sys.executable, "-m", "bench", "_child", kind, json.dumps(spec)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return f"failed: {tail}"
    return json.loads(lines[-1])


STEP_HEADER = ("| model | mode | px | batch | precision | grad ckpt | ours CPU s/step | bare CPU s/step "
               "| ours/bare (CPU time) | ours wall s/step | bare wall s/step | ours/bare (wall) | ours peak GB "
               "| bare peak GB | steps | threads | load |")


def step_row(r: dict | str, spec: dict) -> str:
    """Medians per step; the ratios are of the summed times over the measured steps (CPU time: what the
    process itself computed, robust on a shared machine; wall: what a user waits, noisy there)."""
    mode = spec["mode"] + (f" [{spec['optimizer']}]" if spec.get("optimizer", "AdamW") != "AdamW" else "")
    short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
    ran = short.get(r.get("dtype"), spec["precision"]) if isinstance(r, dict) else spec["precision"]
    precision = spec["precision"] if ran == spec["precision"] else f"{spec['precision']} (ran as {ran})"
    head = (f"| {spec['model']} | {mode} | {spec['size']} | {spec['batch']} | {precision} | "
            f"{'on' if spec['gc'] else 'off'} |")
    if isinstance(r, str):
        return head + f" {r} |" + " |" * 9 + f" {spec['threads']} | |"
    rows = []
    for name in dict.fromkeys(r["passes"]):
        idx = [i for i, p in enumerate(r["passes"]) if p == name]

        def pick(key):
            return [r[key][i] for i in idx]

        if r.get("ours_vram") and any(r["ours_vram"]):  # CUDA: the device's peak, not the host's
            op, bp = max(pick("ours_vram")), max(pick("bare_vram"))
        else:
            op, bp = max(pick("ours_peak")), max(pick("bare_peak"))
        oc, bc, ow, bw = pick("ours_cpu"), pick("bare_cpu"), pick("ours"), pick("bare")
        label = head if len(set(r["passes"])) == 1 else head.replace(f"| {mode} |", f"| {mode} ({name}) |")
        rows.append(f"{label} {_median(oc):.2f} | {_median(bc):.2f} | {sum(oc) / sum(bc):.3f} | {_median(ow):.2f} | "
                    f"{_median(bw):.2f} | {sum(ow) / sum(bw):.3f} | {op:.2f} | {bp:.2f} | {len(idx)} | "
                    f"{r['env']['threads']} | {r['load'][0]:.1f} |")
    return "\n".join(rows)


def cmd_steps(args) -> int:
    specs = []
    for model, mode, size, batch, precision, gc in itertools.product(
            args.model, args.mode, args.size, args.batch, args.precision, args.gc):
        specs.append({"model": model, "mode": mode, "size": size, "batch": batch, "precision": precision,
                      "gc": gc == "on", "steps": args.steps, "warmup": 1, "rank": args.rank,
                      "threads": args.threads, "workdir": str(args.workdir), "device": args.device,
                      "optimizer": args.optimizer})
    print(f"# step time: {len(specs)} configuration(s), {args.threads} thread(s), {args.steps} measured step(s) "
          f"after 1 warm-up; command: python -m bench {' '.join(sys.argv[1:])}", flush=True)
    print(STEP_HEADER, flush=True)
    print("|---" * (STEP_HEADER.count("|") - 1) + "|", flush=True)
    details = []
    for spec in specs:
        r = _spawn("steps", spec)
        print(step_row(r, spec), flush=True)
        if not isinstance(r, str):
            details.append(r)
    if details:
        d = details[0]
        print(f"\nattention processors: {', '.join(d['attention'])}; torch {d['env']['torch']}; "
              f"{d['env']['cores']} cores; model build {d['build_s']:.1f} s, RSS after build {d['rss_model_gb']:.2f} GB; "
              f"peak memory: {'torch.cuda.max_memory_allocated per step' if d.get('ours_vram') and any(d['ours_vram']) else 'process RSS, ' + ('exact per step (VmHWM reset)' if d['exact_peak'] else 'process lifetime (getrusage)')}")
    if args.json:
        Path(args.json).write_text(json.dumps(details, indent=1))
    return 0


def cmd_startup(args) -> int:
    spec = {"model": args.model, "images": args.images, "size": args.size, "source": args.source,
            "precision": args.precision, "vae_precision": args.vae_precision, "threads": args.threads,
            "workdir": str(args.workdir), "device": args.device}
    print(f"# time from Start to the first step: {args.images} images of {args.source} px trained at {args.size} px, "
          f"model {args.model} (random weights), VAE {args.vae_precision}, model {args.precision}, {args.threads} "
          f"thread(s); command: python -m bench {' '.join(sys.argv[1:])}", flush=True)
    r = _spawn("startup", spec)
    if isinstance(r, str):
        print(r)
        return 1
    print("| run | images read | latents ready (VAE) | captions encoded + network built | first step done | peak RSS GB |")
    print("|---|---|---|---|---|---|")
    for label in ("cold", "cached"):
        m = r[label]
        print(f"| {label} | {m.get('encoding', float('nan')):.1f} s | {m.get('latents', float('nan')):.1f} s "
              f"| {m.get('step_start', float('nan')):.1f} s | {m.get('train', float('nan')):.1f} s | {m['peak_gb']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))
    return 0


def cmd_render(args) -> int:
    """Print the table of figures saved with --json (steps runs)."""
    print(STEP_HEADER)
    print("|---" * (STEP_HEADER.count("|") - 1) + "|")
    for path in args.files:
        for r in json.loads(Path(path).read_text()):
            print(step_row(r, r))
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_child"]:
        kind, spec = argv[1], json.loads(argv[2])
        result = {"steps": child_steps, "startup": child_startup, "sampling": child_sampling}[kind](spec)
        print(json.dumps(result))
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--threads", type=int, default=1, help="torch threads (default 1: comparable figures on a shared machine)")
    common.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "traintrain-bench",
                        help="images, latent cache and outputs (kept between runs)")
    common.add_argument("--device", default="cuda" if _cuda() else "cpu")
    common.add_argument("--json", default=None, help="also write the raw figures here")
    p = sub.add_parser("steps", parents=[common], help="step time and peak memory, ours against bare")
    p.add_argument("--model", nargs="+", default=["sd15"], choices=["sd15", "sdxl", "tiny"])
    p.add_argument("--mode", nargs="+", default=["LoRA"])
    p.add_argument("--size", nargs="+", type=int, default=[256])
    p.add_argument("--batch", nargs="+", type=int, default=[1])
    p.add_argument("--precision", nargs="+", default=["fp16"], choices=["fp32", "bf16", "fp16"],
                   help="train_model_precision (default fp16, the app's default: on a CPU it runs as bf16 or fp32)")
    p.add_argument("--gc", nargs="+", default=["off", "on"], choices=["off", "on"], help="gradient checkpointing")
    p.add_argument("--steps", type=int, default=3, help="measured steps per configuration (after one warm-up)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--optimizer", default="AdamW", help="train_optimizer of the engine (e.g. AdamW8bit); bare: AdamW")
    p.set_defaults(func=cmd_steps)
    p = sub.add_parser("startup", parents=[common], help="time from Start to the first step, cold and cached")
    p.add_argument("--model", default="sd15", choices=["sd15", "tiny"])
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--size", type=int, default=256, help="training resolution")
    p.add_argument("--source", type=int, default=384, help="side of the generated source images")
    p.add_argument("--precision", default="fp16", choices=["fp32", "bf16", "fp16"],
                   help="train_model_precision (default fp16, the app default: bf16 or fp32 on a CPU, see RESULTS.md)")
    p.add_argument("--vae-precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.set_defaults(func=cmd_startup)
    p = sub.add_parser("sampling", parents=[common], help="cost of sample grids during training")
    p.add_argument("--model", default="sd15", choices=["sd15", "sdxl", "tiny"])
    p.add_argument("--size", type=int, default=256, help="training and sample size")
    p.add_argument("--precision", default="fp16", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--train-steps", type=int, default=20)
    p.add_argument("--every", type=int, default=10, help="sample_every_n_steps")
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--prompts", type=int, default=1)
    p.add_argument("--multipliers", default="0, 0.5, 1")
    p.add_argument("--cfg", type=float, default=7.0)
    p.set_defaults(func=cmd_sampling)
    p = sub.add_parser("render", help="the table again, from files written with --json")
    p.add_argument("files", nargs="+")
    p.set_defaults(func=cmd_render)
    args = parser.parse_args(argv or ["steps"])
    if args.command is None:
        args = parser.parse_args(["steps"])
    return args.func(args)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
