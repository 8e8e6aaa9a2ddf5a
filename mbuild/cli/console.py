"""What the command line draws: progress (rich bars on a terminal, plain lines
otherwise), the dry run's table, the build summary, and torch imported on the side."""

from __future__ import annotations

import contextlib
import gc
import json
import sys
import threading

from mbuild.cli import shared
from mbuild.engine import Reporter


class SideImport:
    """A module imported on a side thread, started on demand.

    A cold build hashes its sources before it computes anything. Hashing mostly waits on
    the hash and on reads, which release the GIL, so torch (slow to import) is imported
    meanwhile, and most of its import time is hidden behind the hashing. It starts once
    some source needs hashing, or once planning finds a stale target, so a no-op build
    never pays for it; not before planning, whose work would share the GIL with the import
    and so start the hashing later. `main` joins it before returning, after any error
    message, so no import is still running at exit.

    The cyclic garbage collector is off during the import and the objects it made are then
    frozen (`gc.freeze`): importing torch leaves a great many objects that live until exit,
    and collecting while they pile up would only slow the import down.
    """

    started: list[SideImport] = []

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
            SideImport.started.append(self)

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()

    @classmethod
    def join_all(cls) -> None:
        """Wait for every import started so far (`main` does, before it returns)."""
        while cls.started:
            cls.started.pop().join()


def byte_text(count: float) -> str:
    """A byte count for people: '512 B', '3.4 MB', '1.2 GB' (powers of 1000)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count} B"


def _dry_run_data(the_plan, decisions, args, has_tensor) -> dict:
    from mbuild import memory, staleness

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
        if target_plan.target.evaluation is not None:  # a model run, not tensor tasks
            from mbuild import evaluation

            estimates = evaluation.estimate_work(the_plan, target_plan)
        else:
            estimates = staleness.estimate_work(target_plan, reusable, args.jobs, memory.task_budget())
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
            "largest_task_memory": estimates["largest_task_memory"] if decision.stale else 0,
            "key": target_plan.key,
            "dropped_inputs": list(target_plan.dropped),
        }
    return data


def node_classes(nodes) -> list[dict]:
    """A cluster's live nodes grouped by what they offer: CPUs, memory for tasks, GPUs."""
    classes: dict[tuple, int] = {}
    for node in nodes:
        resources = node["resources"]
        shape = (int(resources.get("CPU", 0)), int(resources.get("memory", 0)), int(resources.get("GPU", 0)))
        classes[shape] = classes.get(shape, 0) + 1
    return [
        {"nodes": count, "cpus": cpus, "memory": memory, "gpus": gpus}
        for (cpus, memory, gpus), count in sorted(classes.items(), key=lambda item: item[0], reverse=True)
    ]


def _cluster_data(data: dict, classes: list[dict], device: str) -> dict:
    """Per node class: how many nodes, what each offers, and which stale targets' largest task fits there."""
    wants_gpu = device.startswith("cuda")
    for entry in classes:
        entry["fits"] = [
            name
            for name, row in data.items()
            if row["stale"] and row["largest_task_memory"] <= entry["memory"] and (entry["gpus"] or not wants_gpu)
        ]
    return {"node_classes": classes, "cpus": sum(c["cpus"] * c["nodes"] for c in classes)}


