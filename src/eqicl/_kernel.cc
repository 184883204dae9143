// eqicl's CPU kernel: the linear transformer's forward and backward pass on the D×D context
// statistics (eqicl/_fast.py states why that is exact), as an XLA FFI custom call.
//
// XLA-CPU runs batches of 11×11 products at a few GFLOP/s; here a tile of V sequences (one
// SIMD register's worth: 16 float32 or 8 float64 with AVX-512, half that with AVX2) is
// processed at once, every D×D matrix held as D·D vectors of V lanes, so each multiply-add
// is one vector FMA over V sequences, and the whole forward and backward pass of a tile stays
// in L1/L2 cache. Tiles are split across
// threads. No fast-math: results equal the XLA formulation up to round-off (and FMA
// contraction).
//
// Layer l maps every token e ↦ Tˡ e with Tˡ = I + Aˡ, Aˡ = op_l(Sˡ), and Sˡ⁺¹ = Tˡ Sˡ Tˡᵀ.
//   mode 0 (FULL):        Aˡ = Σ_h P_h Sˡ Q_h        (p, q: (L, H, D, D))
//   mode 1 (element-wise): Aˡ = W ⊙ Sˡ, W = p[l, 0]   (DIAG and GD++; q unused)
// Outputs: wᴸ = −(e_Dᵀ Tᴸ⁻¹ ⋯ T⁰)[:d] (d, B), or with all_layers wˡ after every layer (L, d, B).
// The backward call returns the gradients of <g, wᴸ> with respect to S⁰, p and q.

#include <algorithm>
#include <cstdlib>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// A tile's D×D matrices are stored padded to DP (a multiple of 12, zeros outside D×D), as
// m[(i * DP + j) * V + v]: V lanes (sequences) per entry, one SIMD register.
//
// One lane vector is one SIMD register of the target: 64 bytes with AVX-512, 32 with AVX and
// AVX2, 16 otherwise. (A 64-byte vector on an AVX2 target is lowered piecewise, which made
// the whole kernel several times slower there.) The register block of `mm` fits the target's
// register file: 3×4 accumulators of 32 registers, 2×4 of 16.
#if defined(__AVX512F__)
#define EQICL_VB 64
#define EQICL_R 3
#define EQICL_Q 4
#elif defined(__AVX__)
#define EQICL_VB 32
#define EQICL_R 2
#define EQICL_Q 4
#else
#define EQICL_VB 16
#define EQICL_R 2
#define EQICL_Q 4
#endif

template <typename T>
struct Vec {
  static constexpr int V = EQICL_VB / sizeof(T);
  typedef T type __attribute__((vector_size(EQICL_VB)));
};

template <typename T>
inline typename Vec<T>::type load(const T* p) {
  typename Vec<T>::type x;
  std::memcpy(&x, p, sizeof(x));
  return x;
}
template <typename T>
inline void store(T* p, typename Vec<T>::type x) {
  std::memcpy(p, &x, sizeof(x));
}

// A matrix operand: entry (i, j) at (i * si + j * sj) * V; a transpose swaps the strides.
template <typename T>
struct Mat {
  const T* p;
  int si, sj;
};
template <typename T>
Mat<T> N(const T* p, int dp) { return {p, dp, 1}; }
template <typename T>
Mat<T> Tr(const T* p, int dp) { return {p, 1, dp}; }

// C (+)= A B per lane, EQICL_R×EQICL_Q blocks of C held in registers (DP, a multiple of 12,
// is one of both). Every entry of C sums over j in the same order whatever the block.
template <typename T>
void mm(T* __restrict c, Mat<T> a, Mat<T> b, int dp, bool add) {
  constexpr int V = Vec<T>::V;
  using vt = typename Vec<T>::type;
  for (int i0 = 0; i0 < dp; i0 += EQICL_R)
    for (int k0 = 0; k0 < dp; k0 += EQICL_Q) {
      vt acc[EQICL_R][EQICL_Q];
      for (int r = 0; r < EQICL_R; ++r)
        for (int q = 0; q < EQICL_Q; ++q)
          acc[r][q] = add ? load(c + ((i0 + r) * dp + k0 + q) * V) : vt{} ;
      for (int j = 0; j < dp; ++j) {
        vt x[EQICL_R], y[EQICL_Q];
        for (int r = 0; r < EQICL_R; ++r) x[r] = load(a.p + ((i0 + r) * a.si + j * a.sj) * V);
        for (int q = 0; q < EQICL_Q; ++q) y[q] = load(b.p + (j * b.si + (k0 + q) * b.sj) * V);
        for (int r = 0; r < EQICL_R; ++r)
          for (int q = 0; q < EQICL_Q; ++q) acc[r][q] += x[r] * y[q];
      }
      for (int r = 0; r < EQICL_R; ++r)
        for (int q = 0; q < EQICL_Q; ++q) store(c + ((i0 + r) * dp + k0 + q) * V, acc[r][q]);
    }
}

