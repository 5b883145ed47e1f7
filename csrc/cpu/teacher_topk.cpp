// CPU kernel of teacher top-k labeling: logits = hidden W^T + b made a class tile
// at a time (never [B, V]) and reduced at once to, per row, the k largest
// logits with their classes, the log-partition and entropy of softmax(logits/T),
// and the probability mass inside the top-k.
//
// Threads take contiguous runs of tiles; each keeps per row a k-entry heap and
// an online (max, sum, dot) for LSE and entropy; the parts are folded in tile
// order. A tile whose row maximum is below the row's current k-th logit skips
// the selection scan.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "kernel_utils.h"
#include "loss_math.h"
#include "tiles.h"

namespace kdfast::cpu {
namespace {

template <typename acc_t>
struct Candidate {
  acc_t logit;
  int64_t index;
};

// a ranks above b: larger logit, ties to the lower class index (deterministic);
// NaN ranks above every number, as in torch.topk.
template <typename acc_t>
inline bool ranks_above(const Candidate<acc_t>& a, const Candidate<acc_t>& b) {
  const bool a_nan = std::isnan(a.logit), b_nan = std::isnan(b.logit);
  if (a_nan || b_nan) return a_nan && (!b_nan || a.index < b.index);
  return a.logit > b.logit || (a.logit == b.logit && a.index < b.index);
}

// The k best candidates of a row seen so far; heap order keeps the worst in front.
template <typename acc_t>
struct TopKHeap {
  int64_t k = 0;
  std::vector<Candidate<acc_t>> items;

  explicit TopKHeap(int64_t k_) : k(k_) { items.reserve(k_); }
  bool full() const { return static_cast<int64_t>(items.size()) == k; }
  const Candidate<acc_t>& worst() const { return items.front(); }

  void offer(const Candidate<acc_t>& c) {
    if (!full()) {
      items.push_back(c);
      std::push_heap(items.begin(), items.end(), ranks_above<acc_t>);
    } else if (ranks_above(c, worst())) {
      std::pop_heap(items.begin(), items.end(), ranks_above<acc_t>);
      items.back() = c;
      std::push_heap(items.begin(), items.end(), ranks_above<acc_t>);
    }
  }
  void merge(const TopKHeap& o) {
    for (const auto& c : o.items) offer(c);
  }
  // best first
  std::vector<Candidate<acc_t>> sorted() const {
    std::vector<Candidate<acc_t>> out = items;
    std::sort(out.begin(), out.end(), ranks_above<acc_t>);
    return out;
  }
};

// Online LSE and entropy of softmax(x / T): max of x, sum exp((x - max)/T), and
// dot = sum exp((x - max)/T) (x - max)/T, so H = log(sum) - dot / sum. A NaN
// logit anywhere in the row makes every statistic NaN (has_nan).
template <typename acc_t>
struct SoftmaxStats {
  acc_t max = kNegInf<acc_t>;
  acc_t sum = 0;
  acc_t dot = 0;
  bool has_nan = false;

  // Move to a larger max m: every term's (x - max)/T drops by delta.
  void rescale(acc_t m, acc_t inv_t) {
    if (m == max) return;
    if (max == kNegInf<acc_t>) {
      sum = dot = 0;
    } else {
      const acc_t delta = (m - max) * inv_t, r = std::exp(-delta);
      dot = r * (dot - sum * delta);
      sum = r * sum;
    }
    max = m;
  }
  void update(const acc_t* x, int64_t n, acc_t chunk_max_value, acc_t inv_t) {
    using Vec = at::vec::Vectorized<acc_t>;
    if (std::isnan(chunk_max_value)) has_nan = true;
    if (has_nan) return;
    rescale(std::max(max, chunk_max_value), inv_t);
    const acc_t shift = exp_shift(max);
    const Vec vshift(shift), vinv_t(inv_t);
    const auto [s, d] = chunk_sum_dot<acc_t>(
        n, [&](int64_t i) { return vexp<acc_t>((Vec::loadu(x + i) - vshift) * vinv_t); },
        [&](int64_t i) { return std::exp((x[i] - shift) * inv_t); },
        [&](int64_t i) { return (Vec::loadu(x + i) - vshift) * vinv_t; },
        [&](int64_t i) { return (x[i] - shift) * inv_t; });
    sum += s;
    dot += d;
  }
  void merge(const SoftmaxStats& o, acc_t inv_t) {
    has_nan = has_nan || o.has_nan;
    if (has_nan || o.max == kNegInf<acc_t>) return;
    SoftmaxStats other = o;
    const acc_t m = std::max(max, o.max);
    rescale(m, inv_t);
    other.rescale(m, inv_t);
    sum += other.sum;
    dot += other.dot;
  }
};

template <typename acc_t>
struct RowLabel {
  TopKHeap<acc_t> heap;
  SoftmaxStats<acc_t> stats;
  explicit RowLabel(int64_t k) : heap(k) {}
};

template <typename acc_t>
void teacher_topk_kernel(const at::Tensor& hidden, const at::Tensor& hidden_low, const at::Tensor& weight,
                         const at::Tensor& bias, int64_t k,
                         double temperature, int64_t tile, at::Tensor& indices, at::Tensor& logits,
                         at::Tensor& lse, at::Tensor& entropy, at::Tensor& covered) {
  using Vec = at::vec::Vectorized<acc_t>;
  const int64_t B = hidden.size(0), V = weight.size(0), d = hidden.size(1);
  const int64_t num_tiles = (V + tile - 1) / tile;
  const acc_t inv_t = acc_t(1) / static_cast<acc_t>(temperature);
  using Part = std::vector<RowLabel<acc_t>>;
  OrderedParts<Part> parts;
  at::parallel_for(0, num_tiles, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // thread-local: again in each worker
    at::Tensor f_buf = at::empty({B * tile}, hidden.options());
    at::Tensor w_buf = weight.scalar_type() == hidden.scalar_type() ? at::Tensor()
                                                                      : at::empty({tile * d}, hidden.options());
    Part part(B, RowLabel<acc_t>(k));
    for (int64_t t = begin; t < end; ++t) {
      const int64_t c0 = t * tile, n = std::min(tile, V - c0);
      linear_tile(hidden, hidden_low, weight, bias, c0, n, w_buf, tile_view(f_buf, B, n));
      const acc_t* f = f_buf.data_ptr<acc_t>();
      for (int64_t i = 0; i < B; ++i) {
        const acc_t* x = f + i * n;
        RowLabel<acc_t>& row = part[i];
        const acc_t m = chunk_max<acc_t>(
            n, [&](int64_t j) { return Vec::loadu(x + j); }, [&](int64_t j) { return x[j]; });
        row.stats.update(x, n, m, inv_t);
        // a tile whose best logit cannot enter the heap is skipped (NaN is scanned)
        if (row.heap.full() && m < row.heap.worst().logit) continue;
        for (int64_t j = 0; j < n; ++j) row.heap.offer({x[j], c0 + j});
      }
    }
    parts.add(begin, std::move(part));
  });

