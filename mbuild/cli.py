"""The command line: the only module that prints."""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import threading
from pathlib import Path
from typing import Sequence

from mbuild import mergefile as mergefile_module
from mbuild.engine import Reporter
from mbuild.errors import MbuildError

SUBCOMMANDS = ("status", "graph", "methods", "explain", "gc", "clean", "import")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mbuild`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in SUBCOMMANDS:
            return _subcommand(argv)
        return _build(build_parser().parse_args(argv))
    except MbuildError as error:
        print(f"mbuild: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mbuild: interrupted; earlier outputs are intact", file=sys.stderr)
        return 130
    finally:
        # After any error message: no import may still be running at exit.
        _SideImport.join_all()


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", "--file", default="Mergefile", help="the Mergefile (default: ./Mergefile)")
    parser.add_argument("--cache-dir", help="cache folder (default: cache/ beside the Mergefile, or $MBUILD_CACHE)")
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    parser.add_argument("--allow-pickle", action="store_true", help="load pickled .bin checkpoints (weights_only=True)")


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``mbuild [TARGETS|all] ...``."""
    parser = argparse.ArgumentParser(
        prog="mbuild",
        description="Make for model merging. Subcommands: " + ", ".join(SUBCOMMANDS) + ".",
    )
    parser.add_argument("targets", nargs="*", help="targets to bring up to date (default: all)")
    _common(parser)
    parser.add_argument("-n", "--dry-run", action="store_true", help="show the plan and why; read no tensor")
    parser.add_argument("--force", action="store_true", help="rebuild the selected targets even if fresh")
    parser.add_argument("-j", "--jobs", type=_job_count, default=2, help="tensor tasks run at once (default 2)")
    parser.add_argument("--device", default="cpu", help="where the math runs: cpu (default) or cuda")
    parser.add_argument("-k", "--keep-going", action="store_true", help="build what does not depend on a failed target")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only errors (and --json output)")
    parser.add_argument("--shard-size", default="5G", type=_byte_count, help="largest output shard (default 5G)")
    parser.add_argument(
        "--cache-size", type=_byte_count, help="bound of the tensor cache (default: half the free disk where it lives)"
    )
    return parser


def _job_count(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of jobs: {text!r}") from None
    if count < 1:
        raise argparse.ArgumentTypeError("-j must be at least 1")
    return count


def _byte_count(text: str) -> int:
    units = {"": 1, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4}
    value = text.strip().upper().removesuffix("B")
    unit = value[-1] if value and value[-1] in units else ""
    try:
        count = float(value[: len(value) - len(unit)]) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 500M or 5G)") from None
    if count <= 0:
        raise argparse.ArgumentTypeError("a size must be positive")
    return int(count)


def _load(args):
    from mbuild import lock
    from mbuild.cache import State, default_cache_dir

    mergefile = mergefile_module.load(args.file)
    damage = lock.damage(lock.lock_path(mergefile.path))
    if damage:
        _warn(f"{damage}: ignored, and rewritten by the next build")
    cache_dir = Path(args.cache_dir).absolute() if args.cache_dir else default_cache_dir(mergefile.folder)
    return mergefile, State(cache_dir, warn=_warn)


def _warn(text: str) -> None:
    """One line on stderr, even with --quiet, for a fault in mbuild's own state that it works around."""
    print(f"mbuild: warning: {text}", file=sys.stderr, flush=True)


def _tensor_cache(state, args, create: bool):
    """The tensor cache under the cache folder; None in read-only uses when it does not exist yet,
    and (with a warning) where the cache folder cannot hold one."""
    from mbuild.cache import open_tensor_cache

    folder = state.folder / "tensors"
    if not create and not folder.exists():
        return None
    return open_tensor_cache(folder, getattr(args, "cache_size", None), read_only=not create, warn=_warn)


def _read_only_plan(args, mergefile, state):
    """A plan that reads no tensor: unhashed sources leave their keys unknown."""
    from mbuild import engine, lock, plan

    return plan.make_plan(
        mergefile,
        args.targets,
        lambda source: state.digests(source.info, compute=False),
        _conversions(args, state, write=False),
        getattr(args, "shard_size", plan.DEFAULT_SHARD_BYTES),
        engine.output_digests(state, mergefile),
        state.folder,
        platform=_platform(args),
        pinned=lock.pinned_revisions(mergefile.path),
    )


def _conversions(args, state, write: bool):
    """Where pickled sources are read from (with --allow-pickle): their conversions in the cache."""
    from mbuild.pickles import Conversions

    return Conversions(state.folder / "converted", state, write) if args.allow_pickle else None


def _platform(args) -> str:
    """Where this command's tasks compute: the key of every computed tensor names it."""
    from mbuild import compute_platform

    device = getattr(args, "device", "cpu")
    if device.startswith("cuda"):
        _require_cuda()
    return compute_platform.identify(device)


def _build(args) -> int:
    from mbuild import staleness

    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        raise MbuildError(f"unknown --device '{args.device}': use cpu or cuda")
    mergefile, state = _load(args)
    if args.dry_run:
        the_plan = _read_only_plan(args, mergefile, state)
        cache = _tensor_cache(state, args, create=False)
        has_tensor = (lambda key: cache.contains(key)) if cache is not None and not args.force else (lambda key: False)
        decisions = staleness.decide_all(the_plan, state, args.force, has_tensor)
        _print_dry_run(the_plan, decisions, args, has_tensor)
        return 0
    if args.device.startswith("cuda"):
        _require_cuda()
    printer = _Printer(quiet=args.quiet or args.json, targets=0)
    torch_import = _SideImport("torch")
    try:
        return _run_build(args, mergefile, state, printer, torch_import)
    finally:
        state.close()


def _run_build(args, mergefile, state, printer, torch_import) -> int:
    from mbuild import engine, lock, plan, staleness

    current: dict = {}
    platform = _platform(args)

    def replan(changed=None, hashing=True):
        remembered = lambda source: state.digests(source.info, compute=False)  # noqa: E731
        hashed = lambda source: _hash_source(state, source, printer, torch_import.start)  # noqa: E731
        current["plan"] = plan.make_plan(
            mergefile,
            args.targets,
            hashed if hashing else remembered,
            _conversions(args, state, write=hashing),
            args.shard_size,
            engine.output_digests(state, mergefile),
            state.folder,
            previous=current.get("plan") if changed is not None else None,
            changed=changed,
            platform=platform,
            pinned=lock.pinned_revisions(mergefile.path),
        )
        return current["plan"]

    # Every mistake headers can show (ranges, shapes, parameters, outputs that are not
    # mbuild's) is found by a plan over remembered digests, before any source is hashed.
    first_plan = replan(hashing=False)
    decisions = staleness.decide_all(first_plan, state)
    if not args.keep_going:
        staleness.refuse_foreign_outputs(first_plan, decisions)
    if first_plan.unhashed:
        first_plan = replan()
        decisions = staleness.decide_all(first_plan, state)
    for name in first_plan.order:
        _warn_dropped(first_plan.targets[name], _warn)
    # Decide everything before the first tensor: a no-op never opens the tensor cache.
    options = engine.BuildOptions(force=args.force, jobs=args.jobs, device=args.device, keep_going=args.keep_going)
    if not args.force and not any(d.stale for d in decisions.values()):
        # Nothing to do: answer like make, without locks or the tensor cache.
        reports = {
            name: engine.TargetReport(name, "fresh", (), 0, len(p.tasks), 0.0, str(p.target.output))
            for name, p in first_plan.targets.items()
        }
        lock.repair_lock(first_plan, state, list(first_plan.order), printer.note)
    else:
        printer.targets = len(first_plan.order)
        torch_import.start()
        cache = _tensor_cache(state, args, create=True)
        try:
            with printer:
                reports = engine.Builder(first_plan, state, options, printer, cache, replan).run()
        finally:
            if cache is not None:
                cache.close()
    if args.json:
        print(json.dumps({"targets": {name: r.as_json() for name, r in reports.items()}}, indent=2))
    elif not args.quiet:
        _print_summary(reports)
    for report in reports.values():
        # Failures are reported even with --quiet or --json (on stderr): a quiet failure is a lie.
        if report.status == "failed":
            print(f"mbuild: error: {report.error}", file=sys.stderr)
        elif report.status == "skipped":
            print(f"mbuild: skipped {report.name}: {'; '.join(report.reasons)}", file=sys.stderr)
    return 1 if any(r.status in ("failed", "skipped") for r in reports.values()) else 0


def _warn_dropped(target_plan, note) -> None:
    """Name the input tensors a target with 'allow_mixed_architectures' leaves out of its output."""
    dropped = target_plan.dropped
    if dropped:
        shown = ", ".join(dropped[:3]) + (f" and {len(dropped) - 3} more" if len(dropped) > 3 else "")
        note(f"target '{target_plan.name}' takes no output tensor from {len(dropped)} input tensor(s): {shown}")


def _require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise MbuildError("--device cuda asked, but torch sees no CUDA device")


class _SideImport:
    """A module imported on a side thread, started on demand.

    A cold build hashes its sources before it computes anything. Hashing mostly waits on
    hashlib and reads, which release the GIL, so torch (about a second to import) is
    imported meanwhile: a cold linear build of two 379 MB models then starts computing
    about 0.1 s later than one whose hashes are remembered, instead of the 0.4 s the
    hashing takes. It starts once some source needs hashing, or once planning finds a stale
    target, so a no-op build never pays for it. (Starting it before planning was tried: the
    import and planning then share the GIL, so hashing starts later; a cold linear build of
    two 0.76 GB models took 0.1 s longer, a warm --force one 0.1 s less.) `main` joins it
    before returning, after any error message, so no import is still running at exit.

    The cyclic garbage collector is off during the import and the objects it made are then
    frozen (`gc.freeze`): importing torch leaves about 160,000 objects that live until exit,
    and collecting while they pile up took 10-20% of its import time here.
    """

    started: list[_SideImport] = []

    def __init__(self, name: str):
        self.name = name
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None and self.name not in sys.modules:
            import importlib

            # An import that fails here fails again, with its message, where it is needed.
            def load() -> None:
                was_enabled = gc.isenabled()
                gc.disable()
                try:
                    with contextlib.suppress(Exception):
                        importlib.import_module(self.name)
                finally:
                    if was_enabled:
                        gc.enable()
                    gc.freeze()

            self._thread = threading.Thread(target=load, name=f"import {self.name}", daemon=True)
            self._thread.start()
            _SideImport.started.append(self)

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()

    @classmethod
    def join_all(cls) -> None:
        """Wait for every import started so far (`main` does, before it returns)."""
        while cls.started:
            cls.started.pop().join()


def _hash_source(state, source, printer, before_hashing=lambda: None):
    found = state.digests(source.info, compute=False)
    if found is None:
        before_hashing()
        with printer.step(f"hashing {source.ref}", source.info.nbytes) as advance:
            found = state.digests(source.info, compute=True, progress=advance)
    return found


def _size(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count} B"


def _dry_run_data(the_plan, decisions, args, has_tensor) -> dict:
    from mbuild import staleness

    data = {}
    for name in the_plan.order:
        target_plan = the_plan.targets[name]
        decision = decisions[name]
        parameters = 0
        for task in target_plan.tasks:
            count = 1
            for size in task.shape:
                count *= size
            parameters += count
        reusable = staleness.reusable_in(staleness.inspect_output(target_plan.target.output), has_tensor)
        estimates = staleness.estimate_work(target_plan, reusable, args.jobs)
        data[name] = {
            "stale": decision.stale,
            "action": decision.action,
            "reasons": list(decision.reasons),
            "method": target_plan.target.method,
            "output": str(target_plan.target.output),
            "layers": target_plan.num_layers,
            "tensors": len(target_plan.tasks),
            "parameters": parameters,
            "bytes": target_plan.nbytes,
            "tensors_to_compute": estimates["tensors_to_compute"] if decision.stale else 0,
            "bytes_to_read": estimates["bytes_to_read"] if decision.stale else 0,
            "peak_memory": estimates["peak_memory"] if decision.stale else 0,
            "key": target_plan.key,
            "dropped_inputs": list(target_plan.dropped),
        }
    return data


def _print_dry_run(the_plan, decisions, args, has_tensor) -> None:
    data = _dry_run_data(the_plan, decisions, args, has_tensor)
    if args.json:
        print(json.dumps({"targets": data}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"mbuild plan for {the_plan.mergefile.path.name}", show_lines=True)
    for column in ("target", "state", "why", "method", "layers", "params", "output size", "to read", "peak mem"):
        table.add_column(column, overflow="fold")
    for name, row in data.items():
        state = f"[red]{row['action']}[/red]" if row["stale"] else "[green]fresh[/green]"
        table.add_row(
            name,
            state,
            "\n".join(row["reasons"]) or "up to date",
            row["method"],
            str(row["layers"]),
            f"{row['parameters'] / 1e6:.1f}M",
            _size(row["bytes"]),
            _size(row["bytes_to_read"]),
            _size(row["peak_memory"]),
        )
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(table)
    for name in the_plan.order:
        _warn_dropped(the_plan.targets[name], lambda text: console.print(f"warning: {text}"))
    stale = [n for n, r in data.items() if r["stale"]]
    console.print(f"{len(stale)} of {len(data)} target(s) would be built" + (f": {', '.join(stale)}" if stale else ""))


def _print_summary(reports) -> None:
    built = [r for r in reports.values() if r.status == "built"]
    if not built and all(r.status == "fresh" for r in reports.values()):
        print(f"mbuild: nothing to do, {len(reports)} target(s) up to date")
        return
    for report in reports.values():
        if report.status == "built":
            print(
                f"built {report.name}: {report.tensors_computed} tensors computed, "
                f"{report.tensors_reused} reused ({report.seconds:.1f} s) -> {report.output}"
            )
        elif report.status == "fresh":
            print(f"{report.name} is up to date")
        else:
            print(f"{report.name}: {report.status}: {report.error or ', '.join(report.reasons)}")


class _Printer(Reporter):
    """Progress on the terminal: rich bars on a TTY, plain lines otherwise."""

    def __init__(self, quiet: bool, targets: int = 0):
        self.quiet = quiet
        self.tty = sys.stderr.isatty() and not quiet
        self.progress = None
        self.tasks = {}
        self.targets = targets
        self.overall = None

    def __enter__(self):
        if self.tty:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                transient=False,
            )
            self.progress.start()
            if self.targets:
                self.overall = self.progress.add_task("targets", total=self.targets)
        return self

    def __exit__(self, *exc):
        if self.progress:
            self.progress.stop()

    @contextlib.contextmanager
    def step(self, description: str, total: int):
        """A long step measured in bytes: a bar on a terminal, one line otherwise."""
        if self.quiet:
            yield lambda count: None
            return
        if not self.tty:
            print(f"mbuild: {description} ({_size(total)}), once per version of its files", file=sys.stderr, flush=True)
            yield lambda count: None
            return
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                      transient=True) as bar:
            task = bar.add_task(description, total=total)
            lock = threading.Lock()

            def advance(count: int) -> None:
                with lock:
                    bar.advance(task, count)

            yield advance

    def note(self, text: str) -> None:
        if self.quiet:
            return
        if self.progress:
            self.progress.console.print(text)
        else:
            print(f"mbuild: {text}", file=sys.stderr, flush=True)

    def target_started(self, name, total, reasons) -> None:
        if self.progress:
            self.tasks[name] = self.progress.add_task(f"building {name}", total=total)
        elif not self.quiet:
            why = f" ({'; '.join(reasons)})" if reasons else ""
            print(f"mbuild: building {name}: {total} tensors{why}", file=sys.stderr, flush=True)

    def tensor_done(self, name) -> None:
        if self.progress and name in self.tasks:
            self.progress.advance(self.tasks[name])

    def target_finished(self, report) -> None:
        if self.overall is not None:
            self.progress.advance(self.overall)
        if self.progress is None and not self.quiet and report.status == "built":
            print(f"mbuild: {report.name} done in {report.seconds:.1f} s", file=sys.stderr, flush=True)

    def waiting(self, message: str) -> None:
        self.note(message)


def _subcommand(argv: list[str]) -> int:
    name, rest = argv[0], argv[1:]
    parser = argparse.ArgumentParser(prog=f"mbuild {name}")
    if name == "methods":
        parser.add_argument("--json", action="store_true")
        args = parser.parse_args(rest)
        return _methods(args)
    if name == "import":
        parser.add_argument("config", help="a mergekit-yaml, mergekit-moe or mergekit-multi config")
        parser.add_argument("-o", "--output", default="Mergefile", help="the Mergefile to write (default: ./Mergefile)")
        parser.add_argument("--name", help="target name of the document without 'name:' (default: the file's stem)")
        parser.add_argument("--force", action="store_true", help="overwrite an existing output file")
        parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")
        return _import(parser.parse_args(rest))
    _common(parser)
    if name == "graph":
        parser.add_argument("--format", choices=("text", "dot"), default="text")
    if name == "gc":
        parser.add_argument("--older-than", type=float, metavar="DAYS", help="also drop entries unused for DAYS days")
    parser.add_argument("targets", nargs="*")
    args = parser.parse_args(rest)
    return {"graph": _graph, "explain": _explain, "gc": _gc, "clean": _clean, "status": _status}[name](args)


def _status(args) -> int:
    from mbuild import io, staleness

    mergefile, state = _load(args)
    the_plan = _read_only_plan(args, mergefile, state)
    decisions = staleness.decide_all(the_plan, state)
    leftovers = {n: [str(p) for p in io.leftovers(mergefile.targets[n].output)] for n in decisions}
    if args.json:
        report = {
            n: {"stale": d.stale, "reasons": list(d.reasons), "crashed_temporaries": leftovers[n]}
            for n, d in decisions.items()
        }
        print(json.dumps({"targets": report}, indent=2))
        return 0
    for name, decision in decisions.items():
        state_word = "stale" if decision.stale else "fresh"
        why = f"  ({'; '.join(decision.reasons)})" if decision.reasons else ""
        print(f"{name:24} {state_word}{why}")
        for path in leftovers[name]:
            print(f"{'':24} left by a crashed build: {path} (mbuild gc removes it)")
    return 0


def _explain(args) -> int:
    """The key tree of targets: why each is stale, down to the parameter or input."""
    from mbuild import io, staleness

    mergefile, state = _load(args)
    if not args.targets:
        raise MbuildError("mbuild explain needs a target name")
    the_plan = _read_only_plan(args, mergefile, state)
    decisions = staleness.decide_all(the_plan, state)
    report = {}
    for name in args.targets:
        target_plan = the_plan.targets[name]
        manifest = io.read_manifest(target_plan.target.output)
        groups = staleness.explain_tensors(target_plan, manifest) if decisions[name].stale else {}
        report[name] = {
            "stale": decisions[name].stale,
            "action": decisions[name].action,
            "reasons": list(decisions[name].reasons),
            "key": target_plan.key,
            "built_key": (manifest or {}).get("key"),
            "inputs": {
                node.split(":", 1)[1]: ("stale" if decisions.get(node.split(":", 1)[1], staleness.Decision(False, ())).stale else "fresh")
                if node.startswith("target:")
                else "source"
                for node in target_plan.input_nodes
            },
            "tensors_changed": sum(1 for t in target_plan.tasks if not manifest or (manifest.get("tensors", {}).get(t.name) or {}).get("key") != t.key),
            "tensors": len(target_plan.tasks),
            "changes": groups,
        }
    if args.json:
        print(json.dumps({"targets": report}, indent=2))
        return 0
    for name, row in report.items():
        print(f"{name}: {row['action']}" + (f" ({'; '.join(row['reasons'])})" if row["reasons"] else ""))
        print(f"  key   {(row['key'] or 'unknown (sources not hashed yet)')[:16]}   built {str(row['built_key'])[:16]}")
        for input_name, input_state in row["inputs"].items():
            print(f"  input {input_name}: {input_state}")
        if row["stale"]:
            print(f"  {row['tensors_changed']} of {row['tensors']} tensors change:")
            for reason, names in sorted(row["changes"].items(), key=lambda item: -len(item[1])):
                shown = ", ".join(names[:3]) + (f", ... (+{len(names) - 3})" if len(names) > 3 else "")
                print(f"    {reason}: {len(names)} tensor(s): {shown}")
    return 0


def _gc(args) -> int:
    """Drop cached tensors no target of the Mergefile needs (or unused for --older-than days)."""
    import time

    from mbuild import io, pickles

    mergefile, state = _load(args)
    the_plan = _read_only_plan(args, mergefile, state)
    keep = {task.key for target_plan in the_plan.targets.values() for task in target_plan.tasks if task.key}
    older_than = time.time() - args.older_than * 86400 if args.older_than is not None else None
    cache = _tensor_cache(state, args, create=False)
    dropped = 0
    if cache is not None:
        stale_keys = {k for k in cache.keys() if k not in keep}
        if older_than is not None:
            stale_keys |= {k for k in cache.keys() if (state.last_used(k) or 0) < older_than}
        for key in stale_keys:
            cache.delete(key)
        dropped = len(stale_keys)
        cache.prune()  # shards shared with outputs, once no entry points into them
        cache.close()
    forgotten = state.forget_outputs(keep, older_than)
    # What crashed builds left beside the outputs (full-size temporaries): their owner is dead.
    removed = [str(path) for target in mergefile.targets.values() for path in io.recover(target.output)]
    conversions = pickles.remove_unused(state.folder / "converted", [s.info for s in the_plan.sources.values()])
    if args.json:
        print(json.dumps({"dropped": dropped, "forgotten_digests": forgotten, "removed_temporaries": removed,
                          "removed_conversions": conversions}))
    else:
        print(
            f"mbuild gc: dropped {dropped} cached tensor(s), forgot {forgotten} digest(s), "
            f"removed {len(removed)} temporary folder(s) of crashed builds and {conversions} unused pickle conversion(s)"
        )
    return 0


def _clean(args) -> int:
    """Remove the outputs of the named targets (all by default); never a folder mbuild did not make."""
    import shutil

    from mbuild import staleness

    mergefile, _ = _load(args)
    names = args.targets or list(mergefile.targets)
    removed = []
    for name in names:
        if name not in mergefile.targets:
            raise MbuildError(f"no target named '{name}'")
        output = mergefile.targets[name].output
        if not output.exists():
            continue
        if output.is_symlink() or not output.is_dir():
            raise MbuildError(f"{output} is not a folder mbuild made; not removing it")
        existing = staleness.inspect_output(output)
        if existing.manifest is None or existing.foreign:
            raise MbuildError(f"{existing.refusal(output)}; not removing it")
        shutil.rmtree(output)
        removed.append(name)
    if args.json:
        print(json.dumps({"removed": removed}))
    else:
        print(f"mbuild clean: removed {len(removed)} output(s)" + (f": {', '.join(removed)}" if removed else ""))
    return 0


def _import(args) -> int:
    """Write a Mergefile made from a mergekit config; never over an existing file unless --force."""
    from mbuild import importer, io

    output = Path(os.path.normpath(Path(args.output).absolute()))
    if output.exists() and not args.force:
        raise MbuildError(f"{output} exists; use --force to overwrite it")
    # The folder must exist while the text is validated: relative model paths start there.
    created = [folder for folder in reversed(output.parents) if not folder.exists()]
    for folder in created:
        folder.mkdir()
    try:
        imported = importer.import_config(args.config, output, args.name)
    except BaseException:
        for folder in reversed(created):
            folder.rmdir()
        raise
    io.replace_text(output, imported.text)
    if args.json:
        print(json.dumps({"mergefile": str(output), "targets": list(imported.targets)}, indent=2))
    else:
        print(f"mbuild import: wrote {output} with {len(imported.targets)} target(s): {', '.join(imported.targets)}")
    return 0


def _graph(args) -> int:
    from mbuild import plan

    mergefile = mergefile_module.load(args.file)
    graph = plan.build_graph(mergefile)
    order = plan.select(mergefile, graph, args.targets)
    if args.format == "dot":
        print("digraph mbuild {")
        print("  rankdir=LR;")
        for name in order:
            print(f'  "{name}" [shape=box, label="{name}\\n{mergefile.targets[name].method}"];')
            for ref in mergefile.targets[name].references():
                shape = "" if ref.kind == "target" else " [shape=ellipse]"
                if ref.kind != "target":
                    print(f'  "{ref.text}"{shape};')
                print(f'  "{ref.text}" -> "{name}";')
        print("}")
        return 0
    for name in order:
        target = mergefile.targets[name]
        inputs = ", ".join(f"{r.text}{'' if r.kind == 'target' else ' (' + r.kind + ')'}" for r in target.references())
        print(f"{name} [{target.method}] <- {inputs}")
    return 0


def _methods(args) -> int:
    from mbuild import methods

    rows = []
    for method in methods.all_methods():
        params = []
        for p in method.parameters:
            default = "required" if p.default is methods.REQUIRED else repr(p.default)
            params.append({"name": p.name, "per_model": p.per_model, "default": default, "doc": p.doc})
        rows.append(
            {
                "name": method.name,
                "paper": method.paper,
                "summary": method.summary,
                "bytes": METHOD_BYTES_RANDOM if method.random else METHOD_BYTES_DETERMINISTIC,
                "parameters": params,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        print(f"{row['name']}: {row['summary']} ({row['paper']})")
        print(f"    bytes: {row['bytes']}")
        for p in row["parameters"]:
            scope = "per model" if p["per_model"] else "per tensor"
            print(f"    {p['name']} ({scope}, default {p['default']}) {p['doc']}")
    print()
    print(METHOD_BYTES_RULE)
    return 0


METHOD_BYTES_DETERMINISTIC = "mergekit's run single-threaded (OMP_NUM_THREADS=1), to the bit, for the same dtype"
METHOD_BYTES_RANDOM = (
    "reproducible from 'seed' (drawn per tensor on the CPU); not mergekit's, which draws from its global RNG"
)
METHOD_BYTES_RULE = (
    "A tensor's bytes depend only on its key: not on -j, the core count, OMP_NUM_THREADS or task order.\n"
    "mergekit's own bytes change with its thread count; its single-threaded output is the reference.\n"
    "A key names its compute platform (CPU vector class, torch release, or GPU model and CUDA\n"
    "version): bytes computed on one platform are never reused on another."
)


if __name__ == "__main__":  # pragma: no cover
    from mbuild.__main__ import entry

    entry()