struct Shape {
  int64_t D, B, L, H;
  int mode;
  int DP;
};

template <typename T>
struct Buf {
  T* p = nullptr;
  size_t n = 0;
  void assign(size_t size) {
    std::free(p);
    n = size;
    p = static_cast<T*>(std::aligned_alloc(64, ((size * sizeof(T) + 63) / 64) * 64));
    std::fill(p, p + n, T(0));
  }
  T* data() { return p; }
  ~Buf() { std::free(p); }
};

// The layers' parameters broadcast to V lanes, so that shared-parameter products use the same
// routine as per-sequence ones. Built once per call and read by every thread.
template <typename T>
struct Params {
  static constexpr int V = Vec<T>::V;
  Buf<T> pb, qb;
  Params(const Shape& sh, const T* p, const T* q) {
    const int dp = sh.DP;
    const size_t m = size_t(dp) * dp * V;
    const int64_t D = sh.D, np = sh.L * sh.H;
    pb.assign(np * m);
    qb.assign(sh.mode == 0 ? np * m : 1);
    for (int64_t h = 0; h < np; ++h)
      for (int i = 0; i < D; ++i)
        for (int j = 0; j < D; ++j)
          for (int v = 0; v < V; ++v) {
            pb.p[h * m + (i * dp + j) * V + v] = p[(h * D + i) * D + j];
            if (sh.mode == 0) qb.p[h * m + (i * dp + j) * V + v] = q[(h * D + i) * D + j];
          }
  }
};

// Per-thread scratch: every layer's Sˡ and Tˡ, the readout rows, temporaries and the
// lane-wise parameter-gradient accumulators.
template <typename T>
struct Work {
  static constexpr int V = Vec<T>::V;
  const Params<T>& prm;
  Buf<T> s, t, rho, tmp, tmp2, g, ds, drho, dt, gp, gq;
  Work(const Shape& sh, const Params<T>& params, bool backward) : prm(params) {
    const int dp = sh.DP;
    const size_t m = size_t(dp) * dp * V;
    s.assign((sh.L + 1) * m);
    t.assign(sh.L * m);
    rho.assign((sh.L + 1) * dp * V);
    tmp.assign(m);
    tmp2.assign(m);
    if (backward) {
      const int64_t np = sh.L * sh.H;
      g.assign(m);
      ds.assign(m);
      dt.assign(m);
      drho.assign((sh.L + 1) * dp * V);
      gp.assign(np * m);
      gq.assign(sh.mode == 0 ? np * m : 1);
    }
  }
};

