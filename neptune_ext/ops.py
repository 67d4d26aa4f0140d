"""Loading of the compiled extensions, thin wrappers around the operator, and what was built.

The operator is ``torch.ops.neptune_ext.neptune_step_`` (schema in csrc/schema.h),
with a CPU kernel in ``neptune_ext._C`` and a CUDA kernel in ``neptune_ext._C_cuda``.
"""
from __future__ import annotations

import importlib
import os
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

OP_NAME = "neptune_ext::neptune_step_"
REBUILD_HINT = (
    "rebuild from the source checkout with `pip install --no-build-isolation -e .` "
    "(for CUDA: nvcc and a CUDA build of torch, or NEPTUNE_BUILD_CUDA=1 to insist)"
)
# Set to 1 to turn the fallback-to-reference warning into an error.
REQUIRE_KERNEL_ENV = "NEPTUNE_REQUIRE_KERNEL"

_load_errors: dict[str, str] = {}


def _load(module: str) -> bool:
    try:
        importlib.import_module(f"neptune_ext.{module}")
        return True
    except ImportError as e:  # missing or unloadable .so: reported by build_info()
        _load_errors[module] = str(e)
        return False


def _built() -> dict:
    try:
        from ._build_info import BUILD_INFO

        return dict(BUILD_INFO)
    except ImportError:
        return {"cpu": False, "cuda": False, "note": "neptune_ext/_build_info.py missing: not built by setup.py"}


def _abi_key(torch_version: str, torch_cuda_version: str | None) -> tuple[str, str | None]:
    # What a compiled extension depends on: the release (the version before its local
    # label), since torch's C++ ABI changes between releases, and the CUDA major version
    # (None for a CPU build), since the +cpu, +cu12x and +cu13x builds of one release ship
    # different libraries (libtorch_cuda, libc10_cuda, libcudart.so.12 / .13). The rest of
    # the local label is ignored: PyPI's 2.14.1 and the PyTorch index's 2.14.1+cu130 are
    # one build.
    return torch_version.split("+")[0], torch_cuda_version.split(".")[0] if torch_cuda_version else None


def check_torch_abi(built_version: str, built_cuda: str | None, running_version: str,
                    running_cuda: str | None) -> None:
    """ImportError, saying how to rebuild, when the running torch is not the one the
    extensions were compiled against (see _abi_key for what counts)."""
    if _abi_key(built_version, built_cuda) == _abi_key(running_version, running_cuda):
        return
    raise ImportError(
        f"neptune_ext was built against torch {built_version} (CUDA {built_cuda}), but torch "
        f"{running_version} (CUDA {running_cuda}) is installed: a compiled neptune_ext works only with the "
        "torch it was built against. Rebuild it for this torch with `pip install --no-build-isolation "
        "--force-reinstall --no-deps --no-binary neptune_ext neptune_ext` (from a source checkout: "
        f"`pip install --no-build-isolation -e .`), or install a neptune_ext wheel built for torch {running_version}"
    )


if "torch_version" in _built():  # absent when not built by setup.py: nothing compiled to check
    check_torch_abi(_built()["torch_version"], _built().get("torch_cuda_version"), torch.__version__,
                    torch.version.cuda)
HAS_CPU_EXT = _load("_C")
HAS_CUDA_EXT = _load("_C_cuda") if (_built().get("cuda") and torch.version.cuda) else False


def _query_kernel(dispatch_key: str) -> bool:
    return HAS_CPU_EXT and torch._C._dispatch_has_kernel_for_dispatch_key(OP_NAME, dispatch_key)


# Registrations happen when the extensions load (above); a plain dict keeps the lookup
# traceable by torch.compile.
_KERNELS = {"cpu": _query_kernel("CPU"), "cuda": _query_kernel("CUDA")}


def has_kernel(device_type: str) -> bool:
    """Whether a compiled kernel for this device type ('cpu', 'cuda', ...) is registered."""
    return _KERNELS.get(device_type, False)


def build_info() -> dict:
    """What was built (CPU, CUDA, arch list, torch version) and what loaded here."""
    info = _built()
    info["cpu_kernel_loaded"] = has_kernel("cpu")
    info["cuda_kernel_loaded"] = has_kernel("cuda")
    info["cpu_isa"] = torch.ops.neptune_ext.cpu_isa() if HAS_CPU_EXT else None
    info["torch_version_now"] = torch.__version__
    if _load_errors:
        info["load_errors"] = dict(_load_errors)
    return info


def cpu_name() -> str:
    """The CPU's model name, for labelling benchmark results (lscpu's "Model name", else
    what the platform module knows)."""
    import platform
    import subprocess

    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10,
                             env={**os.environ, "LC_ALL": "C"}).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name" and value.strip():
                return value.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def describe_build() -> str:
    i = build_info()
    parts = [f"CPU kernel {'loaded' if i['cpu_kernel_loaded'] else 'missing'}"]
    if i.get("cuda"):
        parts.append(f"CUDA kernel {'loaded' if i['cuda_kernel_loaded'] else 'missing'} (archs {i.get('cuda_arch_list')})")
    else:
        parts.append("CUDA extension not built")
    if i.get("sanitize"):
        parts.append(f"sanitizer build ({i['sanitize']}): for tests, not training")
    if "torch_version" in i:
        parts.append(f"built against torch {i['torch_version']}, running {i['torch_version_now']}")
    if "load_errors" in i:
        parts.append(f"load errors: {i['load_errors']}")
    if "note" in i:
        parts.append(i["note"])
    return "; ".join(parts)


