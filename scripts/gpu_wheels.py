"""DALI for the lent GPU machine: its wheel set cut to what GPU decode needs on one Python and one card,
packed in the fewest parts that a device call can carry (64 MiB per call, the working tree included).

    python3 scripts/gpu_wheels.py pack WHEEL_DIR --out .whl [--python 3.12] [--arch 90]   (wheels -> parts)
    python3 scripts/gpu_wheels.py pack --installed --out DIR                              (this Python's DALI)
    python3 scripts/gpu_wheels.py unpack .whl --target /tmp/site                          (on the GPU machine)
    python3 scripts/gpu_wheels.py check .whl [--install]     sizes, count, reassembly, a fresh venv's install
    python3 scripts/gpu_wheels.py rehearse .whl --images DIR  the check with an install (the plan's rehearsal)

What is cut (measured on nvidia-dali-cuda130 2.4.0, whose set is 262 MB of wheels; see BENCHMARKS.md):
- the Python extensions of other Pythons (DALI and nvImageCodec ship one per CPython, 3.9 to 3.15t);
- what DALI's GPU decode never loads: nvCOMP (dlopen-ed by the inflate operator only), nvImageCodec's
  Python bindings, tools and its TIFF / JPEG 2000 / OpenCV codec extensions (it loads whatever extensions
  it finds; JPEG needs nvjpeg_ext and the CPU fallback jpeg_turbo_ext), C headers;
- the CUDA code for other GPUs: DALI's libraries carry each kernel for sm_75, 80, 90, 100, 110 and 120
  plus PTX for 120 (101 MB of fat binaries, 14 MB of them sm_90). ``--arch 90`` keeps, in each fat
  binary, only the sm_90 cubin (a fat binary without one is left whole), the layout of everything else
  byte for byte: the same file size, section table and addresses, each container's header updated and
  the freed tail zeroed (it compresses to nothing). What such a library runs on is the card given.
The rest (DALI's bundled FFmpeg, cloud-storage and audio libraries) stays: libdali*.so name them as
DT_NEEDED, so the loader fails without them. The tree is packed as one tar.xz, split into parts, with a
MANIFEST.json holding each part's size and SHA-256.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zipfile

MIB = 1 << 20
CALL_LIMIT = 64 * MIB  # what one device call carries, the working tree included
PART_LIMIT = 62 * MIB  # a part, leaving 2 MiB for the working tree (under 1 MiB now)
DROP = (  # never loaded by DALI's GPU (or CPU) JPEG decode; paths relative to site-packages
    r"^nvidia/libnvcomp/", r"^nvidia_libnvcomp", r"^nvidia/nvimgcodec/nvimgcodec_impl", r"^nvidia/nvimgcodec/tools/",
    r"^nvidia/nvimgcodec/extensions/lib(opencv|tiff|nvtiff|nvjpeg2k)_ext", r"/include/", r"\.(h|hpp|cuh)$",
    r"^libcst", r"^nvtx",  # DALI's experimental dynamic mode only (nvidia/dali/experimental/dynamic)
    # copies: DT_NEEDED names libaws-c-common-*.so.1 and libaws-c-s3-*.so.0unstable
    r"^nvidia/dali/\.libs/libaws-c-(common|s3)-[0-9a-f]+\.so\.1\.0\.0$",
)
PRUNE = r"^nvidia/dali/.*\.so"  # DALI's own libraries (and the CV-CUDA it bundles): the big fat binaries
DISTRIBUTIONS = ("nvidia-dali-cuda130", "nvidia-nvimgcodec-cu13", "nvidia-nvjpeg", "astunparse", "gast", "nvtx",
                 "makefun", "libcst", "optree")  # DALI's Requires-Dist that the GPU image lacks, nvCOMP left out


# ---- what is kept
def keep(path: str, python: str) -> bool:
    """Whether site-packages' ``path`` is needed by DALI's decode under CPython ``python`` ("3.12")."""
    tag = re.search(r"\.cpython-(\d+t?)-", path)
    if tag and tag.group(1) != python.replace(".", ""):
        return False
    return not any(re.search(pattern, path) for pattern in DROP)


# ---- CUDA fat binaries
FATBIN_MAGIC, ELF_KIND = 0xBA55ED50, 2


def elf_section(data: bytes, name: str):
    """(offset, size) of ELF64 section ``name`` in ``data``, or None."""
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return None
    shoff, = struct.unpack_from("<Q", data, 0x28)
    entsize, count, names_index = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", data, shoff + i * entsize) for i in range(count)]
    names_offset = headers[names_index][4]
    for name_at, _kind, _flags, _addr, offset, size in headers:
        end = data.index(b"\0", names_offset + name_at)
        if data[names_offset + name_at:end].decode() == name:
            return offset, size
    return None


def fatbin_entries(section: bytes):
    """Yield (container start, header size, [(kind, arch, entry offset, entry length), ...]) of every fat
    binary container in a ``.nv_fatbin`` section (containers are 8-byte aligned; zeros between them)."""
    start = 0
    while start + 16 <= len(section):
        magic, _version, header, size = struct.unpack_from("<IHHQ", section, start)
        if magic != FATBIN_MAGIC:
            start += 8
            continue
        entries, at, end = [], start + header, start + header + size
        while at < end:
            kind, _v, entry_header, payload = struct.unpack_from("<HHIQ", section, at)
            arch, = struct.unpack_from("<I", section, at + 28)
            entries.append((kind, arch, at, entry_header + payload))
            at += entry_header + payload
        yield start, header, entries
        start = end


def prune_fatbins(data: bytearray, arch: int) -> int:
    """Keep only the sm_``arch`` cubin in each fat binary of the ELF ``data`` (in place; containers without
    one stay whole). -> bytes freed (zeroed)."""
    found = elf_section(data, ".nv_fatbin")
    if found is None:
        return 0
    offset, size = found
    section = bytes(data[offset:offset + size])
    freed = 0
    for start, header, entries in fatbin_entries(section):
        kept = [e for e in entries if e[0] == ELF_KIND and e[1] == arch]
        if not kept or len(kept) == len(entries):
            continue
        old_size = sum(length for *_, length in entries)
        body = b"".join(section[at:at + length] for _, _, at, length in kept)
        base = offset + start
        struct.pack_into("<Q", data, base + 8, len(body))
        data[base + header:base + header + old_size] = body + bytes(old_size - len(body))
        freed += old_size - len(body)
    return freed


def zero_symbols(data: bytearray) -> int:
    """Zero the static symbol table (.symtab, .strtab) of the ELF ``data`` in place: the dynamic loader and
    CUDA's fat binary registration use .dynsym and relocations only; backtraces lose static names. -> bytes."""
    zeroed = 0
    for name in (".symtab", ".strtab"):
        found = elf_section(data, name)
        if found:
            offset, size = found
            data[offset:offset + size] = bytes(size)
            zeroed += size
    return zeroed


