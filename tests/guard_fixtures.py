"""A tiny student/teacher pair and a PRIMED-shaped loss for the guarded-step tests
(plain, accumulation, AMP, compile, DDP): CE on a task batch plus a
distillation KL on a reference batch, both means over samples, so a batch
split into micro-batches (each loss / N) gives the gradient of the whole."""
import torch
import torch.nn.functional as F

import mgcl


def model(seed=0, width=24):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, width), torch.nn.Tanh(), torch.nn.Linear(width, 3))


def setup(**guard_options):
    """(student, teacher, guard): the guard's anchors are the teacher's weights
    (the previous task's), and the student has moved off them so the guard acts."""
    student, teacher = model(), model()
    guard_options.setdefault("lam", 3.0)
    g = mgcl.FisherGuard(student.parameters(), **guard_options)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return student, teacher, g


def batch(step, n=12):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g), torch.randn(n, 6, generator=g)


def losses(student, teacher, x, y, r):
    """(distill, ce) as 0-d tensors."""
    ce = F.cross_entropy(student(x), y)
    with torch.no_grad():
        t = F.softmax(teacher(r).float(), 1)
    distill = F.kl_div(F.log_softmax(student(r).float(), 1), t, reduction="batchmean")
    return distill, ce.float()


def train(student, teacher, g, steps, micro=1, lr=0.1, rows=None, forward=None, scaler=None, autocast=None):
    """``steps`` guarded SGD steps; each step's batch (its ``rows`` slice) in
    ``micro`` micro-batches; returns the penalties."""
    opt = torch.optim.SGD(student.parameters(), lr=lr)
    forward = forward or student
    pens = []
    for step in range(steps):
        x, y, r = (t[rows] if rows is not None else t for t in batch(step))
        for xs, ys, rs in zip(x.chunk(micro), y.chunk(micro), r.chunk(micro)):
            with autocast() if autocast else torch.enable_grad():
                distill, ce = losses(forward, teacher, xs, ys, rs)
            g.backward(distill / micro, ce / micro)
        pens.append(g.apply())
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad()
    return pens


def flat(module):
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])
