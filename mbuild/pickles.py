"""Pickled checkpoints (``--allow-pickle``), converted once to safetensors inside the cache.

A conversion is a folder under ``<cache>/converted/`` named by the sha256 of the pickles it
came from: a replaced ``pytorch_model.bin`` has another digest, so it is converted again
and every key below it changes; nothing is ever written into the user's model folder.
A pickle's digest is remembered by its file identity (size, mtime, inode), as source
digests are, so an unchanged pickle is not read again to find its conversion.

Unpickling runs with ``weights_only=True``: torch's restricted unpickler, which refuses
any object but tensors and plain containers. A dry run converts nothing and writes nothing:
it reads the tensor table through a memory map (no tensor data) and leaves keys unknown.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Mapping

from mbuild import io, keys
from mbuild.errors import ModelError

class Conversions:
    """Where pickled models become safetensors: ``folder`` (the cache's ``converted/``).

    ``write``: whether this command may convert (a build) or only look (a dry run, status).
    """

    def __init__(self, folder: Path, state, write: bool):
        self.folder = Path(folder)
        self.state = state
        self.write = write

    def model(self, folder: Path, config: Mapping[str, Any], pickles: list[Path]) -> io.ModelInfo:
        """The model a folder of pickles holds, read from its conversion (made now if allowed)."""
        digest = self._digest(pickles, compute=self.write)
        converted = self.folder / digest if digest else None
        if converted is None or not converted.is_dir():
            if not self.write:
                return _unconverted(folder, config, pickles, self.folder / "not-converted-yet")
            _convert(pickles, converted)
        files = [converted / (pickle.name + ".safetensors") for pickle in pickles]
        return io.model_from_files(folder, config, files)

    def _digest(self, pickles: list[Path], compute: bool) -> str | None:
        """One digest for a model's pickles; None when one is not known and ``compute`` is false."""
        parts = []
        for pickle in pickles:
            found = self.state.lookup(str(pickle)) if self.state is not None else None
            if found is None or "sha256" not in found:
                if not compute:
                    return None
                identity = io.file_identity(pickle)
                found = {"sha256": io.hash_file(pickle)}
                if self.state is not None and io.file_identity(pickle) == identity:
                    self.state.remember(str(pickle), identity, found)
            parts.append(f"{pickle.name}:{found['sha256']}")
        return keys.text_name("\n".join(parts))


def _load(pickle: Path, mmap: bool) -> dict[str, Any]:
    """A pickled state dict, unpickled with weights_only=True; one ModelError for anything refused."""
    import torch

    os.close(io.open_regular(pickle)[0])  # a FIFO or device named *.bin is refused, not waited on
    try:
        state = torch.load(pickle, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # the unpickler raises many kinds; each means "not loadable safely"
        if mmap and "mmap" in str(error):
            return _load(pickle, mmap=False)  # a pre-zip checkpoint cannot be mapped
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ModelError(f"{pickle}: torch.load(weights_only=True) refused it: {first_line}") from None
    if not isinstance(state, dict) or not all(
        isinstance(name, str) and isinstance(tensor, torch.Tensor) for name, tensor in state.items()
    ):
        raise ModelError(f"{pickle} is not a state dict of named tensors (a training checkpoint?)")
    return state


def _unconverted(folder: Path, config, pickles: list[Path], placeholder: Path) -> io.ModelInfo:
    """A model's tensor table read from its pickles' metadata (mapped, no tensor data read).

    Its files are where no file is, so its digests are unknown and its keys stay unknown.
    """
    tensors = {}
    for pickle in pickles:
        for name, tensor in _load(pickle, mmap=True).items():
            dtype = str(tensor.dtype).removeprefix("torch.")
            if dtype not in io.DTYPE_SIZES:
                raise ModelError(f"{pickle}: tensor {name} has unsupported dtype {dtype}")
            size = tensor.numel() * io.DTYPE_SIZES[dtype]
            tensors[name] = io.TensorInfo(name, dtype, tuple(tensor.shape), str(placeholder / pickle.name), 0, size)
    files = tuple(str(placeholder / pickle.name) for pickle in pickles)
    return io.ModelInfo(folder=folder, config=config, tensors=tensors, weight_files=files)


def _convert(pickles: list[Path], converted: Path) -> None:
    """Convert pickles into a new folder, whole or not at all (a failure leaves nothing behind)."""
    from safetensors.torch import save_file

    converted.parent.mkdir(parents=True, exist_ok=True)
    temporary = converted.with_name(f".{converted.name}.tmp-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    try:
        for pickle in pickles:
            state = _load(pickle, mmap=True)
            save_file(_unshared(state), str(temporary / (pickle.name + ".safetensors")), metadata={"format": "pt"})
            del state
        io.fsync_folder(temporary)
        try:
            os.rename(temporary, converted)
        except OSError:
            if not converted.is_dir():  # not another process's identical conversion
                raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _unshared(state: dict[str, Any]) -> dict[str, Any]:
    """Tensors safetensors can save: contiguous, and each with storage of its own (tied weights share one)."""
    seen: set[int] = set()
    result = {}
    for name, tensor in state.items():
        tensor = tensor.contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        result[name] = tensor.clone() if pointer in seen and tensor.numel() else tensor
        seen.add(pointer)
    return result


def remove_unused(folder: Path, models: list[io.ModelInfo]) -> int:
    """Remove the conversions under ``folder`` that none of ``models`` reads (`mbuild gc`); returns how many."""
    in_use = {Path(file).parent for model in models for file in model.weight_files}
    removed = 0
    for conversion in sorted(Path(folder).glob("*")) if Path(folder).is_dir() else []:
        pid = conversion.name.rsplit("-", 1)[-1]
        if conversion in in_use or (".tmp-" in conversion.name and pid.isdigit() and io.process_alive(int(pid))):
            continue
        shutil.rmtree(conversion, ignore_errors=True)
        removed += 1
    return removed
