/* Grouped fp32 GEMMs for expert banks on x86 CPUs with AVX-512F, loaded by grouped_matmul.py.

   Why not MKL's grouped GEMM (cblas_sgemm_batch): with 64 experts of ~128 rows each (T=4096,
   d=512, h=256, top-2) its six products of a SwiGLU layer's forward and backward took 1.21x the
   time of a dense layer's matmuls of the same FLOPs on 2 cores; this file takes 0.99x. On one
   core the two are at 1.15x and 1.00x. What it does:
   - BLAS-style blocking: B packed into 32-column panels (depth blocks of KC, column blocks of
     NC), A into 8-row tiles, an 8x32 register tile of 16 zmm accumulators. Packing also makes
     the transposes the weight and input gradients need.
   - Weight gradients are written with non-temporal stores: 32 MiB per bank would otherwise be
     read into cache before being overwritten, then evicted again.
   - The input gradient of weights that share an input (SwiGLU's gate and up) is summed expert
     by expert while that expert's rows are in L2 (segments), not in a second pass over all rows.
   - While one block computes, the next block's B (the next expert's weights) is prefetched.
   - Threads: groups (large ones in row ranges) are split between OpenMP threads by their FLOPs.
     The file is built with -fopenmp and links libgomp.so.1, which resolves to the copy torch
     has already loaded, so these are torch's own worker threads. With separate POSIX threads
     the 2-core scaling was 1.42x instead of ~1.9x: torch's OpenMP workers keep spinning on the
     second core for a while after every torch op, and the two pools took turns on it.

   One call runs G groups. Group g computes C_g = sum over segments s of op(A_sg) @ op(B_sg),
   with M = m[g] rows, N = n columns (shared), K = k[s*G + g]; C_g is overwritten, or added to
   when `accumulate` is set (a caller's further terms with other leading dimensions).
   Layouts (all row-major, leading dimensions shared by all groups and segments):
     0 NN: A[i,p] = a[i*lda + p],  B[p,j] = b[p*ldb + j]   (expert forward)
     1 TN: A[i,p] = a[p*lda + i],  B[p,j] = b[p*ldb + j]   (weight gradient x^T @ grad)
     2 NT: A[i,p] = a[i*lda + p],  B[p,j] = b[j*ldb + p]   (input gradient grad @ W^T) */

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

/* Register tile MR x NR; depth, row and column blocks KC, MC, NC (packed A block KC x MC in L2,
   packed B block KC x NC in L2); groups are split into row ranges of at most UNIT_ROWS. */
enum { MR = 8, NR = 32, KC = 256, MC = 128, NC = 256, UNIT_ROWS = 256, MAX_THREADS = 64 };

/* 8x8 transpose: dst[c*ldd + r] = src[r*lds + c]. */
static inline void transpose8(const float *src, long lds, float *dst, long ldd) {
  __m256 r0 = _mm256_loadu_ps(src), r1 = _mm256_loadu_ps(src + lds), r2 = _mm256_loadu_ps(src + 2 * lds),
         r3 = _mm256_loadu_ps(src + 3 * lds), r4 = _mm256_loadu_ps(src + 4 * lds), r5 = _mm256_loadu_ps(src + 5 * lds),
         r6 = _mm256_loadu_ps(src + 6 * lds), r7 = _mm256_loadu_ps(src + 7 * lds);
  __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1), t2 = _mm256_unpacklo_ps(r2, r3),
         t3 = _mm256_unpackhi_ps(r2, r3), t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5),
         t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE),
         s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE),
         s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE),
         s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  _mm256_storeu_ps(dst, _mm256_permute2f128_ps(s0, s4, 0x20));
  _mm256_storeu_ps(dst + ldd, _mm256_permute2f128_ps(s1, s5, 0x20));
  _mm256_storeu_ps(dst + 2 * ldd, _mm256_permute2f128_ps(s2, s6, 0x20));
  _mm256_storeu_ps(dst + 3 * ldd, _mm256_permute2f128_ps(s3, s7, 0x20));
  _mm256_storeu_ps(dst + 4 * ldd, _mm256_permute2f128_ps(s0, s4, 0x31));
  _mm256_storeu_ps(dst + 5 * ldd, _mm256_permute2f128_ps(s1, s5, 0x31));
  _mm256_storeu_ps(dst + 6 * ldd, _mm256_permute2f128_ps(s2, s6, 0x31));
  _mm256_storeu_ps(dst + 7 * ldd, _mm256_permute2f128_ps(s3, s7, 0x31));
}

