"""The whole optimisation step of the toy study: forward, hybrid loss, backward, all-reduce, AdamW, EMA.

`make_train_step` returns the fastest correct step for the model and device:
- CPU, DiT with few tokens (the toy): a hand-written forward and backward of the DiT (`DiTFunction`) whose
  elementwise work runs in a few fused C loops (`_C_SOURCE`, built once with the system C compiler and
  cached). At 4 tokens per sample a DiT step is not bound by arithmetic but by passes over memory:
  tanh-GELU, attention over 4 tokens and the adaLN modulation are each several passes in eager PyTorch and
  one pass here, while the matmuls stay with MKL. The loss is still `diffusion.training_losses`, so every
  diffusion configuration gives the loss of the plain path. Without a C compiler the same maths runs as
  PyTorch ops (slower, same numbers, a warning).
- CUDA: the plain step captured in a CUDA graph (forward, backward, AdamW with capturable=True, EMA) and
  replayed with the caller's tensors copied into static buffers.
- Anything else: the plain step (model forward + autograd), also the reference of the tests.
"""

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

MAX_FAST_TOKENS = 64  # the C attention keeps one sample's scores on the stack; more tokens: plain path
NORM_CODES = {"none": 0, "layernorm": 1, "rmsnorm": 2, "dyt": 3}

