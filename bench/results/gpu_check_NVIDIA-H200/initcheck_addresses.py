"""One sanitizer-step call, printing the addresses of every tensor it reads (for initcheck)."""
import sys, torch, neptune_ext
mode = sys.argv[1]
dev = "cuda"
shapes = [(), (7,), (0,), (1031,), (5, 1031), (64, 3, 3, 3), (3, 5000), (2, 16385), (40000,)]
p = [torch.randn(s, device=dev) for s in shapes]
g = [torch.randn(s, device=dev) for s in shapes]
m = [torch.zeros(s, device=dev) for s in shapes]
v = [torch.zeros(s, device=dev) for s in shapes]
st = [torch.zeros((), device=dev) for _ in shapes]
mk = (lambda x: torch.tensor(x, device=dev)) if mode == "tensor" else (lambda x: torch.full((), x, device=dev))
lr, gs, fi = mk(1e-3), mk(2.0), mk(0.0)
for i in range(len(shapes)):
    print(i, shapes[i], "step", hex(st[i].data_ptr()), "w", hex(p[i].data_ptr()), "g", hex(g[i].data_ptr()),
          "m", hex(m[i].data_ptr()), "v", hex(v[i].data_ptr()))
print("lr", hex(lr.data_ptr()), "grad_scale", hex(gs.data_ptr()), "found_inf", hex(fi.data_ptr()), flush=True)
torch.cuda.synchronize()
kw = dict(beta1=0.9, beta2=0.999, weight_decay=0.01, eps=1e-8, clip=0.1, cautious=True, maximize=False)
if mode == "float":
    neptune_ext.neptune_step_(p, g, m, v, st, lr=1e-3, **kw)
else:
    neptune_ext.neptune_step_(p, g, m, v, st, lr=lr, grad_scale=gs, found_inf=fi, **kw)
torch.cuda.synchronize()
print("init.py", mode, "done", flush=True)