/* dst[p*width + w] = src[w*lds + p] for w < rows, p < kc; rows w in [rows, width) are zero. */
static void pack_transposed(const float *src, long lds, int rows, int kc, float *dst, int width) {
  int w = 0;
  for (; w + 8 <= rows; w += 8) {
    int p = 0;
    for (; p + 8 <= kc; p += 8) transpose8(src + w * lds + p, lds, dst + p * width + w, width);
    for (; p < kc; p++)
      for (int r = 0; r < 8; r++) dst[p * width + w + r] = src[(w + r) * lds + p];
  }
  for (; w < width; w++)
    for (int p = 0; p < kc; p++) dst[p * width + w] = w < rows ? src[w * lds + p] : 0.0f;
}

/* Lanes [0, valid) of a 16-float vector. */
static inline __mmask16 column_mask(int valid) {
  return valid >= 16 ? 0xFFFF : valid <= 0 ? 0 : (__mmask16)((1u << valid) - 1);
}

/* B into panels of NR columns: dst[(q*kc + p)*NR + w] = src[p*lds + q*NR + w], zero where
   q*NR + w >= cols. Source rows are read whole and in order. */
static void pack_panels(const float *src, long lds, int cols, int kc, float *dst) {
  const int panels = (cols + NR - 1) / NR;
  for (int p = 0; p < kc; p++)
    for (int q = 0; q < panels; q++) {
      const float *from = src + p * lds + q * NR;
      float *to = dst + (q * kc + p) * NR;
      _mm512_store_ps(to, _mm512_maskz_loadu_ps(column_mask(cols - q * NR), from));
      _mm512_store_ps(to + 16, _mm512_maskz_loadu_ps(column_mask(cols - q * NR - 16), from + 16));
    }
}

/* A tile of the transposed layout: dst[p*MR + w] = src[p*lds + w] for w < cols (<= MR), zero
   beyond. */
static void pack_tile_rows(const float *src, long lds, int cols, int kc, float *dst) {
  const __mmask16 mask = column_mask(cols) & 0xFF;
  for (int p = 0; p < kc; p++)
    _mm256_storeu_ps(dst + p * MR, _mm512_castps512_ps256(_mm512_maskz_loadu_ps(mask, src + p * lds)));
}

/* C[mr x NR] (+)= Ap[kc x MR]^T-as-rows @ Bp[kc x NR]; rows >= mr and masked-off columns untouched. */
static inline void micro_kernel(int kc, const float *ap, const float *bp, float *c, long ldc, int mr,
                                __mmask16 m0, __mmask16 m1, int accumulate, int stream) {
  __m512 x0[MR], x1[MR];
  for (int i = 0; i < MR; i++) x0[i] = x1[i] = _mm512_setzero_ps();
  for (int p = 0; p < kc; p++) {
    const __m512 b0 = _mm512_load_ps(bp + p * NR), b1 = _mm512_load_ps(bp + p * NR + 16);
    for (int i = 0; i < MR; i++) {
      const __m512 av = _mm512_set1_ps(ap[p * MR + i]);
      x0[i] = _mm512_fmadd_ps(av, b0, x0[i]);
      x1[i] = _mm512_fmadd_ps(av, b1, x1[i]);
    }
  }
  /* Non-temporal only for whole, 64-byte-aligned rows of a result that is not read again soon. */
  stream = stream && !accumulate && m0 == 0xFFFF && m1 == 0xFFFF && !((uintptr_t)c & 63) && !(ldc & 15);
  for (int i = 0; i < mr; i++) {
    float *ci = c + i * ldc;
    if (accumulate) {
      x0[i] = _mm512_add_ps(x0[i], _mm512_maskz_loadu_ps(m0, ci));
      x1[i] = _mm512_add_ps(x1[i], _mm512_maskz_loadu_ps(m1, ci + 16));
    }
    if (stream) {
      _mm512_stream_ps(ci, x0[i]);
      _mm512_stream_ps(ci + 16, x1[i]);
    } else {
      _mm512_mask_storeu_ps(ci, m0, x0[i]);
      _mm512_mask_storeu_ps(ci + 16, m1, x1[i]);
    }
  }
}

/* A unit of work: rows [i0, i1) of group g's result (large groups are split so that the
   threads get equal shares). */
typedef struct {
  int g, i0, i1;
} unit_t;

typedef struct {
  int layout, stream, accumulate, groups, segments, n;
  const int *k;
  const int64_t *a, *b, *c;
  long lda, ldb, ldc;
  const unit_t *units;
  int u0, u1;     /* this thread's units */
  float *ap, *bp; /* this thread's packing buffers: KC x MC and KC x NC */
} job_t;

/* A rectangle of memory to pull into L2 a few lines at a time while the current block computes. */
typedef struct {
  const char *base;
  long stride;         /* bytes between rows */
  int rows, row_lines; /* rows, 64-byte lines per row */
  int row, line;       /* next line to fetch */
} prefetch_t;

