import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cxrtune.errors import ConfigError
from cxrtune.optim import (
    OPTIMIZERS,
    SAM,
    SCHEDULES,
    OptimConfig,
    ScheduleConfig,
    build_optimizer,
    build_scheduler,
    disable_running_stats,
    enable_running_stats,
    is_second_order,
)

VARIANTS = [(name, sam) for name in OPTIMIZERS for sam in ("none", "sam", "asam")]
LRS = {"adam": 1e-2, "adamw": 1e-2, "sgd": 0.1}


def _problem(seed=0):
    torch.manual_seed(seed)
    x = torch.randn(64, 4)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    return model, x, y


def _cfg(name, sam):
    return OptimConfig(name=name, lr=LRS[name], sam=sam, rho={"none": 0.05, "sam": 0.05, "asam": 0.5}[sam],
                       weight_decay=1e-4)


def _train_step(opt, model, x, y):
    """One optimizer step as the engine does it (two passes for SAM)."""
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    if is_second_order(opt):
        opt.first_step(zero_grad=True)
        disable_running_stats(model)
        F.cross_entropy(model(x), y).backward()
        enable_running_stats(model)
        opt.second_step(zero_grad=True)
    else:
        opt.step()
    return loss.item()


@pytest.mark.parametrize("name,sam", VARIANTS)
def test_optimizer_contract(name, sam):
    model, x, y = _problem()
    opt = build_optimizer(_cfg(name, sam), model.parameters())
    assert is_second_order(opt) == (sam != "none")
    losses = [_train_step(opt, model, x, y) for _ in range(30)]
    assert losses[-1] < 0.7 * losses[0]

    # state_dict round trip: a fresh optimizer loaded from the state takes the same step
    state = copy.deepcopy(opt.state_dict())
    twin = copy.deepcopy(model)
    opt2 = build_optimizer(_cfg(name, sam), twin.parameters())
    opt2.load_state_dict(state)
    if sam != "none":
        assert opt2.base_optimizer.state  # momentum / exp_avg restored
        assert opt2.param_groups is opt2.base_optimizer.param_groups
    _train_step(opt, model, x, y)
    _train_step(opt2, twin, x, y)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_sam_with_rho_zero_equals_base(name):
    model, x, y = _problem()
    twin = copy.deepcopy(model)
    base = build_optimizer(OptimConfig(name=name, lr=LRS[name]), model.parameters())
    sam = build_optimizer(OptimConfig(name=name, lr=LRS[name], sam="sam", rho=0.0), twin.parameters())
    for _ in range(5):
        _train_step(base, model, x, y)
        _train_step(sam, twin, x, y)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