# Rows are tokens (M = N * T), columns features. Per-sample adaLN vectors live in one (N, K) buffer, so
# they are passed as a pointer plus a row stride `ms`. Column sums (bias gradients) are accumulated per
# thread in double and added in thread order, so results do not depend on scheduling.
_C_SOURCE = r"""
#include <math.h>
#include <stdlib.h>
#include <omp.h>
typedef long i64;
/* Kernel arguments never overlap (in-place updates use one pointer), which lets loops vectorise. */
typedef float *restrict fp;
typedef const float *restrict cfp;
#define GELU_A 0.044715f
#define GELU_C 0.7978845608028654f  /* sqrt(2 / pi) */
/* -2 z of tanh-GELU, capped: under -ffast-math 1 / (1 + inf) may become NaN, and exp(80) is already
   large enough that sigmoid(2 z) rounds to its limit (exploding activations of norm-free models reach
   this range, and must give what PyTorch gives). */
#define GELU_EXP_ARG(v) fminf(-2.f * GELU_C * ((v) + GELU_A * (v) * (v) * (v)), 80.f)

/* Thread count of every parallel region, set from torch.get_num_threads(): OpenMP's own default is per
   calling thread, and a team larger than torch's would spin against MKL's threads. */
static int nth = 1;
void set_num_threads(int n) { nth = n > 0 ? n : 1; }

static double *partials(i64 cols) { return calloc((size_t)nth * cols, sizeof(double)); }
static void finish(double *part, i64 cols, float *out) {
    for (i64 c = 0; c < cols; c++) {
        double s = 0;
        for (int t = 0; t < nth; t++) s += part[t * cols + c];
        out[c] = (float)s;
    }
    free(part);
}

/* kind: 0 none, 1 layernorm, 2 rmsnorm, 3 dyt. out = norm(h) * (1 + scale) + shift */
void norm_mod_fwd(cfp h, i64 N, int T, int D, int kind, float eps, float alpha,
                  cfp shift, cfp scale, i64 ms, fp nrm, fp out, fp rstd) {
    #pragma omp parallel for schedule(static) num_threads(nth)
    for (i64 n = 0; n < N; n++) {
        const float *sh = shift + n * ms, *sc = scale + n * ms;
        for (int t = 0; t < T; t++) {
            i64 row = n * T + t;
            const float *x = h + row * D;
            float *o = out + row * D, *y = kind ? nrm + row * D : 0;
            if (kind == 1) {
                float mean = 0.f, var = 0.f;
                for (int c = 0; c < D; c++) mean += x[c];
                mean /= D;
                for (int c = 0; c < D; c++) { float u = x[c] - mean; var += u * u; }
                float r = rstd[row] = 1.f / sqrtf(var / D + eps);
                for (int c = 0; c < D; c++) y[c] = (x[c] - mean) * r;
            } else if (kind == 2) {
                float ss = 0.f;
                for (int c = 0; c < D; c++) ss += x[c] * x[c];
                float r = rstd[row] = 1.f / sqrtf(ss / D + eps);
                for (int c = 0; c < D; c++) y[c] = x[c] * r;
            } else if (kind == 3) {
                for (int c = 0; c < D; c++) y[c] = tanhf(alpha * x[c]);
            }
            const float *v = kind ? y : x;
            for (int c = 0; c < D; c++) o[c] = v[c] * (1.f + sc[c]) + sh[c];
        }
    }
}

/* Gradient of norm_mod_fwd. nrm: the normalised input (kind 0: the input itself); h: the input (dyt only).
   Writes dshift/dscale (stride ms), dx = dres + d(input); dalpha gets the dyt alpha gradient. */
void norm_mod_bwd(cfp dm, cfp nrm, cfp h, cfp rstd, i64 N, int T, int D,
                  int kind, float alpha, cfp scale, i64 ms, fp dshift, fp dscale,
                  cfp dres, fp dx, fp dalpha) {
    double *part = partials(1);
    #pragma omp parallel num_threads(nth)
    {
        double *acc = part + omp_get_thread_num();
        float dn[D], dsh[D], dsc[D];
        #pragma omp for schedule(static)
        for (i64 n = 0; n < N; n++) {
            const float *sc = scale + n * ms;
            for (int c = 0; c < D; c++) { dsh[c] = 0.f; dsc[c] = 0.f; }
            for (int t = 0; t < T; t++) {
                i64 row = n * T + t;
                const float *g = dm + row * D, *y = nrm + row * D;
                float *o = dx + row * D;
                float s1 = 0.f, s2 = 0.f;
                for (int c = 0; c < D; c++) {
                    dsh[c] += g[c]; dsc[c] += g[c] * y[c];
                    dn[c] = g[c] * (1.f + sc[c]);
                    s1 += dn[c]; s2 += dn[c] * y[c];
                }
                float r = rstd ? rstd[row] : 1.f, m1 = s1 / D, m2 = s2 / D;
                if (kind == 3) {
                    const float *x = h + row * D;
                    double da = 0.0;
                    for (int c = 0; c < D; c++) {
                        float q = 1.f - y[c] * y[c];
                        da += dn[c] * x[c] * q;
                        dn[c] *= alpha * q;
                    }
                    *acc += da;
                } else if (kind == 1) {
                    for (int c = 0; c < D; c++) dn[c] = r * (dn[c] - m1 - y[c] * m2);
                } else if (kind == 2) {
                    for (int c = 0; c < D; c++) dn[c] = r * (dn[c] - y[c] * m2);
                }
                for (int c = 0; c < D; c++) o[c] = dres ? dres[row * D + c] + dn[c] : dn[c];
            }
            for (int c = 0; c < D; c++) { dshift[n * ms + c] = dsh[c]; dscale[n * ms + c] = dsc[c]; }
        }
    }
    if (dalpha) finish(part, 1, dalpha); else free(part);
}

/* x += bias (in place, x is the bias-free matmul output, kept for the backward); y = gelu(x) */
void gelu_fwd(fp x, cfp bias, fp y, i64 rows, i64 cols) {
    #pragma omp parallel for schedule(static) num_threads(nth)
    for (i64 r = 0; r < rows; r++) {
        float *xr = x + r * cols, *yr = y + r * cols;
        #pragma omp simd
        for (i64 c = 0; c < cols; c++) {
            /* 0.5 v (1 + tanh z) = v sigmoid(2 z): one exp, which vectorises well */
            float v = xr[c] + bias[c];
            xr[c] = v;
            yr[c] = v / (1.f + expf(GELU_EXP_ARG(v)));
        }
    }
}

/* a += bias (in place); out = h + gate * a, gate per sample (row stride gs) */
void gate_fwd(cfp h, fp a, cfp bias, cfp gate, i64 gs, fp out,
              i64 N, int T, int D) {
    #pragma omp parallel for schedule(static) num_threads(nth)
    for (i64 n = 0; n < N; n++) {
        const float *gt = gate + n * gs;
        for (int t = 0; t < T; t++) {
            i64 row = (n * T + t) * D;
            for (int c = 0; c < D; c++) {
                float v = a[row + c] + bias[c];
                a[row + c] = v;
                out[row + c] = h[row + c] + gt[c] * v;
            }
        }
    }
}

/* dx = g * gelu'(x); dbias = column sums of dx */
void gelu_bwd(cfp g, cfp x, fp dx, fp dbias, i64 rows, i64 cols) {
    double *part = partials(cols);
    #pragma omp parallel num_threads(nth)
    {
        double *acc = part + omp_get_thread_num() * cols;
        #pragma omp for schedule(static)
        for (i64 r = 0; r < rows; r++) {
            const float *gr = g + r * cols, *xr = x + r * cols;
            float *o = dx + r * cols;
            #pragma omp simd
            for (i64 c = 0; c < cols; c++) {
                float v = xr[c], s = 1.f / (1.f + expf(GELU_EXP_ARG(v)));
                float d = s + 2.f * v * s * (1.f - s) * GELU_C * (1.f + 3.f * GELU_A * v * v);
                o[c] = gr[c] * d;
            }
            for (i64 c = 0; c < cols; c++) acc[c] += o[c];
        }
    }
    finish(part, cols, dbias);
}

/* qkv (N, T, 3, H, d) += bias (in place) -> out (N, T, H, d), probs (N, H, T, T) */
void attn_fwd(fp qkv, cfp bias, fp out, fp probs, i64 N, int T, int H, int hd, float scale) {
    int D = H * hd, S = H * T * T;
    #pragma omp parallel for schedule(static) num_threads(nth)
    for (i64 n = 0; n < N; n++) {
        float *base = qkv + n * T * 3 * D, *p = probs + n * S;
        for (int t = 0; t < T; t++)
            for (int c = 0; c < 3 * D; c++) base[t * 3 * D + c] += bias[c];
        for (int h = 0; h < H; h++)
            for (int i = 0; i < T; i++) {
                const float *q = base + i * 3 * D + h * hd;
                for (int j = 0; j < T; j++) {
                    const float *k = base + j * 3 * D + D + h * hd;
                    float s = 0.f;
                    for (int e = 0; e < hd; e++) s += q[e] * k[e];
                    p[(h * T + i) * T + j] = s * scale;
                }
            }
        /* Row maxima first (no infinities: -ffast-math assumes there are none), then one vectorised exp
           over the sample's H T T scores. */
        for (int r = 0; r < H * T; r++) {
            float mx = p[r * T];
            for (int j = 1; j < T; j++) mx = p[r * T + j] > mx ? p[r * T + j] : mx;
            for (int j = 0; j < T; j++) p[r * T + j] -= mx;
        }
        for (int e = 0; e < S; e++) p[e] = expf(p[e]);
        for (int r = 0; r < H * T; r++) {
            float sum = 0.f;
            for (int j = 0; j < T; j++) sum += p[r * T + j];
            for (int j = 0; j < T; j++) p[r * T + j] /= sum;
        }
        for (int h = 0; h < H; h++)
            for (int i = 0; i < T; i++) {
                float *o = out + (n * T + i) * D + h * hd;
                const float *w = p + (h * T + i) * T;
                for (int e = 0; e < hd; e++) o[e] = 0.f;
                for (int j = 0; j < T; j++) {
                    const float *v = base + j * 3 * D + 2 * D + h * hd;
                    for (int e = 0; e < hd; e++) o[e] += w[j] * v[e];
                }
            }
    }
}

/* Gradient of attn_fwd: dqkv (N, T, 3, H, d) and its column sums dbias (3 D) */
void attn_bwd(cfp dout, cfp qkv, cfp probs, fp dqkv, fp dbias,
              i64 N, int T, int H, int hd, float scale) {
    int D = H * hd;
    double *part = partials(3 * D);
    #pragma omp parallel num_threads(nth)
    {
        double *acc = part + omp_get_thread_num() * 3 * D;
        float dp[T];
        #pragma omp for schedule(static)
        for (i64 n = 0; n < N; n++) {
            const float *base = qkv + n * T * 3 * D;
            float *dbase = dqkv + n * T * 3 * D;
            for (int e = 0; e < T * 3 * D; e++) dbase[e] = 0.f;
            for (int h = 0; h < H; h++) {
                const float *p = probs + (n * H + h) * T * T;
                for (int i = 0; i < T; i++) {
                    const float *go = dout + (n * T + i) * D + h * hd, *q = base + i * 3 * D + h * hd;
                    float *dq = dbase + i * 3 * D + h * hd;
                    float s = 0.f;
                    for (int j = 0; j < T; j++) {
                        const float *v = base + j * 3 * D + 2 * D + h * hd;
                        float *dv = dbase + j * 3 * D + 2 * D + h * hd;
                        float w = p[i * T + j], t = 0.f;
                        for (int e = 0; e < hd; e++) { t += go[e] * v[e]; dv[e] += w * go[e]; }
                        dp[j] = t; s += w * t;
                    }
                    for (int j = 0; j < T; j++) {
                        float ds = p[i * T + j] * (dp[j] - s) * scale;
                        const float *k = base + j * 3 * D + D + h * hd;
                        float *dk = dbase + j * 3 * D + D + h * hd;
                        for (int e = 0; e < hd; e++) { dq[e] += ds * k[e]; dk[e] += ds * q[e]; }
                    }
                }
            }
            for (int t = 0; t < T; t++)
                for (int c = 0; c < 3 * D; c++) acc[c] += dbase[t * 3 * D + c];
        }
    }
    finish(part, 3 * D, dbias);
}

/* h_out = h + gate * a: da = dh * gate, dgate = sum over tokens of dh * a (stride gs),
   dbias = column sums of da */
void gate_bwd(cfp dh, cfp a, cfp gate, i64 gs, fp da, fp dgate,
              fp dbias, i64 N, int T, int D) {
    double *part = partials(D);
    #pragma omp parallel num_threads(nth)
    {
        double *acc = part + omp_get_thread_num() * D;
        float s[D];
        #pragma omp for schedule(static)
        for (i64 n = 0; n < N; n++) {
            const float *gt = gate + n * gs;
            for (int c = 0; c < D; c++) s[c] = 0.f;
            for (int t = 0; t < T; t++) {
                i64 row = (n * T + t) * D;
                for (int c = 0; c < D; c++) {
                    float g = dh[row + c];
                    s[c] += g * a[row + c];
                    da[row + c] = g * gt[c];
                    acc[c] += da[row + c];
                }
            }
            for (int c = 0; c < D; c++) dgate[n * gs + c] = s[c];
        }
    }
    finish(part, D, dbias);
}
"""


