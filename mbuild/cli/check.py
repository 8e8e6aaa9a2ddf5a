"""`mbuild check [TARGET...]`: the problems a build would meet and the bytes it would download,
found from headers alone (`mbuild.hub_check`)."""

from __future__ import annotations

import json
import sys

from mbuild.cli import console, shared


def check(args) -> int:
    """Print the report; exit 2 when a target has a problem or the downloads do not fit the disk."""
    from mbuild import hub_check

    mergefile, state = shared.load(args)
    try:
        report = hub_check.check(mergefile, state, shared.request(args))
    finally:
        state.close()
    problems = list(report.problems)
    if not report.fits:
        problems.append(
            f"the hub models need {console.byte_text(report.download_bytes)} more in {report.cache_folder}, "
            f"which has {console.byte_text(report.free_bytes)} free"
        )
    if args.json:
        print(json.dumps({**report.as_json(), "problems": problems}, indent=2))
    else:
        for model in report.models:
            _print_model(model)
        print(
            f"mbuild check: {len(report.targets)} target(s), {len(report.problems)} problem(s); "
            f"{console.byte_text(report.download_bytes)} to download, "
            f"{console.byte_text(report.free_bytes)} free in {report.cache_folder}"
        )
    for problem in problems:
        print(f"mbuild: error: {problem}", file=sys.stderr)
    return 2 if problems else 0


def downloads(models) -> list:
    """What a build would download of these hub models (`io.HubModel`): a `ModelDownload` for each
    the cache does not hold whole."""
    from mbuild import hub_check

    rows = [hub_check.model_download(model) for model in models]
    return [row for row in rows if not row.in_cache]


def print_downloads(models) -> None:
    """What a build would download of these hub models (`io.HubModel`); nothing when the cache holds them all."""
    rows = downloads(models)
    if not rows:
        return
    print(f"hub models to download ({console.byte_text(sum(row.download_bytes for row in rows))}):")
    for row in rows:
        _print_model(row)


def _print_model(model) -> None:
    where = "in the cache" if model.in_cache else f"{console.byte_text(model.download_bytes)} to download"
    print(f"  {model.model:40} {model.commit[:12]}  {model.files} files, {console.byte_text(model.needed_bytes)}; {where}")
