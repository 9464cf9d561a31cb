// A step (decodes, and prompt or verify chunks) through every layer of a pre-norm Llama-family
// model on the CPU, in one call.
//
// The reference is the eager model (truffula/models/common.py with the torch kernels): this file
// does the same arithmetic in the same order and rounds to the model's dtype wherever an eager
// op would, so a 16-bit model gives the same numbers up to the order of a norm's sum. The
// projections and the attention go through the same ATen ops the eager model calls; the
// elementwise work between them (residual adds, RMSNorm, rotary, SiLU-and-mul, the cache write)
// is plain loops over each token's vectors, with no tensor made for it.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

namespace {

enum Kind : int64_t { kInt4 = 0, kPacked = 1, kDense = 2, kInt8 = 3 };

struct Linear {
  int64_t kind;
  at::Tensor w, aux;  // int4: packed, scale_and_zero; int8: q, bf16 scales; oneDNN or dense weight
  c10::optional<at::Tensor> b;  // bias
  int64_t group;
  // LoRA, when the step applies it to this projection (kernels/lora_torch.py, lora_gather):
  // A as rows [slots * in, shards * R], each shard's B as rows [slots * R, n_j], their offsets
  bool lora = false;
  at::Tensor a_rows;
  std::vector<at::Tensor> b_rows;
  std::vector<int64_t> offsets;
  int64_t bag = 0;  // which of the step's bags indexes rows of this projection's input width
};

// The step's embedding-bag inputs (lora_torch.bag_layout): per width, indices, offsets and the
// number of bags a token's sum is split into; rows: the adapter tokens (undefined: all).
struct Bags {
  std::vector<at::Tensor> idx, off;
  std::vector<int64_t> chunks;
  c10::optional<at::Tensor> rows;
  int64_t rank_bag = 0;
  int64_t tokens = 0;
};

// F.embedding_bag(idx, rows, off, mode="sum", per_sample_weights=weights)
at::Tensor bag_sum(const at::Tensor& idx, const at::Tensor& rows, const at::Tensor& off,
                   const at::Tensor& weights) {
  return std::get<0>(at::embedding_bag(rows, idx, off, false, /*mode sum*/ 0, false, weights, false));
}

// y [T, out] += each adapter token's B (A x), as lora_gather computes it
void add_lora(at::Tensor& y, const at::Tensor& x, const Linear& l, const Bags& g) {
  const int64_t shards = static_cast<int64_t>(l.b_rows.size());
  const int64_t rank = l.a_rows.size(1) / shards;
  at::Tensor xs = g.rows ? x.index_select(0, *g.rows) : x;
  at::Tensor shrink = bag_sum(g.idx[l.bag], l.a_rows, g.off[l.bag], xs.reshape({-1}).to(l.a_rows.scalar_type()));
  shrink = shrink.view({g.tokens, g.chunks[l.bag], -1}).sum(1);
  at::Tensor h = (g.rows ? shrink.index_select(0, *g.rows) : shrink).view({-1, shards, rank});
  for (int64_t j = 0; j < shards; ++j) {
    const at::Tensor& b = l.b_rows[j];
    at::Tensor delta = bag_sum(g.idx[g.rank_bag], b, g.off[g.rank_bag], h.select(1, j).reshape({-1}));
    y.narrow(1, l.offsets[j], b.size(1)).add_(delta.to(y.scalar_type()));
  }
}

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

at::Tensor base(const at::Tensor& x, const Linear& l) {
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

at::Tensor apply(const at::Tensor& x, const Linear& l, const Bags& g) {
  at::Tensor y = base(x, l).contiguous();
  if (l.lora) add_lora(y, x, l, g);
  return y;
}

// Rounding to the model's dtype, as an eager op's result is.
template <typename T>
inline float R(float v) { return static_cast<float>(static_cast<T>(v)); }

template <typename T>
struct Step {
  int64_t H, HKV, D, hidden;
  double eps;
  std::vector<float> s = std::vector<float>(hidden), h = std::vector<float>(D);  // scratch
  // y = norm(x + res) (res = x + res); with first, y = norm(x) and res = x.
  void add_norm(T* x, T* res, T* y, const float* w, bool first) {
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
  void rotary(T* qk, int64_t heads, const T* cos, const T* sin) {
    int64_t half = D / 2;
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

// Where a step's tokens attend (attention_torch.paged_attention on the CPU): the decodes first,
// one token each, batched over `slots` [nd, L] (with `mask` when lengths differ; one sequence in
// consecutive slots is read in place from span_start), then each prompt chunk (several tokens
// of a sequence, speculative verify steps too) over its own slots, causally (`chunk_masks`).
struct Layout {
  at::Tensor slots;
  c10::optional<at::Tensor> mask;
  int64_t span_start;
  const int64_t* slot;  // each token's cache slot
  std::vector<int64_t> chunk_starts, chunk_lens;
  std::vector<at::Tensor> chunk_slots, chunk_masks;
};

// q, k, v of the step's tokens in qkv [T, (H + 2 HKV) D] (keys and values already in the
// cache) -> [T, H D] in the model's dtype. Decodes attend in float32 over the float32 cache,
// chunks in the model's dtype, as the eager attention does.
at::Tensor attend(const at::Tensor& qkv, const at::Tensor& kc, const at::Tensor& vc, const Layout& lay,
                  double scale, int64_t H, int64_t HKV, int64_t D) {
  const int64_t T = qkv.size(0), nd = lay.slots.size(0), L = lay.slots.size(1);
  const auto dtype = qkv.scalar_type();
  at::Tensor out;
  if (nd > 0) {
    at::Tensor q = qkv.narrow(0, 0, nd).narrow(1, 0, H * D).to(at::kFloat).view({nd, H, 1, D});
    at::Tensor k, v;
    if (lay.span_start >= 0) {
      k = kc.narrow(0, lay.span_start, L).unsqueeze(0);
      v = vc.narrow(0, lay.span_start, L).unsqueeze(0);
    } else {
      k = kc.index_select(0, lay.slots.reshape({-1})).view({nd, L, HKV, D});
      v = vc.index_select(0, lay.slots.reshape({-1})).view({nd, L, HKV, D});
    }
    out = at::scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), lay.mask, 0.0, false,
                                           scale, HKV != H)
              .reshape({nd, H * D})
              .to(dtype);
    if (nd == T) return out;
  }
  at::Tensor all = at::empty({T, H * D}, qkv.options());
  if (nd > 0) all.narrow(0, 0, nd).copy_(out);
  for (size_t c = 0; c < lay.chunk_starts.size(); ++c) {
    const int64_t qs = lay.chunk_starts[c], ql = lay.chunk_lens[c];
    at::Tensor q = qkv.narrow(0, qs, ql).narrow(1, 0, H * D).view({ql, H, D}).transpose(0, 1).unsqueeze(0);
    const at::Tensor& sl = lay.chunk_slots[c];
    at::Tensor k = kc.index_select(0, sl).to(dtype).transpose(0, 1).unsqueeze(0);
    at::Tensor v = vc.index_select(0, sl).to(dtype).transpose(0, 1).unsqueeze(0);
    at::Tensor o = at::scaled_dot_product_attention(q, k, v, lay.chunk_masks[c], 0.0, false, scale, HKV != H);
    all.narrow(0, qs, ql).copy_(o[0].transpose(0, 1).reshape({ql, H * D}));
  }
  return all;
}

template <typename T>
at::Tensor run(const at::Tensor& x_in, const std::vector<Linear>& lin, const std::vector<at::Tensor>& norms,
               const std::vector<at::Tensor>& kc, const std::vector<at::Tensor>& vc, const at::Tensor& cos,
               const at::Tensor& sin, const Layout& lay, const Bags& g, double eps, double scale, int64_t H,
               int64_t HKV, int64_t D) {
  const int64_t layers = static_cast<int64_t>(kc.size());
  const int64_t B = x_in.size(0), hidden = x_in.size(1), QKV = (H + 2 * HKV) * D;
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
  for (int64_t i = 0; i < layers; ++i) {
    const Linear* l = &lin[4 * i];
    add_norm(x.data_ptr<T>(), norms[2 * i], i == 0);
    at::Tensor qkv = apply(y, l[0], g);  // [B, (H + 2 HKV) D]
    for (int64_t b = 0; b < B; ++b) {
      T* p = qkv.data_ptr<T>() + b * QKV;
      st.rotary(p, H + HKV, c + b * D, s + b * D);
      float* kd = kc[i].data_ptr<float>() + lay.slot[b] * HKV * D;
      float* vd = vc[i].data_ptr<float>() + lay.slot[b] * HKV * D;
      for (int64_t j = 0; j < HKV * D; ++j) {
        kd[j] = static_cast<float>(p[H * D + j]);
        vd[j] = static_cast<float>(p[(H + HKV) * D + j]);
      }
    }
    at::Tensor a = attend(qkv, kc[i], vc[i], lay, scale, H, HKV, D);
    at::Tensor o = apply(a, l[1], g);
    add_norm(o.data_ptr<T>(), norms[2 * i + 1], false);
    at::Tensor gu = apply(y, l[2], g);
    const int64_t inter = gu.size(1) / 2;
    at::Tensor act = at::empty({B, inter}, opts);
    for (int64_t b = 0; b < B; ++b)
      st.silu_mul(gu.data_ptr<T>() + b * 2 * inter, act.data_ptr<T>() + b * inter, inter);
    x = apply(act, l[3], g);
  }
  add_norm(x.data_ptr<T>(), norms[2 * layers], false);
  return y;
}

at::Tensor decode_layers(const at::Tensor& x, const std::vector<at::Tensor>& weights,
                         const std::vector<int64_t>& kinds, const std::vector<int64_t>& groups,
                         const std::vector<at::Tensor>& norms, const std::vector<at::Tensor>& k_caches,
                         const std::vector<at::Tensor>& v_caches, const at::Tensor& cos, const at::Tensor& sin,
                         const at::Tensor& slots, const c10::optional<at::Tensor>& mask, int64_t span_start,
                         const std::vector<int64_t>& chunk_starts, const std::vector<int64_t>& chunk_lens,
                         const std::vector<at::Tensor>& chunk_slots, const std::vector<at::Tensor>& chunk_masks,
                         const at::Tensor& slot_mapping, const std::vector<at::Tensor>& lora_a,
                         const std::vector<at::Tensor>& lora_b, const std::vector<int64_t>& lora_offsets,
                         const std::vector<int64_t>& lora_bag, const std::vector<at::Tensor>& bag_idx,
                         const std::vector<at::Tensor>& bag_off, const std::vector<int64_t>& bag_chunks,
                         const c10::optional<at::Tensor>& lora_rows, double eps, double scale, int64_t H,
                         int64_t HKV, int64_t D) {
  const int64_t B = x.size(0);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "decode_layers: x must be [tokens, hidden]");
  TORCH_CHECK(slot_mapping.numel() == B && slot_mapping.scalar_type() == at::kLong &&
                  slot_mapping.is_contiguous(), "decode_layers: one int64 slot a token");
  TORCH_CHECK(slots.dim() == 2 && slots.scalar_type() == at::kLong, "decode_layers: slots [decodes, kv]");
  TORCH_CHECK(span_start < 0 || slots.size(0) == 1, "decode_layers: a span only for one decode");
  TORCH_CHECK(chunk_lens.size() == chunk_starts.size() && chunk_slots.size() == chunk_starts.size() &&
                  chunk_masks.size() == chunk_starts.size(),
              "decode_layers: one start, length, slots and mask a chunk");
  int64_t covered = slots.size(0);
  for (size_t c = 0; c < chunk_starts.size(); ++c) {
    TORCH_CHECK(chunk_starts[c] == covered && chunk_lens[c] > 0, "decode_layers: chunks follow the decodes");
    covered += chunk_lens[c];
  }
  TORCH_CHECK(covered == B, "decode_layers: decodes and chunks cover the step's tokens");
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
  // LoRA: lora_a[j] defined for each projection the step adapts; its shards' B rows follow
  // in lora_b, their offsets in lora_offsets; lora_bag[j] names its input width's bag, the
  // last bag is the rank's
  TORCH_CHECK(lora_a.empty() || (lora_a.size() == kinds.size() && lora_bag.size() == kinds.size() &&
                                 !bag_idx.empty() && bag_off.size() == bag_idx.size() &&
                                 bag_chunks.size() == bag_idx.size()),
              "decode_layers: LoRA inputs");
  size_t next_b = 0;
  for (size_t j = 0; j < lora_a.size(); ++j) {
    if (!lora_a[j].defined() || !lora_a[j].numel()) continue;
    Linear& l = lin[j];
    l.lora = true;
    l.a_rows = lora_a[j];
    l.bag = lora_bag[j];
    while (next_b < lora_b.size() && lora_b[next_b].defined() && lora_b[next_b].numel()) {
      l.b_rows.push_back(lora_b[next_b]);
      l.offsets.push_back(lora_offsets[next_b]);
      ++next_b;
    }
    ++next_b;  // the empty tensor that ends this projection's shards
    TORCH_CHECK(!l.b_rows.empty() && l.a_rows.size(1) % static_cast<int64_t>(l.b_rows.size()) == 0,
                "decode_layers: LoRA shards");
  }
  Bags g{bag_idx, bag_off, bag_chunks, lora_rows, static_cast<int64_t>(bag_idx.size()) - 1, B};
  Layout lay{slots, mask, span_start, slot_mapping.data_ptr<int64_t>(), chunk_starts, chunk_lens,
             chunk_slots, chunk_masks};
  if (x.scalar_type() == at::kBFloat16)
    return run<at::BFloat16>(x, lin, norms, k_caches, v_caches, cos, sin, lay, g, eps, scale, H, HKV, D);
  TORCH_CHECK(x.scalar_type() == at::kFloat, "decode_layers: float32 or bfloat16 activations");
  return run<float>(x, lin, norms, k_caches, v_caches, cos, sin, lay, g, eps, scale, H, HKV, D);
}

}  // namespace

// One kernel for every dispatch key: the packed weights are MkldnnCPU tensors, the rest CPU.
TORCH_LIBRARY(truffula_cpu, m) {
  m.def(
      "decode_layers(Tensor x, Tensor[] weights, int[] kinds, int[] groups, Tensor[] norms, "
      "Tensor[] k_caches, Tensor[] v_caches, Tensor cos, Tensor sin, Tensor slots, Tensor? mask, int span_start, "
      "int[] chunk_starts, int[] chunk_lens, Tensor[] chunk_slots, Tensor[] chunk_masks, Tensor slot_mapping, "
      "Tensor[] lora_a, Tensor[] lora_b, int[] lora_offsets, int[] lora_bag, "
      "Tensor[] bag_idx, Tensor[] bag_off, int[] bag_chunks, Tensor? lora_rows, float eps, float scale, "
      "int H, int HKV, int D) -> Tensor",
      TORCH_FN(decode_layers));
}
