"""Calls the operator with a bad argument list on one backend; prints how it fails."""
import sys, torch, neptune_ext
which = sys.argv[1]
dev = "cuda" if which.startswith("cuda") else "cpu"
L = [[torch.randn(4, 5, device=dev)] * 1 for _ in range(4)] + [[torch.zeros((), device=dev)]]
L = [[torch.randn(4, 5, device=dev)], [torch.randn(4, 5, device=dev)], [torch.zeros(4, 5, device=dev)],
     [torch.zeros(4, 5, device=dev)], [torch.zeros((), device=dev)]]
hyper = dict(lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.01, eps=1e-8, clip=0.1, cautious=True, maximize=False)
if which.endswith("hyper"):
    hyper["lr"] = -1.0
else:
    L[1] = []
op = neptune_ext.ops.neptune_step_simt_ if which == "simt" else neptune_ext.neptune_step_
print(which, "calling", flush=True)
try:
    op(*L, **hyper)
    print(which, "no error?!")
except Exception as e:
    print(which, "raised", type(e).__name__, str(e).splitlines()[0][:150])
