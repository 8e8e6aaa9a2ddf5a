"""What the build and the subcommands share: the Mergefile and cache they open, the
session request their arguments make, and the one-line warning."""

from __future__ import annotations

import sys
from pathlib import Path

from mbuild import mergefile as mergefile_module
from mbuild.errors import MbuildError


def load(args):
    from mbuild import lock
    from mbuild.cache import State, default_cache_dir

    mergefile = mergefile_module.load(args.file)
    for warning in mergefile.warnings:
        warn(str(warning))
    damage = lock.damage(lock.lock_path(mergefile.path))
    if damage:
        warn(f"{damage}: ignored, and rewritten by the next build")
    cache_dir = Path(args.cache_dir).absolute() if args.cache_dir else default_cache_dir(mergefile.folder)
    return mergefile, State(cache_dir, warn=warn)


def warn(text: str) -> None:
    """One line on stderr, even with --quiet: a fault in mbuild's own state that it works around, or
    what a Mergefile says that mbuild ignores (as mergekit does)."""
    print(f"mbuild: warning: {text}", file=sys.stderr, flush=True)


def tensor_cache(state, args, create: bool):
    """The tensor cache under the cache folder; None in read-only uses when it does not exist yet,
    and (with a warning) where the cache folder cannot hold one."""
    from mbuild.cache import open_tensor_cache

    folder = state.folder / "tensors"
    if not create and not folder.exists():
        return None
    return open_tensor_cache(folder, getattr(args, "cache_size", None), read_only=not create, warn=warn)


def request(args):
    """The session request an argument list makes."""
    from mbuild import plan, session

    return session.Request(
        targets=tuple(args.targets),
        force=getattr(args, "force", False),
        jobs=getattr(args, "jobs", 2),
        device=getattr(args, "device", "cpu"),
        keep_going=getattr(args, "keep_going", False),
        shard_bytes=getattr(args, "shard_size", plan.DEFAULT_SHARD_BYTES),
        platform=platform(args),
        allow_pickle=args.allow_pickle,
        executor=getattr(args, "executor", "local"),
        ray_address=getattr(args, "ray_address", None),
    )


def read_only_plan(args, mergefile, state):
    """A plan that reads no tensor and writes nothing: unhashed sources leave their keys unknown."""
    from mbuild import session

    return session.Session(mergefile, state, request(args)).plan(hashing=False)


def platform(args) -> str:
    """Where this command's tasks compute: the key of every computed tensor names it."""
    from mbuild import compute_platform

    device = getattr(args, "device", "cpu")
    if device.startswith("cuda"):
        require_cuda()
    return compute_platform.identify(device)


def require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise MbuildError("--device cuda asked, but torch sees no CUDA device")
