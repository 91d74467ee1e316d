"""Shared by the examples: a toy task and a toy reference set, built offline
(mgcl's synthetic shapes), and a tiny randomly initialised CLIP pair."""
import argparse
import copy

import torch

from mgcl.cl.strategies.refdata import reference_batches
from mgcl.cl.toy import toy_tasks, toy_vocabulary
from mgcl.integrations import PrimedLosses
from mgcl.nn import PrimedLoss


class TaskImages(torch.utils.data.Dataset):
    """A task's training images as {"images", "labels"} items (the student's train transform)."""

    def __init__(self, task, transform):
        self.data, self.transform = task.train, transform

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        image, label = self.data[i]
        return {"images": self.transform(image), "labels": int(label)}


class ReferencePairs(torch.utils.data.Dataset):
    """Stand-in reference pairs (image, caption, weight): the previous task's images,
    captioned with their class prompt. A real run retrieves them from a bank
    (mgcl.retrieval.Siphon) and wraps them in mgcl.cl.strategies.refdata.ReferencePairs."""

    def __init__(self, task, transform):
        self.task, self.transform = task, transform

    def __len__(self):
        return len(self.task.train)

    def __getitem__(self, i):
        image, label = self.task.train[i]
        return self.transform(image), self.task.prompts(0)[label], 1.0


def setup(make_model, seed=0, ref_batch_size=8):
    """(student, PRIMED's losses, task dataset) for task 2 of two toy tasks: the
    teacher a frozen copy of the model after task 1 (here: the initial model), the
    reference pairs task 1's images (alpha 1, beta 0.25, label smoothing 0.2)."""
    tasks = toy_tasks(2, n_train=8, n_test=4, image_size=32, seed=seed)
    student = make_model(toy_vocabulary(tasks))
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    previous, task = tasks
    refs = reference_batches(ReferencePairs(previous, student.transform(False)), student.tokenize, ref_batch_size,
                             seed=seed)
    losses = PrimedLosses(teacher, student.tokenize(task.prompts(0)), refs,
                          PrimedLoss(alpha=1.0, beta=0.25, label_smoothing=0.2))
    return student, losses, TaskImages(task, student.transform(True))


def arguments(doc: str, out: str, accumulate_help: str):
    """The examples' command line: --steps, --accumulate, --batch-size, --lam, --out."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps")
    ap.add_argument("--accumulate", type=int, default=2, help=accumulate_help)
    ap.add_argument("--batch-size", type=int, default=4, help="task (micro-)batch size")
    ap.add_argument("--lam", type=float, default=1.0, help="guard strength lambda")
    ap.add_argument("--out", default=out, help="output folder")
    return ap.parse_args()
