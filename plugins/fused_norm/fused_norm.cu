// bnexport::FusedNorm — CUDA kernels, compiled at run time with NVRTC (no toolkit headers).
//
// X is viewed as a contiguous [outer, C, inner] array (inner == 1: channels-last) and,
// in batch-statistics mode, outer is split into G ghost batches of `opg` rows each.
//
//   affine:       y = act(x * scale[c] + shift[c])
//   batch_stats:  mean, var = Welford/Chan moments of x[g, :, c, :]          (biased)
//                 y = act((x - mean) * (scale[c] * rsqrt(var + eps)) + shift[c])
//
// Storage types: float, half and bfloat16 (raw 16-bit, converted here); parameters and
// all math are float32. Every entry point takes its arguments in the order TensorRT's
// ahead-of-time plugin path uses: input pointers, then int32 scalars (floats passed as
// their bit patterns), then output pointers. Element counts must be < 2^31.
//
// Entry points (suffix _f32 / _f16 / _bf16 on each):
//   fused_norm_affine             elementwise pass
//   fused_norm_apply              batch_stats step 3: y = act((x - mean) * a + beta)
//   fused_norm_stats_planar       batch_stats step 1, any inner: partial moments per block
//   fused_norm_stats_rows         batch_stats step 1, inner == 1: partial moments per block
//   fused_norm_batch_stats[_out]  batch_stats in ONE kernel (TensorRT AOT), one block per
//                                 (group, channel) or per (group, 8/16-channel tile)
// and fused_norm_stats_finalize (step 2: partials -> a, beta, mean per (group, channel)).

typedef unsigned short u16;
typedef unsigned int u32;

#define ACT_NONE 0
#define ACT_RELU 1
#define ACT_RELU6 2
#define ACT_LEAKY_RELU 3
#define ACT_SIGMOID 4
#define ACT_SILU 5

// ---------------------------------------------------------------- element types
#ifndef FUSED_NORM_HOST_EMULATION
__device__ __forceinline__ float half_to_float(u16 h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}
__device__ __forceinline__ u16 float_to_half(float f) {
  u16 h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}
#endif  // the CPU emulation used by the tests supplies both conversions
__device__ __forceinline__ float bf16_to_float(u16 b) { return __uint_as_float(((u32)b) << 16); }
__device__ __forceinline__ u16 float_to_bf16(float f) {  // round to nearest even, NaN kept
  u32 u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (u16)(u >> 16);
}

struct F32 {
  typedef float S;
  static __device__ __forceinline__ float load(float v) { return v; }
  static __device__ __forceinline__ float store(float v) { return v; }
};
struct F16 {
  typedef u16 S;
  static __device__ __forceinline__ float load(u16 v) { return half_to_float(v); }
  static __device__ __forceinline__ u16 store(float v) { return float_to_half(v); }
};
struct BF16 {
  typedef u16 S;
  static __device__ __forceinline__ float load(u16 v) { return bf16_to_float(v); }
  static __device__ __forceinline__ u16 store(float v) { return float_to_bf16(v); }
};

// 128-bit pack of V storage elements
template <typename S>
struct Pack {
  enum { V = 16 / sizeof(S) };
  union {
    uint4 raw;
    S e[16 / sizeof(S)];
  };
};

__device__ __forceinline__ bool aligned16(const void* p) { return (((unsigned long long)p) & 15ull) == 0; }

__device__ __forceinline__ float activate(float v, int act, float alpha) {
  switch (act) {
    case ACT_RELU: return fmaxf(v, 0.0f);
    case ACT_RELU6: return fminf(fmaxf(v, 0.0f), 6.0f);
    case ACT_LEAKY_RELU: return v >= 0.0f ? v : alpha * v;
    case ACT_SIGMOID: return 1.0f / (1.0f + expf(-v));
    case ACT_SILU: return v / (1.0f + expf(-v));
    default: return v;
  }
}