def fatbin_archs(data: bytes) -> dict:
    """{"sm90": bytes, "ptx120": bytes, ...} over every fat binary of an ELF file."""
    found = elf_section(data, ".nv_fatbin")
    archs: dict = {}
    if found:
        offset, size = found
        for _, _, entries in fatbin_entries(data[offset:offset + size]):
            for kind, arch, _, length in entries:
                key = f"{'sm' if kind == ELF_KIND else 'ptx'}{arch}"
                archs[key] = archs.get(key, 0) + length
    return archs


# ---- pack
def sources_from_wheels(folder: str):
    """(path in site-packages, a function reading its bytes) of every file of every wheel in ``folder``."""
    for name in sorted(os.listdir(folder)):
        if name.endswith(".whl"):
            with zipfile.ZipFile(os.path.join(folder, name)) as wheel:
                for info in wheel.infolist():
                    if not info.is_dir():
                        yield info.filename, (lambda n=info.filename, w=wheel: w.read(n))


def sources_from_installed(names=DISTRIBUTIONS):
    """The same from this Python's installed distributions (those not installed are left out)."""
    from importlib import metadata

    for name in names:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        for file in dist.files or []:
            path = str(dist.locate_file(file))
            if os.path.isfile(path) and not str(file).startswith(".."):  # ../../bin/...: scripts
                yield str(file), (lambda p=path: _read(p))


