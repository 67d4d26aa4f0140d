"""What an installed neptune_ext promises about its torch and its version: the import-time
torch check, the torch requirement setup.py writes into sdist and wheel metadata, and the
version's single source. (The sdist and wheel themselves are built and installed into fresh
venvs by .ci/package_check.sh, which runs tests/packaging/smoke.py from outside the tree.)"""
from __future__ import annotations

import os
import subprocess
import sys
from shutil import which as shutil_which

import pytest
import torch

import neptune_ext
from neptune_ext import ops

from scripts import ROOT, load_setup

SETUP = load_setup()


@pytest.mark.parametrize("built, built_cuda, running, running_cuda", [
    ("2.13.0+cu130", "13.0", "2.14.1+cu130", "13.0"),  # another release
    ("2.14.1", "13.0", "2.14.0", "13.0"),  # another patch release
    ("2.14.1+cu130", "13.0", "2.14.1+cpu", None),  # the CPU build of the same release
    ("2.14.1+cpu", None, "2.14.1+cu130", "13.0"),
    ("2.14.1+cu126", "12.6", "2.14.1+cu130", "13.0"),  # another CUDA major: libcudart.so.12 / .13
])
def test_another_torch_is_an_import_error_that_says_how_to_rebuild(built, built_cuda, running, running_cuda):
    with pytest.raises(ImportError) as e:
        ops.check_torch_abi(built, built_cuda, running, running_cuda)
    msg = str(e.value)
    assert f"built against torch {built} (CUDA {built_cuda})" in msg
    assert f"torch {running} (CUDA {running_cuda}) is installed" in msg
    assert "pip install --no-build-isolation --force-reinstall --no-deps --no-binary neptune_ext neptune_ext" in msg
    assert f"wheel built for torch {running}" in msg


@pytest.mark.parametrize("built, built_cuda, running, running_cuda", [
    ("2.14.1+cu130", "13.0", "2.14.1+cu130", "13.0"),
    ("2.14.1+cu130", "13.0", "2.14.1", "13.0"),  # PyPI's build of the same release and CUDA
    ("2.14.1+cu128", "12.8", "2.14.1+cu126", "12.6"),  # one libcudart.so.12
    ("2.14.1+cpu", None, "2.14.1+cpu", None),
])
def test_the_same_release_and_cuda_major_pass(built, built_cuda, running, running_cuda):
    ops.check_torch_abi(built, built_cuda, running, running_cuda)


def test_the_import_checks_the_recorded_build():
    # A fresh interpreter whose _build_info records another torch: `import neptune_ext` fails.
    code = (
        "import sys, types, torch\n"
        "m = types.ModuleType('neptune_ext._build_info')\n"
        "m.BUILD_INFO = {'cpu': True, 'cuda': False, 'torch_version': '2.11.0+cpu', 'torch_cuda_version': None}\n"
        "sys.modules['neptune_ext._build_info'] = m\n"
        "try:\n"
        "    import neptune_ext\n"
        "except ImportError as e:\n"
        "    print('ImportError:', e)\n"
        "else:\n"
        "    print('imported')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ImportError: neptune_ext was built against torch 2.11.0+cpu (CUDA None), but torch "
                                 f"{torch.__version__} (CUDA {torch.version.cuda}) is installed"), out.stdout


def test_this_build_passes_the_check():
    info = neptune_ext.build_info()
    ops.check_torch_abi(info["torch_version"], info["torch_cuda_version"], torch.__version__, torch.version.cuda)


def test_an_sdist_states_a_range_and_a_build_its_torch_release():
    assert SETUP.torch_requirement("2.14.1+cu130", ["sdist", "--formats", "gztar"]) == SETUP.TORCH_RANGE
    for argv in (["bdist_wheel"], ["dist_info"], ["egg_info"], ["editable_wheel"], ["build_ext", "--inplace"]):
        assert SETUP.torch_requirement("2.14.1+cu130", argv) == "torch==2.14.1", argv
    assert SETUP.torch_requirement("2.15.0.dev20260101+cpu", ["bdist_wheel"]) == "torch==2.15.0.dev20260101"


def test_one_version():
    assert SETUP.package_version() == neptune_ext.__version__
    from neptune_ext._version import __version__

    assert neptune_ext.__version__ is __version__
    assert neptune_ext.build_info()["version"] == __version__  # setup.py records it


def _extension_files() -> list[str]:
    import importlib

    files = []
    for name in ("neptune_ext._C", "neptune_ext._C_cuda"):
        try:
            files.append(importlib.import_module(name).__file__)
        except ImportError:
            pass
    return files


@pytest.mark.skipif(not _extension_files(), reason="no built extension")
@pytest.mark.skipif(not all(map(shutil_which, ("readelf", "nm"))), reason="binutils (readelf, nm) not installed")
def test_extensions_link_the_shared_cxx_runtime():
    """Found on a GPU machine: where g++ finds only libstdc++.a (the image carries
    libstdc++.so.6 but not the libstdc++.so link), the extensions carried a C++ runtime of
    their own, and every refused call crashed the process or lost its message's numbers.
    setup.py's libstdcxx_link_args links the shared one."""
    for f in _extension_files():
        needed = subprocess.run(["readelf", "-d", f], capture_output=True, text=True, check=True).stdout
        assert "[libstdc++.so.6]" in needed, f"{f} does not link libstdc++.so.6"
        defined = subprocess.run(["nm", "-D", "--defined-only", f], capture_output=True, text=True, check=True).stdout
        assert " __cxa_throw" not in defined, f"{f} carries its own copy of the C++ runtime"


def test_libstdcxx_link_args_names_the_runtime_only_where_the_link_is_missing(monkeypatch, tmp_path):
    fake = tmp_path / "c++"
    for found, expected in (("libstdc++.so", ["-l:libstdc++.so.6"]), (str(fake), [])):
        fake.write_text(f"#!/bin/sh\necho {found}\n")
        fake.chmod(0o755)
        monkeypatch.setenv("CXX", str(fake))
        assert SETUP.libstdcxx_link_args() == expected