static inline void prefetch_lines(prefetch_t *pf, int lines) {
  for (; lines > 0 && pf->row < pf->rows; lines--) {
    _mm_prefetch(pf->base + pf->row * pf->stride + pf->line * 64, _MM_HINT_T1);
    if (++pf->line == pf->row_lines) pf->line = 0, pf->row++;
  }
}

/* The B block (columns j0.., segment s, depth p0..) of unit u, as a prefetch rectangle
   (empty past the thread's last unit). */
static prefetch_t b_block(const job_t *job, int u, int j0, int s, int p0) {
  prefetch_t pf = {0, 0, 0, 0, 0, 0};
  if (u >= job->u1) return pf;
  const int g = job->units[u].g, k = job->k[s * job->groups + g], n = job->n;
  if (p0 >= k) return pf;
  const int kc = k - p0 < KC ? k - p0 : KC, nc = n - j0 < NC ? n - j0 : NC;
  const float *b = (const float *)job->b[s * job->groups + g];
  const int transposed = job->layout == 2;
  pf.base = (const char *)(transposed ? b + (long)j0 * job->ldb + p0 : b + (long)p0 * job->ldb + j0);
  pf.stride = job->ldb * (long)sizeof(float);
  pf.rows = transposed ? nc : kc;
  pf.row_lines = ((transposed ? kc : nc) * (int)sizeof(float) + 63) / 64 + 1;
  return pf;
}

/* The block after (u, j0, s, p0) in this thread's order. */
static prefetch_t next_b_block(const job_t *job, int u, int j0, int s, int p0) {
  const int g = job->units[u].g;
  if (p0 + KC < job->k[s * job->groups + g]) return b_block(job, u, j0, s, p0 + KC);
  if (s + 1 < job->segments) return b_block(job, u, j0, s + 1, 0);
  if (j0 + NC < job->n) return b_block(job, u, j0 + NC, 0, 0);
  return b_block(job, u + 1, 0, 0, 0);
}

static void unit_gemm(const job_t *job, int u) {
  const int g = job->units[u].g, i_begin = job->units[u].i0, i_end = job->units[u].i1;
  const int n = job->n, layout = job->layout;
  float *c = (float *)job->c[g];
  for (int j0 = 0; j0 < n; j0 += NC) {
    const int nc = n - j0 < NC ? n - j0 : NC, panels = (nc + NR - 1) / NR;
    int first = !job->accumulate;
    for (int s = 0; s < job->segments; s++) {
      const int k = job->k[s * job->groups + g];
      const float *a = (const float *)job->a[s * job->groups + g], *b = (const float *)job->b[s * job->groups + g];
      for (int p0 = 0; p0 < k; p0 += KC) {
        const int kc = k - p0 < KC ? k - p0 : KC;
        const int last = s == job->segments - 1 && p0 + kc >= k;
        if (layout == 2)
          for (int q = 0; q < panels; q++) {
            const int cols = nc - q * NR < NR ? nc - q * NR : NR;
            pack_transposed(b + (long)(j0 + q * NR) * job->ldb + p0, job->ldb, cols, kc, job->bp + q * kc * NR, NR);
          }
        else
          pack_panels(b + (long)p0 * job->ldb + j0, job->ldb, nc, kc, job->bp);
        /* While this block computes, the next block's B (the next expert's weights in the
           forward and input-gradient products) is pulled into L2, so packing it does not wait
           on memory. */
        prefetch_t next = next_b_block(job, u, j0, s, p0);
        const int calls = ((i_end - i_begin + MR - 1) / MR) * panels;
        const int per_call = calls ? (next.rows * next.row_lines + calls - 1) / calls : 0;
        for (int i1 = i_begin; i1 < i_end; i1 += MC) {
          const int mc = i_end - i1 < MC ? i_end - i1 : MC;
          for (int i0 = i1; i0 < i1 + mc; i0 += MR) {
            const int mr = i1 + mc - i0 < MR ? i1 + mc - i0 : MR;
            float *ap = job->ap + (i0 - i1) * kc;
            if (layout == 1)
              pack_tile_rows(a + (long)p0 * job->lda + i0, job->lda, mr, kc, ap);
            else
              pack_transposed(a + (long)i0 * job->lda + p0, job->lda, mr, kc, ap, MR);
          }
          for (int q = 0; q < panels; q++) {
            const int cols = nc - q * NR;
            for (int i0 = i1; i0 < i1 + mc; i0 += MR) {
              const int mr = i1 + mc - i0 < MR ? i1 + mc - i0 : MR;
              prefetch_lines(&next, per_call);
              micro_kernel(kc, job->ap + (i0 - i1) * kc, job->bp + q * kc * NR, c + (long)i0 * job->ldc + j0 + q * NR,
                           job->ldc, mr, column_mask(cols), column_mask(cols - 16), !first, job->stream && last);
            }
          }
        }
        first = 0;
      }
    }
    if (first) /* K = 0 in every segment: the product is zero */
      for (int i = i_begin; i < i_end; i++)
        for (int j = j0; j < j0 + nc; j++) c[(long)i * job->ldc + j] = 0.0f;
  }
}