def _read(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def pack(sources, out: str, python: str, arch: int, part_bytes: int, preset: int) -> dict:
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(out):  # a previous pack's parts would be carried and joined with these
        if name.startswith("dali-") or name == "MANIFEST.json":
            os.remove(os.path.join(out, name))
    stage = tempfile.mkdtemp(prefix="gpu-wheels-")
    kept = dropped = freed = symbols = unpacked = 0
    versions = {}
    try:
        for path, read in sources:
            if not keep(path, python):
                dropped += 1
                continue
            data = bytearray(read())
            if arch and re.search(PRUNE, path):
                freed += prune_fatbins(data, arch)
            if data[:4] == b"\x7fELF":
                symbols += zero_symbols(data)
            target = os.path.join(stage, path)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "wb") as handle:
                handle.write(data)
            kept, unpacked = kept + 1, unpacked + len(data)
            match = re.match(r"^([^/]+)-([^-/]+)\.dist-info/METADATA$", path)
            if match:
                versions[match.group(1)] = match.group(2)
        if not any(name.lower().startswith("nvidia_dali") for name in versions):
            raise SystemExit("no nvidia-dali distribution among the sources")
        dali = next(v for k, v in versions.items() if k.lower().startswith("nvidia_dali"))
        name = f"dali-{dali}-cp{python.replace('.', '')}-sm{arch or 'all'}.tar.xz"
        archive = os.path.join(out, name)
        _tar_xz(stage, archive, preset)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    parts = _split(archive, part_bytes)
    manifest = {"name": name, "python": python, "arch": arch, "distributions": versions, "files": kept,
                "dropped_files": dropped, "fatbin_bytes_freed": freed,
                "symbol_bytes_zeroed": symbols, "unpacked_bytes": unpacked,
                "bytes": sum(p["bytes"] for p in parts), "parts": parts}
    with open(os.path.join(out, "MANIFEST.json"), "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=1)
    return manifest


def _tar_xz(folder: str, archive: str, preset: int) -> None:
    """tar.xz of ``folder``'s content through xz's x86 filter (machine code compresses ~10 % better), on
    every core when the xz tool is there, else with Python's lzma."""
    if shutil.which("xz") and shutil.which("tar"):
        with open(archive, "wb") as handle:
            tar = subprocess.Popen(["tar", "-C", folder, "--sort=name", "-cf", "-", "."], stdout=subprocess.PIPE)
            xz = subprocess.run(["xz", "--x86", f"--lzma2=preset={preset}e", "-T0", "-c"], stdin=tar.stdout,
                                stdout=handle, check=False)
            if tar.wait() or xz.returncode:
                raise SystemExit("tar | xz failed")
        return
    filters = [{"id": lzma.FILTER_X86}, {"id": lzma.FILTER_LZMA2, "preset": preset | lzma.PRESET_EXTREME}]
    with lzma.open(archive, "wb", format=lzma.FORMAT_XZ, filters=filters) as stream:
        with tarfile.open(fileobj=stream, mode="w|") as tar:
            tar.add(folder, arcname=".")


def _split(archive: str, part_bytes: int) -> list[dict]:
    parts, index = [], 0
    with open(archive, "rb") as source:
        while chunk := source.read(part_bytes):
            path = f"{archive}.part-{index:02d}"
            with open(path, "wb") as handle:
                handle.write(chunk)
            parts.append({"file": os.path.basename(path), "bytes": len(chunk),
                          "sha256": hashlib.sha256(chunk).hexdigest()})
            index += 1
    os.remove(archive)
    return parts


def _sha256(paths: list[str]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            while chunk := handle.read(MIB):
                digest.update(chunk)
    return digest.hexdigest()


# ---- unpack and check
class _Joined(io.RawIOBase):
    """The parts read back to back as one stream."""

    def __init__(self, paths):
        self.paths, self.handle = list(paths), None

    def readable(self):
        return True

    def readinto(self, buffer):
        while True:
            if self.handle is None:
                if not self.paths:
                    return 0
                self.handle = open(self.paths.pop(0), "rb")
            count = self.handle.readinto(buffer)
            if count:
                return count
            self.handle.close()
            self.handle = None


def read_manifest(folder: str) -> dict:
    path = os.path.join(folder, "MANIFEST.json")
    if not os.path.exists(path):
        raise SystemExit(f"no {path}: make the parts with `bash scripts/gpu_wheels.sh` and carry the folder")
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def verify(folder: str) -> dict:
    """The manifest, after checking that every part is there with its size and SHA-256 (names the missing)."""
    manifest = read_manifest(folder)
    missing = [p["file"] for p in manifest["parts"] if not os.path.exists(os.path.join(folder, p["file"]))]
    if missing:
        raise SystemExit(f"missing {len(missing)} of {len(manifest['parts'])} parts in {folder}: {', '.join(missing)}")
    for part in manifest["parts"]:
        path = os.path.join(folder, part["file"])
        if os.path.getsize(path) != part["bytes"] or _sha256([path]) != part["sha256"]:
            raise SystemExit(f"{path}: size or SHA-256 differs from MANIFEST.json (a partial copy?)")
    return manifest


def unpack(folder: str, target: str) -> dict:
    manifest = verify(folder)
    os.makedirs(target, exist_ok=True)
    stream = io.BufferedReader(_Joined(os.path.join(folder, p["file"]) for p in manifest["parts"]), MIB)
    with tarfile.open(fileobj=stream, mode="r|xz") as tar:
        tar.extractall(target, filter="tar") if hasattr(tarfile, "data_filter") else tar.extractall(target)
    return manifest


def check(folder: str, install: bool, tree_bytes: int, image: str = "") -> dict:
    """Sizes and count of the parts, each call's load (a part + the working tree), reassembly; ``install``:
    into a fresh venv here, then DALI's version from its metadata, and where the parts were made for this
    Python, ``import nvidia.dali`` from there and a CPU decode of ``image``."""
    manifest = verify(folder)
    sizes = [p["bytes"] for p in manifest["parts"]]
    report = {"parts": len(sizes), "part_bytes": sizes, "bytes": sum(sizes), "tree_bytes": tree_bytes,
              "largest_call_bytes": max(sizes) + tree_bytes + len(json.dumps(manifest)),
              "fits_one_call_each": max(sizes) + tree_bytes < CALL_LIMIT, "python": manifest["python"],
              "arch": manifest["arch"], "distributions": manifest["distributions"]}
    if not report["fits_one_call_each"]:
        raise SystemExit(f"a part and the working tree make {report['largest_call_bytes']} bytes, over 64 MiB")
    if install:
        venv = tempfile.mkdtemp(prefix="gpu-wheels-venv-")
        try:
            report.update(_install_check(folder, venv, manifest, image))
        finally:
            shutil.rmtree(venv, ignore_errors=True)
    return report


def _install_check(folder: str, venv: str, manifest: dict, image: str) -> dict:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = os.path.join(venv, "bin", "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    unpack(folder, site)
    # numpy and friends from this interpreter's environment, after the fresh site-packages (a .pth appends)
    import sysconfig

    with open(os.path.join(site, "zz_deps.pth"), "w", encoding="utf-8") as handle:
        handle.write(sysconfig.get_paths()["purelib"] + "\n")
    dali = next(k for k in manifest["distributions"] if k.lower().startswith("nvidia_dali")).replace("_", "-")
    probe = f"import importlib.metadata as m; print(m.version({dali!r}))"
    version = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    result = {"installed_version": version, "imported": False}
    if manifest["python"] != f"{sys.version_info.major}.{sys.version_info.minor}":
        result["import_skipped"] = f"made for Python {manifest['python']}, this is {sys.version.split()[0]}"
        return result
    decode = _DECODE.format(site=site, image=image) if image else ""
    program = _IMPORT + decode + "print(json.dumps(record))\n"
    out = subprocess.run([python, "-c", program], capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    if out.returncode:
        raise SystemExit(f"the installed parts do not import: {out.stderr[-2000:]}")
    result.update(json.loads(out.stdout.strip().splitlines()[-1]), imported=True)
    return result


def rehearse(folder: str, images: str, tree_bytes: int) -> dict:
    """The plan's rehearsal of its DALI step: check the parts in ``folder`` (sizes, count, reassembly, an
    install into a fresh venv, and where they were made for this Python an import and a CPU decode of one
    of ``images``' JPEGs); without parts, say so (tests/test_gpu_wheels.py packs this Python's DALI)."""
    if not os.path.exists(os.path.join(folder, "MANIFEST.json")):
        return {"reason": f"no parts in {folder}: make them with `bash scripts/gpu_wheels.sh`"}
    image = next((os.path.join(d, n) for d, _, names in sorted(os.walk(images)) for n in sorted(names)
                  if n.endswith(".jpg")), "") if images else ""
    return {"source": folder, **check(folder, True, tree_bytes or working_tree_bytes(), image)}


def working_tree_bytes() -> int:
    """What a device call sends beside a part: the tracked files (0 outside a git checkout)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        names = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, timeout=30,
                               check=True).stdout.split(b"\0")
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(os.path.getsize(os.path.join(root, n.decode())) for n in names
               if n and os.path.isfile(os.path.join(root, n.decode())))


_IMPORT = """
import json, os
import nvidia.dali as dali
record = {"dali_file": dali.__file__, "dali_version": dali.__version__}
"""
_DECODE = """
assert dali.__file__.startswith({site!r}), dali.__file__
from nvidia.dali import fn, pipeline_def
@pipeline_def(batch_size=1, num_threads=1, device_id=None)
def pipe():
    data, _ = fn.readers.file(files=[{image!r}])
    return fn.decoders.image(data, device="cpu")
p = pipe()
p.build()
(images,) = p.run()
record["decoded_shape"] = list(images.at(0).shape)
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("pack")
    make.add_argument("wheels", nargs="?", help="a folder of downloaded wheels")
    make.add_argument("--installed", action="store_true", help="pack this Python's installed DALI instead")
    make.add_argument("--out", required=True)
    make.add_argument("--python", default=f"{sys.version_info.major}.{sys.version_info.minor}")
    make.add_argument("--arch", type=int, default=90, help="keep the cubins of this SM only (0: keep all)")
    make.add_argument("--part-mib", type=float, default=PART_LIMIT / MIB)
    make.add_argument("--preset", type=int, default=9, help="xz preset (0 fast .. 9 small)")
    get = sub.add_parser("unpack")
    get.add_argument("folder")
    get.add_argument("--target", required=True)
    get.add_argument("--check-import", action="store_true", help="then import DALI from there")
    test = sub.add_parser("check")
    test.add_argument("folder")
    test.add_argument("--install", action="store_true")
    test.add_argument("--tree-bytes", type=int, default=0, help="the working tree a call carries beside a part "
                      "(default: the checkout's tracked files)")
    test.add_argument("--image", default="", help="a JPEG to decode on the CPU from the fresh install")
    again = sub.add_parser("rehearse")
    again.add_argument("folder")
    again.add_argument("--images", default="", help="a folder with a JPEG to decode from the fresh install")
    again.add_argument("--tree-bytes", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "rehearse":
        result = rehearse(args.folder, args.images, args.tree_bytes)
    elif args.command == "pack":
        if bool(args.wheels) == args.installed:
            parser.error("give a wheel folder or --installed")
        sources = sources_from_installed() if args.installed else sources_from_wheels(args.wheels)
        result = pack(sources, args.out, args.python, args.arch, int(args.part_mib * MIB), args.preset)
        result = {k: v for k, v in result.items() if k != "parts"} | {"parts": [p["bytes"] for p in result["parts"]]}
    elif args.command == "unpack":
        result = {k: v for k, v in unpack(args.folder, args.target).items() if k != "parts"}
        if args.check_import:  # what the plan's later stages will import, with the target first on the path
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([args.target, os.environ.get("PYTHONPATH", "")])}
            out = subprocess.run([sys.executable, "-c", _IMPORT + "print(json.dumps(record))"], env=env,
                                 capture_output=True, text=True, timeout=300)
            if out.returncode:
                raise SystemExit(f"DALI does not import from {args.target}: {out.stderr[-2000:]}")
            result.update(json.loads(out.stdout.strip().splitlines()[-1]))
    else:
        result = check(args.folder, args.install, args.tree_bytes or working_tree_bytes(), args.image)
    figure = "skipped" if "reason" in result else "wheels"
    print(json.dumps({"figure": figure, "name": args.command, **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