// Forward pass of one tile (lanes b0 .. b0 + V of the batch); fills w.s, w.t, w.rho.
template <typename T>
void forward_tile(const Shape& sh, const T* s0, int64_t b0, Work<T>& w, bool all_layers, T* out) {
  constexpr int V = Vec<T>::V;
  const int D = int(sh.D), dp = sh.DP, d = D - 1;
  const int64_t B = sh.B, L = sh.L, H = sh.H;
  const size_t m = size_t(dp) * dp * V;
  const int nv = int(std::min<int64_t>(V, B - b0));
  T* s = w.s.data();
  for (int i = 0; i < D; ++i)
    for (int j = 0; j < D; ++j)
      for (int v = 0; v < V; ++v)
        s[(i * dp + j) * V + v] = v < nv ? s0[(i * D + j) * B + b0 + v] : T(0);
  for (int64_t l = 0; l < L; ++l) {
    T* sl = s + l * m;
    T* tl = w.t.data() + l * m;
    if (sh.mode == 0) {
      for (int64_t h = 0; h < H; ++h) {
        mm(w.tmp.data(), N<T>(w.prm.pb.p + (l * H + h) * m, dp), N<T>(sl, dp), dp, false);
        mm(tl, N<T>(w.tmp.data(), dp), N<T>(w.prm.qb.p + (l * H + h) * m, dp), dp, h > 0);
      }
    } else {
      const T* wl = w.prm.pb.p + l * H * m;
      for (size_t e = 0; e < m; ++e) tl[e] = wl[e] * sl[e];
    }
    for (int i = 0; i < D; ++i)
      for (int v = 0; v < V; ++v) tl[(i * dp + i) * V + v] += T(1);
    if (l + 1 < L) {
      mm(w.tmp.data(), N<T>(tl, dp), N<T>(sl, dp), dp, false);
      mm(sl + m, N<T>(w.tmp.data(), dp), Tr<T>(tl, dp), dp, false);
    }
  }
  if (all_layers) {
    // Cumulative map C = Tˡ ⋯ T⁰; wˡ = −(row d of C)[:d].
    T* c = w.tmp2.data();
    std::fill(c, c + m, T(0));
    for (int i = 0; i < D; ++i)
      for (int v = 0; v < V; ++v) c[(i * dp + i) * V + v] = T(1);
    for (int64_t l = 0; l < L; ++l) {
      mm(w.tmp.data(), N<T>(w.t.data() + l * m, dp), N<T>(c, dp), dp, false);
      std::memcpy(c, w.tmp.data(), m * sizeof(T));
      for (int j = 0; j < d; ++j)
        for (int v = 0; v < nv; ++v) out[(l * d + j) * B + b0 + v] = -c[(d * dp + j) * V + v];
    }
    return;
  }
  // Readout rows: ρᴸ = e_d, ρˡ = ρˡ⁺¹ Tˡ.
  using vt = typename Vec<T>::type;
  T* rho = w.rho.data();
  std::fill(rho + L * dp * V, rho + (L + 1) * dp * V, T(0));
  for (int v = 0; v < V; ++v) rho[(L * dp + d) * V + v] = T(1);
  for (int64_t l = L - 1; l >= 0; --l) {
    const T* tl = w.t.data() + l * m;
    const T* up = rho + (l + 1) * dp * V;
    T* r = rho + l * dp * V;
    for (int c = 0; c < dp; ++c) {
      vt acc{};
      for (int i = 0; i < D; ++i) acc += load(up + i * V) * load(tl + (i * dp + c) * V);
      store(r + c * V, acc);
    }
  }
  if (out != nullptr)
    for (int j = 0; j < d; ++j)
      for (int v = 0; v < nv; ++v) out[j * B + b0 + v] = -rho[j * V + v];
}

