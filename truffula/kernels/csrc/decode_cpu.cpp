// One decode token through every layer of a pre-norm Llama-family model on the CPU, in one call.
//
// The reference is the eager model (truffula/models/common.py with the torch kernels): this file
// does the same arithmetic in the same order and rounds to the model's dtype wherever an eager
// op would, so a 16-bit model gives the same numbers up to the order of a norm's sum. The
// projections and the attention go through the same ATen ops the eager model calls; the
// elementwise work between them (residual adds, RMSNorm, rotary, SiLU-and-mul, the cache write)
// is plain loops over one token's vectors, with no tensor made for it.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <vector>

namespace {

enum Kind : int64_t { kInt4 = 0, kPacked = 1, kDense = 2, kInt8 = 3 };

struct Linear {
  int64_t kind;
  at::Tensor w, aux;  // int4: packed, scale_and_zero; int8: q, bf16 scales; oneDNN or dense weight
  c10::optional<at::Tensor> b;  // bias
  int64_t group;
};

at::Tensor packed_linear(const at::Tensor& x, const Linear& l) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  torch::jit::Stack stack;
  stack.reserve(6);
  stack.emplace_back(x);
  stack.emplace_back(l.w);
  stack.emplace_back(l.b);
  stack.emplace_back(std::string("none"));
  stack.emplace_back(c10::List<c10::optional<at::Scalar>>());
  stack.emplace_back(std::string(""));
  op.callBoxed(stack);
  return stack[0].toTensor();
}

at::Tensor apply(const at::Tensor& x, const Linear& l) {
  switch (l.kind) {
    case kInt4: {
      auto xb = x.scalar_type() == at::kBFloat16 ? x : x.to(at::kBFloat16);
      auto y = at::_weight_int4pack_mm_for_cpu(xb, l.w, l.group, l.aux);
      if (y.scalar_type() != x.scalar_type()) y = y.to(x.scalar_type());
      return l.b ? y + *l.b : y;
    }
    case kInt8: {
      auto y = at::_weight_int8pack_mm(x.to(at::kBFloat16), l.w, l.aux).to(x.scalar_type());
      return l.b ? y + *l.b : y;
    }
    case kPacked:
      return packed_linear(x, l);
    default:
      return at::linear(x, l.w, l.b);
  }
}

// Rounding to the model's dtype, as an eager op's result is.
template <typename T>
inline float R(float v) { return static_cast<float>(static_cast<T>(v)); }

template <typename T>
struct Step {
  int64_t H, HKV, D, hidden;
  double eps;
  // y = norm(x + res) (res = x + res); with first, y = norm(x) and res = x.
  void add_norm(T* x, T* res, T* y, const float* w, bool first) const {
    std::vector<float> s(hidden);
    double sq = 0.0;
    for (int64_t i = 0; i < hidden; ++i) {
      float v = first ? static_cast<float>(x[i]) : R<T>(static_cast<float>(x[i]) + static_cast<float>(res[i]));
      res[i] = static_cast<T>(v);
      s[i] = v;
      sq += static_cast<double>(v) * v;
    }
    float rstd = 1.0f / std::sqrt(static_cast<float>(sq / hidden) + static_cast<float>(eps));
    for (int64_t i = 0; i < hidden; ++i) y[i] = static_cast<T>((s[i] * rstd) * w[i]);
  }
  // rotate q and k heads in place (half rotation over the whole head); cos/sin [D] in T
  void rotary(T* qk, int64_t heads, const T* cos, const T* sin) const {
    int64_t half = D / 2;
    std::vector<float> h(D);
    for (int64_t n = 0; n < heads; ++n) {
      T* x = qk + n * D;
      for (int64_t j = 0; j < D; ++j) h[j] = static_cast<float>(x[j]);
      for (int64_t j = 0; j < D; ++j) {
        float rh = j < half ? -h[j + half] : h[j - half];
        float a = R<T>(h[j] * static_cast<float>(cos[j]));
        float b = R<T>(rh * static_cast<float>(sin[j]));
        x[j] = static_cast<T>(a + b);
      }
    }
  }
  // silu(gate) * up -> out [inter]
  void silu_mul(const T* gu, T* out, int64_t inter) const {
    for (int64_t i = 0; i < inter; ++i) {
      float g = static_cast<float>(gu[i]);
      float s = R<T>(g / (1.0f + std::exp(-g)));
      out[i] = static_cast<T>(s * static_cast<float>(gu[inter + i]));
    }
  }
};