// ---------------------------------------------------------------- Welford / Chan moments
// (n, mean, m2) with m2 = sum of squared deviations; combining never forms E[x^2] - E[x]^2.
struct Moments {
  float n, mean, m2;
};

__device__ __forceinline__ void push(Moments& a, float v) {  // Welford update
  a.n += 1.0f;
  float d = v - a.mean;
  a.mean += d / a.n;
  a.m2 += d * (v - a.mean);
}

__device__ __forceinline__ void combine(Moments& a, float nb, float mb, float m2b) {  // Chan
  if (nb == 0.0f) return;
  float n = a.n + nb;
  float d = mb - a.mean;
  float f = nb / n;
  a.mean += d * f;
  a.m2 += m2b + d * d * a.n * f;
  a.n = n;
}

template <typename T>
__device__ __forceinline__ void push_pack(Moments& a, const Pack<typename T::S>& p) {
  const int V = Pack<typename T::S>::V;
  float v[V];
  float s = 0.0f;
#pragma unroll
  for (int k = 0; k < V; ++k) {
    v[k] = T::load(p.e[k]);
    s += v[k];
  }
  float m = s * (1.0f / V);
  float m2 = 0.0f;
#pragma unroll
  for (int k = 0; k < V; ++k) m2 += (v[k] - m) * (v[k] - m);
  combine(a, (float)V, m, m2);
}

__device__ __forceinline__ Moments warp_reduce(Moments a) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    float nb = __shfl_down_sync(0xffffffffu, a.n, off);
    float mb = __shfl_down_sync(0xffffffffu, a.mean, off);
    float m2b = __shfl_down_sync(0xffffffffu, a.m2, off);
    combine(a, nb, mb, m2b);
  }
  return a;
}

// Whole-block reduction; the result is valid in every thread. Block size <= 1024.
__device__ Moments block_reduce(Moments a) {
  __shared__ float sn[32], sm[32], sm2[32];
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int nthreads = blockDim.x * blockDim.y;
  const int lane = tid & 31, warp = tid >> 5, nwarps = (nthreads + 31) >> 5;
  a = warp_reduce(a);
  __syncthreads();  // smem may still be read by a previous call
  if (lane == 0) { sn[warp] = a.n; sm[warp] = a.mean; sm2[warp] = a.m2; }
  __syncthreads();
  if (warp == 0) {
    Moments b = {0.0f, 0.0f, 0.0f};
    if (lane < nwarps) { b.n = sn[lane]; b.mean = sm[lane]; b.m2 = sm2[lane]; }
    b = warp_reduce(b);
    if (lane == 0) { sn[0] = b.n; sm[0] = b.mean; sm2[0] = b.m2; }
  }
  __syncthreads();
  Moments r = {sn[0], sm[0], sm2[0]};
  return r;
}