// Backward pass of one tile after forward_tile: accumulates lane-wise dp, dq, writes dS⁰.
template <typename T>
void backward_tile(const Shape& sh, const T* gw, int64_t b0, Work<T>& w, T* ds0) {
  constexpr int V = Vec<T>::V;
  using vt = typename Vec<T>::type;
  const int D = int(sh.D), dp = sh.DP, d = D - 1;
  const int64_t B = sh.B, L = sh.L, H = sh.H;
  const size_t m = size_t(dp) * dp * V;
  const int nv = int(std::min<int64_t>(V, B - b0));
  // dρ⁰ = (−g, 0), dρˡ⁺¹ = Tˡ dρˡ; then dTˡ = ρˡ⁺¹ ⊗ dρˡ.
  T* drho = w.drho.data();
  std::fill(drho, drho + dp * V, T(0));
  for (int j = 0; j < d; ++j)
    for (int v = 0; v < nv; ++v) drho[j * V + v] = -gw[j * B + b0 + v];
  for (int64_t l = 0; l + 1 < L; ++l) {
    const T* tl = w.t.data() + l * m;
    const T* cur = drho + l * dp * V;
    T* nxt = drho + (l + 1) * dp * V;
    for (int i = 0; i < dp; ++i) {
      vt acc{};
      for (int c = 0; c < dp; ++c) acc += load(tl + (i * dp + c) * V) * load(cur + c * V);
      store(nxt + i * V, acc);
    }
  }
  T* dt = w.dt.data();
  T* G = w.g.data();  // dSˡ⁺¹
  for (int64_t l = L - 1; l >= 0; --l) {
    const T* dr = drho + l * dp * V;
    const T* up = w.rho.data() + (l + 1) * dp * V;
    for (int i = 0; i < dp; ++i)
      for (int c = 0; c < dp; ++c)
        store(dt + (i * dp + c) * V, load(up + i * V) * load(dr + c * V));
    const T* sl = w.s.data() + l * m;
    const T* tl = w.t.data() + l * m;
    if (l + 1 < L) {
      // Sˡ⁺¹ = T S Tᵀ: dT += (G + Gᵀ) T S, dS = Tᵀ G T.
      T* gs = w.tmp2.data();
      for (int i = 0; i < dp; ++i)
        for (int j = 0; j < dp; ++j)
          store(gs + (i * dp + j) * V, load(G + (i * dp + j) * V) + load(G + (j * dp + i) * V));
      mm(w.tmp.data(), N<T>(tl, dp), N<T>(sl, dp), dp, false);          // U = T S
      mm(dt, N<T>(gs, dp), N<T>(w.tmp.data(), dp), dp, true);           // dT += Gs U
      mm(w.tmp.data(), Tr<T>(tl, dp), N<T>(G, dp), dp, false);          // Tᵀ G
      mm(w.ds.data(), N<T>(w.tmp.data(), dp), N<T>(tl, dp), dp, false); // (Tᵀ G) T
    } else {
      std::fill(w.ds.data(), w.ds.data() + m, T(0));
    }
    // Through Aˡ = op(Sˡ), dA = dT.
    if (sh.mode == 0) {
      for (int64_t h = 0; h < H; ++h) {
        const T* ph = w.prm.pb.p + (l * H + h) * m;
        const T* qh = w.prm.qb.p + (l * H + h) * m;
        T* gp = w.gp.data() + (l * H + h) * m;
        T* gq = w.gq.data() + (l * H + h) * m;
        mm(w.tmp.data(), N<T>(sl, dp), N<T>(qh, dp), dp, false);        // X = S Q
        mm(gp, N<T>(dt, dp), Tr<T>(w.tmp.data(), dp), dp, true);        // dP += dA Xᵀ
        mm(w.tmp.data(), N<T>(ph, dp), N<T>(sl, dp), dp, false);        // Y = P S
        mm(gq, Tr<T>(w.tmp.data(), dp), N<T>(dt, dp), dp, true);        // dQ += Yᵀ dA
        mm(w.tmp.data(), N<T>(dt, dp), Tr<T>(qh, dp), dp, false);       // Z = dA Qᵀ
        mm(w.ds.data(), Tr<T>(ph, dp), N<T>(w.tmp.data(), dp), dp, true);  // dS += Pᵀ Z
      }
    } else {
      const T* wl = w.prm.pb.p + l * H * m;
      T* gp = w.gp.data() + l * H * m;
      T* ds = w.ds.data();
      for (size_t e = 0; e < m; ++e) {
        gp[e] += dt[e] * sl[e];
        ds[e] += dt[e] * wl[e];
      }
    }
    std::memcpy(G, w.ds.data(), m * sizeof(T));
  }
  for (int i = 0; i < D; ++i)
    for (int j = 0; j < D; ++j)
      for (int v = 0; v < nv; ++v) ds0[(i * D + j) * B + b0 + v] = G[(i * dp + j) * V + v];
}

int num_threads(int64_t tiles) {
  int n = int(std::thread::hardware_concurrency());
  if (const char* env = std::getenv("EQICL_KERNEL_THREADS")) n = std::atoi(env);
  n = std::max(1, n);
  return int(std::min<int64_t>(n, tiles));
}

// Runs job(0) .. job(nt - 1), each on its own thread (the caller's for nt = 1).
template <typename F>
void parallel(int nt, F&& job) {
  if (nt == 1) {
    job(0);
    return;
  }
  std::vector<std::thread> pool;
  for (int id = 0; id < nt; ++id) pool.emplace_back(job, id);
  for (auto& th : pool) th.join();
}

template <typename T>
void run(const Shape& sh, const T* s0, const T* p, const T* q, const T* gw, bool all_layers,
         T* out, T* ds0, T* dp, T* dq) {
  constexpr int V = Vec<T>::V;
  const bool backward = gw != nullptr;
  const int64_t tiles = (sh.B + V - 1) / V;
  const int nt = num_threads(tiles);
  const Params<T> params(sh, p, q);
  std::vector<std::unique_ptr<Work<T>>> works(nt);
  auto job = [&](int id) {
    works[id] = std::make_unique<Work<T>>(sh, params, backward);
    Work<T>* w = works[id].get();
    for (int64_t t = id; t < tiles; t += nt) {
      forward_tile<T>(sh, s0, t * V, *w, all_layers, backward ? nullptr : out);
      if (backward) backward_tile<T>(sh, gw, t * V, *w, ds0);
    }
  };
  parallel(nt, job);
  if (backward) {
    const int dpad = sh.DP;
    const size_t m = size_t(dpad) * dpad * V;
    const int64_t D = sh.D;
    for (int64_t h = 0; h < sh.L * sh.H; ++h)
      for (int i = 0; i < D; ++i)
        for (int j = 0; j < D; ++j) {
          T a = 0, b = 0;
          const size_t e = h * m + (i * dpad + j) * V;
          for (int id = 0; id < nt; ++id)
            for (int v = 0; v < V; ++v) {
              a += works[id]->gp.p[e + v];
              if (sh.mode == 0) b += works[id]->gq.p[e + v];
            }
          dp[(h * D + i) * D + j] = a;
          dq[(h * D + i) * D + j] = b;
        }
  }
}



