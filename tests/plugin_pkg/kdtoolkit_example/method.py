"""A method: factory(options, context) -> Method. ``peer_ml`` trains the pipeline's loss terms plus a
peer network it owns (built from a nested component option), each learning from the labels and from
the other (deep mutual learning)."""

import attrs
import torch.nn.functional as F

from kdtoolkit.api import LossTermsMethod, ModelConfig, component, non_negative


@attrs.frozen
class PeerMLOptions:
    peer: ModelConfig = component("model", description="the peer network, e.g. { name = \"tiny_convnet\", width = 4 }")
    mutual_weight: float = attrs.field(default=1.0, validator=non_negative)


class PeerML(LossTermsMethod):
    def __init__(self, options, context):
        super().__init__(options, context)
        peer = options.peer
        factory = context.registry.get("model", peer.name).factory
        self.peer = factory(peer.options, num_classes=context.num_classes)  # its parameters: method.peer.*
        self.student = context.students()[0]

    def training_step(self, images, labels, progress):
        logits = self.forward_outputs(images)
        terms = self.loss_terms(logits, labels, progress)  # the pipeline's [[losses]], weighted and scheduled
        student, peer = logits[self.student], self.peer(images)
        w = self.options.mutual_weight
        terms["peer_ce"] = F.cross_entropy(peer, labels)
        terms["peer_mutual"] = w * F.kl_div(F.log_softmax(peer, 1), F.log_softmax(student.detach(), 1), log_target=True, reduction="batchmean")
        terms["student_mutual"] = w * F.kl_div(F.log_softmax(student, 1), F.log_softmax(peer.detach(), 1), log_target=True, reduction="batchmean")
        return terms

    def evaluate_logits(self, images):
        return {**super().evaluate_logits(images), "peer": self.peer(images)}
