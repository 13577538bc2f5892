"""How long the manifest's load-time file check takes on a full-size U-Net data file.

`engines.manifest.check_files` hashes a file (SHA-256) the first time it is loaded
and stamps it (size, mtime, ctime, inode); later loads of an unchanged file only
compare the stamp. This script measures both on a file the size of SD 1.5's fp32
U-Net external data (~3.44 GB), filled with random bytes in a temporary folder
(never the repository), plus the ONNX external-data scan that backends run:

    python benchmarks/hash_check.py [--size-gb 3.44] [--dir /tmp]

Timings go to stdout; progress to stderr. The file is deleted at the end.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from sdrt.engines import files
from sdrt.engines.manifest import STAMPS_NAME, FileRecord, check_files
from sdrt.engines.progress import Progress

# SD 1.5 U-Net: 859.5 M float32 parameters.
UNET_FP32_BYTES = 3_438_167_040


def _write_random(path: Path, size: int, progress: Progress) -> None:
    chunk = 64 << 20
    block = os.urandom(chunk)  # one random block, varied per chunk so nothing dedups
    with open(path, "wb") as f:
        written = 0
        while written < size:
            n = min(chunk, size - written)
            f.write(written.to_bytes(8, "little") + block[8:n] if n >= 8 else block[:n])
            written += n
            if written % (1 << 30) < chunk:
                progress(f"wrote {written / 1e9:.2f} GB")


def _evict(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def _scan_time(folder: Path, size: int) -> tuple[float, int]:
    """Time `check_external_data` on a unet.onnx with as many external tensors as
    SD 1.5's U-Net export (686), spread over the data file."""
    import onnx
    from onnx import TensorProto, helper

    from sdrt.engines.onnx_files import check_external_data

    n = 686
    step = size // n
    inits = []
    for i in range(n):
        t = TensorProto(name=f"unet.weight.{i}", data_type=TensorProto.FLOAT, dims=[step // 4],
                        data_location=TensorProto.EXTERNAL)
        for k, v in (("location", "unet.onnx.data"), ("offset", str(i * step)), ("length", str(step // 4 * 4))):
            t.external_data.add(key=k, value=v)
        inits.append(t)
    graph = helper.make_graph([], "unet", [], [helper.make_tensor_value_info("unet.weight.0", TensorProto.FLOAT, None)],
                              inits)
    path = folder / "unet.onnx"
    onnx.save(helper.make_model(graph), str(path))
    times = []
    for _ in range(5):
        t = time.perf_counter()
        refs = check_external_data(path)
        times.append(time.perf_counter() - t)
    return sorted(times)[2], len(refs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-gb", type=float, default=UNET_FP32_BYTES / 1e9)
    p.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    args = p.parse_args(argv)
    size = int(args.size_gb * 1e9)
    progress = Progress()
    with tempfile.TemporaryDirectory(prefix="sdrt-hash-check-", dir=args.dir) as tmp:
        folder = Path(tmp)
        path = folder / "unet.onnx.data"
        progress(f"writing {size / 1e9:.2f} GB of random bytes to {path}")
        _write_random(path, size, progress)

        t = time.perf_counter()
        digest = files.sha256_file(path)
        hash_s = time.perf_counter() - t
        progress(f"sha256 done in {hash_s:.1f}s")
        record = {"unet.onnx.data": FileRecord(digest, size)}

        # First load of a folder without stamps: hashes, then stamps.
        (folder / STAMPS_NAME).unlink(missing_ok=True)
        t = time.perf_counter()
        check_files(folder, record)
        first_s = time.perf_counter() - t

        # Cold: evict the file from the page cache (fadvise needs no root), as after a reboot.
        _evict(path)
        (folder / STAMPS_NAME).unlink(missing_ok=True)
        t = time.perf_counter()
        check_files(folder, record)
        cold_s = time.perf_counter() - t
        progress(f"cold first load done in {cold_s:.1f}s")

        # Normal load: the stamp proves the file unchanged, no re-read.
        times = []
        for _ in range(20):
            t = time.perf_counter()
            check_files(folder, record)
            times.append(time.perf_counter() - t)
        stamped_s = sorted(times)[len(times) // 2]

        scan_s, n_refs = _scan_time(folder, size)

        print(f"file size:                       {size / 1e9:.2f} GB")
        print(f"sha256 of the file:              {hash_s:.2f} s ({size / hash_s / 1e9:.2f} GB/s, page cache warm)")
        print(f"first load (hash + stamp):       {first_s:.2f} s")
        print(f"first load, page cache cold:     {cold_s:.2f} s ({size / cold_s / 1e9:.2f} GB/s)")
        print(f"normal load (stamp matches):     {stamped_s * 1e3:.3f} ms (median of {len(times)})")
        print(f"external-data scan of unet.onnx: {scan_s * 1e3:.1f} ms ({n_refs} external tensors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
