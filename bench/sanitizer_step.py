"""A small Neptune step on the GPU for compute-sanitizer (memcheck, racecheck, initcheck).

Covers every kernel path: warp units (aligned and misaligned rows), block units, chunked
long units (all three roles), zero-size tensors, fp32/bf16/fp16, found_inf both ways and
a tensor lr, with float32 and with bf16 state; then views at element offsets into their buffers (co-aligned: scalar head and
16-byte vectors; not co-aligned: the all-scalar fallback) with the three dtypes in one list.
Prints OK and exits 0 when the steps ran; the sanitizer reports its findings.

Every input is made on the host and copied to the GPU (`on_dev`): the sanitizer runs see
only our kernels (--kernel-name), so memory that one of torch's kernels wrote (torch.zeros,
torch.randn or .to(dtype) on the GPU) looks uninitialized to initcheck, while a host copy
is an API call it tracks. (The first initcheck run on an H200 reported exactly that: the
step counters, made by torch.zeros on the GPU.)
"""
import sys

import torch

import neptune_ext

dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"  # `cpu`: a dry run of this script
if dev == "cuda" and (not torch.cuda.is_available() or not neptune_ext.has_kernel("cuda")):
    print("sanitizer_step: no GPU or no CUDA kernel:", neptune_ext.ops.describe_build())
    sys.exit(2)
shapes = [(), (7,), (0,), (1031,), (5, 1031), (64, 3, 3, 3), (3, 5000), (2, 16385), (40000,)]


def on_dev(t):
    """t (made on the host, in its final dtype) copied to the GPU: see the docstring."""
    return t.to(dev)


for dtype, state_dtype in [(dt, sdt) for sdt in (torch.float32, torch.bfloat16)
                           for dt in (torch.float32, torch.bfloat16, torch.float16)]:
    p = [on_dev(torch.randn(s).to(dtype)) for s in shapes]
    g = [on_dev(torch.randn(s).to(dtype)) for s in shapes]
    m = [on_dev(torch.zeros(s, dtype=state_dtype)) for s in shapes]
    v = [on_dev(torch.zeros(s, dtype=state_dtype)) for s in shapes]
    st = [on_dev(torch.zeros(())) for _ in shapes]
    for clip, cautious in ((0.1, True), (0.0, False), (0.1, False), (0.0, True)):
        for found in (0.0, 1.0):
            neptune_ext.neptune_step_(
                p, g, m, v, st, lr=on_dev(torch.tensor(1e-3)), beta1=0.9, beta2=0.999, weight_decay=0.01,
                eps=1e-8, clip=clip, cautious=cautious, maximize=False,
                grad_scale=on_dev(torch.tensor(2.0)), found_inf=on_dev(torch.tensor(found)))


def at_offset(t, off):
    """t as a view `off` elements into a buffer of its own, on the GPU."""
    buf = torch.zeros(t.numel() + off, dtype=t.dtype)
    buf[off:].copy_(t.reshape(-1))
    return on_dev(buf)[off:].view(t.shape)


for offsets, state_dtype in (((1, 1, 1, 1), torch.float32), ((1, 1, 0, 0), torch.float32),
                             ((0, 3, 0, 0), torch.float32), ((1, 1, 1, 1), torch.bfloat16),
                             ((4, 4, 0, 0), torch.bfloat16), ((0, 0, 1, 1), torch.bfloat16)):
    lists = [[], [], [], [], []]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for s in shapes:
            t = [torch.randn(s).to(dtype), torch.randn(s).to(dtype),
                 torch.zeros(s, dtype=state_dtype), torch.zeros(s, dtype=state_dtype)]
            for k in range(4):
                lists[k].append(at_offset(t[k], offsets[k]))
            lists[4].append(on_dev(torch.zeros(())))
    for _ in range(2):  # step 2: nonzero moments
        neptune_ext.neptune_step_(*lists, lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.01, eps=1e-8, clip=0.1,
                                  cautious=True, maximize=False)
if dev == "cuda":
    torch.cuda.synchronize()
print("sanitizer_step: OK")
