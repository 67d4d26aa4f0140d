"""A small Neptune step on the GPU for compute-sanitizer (memcheck, racecheck, initcheck).

Covers every kernel path: warp units (aligned and misaligned rows), block units, chunked
long units (all three roles), zero-size tensors, fp32/bf16/fp16, found_inf both ways and
a tensor lr. Prints OK and exits 0 when the steps ran; the sanitizer reports its findings.
"""
import sys

import torch

import neptune_ext

if not torch.cuda.is_available() or not neptune_ext.has_kernel("cuda"):
    print("sanitizer_step: no GPU or no CUDA kernel:", neptune_ext.ops.describe_build())
    sys.exit(2)

dev = "cuda"
shapes = [(), (7,), (0,), (1031,), (5, 1031), (64, 3, 3, 3), (3, 5000), (2, 16385), (40000,)]
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    p = [torch.randn(s, device=dev).to(dtype) for s in shapes]
    g = [torch.randn(s, device=dev).to(dtype) for s in shapes]
    m = [torch.zeros(s, device=dev) for s in shapes]
    v = [torch.zeros(s, device=dev) for s in shapes]
    st = [torch.zeros((), device=dev) for _ in shapes]
    for clip, cautious in ((0.1, True), (0.0, False), (0.1, False), (0.0, True)):
        for found in (0.0, 1.0):
            neptune_ext.neptune_step_(
                p, g, m, v, st, lr=torch.tensor(1e-3, device=dev), beta1=0.9, beta2=0.999, weight_decay=0.01,
                eps=1e-8, clip=clip, cautious=cautious, maximize=False,
                grad_scale=torch.tensor(2.0, device=dev), found_inf=torch.tensor(found, device=dev))
torch.cuda.synchronize()
print("sanitizer_step: OK")
