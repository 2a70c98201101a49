"""Reading a checkpoint's dcp/ without running code from it.

torch.distributed.checkpoint unpickles `dcp/.metadata` with plain `pickle` and the non-tensor values
(optimizer hyper-parameters, steps) with `torch.load(weights_only=False)`: a checkpoint folder from a
stranger could run code on `--resume`. `SafeReader` reads the metadata with an unpickler that builds only
the checkpoint-metadata classes (and the torch sizes, dtypes and layouts they hold); `SafePlanner` reads
every value with `weights_only=True`. Anything else in those files is refused as a damaged checkpoint.
"""

from __future__ import annotations

import io
import pickle

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint import filesystem as _filesystem
from torch.distributed.checkpoint import metadata as _metadata
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.metadata import StorageMeta

ALLOWED = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),  # a layout by its name
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}


class MetadataUnpickler(pickle.Unpickler):
    """Builds the classes of torch.distributed.checkpoint.metadata, torch dtypes and the few plain types
    in ALLOWED; any other global (a function to call, a module) is an UnpicklingError."""

    def find_class(self, module: str, name: str):
        if module == "torch.distributed.checkpoint.metadata" and isinstance(getattr(_metadata, name, None), type):
            return getattr(_metadata, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in ALLOWED:
            if module == "torch.distributed.checkpoint.filesystem":
                return getattr(_filesystem, name)
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"dcp/.metadata refers to {module}.{name}, which is not checkpoint metadata")


class SafeReader(FileSystemReader):
    """FileSystemReader whose metadata comes through MetadataUnpickler."""

    def read_metadata(self, *args, **kwargs):
        with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
            metadata = MetadataUnpickler(f).load()
        if not isinstance(metadata, _metadata.Metadata):
            raise pickle.UnpicklingError(f"dcp/.metadata holds a {type(metadata).__name__}, not checkpoint metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner that reads the non-tensor values with weights_only=True (plain numbers, strings,
    lists and dicts, as save_trained writes them)."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded
