"""`mbuild [TARGETS]`: a dry run's table, or a build session and its report."""

from __future__ import annotations

import json
import os
import sys

from mbuild.cli import check, console, shared
from mbuild.errors import MbuildError


def build(args) -> int:
    from mbuild import staleness

    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        raise MbuildError(f"unknown --device '{args.device}': use cpu or cuda")
    mergefile, state = shared.load(args)
    if args.dry_run:
        from mbuild.io import hub_reads

        with hub_reads(download=False) as hub:  # hub models not in the cache: headers only
            the_plan = shared.read_only_plan(args, mergefile, state)
        cache = shared.tensor_cache(state, args, create=False)
        has_tensor = (lambda key: cache.contains(key)) if cache is not None and not args.force else (lambda key: False)
        decisions = staleness.decide_all(the_plan, state, args.force, has_tensor)
        fetched = [row.as_json() for row in check.downloads(hub.models.values())]
        console.print_dry_run(the_plan, decisions, args, has_tensor, _cluster_nodes(args, state), fetched)
        if not args.json:
            check.print_downloads(hub.models.values())
        return 0
    if args.device.startswith("cuda"):
        shared.require_cuda()
    printer = console.Printer(quiet=args.quiet or args.json, targets=0)
    if args.quiet:  # huggingface_hub's download bars too (read when it is imported, later)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    torch_import = console.SideImport("torch")
    try:
        return _run_build(args, mergefile, state, printer, torch_import)
    finally:
        state.close()


def _cluster_nodes(args, state):
    """The Ray cluster's live nodes for a dry run with --executor ray; None otherwise."""
    if args.executor != "ray":
        return None
    from mbuild import ray_executor

    executor = ray_executor.RayExecutor(ray_executor.storage_in(state.folder), args.ray_address, args.device,
                                        compute=False)
    try:
        return executor.nodes()
    finally:
        executor.close()


def _run_build(args, mergefile, state, printer, torch_import) -> int:
    from mbuild import session

    run = session.Session(mergefile, state, shared.request(args), printer, torch_import.start)
    reports = run.build(lambda: shared.tensor_cache(state, args, create=True))
    if args.json:
        print(json.dumps({"targets": {name: r.as_json() for name, r in reports.items()}}, indent=2))
    elif not args.quiet:
        console.print_summary(reports)
    for report in reports.values():
        # Failures are reported even with --quiet or --json (on stderr): a quiet failure is a lie.
        if report.status == "failed":
            print(f"mbuild: error: {report.error}", file=sys.stderr)
        elif report.status == "skipped":
            print(f"mbuild: skipped {report.name}: {'; '.join(report.reasons)}", file=sys.stderr)
    return 1 if any(r.status in ("failed", "skipped") for r in reports.values()) else 0
