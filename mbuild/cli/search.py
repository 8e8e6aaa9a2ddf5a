"""`mbuild search NAME [--apply]`: the trials of a recipe search, one line each, and the best recipe.

The search itself is `mbuild.search`; this module parses the arguments, builds each trial
through a `session.Session` over the same state and cache as `mbuild`, prints, and keeps the
trials in ``build/search/NAME/trials.json``.
"""

from __future__ import annotations

import dataclasses
import json
import sys

from mbuild.cli import arguments, console, shared


def run(parser, rest) -> int:
    """Parse `mbuild search`'s arguments and run the search."""
    arguments.common(parser)
    parser.add_argument("name", help="the target searched (an entry of the Mergefile's 'search:')")
    parser.add_argument("--apply", action="store_true", help="write the best recipe into the Mergefile as NAME-best")
    parser.add_argument("-j", "--jobs", type=arguments.job_count, default=2, help="tensor tasks run at once (default 2)")
    parser.add_argument("--device", default="cpu", help="where the math and the evals run: cpu (default) or cuda")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only errors (and --json output)")
    args = parser.parse_args(rest)
    args.targets = []  # what the session builds is each trial's objective
    return search(args)


def search(args) -> int:
    from mbuild import evaluation, io, search as searching, session

    mergefile, state = shared.load(args)
    try:
        found = searching.read_search(mergefile, args.name)
        folder = mergefile.folder / "build" / "search" / args.name
        request = dataclasses.replace(shared.request(args), targets=(found.objective,))
        printer = console.Printer(quiet=args.quiet or args.json)  # each trial's build, as `mbuild` shows it

        def build(trial_file):
            run = session.Session(trial_file, state, request, printer)
            reports = run.build(lambda: shared.tensor_cache(state, args, create=True))
            return reports, run.plan(hashing=False)

        def score_of(target):
            stored = evaluation.read_score(target)
            return stored["score"] if stored else None

        def show(result) -> None:
            if not (args.quiet or args.json):
                print(_trial_line(found, result), flush=True)

        results = searching.run_trials(found, mergefile, build, score_of, folder, show)
    finally:
        state.close()
    best = searching.best_trial(found, results)
    applied = None
    if args.apply and best is not None:
        written, in_mergefile = searching.apply(found, mergefile, best)
        applied = {"target": found.best_name, "file": str(written), "in_mergefile": in_mergefile}
    document = {
        "search": found.name, "objective": found.objective, "direction": found.direction, "sampler": found.sampler,
        "trials": [result.as_json() for result in results],
        "best": best.as_json() if best is not None else None,
        "applied": applied,
    }
    folder.mkdir(parents=True, exist_ok=True)
    io.write_json(folder / "trials.json", document)
    if args.json:
        print(json.dumps(document, indent=2))
    elif not args.quiet:
        _print_end(found, best, applied)
    if best is None:
        print(f"mbuild: error: every trial of the search for '{found.name}' failed", file=sys.stderr)
        return 1
    return 0


def _trial_line(found, result) -> str:
    values = ", ".join(f"{name}={value}" for name, value in result.values.items())
    score = f"{found.objective} {result.score:.6g}" if result.score is not None else f"failed: {result.error}"
    return (f"trial {result.number + 1}/{found.trials}: {values} -> {score}  "
            f"({result.tensors_computed} tensor(s) computed, {result.tensors_reused} reused)")


def _print_end(found, best, applied) -> None:
    if best is None:
        return
    values = ", ".join(f"{name}={value}" for name, value in best.values.items())
    print(f"best: trial {best.number + 1}: {values} -> {found.objective} {best.score:.6g} ({found.direction})")
    if applied and applied["in_mergefile"]:
        print(f"mbuild search: wrote target '{applied['target']}' into {applied['file']}")
    elif applied:
        print(f"mbuild search: the Mergefile could not be edited in place; wrote '{applied['target']}' to {applied['file']}")
