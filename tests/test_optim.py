import pytest
import torch

from trainer.optim import ADAPTIVE_LR, OPTIMIZER_NAMES, SCHEDULER_NAMES, OptimizerError, make_optimizer, make_scheduler


def _groups(lr=1e-3):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    return net, [{"params": list(net[0].parameters()), "lr": lr}, {"params": list(net[1].parameters()), "lr": lr}]


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_every_listed_optimizer_builds_and_reduces_a_loss(name):
    # The groups carry the learning rate, as the engine's do: a group's lr wins over make_optimizer's.
    # (With groups at 1e-3, D-Adaptation's step d*lr stayed at 1e-6 * 1e-3: the loss moved by 1e-8,
    # float noise, so the test passed or failed by the CPU's kernels.) Adaptive optimizers get 1.0.
    lr = 1.0 if name in ADAPTIVE_LR else 1e-2
    net, groups = _groups(lr)
    opt = make_optimizer(name, groups, lr, {}, network=net, warn=lambda m: None)
    x = torch.randn(32, 8)
    first = None
    for _ in range(100):
        loss = net(x).pow(2).mean()
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
        opt.zero_grad()
    # a real reduction: every optimizer here ends at 0.65x the first loss or lower (SGDScheduleFree is
    # the slowest), D-Adapt Lion 0.026x, D-Adapt Adan 0.004x; float noise is ~1e-7 of the loss
    assert net(x).pow(2).mean().item() < 0.8 * first, name


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
