"""Build neptune_ext: the CPU extension always, the CUDA extension when it can be built.

Environment:
  NEPTUNE_BUILD_CUDA=1|0   force the CUDA extension on (fail if impossible) or off;
                           unset: build it when nvcc and a CUDA build of torch are present.
  TORCH_CUDA_ARCH_LIST     architectures to build for; unset and no GPU visible: "8.0;9.0".
  CUDA_HOME                toolkit root; unset: resolved from the real nvcc behind PATH.
  MAX_JOBS                 parallel compile jobs (ninja).
  NEPTUNE_SANITIZE=1       the CPU extension under AddressSanitizer and UBSan, built by
                           `python setup.py build` into build/sanitize/lib only (never in
                           place, never installed); run with .ci/sanitize.sh (docs/sanitize.md).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")
DEFAULT_ARCH_LIST = "8.0;9.0"
# The torch an sdist builds against: any in this range, whichever is installed.
TORCH_RANGE = "torch>=2.11,<3"


def package_version() -> str:
    """neptune_ext/_version.py's __version__, without importing the package."""
    scope: dict = {}
    with open(os.path.join(ROOT, "neptune_ext", "_version.py")) as f:
        exec(f.read(), scope)
    return scope["__version__"]


def torch_requirement(torch_version: str, argv: list[str]) -> str:
    """The sdist states TORCH_RANGE; whatever is built from it (a wheel, an install) is
    compiled against one torch and requires that release (the version without its local
    label: 2.14.1+cu130 gives torch==2.14.1), so pip will not pair it with another."""
    if "sdist" in argv:
        return TORCH_RANGE
    return "torch==" + torch_version.split("+")[0]


def _toolkit_root(path: str) -> str | None:
    ok = os.path.isfile(os.path.join(path, "include", "cuda_runtime.h")) and os.path.isfile(
        os.path.join(path, "bin", "nvcc")
    )
    return path if ok else None


def resolve_cuda_home() -> str | None:
    """CUDA_HOME, or the toolkit behind `nvcc` on PATH.

    The nvcc on PATH may be a wrapper script (then torch would guess CUDA_HOME=/usr/local
    and fail to link -lcudart): follow what the script executes.
    """
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        try:
            if os.path.getsize(real) < 65536:
                with open(real, errors="ignore") as f:
                    candidates += re.findall(r"(/[^\s\"']+)/bin/nvcc", f.read())
        except OSError:
            pass
    candidates.append("/usr/local/cuda")
    for c in candidates:
        if _toolkit_root(c):
            return c
    return None


# The kernels pass a 32,000-byte argument (the table upload): CUDA 12.1 raised the limit
# on kernel parameters from 4 KB to 32 KB.
MIN_CUDA = (12, 1)


def nvcc_version(cuda_home: str) -> tuple[int, int] | None:
    """(major, minor) of the toolkit's nvcc, or None if it cannot be run."""
    import subprocess

    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def check_cuda_version(version: tuple[int, int] | None, cuda_home: str) -> None:
    """Fail the build with a clear message for a toolkit older than MIN_CUDA."""
    if version is not None and version < MIN_CUDA:
        sys.exit(
            f"neptune_ext's CUDA kernels need CUDA {MIN_CUDA[0]}.{MIN_CUDA[1]} or newer (32 KB kernel "
            f"parameters); the toolkit at {cuda_home} has nvcc {version[0]}.{version[1]}. Point CUDA_HOME at a "
            "newer toolkit, or build without CUDA: NEPTUNE_BUILD_CUDA=0"
        )


def want_cuda() -> bool:
    flag = os.environ.get("NEPTUNE_BUILD_CUDA", "").strip().lower()
    if flag in ("0", "false", "off", "no"):
        return False
    import torch

    possible = torch.version.cuda is not None and resolve_cuda_home() is not None
    if flag in ("1", "true", "on", "yes"):
        if not possible:
            sys.exit(
                "NEPTUNE_BUILD_CUDA=1 but the CUDA extension cannot be built: "
                f"torch.version.cuda={torch.version.cuda!r}, CUDA toolkit={resolve_cuda_home()!r} "
                "(set CUDA_HOME to the toolkit root)"
            )
        return True
    return possible