// ---------------------------------------------------------------- affine / apply
// y = act((x - center) * scale + shift); center is 0 (affine) or the batch mean (apply step
// of batch_stats: centering first keeps float32 precision when |mean| >> std).
// Parameter row of element i: (i / per_group) * C (ghost batch), channel (i / inner) % C.
template <typename T, bool CENTER>
__device__ __forceinline__ void affine_body(
    const typename T::S* __restrict__ x,  // [outer, C, inner] input
    const float* __restrict__ scale,      // [groups, C] multiplier
    const float* __restrict__ shift,      // [groups, C] offset
    const float* __restrict__ center,     // [groups, C] subtracted first (CENTER only)
    int n,                                // element count of x
    int C,                                // channels
    int inner,                            // elements per (row, channel); 1 = channels-last
    int opg,                              // outer rows per ghost batch
    int groups,                           // ghost batches (rows of scale/shift)
    int act,                              // ACT_* code
    float alpha,                          // leaky_relu slope
    typename T::S* __restrict__ y)        // [outer, C, inner] output
{
  typedef typename T::S S;
  const int V = Pack<S>::V;
  const u32 un = (u32)n, uC = (u32)C, uinner = (u32)inner;
  const u32 per_group = (u32)opg * uC * uinner;
  const u32 stride = blockDim.x * gridDim.x;
  const u32 tid = blockIdx.x * blockDim.x + threadIdx.x;
  const u32 nvec = (aligned16(x) && aligned16(y)) ? un / V : 0u;
  // vectorized body: one 128-bit load and store per thread and step
  for (u32 v = tid; v < nvec; v += stride) {
    const u32 i = v * V;
    const u32 q = i / uinner;
    u32 r = i - q * uinner;
    u32 c = q % uC;
    u32 row = groups > 1 ? (i / per_group) * uC : 0u;
    Pack<S> in, out;
    in.raw = *reinterpret_cast<const uint4*>(x + i);
    // parameters of the current channel, reloaded only when the vector crosses a channel
    float a = scale[row + c], b = shift[row + c], m = CENTER ? center[row + c] : 0.0f;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      out.e[k] = T::store(activate((T::load(in.e[k]) - m) * a + b, act, alpha));
      if (++r == uinner) {  // next channel (and maybe next ghost batch)
        r = 0;
        if (++c == uC) {
          c = 0;
          if (groups > 1) row = ((i + k + 1) / per_group) * uC;
        }
        if (k + 1 < V) {
          a = scale[row + c];
          b = shift[row + c];
          if (CENTER) m = center[row + c];
        }
      }
    }
    *reinterpret_cast<uint4*>(y + i) = out.raw;
  }
  // scalar tail (everything when a pointer is not 16-byte aligned)
  for (u32 i = nvec * V + tid; i < un; i += stride) {
    const u32 c = (i / uinner) % uC;
    const u32 row = groups > 1 ? (i / per_group) * uC : 0u;
    const float xv = CENTER ? T::load(x[i]) - center[row + c] : T::load(x[i]);
    y[i] = T::store(activate(xv * scale[row + c] + shift[row + c], act, alpha));
  }
}

// ---------------------------------------------------------------- batch_stats, step 1
// grid (G*C, P), 1-D block. The slab x[g*opg : (g+1)*opg, c, :] of (g, c) is flattened into
// items (8/4-element vectors when inner allows, else elements); block p reduces the p-th of
// P contiguous ranges of items, so short rows (small inner) still keep every thread busy.
template <typename T>
__device__ __forceinline__ void stats_planar_body(
    const typename T::S* __restrict__ x,  // [outer, C, inner] input
    int C,                                // channels
    int inner,                            // elements per (row, channel)
    int opg,                              // rows per ghost batch
    float* __restrict__ ws)               // [3, G*C, P] partial (count, mean, m2)
{
  typedef typename T::S S;
  const int V = Pack<S>::V;
  const u32 gc = blockIdx.x, P = gridDim.y, p = blockIdx.y;
  const u32 g = gc / (u32)C, c = gc % (u32)C;
  const bool vec = aligned16(x) && (inner % V == 0);
  const u32 w = vec ? (u32)inner / V : (u32)inner;  // items per row segment
  const u32 total = (u32)opg * w, per = (total + P - 1) / P;
  const u32 begin = min(p * per, total), end = min(begin + per, total);
  Moments m = {0.0f, 0.0f, 0.0f};
  // per-thread moments over this block's items
  for (u32 t = begin + threadIdx.x; t < end; t += blockDim.x) {
    const u32 o = t / w, j = t - o * w;
    const S* seg = x + ((g * opg + o) * (u32)C + c) * (u32)inner;
    if (vec) {
      Pack<S> pk;
      pk.raw = *reinterpret_cast<const uint4*>(seg + j * V);
      push_pack<T>(m, pk);
    } else {
      push(m, T::load(seg[j]));
    }
  }
  // block reduction, one partial per block
  m = block_reduce(m);
  if (threadIdx.x == 0) {
    const u32 total_p = gridDim.x * P, idx = gc * P + p;
    ws[idx] = m.n;
    ws[total_p + idx] = m.mean;
    ws[2 * total_p + idx] = m.m2;
  }
}

