"""The names of the build graph's nodes: a target, a local model folder, a hub model, or a
model with a LoRA adapter applied.

A node is written ``KIND:LABEL`` (``target:final``, ``local:models/base``,
``hub:org/name@main``, ``lora:local:models/base+hub:org/chat@main``: a LoRA's label is its
two sides' nodes), the form the lock, the manifests and the graph keep. `Node` is that string
with its parts named, so no module splits it by hand.
"""

from __future__ import annotations

TARGET, LOCAL, HUB, LORA = "target", "local", "hub", "lora"


class Node(str):
    """A graph node's name: ``KIND:LABEL``."""

    __slots__ = ()

    @classmethod
    def of(cls, kind: str, label: str) -> "Node":
        return cls(f"{kind}:{label}")

    @classmethod
    def target(cls, name: str) -> "Node":
        """The node of the target called ``name``."""
        return cls.of(TARGET, name)

    @property
    def kind(self) -> str:
        """``target``, ``local``, ``hub`` or ``lora``."""
        return self.split(":", 1)[0]

    @property
    def label(self) -> str:
        """What follows the kind: a target's name, a folder, a hub ID with its revision."""
        return self.split(":", 1)[1]

    @property
    def is_target(self) -> bool:
        return self.kind == TARGET
