"""A local model folder's files checked before anything loads them: weights present, complete and readable, and a
tokenizer beside them. Reads files only (no torch), so a broken folder fails in one line."""
from __future__ import annotations

import json
import struct
from pathlib import Path

from core.errors import UsageError, first_line

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model")


def check_model_files(folder: Path, name: str) -> None:
    """A local model folder holds intact weights and a tokenizer; without tokenizer files transformers builds a
    5-token vocabulary that maps every word to [UNK], and the run trains on nothing."""
    weights = [folder / f for f in WEIGHT_FILES if (folder / f).is_file()]
    if not weights:
        raise UsageError(f"model folder {name!r} has no weights ({', '.join(WEIGHT_FILES[::2])})")
    if weights[0].name == "model.safetensors.index.json":
        try:
            shards = sorted(set(json.loads(weights[0].read_text())["weight_map"].values()))
        except (ValueError, KeyError, OSError) as error:
            raise UsageError(f"the weight index {str(weights[0])!r} is unreadable ({first_line(error)})") from None
        for shard in shards:
            check_safetensors(folder / shard)
    elif weights[0].suffix == ".safetensors":
        check_safetensors(weights[0])
    elif weights[0].stat().st_size == 0:
        raise UsageError(f"the weights file {str(weights[0])!r} is empty: download or save the model again")
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise UsageError(f"model folder {name!r} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)}): "
                         "save the tokenizer with the model (tokenizer.save_pretrained)")


def check_safetensors(path: Path) -> None:
    """Read a safetensors header (8-byte length, JSON, then the tensor bytes) and check the file holds every
    tensor it lists: a zero-byte, truncated or foreign file fails here in one line, not in a loader's traceback."""
    def bad(why: str) -> UsageError:
        return UsageError(f"the weights file {str(path)!r} is not a usable safetensors file ({why}): download or "
                          "save the model again")
    if not path.is_file():
        raise bad("it is missing")
    size = path.stat().st_size
    with open(path, "rb") as file:
        head = file.read(8)
        if len(head) < 8:
            raise bad(f"{size} bytes")
        length = struct.unpack("<Q", head)[0]
        if length > min(size - 8, 100_000_000):
            raise bad("its header length is beyond the end of the file")
        try:
            header = json.loads(file.read(length))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise bad("its header is not safetensors JSON") from None
    if 8 + length + end > size:
        raise bad(f"truncated: {size} bytes of {8 + length + end}")
