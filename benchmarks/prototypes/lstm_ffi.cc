// A prototype, not part of elmojax: the biLM's LSTM forward recurrence (inference: no
// residuals for a backward pass) as an XLA FFI custom call, each direction on a thread of its
// own, to measure what a hand-written CPU kernel would gain over the lax.scan recurrence that
// XLA:CPU runs on one core (benchmarks/RESULTS.md, issue #27's fourth part). Built and timed by
// benchmarks/lstm_ffi.py. Its semantics are elmojax.model.lstm.lstm_recurrence's; its tanh is
// Eigen's and XLA's rational approximation; 4 * dim and the projection's width must be
// multiples of 64, the batch a multiple of 4.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

static inline float fast_tanh(float a) {
  const float x = std::max(std::min(a, 7.90531110763549805f), -7.90531110763549805f);
  const float x2 = x * x;
  float p = -2.76076847742355e-16f;
  p = p * x2 + 2.00018790482477e-13f;
  p = p * x2 + -8.60467152213735e-11f;
  p = p * x2 + 5.12229709037114e-08f;
  p = p * x2 + 1.48572235717979e-05f;
  p = p * x2 + 6.37261928875436e-04f;
  p = p * x2 + 4.89352455891786e-03f;
  p = p * x;
  float q = 1.19825839466702e-06f;
  q = q * x2 + 1.18534705686654e-04f;
  q = q * x2 + 2.26843463243900e-03f;
  q = q * x2 + 4.89352518554385e-03f;
  return std::fabs(x) < 0.0004f ? x : p / q;
}

// out[b, n] = init[b, n] + sum_k a[b, k] * w[k, n]; rows a multiple of 4, n of 64
static void matmul_acc(const float* a, const float* w, const float* init, const float* bias, float* out,
                       int rows, int k_dim, int n_dim) {
  for (int n0 = 0; n0 < n_dim; n0 += 64) {
    for (int b0 = 0; b0 < rows; b0 += 4) {
      float acc[4][64];
      for (int r = 0; r < 4; ++r)
        for (int j = 0; j < 64; ++j)
          acc[r][j] = (init ? init[(b0 + r) * n_dim + n0 + j] : 0.0f) + (bias ? bias[n0 + j] : 0.0f);
      for (int k = 0; k < k_dim; ++k) {
        const float* wk = w + (size_t)k * n_dim + n0;
        for (int r = 0; r < 4; ++r) {
          const float hv = a[(b0 + r) * k_dim + k];
          for (int j = 0; j < 64; ++j) acc[r][j] += hv * wk[j];
        }
      }
      for (int r = 0; r < 4; ++r)
        for (int j = 0; j < 64; ++j) out[(b0 + r) * n_dim + n0 + j] = acc[r][j];
    }
  }
}

struct Dims { int64_t T, B, H, P; };

static void run_direction(const Dims& d, const float* ig, const bool* mask, const float* c0, const float* h0,
                          const float* wh, const float* bias, const float* wp, float cell_clip, float proj_clip,
                          float* out, float* c_out, float* h_out) {
  const int64_t T = d.T, B = d.B, H = d.H, P = d.P, G = 4 * H;
  std::vector<float> c(c0, c0 + B * H), h(h0, h0 + B * P), gates(B * G), hh(B * H), hn(B * P);
  for (int64_t t = 0; t < T; ++t) {
    matmul_acc(h.data(), wh, ig + t * B * G, bias, gates.data(), B, P, G);
    const bool* m = mask + t * B;
    for (int64_t b = 0; b < B; ++b) {
      float* g = gates.data() + b * G;
      for (int64_t j = 0; j < H; ++j) {
        const float i_ = 0.5f + 0.5f * fast_tanh(0.5f * g[j]);
        const float j_ = fast_tanh(g[H + j]);
        const float f_ = 0.5f + 0.5f * fast_tanh(0.5f * (g[2 * H + j] + 1.0f));
        const float o_ = 0.5f + 0.5f * fast_tanh(0.5f * g[3 * H + j]);
        float cn = f_ * c[b * H + j] + i_ * j_;
        cn = std::max(std::min(cn, cell_clip), -cell_clip);
        hh[b * H + j] = o_ * fast_tanh(cn);
        if (m[b]) c[b * H + j] = cn;
      }
    }
    matmul_acc(hh.data(), wp, nullptr, nullptr, hn.data(), B, H, P);
    for (int64_t b = 0; b < B; ++b) {
      float* o = out + (t * B + b) * P;
      for (int64_t p = 0; p < P; ++p) {
        const float v = std::max(std::min(hn[b * P + p], proj_clip), -proj_clip);
        if (m[b]) h[b * P + p] = v;
        o[p] = m[b] ? v : 0.0f;
      }
    }
  }
  std::copy(c.begin(), c.end(), c_out);
  std::copy(h.begin(), h.end(), h_out);
}

static ffi::Error LstmForwardImpl(ffi::Buffer<ffi::F32> ig, ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::F32> c0,
                                  ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> wh, ffi::Buffer<ffi::F32> bias,
                                  ffi::Buffer<ffi::F32> wp, float cell_clip, float proj_clip,
                                  ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> c_out,
                                  ffi::ResultBuffer<ffi::F32> h_out) {
  auto dims = ig.dimensions();  // (D, T, B, 4H)
  const int64_t D = dims[0];
  Dims d{dims[1], dims[2], dims[3] / 4, h0.dimensions()[2]};
  auto go = [&](int64_t k) {
    run_direction(d, ig.typed_data() + k * d.T * d.B * 4 * d.H, mask.typed_data() + k * d.T * d.B,
                  c0.typed_data() + k * d.B * d.H, h0.typed_data() + k * d.B * d.P,
                  wh.typed_data() + k * d.P * 4 * d.H, bias.typed_data() + k * 4 * d.H,
                  wp.typed_data() + k * d.H * d.P, cell_clip, proj_clip,
                  out->typed_data() + k * d.T * d.B * d.P, c_out->typed_data() + k * d.B * d.H,
                  h_out->typed_data() + k * d.B * d.P);
  };
  std::vector<std::thread> threads;
  for (int64_t k = 1; k < D; ++k) threads.emplace_back(go, k);
  go(0);
  for (auto& th : threads) th.join();
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(LstmForward, LstmForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("cell_clip")
                                  .Attr<float>("proj_clip")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