# ----------------------------------------------------------------------------- building the C kernels

def _cache_dir():
    """Where built kernels are kept (one file per source/compiler/CPU combination)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "dit-norm-study"


_LIB = None  # the loaded library, False once building failed in this process


def load_c_kernels():
    """The fused CPU kernels as a ctypes library, or None (with a warning) when they cannot be built."""
    global _LIB
    if _LIB is None:
        try:
            _LIB = _build()
        except (OSError, subprocess.SubprocessError) as err:
            warnings.warn(f"fused CPU kernels unavailable ({err}); using the slower PyTorch fallback",
                          stacklevel=2)
            _LIB = False
    return _LIB or None


def _build():
    """Compile _C_SOURCE with the system C compiler (-march=native, OpenMP) unless a cached build exists."""
    cc = os.environ.get("CC", "cc")
    flags = ["-O3", "-march=native", "-mprefer-vector-width=512", "-ffast-math", "-fopenmp", "-shared",
             "-fPIC"]
    cpu = platform.processor() + platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        cpu += next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "")
    key = hashlib.sha256("\0".join([_C_SOURCE, cc, *flags, cpu]).encode()).hexdigest()[:16]
    path = _cache_dir() / f"fused_dit_{key}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            src, out = Path(tmp) / "fused_dit.c", Path(tmp) / "fused_dit.so"
            src.write_text(_C_SOURCE)
            done = subprocess.run([cc, *flags, str(src), "-o", str(out), "-lm"], capture_output=True,
                                  text=True, timeout=120)
            if done.returncode:
                raise OSError(f"{cc} failed: {done.stderr.strip()[-300:]}")
            # Same directory as the target, so the final rename is atomic when ranks build at once.
            fd, staged = tempfile.mkstemp(dir=path.parent, suffix=".so")
            os.close(fd)
            Path(staged).write_bytes(out.read_bytes())
            os.replace(staged, path)
    # torch is loaded first, so the library's OpenMP calls bind to torch's libgomp and share its threads.
    lib = ctypes.CDLL(str(path))
    P, L, I, Fl = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_float
    lib.set_num_threads.argtypes = [I]
    lib.norm_mod_fwd.argtypes = [P, L, I, I, I, Fl, Fl, P, P, L, P, P, P]
    lib.norm_mod_bwd.argtypes = [P, P, P, P, L, I, I, I, Fl, P, L, P, P, P, P, P]
    lib.gelu_fwd.argtypes = [P, P, P, L, L]
    lib.gate_fwd.argtypes = [P, P, P, P, L, P, L, I, I]
    lib.gelu_bwd.argtypes = [P, P, P, P, L, L]
    lib.attn_fwd.argtypes = [P, P, P, P, L, I, I, I, Fl]
    lib.attn_bwd.argtypes = [P, P, P, P, P, L, I, I, I, Fl]
    lib.gate_bwd.argtypes = [P, P, P, L, P, P, P, L, I, I]
    return lib


def _ptr(tensor):
    """Address of a tensor's first element (None for a missing optional argument)."""
    return None if tensor is None else tensor.data_ptr()


