#!/usr/bin/env python3
"""Converts a safetensors file to a PyTorch zip-format state dict, without PyTorch.

    make_pytorch_bin.py IN.safetensors OUT.bin

The output is laid out as `torch.save(state_dict, OUT.bin)` writes it (the default,
non-legacy zip format, pickle protocol 2):

    archive/data.pkl     the pickled OrderedDict {name: tensor}
    archive/data/<key>   the raw little-endian bytes of each storage
    archive/version      "3\\n"
    archive/byteorder    "little"

Each tensor is pickled as `torch._utils._rebuild_tensor_v2(storage, 0, size, stride, False,
OrderedDict())`, its storage through `persistent_id` as
`('storage', torch.<Dtype>Storage, key, 'cpu', numel)`. torch is not imported: stub modules
`torch` and `torch._utils` are registered in `sys.modules` so that pickle emits the same
GLOBAL opcodes as the real thing. Standard library only; supports F32, F16 and BF16.
"""

import collections
import io
import json
import pickle
import struct
import sys
import types
import zipfile

ARCHIVE = "archive"
# torch's PyTorchStreamWriter aligns each record's data to 64 bytes.
ALIGN = 64


def _stub_modules():
    """Registers fake `torch` / `torch._utils` modules holding the globals pickle refers to."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")
    torch._utils = utils

    def make_storage(name):
        cls = type(name, (), {})
        cls.__module__ = "torch"
        cls.__qualname__ = name
        setattr(torch, name, cls)
        return cls

    storages = {
        "F32": (make_storage("FloatStorage"), 4),
        "F16": (make_storage("HalfStorage"), 2),
        "BF16": (make_storage("BFloat16Storage"), 2),
    }

    def _rebuild_tensor_v2(*args, **kwargs):  # never called: only pickled by reference
        raise RuntimeError("stub")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2

    sys.modules.setdefault("torch", torch)
    sys.modules.setdefault("torch._utils", utils)
    if sys.modules["torch"] is not torch:
        sys.exit("a real `torch` module is already imported; run this script standalone")
    return storages, _rebuild_tensor_v2


STORAGES, REBUILD_TENSOR_V2 = _stub_modules()


class Storage:
    """A storage placeholder: pickled by `persistent_id`, its bytes go to `data/<key>`."""

    def __init__(self, dtype, key, numel, data):
        self.storage_cls = STORAGES[dtype][0]
        self.key = key
        self.numel = numel
        self.data = data


class FakeTensor:
    """Pickles as torch does for a contiguous CPU tensor (torch.Tensor.__reduce_ex__)."""

    def __init__(self, storage, shape):
        self.storage = storage
        self.shape = tuple(shape)

    def __reduce_ex__(self, protocol):
        stride = []
        acc = 1
        for d in reversed(self.shape):
            stride.append(acc)
            acc *= d
        stride = tuple(reversed(stride))
        args = (self.storage, 0, self.shape, stride, False, collections.OrderedDict())
        return (REBUILD_TENSOR_V2, args)


class TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", obj.storage_cls, obj.key, "cpu", obj.numel)
        return None


def read_safetensors(path):
    """Returns [(name, dtype, shape, bytes)] in file order."""
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        sys.exit(f"{path}: too short to be a safetensors file")
    (n,) = struct.unpack("<Q", raw[:8])
    if 8 + n > len(raw):
        sys.exit(f"{path}: header length {n} exceeds the file")
    header = json.loads(raw[8 : 8 + n].decode("utf-8"))
    body = raw[8 + n :]
    out = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = info["dtype"]
        if dtype not in STORAGES:
            sys.exit(f"{path}: tensor {name} has unsupported dtype {dtype} (F32, F16, BF16 only)")
        shape = info["shape"]
        start, end = info["data_offsets"]
        numel = 1
        for d in shape:
            numel *= d
        if end - start != numel * STORAGES[dtype][1] or end > len(body):
            sys.exit(f"{path}: tensor {name} has inconsistent offsets {start}..{end}")
        out.append((name, dtype, shape, body[start:end]))
    return out


def write_record(zf, name, data):
    """Stores one uncompressed record, padding its local header so the data is 64-byte aligned."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    header_len = 30 + len(name.encode("utf-8"))
    offset = zf.fp.tell() + header_len
    pad = (-(offset + 4)) % ALIGN  # 4 bytes for the extra field's own id + size
    info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
    zf.writestr(info, data)


def main(argv):
    if len(argv) != 3:
        sys.exit(f"usage: {argv[0]} IN.safetensors OUT.bin")
    src, dst = argv[1], argv[2]
    tensors = read_safetensors(src)
    state = collections.OrderedDict()
    storages = []
    for i, (name, dtype, shape, data) in enumerate(tensors):
        numel = len(data) // STORAGES[dtype][1]
        st = Storage(dtype, str(i), numel, data)
        storages.append(st)
        state[name] = FakeTensor(st, shape)

    buf = io.BytesIO()
    TorchPickler(buf, protocol=2).dump(state)

    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zf:
        write_record(zf, f"{ARCHIVE}/data.pkl", buf.getvalue())
        write_record(zf, f"{ARCHIVE}/byteorder", b"little")
        for st in storages:
            write_record(zf, f"{ARCHIVE}/data/{st.key}", st.data)
        write_record(zf, f"{ARCHIVE}/version", b"3\n")


if __name__ == "__main__":
    main(sys.argv)
