"""The subcommands: status, explain, gc, clean, import, graph and methods."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from mbuild import mergefile as mergefile_module
from mbuild.cli import arguments, shared
from mbuild.errors import MbuildError
from mbuild.nodes import Node


def subcommand(argv: list[str]) -> int:
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
    if name in ("lock", "push"):  # the hub's: `mbuild.cli.hub`
        from mbuild.cli import hub

        return hub.run(name, parser, rest)
    if name == "report":  # eval targets' scores: `mbuild.cli.report`
        from mbuild.cli import report

        return report.run(parser, rest)
    if name == "search":  # trials of a recipe's parameters: `mbuild.cli.search`
        from mbuild.cli import search

        return search.run(parser, rest)
    arguments.common(parser)
    if name == "graph":
        parser.add_argument("--format", choices=("text", "dot"), default="text")
    if name == "gc":
        parser.add_argument("--older-than", type=float, metavar="DAYS", help="also drop entries unused for DAYS days")
    parser.add_argument("targets", nargs="*")
    args = parser.parse_args(rest)
    return {"graph": _graph, "explain": _explain, "gc": _gc, "clean": _clean, "status": _status, "check": _check}[name](args)


def _check(args) -> int:
    """Problems and downloads found from headers alone (`mbuild.cli.check`)."""
    from mbuild.cli import check

    return check.check(args)


def _status(args) -> int:
    from mbuild import io, staleness

    mergefile, state = shared.load(args)
    the_plan = shared.read_only_plan(args, mergefile, state)
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

    mergefile, state = shared.load(args)
    if not args.targets:
        raise MbuildError("mbuild explain needs a target name")
    the_plan = shared.read_only_plan(args, mergefile, state)
    decisions = staleness.decide_all(the_plan, state)
    report = {}
    for name in mergefile.expand_names(args.targets):  # a sweep's name: each of its points
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
                Node(node).label: ("stale" if decisions.get(Node(node).label, staleness.Decision(False, ())).stale else "fresh")
                if Node(node).is_target
                else "source"
                for node in target_plan.input_nodes
            },
            "tensors_changed": sum(1 for t in target_plan.tasks if not manifest or (manifest.get("tensors", {}).get(t.name) or {}).get("key") != t.key),
            "tensors": len(target_plan.tasks),
            "changes": groups,
            # Every input tensor is taken by a task, or left out by the target's own leave.
            "dropped_inputs": list(target_plan.dropped),
        }
    if args.json:
        print(json.dumps({"targets": report}, indent=2))
        return 0
    for name, row in report.items():
        print(f"{name}: {row['action']}" + (f" ({'; '.join(row['reasons'])})" if row["reasons"] else ""))
        print(f"  key   {(row['key'] or 'unknown (sources not hashed yet)')[:16]}   built {str(row['built_key'])[:16]}")
        for input_name, input_state in row["inputs"].items():
            print(f"  input {input_name}: {input_state}")
        for dropped in row["dropped_inputs"]:
            print(f"  left out (allow_mixed_architectures): {dropped}")
        if row["stale"]:
            print(f"  {row['tensors_changed']} of {row['tensors']} tensors change:")
            for reason, names in sorted(row["changes"].items(), key=lambda item: -len(item[1])):
                shown = ", ".join(names[:3]) + (f", ... (+{len(names) - 3})" if len(names) > 3 else "")
                print(f"    {reason}: {len(names)} tensor(s): {shown}")
    return 0


def _gc(args) -> int:
    """Drop cached tensors no target of the Mergefile needs (or unused for --older-than days)."""
    import time

    from mbuild import io, lora, pickles, ray_executor

    mergefile, state = shared.load(args)
    the_plan = shared.read_only_plan(args, mergefile, state)
    keep = {task.key for target_plan in the_plan.targets.values() for task in target_plan.tasks if task.key}
    older_than = time.time() - args.older_than * 86400 if args.older_than is not None else None
    cache = shared.tensor_cache(state, args, create=False)
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
    # Tensors LoRA adapters were applied to (`lora`) that no source of the Mergefile reads now.
    conversions += lora.remove_unused(state.folder / "lora", [s.info for s in the_plan.sources.values()])
    # Results a cluster's jobs left that no target needs (a killed driver's, a changed recipe's),
    # and writes killed midway; results the Mergefile still needs stay for the next build.
    storage = ray_executor.storage_in(state.folder)
    results = [key for key in storage.keys() if key not in keep]
    for key in results:
        storage.delete(key)
    partials = storage.remove_partials(older_than=3600)
    if args.json:
        print(json.dumps({"dropped": dropped, "forgotten_digests": forgotten, "removed_temporaries": removed,
                          "removed_conversions": conversions, "removed_results": len(results) + partials}))
    else:
        print(
            f"mbuild gc: dropped {dropped} cached tensor(s), forgot {forgotten} digest(s), "
            f"removed {len(removed)} temporary folder(s) of crashed builds, {conversions} unused pickle "
            f"conversion(s) and {len(results) + partials} cluster result(s) no target needs"
        )
    return 0


def _clean(args) -> int:
    """Remove the outputs of the named targets (all by default); never a folder mbuild did not make."""
    import shutil

    from mbuild import staleness

    mergefile, _ = shared.load(args)
    names = mergefile.expand_names(args.targets) or list(mergefile.targets)
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
    from mbuild import io
    from mbuild.mergefile import importer

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
    for warning in imported.warnings:
        shared.warn(str(warning))
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