def libstdcxx_link_args() -> list[str]:
    """["-l:libstdc++.so.6"] where the compiler would link libstdc++ statically, else [].

    Some images carry the C++ runtime (libstdc++.so.6) but not its development link
    (libstdc++.so); g++ then links libstdc++.a into the extension, a second C++ runtime
    beside torch's, and the first C++ exception raised through the extension (any refused
    call) crashes the process (seen on a GPU machine whose $CXX, a g++ 13, found only
    libstdc++.a; torch 2.11). Naming the runtime's file links it dynamically, as torch
    itself is."""
    cxx = os.environ.get("CXX", "c++")  # what torch.utils.cpp_extension links with
    try:
        found = subprocess.run([cxx, "-print-file-name=libstdc++.so"], capture_output=True, text=True,
                               timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return []
    return [] if os.path.isabs(found) and os.path.exists(found) else ["-l:libstdc++.so.6"]


# -- NEPTUNE_SANITIZE=1: the sanitizer build (docs/sanitize.md) -------------------------------
SANITIZE_DIR = os.path.join("build", "sanitize")
SANITIZERS = "address,undefined,float-cast-overflow"
# -fno-wrapv: Python's CFLAGS carry -fwrapv, under which signed overflow is defined and
# UBSan's signed-integer-overflow check is silent. float-cast-overflow (a float converted to
# an integer type that cannot hold it) is not part of gcc's "undefined". -O1 -g: usable
# stack traces at a bearable speed.
SANITIZE_CXX_FLAGS = ["-O1", "-g", "-fno-omit-frame-pointer", "-fno-wrapv",
                      f"-fsanitize={SANITIZERS}", "-fno-sanitize-recover=all"]
SANITIZE_COMMANDS = ("build", "build_ext", "build_py", "clean")


def sanitize_requested() -> bool:
    return os.environ.get("NEPTUNE_SANITIZE", "").strip().lower() in ("1", "true", "on", "yes")


def sanitize_build(cpu_ext, torch) -> None:
    """Builds only the CPU extension (the CPU kernels, the SIMT emulator and the emulated
    CUDA kernels) with SANITIZE_CXX_FLAGS, with the Python package, into
    build/sanitize/lib: a normal import never finds it; .ci/sanitize.sh puts it first on
    PYTHONPATH with the sanitizer runtime preloaded."""
    from torch.utils.cpp_extension import BuildExtension

    if os.environ.get("NEPTUNE_BUILD_CUDA", "").strip().lower() in ("1", "true", "on", "yes"):
        sys.exit("NEPTUNE_SANITIZE=1 builds the CPU extension only: unset NEPTUNE_BUILD_CUDA")
    command = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
    if command not in SANITIZE_COMMANDS or {"-i", "--inplace"} & set(sys.argv):
        sys.exit(f"NEPTUNE_SANITIZE=1: run `python setup.py build` (it builds into {SANITIZE_DIR}/lib only: "
                 f"never in place, never installed), got {sys.argv[1:]}")
    cxx = [f for f in cpu_ext.extra_compile_args["cxx"] if f not in ("-O3", "-g0")]
    cpu_ext.extra_compile_args = {"cxx": cxx + SANITIZE_CXX_FLAGS}
    cpu_ext.extra_link_args = list(cpu_ext.extra_link_args) + [f"-fsanitize={SANITIZERS}"]
    info = {"version": package_version(), "cpu": True, "cuda": False, "sanitize": SANITIZERS,
            "torch_version": torch.__version__, "torch_cuda_version": torch.version.cuda}

    class SanitizedBuildExt(BuildExtension.with_options(use_ninja=True)):
        def finalize_options(self):
            super().finalize_options()
            self.inplace = 0

        def run(self):
            super().run()
            with open(os.path.join(self.build_lib, "neptune_ext", "_build_info.py"), "w") as f:
                f.write("# Written by setup.py (NEPTUNE_SANITIZE=1) at build time.\n")
                f.write("BUILD_INFO = " + repr(info) + "\n")

    setup(ext_modules=[cpu_ext], cmdclass={"build_ext": SanitizedBuildExt},
          options={"build": {"build_base": SANITIZE_DIR, "build_lib": os.path.join(SANITIZE_DIR, "lib")}})
# -- end of the sanitizer build ---------------------------------------------------------------


def main() -> None:
    cuda_home = resolve_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # before torch.utils.cpp_extension reads it
    build_cuda = want_cuda()
    if build_cuda:
        check_cuda_version(nvcc_version(cuda_home), cuda_home)

    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    if build_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "detected GPU") if build_cuda else ""

    # -ffp-contract=off: the SSE2, AVX2 and AVX-512 kernels give bitwise the same result.
    # -fopenmp: at::parallel_for is inline OpenMP; without it the CPU kernel runs serially.
    cxx_runtime = libstdcxx_link_args()
    cxx_flags = ["-O3", "-g0", "-ffp-contract=off", "-fno-math-errno", "-Wno-psabi", "-fopenmp"]
    cpu_sources = [
        "library.cpp",
        "debug_ops.cpp",
        "cpu/operator.cpp",
        "cpu/set_sse2.cpp",
        "cpu/set_avx2.cpp",
        "cpu/set_avx512.cpp",
        "cpu/set_avx512bf16.cpp",
        # The CUDA kernels on the CPU, under the SIMT emulator (a testing backend).
        "simt/scheduler.cpp",
        "simt/kernels.cpp",
        "simt/operator.cpp",
    ]
    ext_modules = [
        CppExtension(
            "neptune_ext._C",
            [os.path.join(CSRC, s) for s in cpu_sources],
            include_dirs=[os.path.join(ROOT, CSRC)],  # sources include each other by path from csrc/
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"] + cxx_runtime,
        )
    ]
    if build_cuda:
        ext_modules.append(
            CUDAExtension(
                "neptune_ext._C_cuda",
                [os.path.join(CSRC, "cuda", "operator.cpp"), os.path.join(CSRC, "cuda", "kernels.cu")],
                include_dirs=[os.path.join(ROOT, CSRC)],
                extra_link_args=cxx_runtime,
                extra_compile_args={
                    "cxx": ["-O3", "-g0"],
                    # No FMA contraction, as -ffp-contract=off on the CPU: the count and
                    # update passes then round M alike whatever the compiler inlines.
                    "nvcc": ["-O3", "-lineinfo", "--fmad=false"],
                },
            )
        )

    if sanitize_requested():  # its own build, its own build info: see sanitize_build
        return sanitize_build(ext_modules[0], torch)

    with open(os.path.join(ROOT, "neptune_ext", "_build_info.py"), "w") as f:
        f.write("# Written by setup.py at build time.\n")
        f.write(
            "BUILD_INFO = "
            + repr(
                {
                    "version": package_version(),
                    "cpu": True,
                    "cuda": build_cuda,
                    "cuda_arch_list": arch_list,
                    "cuda_home": cuda_home if build_cuda else None,
                    "torch_version": torch.__version__,
                    "torch_cuda_version": torch.version.cuda,
                }
            )
            + "\n"
        )

    setup(
        install_requires=[torch_requirement(torch.__version__, sys.argv[1:])],
        ext_modules=ext_modules,
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )


if __name__ == "__main__":  # also when pip runs it; tests import the helpers above
    main()