class StepLists(NamedTuple):
    """The operator's five tensor lists, in its argument order; unpacks as its arguments
    (``neptune_step_(*lists, lr=...)``)."""

    params: list[Tensor]
    grads: list[Tensor]
    exp_avgs: list[Tensor]
    exp_avg_sqs: list[Tensor]
    steps: list[Tensor]

    @classmethod
    def empty(cls) -> "StepLists":
        return cls([], [], [], [], [])

    def append(self, param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: Tensor) -> None:
        for lst, t in zip(self, (param, grad, exp_avg, exp_avg_sq, step)):
            lst.append(t)


def call_step_op(op, params, grads, exp_avgs, exp_avg_sqs, steps, *, lr: float | Tensor, **kwargs) -> None:
    """Calls the overload of a neptune_step_-shaped operator that fits `lr`: .tensor_lr
    for a tensor, the default one for a float."""
    overload = op.tensor_lr if isinstance(lr, Tensor) else op.default
    overload(params, grads, exp_avgs, exp_avg_sqs, steps, lr=lr, **kwargs)


def neptune_step_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    steps: Sequence[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
    clip: float,
    cautious: bool,
    maximize: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """One Neptune step on lists of tensors, in place (params, exp_avgs, exp_avg_sqs, steps)."""
    call_step_op(
        torch.ops.neptune_ext.neptune_step_, params, grads, exp_avgs, exp_avg_sqs, steps,
        lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps, clip=clip,
        cautious=cautious, maximize=maximize, grad_scale=grad_scale, found_inf=found_inf,
    )


def neptune_step_simt_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    steps: Sequence[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
    clip: float,
    cautious: bool,
    maximize: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    schedule: int = 0,
) -> None:
    """Testing aid: the CUDA operator's whole path on CPU tensors.

    The same validation, plan and argument table as the CUDA backend, then the unchanged
    CUDA kernels run by a SIMT emulator on the CPU (every CUDA thread a fiber). `schedule`
    orders blocks and threads: 0 ascending, 1 descending, k >= 2 random (seed k); correct
    kernels give bitwise the same result under every schedule. Kernel bugs the emulator
    detects (a shuffle or barrier that not every thread reaches, a misaligned vector
    access) raise RuntimeError naming the file and line. Slow: for tests, not training.
    """
    call_step_op(
        torch.ops.neptune_ext._neptune_step_simt_, params, grads, exp_avgs, exp_avg_sqs, steps,
        lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps, clip=clip,
        cautious=cautious, maximize=maximize, grad_scale=grad_scale, found_inf=found_inf, schedule=schedule,
    )


def _check_devices(params, grads, exp_avgs, exp_avg_sqs, steps, lr, grad_scale, found_inf) -> None:
    """The devices of a call that reaches the fake (meta) implementation: the device
    rules of csrc/args.h, as the kernels would refuse them. One meta tensor sends a whole
    call here, so a meta tensor among CPU or CUDA ones is refused here, not computed as
    nothing."""
    lists = (params, grads, exp_avgs, exp_avg_sqs, steps)
    if any(len(lst) != len(params) for lst in lists):
        raise RuntimeError("neptune_step_: params, grads, exp_avgs, exp_avg_sqs and steps must have the same length, "
                           f"got {', '.join(str(len(lst)) for lst in lists)}")
    for i, tensors in enumerate(zip(*lists)):
        devices = [t.device for t in tensors]
        if any(d != devices[0] for d in devices):
            raise RuntimeError(f"neptune_step_: params[{i}], its grad, exp_avg, exp_avg_sq and step must all be on one "
                               f"device; got {', '.join(map(str, devices))}")
        if devices[0] != params[0].device:
            raise RuntimeError(f"neptune_step_: all params must be on one device; params[0] is on {params[0].device} "
                               f"and params[{i}] on {devices[0]}; call once per device")
    device = params[0].device if params else None
    for name, t in (("grad_scale", grad_scale), ("found_inf", found_inf)):
        if t is not None and device is not None and t.device != device:
            raise RuntimeError(f"neptune_step_: {name} must be on the params' device {device}, got {t.device}")
    if isinstance(lr, Tensor) and device is not None and lr.device not in (device, torch.device("cpu")):
        raise RuntimeError(f"neptune_step_: lr must be a float, or a tensor on the CPU or on the params' device "
                           f"{device}, got {lr.device}")


if HAS_CPU_EXT:
    # In-place ops with no outputs: their fake (meta) implementations compute nothing.
    def _neptune_step_fake(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, weight_decay, eps,
                           clip, cautious, maximize, grad_scale=None, found_inf=None, schedule=0):
        _check_devices(params, grads, exp_avgs, exp_avg_sqs, steps, lr, grad_scale, found_inf)

    for _name in (OP_NAME, OP_NAME + ".tensor_lr", "neptune_ext::_neptune_step_simt_",
                  "neptune_ext::_neptune_step_simt_.tensor_lr"):
        torch.library.register_fake(_name)(_neptune_step_fake)


def require_kernel() -> bool:
    return os.environ.get(REQUIRE_KERNEL_ENV, "").strip().lower() in ("1", "true", "yes", "on")
