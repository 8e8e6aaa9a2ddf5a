"""The plan: the DAG of targets and sources, each target expanded into tensor tasks with keys.
Pure data; never imports torch, the engine, the cache or the CLI.

Its parts, one concept each: `tasks` (the data a plan is made of), `graph` (which targets a
request builds, in order), `planner` (`make_plan`: open the sources, expand each target
through its kind), `kinds` (the registered kinds of target: `merge`, `moe`), `layers` (where
a tensor sits in a decoder), `companions` (an output's config, files and model card) and
`records` (what the build records compare). The rest of mbuild imports the names below.
"""

from mbuild.mergefile.dependencies import build_graph
from mbuild.plan.graph import select
from mbuild.plan.kinds import recipe_method
from mbuild.plan.planner import make_plan
from mbuild.plan.records import plain_recipe, source_fingerprint
from mbuild.plan.tasks import (
    DEFAULT_SHARD_BYTES,
    Plan,
    Source,
    TargetPlan,
    TensorInput,
    TensorTask,
    node_of,
)

__all__ = [
    "DEFAULT_SHARD_BYTES",
    "Plan",
    "Source",
    "TargetPlan",
    "TensorInput",
    "TensorTask",
    "build_graph",
    "make_plan",
    "node_of",
    "plain_recipe",
    "recipe_method",
    "select",
    "source_fingerprint",
]