class CKernels:
    """The fused loops of _C_SOURCE on torch tensors (float32, CPU; (N, D) views may have a row stride)."""

    name = "fused-cpu"

    def __init__(self, lib):
        self.lib = lib
        self.threads = None

    def _sync_threads(self):
        """Give the C loops torch's current intra-op thread count."""
        if self.threads != torch.get_num_threads():
            self.threads = torch.get_num_threads()
            self.lib.set_num_threads(self.threads)

    def norm_mod_fwd(self, h, N, T, kind, eps, alpha, shift, scale):
        """(normalised h or h itself for kind 0, norm(h) * (1 + scale) + shift, rstd per row or None)."""
        self._sync_threads()
        M, D = h.shape
        nrm = None if kind == 0 else torch.empty_like(h)
        out = torch.empty_like(h)
        rstd = h.new_empty(M) if kind in (1, 2) else None
        self.lib.norm_mod_fwd(_ptr(h), N, T, D, kind, eps, alpha, _ptr(shift), _ptr(scale),
                              _row_stride(shift), _ptr(nrm), _ptr(out), _ptr(rstd))
        return (h if kind == 0 else nrm), out, rstd

    def norm_mod_bwd(self, dm, nrm, h, rstd, N, T, kind, alpha, scale, dshift, dscale, dres):
        """Gradient of norm_mod_fwd; fills dshift/dscale, returns (dres + dh, dalpha or None)."""
        self._sync_threads()
        dx = torch.empty_like(dm)
        dalpha = dm.new_empty(1) if kind == 3 else None
        self.lib.norm_mod_bwd(_ptr(dm), _ptr(nrm), _ptr(h), _ptr(rstd), N, T, dm.shape[1], kind, alpha,
                              _ptr(scale), _row_stride(scale), _ptr(dshift), _ptr(dscale), _ptr(dres),
                              _ptr(dx), _ptr(dalpha))
        return dx, dalpha

    def gelu_fwd(self, x, bias):
        """Adds bias to x in place and returns the tanh-approximated GELU of the result."""
        self._sync_threads()
        y = torch.empty_like(x)
        self.lib.gelu_fwd(_ptr(x), _ptr(bias), _ptr(y), x.shape[0], x.shape[1])
        return y

    def gate_fwd(self, h, a, bias, gate, N, T):
        """Adds bias to a in place and returns h + gate * a."""
        self._sync_threads()
        out = torch.empty_like(h)
        self.lib.gate_fwd(_ptr(h), _ptr(a), _ptr(bias), _ptr(gate), _row_stride(gate), _ptr(out), N, T,
                          h.shape[1])
        return out

    def gelu_bwd(self, g, x):
        """(g * gelu'(x), its column sums)."""
        self._sync_threads()
        dx, db = torch.empty_like(x), x.new_empty(x.shape[1])
        self.lib.gelu_bwd(_ptr(g), _ptr(x), _ptr(dx), _ptr(db), x.shape[0], x.shape[1])
        return dx, db

    def attn_fwd(self, qkv, bias, N, T, H, hd):
        """Adds bias to qkv in place; softmax attention of each sample's T tokens: (out (M, D), probs)."""
        self._sync_threads()
        out, probs = qkv.new_empty(N * T, H * hd), qkv.new_empty(N, H, T, T)
        self.lib.attn_fwd(_ptr(qkv), _ptr(bias), _ptr(out), _ptr(probs), N, T, H, hd, hd ** -0.5)
        return out, probs

    def attn_bwd(self, dout, qkv, probs, N, T, H, hd):
        """(d qkv (M, 3D), its column sums)."""
        self._sync_threads()
        dqkv, db = torch.empty_like(qkv), qkv.new_empty(qkv.shape[1])
        self.lib.attn_bwd(_ptr(dout), _ptr(qkv), _ptr(probs), _ptr(dqkv), _ptr(db), N, T, H, hd, hd ** -0.5)
        return dqkv, db

    def gate_bwd(self, dh, a, gate, dgate, N, T):
        """For h + gate * a: fills dgate, returns (d a, its column sums)."""
        self._sync_threads()
        da, db = torch.empty_like(a), a.new_empty(a.shape[1])
        self.lib.gate_bwd(_ptr(dh), _ptr(a), _ptr(gate), _row_stride(gate), _ptr(da), _ptr(dgate), _ptr(db),
                          N, T, a.shape[1])
        return da, db


def _row_stride(view):
    """Row stride of an (N, D) view with unit column stride; 0 broadcasts one row to every sample."""
    assert view.stride(-1) == 1 and view.dtype == torch.float32
    return 0 if view.shape[0] == 1 else view.stride(0)


