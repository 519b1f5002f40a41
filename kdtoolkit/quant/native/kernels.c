/* Fused CPU kernels for the per-tensor fake-quantizers (LSQ forward/backward, HWGQ activation forward).
 *
 * Each kernel is one OpenMP-parallel, vectorisable pass over dense memory: the eager ATen versions
 * take four or five passes (div, clamp_, round_, mul_ ...) plus separate reductions. Element order
 * does not matter (the quantizers are per tensor), so any dense layout (contiguous or channels-last)
 * works as long as every tensor of a call shares it; the Python side checks that.
 *
 * Arithmetic is that of the formulas in IEEE float (double for double tensors): x / s is a true
 * division, rint rounds half to even like torch.round, clamps propagate NaN like torch.clamp.
 * bfloat16 tensors are loaded to float, computed in float, stored with round-to-nearest-even
 * (c10::BFloat16's rule, NaN -> 0x7fc0). LSQ's step gradient forms each product dy * local in
 * double (exact for float and bfloat16 operands) and sums in double: blocks of KDQ_BLOCK elements,
 * then the block sums per thread, then the per-thread sums in thread order, so a fixed thread count
 * gives bit-identical results and the error is at most n * 2^-53 * sum|dy * local|.
 *
 * Scalars that live in tensors (LSQ's learned step) are read here from the tensor's memory, and
 * results (the step gradient) are written to a tensor's memory: the Python side never reads a
 * tensor value on the host.
 *
 * Built by kdtoolkit/quant/native/__init__.py: cc -O3 -fopenmp -march=native -fno-math-errno (clang: -fopenmp=libgomp).
 * OpenMP: the library links libgomp.so.1, which resolves to the copy torch has already loaded, so
 * these kernels share torch's thread pool.
 */
#include <math.h>
/* declared here rather than from <omp.h>, which clang does not ship for libgomp */
int omp_get_thread_num(void);
int omp_get_num_threads(void);
#include <stdint.h>
#include <string.h>

typedef uint16_t bf16_t;

/* dtype codes shared with the Python side */
enum { KDQ_F32 = 0, KDQ_F64 = 1, KDQ_BF16 = 2 };

/* below this many elements a kernel runs on the calling thread (a parallel region costs ~us) */
#define KDQ_MIN_PARALLEL 32768
/* elements per block of the step-gradient sum (blocks keep the SIMD reduction short) */
#define KDQ_BLOCK 256
#define KDQ_MAX_THREADS 1024

static inline float bf16_to_f32(bf16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline bf16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (u & 0x7fffffffu) > 0x7f800000u ? (bf16_t)0x7fc0u : (bf16_t)rounded;
}

static double load_scalar(const void *p, int dtype) {
    switch (dtype) {
    case KDQ_F64: return *(const double *)p;
    case KDQ_BF16: return (double)bf16_to_f32(*(const bf16_t *)p);
    default: return (double)*(const float *)p;
    }
}

static void store_scalar(void *p, int dtype, double v) {
    switch (dtype) {
    case KDQ_F64: *(double *)p = v; break;
    case KDQ_BF16: *(bf16_t *)p = f32_to_bf16((float)v); break;
    default: *(float *)p = (float)v; break;
    }
}

/* clamp that propagates NaN, like torch.clamp */
#define CLAMP(v, lo, hi) ((v) < (lo) ? (lo) : ((v) > (hi) ? (hi) : (v)))

