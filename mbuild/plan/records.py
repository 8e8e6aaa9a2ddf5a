"""What the build records (Mergefile.lock, the staleness rules) compare of a plan.

They hold JSON, so a recipe is compared as JSON gives it back, and a source by one hash of
its tensors' digests and revision.
"""

from __future__ import annotations

from typing import Any, Mapping

from mbuild import keys
from mbuild.plan.tasks import Source


def source_fingerprint(source: Source, found: Mapping[str, str] | None) -> str | None:
    """One hash for a source's content (its tensors' digests and revision)."""
    if found is None:
        return None
    return keys.digest({"revision": source.revision, "tensors": dict(found)})


def plain_recipe(data: Any) -> Any:
    """Recipe data as JSON would give it back (tuples to lists), for comparing with the lock."""
    import json

    return json.loads(keys.canonical(data))
