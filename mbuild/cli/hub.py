"""The hub subcommands: `mbuild lock [--update [MODEL...]]` and `mbuild push TARGET --repo ORG/NAME`.

Their work is done in `mbuild.hub_pins` and `mbuild.hub_push`; this module parses and prints.
"""

from __future__ import annotations

import argparse
import json

from mbuild.cli import arguments, shared


def run(name: str, parser: argparse.ArgumentParser, rest: list[str]) -> int:
    """Parse and run `lock` or `push`."""
    arguments.common(parser)
    if name == "lock":
        parser.add_argument("--update", action="store_true", help="move the pins of hub models to their branch's commit now")
        parser.add_argument("models", nargs="*", help="with --update: the hub models to move (default: every one)")
        return _lock(parser.parse_args(rest), parser)
    parser.add_argument("target", help="the built target to upload")
    parser.add_argument("--repo", required=True, help="the hub repository, ORG/NAME (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--revision", default="main", help="the branch to commit to (created if missing; default main)")
    return _push(parser.parse_args(rest))


def _lock(args, parser) -> int:
    """Without --update: the pins, as the lock holds them. With it: move them and say what goes stale."""
    from mbuild import hub_pins, lock

    if args.models and not args.update:
        parser.error("naming models moves their pins: add --update")
    mergefile, state = shared.load(args)
    if not args.update:
        pins = lock.pinned_revisions(mergefile.path)
        if args.json:
            print(json.dumps({"pins": pins}, indent=2))
            return 0
        for node, commit in pins.items():
            print(f"{node.split(':', 1)[1]:40} {commit}")
        if not pins:
            print(f"mbuild lock: no hub model is pinned in {mergefile.path.name}.lock")
        return 0
    update = hub_pins.update_pins(mergefile, state, args.models)
    if args.json:
        report = {
            "models": {
                m.model: {"old": m.old, "new": m.new, "moved": m.moved, "targets": list(m.targets)} for m in update.moves
            },
            "kept": list(update.kept),
            "stale": list(update.stale),
        }
        print(json.dumps(report, indent=2))
        return 0
    for move in update.moves:
        change = f"{(move.old or 'unpinned')[:12]} → {move.new[:12]}" if move.moved else f"{move.new[:12]} (unchanged)"
        downstream = f"  stale: {', '.join(move.targets)}" if move.moved and move.targets else ""
        print(f"{move.model:40} {change}{downstream}")
    for text in update.kept:
        print(f"{text:40} kept: the Mergefile names its revision")
    moved = sum(1 for m in update.moves if m.moved)
    stale = f"; now stale: {', '.join(update.stale)}" if update.stale else ""
    print(f"mbuild lock: {moved} pin(s) moved in {mergefile.path.name}.lock{stale}")
    return 0


def _push(args) -> int:
    from mbuild import hub_push, session

    mergefile, state = shared.load(args)
    request = shared.request(argparse.Namespace(**{**vars(args), "targets": [args.target]}))
    pushed = hub_push.push(session.Session(mergefile, state, request), args.target, args.repo, args.private, args.revision)
    if pushed.unrecorded:
        shared.warn(f"pushed, but Mergefile.lock does not record it: {pushed.unrecorded}")
    if args.json:
        print(json.dumps({"target": pushed.target, "repo": pushed.repo, "revision": pushed.revision,
                          "commit": pushed.commit, "key": pushed.key, "url": pushed.url, "files": list(pushed.files)}, indent=2))
    else:
        print(f"mbuild push: {pushed.target} → {pushed.repo}@{pushed.revision}, commit {pushed.commit[:12]} "
              f"({len(pushed.files)} file(s)): {pushed.url}")
    return 0
