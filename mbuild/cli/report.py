"""`mbuild report [TARGET...]`: every eval target's stored score, as a table or as JSON.

Nothing is evaluated here: the scores are those the last build stored (`mbuild.evaluation.read_score`),
each marked fresh or stale as `mbuild status` would mark its target. Evals over the points of a
sweep (targets named `final[t=0.3,density=0.4]`) are also shown as a grid when two parameters vary.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from mbuild.cli import shared
from mbuild.errors import MbuildError

POINT = re.compile(r"^(?P<sweep>[^\[\]]+)\[(?P<values>[^\[\]]*)\]$")


def run(parser, rest) -> int:
    """Parse `mbuild report`'s arguments and print the report."""
    from mbuild.cli import arguments

    arguments.common(parser)
    parser.add_argument("--device", default="cpu", help="the device the scores were computed on (for fresh or stale)")
    parser.add_argument("--plot", metavar="FOLDER", help="also draw each sweep's grid as a heatmap, FOLDER/NAME.png")
    parser.add_argument("targets", nargs="*", help="eval targets (default: all)")
    return report(parser.parse_args(rest))


def report(args) -> int:
    """Print the eval targets' scores (all, or those named)."""
    from mbuild import evaluation, staleness
    from mbuild.mergefile.evaluation import model_name

    mergefile, state = shared.load(args)
    try:
        names = _chosen(mergefile, args.targets)
        the_plan = shared.read_only_plan(args, mergefile, state)
        decisions = staleness.decide_all(the_plan, state)
    finally:
        state.close()
    rows: dict[str, dict[str, Any]] = {}
    for name in names:
        target = mergefile.targets[name]
        stored = evaluation.read_score(target)
        decision = decisions.get(name)
        rows[name] = {
            "model": model_name(target.evaluation.model),
            "metric": target.evaluation.metric,
            "score": stored["score"] if stored else None,
            "computed": _when(stored["computed"]) if stored else None,
            "fresh": bool(stored) and decision is not None and not decision.stale,
        }
    grids = sweep_grids(mergefile, rows)
    images = write_heatmaps(grids, Path(args.plot)) if args.plot else []
    if args.json:
        data: dict[str, Any] = {"evals": rows}
        if grids:
            data["grids"] = grids
        if args.plot:
            data["images"] = [str(path) for path in images]
        print(json.dumps(data, indent=2))
        return 0
    _print_tables(rows, grids)
    for path in images:
        print(f"mbuild report: wrote {path}")
    return 0


def _chosen(mergefile, asked) -> list[str]:
    """The eval targets to show: those named (a sweep's name stands for its points), else every one."""
    evals = [name for name, target in mergefile.targets.items() if target.evaluation is not None]
    if not asked:
        return evals
    expand = getattr(mergefile, "expand_names", lambda names: list(names))
    chosen = []
    for name in expand(asked):
        if name not in mergefile.targets:
            raise MbuildError(f"no target named '{name}'")
        if mergefile.targets[name].evaluation is None:
            raise MbuildError(f"'{name}' is not an eval target: mbuild report shows the scores of eval targets")
        chosen.append(name)
    return chosen


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def point_of(mergefile, name: str) -> tuple[str, tuple[str, ...], tuple[str, ...]] | None:
    """(sweep, parameters, values) of a sweep's point, from the Mergefile's sweeps or else its name."""
    for sweep in getattr(mergefile, "sweeps", {}).values():
        if name in sweep.points:
            return sweep.name, tuple(sweep.parameters), tuple(sweep.points[name])
    match = POINT.match(name)
    if match is None:
        return None
    pairs = [part.split("=", 1) for part in match["values"].split(",") if "=" in part]
    if not pairs:
        return None
    return match["sweep"], tuple(p for p, _ in pairs), tuple(v for _, v in pairs)


