import time, itertools, torch, triton
import triton.language as tl
import torch.nn.functional as F
from truffula.kernels import triton_kernels as tk
def timeit(fn, n=20, reps=20):
    fn(); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps): fn()
    for _ in range(3): g.replay()
    torch.cuda.synchronize(); s = time.perf_counter()
    for _ in range(n): g.replay()
    torch.cuda.synchronize(); return (time.perf_counter() - s) / n / reps * 1e6

@triton.jit
def gemv(x_ptr, w_ptr, y_ptr, N, K, stride_w, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ACT: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        xv = tl.load(x_ptr + k).to(tl.float32)
        if ACT:
            u = tl.load(x_ptr + K + k).to(tl.float32)
            xv = (xv / (1.0 + tl.exp(-xv)) * u).to(tl.bfloat16).to(tl.float32)
        w = tl.load(w_ptr + n[:, None].to(tl.int64) * stride_w + k[None, :])
        acc += w.to(tl.float32) * xv[None, :]
    tl.store(y_ptr + n, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty))

bw = 4.2e12
shapes = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336), "lm_head": (128256, 4096)}
best_cfg = {}
for name, (N, K) in shapes.items():
    W = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    y = torch.empty(N, device="cuda", dtype=torch.bfloat16)
    ideal = N * K * 2 / bw * 1e6
    tc = timeit(lambda: F.linear(x, W))
    res = []
    for bn, bk, w, st in itertools.product((4, 8, 16), (256, 512, 1024), (4, 8), (3, 4, 6)):
        if bn * bk > 8192: continue
        try:
            t = timeit(lambda: gemv[(N // bn,)](x, W, y, N, K, W.stride(0), BLOCK_N=bn, BLOCK_K=bk, ACT=False, num_warps=w, num_stages=st))
        except Exception as e:
            continue
        res.append((t, bn, bk, w, st))
    res.sort()
    t, bn, bk, w, st = res[0]
    best_cfg[name] = (bn, bk, w, st)
    gemv[(N // bn,)](x, W, y, N, K, W.stride(0), BLOCK_N=bn, BLOCK_K=bk, ACT=False, num_warps=w, num_stages=st)
    err = (y.float() - F.linear(x, W).float()[0]).abs().max().item()
    print(f"{name}: cublas {tc:.1f} us ({ideal / tc * 100:.0f}% of 4.2TB/s), triton best {t:.1f} us ({ideal / t * 100:.0f}%) bn{bn} bk{bk} w{w} s{st}; err {err:.3f}; next:",
          [f"{r[0]:.1f} bn{r[1]} bk{r[2]} w{r[3]} s{r[4]}" for r in res[1:4]], flush=True)
# fused act_mul + down
N, K = 4096, 14336
W = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
gu = torch.randn(1, 2 * K, device="cuda", dtype=torch.bfloat16)
y = torch.empty(N, device="cuda", dtype=torch.bfloat16)
bn, bk, w, st = best_cfg["down"]
t_unf = timeit(lambda: F.linear(tk.act_and_mul(gu, False), W))
t_f = timeit(lambda: gemv[(N // bn,)](gu, W, y, N, K, W.stride(0), BLOCK_N=bn, BLOCK_K=bk, ACT=True, num_warps=w, num_stages=st))
ref = F.linear(tk.act_and_mul(gu, False), W).float()[0]
print(f"act_mul+down: unfused (triton act + cublas) {t_unf:.1f} us, fused triton {t_f:.1f} us, err {(y.float() - ref).abs().max().item():.3f} (scale {ref.abs().max().item():.1f})")
from truffula.kernels import triton_lora as tlr
T = 64
ts = torch.arange(64, device="cuda")
for name, outs in {"qkv": [4096, 1024, 1024], "o": [4096], "gate_up": [14336, 14336], "down": [4096]}.items():
    bt = torch.randn(64, 16, sum(outs), device="cuda", dtype=torch.bfloat16) * 0.02
    yy = torch.zeros(T, sum(outs), device="cuda", dtype=torch.bfloat16)
    tmp = torch.randn(T, len(outs), 16, device="cuda", dtype=torch.float32)
    offs = [0]
    for o in outs[:-1]: offs.append(offs[-1] + o)
    out = []
    for bo, w in itertools.product((128, 256, 512, 1024, 2048), (1, 2, 4, 8)):
        tlr.BLOCK_O_BGMV = bo
        def f(w=w):
            o2 = [*offs[1:], 1 << 62, 1 << 62][:2]
            tlr._bgmv_expand_kernel[(T, triton.cdiv(bt.shape[2], bo))](yy, tmp, bt, ts, bt.shape[2], yy.stride(0), bt.stride(0), bt.stride(1), o2[0], o2[1],
                N_SHARDS=len(outs), RANK=16, RANK_PAD=16, BLOCK_O=bo, num_warps=w)
        out.append((timeit(f), bo, w))
    out.sort()
    ideal = bt.numel() * 2 / bw * 1e6
    print(f"bgmv expand {name}: ideal {ideal:.1f}; best", [f"{t:.1f} bo{bo} w{w}" for t, bo, w in out[:4]], "current(1024,4):", [f"{t:.1f}" for t, bo, w in out if (bo, w) == (1024, 4)])
