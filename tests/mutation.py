"""Mutation testing of the training core with mutmut 3, one module at a time (issue 17; docs/TESTING.md).

    .venv/bin/python tests/mutation.py trainer.diffusion     # mutate one module, run its fast tests
    .venv/bin/python tests/mutation.py trainer.modes.ileco trainer.modes.base   # several in one run
    .venv/bin/python tests/mutation.py --survivors-again trainer.diffusion   # after adding tests: rerun survivors
    .venv/bin/python tests/mutation.py --survivors-again trainer.diffusion x_weighted_loss__mutmut_5   # just these
    .venv/bin/python tests/mutation.py --summary             # killed / survived / timeout per module
    .venv/bin/python tests/mutation.py --survivors trainer.diffusion   # the surviving mutants' diffs

Run from the repository root. mutmut's settings are in setup.cfg ``[mutmut]``; the fast tests of each
module are in setup.cfg ``[mutmut-tests]``: mutmut runs them once to learn which test calls which function,
then, for each mutant, only the tests that call the mutated function. One worker process (the machine is
shared); mutmut forks it after torch is imported. Work files go to mutants/ (git-ignored).
"""
from __future__ import annotations

import configparser
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def module_tests(module: str) -> list[str]:
    """The fast tests of ``module`` from setup.cfg [mutmut-tests], else those of its package."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    parts = module.split(".")
    for n in range(len(parts), 1, -1):
        tests = cfg.get("mutmut-tests", ".".join(parts[:n]), fallback="")
        if tests.strip():
            return tests.split()
    sys.exit(f"no fast tests for {module} in setup.cfg [mutmut-tests]; modules: "
             f"{', '.join(cfg.options('mutmut-tests'))}")


def run(modules: list[str], survivors_only: bool = False, only: list[str] = ()) -> None:
    os.chdir(ROOT)
    os.environ.setdefault("TT_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    import mutmut.configuration as mc
    from mutmut.__main__ import cli

    mc._config = mc._load_config()
    tests = []
    for module in modules:
        tests += [t for t in module_tests(module) if t not in tests]
    mc._config.pytest_add_cli_args_test_selection = tests
    names = [f"{m}.*" for m in modules]
    if survivors_only:  # after adding tests: run again only what the last run of these modules left alive
        names = [n for m in modules for n, status in json.loads(
            (ROOT / "mutants" / "scores" / f"{m}.json").read_text()).items() if status == "survived"]
        if only:  # a few named survivors (mutmut's names, module prefix optional)
            names = [n for n in names if any(n.endswith(o) for o in only)]
        if not names:
            return
    try:
        cli(["run", "--max-children", "1", *names], standalone_mode=False)
    finally:  # each module has its own tests: keep its verdicts apart from the next module's run
        for module in modules:
            snapshot = ROOT / "mutants" / "scores" / f"{module}.json"
            snapshot.parent.mkdir(parents=True, exist_ok=True)
            old = json.loads(snapshot.read_text()) if snapshot.exists() else {}
            # mutmut forgets every verdict when the test selection changes: keep the ones not rerun now
            new = {k: v if v != "not checked" else old.get(k, v) for k, v in verdicts(module).items()}
            snapshot.write_text(json.dumps(new, indent=1, sort_keys=True))


def verdicts(module: str) -> dict:
    """{mutant name: mutmut's status} of the module's mutants, from mutants/**/*.meta."""
    from mutmut.stats import status_by_exit_code

    out = {}
    for meta in sorted((ROOT / "mutants" / "trainer").rglob("*.py.meta")):
        for name, code in json.loads(meta.read_text()).get("exit_code_by_key", {}).items():
            if name.startswith(module + "."):
                out[name] = status_by_exit_code[code]
    return out


def summary() -> None:
    """Per module (file): the verdicts of the latest run of each module given to run()."""
    per_file: dict[str, Counter] = {}
    for snapshot in sorted((ROOT / "mutants" / "scores").glob("*.json")):
        for name, status in json.loads(snapshot.read_text()).items():
            mod = re.match(r"(.*?)\.x[_ǁ]", name).group(1)  # trainer.diffusion.x_func__mutmut_3
            per_file.setdefault(mod, Counter())[status] += 1
    for mod, c in sorted(per_file.items()):
        print(f"{mod:32s} total {sum(c.values()):4d}  " + "  ".join(f"{k} {v}" for k, v in sorted(c.items())))


def survivors(module: str) -> None:
    os.chdir(ROOT)
    snapshot = json.loads((ROOT / "mutants" / "scores" / f"{module}.json").read_text())
    for name, status in sorted(snapshot.items()):
        if status not in ("killed",):
            print(f"# {status}: {name}", flush=True)
            subprocess.run([str(Path(sys.executable).parent / "mutmut"), "show", name], check=False)


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--summary"]:
        summary()
    elif args[:1] == ["--survivors"] and len(args) == 2:
        survivors(args[1])
    elif args[:1] == ["--survivors-again"] and len(args) > 1:
        run([a for a in args[1:] if "__mutmut_" not in a], survivors_only=True,
            only=[a for a in args[1:] if "__mutmut_" in a])
    elif args and not any(a.startswith("-") for a in args):
        run(args)
    else:
        sys.exit(__doc__)
