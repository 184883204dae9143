// eqicl's CPU kernel: the linear transformer's forward and backward pass on the D×D context
// statistics (eqicl/_fast.py states why that is exact), as an XLA FFI custom call.
//
// XLA-CPU runs batches of 11×11 products at a few GFLOP/s; here a tile of V sequences (one
// SIMD register's worth: 16 float32 or 8 float64) is processed at once, every D×D matrix held
// as D·D vectors of V lanes, so each multiply-add is one vector FMA over V sequences, and the
// whole forward and backward pass of a tile stays in L1/L2 cache. Tiles are split across
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
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// A tile's D×D matrices are stored padded to DP (a multiple of 12, zeros outside D×D), as
// m[(i * DP + j) * V + v]: V lanes (sequences) per entry, one SIMD register.
template <typename T>
struct Vec {
  static constexpr int V = 64 / sizeof(T);
  typedef T type __attribute__((vector_size(64)));
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

// C (+)= A B per lane, 3×4 blocks of C held in registers (DP is a multiple of 3 and of 4).
template <typename T>
void mm(T* __restrict c, Mat<T> a, Mat<T> b, int dp, bool add) {
  constexpr int V = Vec<T>::V;
  using vt = typename Vec<T>::type;
  for (int i0 = 0; i0 < dp; i0 += 3)
    for (int k0 = 0; k0 < dp; k0 += 4) {
      vt acc[3][4];
      for (int r = 0; r < 3; ++r)
        for (int q = 0; q < 4; ++q)
          acc[r][q] = add ? load(c + ((i0 + r) * dp + k0 + q) * V) : vt{} ;
      for (int j = 0; j < dp; ++j) {
        vt x[3], y[4];
        for (int r = 0; r < 3; ++r) x[r] = load(a.p + ((i0 + r) * a.si + j * a.sj) * V);
        for (int q = 0; q < 4; ++q) y[q] = load(b.p + (j * b.si + (k0 + q) * b.sj) * V);
        for (int r = 0; r < 3; ++r)
          for (int q = 0; q < 4; ++q) acc[r][q] += x[r] * y[q];
      }
      for (int r = 0; r < 3; ++r)
        for (int q = 0; q < 4; ++q) store(c + ((i0 + r) * dp + k0 + q) * V, acc[r][q]);
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

// Per-thread scratch: every layer's Sˡ and Tˡ, the readout rows, temporaries, and the
// parameters broadcast to V lanes (so shared-parameter products use the same routine).
template <typename T>
struct Work {
  static constexpr int V = Vec<T>::V;
  Buf<T> s, t, rho, tmp, tmp2, g, ds, drho, dt, pb, qb, gp, gq;
  Work(const Shape& sh, const T* p, const T* q, bool backward) {
    const int dp = sh.DP;
    const size_t m = size_t(dp) * dp * V;
    s.assign((sh.L + 1) * m);
    t.assign(sh.L * m);
    rho.assign((sh.L + 1) * dp * V);
    tmp.assign(m);
    tmp2.assign(m);
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
    if (backward) {
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
        mm(w.tmp.data(), N(w.pb.data() + (l * H + h) * m, dp), N<T>(sl, dp), dp, false);
        mm(tl, N<T>(w.tmp.data(), dp), N(w.qb.data() + (l * H + h) * m, dp), dp, h > 0);
      }
    } else {
      const T* wl = w.pb.data() + l * H * m;
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
        const T* ph = w.pb.data() + (l * H + h) * m;
        const T* qh = w.qb.data() + (l * H + h) * m;
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
      const T* wl = w.pb.data() + l * H * m;
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

template <typename T>
void run(const Shape& sh, const T* s0, const T* p, const T* q, const T* gw, bool all_layers,
         T* out, T* ds0, T* dp, T* dq) {
  constexpr int V = Vec<T>::V;
  const bool backward = gw != nullptr;
  const int64_t tiles = (sh.B + V - 1) / V;
  const int nt = num_threads(tiles);
  std::vector<Work<T>*> works(nt, nullptr);
  auto job = [&](int id) {
    Work<T>* w = new Work<T>(sh, p, q, backward);
    works[id] = w;
    for (int64_t t = id; t < tiles; t += nt) {
      forward_tile<T>(sh, s0, t * V, *w, all_layers, backward ? nullptr : out);
      if (backward) backward_tile<T>(sh, gw, t * V, *w, ds0);
    }
  };
  if (nt == 1) {
    job(0);
  } else {
    std::vector<std::thread> pool;
    for (int id = 0; id < nt; ++id) pool.emplace_back(job, id);
    for (auto& th : pool) th.join();
  }
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
  for (auto* w : works) delete w;
}

template <typename T>
void dispatch(const Shape& sh, const T* s0, const T* p, const T* q, const T* gw,
              bool all_layers, T* out, T* ds0, T* dp, T* dq) {
  run<T>(sh, s0, p, q, gw, all_layers, out, ds0, dp, dq);
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
    dispatch<float>(sh, s0.typed_data<float>(), p.typed_data<float>(), q.typed_data<float>(),
                    nullptr, all_layers != 0, out->typed_data<float>(), nullptr, nullptr, nullptr);
  else if (s0.element_type() == ffi::DataType::F64)
    dispatch<double>(sh, s0.typed_data<double>(), p.typed_data<double>(),
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
    dispatch<float>(sh, s0.typed_data<float>(), p.typed_data<float>(), q.typed_data<float>(),
                    g.typed_data<float>(), false, nullptr, ds0->typed_data<float>(),
                    dp->typed_data<float>(), dq->typed_data<float>());
  else if (s0.element_type() == ffi::DataType::F64)
    dispatch<double>(sh, s0.typed_data<double>(), p.typed_data<double>(),
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