/* T: storage type; C: compute type; LOAD/STORE convert between them. */
#define KDQ_KERNELS(SUF, T, C, RINT, LOAD, STORE)                                                     \
    /* y = rint(clamp(x / s, -q_n, q_p)) * s */                                                       \
    void kdq_lsq_fwd_##SUF(const T *x, T *y, int64_t n, const void *step, int step_dtype, double q_n, \
                           double q_p, int threads) {                                                 \
        const C s = (C)load_scalar(step, step_dtype), lo = (C)(0.0 - q_n), hi = (C)q_p; /* 0 - 0 is +0 */                      \
        _Pragma("omp parallel for simd num_threads(threads) if(n >= KDQ_MIN_PARALLEL) schedule(static)") \
        for (int64_t i = 0; i < n; ++i) {                                                             \
            C t = LOAD(x[i]) / s;                                                                     \
            t = CLAMP(t, lo, hi);                                                                     \
            y[i] = STORE(RINT(t) * s);                                                                \
        }                                                                                             \
    }                                                                                                 \
                                                                                                      \
    /* dx = dy where -q_n <= x/s <= q_p else 0 (dx may be NULL);                                      \
     * d_step = grad_scale * sum(dy * (inside ? rint(t) - t : (t < -q_n ? -q_n : q_p)))               \
     * (d_step may be NULL), written in d_step_dtype */                                               \
    void kdq_lsq_bwd_##SUF(const T *x, const T *dy, T *dx, int64_t n, const void *step, int step_dtype, \
                           double q_n, double q_p, double grad_scale, void *d_step, int d_step_dtype,  \
                           int threads) {                                                             \
        const C s = (C)load_scalar(step, step_dtype), lo = (C)(0.0 - q_n), hi = (C)q_p; /* 0 - 0 is +0 */                      \
        if (d_step == NULL) {                                                                         \
            if (dx == NULL) return;                                                                   \
            _Pragma("omp parallel for simd num_threads(threads) if(n >= KDQ_MIN_PARALLEL) schedule(static)") \
            for (int64_t i = 0; i < n; ++i) {                                                         \
                const C t = LOAD(x[i]) / s;                                                           \
                dx[i] = (t >= lo && t <= hi) ? dy[i] : (T)0;                                          \
            }                                                                                         \
            return;                                                                                   \
        }                                                                                             \
        /* blocks of KDQ_BLOCK elements summed in C (SIMD lanes), block sums in double per thread,     \
         * thread sums added in thread order: deterministic for a given thread count */               \
        const int64_t blocks = (n + KDQ_BLOCK - 1) / KDQ_BLOCK;                                       \
        double partial[KDQ_MAX_THREADS];                                                              \
        int used = 1;                                                                                 \
        if (threads > KDQ_MAX_THREADS) threads = KDQ_MAX_THREADS;                                     \
        _Pragma("omp parallel num_threads(threads) if(n >= KDQ_MIN_PARALLEL)")                        \
        {                                                                                             \
            double mine = 0.0;                                                                        \
            _Pragma("omp for schedule(static)")                                                       \
            for (int64_t b = 0; b < blocks; ++b) {                                                    \
                const int64_t start = b * KDQ_BLOCK;                                                  \
                const int64_t end = start + KDQ_BLOCK < n ? start + KDQ_BLOCK : n;                    \
                double part = 0; /* products of two floats are exact in double */                     \
                if (dx != NULL) {                                                                     \
                    _Pragma("omp simd reduction(+:part)")                                             \
                    for (int64_t i = start; i < end; ++i) {                                           \
                        const C t = LOAD(x[i]) / s;                                                   \
                        const int inside = t >= lo && t <= hi;                                        \
                        const C local = inside ? RINT(t) - t : (t < lo ? lo : hi);                    \
                        dx[i] = inside ? dy[i] : (T)0;                                                \
                        part += (double)LOAD(dy[i]) * (double)local;                                                  \
                    }                                                                                 \
                } else {                                                                              \
                    _Pragma("omp simd reduction(+:part)")                                             \
                    for (int64_t i = start; i < end; ++i) {                                           \
                        const C t = LOAD(x[i]) / s;                                                   \
                        const int inside = t >= lo && t <= hi;                                        \
                        const C local = inside ? RINT(t) - t : (t < lo ? lo : hi);                    \
                        part += (double)LOAD(dy[i]) * (double)local;                                                  \
                    }                                                                                 \
                }                                                                                     \
                mine += part;                                                                 \
            }                                                                                         \
            partial[omp_get_thread_num()] = mine;                                                     \
            _Pragma("omp single")                                                                     \
            used = omp_get_num_threads();                                                             \
        }                                                                                             \
        double acc = 0.0;                                                                             \
        for (int k = 0; k < used; ++k) acc += partial[k];                                             \
        store_scalar(d_step, d_step_dtype, acc * grad_scale);                                         \
    }                                                                                                 \
                                                                                                      \
    /* y = clamp(rint(x / step), lo, levels) * step, and 0 where x <= 0 when zero_nonpositive */      \
    void kdq_hwgq_fwd_##SUF(const T *x, T *y, int64_t n, double step, double lo, double levels,        \
                            int zero_nonpositive, int threads) {                                      \
        const C d = (C)step, l = (C)lo, h = (C)levels;                                                \
        if (zero_nonpositive) {                                                                       \
            _Pragma("omp parallel for simd num_threads(threads) if(n >= KDQ_MIN_PARALLEL) schedule(static)") \
            for (int64_t i = 0; i < n; ++i) {                                                         \
                const C v = LOAD(x[i]);                                                               \
                C k = RINT(v / d);                                                                    \
                k = CLAMP(k, l, h);                                                                   \
                y[i] = STORE(v <= (C)0 ? (C)0 : k * d);                                               \
            }                                                                                         \
        } else {                                                                                      \
            _Pragma("omp parallel for simd num_threads(threads) if(n >= KDQ_MIN_PARALLEL) schedule(static)") \
            for (int64_t i = 0; i < n; ++i) {                                                         \
                C k = RINT(LOAD(x[i]) / d);                                                           \
                k = CLAMP(k, l, h);                                                                   \
                y[i] = STORE(k * d);                                                                  \
            }                                                                                         \
        }                                                                                             \
    }

#define ID(v) (v)
KDQ_KERNELS(f32, float, float, rintf, ID, ID)
KDQ_KERNELS(f64, double, double, rint, ID, ID)
KDQ_KERNELS(bf16, bf16_t, float, rintf, bf16_to_f32, f32_to_bf16)

/* the ABI version the Python side expects */
int kdq_version(void) { return 2; }
