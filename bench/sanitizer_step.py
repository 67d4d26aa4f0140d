"""A small Neptune step on the GPU for compute-sanitizer (memcheck, racecheck, initcheck).

Covers every kernel path: warp units (aligned and misaligned rows), block units, chunked
long units (all three roles), zero-size tensors, fp32/bf16/fp16, found_inf both ways and
a tensor lr, with float32 and with bf16 state; then views at element offsets into their buffers (co-aligned: scalar head and
16-byte vectors; not co-aligned: the all-scalar fallback) with the three dtypes in one list.
Prints OK and exits 0 when the steps ran; the sanitizer reports its findings.
"""
import sys

import torch

import neptune_ext

dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"  # `cpu`: a dry run of this script
if dev == "cuda" and (not torch.cuda.is_available() or not neptune_ext.has_kernel("cuda")):
    print("sanitizer_step: no GPU or no CUDA kernel:", neptune_ext.ops.describe_build())
    sys.exit(2)
shapes = [(), (7,), (0,), (1031,), (5, 1031), (64, 3, 3, 3), (3, 5000), (2, 16385), (40000,)]
for dtype, state_dtype in [(dt, sdt) for sdt in (torch.float32, torch.bfloat16)
                           for dt in (torch.float32, torch.bfloat16, torch.float16)]:
    p = [torch.randn(s, device=dev).to(dtype) for s in shapes]
    g = [torch.randn(s, device=dev).to(dtype) for s in shapes]
    m = [torch.zeros(s, device=dev, dtype=state_dtype) for s in shapes]
    v = [torch.zeros(s, device=dev, dtype=state_dtype) for s in shapes]
    st = [torch.zeros((), device=dev) for _ in shapes]
    for clip, cautious in ((0.1, True), (0.0, False), (0.1, False), (0.0, True)):
        for found in (0.0, 1.0):
            neptune_ext.neptune_step_(
                p, g, m, v, st, lr=torch.tensor(1e-3, device=dev), beta1=0.9, beta2=0.999, weight_decay=0.01,
                eps=1e-8, clip=clip, cautious=cautious, maximize=False,
                grad_scale=torch.tensor(2.0, device=dev), found_inf=torch.tensor(found, device=dev))


def at_offset(t, off):
    buf = torch.zeros(t.numel() + off, dtype=t.dtype, device=dev)
    v = buf[off:].view(t.shape)
    v.copy_(t)
    return v


for offsets, state_dtype in (((1, 1, 1, 1), torch.float32), ((1, 1, 0, 0), torch.float32),
                             ((0, 3, 0, 0), torch.float32), ((1, 1, 1, 1), torch.bfloat16),
                             ((4, 4, 0, 0), torch.bfloat16), ((0, 0, 1, 1), torch.bfloat16)):
    lists = [[], [], [], [], []]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for s in shapes:
            t = [torch.randn(s, device=dev).to(dtype), torch.randn(s, device=dev).to(dtype),
                 torch.zeros(s, device=dev, dtype=state_dtype), torch.zeros(s, device=dev, dtype=state_dtype)]
            for k in range(4):
                lists[k].append(at_offset(t[k], offsets[k]))
            lists[4].append(torch.zeros((), device=dev))
    for _ in range(2):  # step 2: nonzero moments
        neptune_ext.neptune_step_(*lists, lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.01, eps=1e-8, clip=0.1,
                                  cautious=True, maximize=False)
if dev == "cuda":
    torch.cuda.synchronize()
print("sanitizer_step: OK")
