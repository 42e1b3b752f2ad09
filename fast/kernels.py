"""The C kernels of the hand-written DiT (fused_dit.c): how they are built and loaded, and `TiledKernels`,
the calls that fused_dit.py and the sampler make into them.

The whole network runs in C, a tile of samples at a time, its activations kept in the core's cache from the
first layer to the last; `dit_train` also computes the hybrid loss and every gradient in the same call, and
`sampler()` does one ancestral step per call. Without a working C compiler there are no kernels
(`c_kernels()` returns None) and the callers run the plain PyTorch step and sampler.

The library is compiled once with the system C compiler for an instruction set (`isa_target`: this CPU's,
or AVX2 / AVX-512 by name), cached per source, compiler, flags and CPU, and loaded with ctypes. Loading it
changes nothing global (see `_build` for the flush-to-zero trap it avoids).
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

MAX_FAST_TOKENS = 64  # the C attention keeps one sample's scores on the stack; more tokens: plain path
MAX_DEPTH = 64  # the gradient offsets of fused_dit.c's Accs
NORM_CODES = {"none": 0, "layernorm": 1, "rmsnorm": 2, "dyt": 3}

# The C source (fused_dit.c): rows are tokens (M = N * T), columns features. Per-sample adaLN vectors live
# in one (N, K) buffer, so they are passed as a pointer plus a row stride `ms`. Column sums (bias
# gradients) are accumulated per thread in double and added in thread order, so results do not depend on
# scheduling.
_C_SOURCE = (Path(__file__).resolve().parent / "fused_dit.c").read_text()


# ----------------------------------------------------------------------------- building the C kernels

# -ffast-math lets gcc vectorise the loops (reassociated sums, expf without errno) and is needed only while
# compiling. At link time it must not be given: gcc then links crtfastmath.o into the library, whose
# constructor switches the loading thread to flush-to-zero / denormals-are-zero, silently changing every
# later float computation of the user's process (gcc 12 does this even for -shared).
COMPILE_FLAGS = ["-O3", "-ffast-math", "-fopenmp", "-fPIC"]
LINK_FLAGS = ["-shared", "-fopenmp"]

# The instruction set the kernels are built for; fused_dit.c blocks its matmuls for the vector registers
# that it gets (16 floats x 32 registers with AVX-512, 8 x 16 otherwise). "native" is this CPU's;
# "avx2" (x86-64-v3) and "avx512" (x86-64-v4) let a wider CPU build and run the narrower variant, as the
# tests and benchmarks do. The environment variable picks one for a whole process.
ISA_ENV = "DITNORM_FAST_ISA"
ISA_FLAGS = {"native": ["-march=native"], "avx2": ["-march=x86-64-v3"],
             "avx512": ["-march=x86-64-v4", "-mprefer-vector-width=512"]}
ISA_NEEDS = {"avx2": {"avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "movbe"},
             "avx512": {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}}


def cpu_flags():
    """The CPU's feature flags (/proc/cpuinfo), empty where there is no such file."""
    if not os.path.exists("/proc/cpuinfo"):
        return set()
    with open("/proc/cpuinfo") as info:
        return set(next((line for line in info if line.startswith("flags")), "").partition(":")[2].split())


def isa_target(isa=None):
    """The ISA name to build for: `isa`, else $DITNORM_FAST_ISA, else "native"; ValueError if unknown."""
    isa = isa or os.environ.get(ISA_ENV) or "native"
    if isa not in ISA_FLAGS:
        raise ValueError(f"{ISA_ENV}={isa} is not a kernel target; use one of {', '.join(ISA_FLAGS)}")
    return isa


def isa_runs_here(isa):
    """Whether this CPU can run kernels built for `isa`."""
    return isa == "native" or ISA_NEEDS[isa] <= cpu_flags()


def vector_floats(isa):
    """Floats per vector register that fused_dit.c blocks for when built for `isa` on this CPU."""
    return 16 if "avx512f" in (cpu_flags() if isa == "native" else ISA_NEEDS.get(isa, set())) else 8


def compile_flags(isa):
    """The compiler flags for `isa` (512-bit vectors for the auto-vectorised loops only with AVX-512)."""
    flags = COMPILE_FLAGS + ISA_FLAGS[isa]
    if isa == "native" and "avx512f" in cpu_flags():
        flags.append("-mprefer-vector-width=512")
    return flags


