import pytest
import torch

from trainer.optim import OPTIMIZER_NAMES, SCHEDULER_NAMES, OptimizerError, make_optimizer, make_scheduler


def _groups():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    return net, [{"params": list(net[0].parameters()), "lr": 1e-3}, {"params": list(net[1].parameters()), "lr": 1e-3}]


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_every_listed_optimizer_builds_and_reduces_a_loss(name):
    net, groups = _groups()
    lr = 1.0 if name in ("Prodigy",) or name.startswith("DA") or name.startswith("Dadapt") else 1e-2
    opt = make_optimizer(name, groups, lr, {}, network=net, warn=lambda m: None)
    x = torch.randn(32, 8)
    first = None
    for _ in range(100):
        loss = net(x).pow(2).mean()
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert net(x).pow(2).mean().item() < first, name


def test_unknown_optimizer_and_bad_settings_name_the_setting():
    _, groups = _groups()
    with pytest.raises(OptimizerError, match="train_optimizer"):
        make_optimizer("Nope", groups, 1e-3, {})
    with pytest.raises(OptimizerError, match="train_optimizer_settings"):
        make_optimizer("AdamW", groups, 1e-3, {"no_such_arg": 1})


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
@pytest.mark.parametrize("warmup", [0, 5])
def test_every_scheduler_runs_exactly_the_planned_steps(name, warmup):
    _, groups = _groups()
    opt = torch.optim.AdamW(groups, lr=1e-3)
    sched = make_scheduler(name, opt, iterations=50, warmup_steps=warmup, step_rules="0.5:20,0.1")
    for _ in range(50):
        opt.step()
        sched.step(*([1.0] if getattr(sched, "wants_metric", False) else []))
        assert all(lr >= 0 for lr in sched.get_last_lr())


def test_warmup_ramps_up_for_a_torch_scheduler():
    _, groups = _groups()
    opt = torch.optim.AdamW(groups, lr=1e-3)
    sched = make_scheduler("cosine_annealing", opt, iterations=100, warmup_steps=10)
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[0] < seen[5] < seen[9] <= 1e-3 + 1e-12


def test_schedule_free_gets_no_scheduler():
    _, groups = _groups()
    opt = make_optimizer("AdamWScheduleFree", groups, 1e-3, {})
    sched = make_scheduler("cosine", opt, iterations=10, optimizer_name="AdamWScheduleFree")
    sched.step()
    assert sched.get_last_lr()