class TorchKernels:
    """The same operations as CKernels in PyTorch ops: the fallback, and a second reference in the tests."""

    name = "torch-cpu"

    @staticmethod
    def norm_mod_fwd(h, N, T, kind, eps, alpha, shift, scale):
        D = h.shape[1]
        rstd = None
        if kind == 0:
            nrm = h
        elif kind == 1:
            nrm, _, rstd = torch.native_layer_norm(h, (D,), None, None, eps)
            rstd = rstd.view(-1)
        elif kind == 2:
            rstd = torch.rsqrt(h.square().mean(1) + eps)  # (M,)
            nrm = h * rstd[:, None]
        else:
            nrm = torch.tanh(alpha * h)
        out = torch.addcmul(shift.unsqueeze(1), nrm.view(N, T, D), 1 + scale.unsqueeze(1))  # (N, T, D)
        return nrm, out.view(N * T, D), rstd

    @staticmethod
    def norm_mod_bwd(dm, nrm, h, rstd, N, T, kind, alpha, scale, dshift, dscale, dres):
        D = dm.shape[1]
        dm3 = dm.view(N, T, D)
        dshift.copy_(dm3.sum(1))
        dscale.copy_((dm3 * nrm.view(N, T, D)).sum(1))
        dn = (dm3 * (1 + scale.unsqueeze(1))).view(N * T, D)
        dalpha = None
        if kind == 1:
            dn = rstd[:, None] * (dn - dn.mean(1, keepdim=True) - nrm * (dn * nrm).mean(1, keepdim=True))
        elif kind == 2:
            dn = rstd[:, None] * (dn - nrm * (dn * nrm).mean(1, keepdim=True))
        elif kind == 3:
            q = 1 - nrm.square()
            dalpha = (dn * h * q).sum().view(1)
            dn = dn * alpha * q
        return (dn if dres is None else dres + dn), dalpha

    @staticmethod
    def gelu_fwd(x, bias):
        return F.gelu(x.add_(bias), approximate="tanh")

    @staticmethod
    def gate_fwd(h, a, bias, gate, N, T):
        D = h.shape[1]
        return torch.addcmul(h.view(N, T, D), gate.unsqueeze(1), a.add_(bias).view(N, T, D)).view(N * T, D)

    @staticmethod
    def gelu_bwd(g, x):
        dx = torch.ops.aten.gelu_backward(g, x, approximate="tanh")
        return dx, dx.sum(0)

    @staticmethod
    def attn_fwd(qkv, bias, N, T, H, hd):
        q, k, v = qkv.add_(bias).view(N, T, 3, H, hd).unbind(2)  # each (N, T, H, d)
        probs = (torch.einsum("nihe,njhe->nhij", q, k) * hd ** -0.5).softmax(-1)  # (N, H, T, T)
        out = torch.einsum("nhij,njhe->nihe", probs, v)  # (N, T, H, d)
        return out.reshape(N * T, H * hd), probs.contiguous()

    @staticmethod
    def attn_bwd(dout, qkv, probs, N, T, H, hd):
        q, k, v = qkv.view(N, T, 3, H, hd).unbind(2)
        do = dout.view(N, T, H, hd)
        dp = torch.einsum("nihe,njhe->nhij", do, v)  # (N, H, T, T)
        dv = torch.einsum("nhij,nihe->njhe", probs, do)
        ds = probs * (dp - (probs * dp).sum(-1, keepdim=True)) * hd ** -0.5
        dq = torch.einsum("nhij,njhe->nihe", ds, k)
        dk = torch.einsum("nhij,nihe->njhe", ds, q)
        dqkv = torch.stack([dq, dk, dv], 2).reshape(N * T, 3 * H * hd)  # (M, 3D)
        return dqkv, dqkv.sum(0)

    @staticmethod
    def gate_bwd(dh, a, gate, dgate, N, T):
        D = a.shape[1]
        dgate.copy_((dh * a).view(N, T, D).sum(1))
        da = (dh.view(N, T, D) * gate.unsqueeze(1)).view(N * T, D)
        return da, da.sum(0)


def default_kernels():
    """CKernels when the C compiler works here, else TorchKernels."""
    lib = load_c_kernels()
    return CKernels(lib) if lib is not None else TorchKernels()


# ----------------------------------------------------------------------------- the hand-written DiT

def _norm_code(norm):
    """(kind code, eps) of a norm module the fused path knows, else None."""
    if isinstance(norm, nn.Identity):
        return NORM_CODES["none"], 0.0
    if isinstance(norm, nn.LayerNorm) and not norm.elementwise_affine and len(norm.normalized_shape) == 1:
        return NORM_CODES["layernorm"], float(norm.eps)
    if isinstance(norm, nn.RMSNorm) and norm.weight is None and len(norm.normalized_shape) == 1:
        eps = norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps
        return NORM_CODES["rmsnorm"], float(eps)
    names = [name for name, _ in norm.named_parameters()]
    if type(norm).__name__ == "DynamicTanh" and names == ["alpha"] and norm.alpha.numel() == 1:
        return NORM_CODES["dyt"], 0.0
    return None