def library_key(isa):
    """The cache key of the library for `isa`: source, compiler, flags and CPU."""
    cpu = platform.processor() + platform.machine() + " ".join(sorted(cpu_flags()))
    # The recipe is in the key, so a library built by an older recipe (one that set flush-to-zero) is
    # never reused.
    cc = os.environ.get("CC", "cc")
    recipe = [_C_SOURCE, cc, "compile", *compile_flags(isa), "link", *LINK_FLAGS, cpu]
    return hashlib.sha256("\0".join(recipe).encode()).hexdigest()[:16]


def cache_dir():
    """Where built kernels are kept (one file per source/compiler/flags/CPU combination)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "dit-norm-study"


_LIBS = {}  # ISA name -> the loaded library, False once building failed in this process


def load_c_kernels(isa=None):
    """The fused CPU kernels for `isa` (isa_target) as a ctypes library, or None (with a warning) when they
    cannot be built or this CPU cannot run them."""
    try:
        isa = isa_target(isa)
    except ValueError as err:  # a mistyped $DITNORM_FAST_ISA: the plain path runs, and says why
        warnings.warn(f"fused CPU kernels unavailable: {err}", stacklevel=2)
        return None
    if isa not in _LIBS:
        try:
            if not isa_runs_here(isa):
                raise OSError(f"this CPU lacks {' '.join(sorted(ISA_NEEDS[isa] - cpu_flags()))} for {isa}")
            _LIBS[isa] = _build(isa)
        except (OSError, subprocess.SubprocessError) as err:
            warnings.warn(f"fused CPU kernels unavailable ({err}); the plain PyTorch step and sampler run "
                          "instead", stacklevel=2)
            _LIBS[isa] = False
    return _LIBS[isa] or None


def denormals_survive():
    """True when float32 arithmetic on this thread keeps denormals (no flush-to-zero mode is on)."""
    return (torch.tensor([1e-39]) * 1.0).item() != 0.0  # 1e-39 is below float32's smallest normal


def _run(cmd):
    """Run one compiler command; OSError with the end of its message when it fails."""
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if done.returncode:
        raise OSError(f"{cmd[0]} failed: {done.stderr.strip()[-300:]}")


def _build(isa):
    """Compile, then link, _C_SOURCE for `isa` with the system C compiler unless a cached build exists;
    load it."""
    cc = os.environ.get("CC", "cc")
    path = cache_dir() / f"fused_dit_{library_key(isa)}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            src, obj, out = Path(tmp) / "fused_dit.c", Path(tmp) / "fused_dit.o", Path(tmp) / "fused_dit.so"
            src.write_text(_C_SOURCE)
            _run([cc, *compile_flags(isa), "-c", str(src), "-o", str(obj)])
            _run([cc, *LINK_FLAGS, str(obj), "-o", str(out), "-lm"])
            # Same directory as the target, so the final rename is atomic when ranks build at once.
            fd, staged = tempfile.mkstemp(dir=path.parent, suffix=".so")
            os.close(fd)
            Path(staged).write_bytes(out.read_bytes())
            os.replace(staged, path)
    # torch is loaded first, so the library's OpenMP calls bind to torch's libgomp and share its threads.
    before = denormals_survive()
    lib = ctypes.CDLL(str(path))
    if before and not denormals_survive():  # e.g. a CC that links fast-math start-up code anyway
        torch.set_flush_denormal(False)  # undo it on this thread, and do not use the library
        raise OSError(f"{path} switches the process to flush-to-zero mode; delete it and check $CC")
    if lib.vector_floats() != vector_floats(isa):  # e.g. a $CC that ignores -march
        raise OSError(f"{path} blocks for {lib.vector_floats()}-float vectors, not the {vector_floats(isa)} "
                      f"of {isa}; delete it and check $CC")
    P, I = ctypes.c_void_p, ctypes.c_int
    lib.set_num_threads.argtypes = [I]
    lib.dit_fwd.argtypes = [ctypes.POINTER(NetArgs), P, P]
    lib.dit_bwd.argtypes = [ctypes.POINTER(NetArgs), P, P, P, P, P, P]
    lib.dit_sample_step.argtypes = [ctypes.POINTER(NetArgs), P, P, P, P, P]
    lib.dit_train.argtypes = [ctypes.POINTER(NetArgs), P, P, P, P, P, P, P, P, P, P]
    lib.isa, lib.key = isa, library_key(isa)
    return lib


def _ptr(tensor):
    """Address of a tensor's first element (None for a missing optional argument)."""
    return None if tensor is None else tensor.data_ptr()