# Quadratic f(w) = 0.5 * w^T A w - b^T w, gradient A w - b.
A = torch.tensor([[3.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
B = torch.tensor([1.0, -2.0], dtype=torch.float64)


def _grad(w):
    return A @ w - B


def _sam_by_hand(w, lr, rho, adaptive):
    g = _grad(w)
    t = w.abs() + 0.01 if adaptive else torch.ones_like(w)  # ASAM's T_w = |w| + eta
    e = rho * t**2 * g / torch.linalg.vector_norm(t * g)
    return w - lr * _grad(w + e)


@pytest.mark.parametrize("adaptive,rho", [(False, 0.05), (True, 0.5)])
def test_sam_step_matches_published_algorithm(adaptive, rho):
    w0 = torch.tensor([0.7, -1.3], dtype=torch.float64)
    w = nn.Parameter(w0.clone())
    opt = SAM([w], torch.optim.SGD, rho=rho, adaptive=adaptive, lr=0.1)

    def loss():
        return 0.5 * w @ A @ w - B @ w

    expected = w0
    for _ in range(3):
        opt.zero_grad()
        loss().backward()
        opt.step(lambda: loss().backward())
        expected = _sam_by_hand(expected, 0.1, rho, adaptive)
        assert torch.allclose(w.detach(), expected, atol=1e-6, rtol=0)


def test_sam_step_without_closure_explains():
    w = nn.Parameter(torch.ones(2))
    with pytest.raises(RuntimeError, match="two gradient evaluations"):
        SAM([w], torch.optim.SGD, lr=0.1).step()


def test_sam_param_groups_shared_with_base():
    model, _, _ = _problem()
    opt = build_optimizer(OptimConfig(name="sgd", lr=0.1, sam="sam"), model.parameters())
    assert opt.param_groups is opt.base_optimizer.param_groups
    sched = build_scheduler(ScheduleConfig(name="step", step_size=1, gamma=0.5), opt, epochs=3,
                            steps_per_epoch=1)
    assert sched.optimizer is opt.base_optimizer
    opt.base_optimizer.step()
    sched.step_epoch()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


def test_running_stats_frozen_in_second_pass():
    model, x, _ = _problem()
    bn = model[1]
    bn.momentum = None  # cumulative average also depends on num_batches_tracked
    model(x)
    mean, count = bn.running_mean.clone(), bn.num_batches_tracked.clone()
    disable_running_stats(model)
    model(x * 3 + 1)
    enable_running_stats(model)
    assert torch.equal(bn.running_mean, mean) and torch.equal(bn.num_batches_tracked, count)
    assert bn.momentum is None
    model(x * 3 + 1)
    assert not torch.equal(bn.running_mean, mean)


# ---------------------------------------------------------------- schedules


def _opt(lr=0.1):
    return torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=lr)


def _lr(opt):
    return opt.param_groups[0]["lr"]


def _run_epochs(sched, opt, epochs, steps, metrics=None):
    lrs = []
    for e in range(epochs):
        for _ in range(steps):
            opt.step()
            sched.step_batch()
        sched.step_epoch(metrics[e] if metrics else None)
        lrs.append(_lr(opt))
    return lrs


def test_plateau_reduces_after_patience_in_the_given_mode():
    rising = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    cfg = ScheduleConfig(name="reduce_on_plateau", factor=0.5, patience=2)
    opt = _opt()
    lrs = _run_epochs(build_scheduler(cfg, opt, 6, 2, mode="max"), opt, 6, 2, rising)
    assert lrs == [0.1] * 6  # accuracy rising: never reduced
    opt = _opt()
    lrs = _run_epochs(build_scheduler(cfg, opt, 6, 2, mode="min"), opt, 6, 2, rising)
    # loss rising: best at epoch 1, reduced once patience (2) is exceeded at epoch 4
    assert lrs[:3] == [0.1] * 3 and lrs[3] == pytest.approx(0.05)
    with pytest.raises(ValueError, match="needs the monitored metric"):
        build_scheduler(cfg, _opt(), 6, 2).step_epoch()


def test_step_halves_at_step_size():
    opt = _opt()
    lrs = _run_epochs(build_scheduler(ScheduleConfig(name="step", step_size=2, gamma=0.5), opt, 4, 3), opt, 4, 3)
    assert lrs == pytest.approx([0.1, 0.05, 0.05, 0.025])


def test_cosine_warm_restarts_restart_after_t0():
    opt = _opt()
    cfg = ScheduleConfig(name="cosine_warm_restarts", t0=3, min_lr=0.0)
    lrs = _run_epochs(build_scheduler(cfg, opt, 6, 1), opt, 6, 1)
    assert lrs[0] < 0.1 and lrs[1] < lrs[0] and lrs[2] == pytest.approx(0.1)


def test_one_cycle_steps_per_batch():
    opt = _opt()
    sched = build_scheduler(ScheduleConfig(name="one_cycle", min_lr=1e-5), opt, 2, 5)
    assert sched.per_batch and _lr(opt) == pytest.approx(0.1 / 25)
    sched.step_epoch()  # per-epoch call is a no-op
    assert _lr(opt) == pytest.approx(0.1 / 25)
    lrs = []
    for _ in range(12):  # two more than planned: kept at the final LR, no error
        opt.step()
        sched.step_batch()
        lrs.append(_lr(opt))
    assert max(lrs) == pytest.approx(0.1, rel=0.05)
    assert lrs[-1] == pytest.approx(1e-5)
    assert opt.param_groups[0]["momentum"] == 0  # momentum not cycled


def test_warmup_cosine_starts_low_ends_at_min_lr():
    opt = _opt()
    cfg = ScheduleConfig(name="warmup_cosine", warmup_epochs=1, min_lr=1e-3)
    sched = build_scheduler(cfg, opt, 4, 5)
    first = _lr(opt)
    lrs = [lr for lr in _run_epochs_batches(sched, opt, 20)]
    assert first < 0.1 / 4
    assert max(lrs) == pytest.approx(0.1)
    assert lrs[-1] == pytest.approx(1e-3)
    with pytest.raises(ConfigError, match="warmup_epochs=4: must be less than"):
        build_scheduler(ScheduleConfig(name="warmup_cosine", warmup_epochs=4), _opt(), 4, 5)


def _run_epochs_batches(sched, opt, n):
    for _ in range(n):
        opt.step()
        sched.step_batch()
        yield _lr(opt)


def test_none_keeps_lr():
    opt = _opt()
    sched = build_scheduler(ScheduleConfig(name="none"), opt, 3, 2)
    assert _run_epochs(sched, opt, 3, 2, [1, 1, 1]) == [0.1] * 3
    sched.load_state_dict(sched.state_dict())


@pytest.mark.parametrize("scheduler_first", [True, False])
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_schedule_state_dict_round_trip(name, scheduler_first):
    cfg = ScheduleConfig(name=name, patience=0, step_size=1, t0=2, warmup_epochs=1)
    metrics = [0.5, 0.4, 0.3, 0.2, 0.1, 0.0]
    opt = _opt()
    sched = build_scheduler(cfg, opt, 6, 3, mode="max")
    _run_epochs(sched, opt, 3, 3, metrics)
    opt2 = _opt()
    if scheduler_first:  # torch's documented order
        sched2 = build_scheduler(cfg, opt2, 6, 3, mode="max")
        opt2.load_state_dict(opt.state_dict())
    else:
        opt2.load_state_dict(opt.state_dict())
        sched2 = build_scheduler(cfg, opt2, 6, 3, mode="max")
    sched2.load_state_dict(copy.deepcopy(sched.state_dict()))
    a = _run_epochs(sched, opt, 3, 3, metrics[3:])
    b = _run_epochs(sched2, opt2, 3, 3, metrics[3:])
    assert a == pytest.approx(b)


# ---------------------------------------------------------------- validation


def test_optim_validate_names_values():
    with pytest.raises(ConfigError) as e:
        OptimConfig(lr=-0.1, weight_decay=-1.0, momentum=1.0, rho=-0.5, grad_accum_steps=0).validate()
    msg = str(e.value)
    assert "optimizer.lr=-0.1: must be > 0, e.g. 1e-3" in msg
    for part in ("optimizer.weight_decay=-1.0", "optimizer.momentum=1.0", "optimizer.rho=-0.5",
                 "optimizer.grad_accum_steps=0"):
        assert part in msg


def test_optim_validate_unknown_name_lists_valid():
    with pytest.raises(ConfigError, match="valid optimizers: adam, adamw, sgd"):
        build_optimizer(OptimConfig(name="lion"), [nn.Parameter(torch.zeros(1))])
    with pytest.raises(ConfigError, match="optimizer.sam='gsam': valid values: asam, none, sam"):
        OptimConfig(sam="gsam").validate()


@pytest.mark.parametrize("sam", ["sam", "asam"])
def test_sam_with_grad_accumulation_refused(sam):
    with pytest.raises(ConfigError, match="gradient accumulation is not supported with SAM"):
        OptimConfig(sam=sam, grad_accum_steps=2).validate()
    OptimConfig(sam="none", grad_accum_steps=2).validate()


def test_schedule_validate():
    with pytest.raises(ConfigError) as e:
        ScheduleConfig(name="linear", factor=1.5, step_size=0, min_lr=-1.0).validate()
    msg = str(e.value)
    assert "valid schedules: cosine_warm_restarts, none, one_cycle, reduce_on_plateau, step, warmup_cosine" in msg
    assert "schedule.factor=1.5" in msg and "schedule.step_size=0" in msg and "schedule.min_lr=-1.0" in msg
    with pytest.raises(ConfigError, match="must be 'min'"):
        build_scheduler(ScheduleConfig(), _opt(), 3, 2, mode="up")


def test_bf16_autocast_sam_step_is_finite():
    model, x, y = _problem()
    opt = build_optimizer(OptimConfig(name="adamw", lr=1e-2, sam="asam", rho=0.5), model.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _train_step(opt, model, x, y)
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in model.parameters())
    assert not math.isnan(opt.param_groups[0]["lr"])


def test_asam_perturbs_zero_parameters_by_eta():
    w0 = torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64)
    g = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    w = nn.Parameter(w0.clone())
    w.grad = g.clone()
    SAM([w], torch.optim.SGD, rho=0.5, adaptive=True, lr=0.1).first_step()
    t = torch.tensor([0.01, 1.01, 2.01], dtype=torch.float64)  # |w| + eta, eta = 0.01
    expected = w0 + 0.5 * t**2 * g / torch.linalg.vector_norm(t * g)
    assert w[0].item() != 0.0  # a zero weight is perturbed too
    assert torch.allclose(w.detach(), expected, atol=1e-6, rtol=0)


def test_asam_eta_is_configurable_and_validated():
    w = nn.Parameter(torch.tensor([0.0, 1.0]))
    w.grad = torch.tensor([1.0, 1.0])
    build_optimizer(OptimConfig(name="sgd", sam="asam", rho=0.5, asam_eta=0.0), [w]).first_step()
    assert w[0].item() == 0.0  # eta = 0: the original (zero-blind) scaling
    with pytest.raises(ConfigError, match="optimizer.asam_eta=-1.0: must be >= 0"):
        OptimConfig(asam_eta=-1.0).validate()