static void run_job(const job_t *job) {
  for (int u = job->u0; u < job->u1; u++) unit_gemm(job, u);
  if (job->stream) _mm_sfence(); /* make the non-temporal stores visible before returning */
}

int lm_expert_gemm_supported(void) {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") != 0;
}

/* Packing buffers, made once per thread slot and kept: allocating them per call costs page
   faults every time (they are larger than glibc's mmap threshold). A call that finds them in use
   (another Python thread calling at the same time) allocates its own. */
static float *cached_buffers[MAX_THREADS][2];
static volatile int cached_busy;

static int get_buffers(job_t *jobs, int threads, int *owned) {
  *owned = __sync_lock_test_and_set(&cached_busy, 1) == 0;
  for (int t = 0; t < threads; t++) {
    float **slot = *owned ? cached_buffers[t] : 0, *ap = slot ? slot[0] : 0, *bp = slot ? slot[1] : 0;
    if (!ap) ap = aligned_alloc(64, sizeof(float) * KC * MC);
    if (!bp) bp = aligned_alloc(64, sizeof(float) * KC * NC);
    if (slot) slot[0] = ap, slot[1] = bp;
    jobs[t].ap = ap, jobs[t].bp = bp;
    if (!ap || !bp) return -1;
  }
  return 0;
}

static void put_buffers(job_t *jobs, int threads, int owned) {
  if (owned) {
    __sync_lock_release(&cached_busy);
    return;
  }
  for (int t = 0; t < threads; t++) free(jobs[t].ap), free(jobs[t].bp);
}

/* Returns 0 on success, -1 if memory for the work list or packing buffers could not be
   allocated (nothing was computed then). */
int lm_expert_gemm(int layout, int stream, int accumulate, int groups, int segments, const int *m, int n,
                   const int *k, const int64_t *a, long lda, const int64_t *b, long ldb, const int64_t *c,
                   long ldc, int threads) {
  if (threads < 1) threads = 1;
  if (threads > MAX_THREADS) threads = MAX_THREADS;
  int count = 0;
  for (int g = 0; g < groups; g++) count += (m[g] + UNIT_ROWS - 1) / UNIT_ROWS;
  unit_t *units = malloc(sizeof(unit_t) * (count > 0 ? count : 1));
  double *work = malloc(sizeof(double) * (count > 0 ? count : 1));
  if (!units || !work) {
    free(units), free(work);
    return -1;
  }
  /* Split each group into near-equal row ranges of at most UNIT_ROWS rows, on multiples of MR
     so that only a group's last tile is partial. */
  double total = 0.0;
  count = 0;
  for (int g = 0; g < groups; g++) {
    double depth = 0.0;
    for (int s = 0; s < segments; s++) depth += k[s * groups + g];
    const int pieces = (m[g] + UNIT_ROWS - 1) / UNIT_ROWS, tiles = (m[g] + MR - 1) / MR;
    for (int piece = 0; piece < pieces; piece++) {
      const int i0 = (int)((long)tiles * piece / pieces) * MR, i1 = (int)((long)tiles * (piece + 1) / pieces) * MR;
      units[count] = (unit_t){g, i0, i1 < m[g] ? i1 : m[g]};
      work[count] = (double)(units[count].i1 - i0) * depth + 1.0;
      total += work[count++];
    }
  }
  if (threads > count) threads = count > 0 ? count : 1;
  job_t jobs[MAX_THREADS];
  int u = 0;
  double done = 0.0;
  for (int t = 0; t < threads; t++) {
    const int u0 = u;
    const double target = total * (t + 1) / threads;
    while (u < count && (t == threads - 1 || done + 0.5 * work[u] <= target)) done += work[u++];
    jobs[t] = (job_t){layout, stream, accumulate, groups, segments, n, k, a, b, c, lda, ldb, ldc, units, u0, u, 0, 0};
  }
  int owned, status = get_buffers(jobs, threads, &owned);
  if (status == 0) {
#pragma omp parallel num_threads(threads)
    {
      /* A runtime that gives fewer threads than asked: each thread also takes the jobs of
         the slots that did not start. */
      for (int t = omp_get_thread_num(); t < threads; t += omp_get_num_threads()) run_job(&jobs[t]);
    }
  }
  put_buffers(jobs, threads, owned);
  free(units);
  free(work);
  return status;
}