template <typename T>
at::Tensor run(const at::Tensor& x_in, const std::vector<Linear>& lin, const std::vector<at::Tensor>& norms,
               const std::vector<at::Tensor>& kc, const std::vector<at::Tensor>& vc, const at::Tensor& cos,
               const at::Tensor& sin, const at::Tensor& slots, const c10::optional<at::Tensor>& mask,
               int64_t span_start, const int64_t* slot, double eps, double scale, int64_t H, int64_t HKV,
               int64_t D) {
  const int64_t layers = static_cast<int64_t>(kc.size());
  const int64_t B = x_in.size(0), hidden = x_in.size(1), QKV = (H + 2 * HKV) * D;
  const int64_t L = slots.size(1);  // the longest sequence's slots (read in place from span_start when >= 0)
  Step<T> st{H, HKV, D, hidden, eps};
  auto opts = x_in.options();
  at::Tensor x = x_in.clone(), res = at::empty_like(x_in), y = at::empty_like(x_in);
  const T* c = cos.data_ptr<T>();  // [B, D]
  const T* s = sin.data_ptr<T>();
  auto add_norm = [&](T* in, const at::Tensor& w, bool first) {
    for (int64_t b = 0; b < B; ++b)
      st.add_norm(in + b * hidden, res.data_ptr<T>() + b * hidden, y.data_ptr<T>() + b * hidden,
                  w.data_ptr<float>(), first);
  };
  const at::Tensor flat = slots.reshape({-1});
  for (int64_t i = 0; i < layers; ++i) {
    const Linear* l = &lin[4 * i];
    add_norm(x.data_ptr<T>(), norms[2 * i], i == 0);
    at::Tensor qkv = apply(y, l[0]).contiguous();  // [B, (H + 2 HKV) D]
    for (int64_t b = 0; b < B; ++b) {
      T* p = qkv.data_ptr<T>() + b * QKV;
      st.rotary(p, H + HKV, c + b * D, s + b * D);
      float* kd = kc[i].data_ptr<float>() + slot[b] * HKV * D;
      float* vd = vc[i].data_ptr<float>() + slot[b] * HKV * D;
      for (int64_t j = 0; j < HKV * D; ++j) {
        kd[j] = static_cast<float>(p[H * D + j]);
        vd[j] = static_cast<float>(p[(H + HKV) * D + j]);
      }
    }
    at::Tensor q = qkv.narrow(1, 0, H * D).to(at::kFloat).view({B, H, 1, D});
    at::Tensor k, v;
    if (span_start >= 0) {
      k = kc[i].narrow(0, span_start, L).unsqueeze(0);
      v = vc[i].narrow(0, span_start, L).unsqueeze(0);
    } else {
      k = kc[i].index_select(0, flat).view({B, L, HKV, D});
      v = vc[i].index_select(0, flat).view({B, L, HKV, D});
    }
    at::Tensor a = at::scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), mask, 0.0, false,
                                                    scale, HKV != H);
    a = a.reshape({B, H * D}).to(x_in.scalar_type());
    at::Tensor o = apply(a, l[1]).contiguous();
    add_norm(o.data_ptr<T>(), norms[2 * i + 1], false);
    at::Tensor gu = apply(y, l[2]).contiguous();
    const int64_t inter = gu.size(1) / 2;
    at::Tensor act = at::empty({B, inter}, opts);
    for (int64_t b = 0; b < B; ++b)
      st.silu_mul(gu.data_ptr<T>() + b * 2 * inter, act.data_ptr<T>() + b * inter, inter);
    x = apply(act, l[3]).contiguous();
  }
  add_norm(x.data_ptr<T>(), norms[2 * layers], false);
  return y;
}