class DiTPlan:
    """Shapes and norm kind of a models.DiT for the hand-written path; `reason` says why it cannot run it."""

    def __init__(self, model):
        self.reason = None
        try:
            cfg = model.config
            self.patch, self.in_channels = cfg["patch_size"], cfg["in_channels"]
            self.grid = cfg["input_size"] // self.patch
            self.tokens, self.hidden, self.heads = self.grid ** 2, cfg["hidden_size"], cfg["num_heads"]
            self.head_dim, self.out_channels = self.hidden // self.heads, model.out_channels
            blocks, final = list(model.blocks), model.final_layer
            norms = [m for b in blocks for m in (b.norm1, b.norm2)] + [final.norm_final]
        except (AttributeError, KeyError, TypeError) as err:
            self.reason = f"not a models.DiT ({err})"
            return
        codes = {_norm_code(m) for m in norms}
        params = list(model.parameters())
        if len(codes) != 1 or None in codes:
            self.reason = "unknown or mixed norm modules"
        elif self.tokens > MAX_FAST_TOKENS:
            self.reason = f"{self.tokens} tokens (the fused path handles up to {MAX_FAST_TOKENS})"
        elif any(p.device.type != "cpu" or p.dtype != torch.float32 for p in params):
            self.reason = "parameters not float32 on the CPU"
        elif model.pos_embed.requires_grad:
            self.reason = "trainable pos_embed"
        else:
            self.kind, self.eps = codes.pop()
            self.depth = len(blocks)

    @staticmethod
    def weights(model):
        """DiTFunction's weights in order: embedder, final linear, per-block linears, dyt alphas."""
        out = [model.x_embedder.proj.weight, model.x_embedder.proj.bias,
               model.final_layer.linear.weight, model.final_layer.linear.bias]
        for b in model.blocks:
            out += [b.attn.qkv.weight, b.attn.qkv.bias, b.attn.proj.weight, b.attn.proj.bias,
                    b.mlp.fc1.weight, b.mlp.fc1.bias, b.mlp.fc2.weight, b.mlp.fc2.bias]
        for m in [n for b in model.blocks for n in (b.norm1, b.norm2)] + [model.final_layer.norm_final]:
            out += list(m.parameters())  # dyt alphas; the other kinds have none
        return out

    @staticmethod
    def modulation(model):
        """All adaLN weights and biases stacked: (K, D), (K,) with K = depth * 6D + 2D, blocks then final."""
        lins = [b.adaLN_modulation[-1] for b in model.blocks] + [model.final_layer.adaLN_modulation[-1]]
        return torch.cat([lin.weight for lin in lins]), torch.cat([lin.bias for lin in lins])


def dit_forward(plan, kern, x, mods, pos_embed, weights, saved=None):
    """DiT forward from the adaLN vectors mods (N or 1, K): x (N, C, H, W) -> (N, C_out, H, W).

    Appends to `saved` (when given) what dit_backward needs."""
    N, T, D, H, hd = x.shape[0], plan.tokens, plan.hidden, plan.heads, plan.head_dim
    p, G = plan.patch, plan.grid
    wx, bx, wl, bl = weights[:4]
    alphas = [float(a) for a in weights[4 + 8 * plan.depth:]] or [0.0] * (2 * plan.depth + 1)
    xp = x.reshape(N, plan.in_channels, G, p, G, p).permute(0, 2, 4, 1, 3, 5).reshape(N * T, -1)  # (M, C p p)
    h = torch.addmm(bx, xp, wx.view(D, -1).t())  # (M, D)
    h.view(N, T, D).add_(pos_embed)
    if saved is not None:
        saved.append(xp)
    for i in range(plan.depth):
        wqkv, bqkv, wproj, bproj, w1, b1, w2, b2 = weights[4 + 8 * i: 12 + 8 * i]
        shift1, scale1, gate1, shift2, scale2, gate2 = mods[:, 6 * D * i: 6 * D * (i + 1)].split(D, dim=1)
        n1, m1, r1 = kern.norm_mod_fwd(h, N, T, plan.kind, plan.eps, alphas[2 * i], shift1, scale1)
        # Matmuls without bias: the kernel that reads each result adds the bias in the same pass
        # (addmm would first copy the broadcast bias into the output, one more pass over it).
        qkv = m1 @ wqkv.t()  # (M, 3D)
        o, probs = kern.attn_fwd(qkv, bqkv, N, T, H, hd)  # (M, D), (N, H, T, T)
        a = o @ wproj.t()  # (M, D)
        h1 = kern.gate_fwd(h, a, bproj, gate1, N, T)  # h + gate1 * a
        n2, m2, r2 = kern.norm_mod_fwd(h1, N, T, plan.kind, plan.eps, alphas[2 * i + 1], shift2, scale2)
        f1 = m2 @ w1.t()  # (M, F)
        g1 = kern.gelu_fwd(f1, b1)
        f2 = g1 @ w2.t()  # (M, D)
        if saved is not None:
            saved.append((h, n1, m1, r1, qkv, probs, o, a, h1, n2, m2, r2, f1, g1, f2))
        h = kern.gate_fwd(h1, f2, b2, gate2, N, T)
    shift, scale = mods[:, 6 * D * plan.depth:].split(D, dim=1)
    nf, mf, rf = kern.norm_mod_fwd(h, N, T, plan.kind, plan.eps, alphas[-1], shift, scale)
    out = torch.addmm(bl, mf, wl.t())  # (M, p p C_out)
    if saved is not None:
        saved.append((h, nf, mf, rf))
    out = out.view(N, G, G, p, p, plan.out_channels).permute(0, 5, 1, 3, 2, 4)  # (N, C_out, G, p, G, p)
    return out.reshape(N, plan.out_channels, G * p, G * p)


