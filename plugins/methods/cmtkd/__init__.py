"""CMT-KD: collaborative multi-teacher knowledge distillation (Pham, Hoang, Do, WACV 2023).

The ``cmtkd`` method (:mod:`.method`), the stage splitting it runs networks with
(:mod:`.staging`), its Figure 2 (:mod:`.plotting`) and the ``kdtoolkit plot-fusion`` command
(:mod:`.commands`). One plugin (entry point ``cmtkd``); the core knows none of it.
"""

from __future__ import annotations

import kdtoolkit
from kdtoolkit_plugins.methods.cmtkd import commands
from kdtoolkit_plugins.methods.cmtkd.method import CMTKD, COMBINED
from kdtoolkit_plugins.methods.cmtkd.options import CMTKDOptions

__all__ = ["CMTKD", "CMTKDOptions", "COMBINED", "register_commands", "register_methods"]


@kdtoolkit.hookimpl
def register_methods(register):
    # its fusions are built from the "importance" plugin; its default terms use these losses
    register("cmtkd", CMTKD, options=CMTKDOptions,
             requires={"fusion": ["importance"], "loss": ["ce", "minlogit", "attention", "fitnet"]},
             description="CMT-KD (Pham et al. WACV 2023): quantized teachers fused stage by stage, trained with the student")


@kdtoolkit.hookimpl
def register_commands(cli):
    commands.register(cli)