def print_dry_run(the_plan, decisions, args, has_tensor, nodes=None, downloads=()) -> None:
    """The plan as a table (or JSON); with ``nodes`` (a Ray cluster's), what each class of node can
    take; ``downloads``: the hub models a build would fetch (`mbuild check`'s rows, for the JSON)."""
    from mbuild import session

    data = _dry_run_data(the_plan, decisions, args, has_tensor)
    cluster = _cluster_data(data, node_classes(nodes), args.device) if nodes is not None else None
    if args.json:
        document = {"targets": data, "downloads": list(downloads)}
        if cluster is not None:
            document["cluster"] = cluster
        print(json.dumps(document, indent=2))
        return
    from rich.console import Console
    from rich.markup import escape  # a sweep's point, `final[t=0.3]`, is not a style tag
    from rich.table import Table

    table = Table(title=f"mbuild plan for {the_plan.mergefile.path.name}", show_lines=True)
    for column in ("target", "state", "why", "method", "layers", "params", "output size", "to read", "peak mem"):
        table.add_column(column, overflow="fold")
    for name, row in data.items():
        state = f"[red]{row['action']}[/red]" if row["stale"] else "[green]fresh[/green]"
        table.add_row(
            escape(name),
            state,
            escape("\n".join(row["reasons"])) or "up to date",
            row["method"],
            str(row["layers"]),
            f"{row['parameters'] / 1e6:.1f}M",
            byte_text(row["bytes"]),
            byte_text(row["bytes_to_read"]),
            byte_text(row["peak_memory"]),
        )
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(table)
    for name in the_plan.order:
        warning = session.dropped_warning(the_plan.targets[name])
        if warning:
            console.print(f"warning: {warning}")
    stale = [n for n, r in data.items() if r["stale"]]
    console.print(f"{len(stale)} of {len(data)} target(s) would be built" + (f": {escape(', '.join(stale))}" if stale else ""))
    if cluster is not None:
        nodes_table = Table(title="Ray cluster: node classes", show_lines=True)
        for column in ("nodes", "CPUs each", "memory each", "GPUs each", "stale targets whose largest task fits"):
            nodes_table.add_column(column, overflow="fold")
        for entry in cluster["node_classes"]:
            nodes_table.add_row(str(entry["nodes"]), str(entry["cpus"]), byte_text(entry["memory"]), str(entry["gpus"]),
                                ", ".join(entry["fits"]) or "none")
        console.print(nodes_table)
        for name in stale:
            row = data[name]
            console.print(f"{name}: {row['tensors_to_compute']} tasks, {byte_text(row['bytes_to_read'])} to read, "
                          f"largest task {byte_text(row['largest_task_memory'])}")


def print_summary(reports) -> None:
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


class Printer(Reporter):
    """Progress on the terminal: rich bars on a TTY, plain lines otherwise."""

    def __init__(self, quiet: bool, targets: int = 0):
        self.quiet = quiet
        self.tty = sys.stderr.isatty() and not quiet
        self.progress = None
        self.tasks = {}
        self.nodes: dict[str, dict[str, int]] = {}  # target -> cluster node -> tensors computed there
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
            print(f"mbuild: {description} ({byte_text(total)}), once per version of its files", file=sys.stderr, flush=True)
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
            self.progress.console.print(text, markup=False)  # names like `final[t=0.3]` as written
        else:
            print(f"mbuild: {text}", file=sys.stderr, flush=True)

    def target_started(self, name, total, reasons) -> None:
        if self.progress:
            from rich.markup import escape

            self.tasks[name] = self.progress.add_task(f"building {escape(name)}", total=total)
        elif not self.quiet:
            why = f" ({'; '.join(reasons)})" if reasons else ""
            print(f"mbuild: building {name}: {total} tensors{why}", file=sys.stderr, flush=True)

    def tensor_done(self, name, node=None) -> None:
        if self.progress and name in self.tasks:
            if node is None:
                self.progress.advance(self.tasks[name])
                return
            counts = self.nodes.setdefault(name, {})
            counts[node] = counts.get(node, 0) + 1
            shown = ", ".join(f"{n[:8]}: {c}" for n, c in sorted(counts.items()))
            from rich.markup import escape

            self.progress.update(self.tasks[name], advance=1, description=escape(f"building {name} [nodes {shown}]"))

    def target_finished(self, report) -> None:
        if self.overall is not None:
            self.progress.advance(self.overall)
        if self.progress is None and not self.quiet and report.status == "built":
            print(f"mbuild: {report.name} done in {report.seconds:.1f} s", file=sys.stderr, flush=True)

    def waiting(self, message: str) -> None:
        self.note(message)

    def warn(self, text: str) -> None:
        shared.warn(text)

    def running(self, targets: int):
        self.targets = targets
        return self
