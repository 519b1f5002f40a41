"""First-party loss plugin: classification and distillation losses.

Each loss lives in its own module; this module only registers them. Teacher fusions are the separate
plugin ``kdtoolkit_plugins.losses.fusion`` (entry point ``fusions``).
"""

from __future__ import annotations

import kdtoolkit
from kdtoolkit_plugins.losses.attention import AttentionLoss, AttentionOptions
from kdtoolkit_plugins.losses.classification import CrossEntropyLoss, CrossEntropyOptions
from kdtoolkit_plugins.losses.fitnet import FitNetLoss, FitNetOptions
from kdtoolkit_plugins.losses.kd import KDLoss, KDOptions
from kdtoolkit_plugins.losses.logit_l2 import LogitL2Loss, LogitL2Options
from kdtoolkit_plugins.losses.mutual import (
    DMLLoss,
    DMLOptions,
    EnsembleKDLoss,
    EnsembleKDOptions,
    MinLogitLoss,
    MinLogitOptions,
)

__all__ = [
    "AttentionLoss", "AttentionOptions", "CrossEntropyLoss", "CrossEntropyOptions", "DMLLoss",
    "DMLOptions", "EnsembleKDLoss", "EnsembleKDOptions", "FitNetLoss", "FitNetOptions", "KDLoss",
    "KDOptions", "LogitL2Loss", "LogitL2Options", "MinLogitLoss", "MinLogitOptions", "register_losses",
]


@kdtoolkit.hookimpl
def register_losses(register):
    register("ce", CrossEntropyLoss, options=CrossEntropyOptions,
             description="cross-entropy with optional label smoothing; inputs logits, labels")
    register("kd", KDLoss, options=KDOptions,
             description="Hinton et al. 2015: T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)); inputs student, teacher")
    register("attention", AttentionLoss, options=AttentionOptions,
             description="attention transfer, Zagoruyko & Komodakis ICLR 2017; inputs student, teacher features")
    register("fitnet", FitNetLoss, options=FitNetOptions,
             description="FitNet hints, Romero et al. ICLR 2015: MSE(regressor(F_s), F_t); inputs student, teacher")
    register("logit_l2", LogitL2Loss, options=LogitL2Options,
             description="CTKD (Zhao et al.): (1/B)·‖sg(z_t) − z_s‖²; inputs student, teacher")
    register("minlogit", MinLogitLoss, options=MinLogitOptions,
             description="KDCL-MinLogit mutual learning, Guo et al. CVPR 2020; inputs logits (list), labels")
    register("dml", DMLLoss, options=DMLOptions,
             description="deep mutual learning, Zhang et al. CVPR 2018; inputs logits (list), labels")
    register("ensemble_kd", EnsembleKDLoss, options=EnsembleKDOptions,
             description="averaged-logit ensemble distillation; inputs logits (list), labels")