// inner == 1: grid (ceil(C/32), P, G), block (32, BY). Thread (tx, ty) of block (cx, p, g)
// reduces channel cx*32+tx over rows p*BY+ty, p*BY+ty + P*BY, ... of ghost batch g.
template <typename T>
__device__ __forceinline__ void stats_rows_body(
    const typename T::S* __restrict__ x,  // [outer, C] input (channels-last)
    int C,                                // channels
    int opg,                              // rows per ghost batch
    float* __restrict__ ws)               // [3, G*C, P] partial (count, mean, m2)
{
  __shared__ float sn[32][33], sm[32][33], sm2[32][33];
  const u32 c = blockIdx.x * 32 + threadIdx.x, p = blockIdx.y, g = blockIdx.z;
  const u32 P = gridDim.y, BY = blockDim.y;
  Moments m = {0.0f, 0.0f, 0.0f};
  // per-thread Welford over rows
  if (c < (u32)C)
    for (u32 o = p * BY + threadIdx.y; o < (u32)opg; o += P * BY)
      push(m, T::load(x[(g * opg + o) * (u32)C + c]));
  sn[threadIdx.y][threadIdx.x] = m.n;
  sm[threadIdx.y][threadIdx.x] = m.mean;
  sm2[threadIdx.y][threadIdx.x] = m.m2;
  __syncthreads();
  // combine the BY partials of each column
  if (threadIdx.y == 0 && c < (u32)C) {
    for (u32 r = 1; r < BY; ++r) combine(m, sn[r][threadIdx.x], sm[r][threadIdx.x], sm2[r][threadIdx.x]);
    const u32 total = gridDim.z * (u32)C * P, idx = (g * (u32)C + c) * P + p;
    ws[idx] = m.n;
    ws[total + idx] = m.mean;
    ws[2 * total + idx] = m.m2;
  }
}

// ---------------------------------------------------------------- batch_stats, step 2
// grid ceil(GC / 8), block 256: warp w combines the P partials of (g, c) = blockIdx.x*8 + w.
// Step 3 is fused_norm_apply: y = act((x - mean) * a + beta).
extern "C" __global__ void fused_norm_stats_finalize(
    const float* __restrict__ ws,     // [3, GC, P] partials from step 1
    const float* __restrict__ scale,  // [C] gamma
    const float* __restrict__ shift,  // [C] beta
    int GC,                           // groups * channels
    int C,                            // channels
    int P,                            // partials per (g, c)
    int eps_bits,                     // epsilon as float bits
    float* __restrict__ abm,          // [3, GC] out: a = gamma*rstd, beta, mean
    float* __restrict__ mean_out,     // [GC] batch mean, or null
    float* __restrict__ var_out)      // [GC] biased batch variance, or null
{
  const int lane = threadIdx.x & 31;
  const int gc = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (gc >= GC) return;  // whole warp exits together
  const int total = GC * P;
  Moments m = {0.0f, 0.0f, 0.0f};
  // combine partials
  for (int p = lane; p < P; p += 32) combine(m, ws[gc * P + p], ws[total + gc * P + p], ws[2 * total + gc * P + p]);
  m = warp_reduce(m);
  // scale/shift of the normalization
  if (lane == 0) {
    const float var = m.n > 0.0f ? m.m2 / m.n : 0.0f;
    const float rstd = rsqrtf(var + __int_as_float(eps_bits));
    abm[gc] = scale[gc % C] * rstd;
    abm[GC + gc] = shift[gc % C];
    abm[2 * GC + gc] = m.mean;
    if (mean_out) mean_out[gc] = m.mean;
    if (var_out) var_out[gc] = var;
  }
}