// ---------------------------------------------------------------------------------------------
// Sampling. Z ~ Wishart_D(n, I), i.e. distributed as Σ_{j=1}^{n} z_j z_jᵀ with z_j ~ N(0, I_D),
// plus m extra standard normals per sequence. For n ≥ D by Bartlett's decomposition
// (Z = A Aᵀ, A lower triangular, A_ii² ~ χ²_{n−i}, A_ij ~ N(0, 1) below the diagonal), so the
// cost does not grow with n; for n < D as the sum itself.
// Random numbers: every sequence has its own xoshiro256++ stream (Blackman & Vigna), seeded by
// Philox-4x32-10 (Salmon et al., SC'11) of (caller's key, sequence index), so the result depends
// on neither the thread count nor the batch split. Normals by the ziggurat method with 128
// layers in Doornik's form (separate bits for the layer and the 53-bit abscissa; exact
// rejection, tail by Marsaglia's method); χ² as 2·Gamma(k/2) by Marsaglia–Tsang (k = 1: a
// squared normal). All in float64.

struct Ziggurat {
  static constexpr int C = 128;
  static constexpr double R = 3.442619855899, V = 9.91256303526217e-3;
  double x[C + 1], ratio[C];
  Ziggurat() {
    auto f = [](double t) { return std::exp(-0.5 * t * t); };
    x[0] = V / f(R);
    x[1] = R;
    for (int i = 2; i < C; ++i) x[i] = std::sqrt(-2.0 * std::log(V / x[i - 1] + f(x[i - 1])));
    x[C] = 0.0;
    for (int i = 0; i < C; ++i) ratio[i] = x[i + 1] / x[i];
  }
};

const Ziggurat& ziggurat() {
  static const Ziggurat z;
  return z;
}

inline uint64_t rotl(uint64_t v, int k) { return (v << k) | (v >> (64 - k)); }

