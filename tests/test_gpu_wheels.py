"""scripts/gpu_wheels.py: what is kept of DALI's wheel set, the fat-binary pruning, and the parts' round
trip (pack, check, join, unpack, install into a fresh venv), on small generated wheels."""
from __future__ import annotations

import importlib.util
import json
import os
import struct
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("gpu_wheels", os.path.join(ROOT, "scripts", "gpu_wheels.py"))
gpu_wheels = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_wheels)


def test_keeps_this_pythons_extensions_and_the_jpeg_path_only():
    keep = gpu_wheels.keep
    assert keep("nvidia/dali/backend_impl.cpython-312-x86_64-linux-gnu.so", "3.12")
    assert not keep("nvidia/dali/backend_impl.cpython-311-x86_64-linux-gnu.so", "3.12")
    assert not keep("nvidia/dali/backend_impl.cpython-312t-x86_64-linux-gnu.so", "3.12")
    assert keep("nvidia/dali/libdali_operators.so", "3.12") and keep("nvidia/cu13/lib/libnvjpeg.so.13", "3.12")
    assert keep("nvidia/nvimgcodec/extensions/libnvjpeg_ext.so.0.9.0", "3.12")
    assert keep("nvidia/nvimgcodec/extensions/libjpeg_turbo_ext.so.0.9.0", "3.12")  # the CPU fallback
    assert not keep("nvidia/nvimgcodec/extensions/libopencv_ext.so.0.9.0", "3.12")
    assert not keep("nvidia/libnvcomp/lib64/libnvcomp.so.5", "3.12")
    assert not keep("nvidia/nvimgcodec/nvimgcodec_impl.cpython-312-x86_64-linux-gnu.so", "3.12")
    assert keep("nvidia_dali_cuda130-2.4.0.dist-info/METADATA", "3.12")


# ---- a minimal ELF64 file with a .nv_fatbin section
def _entry(kind: int, arch: int, payload: bytes) -> bytes:
    header = bytearray(64)
    struct.pack_into("<HHIQ", header, 0, kind, 0x101, 64, len(payload))
    struct.pack_into("<I", header, 28, arch)
    return bytes(header) + payload


def _container(*entries: bytes) -> bytes:
    body = b"".join(entries)
    return struct.pack("<IHHQ", gpu_wheels.FATBIN_MAGIC, 1, 16, len(body)) + body


def _elf(sections: dict) -> bytes:
    """ELF64 header, the sections' bytes, then a section table (index 0 null, last .shstrtab)."""
    names = b"\0" + b"".join(name.encode() + b"\0" for name in sections) + b".shstrtab\0"
    blob, table, offset = b"", [bytes(64)], 64
    name_at = 1
    for name, data in [*sections.items(), (".shstrtab", names)]:
        table.append(struct.pack("<IIQQQQIIQQ", name_at, 1, 0, 0, offset + len(blob), len(data), 0, 0, 8, 0))
        name_at += len(name) + 1
        blob += data
    shoff = 64 + len(blob)
    header = bytearray(64)
    header[:5] = b"\x7fELF\x02"
    struct.pack_into("<Q", header, 0x28, shoff)
    struct.pack_into("<HHH", header, 0x3A, 64, len(table), len(table) - 1)
    return bytes(header) + blob + b"".join(table)


def _fat_elf() -> bytes:
    both = _container(_entry(2, 75, b"a" * 40), _entry(2, 90, b"B" * 24), _entry(1, 120, b"p" * 32))
    without = _container(_entry(2, 80, b"c" * 16), _entry(1, 80, b"q" * 8))  # no sm_90: left whole
    return _elf({".text": b"\x90" * 32, ".nv_fatbin": both + without, ".symtab": b"s" * 24, ".strtab": b"_Z3foov\0"})


def test_prunes_each_fat_binary_to_the_cards_cubin_and_keeps_the_layout():
    original = _fat_elf()
    data = bytearray(original)
    freed = gpu_wheels.prune_fatbins(data, 90)
    assert len(data) == len(original) and freed == (64 + 40) + (64 + 32)
    assert gpu_wheels.fatbin_archs(bytes(data)) == {"sm90": 64 + 24, "sm80": 64 + 16, "ptx80": 64 + 8}
    offset, size = gpu_wheels.elf_section(bytes(data), ".nv_fatbin")
    assert data[:offset] == original[:offset] and data[offset + size:] == original[offset + size:]
    assert gpu_wheels.prune_fatbins(data, 90) == 0  # idempotent
    assert gpu_wheels.zero_symbols(data) == 24 + 8
    assert b"_Z3foov" not in data and gpu_wheels.elf_section(bytes(data), ".text") is not None


def _wheel(folder, name: str, files: dict) -> None:
    with zipfile.ZipFile(os.path.join(folder, name), "w") as handle:
        for path, data in files.items():
            handle.writestr(path, data)


@pytest.fixture
def wheels(tmp_path):
    folder = tmp_path / "wheels"
    folder.mkdir()
    noise = os.urandom(300_000)  # incompressible: several parts of 100 kB
    _wheel(folder, "nvidia_dali_cuda130-9.9-py3-none-any.whl", {
        "nvidia/dali/__init__.py": "__version__ = '9.9'\n",
        "nvidia/dali/backend_impl.cpython-399-x86_64-linux-gnu.so": noise,
        "nvidia/dali/backend_impl.cpython-311-x86_64-linux-gnu.so": b"other python",
        "nvidia/dali/libdali_kernels.so": _fat_elf(),
        "nvidia_dali_cuda130-9.9.dist-info/METADATA": "Name: nvidia-dali-cuda130\nVersion: 9.9\n",
    })
    _wheel(folder, "nvidia_libnvcomp_cu13-5.3-py3-none-any.whl", {"nvidia/libnvcomp/lib64/libnvcomp.so.5": b"x" * 99})
    return str(folder)