def dit_backward(plan, kern, grad_out, mods, weights, saved):
    """Gradients of dit_forward: (d mods (N, K), [d weight for weights])."""
    N, T, D, H, hd = grad_out.shape[0], plan.tokens, plan.hidden, plan.heads, plan.head_dim
    p, G = plan.patch, plan.grid
    M, kind = N * T, plan.kind
    wx, bx, wl, bl = weights[:4]
    alpha_params = weights[4 + 8 * plan.depth:]
    alphas = [float(a) for a in alpha_params] or [0.0] * (2 * plan.depth + 1)
    grads = [None] * len(weights)
    dalphas = [None] * len(alpha_params)
    dmods = mods.new_empty(N, mods.shape[1])  # every column is written below
    xp, (hf, nf, mf, rf) = saved[0], saved.pop()

    dout = grad_out.reshape(N, plan.out_channels, G, p, G, p).permute(0, 2, 4, 3, 5, 1).reshape(M, -1)
    grads[2], grads[3] = dout.t() @ mf, dout.sum(0)
    dmf = dout @ wl  # (M, D)
    del mf
    dshift, dscale = dmods[:, 6 * D * plan.depth:].split(D, dim=1)
    scale = mods[:, 6 * D * plan.depth + D:]
    dh, da_f = kern.norm_mod_bwd(dmf, nf, hf, rf, N, T, kind, alphas[-1], scale, dshift, dscale, None)
    if alpha_params:
        dalphas[-1] = da_f
    for i in reversed(range(plan.depth)):
        # Popping frees each block's activations as soon as they are used, so the allocator reuses that
        # memory for the gradients instead of faulting in fresh pages (measured: 20k page faults per step).
        h, n1, m1, r1, qkv, probs, o, a, h1, n2, m2, r2, f1, g1, f2 = saved.pop()
        wqkv, bqkv, wproj, bproj, w1, b1, w2, b2 = weights[4 + 8 * i: 12 + 8 * i]
        _, scale1, gate1, _, scale2, gate2 = mods[:, 6 * D * i: 6 * D * (i + 1)].split(D, dim=1)
        dshift1, dscale1, dgate1, dshift2, dscale2, dgate2 = dmods[:, 6 * D * i: 6 * D * (i + 1)].split(D, 1)
        j = 4 + 8 * i
        # MLP branch: h = h1 + gate2 * fc2(gelu(fc1(modulate(norm2(h1)))))
        df2, grads[j + 7] = kern.gate_bwd(dh, f2, gate2, dgate2, N, T)
        grads[j + 6] = df2.t() @ g1
        df1, grads[j + 5] = kern.gelu_bwd(df2 @ w2, f1)  # (M, F)
        grads[j + 4] = df1.t() @ m2
        dh1, da2 = kern.norm_mod_bwd(df1 @ w1, n2, h1, r2, N, T, kind, alphas[2 * i + 1], scale2, dshift2,
                                     dscale2, dh)
        # attention branch: h1 = h + gate1 * proj(attn(qkv(modulate(norm1(h)))))
        da, grads[j + 3] = kern.gate_bwd(dh1, a, gate1, dgate1, N, T)
        grads[j + 2] = da.t() @ o
        dqkv, grads[j + 1] = kern.attn_bwd(da @ wproj, qkv, probs, N, T, H, hd)  # (M, 3D)
        grads[j] = dqkv.t() @ m1
        dh, da1 = kern.norm_mod_bwd(dqkv @ wqkv, n1, h, r1, N, T, kind, alphas[2 * i], scale1, dshift1,
                                    dscale1, dh1)
        if alpha_params:
            dalphas[2 * i], dalphas[2 * i + 1] = da1, da2
    grads[0], grads[1] = (dh.t() @ xp).view_as(wx), dh.sum(0)
    grads[4 + 8 * plan.depth:] = dalphas
    return dmods, grads


class DiTFunction(torch.autograd.Function):
    """models.DiT as one autograd node: inputs x_t, conditioning c (N, D), stacked adaLN weights, weights."""

    @staticmethod
    def forward(ctx, plan, kern, x_t, c, pos_embed, w_mod, b_mod, *weights):
        silu_c = F.silu(c)  # (N, D)
        mods = torch.addmm(b_mod, silu_c, w_mod.t())  # (N, K)
        saved = []
        out = dit_forward(plan, kern, x_t, mods, pos_embed, weights, saved)
        ctx.plan, ctx.kern, ctx.saved = plan, kern, saved
        ctx.save_for_backward(c, silu_c, mods, w_mod, *weights)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        c, silu_c, mods, w_mod, *weights = ctx.saved_tensors
        dmods, grads = dit_backward(ctx.plan, ctx.kern, grad_out.contiguous(), mods, weights, ctx.saved)
        ctx.saved = None
        dc = torch.ops.aten.silu_backward(dmods @ w_mod, c)
        return (None, None, None, dc, None, dmods.t() @ silu_c, dmods.sum(0), *grads)


def fused_model(model, plan=None, kern=None):
    """A callable model(x_t, t, y) computing model(x_t, t, y) through DiTFunction (same values, faster)."""
    plan = plan or DiTPlan(model)
    if plan.reason:
        raise ValueError(f"the fused DiT path cannot run this model: {plan.reason}")
    kern = kern or default_kernels()

    def forward(x_t, t, y):
        c = model.t_embedder(t) + model.y_embedder(y, model.training)  # (N, D)
        w_mod, b_mod = DiTPlan.modulation(model)
        return DiTFunction.apply(plan, kern, x_t.contiguous(), c, model.pos_embed, w_mod, b_mod,
                                 *DiTPlan.weights(model))

    return forward


# ----------------------------------------------------------------------------- the step

@torch.no_grad()
def update_ema(ema_params, params, decay):
    """ema <- decay * ema + (1 - decay) * param for whole parameter lists at once."""
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)


def all_reduce_mean(grads, world_size):
    """Average gradients over ranks with a single collective on one flattened buffer."""
    flat = torch.cat([g.reshape(-1) for g in grads])  # (P,)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)  # gloo has no AVG
    flat.div_(world_size)
    torch._foreach_copy_(grads, [chunk.view_as(g) for chunk, g in zip(flat.split([g.numel() for g in grads]),
                                                                      grads, strict=True)])


def _use_fused_adam(optimizer, capturable=False):
    """Switch Adam/AdamW to its fused kernel (the same update rule, one pass over all parameters)."""
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
        return
    for group in optimizer.param_groups:
        if not group.get("differentiable", False):
            group["foreach"], group["fused"] = False, True
            group["capturable"] = group.get("capturable", False) or capturable