// ---------------------------------------------------------------- batch_stats, one kernel
// Two passes over the data a block owns (moments, then normalize); no workspace, so
// TensorRT's ahead-of-time path can launch it. rows_layout == 0: grid (G*C), 1-D block,
// one (g, c) slab per block. rows_layout == 1 (inner == 1): grid (ceil(C/TW), G),
// block (TW, BY) with TW <= 32 channels (32 bytes: 8 fp32 or 16 fp16/bf16), one tile of
// one ghost batch per block.
template <typename T>
__device__ __forceinline__ void batch_stats_body(
    const typename T::S* __restrict__ x,  // [outer, C, inner] input
    const float* __restrict__ scale,      // [C] gamma
    const float* __restrict__ shift,      // [C] beta
    int C,                                // channels
    int inner,                            // elements per (row, channel)
    int opg,                              // rows per ghost batch
    int rows_layout,                      // 1: channels-last tiling (needs inner == 1)
    int act,                              // ACT_* code
    int alpha_bits,                       // leaky_relu slope as float bits
    int eps_bits,                         // epsilon as float bits
    typename T::S* __restrict__ y,        // [outer, C, inner] output
    float* __restrict__ mean_out,         // [G, C] batch mean, or null
    float* __restrict__ var_out)          // [G, C] biased batch variance, or null
{
  typedef typename T::S S;
  const int V = Pack<S>::V;
  const float alpha = __int_as_float(alpha_bits), eps = __int_as_float(eps_bits);
  if (!rows_layout) {
    const u32 gc = blockIdx.x, g = gc / (u32)C, c = gc % (u32)C;
    const u32 nthreads = blockDim.x * blockDim.y;
    const u32 tid = threadIdx.y * blockDim.x + threadIdx.x;
    const bool vec = aligned16(x) && aligned16(y) && (inner % V == 0);
    const u32 w = vec ? (u32)inner / V : (u32)inner;  // items per row segment
    const u32 total = (u32)opg * w;                    // items in the slab
    Moments m = {0.0f, 0.0f, 0.0f};
    // pass 1: moments of the slab (flattened, so short rows keep every thread busy)
    for (u32 t = tid; t < total; t += nthreads) {
      const u32 o = t / w, j = t - o * w;
      const S* seg = x + ((g * opg + o) * (u32)C + c) * (u32)inner;
      if (vec) {
        Pack<S> pk;
        pk.raw = *reinterpret_cast<const uint4*>(seg + j * V);
        push_pack<T>(m, pk);
      } else {
        push(m, T::load(seg[j]));
      }
    }
    m = block_reduce(m);
    const float var = m.m2 / m.n;
    const float a = scale[c] * rsqrtf(var + eps), b = shift[c], mean = m.mean;
    if (tid == 0 && mean_out) { mean_out[gc] = m.mean; var_out[gc] = var; }
    // pass 2: normalize
    for (u32 t = tid; t < total; t += nthreads) {
      const u32 o = t / w, j = t - o * w;
      const u32 base = ((g * opg + o) * (u32)C + c) * (u32)inner;
      if (vec) {
        Pack<S> in, out;
        in.raw = *reinterpret_cast<const uint4*>(x + base + j * V);
#pragma unroll
        for (int k = 0; k < V; ++k) out.e[k] = T::store(activate((T::load(in.e[k]) - mean) * a + b, act, alpha));
        *reinterpret_cast<uint4*>(y + base + j * V) = out.raw;
      } else {
        y[base + j] = T::store(activate((T::load(x[base + j]) - mean) * a + b, act, alpha));
      }
    }
    return;
  }
  // channels-last: block (TW, BY) covers TW channels (32 bytes of a row: one DRAM sector)
  __shared__ float sn[1024], sm[1024], sm2[1024];
  __shared__ float sa[32], sb[32], smean[32];
  const u32 TW = blockDim.x, BY = blockDim.y, tx = threadIdx.x, ty = threadIdx.y;
  const u32 c = blockIdx.x * TW + tx, g = blockIdx.y, slot = ty * TW + tx;
  Moments m = {0.0f, 0.0f, 0.0f};
  // pass 1: per-column Welford over this thread's rows, then a tree across threadIdx.y
  if (c < (u32)C)
    for (u32 o = ty; o < (u32)opg; o += BY) push(m, T::load(x[(g * opg + o) * (u32)C + c]));
  sn[slot] = m.n;
  sm[slot] = m.mean;
  sm2[slot] = m.m2;
  __syncthreads();
  for (u32 s = 1; s < BY; s <<= 1) {
    if (ty % (2 * s) == 0 && ty + s < BY) {  // partner ty + s does not write in this step
      combine(m, sn[slot + s * TW], sm[slot + s * TW], sm2[slot + s * TW]);
      sn[slot] = m.n;
      sm[slot] = m.mean;
      sm2[slot] = m.m2;
    }
    __syncthreads();
  }
  if (ty == 0 && c < (u32)C) {
    const float var = m.m2 / m.n;
    sa[tx] = scale[c] * rsqrtf(var + eps);
    sb[tx] = shift[c];
    smean[tx] = m.mean;
    if (mean_out) { mean_out[g * (u32)C + c] = m.mean; var_out[g * (u32)C + c] = var; }
  }
  __syncthreads();
  // pass 2: normalize
  if (c < (u32)C) {
    const float a = sa[tx], b = sb[tx], mean = smean[tx];
    for (u32 o = ty; o < (u32)opg; o += BY) {
      const u32 i = (g * opg + o) * (u32)C + c;
      y[i] = T::store(activate((T::load(x[i]) - mean) * a + b, act, alpha));
    }
  }
}