  Part total(B, RowLabel<acc_t>(k));
  parts.fold([&](const Part& part) {
    for (int64_t i = 0; i < B; ++i) {
      total[i].heap.merge(part[i].heap);
      total[i].stats.merge(part[i].stats, inv_t);
    }
  });
  int64_t* idx_out = indices.data_ptr<int64_t>();
  acc_t* logit_out = logits.data_ptr<acc_t>();
  acc_t* lse_out = lse.data_ptr<acc_t>();
  acc_t* entropy_out = entropy.data_ptr<acc_t>();
  acc_t* covered_out = covered.data_ptr<acc_t>();
  constexpr acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  for (int64_t i = 0; i < B; ++i) {
    const SoftmaxStats<acc_t>& st = total[i].stats;
    const auto best = total[i].heap.sorted();
    for (int64_t j = 0; j < k; ++j) {
      idx_out[i * k + j] = best[j].index;
      logit_out[i * k + j] = best[j].logit;
    }
    if (st.has_nan || st.max == std::numeric_limits<acc_t>::infinity()) {
      // as torch.logsumexp: +inf for a +inf logit, NaN for a NaN one; softmax undefined
      lse_out[i] = st.has_nan ? nan : st.max;
      entropy_out[i] = covered_out[i] = nan;
      continue;
    }
    const acc_t log_sum = std::log(st.sum);
    lse_out[i] = st.max * inv_t + log_sum;
    entropy_out[i] = log_sum - st.dot / st.sum;
    acc_t mass = 0;
    for (int64_t j = 0; j < k; ++j) mass += std::exp((best[j].logit - exp_shift(st.max)) * inv_t - log_sum);
    covered_out[i] = std::min(mass, acc_t(1));  // a probability, whatever the rounding
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> teacher_topk_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias, int64_t k,
    double temperature, int64_t tile_size) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_teacher_topk_inputs(hidden, weight, bias, k, temperature);
  const int64_t B = hidden.size(0), V = weight.size(0);
  const auto acc_type = hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor b = bias.has_value() ? bias->to(acc_type).contiguous() : at::Tensor();
  const at::Tensor h = hidden.to(acc_type).contiguous();
  const at::Tensor w = weight.contiguous();
  const at::Tensor h_low = bf16_rows(hidden.contiguous(), w);  // bf16: the bf16 GEMM, when it is on
  const auto opts = h.options();
  at::Tensor indices = at::empty({B, k}, opts.dtype(at::kLong));
  at::Tensor logits = at::empty({B, k}, opts);
  at::Tensor lse = at::empty({B}, opts), entropy = at::empty({B}, opts), covered = at::empty({B}, opts);
  // at least 256 classes: at B = 4096 (label_dataset's batch) the budget rule's 64-class
  // tiles make thin GEMMs (measured, d = 512, V = 100k, 2 AVX2 threads, interleaved runs:
  // 4.2-5.1 s with 64, 3.6-4.2 s with 256; 512 was slower again)
  const int64_t tile = choose_tile(tile_size, B, V, 256);
  AT_DISPATCH_FLOATING_TYPES(acc_type, "teacher_topk_cpu", [&] {
    teacher_topk_kernel<scalar_t>(h, h_low, w, b, k, temperature, tile, indices, logits, lse, entropy, covered);
  });
  return {indices, logits, lse, entropy, covered};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("teacher_topk", &teacher_topk_cpu);
}

}  // namespace kdfast::cpu