def keep_freed_memory():
    """Ask glibc to keep freed memory instead of returning it to the OS after every step.

    A toy step allocates ~100 MB of activations and frees them; with glibc's default trim/mmap thresholds
    the next step faults the same pages in again (measured: ~20k page faults, ~30 ms of system time per
    step). Process-wide, harmless elsewhere; a no-op outside glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
        libc.mallopt(-3, 1 << 28)  # M_MMAP_THRESHOLD: larger blocks than any activation stay in the heap
    except (OSError, AttributeError):
        pass


def _make_step(model_fn, model, ema, diffusion, optimizer, ema_decay, world_size):
    """The step around a model callable: loss, backward, all-reduce, optimizer, EMA."""
    params = [p for p in model.parameters() if p.requires_grad]
    model_params, ema_params = list(model.parameters()), list(ema.parameters())
    if len(model_params) != len(ema_params):
        raise ValueError("ema must be a copy of model (copy.deepcopy(model))")

    def step(x_start, t, noise, y):
        optimizer.zero_grad(set_to_none=True)
        losses = diffusion.training_losses(model_fn, x_start, t, model_kwargs={"y": y}, noise=noise)
        loss = losses["loss"].mean()
        loss.backward()
        if world_size > 1:
            for p in params:
                if p.grad is None:  # every rank must send the same buffer layout
                    p.grad = torch.zeros_like(p)
            all_reduce_mean([p.grad for p in params], world_size)
        optimizer.step()
        update_ema(ema_params, model_params, ema_decay)
        return loss.detach()

    return step


def _make_cuda_graph_step(model, ema, diffusion, optimizer, ema_decay, world_size):
    """The plain step captured in CUDA graphs after 3 eager warm-up steps; replayed for every later step.

    The caller's x_start/t/noise/y are copied into static buffers before each replay. With world_size > 1
    the gradient all-reduce runs between two graphs (forward+backward, then optimizer+EMA), so that no
    collective is captured. A batch of another shape runs the eager step.
    """
    _use_fused_adam(optimizer, capturable=True)
    # cuDNN convolutions (the patch embedding) default to TF32 on Ampere+: ~1e-3 relative error, the size
    # of the effects the study measures. The toy keeps fp32 throughout.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    for p in model.parameters():  # capturable AdamW keeps its step counters on the device
        state = optimizer.state.get(p, {})
        if torch.is_tensor(state.get("step")) and state["step"].device != p.device:
            state["step"] = state["step"].to(p.device)
    eager = _make_step(model, model, ema, diffusion, optimizer, ema_decay, world_size)
    params = [p for p in model.parameters() if p.requires_grad]
    model_params, ema_params = list(model.parameters()), list(ema.parameters())
    captured = {}  # shape key -> (graphs, static inputs, static loss, flat gradient buffer)
    warmup = {"steps": 0}

    def forward_backward(x_start, t, noise, y):
        loss = diffusion.training_losses(model, x_start, t, model_kwargs={"y": y}, noise=noise)["loss"].mean()
        loss.backward()
        return loss.detach()

    def update():
        optimizer.step()
        update_ema(ema_params, model_params, ema_decay)

    def capture(inputs):
        static = [x.clone() for x in inputs]
        optimizer.zero_grad(set_to_none=True)  # the graph allocates the gradients in its own pool
        first, second = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(first):
            loss = forward_backward(*static)
            flat = torch.cat([p.grad.reshape(-1) for p in params]) if world_size > 1 else None
        with torch.cuda.graph(second, pool=first.pool()):
            if world_size > 1:
                flat.div_(world_size)
                torch._foreach_copy_([p.grad for p in params],
                                     [c.view_as(p) for c, p in zip(flat.split([p.numel() for p in params]),
                                                                   params, strict=True)])
            update()
        return (first, second), static, loss, flat

    def step(x_start, t, noise, y):
        inputs = (x_start, t, noise, y)
        if warmup["steps"] < 3:  # warm-up on a side stream, as CUDA graph capture requires
            warmup["steps"] += 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                loss = eager(*inputs)
            torch.cuda.current_stream().wait_stream(side)
            return loss
        key = tuple((tuple(x.shape), x.dtype) for x in inputs)
        if key not in captured:
            if captured:  # another batch shape (e.g. a last partial batch): no new graph for it
                return eager(*inputs)
            captured[key] = capture(inputs)
        (first, second), static, loss, flat = captured[key]
        for buf, x in zip(static, inputs, strict=True):
            buf.copy_(x, non_blocking=True)
        first.replay()
        if world_size > 1:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        second.replay()
        return loss.clone()

    return step


def make_train_step(model, ema, diffusion, optimizer, *, ema_decay: float, world_size: int = 1):
    """Return step(x_start, t, noise, y) -> local mean loss (0-dim detached tensor).

    Does forward, hybrid loss (diffusion.training_losses semantics), backward, gradient all-reduce (mean over
    ranks via torch.distributed when world_size > 1), optimizer.step(), EMA update of `ema` (a deepcopy of
    model, requires_grad False). The returned function's `path` attribute names the implementation chosen:
    "fused-cpu" / "torch-cpu" (hand-written DiT), "cuda-graph", or "plain".
    """
    device = next(model.parameters()).device
    if device.type == "cuda":
        step = _make_cuda_graph_step(model, ema, diffusion, optimizer, ema_decay, world_size)
        step.path = "cuda-graph"
        return step
    plan = DiTPlan(model)
    if plan.reason is None:
        kern = default_kernels()
        _use_fused_adam(optimizer)
        keep_freed_memory()
        model_fn = fused_model(model, plan, kern)
        step = _make_step(model_fn, model, ema, diffusion, optimizer, ema_decay, world_size)
        step.path = kern.name
        return step
    step = _make_step(model, model, ema, diffusion, optimizer, ema_decay, world_size)
    step.path = "plain"
    return step


def make_plain_step(model, ema, diffusion, optimizer, *, ema_decay: float, world_size: int = 1):
    """make_train_step's contract with the model's own forward and autograd (the reference path)."""
    step = _make_step(model, model, ema, diffusion, optimizer, ema_decay, world_size)
    step.path = "plain"
    return step