inline uint64_t splitmix64(uint64_t& s) {
  uint64_t z = (s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

struct Stream {
  uint64_t st[4];
  const Ziggurat& zig = ziggurat();

  Stream(uint32_t key0, uint32_t key1, uint64_t seq) {
    // Philox-4x32-10 of counter (seq, 0) under key (key0, key1).
    uint32_t c0 = uint32_t(seq), c1 = uint32_t(seq >> 32), c2 = 0, c3 = 0;
    uint32_t a = key0, b = key1;
    for (int r = 0; r < 10; ++r) {
      const uint64_t p0 = uint64_t(0xD2511F53u) * c0;
      const uint64_t p1 = uint64_t(0xCD9E8D57u) * c2;
      const uint32_t n0 = uint32_t(p1 >> 32) ^ c1 ^ a;
      const uint32_t n2 = uint32_t(p0 >> 32) ^ c3 ^ b;
      c1 = uint32_t(p1);
      c3 = uint32_t(p0);
      c0 = n0;
      c2 = n2;
      a += 0x9E3779B9u;
      b += 0xBB67AE85u;
    }
    uint64_t s = (uint64_t(c0) << 32 | c1) ^ rotl(uint64_t(c2) << 32 | c3, 17);
    for (auto& v : st) v = splitmix64(s);
  }
  uint64_t next() {  // xoshiro256++
    const uint64_t out = rotl(st[0] + st[3], 23) + st[0];
    const uint64_t t = st[1] << 17;
    st[2] ^= st[0];
    st[3] ^= st[1];
    st[1] ^= st[2];
    st[0] ^= st[3];
    st[2] ^= t;
    st[3] = rotl(st[3], 45);
    return out;
  }
  // Uniform on (0, 1), 53 random bits, never 0 or 1.
  double uniform() { return (double(next() >> 11) + 0.5) * (1.0 / 9007199254740992.0); }
  double normal() {
    for (;;) {
      const uint64_t r = next();
      const int i = int(r & 0x7F);                                          // layer: low 7 bits
      const double u = 2.0 * ((double(r >> 11) + 0.5) * (1.0 / 9007199254740992.0)) - 1.0;
      if (std::fabs(u) < zig.ratio[i]) return u * zig.x[i];
      if (i == 0) {  // the tail beyond R
        double t, y;
        do {
          t = std::log(uniform()) / Ziggurat::R;
          y = std::log(uniform());
        } while (-2.0 * y < t * t);
        return u < 0 ? t - Ziggurat::R : Ziggurat::R - t;
      }
      const double xx = u * zig.x[i];
      const double f0 = std::exp(-0.5 * (zig.x[i] * zig.x[i] - xx * xx));
      const double f1 = std::exp(-0.5 * (zig.x[i + 1] * zig.x[i + 1] - xx * xx));
      if (f0 + uniform() * (f1 - f0) < 1.0) return xx;
    }
  }
  double gamma(double a) {  // a ≥ 1
    const double d = a - 1.0 / 3.0, c = 1.0 / std::sqrt(9.0 * d);
    for (;;) {
      const double x = normal();
      double v = 1.0 + c * x;
      if (v <= 0.0) continue;
      v = v * v * v;
      const double u = uniform();
      if (u < 1.0 - 0.0331 * x * x * x * x) return d * v;
      if (std::log(u) < 0.5 * x * x + d * (1.0 - v + std::log(v))) return d * v;
    }
  }
  double chi2(int64_t k) {
    if (k == 1) {
      const double z = normal();
      return z * z;
    }
    return 2.0 * gamma(0.5 * double(k));
  }
};

// One sequence into column `col` of the block buffers zb (D·D × W) and eb (m × W).
void sample_one(uint32_t k0, uint32_t k1, int64_t b, int64_t n, int D, int64_t m, int col,
                int W, double* zb, double* eb, double* a) {
  Stream g(k0, k1, uint64_t(b));
  if (n >= D) {
    std::fill(a, a + D * D, 0.0);
    for (int i = 0; i < D; ++i) {
      a[i * D + i] = std::sqrt(g.chi2(n - i));
      for (int j = 0; j < i; ++j) a[i * D + j] = g.normal();
    }
    for (int i = 0; i < D; ++i)
      for (int j = 0; j <= i; ++j) {
        double acc = 0.0;
        for (int k = 0; k <= j; ++k) acc += a[i * D + k] * a[j * D + k];
        zb[(i * D + j) * W + col] = zb[(j * D + i) * W + col] = acc;
      }
  } else {
    for (int ij = 0; ij < D * D; ++ij) zb[ij * W + col] = 0.0;
    for (int64_t t = 0; t < n; ++t) {
      for (int i = 0; i < D; ++i) a[i] = g.normal();
      for (int i = 0; i < D; ++i)
        for (int j = 0; j < D; ++j) zb[(i * D + j) * W + col] += a[i] * a[j];
    }
  }
  for (int64_t e = 0; e < m; ++e) eb[e * W + col] = g.normal();
}

template <typename T>
void sample_all(uint32_t k0, uint32_t k1, int64_t n, int D, int64_t B, int64_t m, T* z,
                T* extra) {
  // Sequences are drawn in blocks of W and written out row by row: writing one sequence's
  // D·D entries at a stride of B (a power of two, typically) would thrash one cache set.
  constexpr int W = 32;
  const int64_t blocks = (B + W - 1) / W;
  const int nt = num_threads(blocks);
  auto job = [&](int id) {
    std::vector<double> a(D * D), zb(size_t(D) * D * W), eb(size_t(std::max<int64_t>(m, 1)) * W);
    for (int64_t blk = id; blk < blocks; blk += nt) {
      const int64_t b0 = blk * W;
      const int w = int(std::min<int64_t>(W, B - b0));
      for (int col = 0; col < w; ++col)
        sample_one(k0, k1, b0 + col, n, D, m, col, W, zb.data(), eb.data(), a.data());
      for (int ij = 0; ij < D * D; ++ij)
        for (int col = 0; col < w; ++col) z[ij * B + b0 + col] = T(zb[ij * W + col]);
      for (int64_t e = 0; e < m; ++e)
        for (int col = 0; col < w; ++col) extra[e * B + b0 + col] = T(eb[e * W + col]);
    }
  };
  parallel(nt, job);
}

ffi::Error SampleImpl(ffi::Buffer<ffi::U32> key, ffi::Result<ffi::AnyBuffer> z,
                      ffi::Result<ffi::AnyBuffer> extra, int64_t n) {
  auto dk = key.dimensions();
  auto dz = z->dimensions();
  auto de = extra->dimensions();
  if (dk.size() != 1 || dk[0] != 2 || dz.size() != 3 || dz[0] != dz[1] || de.size() != 2 ||
      de[1] != dz[2] || n < 1 || dz[0] < 1 || z->element_type() != extra->element_type())
    return ffi::Error::InvalidArgument(
        "eqicl sampler: expected key (2,) uint32, z (D, D, B), extra (m, B), n >= 1");
  const uint32_t* k = key.typed_data();
  const int D = int(dz[0]);
  if (z->element_type() == ffi::DataType::F32)
    sample_all<float>(k[0], k[1], n, D, dz[2], de[0], z->typed_data<float>(),
                      extra->typed_data<float>());
  else if (z->element_type() == ffi::DataType::F64)
    sample_all<double>(k[0], k[1], n, D, dz[2], de[0], z->typed_data<double>(),
                       extra->typed_data<double>());
  else
    return ffi::Error::InvalidArgument("eqicl sampler: float32 or float64 only");
  return ffi::Error::Success();
}


// ---------------------------------------------------------------------------------------------
// The posterior mean μ = (Σ + σ² I)⁻¹ α of every sequence (SPEC §5), from S⁰ = [[Σ, α], [αᵀ, λ]]:
// a Cholesky factorisation and two triangular solves per sequence, in float64.

template <typename T>
void posterior_all(const T* s, const T* sigma, int D, int64_t B, T* mu) {
  const int d = D - 1;
  constexpr int W = 32;  // sequences per block, read and written row by row (see sample_all)
  const int64_t blocks = (B + W - 1) / W;
  const int nt = num_threads(blocks);
  auto job = [&](int id) {
    std::vector<double> m(size_t(d) * d * W), r(size_t(d) * W), lo(size_t(d) * d), z(d);
    for (int64_t blk = id; blk < blocks; blk += nt) {
      const int64_t b0 = blk * W;
      const int w = int(std::min<int64_t>(W, B - b0));
      for (int i = 0; i < d; ++i) {
        for (int j = 0; j < d; ++j)
          for (int c = 0; c < w; ++c) m[(i * d + j) * W + c] = double(s[(i * D + j) * B + b0 + c]);
        for (int c = 0; c < w; ++c) r[i * W + c] = double(s[(i * D + d) * B + b0 + c]);
      }
      for (int c = 0; c < w; ++c) {
        const double s2 = double(sigma[b0 + c]) * double(sigma[b0 + c]);
        for (int j = 0; j < d; ++j) {
          double acc = m[(j * d + j) * W + c] + s2;
          for (int k = 0; k < j; ++k) acc -= lo[j * d + k] * lo[j * d + k];
          lo[j * d + j] = std::sqrt(acc);
          for (int i = j + 1; i < d; ++i) {
            double a = m[(i * d + j) * W + c];
            for (int k = 0; k < j; ++k) a -= lo[i * d + k] * lo[j * d + k];
            lo[i * d + j] = a / lo[j * d + j];
          }
        }
        for (int i = 0; i < d; ++i) {
          double acc = r[i * W + c];
          for (int k = 0; k < i; ++k) acc -= lo[i * d + k] * z[k];
          z[i] = acc / lo[i * d + i];
        }
        for (int i = d - 1; i >= 0; --i) {
          double acc = z[i];
          for (int k = i + 1; k < d; ++k) acc -= lo[k * d + i] * r[k * W + c];
          r[i * W + c] = acc / lo[i * d + i];  // r now holds μ from index i on
        }
      }
      for (int i = 0; i < d; ++i)
        for (int c = 0; c < w; ++c) mu[i * B + b0 + c] = T(r[i * W + c]);
    }
  };
  parallel(nt, job);
}

ffi::Error PosteriorImpl(ffi::AnyBuffer s, ffi::AnyBuffer sigma, ffi::Result<ffi::AnyBuffer> mu) {
  auto ds = s.dimensions();
  auto dg = sigma.dimensions();
  auto dm = mu->dimensions();
  if (ds.size() != 3 || ds[0] != ds[1] || ds[0] < 2 || dg.size() != 1 || dg[0] != ds[2] ||
      dm.size() != 2 || dm[0] != ds[0] - 1 || dm[1] != ds[2] ||
      s.element_type() != sigma.element_type() || s.element_type() != mu->element_type())
    return ffi::Error::InvalidArgument(
        "eqicl posterior: expected s (D, D, B), sigma (B,), mu (D - 1, B) of one dtype");
  const int D = int(ds[0]);
  if (s.element_type() == ffi::DataType::F32)
    posterior_all<float>(s.typed_data<float>(), sigma.typed_data<float>(), D, ds[2],
                         mu->typed_data<float>());
  else if (s.element_type() == ffi::DataType::F64)
    posterior_all<double>(s.typed_data<double>(), sigma.typed_data<double>(), D, ds[2],
                          mu->typed_data<double>());
  else
    return ffi::Error::InvalidArgument("eqicl posterior: float32 or float64 only");
  return ffi::Error::Success();
}

ffi::Error check(const ffi::AnyBuffer& s0, const ffi::AnyBuffer& p, const ffi::AnyBuffer& q,
                 int64_t mode, Shape* sh) {
  auto ds = s0.dimensions();
  auto dp = p.dimensions();
  auto dq = q.dimensions();
  if (ds.size() != 3 || dp.size() != 4 || dq.size() != 4 || ds[0] != ds[1] ||
      dp[2] != ds[0] || dp[3] != ds[0] || dq[0] != dp[0] || dq[1] != dp[1] ||
      dq[2] != ds[0] || dq[3] != ds[0])
    return ffi::Error::InvalidArgument("eqicl kernel: expected s (D,D,B), p and q (L,H,D,D)");
  if (s0.element_type() != p.element_type() || s0.element_type() != q.element_type())
    return ffi::Error::InvalidArgument("eqicl kernel: s, p and q must share a dtype");
  if (mode != 0 && mode != 1)
    return ffi::Error::InvalidArgument("eqicl kernel: mode must be 0 (full) or 1 (element-wise)");
  *sh = Shape{ds[0], ds[2], dp[0], dp[1], int(mode), int((ds[0] + 11) / 12 * 12)};
  if (sh->D < 2 || sh->D > 64 || sh->L < 1 || sh->H < 1)
    return ffi::Error::InvalidArgument("eqicl kernel: need 2 <= D <= 64, L >= 1, H >= 1");
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(ffi::AnyBuffer s0, ffi::AnyBuffer p, ffi::AnyBuffer q,
                       ffi::Result<ffi::AnyBuffer> out, int64_t mode, int64_t all_layers) {
  Shape sh;
  if (auto e = check(s0, p, q, mode, &sh); e.failure()) return e;
  if (s0.element_type() == ffi::DataType::F32)
    run<float>(sh, s0.typed_data<float>(), p.typed_data<float>(), q.typed_data<float>(),
                    nullptr, all_layers != 0, out->typed_data<float>(), nullptr, nullptr, nullptr);
  else if (s0.element_type() == ffi::DataType::F64)
    run<double>(sh, s0.typed_data<double>(), p.typed_data<double>(),
                     q.typed_data<double>(), nullptr, all_layers != 0,
                     out->typed_data<double>(), nullptr, nullptr, nullptr);
  else
    return ffi::Error::InvalidArgument("eqicl kernel: float32 or float64 only");
  return ffi::Error::Success();
}

ffi::Error BackwardImpl(ffi::AnyBuffer s0, ffi::AnyBuffer p, ffi::AnyBuffer q,
                        ffi::AnyBuffer g, ffi::Result<ffi::AnyBuffer> ds0,
                        ffi::Result<ffi::AnyBuffer> dp, ffi::Result<ffi::AnyBuffer> dq,
                        int64_t mode) {
  Shape sh;
  if (auto e = check(s0, p, q, mode, &sh); e.failure()) return e;
  auto dg = g.dimensions();
  if (dg.size() != 2 || dg[0] != sh.D - 1 || dg[1] != sh.B || g.element_type() != s0.element_type())
    return ffi::Error::InvalidArgument("eqicl kernel: g must be (D - 1, B) of s's dtype");
  if (s0.element_type() == ffi::DataType::F32)
    run<float>(sh, s0.typed_data<float>(), p.typed_data<float>(), q.typed_data<float>(),
                    g.typed_data<float>(), false, nullptr, ds0->typed_data<float>(),
                    dp->typed_data<float>(), dq->typed_data<float>());
  else if (s0.element_type() == ffi::DataType::F64)
    run<double>(sh, s0.typed_data<double>(), p.typed_data<double>(),
                     q.typed_data<double>(), g.typed_data<double>(), false, nullptr,
                     ds0->typed_data<double>(), dp->typed_data<double>(),
                     dq->typed_data<double>());
  else
    return ffi::Error::InvalidArgument("eqicl kernel: float32 or float64 only");
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(EqiclForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("mode")
                                  .Attr<int64_t>("all_layers"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(EqiclBackward, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("mode"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(EqiclSample, SampleImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("n"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(EqiclPosterior, PosteriorImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