def _row_stride(view):
    """Row stride of an (N, D) view with unit column stride; 0 broadcasts one row to every sample."""
    assert view.stride(-1) == 1 and view.dtype == torch.float32
    return 0 if view.shape[0] == 1 else view.stride(0)


class NetArgs(ctypes.Structure):
    """The C struct `Net` of fused_dit.c (same fields, same order)."""

    _ints = ("N", "T", "D", "H", "F", "P", "O", "depth", "kind", "tile", "patch", "grid")
    _fields_ = ([(name, ctypes.c_int) for name in _ints]
                + [("eps", ctypes.c_float), ("w", ctypes.c_void_p), ("wt", ctypes.c_void_p),
                   ("alpha", ctypes.c_void_p), ("pos", ctypes.c_void_p), ("mods", ctypes.c_void_p),
                   ("ms", ctypes.c_long)]
                + [(name, ctypes.c_void_p) for name in ("hs", "qkv", "a", "f2", "probs", "silu", "wmod",
                                                        "dsilu", "wmodt", "bmod")])


def _pointer_array(tensors):
    """A C array of the tensors' data pointers (kept alive by the caller)."""
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


class TiledKernels:
    """The whole DiT forward and backward in C, a tile of samples at a time (fused_dit.c).

    A tile's activations stay in the core's cache from the first layer to the last, and its matmuls run
    on them there (a register-blocked C micro-kernel). `dit_forward`/`dit_backward` (fused_model): only
    block inputs, qkv, the two branch outputs and the attention probabilities are written out, and the
    backward recomputes the rest of a tile in cache (see `Net` in fused_dit.c). `dit_train`: every
    activation of a tile stays in a per-thread arena between its forward and its backward, nothing is
    recomputed."""

    name = "tiled-cpu"

    def __init__(self, lib, rows=256):
        self.lib, self.threads = lib, None
        # rows (tokens) per tile: for ToyDiT/1 ~2.8 MB of scratch per thread, and ~5.8 MB more of
        # dit_train's arena (which lives in L3 here: measured no slower than 128 rows, faster than 64)
        self.rows = rows

    def _sync_threads(self):
        """Give the C loops torch's current intra-op thread count."""
        if self.threads != torch.get_num_threads():
            self.threads = torch.get_num_threads()
            self.lib.set_num_threads(self.threads)

    def _args(self, plan, N, weights, alphas, pos_embed, mods, bufs, keep):
        """NetArgs for one call; `keep` collects the objects whose memory the C side reads."""
        nw = 4 + 8 * plan.depth
        weights = [w.detach() for w in weights[:nw]]
        assert all(w.is_contiguous() and w.dtype == torch.float32 for w in weights)
        assert (mods is None or mods.stride(-1) == 1) and pos_embed.is_contiguous()
        # every matrix transposed to (in, out), for the forward's x W^T (biases stay as they are)
        transposed = [w.reshape(w.shape[0], -1).t().contiguous() if w.dim() > 1 else w for w in weights]
        ptrs, tptrs = _pointer_array(weights), _pointer_array(transposed)
        keep += [weights, transposed, ptrs, tptrs]
        # samples per tile; every thread gets one when N is small
        tile = max(1, min(self.rows // plan.tokens, -(-N // self.threads)))
        args = NetArgs(N, plan.tokens, plan.hidden, plan.heads, plan.mlp_hidden, plan.patch_dim,
                       plan.out_dim, plan.depth, plan.kind, tile, plan.patch, plan.grid, plan.eps,
                       ctypes.addressof(ptrs), ctypes.addressof(tptrs), _ptr(alphas), pos_embed.data_ptr(),
                       _ptr(mods), 0 if mods is None else _row_stride(mods))
        if bufs is not None:
            for name in ("hs", "qkv", "a", "f2", "probs"):
                setattr(args, name, bufs[name].data_ptr())
        return args

    def dit_forward(self, plan, x, mods, pos_embed, weights, saved=None):
        """dit_forward in one C call; `saved` gets what dit_backward reads."""
        self._sync_threads()
        N, T, D, depth = x.shape[0], plan.tokens, plan.hidden, plan.depth
        M = N * T
        xp = patch_rows(plan, x).contiguous()  # (a one-sample batch can make it a strided view)
        alphas = dyt_alphas(plan, weights)
        bufs = None
        if saved is not None:
            new = x.new_empty
            bufs = {"hs": new(depth + 1, M, D), "qkv": new(depth, M, 3 * D), "a": new(depth, M, D),
                    "f2": new(depth, M, D),
                    "probs": new(depth, N, plan.heads, T, T)}
        keep = [bufs, alphas]  # alive while the C side may read them
        out = x.new_empty(M, plan.out_dim)
        args = self._args(plan, N, weights, alphas, pos_embed, mods, bufs, keep)
        if saved is not None:  # the backward reuses the arguments (and transposed weights) of this call
            saved.append((xp, args, keep))
        if self.lib.dit_fwd(ctypes.byref(args), _ptr(xp), _ptr(out)):
            raise MemoryError("fused DiT forward: no memory for the per-thread scratch")
        return unpatch_rows(plan, out, N)

    @staticmethod
    def _gradients(plan, args, weights, alphas, silu_c, w_mod):
        """The output buffers of dit_bwd / dit_train: [d weight] (matrices and biases), d alphas or None,
        (d silu_c (pointed to by args), d w_mod, d b_mod), and the C array of the first list's pointers."""
        assert silu_c.is_contiguous() and w_mod.is_contiguous()
        grads = [torch.empty_like(w) for w in weights[:4 + 8 * plan.depth]]
        dalpha = None if alphas is None else torch.empty_like(alphas)
        dsilu, dw_mod, db_mod = torch.empty_like(silu_c), torch.empty_like(w_mod), w_mod.new_empty(len(w_mod))
        args.silu, args.wmod, args.dsilu = silu_c.data_ptr(), w_mod.data_ptr(), dsilu.data_ptr()
        return grads, dalpha, (dsilu, dw_mod, db_mod), _pointer_array(grads)

    @staticmethod
    def _with_alpha_grads(plan, grads, dalpha, weights):
        """grads followed by one gradient per dyt alpha parameter (views of dalpha), as weights lists them."""
        if dalpha is None:
            return grads
        return grads + [g.view_as(a) for g, a in zip(dalpha, weights[4 + 8 * plan.depth:], strict=True)]

    def dit_backward(self, plan, grad_out, mods, silu_c, w_mod, weights, saved):
        """Gradients of dit_forward and of the modulation mods = silu_c w_mod^T + b_mod that made its adaLN
        vectors, in one C call: (d silu_c, d w_mod, d b_mod, [d weight for weights]). The (N, K) gradient
        of mods is folded into these tile by tile and never written out."""
        self._sync_threads()
        xp, args, keep = saved.pop()
        assert args.mods == mods.data_ptr()
        dout = patch_rows(plan, grad_out, out=True).contiguous()
        grads, dalpha, dmod, ptrs = self._gradients(plan, args, weights, keep[1], silu_c, w_mod)
        if self.lib.dit_bwd(ctypes.byref(args), _ptr(xp), _ptr(dout), ctypes.addressof(ptrs), _ptr(dalpha),
                            *map(_ptr, dmod[1:])):
            raise MemoryError("fused DiT backward: no memory for the gradient accumulators")
        return (*dmod, self._with_alpha_grads(plan, grads, dalpha, weights))

    def dit_train(self, plan, x_t, x_start, noise, lc, silu_c, w_mod, b_mod, pos_embed, weights):
        """Forward, hybrid loss and backward in one C call, a tile at a time (dit_train in fused_dit.c); each
        tile computes its own adaLN vectors silu_c w_mod^T + b_mod.

        lc: (N, len(LOSS_COLUMNS)) per-sample loss coefficients. Returns the (N,) losses and, for
        sum(losses) / N, (d silu_c, d w_mod, d b_mod, [d weight for weights])."""
        self._sync_threads()
        N = x_t.shape[0]
        xp = patch_rows(plan, x_t).contiguous()
        alphas = dyt_alphas(plan, weights)
        w_mod_t = w_mod.t().contiguous()  # (D, K)
        keep = [alphas, w_mod_t, b_mod]  # alive while the C side reads them
        args = self._args(plan, N, weights, alphas, pos_embed, None, None, keep)
        assert b_mod.is_contiguous() and lc.is_contiguous()
        args.wmodt, args.bmod = w_mod_t.data_ptr(), b_mod.data_ptr()
        grads, dalpha, dmod, ptrs = self._gradients(plan, args, weights, alphas, silu_c, w_mod)
        images = [x.contiguous() for x in (x_start, x_t, noise)]
        losses = x_t.new_empty(N)
        if self.lib.dit_train(ctypes.byref(args), _ptr(xp), *[_ptr(x) for x in images], _ptr(lc),
                              _ptr(losses), ctypes.addressof(ptrs), _ptr(dalpha), *map(_ptr, dmod[1:])):
            raise MemoryError("fused DiT training step: no memory for the per-thread scratch")
        return (losses, *dmod, self._with_alpha_grads(plan, grads, dalpha, weights))

    def sampler(self, plan, N, pos_embed, weights):
        """step(x, z, mods, coef): one ancestral step (fast/sampler.py), x (N, C, H, W) in place, one C call.

        The arguments of the network are prepared once; each step only points them at its adaLN row."""
        self._sync_threads()
        alphas, keep = dyt_alphas(plan, weights), []
        args = self._args(plan, N, weights, alphas, pos_embed.detach(), pos_embed.new_empty(1, 1), None, keep)
        xp = pos_embed.new_empty(N * plan.tokens, plan.patch_dim)
        out = pos_embed.new_empty(N * plan.tokens, plan.out_dim)

        def step(x, z, mods, coef):
            assert x.is_contiguous() and z.is_contiguous() and coef.is_contiguous() and mods.shape[0] == 1
            args.mods = mods.data_ptr()
            pointers = [_ptr(t) for t in (x, z, coef, xp, out)]
            if self.lib.dit_sample_step(ctypes.byref(args), *pointers):
                raise MemoryError("fused DiT sampling: no memory for the per-thread scratch")

        step.keep = (keep, alphas, xp, out, args)
        return step


def c_kernels(isa=None):
    """TiledKernels for `isa` (isa_target) when the C compiler works here, else None."""
    lib = load_c_kernels(isa)
    return TiledKernels(lib) if lib is not None else None


def patch_rows(plan, x, out=False):
    """(N, C, H, W) image -> (N T, C p p) patch rows (out=True: the (N, C_out, H, W) output layout)."""
    N, p, G = x.shape[0], plan.patch, plan.grid
    if out:  # the final linear's outputs are ordered (p, p, C_out)
        return x.reshape(N, plan.out_channels, G, p, G, p).permute(0, 2, 4, 3, 5, 1).reshape(N * G * G, -1)
    return x.reshape(N, plan.in_channels, G, p, G, p).permute(0, 2, 4, 1, 3, 5).reshape(N * G * G, -1)


def unpatch_rows(plan, out, N):
    """(N T, p p C_out) final-linear rows -> (N, C_out, H, W)."""
    p, G = plan.patch, plan.grid
    out = out.view(N, G, G, p, p, plan.out_channels).permute(0, 5, 1, 3, 2, 4)  # (N, C_out, G, p, G, p)
    return out.reshape(N, plan.out_channels, G * p, G * p)


def dyt_alphas(plan, weights):
    """The dyt alphas as one contiguous (2 depth + 1,) tensor, or None for the other norms."""
    rest = weights[4 + 8 * plan.depth:]
    return torch.cat([a.detach().reshape(1) for a in rest]) if rest else None


def keep_freed_memory():
    """Ask glibc to keep freed memory instead of returning it to the OS after every step.

    A toy step allocates ~100 MB of activations and frees them; with glibc's default trim/mmap thresholds
    the next step faults the same pages in again (measured on ToyDiT/1, batch 2048, 1 thread: 7k-19k page
    faults and 12-37 ms of system time per step, ~40 ms of a ~320 ms step). Process-wide (callers say so);
    harmless elsewhere; a no-op outside glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
        libc.mallopt(-3, 1 << 28)  # M_MMAP_THRESHOLD: larger blocks than any activation stay in the heap
    except (OSError, AttributeError):
        pass
