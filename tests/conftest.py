import os
import sys

import pytest
import torch

# Two threads on a shared 2-core machine make torch steps collapse; tests use one.
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(TESTS))  # the repo: `import trainer`
sys.path.insert(0, TESTS)  # the test helpers: `import world`, `import _effect_jobs`


@pytest.hookimpl(trylast=True)  # after -k / -m deselection
def pytest_collection_modifyitems(session, config, items):
    """The mode-effect tests wait for trainings that run in the background (tests/_effect_jobs.py):
    start them now and run those tests last, so the trainings overlap the rest of the suite."""
    effects = [i for i in items if i.path.name == "test_mode_effects.py"]
    if not effects or config.option.collectonly:
        return
    items[:] = [i for i in items if i.path.name != "test_mode_effects.py"] + effects
    import _effect_jobs

    _effect_jobs.start(workers=2 if len(effects) == len(items) else 1)


def pytest_sessionfinish(session, exitstatus):
    jobs = sys.modules.get("_effect_jobs")
    if jobs is not None:
        jobs.stop()


@pytest.fixture()
def tab_workdir(tmp_path):
    """The standalone tab's workdir for ``ui``; a module overrides it to keep its data out of the workdir."""
    return tmp_path


@pytest.fixture()
def ui(tab_workdir):
    """The Train tab, built on a standalone host; its queue is stopped afterwards."""
    from trainer.jobs import StandaloneHost
    from trainer.ui import TrainTrainUI

    u = TrainTrainUI(StandaloneHost(tab_workdir))
    u.build()
    yield u
    u.queue.stop()
    u.queue.wait(60)


@pytest.fixture(scope="session")
def world_model():
    """The model that has learned a small world (tests/world.py), shared by the whole session:
    never change its weights (apply networks and remove them again)."""
    import world

    return world.load_world_model()
