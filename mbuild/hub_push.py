"""`mbuild push TARGET --repo ORG/NAME`: a built target's output uploaded to the Hugging Face hub.

Only a target that is up to date is pushed, so what lands on the hub is what the Mergefile
and the lock say: its model card (`plan.cards`) lists the true `base_model`s and the pinned
commits. The output's lock is held from the check to the end of the upload, so a build
cannot replace the folder halfway. The upload is one `HfApi.upload_folder` call (one
commit, resumable where `hf_xet` is installed) of the output's files beside a README.md
that adds the ancestors' recipes to the built card (`cards.pushed_card`); what was pushed
is recorded under the target in Mergefile.lock (repo, revision, commit and the key pushed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mbuild import io, lock, staleness
from mbuild.plan import cards
from mbuild.errors import BuildError, MbuildError
from mbuild.mergefile.references import HUB_REPO

REPO_ID = re.compile(rf"^{HUB_REPO}$")
# A branch name git and the hub accept: no '..', no empty part, no leading or trailing '/'.
BRANCH = re.compile(r"^[\w.\-]+(/[\w.\-]+)*$")
DEFAULT_BRANCH = "main"


@dataclass(frozen=True)
class Pushed:
    """What one push uploaded, and where."""

    target: str
    repo: str
    revision: str
    commit: str
    key: str
    url: str
    files: tuple[str, ...]
    unrecorded: str = ""  # why Mergefile.lock does not record the push (it was made all the same)


def check_destination(repo: str, revision: str) -> None:
    """Refuse a repo ID or branch name the hub would refuse, before anything is read or sent."""
    if not REPO_ID.match(repo) or ".." in repo:
        raise MbuildError(f"--repo {repo!r}: a hub repository is ORG/NAME (letters, digits, '-', '_', '.')")
    if not BRANCH.match(revision) or ".." in revision.split("/") or "." in revision.split("/"):
        raise MbuildError(f"--revision {revision!r}: not a branch name")


def push(session, name: str, repo: str, private: bool = False, revision: str = DEFAULT_BRANCH) -> Pushed:
    """Upload target ``name`` (which must be up to date) to ``repo`` on branch ``revision``; record it in the lock.

    ``session``: an `mbuild.session.Session` asking for this target alone.
    """
    from huggingface_hub import constants

    check_destination(repo, revision)
    if constants.HF_HUB_OFFLINE:
        raise MbuildError("mbuild push uploads to the hub, and HF_HUB_OFFLINE=1 forbids it: unset it to push")
    mergefile = session.mergefile
    if name not in mergefile.targets:
        raise MbuildError(f"no target named '{name}'", mergefile.location(("targets",)))
    target = mergefile.targets[name]
    with io.target_lock(target.output):
        with cache_only():
            the_plan = session.plan(hashing=False)
        decision = staleness.decide_all(the_plan, session.state)[name]
        if decision.stale:
            why = "; ".join(decision.reasons)
            raise BuildError(f"target '{name}' is not up to date ({why}): build it with `mbuild {name}`, then push", target.location())
        files = sorted(path.name for path in target.output.iterdir() if path.name != io.MANIFEST_NAME)
        key = the_plan.targets[name].key
        with staged(target.output, files, cards.pushed_card(the_plan, name)) as folder:
            info = _upload(folder, repo, private, revision, f"mbuild: {name} ({key[:12]})")
    pushed = Pushed(name, repo, revision, info.oid, key, str(info.commit_url), tuple(files))
    try:
        lock.record_push(mergefile.path, session.state, name, {"repo": repo, "revision": revision, "commit": pushed.commit, "key": key})
    except (MbuildError, OSError) as error:
        return dataclasses.replace(pushed, unrecorded=str(error))
    return pushed


@contextlib.contextmanager
def staged(output: Path, files: list[str], card: str):
    """A folder of links to the output's files, with the card a push uploads as its README.md.

    The output itself is never written: its README.md is the built card, part of its key.
    """
    folder = Path(tempfile.mkdtemp(prefix="mbuild-push-"))
    try:
        for name in files:
            if name != "README.md":
                (folder / name).symlink_to(output / name)
        (folder / "README.md").write_text(card)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _upload(folder, repo: str, private: bool, revision: str, message: str):
    """Create the repo (and branch) if missing, then upload the folder as one commit; returns its CommitInfo."""
    from huggingface_hub import HfApi

    api = HfApi()
    step = f"creating {repo}"
    try:
        api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        if revision != DEFAULT_BRANCH:
            step = f"creating branch {revision} of {repo}"
            api.create_branch(repo, branch=revision, exist_ok=True, repo_type="model")
        step = f"uploading to {repo}@{revision}"
        return api.upload_folder(
            repo_id=repo, folder_path=folder, revision=revision, commit_message=message, repo_type="model",
        )
    except Exception as error:  # huggingface_hub raises many kinds (HTTP, auth, value); each stops the push
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise BuildError(f"push failed while {step}: {type(error).__name__}: {first_line}") from None


@contextlib.contextmanager
def cache_only():
    """While a push checks its target, huggingface_hub answers from the local cache alone.

    A target that is up to date was built from sources in that cache, so checking it needs
    no download; and a push must never fetch weights only to find out.
    """
    from huggingface_hub import constants

    saved_constant, saved_environment = constants.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE")
    constants.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved_constant
        if saved_environment is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_environment