at::Tensor decode_layers(const at::Tensor& x, const std::vector<at::Tensor>& weights,
                         const std::vector<int64_t>& kinds, const std::vector<int64_t>& groups,
                         const std::vector<at::Tensor>& norms, const std::vector<at::Tensor>& k_caches,
                         const std::vector<at::Tensor>& v_caches, const at::Tensor& cos, const at::Tensor& sin,
                         const at::Tensor& slots, const c10::optional<at::Tensor>& mask, int64_t span_start,
                         const at::Tensor& slot_mapping, double eps, double scale, int64_t H, int64_t HKV,
                         int64_t D) {
  const int64_t B = x.size(0);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "decode_layers: x must be [tokens, hidden]");
  TORCH_CHECK(slot_mapping.numel() == B && slot_mapping.scalar_type() == at::kLong &&
                  slot_mapping.is_contiguous(), "decode_layers: one int64 slot a token");
  TORCH_CHECK(slots.dim() == 2 && slots.size(0) == B && slots.scalar_type() == at::kLong,
              "decode_layers: slots [tokens, kv]");
  TORCH_CHECK(span_start < 0 || B == 1, "decode_layers: a span only for one sequence");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.numel() == B * D && sin.numel() == B * D &&
                  cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type(),
              "decode_layers: cos/sin [tokens, 1, head_dim] in x's dtype");
  TORCH_CHECK(kinds.size() == 4 * k_caches.size() && weights.size() == 3 * kinds.size() &&
                  groups.size() == kinds.size() && v_caches.size() == k_caches.size(),
              "decode_layers: 4 linears a layer, 3 tensors a linear");
  TORCH_CHECK(norms.size() == 2 * k_caches.size() + 1, "decode_layers: 2 norms a layer and the final one");
  for (size_t i = 0; i < k_caches.size(); ++i)
    TORCH_CHECK(k_caches[i].scalar_type() == at::kFloat && k_caches[i].is_contiguous() &&
                    v_caches[i].scalar_type() == at::kFloat && v_caches[i].is_contiguous(),
                "decode_layers: contiguous float32 caches");
  std::vector<Linear> lin;
  lin.reserve(kinds.size());
  for (size_t j = 0; j < kinds.size(); ++j) {
    const at::Tensor& b = weights[3 * j + 2];
    lin.push_back({kinds[j], weights[3 * j], weights[3 * j + 1],
                   b.numel() ? c10::optional<at::Tensor>(b) : c10::nullopt, groups[j]});
  }
  const int64_t* slot = slot_mapping.data_ptr<int64_t>();
  if (x.scalar_type() == at::kBFloat16)
    return run<at::BFloat16>(x, lin, norms, k_caches, v_caches, cos, sin, slots, mask, span_start, slot, eps,
                             scale, H, HKV, D);
  TORCH_CHECK(x.scalar_type() == at::kFloat, "decode_layers: float32 or bfloat16 activations");
  return run<float>(x, lin, norms, k_caches, v_caches, cos, sin, slots, mask, span_start, slot, eps, scale, H,
                    HKV, D);
}

}  // namespace

// One kernel for every dispatch key: the packed weights are MkldnnCPU tensors, the rest CPU.
TORCH_LIBRARY(truffula_cpu, m) {
  m.def(
      "decode_layers(Tensor x, Tensor[] weights, int[] kinds, int[] groups, Tensor[] norms, "
      "Tensor[] k_caches, Tensor[] v_caches, Tensor cos, Tensor sin, Tensor slots, Tensor? mask, int span_start, "
      "Tensor slot_mapping, float eps, float scale, int H, int HKV, int D) -> Tensor",
      TORCH_FN(decode_layers));
}