def sweep_grids(mergefile, rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Scores of evals over a two-parameter sweep, as grids: {eval sweep: {"rows", "columns", "scores"}}.

    An eval belongs to a sweep when it is a point itself, or when the model it scores is one.
    """
    groups: dict[str, dict[str, Any]] = {}
    for name, row in rows.items():
        point = point_of(mergefile, name)
        label = name
        if point is None:
            point = point_of(mergefile, row["model"])
            label = f"{row['metric']} of {point[0]}" if point else name
        else:
            label = point[0]
        if point is None or len(point[1]) != 2:
            continue
        group = groups.setdefault(label, {"parameters": list(point[1]), "rows": [], "columns": [], "scores": {}})
        if list(point[1]) != group["parameters"]:
            continue
        first, second = point[2]
        if first not in group["rows"]:
            group["rows"].append(first)
        if second not in group["columns"]:
            group["columns"].append(second)
        group["scores"].setdefault(first, {})[second] = row["score"]
    return {label: group for label, group in groups.items() if len(group["rows"]) * len(group["columns"]) > 1}


def _print_tables(rows, grids) -> None:
    from rich.console import Console
    from rich.markup import escape  # a point's name, `final[t=0.3]`, is not markup
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 160)
    if not rows:
        console.print("mbuild report: the Mergefile has no eval targets")
        return
    table = Table(title="mbuild report: eval targets")
    for column in ("target", "model", "metric", "score", "computed", "state"):
        table.add_column(column, justify="right" if column == "score" else "left")
    for name, row in rows.items():
        score = "—" if row["score"] is None else f"{row['score']:.6g}"
        state = "never built" if row["score"] is None else ("fresh" if row["fresh"] else "stale")
        table.add_row(escape(name), escape(row["model"]), row["metric"], score, row["computed"] or "—", state)
    console.print(table)
    for label, grid in grids.items():
        first, second = grid["parameters"]
        table = Table(title=escape(f"{label}: {first} (rows) by {second} (columns)"))
        table.add_column(escape(f"{first} \\ {second}"))
        for column in grid["columns"]:
            table.add_column(escape(column), justify="right")
        for value in grid["rows"]:
            scores = [grid["scores"].get(value, {}).get(column) for column in grid["columns"]]
            table.add_row(escape(value), *("—" if s is None else f"{s:.6g}" for s in scores))
        console.print(table)


def write_heatmaps(grids: dict[str, dict[str, Any]], folder: Path) -> list[Path]:
    """One heatmap a grid, FOLDER/NAME.png (matplotlib, the `plot` extra); the paths written."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, whatever the display
        import matplotlib.pyplot as pyplot
    except ImportError:
        raise MbuildError("mbuild report --plot draws with matplotlib: pip install 'mbuild[plot]'") from None
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for label, grid in grids.items():
        values = [[grid["scores"].get(r, {}).get(c) for c in grid["columns"]] for r in grid["rows"]]
        cells = [[float("nan") if v is None else v for v in row] for row in values]
        figure, axes = pyplot.subplots(figsize=(1.2 * len(grid["columns"]) + 2.5, 0.8 * len(grid["rows"]) + 1.8))
        image = axes.imshow(cells, cmap="viridis", aspect="auto")
        axes.set_xticks(range(len(grid["columns"])), grid["columns"])
        axes.set_yticks(range(len(grid["rows"])), grid["rows"])
        axes.set_xlabel(grid["parameters"][1])
        axes.set_ylabel(grid["parameters"][0])
        axes.set_title(label)
        for y, row in enumerate(values):
            for x, value in enumerate(row):
                if value is not None:
                    axes.text(x, y, f"{value:.4g}", ha="center", va="center", color="white", fontsize=8)
        figure.colorbar(image, ax=axes)
        figure.tight_layout()
        path = folder / (re.sub(r"[^\w.-]+", "_", label).strip("_") + ".png")
        figure.savefig(path, dpi=100)
        pyplot.close(figure)
        written.append(path)
    return written
