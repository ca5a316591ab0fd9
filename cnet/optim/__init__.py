"""Optimizers (torch.optim's names and update rules, fused in-place kernels),
learning-rate schedules and gradient clipping.

>>> opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
>>> sched = optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100)
"""
from .optimizers import (Optimizer, SGD, Adagrad, RMSprop, Adadelta, Adam, AdamW, NAdam,
                         param_groups_no_decay)
from .clip import clip_grad_norm_
from . import lr_scheduler

__all__ = ["Optimizer", "SGD", "Adagrad", "RMSprop", "Adadelta", "Adam", "AdamW", "NAdam",
           "param_groups_no_decay", "clip_grad_norm_", "lr_scheduler"]