def test_parts_round_trip_and_install_into_a_fresh_venv(wheels, tmp_path):
    out = str(tmp_path / "whl")
    manifest = gpu_wheels.pack(gpu_wheels.sources_from_wheels(wheels), out, "3.99", 90, part_bytes=100_000, preset=0)
    assert len(manifest["parts"]) >= 3 and all(p["bytes"] <= 100_000 for p in manifest["parts"])
    assert manifest["distributions"] == {"nvidia_dali_cuda130": "9.9"} and manifest["fatbin_bytes_freed"] > 0
    report = gpu_wheels.check(out, install=True, tree_bytes=1 << 20)
    assert report["parts"] == len(manifest["parts"]) and report["fits_one_call_each"]
    assert report["installed_version"] == "9.9" and "3.99" in report["import_skipped"]
    site = str(tmp_path / "site")
    gpu_wheels.unpack(out, site)
    files = sorted(os.path.relpath(os.path.join(d, n), site) for d, _, names in os.walk(site) for n in names)
    assert files == ["nvidia/dali/__init__.py", "nvidia/dali/backend_impl.cpython-399-x86_64-linux-gnu.so",
                     "nvidia/dali/libdali_kernels.so", "nvidia_dali_cuda130-9.9.dist-info/METADATA"]
    with open(os.path.join(site, "nvidia/dali/libdali_kernels.so"), "rb") as handle:
        assert set(gpu_wheels.fatbin_archs(handle.read())) == {"sm90", "sm80", "ptx80"}


def test_a_missing_or_damaged_part_is_named(wheels, tmp_path):
    out = str(tmp_path / "whl")
    manifest = gpu_wheels.pack(gpu_wheels.sources_from_wheels(wheels), out, "3.99", 90, part_bytes=100_000, preset=0)
    last = os.path.join(out, manifest["parts"][-1]["file"])
    with open(last, "ab") as handle:
        handle.write(b"!")
    with pytest.raises(SystemExit, match="size or SHA-256"):
        gpu_wheels.verify(out)
    os.remove(last)
    with pytest.raises(SystemExit, match=f"missing 1 of {len(manifest['parts'])} parts.*part-0"):
        gpu_wheels.verify(out)


def test_a_part_too_big_for_a_call_is_refused(wheels, tmp_path):
    out = str(tmp_path / "whl")
    gpu_wheels.pack(gpu_wheels.sources_from_wheels(wheels), out, "3.99", 90, part_bytes=100_000, preset=0)
    with pytest.raises(SystemExit, match="over 64 MiB"):
        gpu_wheels.check(out, install=False, tree_bytes=64 << 20)


def test_the_installed_dali_prunes_to_sm90_with_its_layout():
    """On DALI's own CUDA library (where DALI is installed): only sm_90 cubins stay, file size unchanged."""
    spec = importlib.util.find_spec("nvidia.dali") if importlib.util.find_spec("nvidia") else None
    if spec is None:
        pytest.skip("DALI is not installed (pip install -e .[dali])")
    path = os.path.join(os.path.dirname(spec.origin), "libdali_kernels.so")
    with open(path, "rb") as handle:
        original = handle.read()
    data = bytearray(original)
    before = gpu_wheels.fatbin_archs(original)
    freed = gpu_wheels.prune_fatbins(data, 90)
    after = gpu_wheels.fatbin_archs(bytes(data))
    assert len(data) == len(original) and freed > 0
    assert set(before) > {"sm90"} and set(after) == {"sm90"} and after["sm90"] == before["sm90"]
    print(json.dumps({"before": before, "after": after}))


def test_this_pythons_dali_pruned_and_packed_imports_and_decodes_from_a_fresh_venv(tmp_path, sample_root):
    """The cut that the GPU machine gets (other Pythons, nvCOMP, sm_90 only, static symbols zeroed), made of
    this Python's installed DALI: it installs into a fresh venv, imports from there and decodes a JPEG on
    the CPU (the GPU decode itself can only run on a lent GPU: scripts/gpu_check.sh, call 2)."""
    if importlib.util.find_spec("nvidia") is None or importlib.util.find_spec("nvidia.dali") is None:
        pytest.skip("DALI is not installed (pip install -e .[dali])")
    out = str(tmp_path / "whl")
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    manifest = gpu_wheels.pack(gpu_wheels.sources_from_installed(), out, python, 90, gpu_wheels.PART_LIMIT, preset=0)
    assert manifest["fatbin_bytes_freed"] > 50e6 and manifest["symbol_bytes_zeroed"] > 0
    image = next(os.path.join(d, n) for d, _, names in os.walk(sample_root) for n in sorted(names)
                 if n.endswith(".jpg"))
    report = gpu_wheels.check(out, install=True, tree_bytes=0, image=image)
    assert report["imported"] and "gpu-wheels-venv-" in report["dali_file"]  # from the fresh venv
    assert report["decoded_shape"][2] == 3 and report["installed_version"] == report["dali_version"]