// ---------------------------------------------------------------- extern "C" entry points
#define FUSED_NORM_ENTRIES(SFX, T)                                                                 \
  extern "C" __global__ void fused_norm_affine_##SFX(                                             \
      const T::S* x, const float* scale, const float* shift, int n, int C, int inner, int opg,    \
      int groups, int act, int alpha_bits, T::S* y) {                                              \
    affine_body<T, false>(x, scale, shift, (const float*)0, n, C, inner, opg, groups, act,        \
                          __int_as_float(alpha_bits), y);                                          \
  }                                                                                                \
  extern "C" __global__ void fused_norm_apply_##SFX(                                              \
      const T::S* x, const float* a, const float* b, const float* mean, int n, int C, int inner,  \
      int opg, int groups, int act, int alpha_bits, T::S* y) {                                     \
    affine_body<T, true>(x, a, b, mean, n, C, inner, opg, groups, act, __int_as_float(alpha_bits), \
                         y);                                                                       \
  }                                                                                                \
  extern "C" __global__ void fused_norm_stats_planar_##SFX(const T::S* x, int C, int inner,       \
                                                           int opg, float* ws) {                   \
    stats_planar_body<T>(x, C, inner, opg, ws);                                                    \
  }                                                                                                \
  extern "C" __global__ void fused_norm_stats_rows_##SFX(const T::S* x, int C, int opg,           \
                                                         float* ws) {                              \
    stats_rows_body<T>(x, C, opg, ws);                                                             \
  }                                                                                                \
  extern "C" __global__ void fused_norm_batch_stats_##SFX(                                        \
      const T::S* x, const float* scale, const float* shift, int C, int inner, int opg,           \
      int rows_layout, int act, int alpha_bits, int eps_bits, T::S* y) {                           \
    batch_stats_body<T>(x, scale, shift, C, inner, opg, rows_layout, act, alpha_bits, eps_bits, y, \
                        (float*)0, (float*)0);                                                     \
  }                                                                                                \
  extern "C" __global__ void fused_norm_batch_stats_out_##SFX(                                    \
      const T::S* x, const float* scale, const float* shift, int C, int inner, int opg,           \
      int rows_layout, int act, int alpha_bits, int eps_bits, T::S* y, float* mean_out,            \
      float* var_out) {                                                                            \
    batch_stats_body<T>(x, scale, shift, C, inner, opg, rows_layout, act, alpha_bits, eps_bits, y, \
                        mean_out, var_out);                                                        \
  }

FUSED_NORM_ENTRIES(f32, F32)
FUSED_NORM_ENTRIES(f16, F16)
FUSED_NORM_ENTRIES(bf16, BF16)
