"""The names of the build graph's nodes: a target, a local model folder or a hub model.

A node is written ``KIND:LABEL`` (``target:final``, ``local:models/base``,
``hub:org/name@main``), the form the lock, the manifests and the graph keep. `Node` is
that string with its parts named, so no module splits it by hand.
"""

from __future__ import annotations

TARGET, LOCAL, HUB = "target", "local", "hub"


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
        """``target``, ``local`` or ``hub``."""
        return self.split(":", 1)[0]

    @property
    def label(self) -> str:
        """What follows the kind: a target's name, a folder, a hub ID with its revision."""
        return self.split(":", 1)[1]

    @property
    def is_target(self) -> bool:
        return self.kind == TARGET
