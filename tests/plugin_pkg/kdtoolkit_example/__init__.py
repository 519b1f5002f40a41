"""kdtoolkit-example: one component of every kind, registered through the ``example`` entry point.

dataset ``blobs``, model ``tiny_convnet``, quantizer ``uniform``, loss ``l1_logits``, fusion
``max_logits``, schedule ``warmup``, method ``peer_ml``.
"""

import kdtoolkit

from kdtoolkit_example.components import (
    Blobs, BlobsOptions, L1Logits, L1LogitsOptions, MaxLogits, TinyConvNet, TinyConvNetOptions, Warmup, WarmupOptions,
)
from kdtoolkit_example.method import PeerML, PeerMLOptions
from kdtoolkit_example.quant import UniformOptions, UniformQuantizer


@kdtoolkit.hookimpl
def register_datasets(register):
    register("blobs", Blobs, options=BlobsOptions, description="coloured noise, one colour per class; in memory")


@kdtoolkit.hookimpl
def register_models(register):
    register("tiny_convnet", TinyConvNet, options=TinyConvNetOptions, description="two conv stages and a linear head; staged")


@kdtoolkit.hookimpl
def register_quantizers(register):
    register("uniform", UniformQuantizer, options=UniformOptions, description="symmetric uniform weights, clipped activations")


@kdtoolkit.hookimpl
def register_losses(register):
    register("l1_logits", L1Logits, options=L1LogitsOptions, description="L1 distance to the teacher's logits")


@kdtoolkit.hookimpl
def register_fusions(register):
    register("max_logits", MaxLogits, description="element-wise maximum of the teachers' logits")


@kdtoolkit.hookimpl
def register_schedules(register):
    register("warmup", Warmup, options=WarmupOptions, description="linear ramp from 0 to 1 over the first epochs")


@kdtoolkit.hookimpl
def register_methods(register):
    register("peer_ml", PeerML, options=PeerMLOptions, description="the pipeline's loss terms plus mutual learning with an owned peer network")
