"""The kinds of target: each registered once, as merge methods are in `mbuild.methods`.

A kind says which targets are its own, what they run (for the model card and the lock) and
how one expands into tensor tasks and companion files. The planner looks a target's kind up
here (`kind_of`) and knows none by name, so a new kind (a LoRA extraction) is a new module
beside `merge`, `moe` and `gguf` that calls `register`.

Every kind's ``expand`` has the same signature::

    expand(target, infos, plans, source_digests, shard_bytes, output_digest, store, *, platform) -> TargetPlan

``infos`` maps each input node to its tensor table (a source's headers, or what an earlier
target will hold), ``plans`` the targets expanded so far, ``source_digests`` a source node to
its tensors' digests (None: not hashed yet), ``output_digest`` a task key to the digest of the
bytes it produced, ``store`` the folder where files the plan makes are kept, and ``platform``
where tasks compute (part of each computing task's key).
"""

from mbuild.plan.kinds import evaluation, gguf, lora_extraction, merge, moe  # noqa: F401  (each registers itself)
from mbuild.plan.kinds.registry import TargetKind, kind_of, recipe_method, register

__all__ = ["TargetKind", "kind_of", "recipe_method", "register"]
