// The maths of the loss family (shared/DESIGN.md section 2) for one row, fed one
// chunk of classes at a time, so the dense kernel (whole rows) and the fused
// linear kernel (class tiles of a GEMM) share it.
//
//   loss = hw * [LSE(f) - (1-eps) f_y - eps/V sum f]                       hard
//        + sw * T^2 * [LSE(f/T) - LSE(s/T) - <softmax(s/T), f - s>/T]       soft (KL)
//        + dw * [LSE(f + log w) - <softmax(s), f>]                          double
//
// Forward: one pass over the chunks with online maxima (each chunk is scanned
// for its maxima, the running sums rescaled, then its exponentials summed while
// it sits in L1). Backward: every chunk recomputes softmax - q from the
// log-partitions saved per row (RowStat).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <utility>

// The per-chunk loops: inline everything they call. GCC otherwise keeps at::vec's
// exp_u20 out of line, one call per vector (measured on the 2-core Xeon: hard CE
// forward + backward 3% faster, double distillation 1-5%).
#define KDFAST_HOT __attribute__((flatten))

namespace kdfast::cpu {

// Classes per chunk: a chunk of logits, teacher logits and log-weights in acc_t
// stays in L1 while all its terms are summed.
constexpr int64_t kChunk = 1024;

enum class NegativeWeighting : int { Sigmoid = 0, OneMinusProb = 1 };

inline NegativeWeighting parse_negative_weighting(const std::string& name) {
  if (name == "sigmoid") return NegativeWeighting::Sigmoid;
  if (name == "one_minus_prob") return NegativeWeighting::OneMinusProb;
  TORCH_CHECK_VALUE(false, "negative_weighting must be 'sigmoid' or 'one_minus_prob', got '", name, "'");
}

// Per-row statistics saved for the backward; order matches kdfast/ops.py. Each
// log-partition is kept as (max, log sum exp(x - max)): a float32 LSE near 1e4
// loses the low bits that softmax(x) = exp((x - max) - log_sum) keeps.
// f/T and s/T share the maxima of f and s (divided by T).
enum RowStat : int64_t {
  kMaxF = 0,   // max f
  kLogSumF,    // log sum exp(f - max f)
  kLogSumFT,   // log sum exp((f - max f) / T)
  kMaxFW,      // max f + log w
  kLogSumFW,   // log sum exp(f + log w - max)
  kMaxS,       // max s
  kLogSumST,   // log sum exp((s - max s) / T)
  kLogSumS,    // log sum exp(s - max s)
  kNumRowStats
};

// A log-partition LSE(x) = max + log_sum, kept apart for precision.
template <typename acc_t>
struct LogPartition {
  acc_t max;
  acc_t log_sum;
};

struct LossConfig {
  double hard_weight = 1.0, soft_weight = 0.0, double_weight = 0.0;
  double temperature = 1.0;
  NegativeWeighting negative_weighting = NegativeWeighting::Sigmoid;
  double negative_scale = 1.0, negative_shift = 0.0;
  double label_smoothing = 0.0;
  int64_t ignore_index = -100;
  int64_t num_classes = 0;

  bool hard() const { return hard_weight > 0; }
  bool soft() const { return soft_weight > 0; }
  bool dbl() const { return double_weight > 0; }
  bool needs_teacher() const { return soft() || dbl(); }
  // one_minus_prob weights need the teacher's log-partition before the main pass
  bool needs_teacher_prepass() const {
    return dbl() && negative_weighting == NegativeWeighting::OneMinusProb;
  }

  // Argument checks shared by every loss op (the Python layer checks the same,
  // with friendlier types; these guard direct torch.ops calls).
  void check() const {
    TORCH_CHECK_VALUE(hard_weight >= 0, "hard_weight must be >= 0, got ", hard_weight);
    TORCH_CHECK_VALUE(soft_weight >= 0, "soft_weight must be >= 0, got ", soft_weight);
    TORCH_CHECK_VALUE(double_weight >= 0, "double_weight must be >= 0, got ", double_weight);
    TORCH_CHECK_VALUE(hard() || soft() || dbl(),
                      "all of hard_weight, soft_weight and double_weight are 0");
    TORCH_CHECK_VALUE(temperature > 0, "temperature must be > 0, got ", temperature);
    TORCH_CHECK_VALUE(label_smoothing >= 0 && label_smoothing <= 1,
                      "label_smoothing must be in [0, 1], got ", label_smoothing);
    TORCH_CHECK_VALUE(!(dbl() && negative_weighting == NegativeWeighting::Sigmoid) || negative_scale > 0,
                      "negative_scale must be > 0, got ", negative_scale);
  }
};

// The hard labels of one row: `num_positives` class indices (one for an int
// target, a row's CSR slice for pick-all-labels). The row stands for
// `multiplicity` expanded rows (its number of positives; 1 without targets),
// each with the same soft and double terms.
struct RowTarget {
  const int64_t* positives = nullptr;
  int64_t num_positives = 0;
  int64_t multiplicity = 1;
};

// The hard labels of a batch: an int target [B] (rows equal to ignore_index are
// skipped), a CSR list of positives per row (rows without positives are skipped;
// pick-all-labels), or none (every row counts once).
struct BatchTargets {
  const int64_t* target = nullptr;
  const int64_t* indptr = nullptr;
  const int64_t* indices = nullptr;
  int64_t ignore_index = -100;

  // False when the row contributes nothing.
  bool row(int64_t i, RowTarget& out) const {
    if (indptr) {
      const int64_t begin = indptr[i], end = indptr[i + 1];
      out = RowTarget{indices + begin, end - begin, end - begin};
      return end > begin;
    }
    if (target) {
      out = RowTarget{target + i, 1, 1};
      return target[i] != ignore_index;
    }
    out = RowTarget{};
    return true;
  }
};

template <typename acc_t>
constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

// exp(old_max - new_max), the factor that moves a running sum to a new maximum;
// 0 while nothing was summed yet (old_max = -inf), avoiding -inf - -inf = NaN.
template <typename acc_t>
inline acc_t rescale_factor(acc_t old_max, acc_t new_max, acc_t inv_temperature = acc_t(1)) {
  if (old_max == kNegInf<acc_t>) return acc_t(0);
  return std::exp((old_max - new_max) * inv_temperature);
}

// The shift subtracted before exponentiating: the maximum, or 0 when the maximum
// is -inf (all entries -inf, so every exponential is 0 either way).
template <typename acc_t>
inline acc_t exp_shift(acc_t max_value) {
  return max_value == kNegInf<acc_t> ? acc_t(0) : max_value;
}

// exp of a vector. float: at::vec's exp_u20 (a degree-5 polynomial, <= 20 ulp,
// ~1e-6 relative: well inside what a float32 loss resolves) with the NaN and
// overflow it clamps put back; double: the accurate exp.
template <typename acc_t>
inline at::vec::Vectorized<acc_t> vexp(const at::vec::Vectorized<acc_t>& x) {
  using Vec = at::vec::Vectorized<acc_t>;
  if constexpr (std::is_same_v<acc_t, float>) {
    const Vec r = Vec::blendv(x.exp_u20(), Vec(std::numeric_limits<float>::infinity()), x > Vec(88.72283f));
    return Vec::blendv(r, x, x != x);
  } else {
    return x.exp();
  }
}

// vexp where the caller knows x holds no NaN and nothing above 0 (a shifted
// logit x - max, or a log-softmax): float then skips the NaN and overflow
// fix-ups (measured: ~15% of the forward's elementwise time at V = 670k).
template <typename acc_t>
inline at::vec::Vectorized<acc_t> vexp(const at::vec::Vectorized<acc_t>& x, bool nonpositive) {
  if constexpr (std::is_same_v<acc_t, float>) {
    if (nonpositive) return x.exp_u20();
  }
  return vexp<acc_t>(x);
}

// True when x - shift has no NaN and nothing above 0 for every x of a chunk whose
// maximum (NaN if it holds one, see chunk_max) is chunk_max and shift >= it.
template <typename acc_t>
inline bool shifted_nonpositive(acc_t chunk_max, acc_t shift) {
  return !std::isnan(chunk_max) && std::isfinite(shift);
}

// log1p(u) for u in [0, 1] (the softplus tail). float: 2 atanh(u / (2 + u)) by
// its odd series; t^2 <= 1/9, so seven terms reach float precision (relative,
// tiny u included) at a fraction of the general log1p's cost; double: log1p.
template <typename acc_t>
inline at::vec::Vectorized<acc_t> log1p_unit(const at::vec::Vectorized<acc_t>& u) {
  using Vec = at::vec::Vectorized<acc_t>;
  if constexpr (std::is_same_v<acc_t, float>) {
    const Vec t = u / (Vec(2.f) + u);
    const Vec t2 = t * t;
    Vec p(1.f / 13.f);
    for (const float c : {1.f / 11.f, 1.f / 9.f, 1.f / 7.f, 1.f / 5.f, 1.f / 3.f, 1.f}) p = at::vec::fmadd(p, t2, Vec(c));
    return Vec(2.f) * t * p;
  } else {
    return u.log1p();
  }
}

// Sum over i in [0, n) of an elementwise expression given in vector form
// (vec_op(i) for the Vec::size() elements at i) and scalar form (for the tail).
template <typename acc_t, typename VecOp, typename ScalarOp>
inline acc_t chunk_sum(int64_t n, const VecOp& vec_op, const ScalarOp& scalar_op) {
  using Vec = at::vec::Vectorized<acc_t>;
  Vec acc(acc_t(0));
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) acc = acc + vec_op(i);
  acc_t total = at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, acc);
  for (; i < n; ++i) total += scalar_op(i);
  return total;
}

// Sums of e_i and of e_i * x_i (0 where e_i = 0) over i in [0, n), with e and x
// given in vector and scalar form: the partition and the <softmax, x> numerator
// of a teacher chunk from one exponential per element.
template <typename acc_t, typename VecE, typename ScalarE, typename VecX, typename ScalarX>
inline std::pair<acc_t, acc_t> chunk_sum_dot(int64_t n, const VecE& vec_e, const ScalarE& scalar_e,
                                             const VecX& vec_x, const ScalarX& scalar_x) {
  using Vec = at::vec::Vectorized<acc_t>;
  const Vec zero(acc_t(0));
  Vec sum(acc_t(0)), dot(acc_t(0));
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec e = vec_e(i);
    sum = sum + e;
    dot = dot + Vec::blendv(e * vec_x(i), zero, e == zero);
  }
  auto add = [](Vec& a, Vec& b) { return a + b; };
  acc_t total_sum = at::vec::vec_reduce_all<acc_t>(add, sum);
  acc_t total_dot = at::vec::vec_reduce_all<acc_t>(add, dot);
  for (; i < n; ++i) {
    const acc_t e = scalar_e(i);
    total_sum += e;
    total_dot += e == acc_t(0) ? acc_t(0) : e * scalar_x(i);
  }
  return {total_sum, total_dot};
}

template <typename acc_t, typename VecOp, typename ScalarOp>
inline acc_t chunk_max(int64_t n, const VecOp& vec_op, const ScalarOp& scalar_op) {
  using Vec = at::vec::Vectorized<acc_t>;
  Vec acc(kNegInf<acc_t>);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) acc = at::vec::maximum(acc, vec_op(i));
  acc_t best = at::vec::vec_reduce_all<acc_t>(
      [](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, acc);
  for (; i < n; ++i) {
    const acc_t v = scalar_op(i);
    best = (v > best || std::isnan(v)) ? v : best;
  }
  return best;
}

// log w of double distillation for n teacher logits s:
//   sigmoid:        log(1 - sigmoid(a (s - b))) = -softplus(a (s - b))
//   one_minus_prob: log(1 - p), log p = (s - max s) - log_sum, through log1mexp
//                   (exact for p near 1, where 1 - p is what matters)
template <typename acc_t>
KDFAST_HOT inline void log_negative_weights(const LossConfig& cfg, const acc_t* s, int64_t n,
                                            LogPartition<acc_t> lse_s, acc_t* log_w) {
  using Vec = at::vec::Vectorized<acc_t>;
  int64_t i = 0;
  if (cfg.negative_weighting == NegativeWeighting::Sigmoid) {
    const acc_t a = static_cast<acc_t>(cfg.negative_scale);
    const acc_t b = static_cast<acc_t>(cfg.negative_shift);
    const Vec va(a), vb(b), zero(acc_t(0));
    for (; i + Vec::size() <= n; i += Vec::size()) {
      const Vec z = va * (Vec::loadu(s + i) - vb);
      // softplus(z) = max(z, 0) + log1p(exp(-|z|))
      const Vec softplus = at::vec::maximum(z, zero) + log1p_unit<acc_t>(vexp<acc_t>(z.abs().neg()));
      softplus.neg().store(log_w + i);
    }
    for (; i < n; ++i) {
      const acc_t z = a * (s[i] - b);
      log_w[i] = -(std::max(z, acc_t(0)) + std::log1p(std::exp(-std::abs(z))));
    }
  } else {
    // log1mexp(x) = log(1 - e^x), x <= 0: log(-expm1(x)) near 0, log1p(-exp(x)) below -ln 2
    const acc_t shift = exp_shift(lse_s.max), log_sum = lse_s.log_sum;
    const acc_t minus_ln2 = -std::log(acc_t(2));
    const Vec vshift(shift), vlog_sum(log_sum), zero(acc_t(0)), vminus_ln2(minus_ln2);
    for (; i + Vec::size() <= n; i += Vec::size()) {
      const Vec x = at::vec::minimum((Vec::loadu(s + i) - vshift) - vlog_sum, zero);
      const Vec near_zero = x.expm1().neg().log();
      const Vec far = x.exp().neg().log1p();
      Vec::blendv(far, near_zero, x > vminus_ln2).store(log_w + i);
    }
    for (; i < n; ++i) {
      const acc_t x = std::min((s[i] - shift) - log_sum, acc_t(0));
      log_w[i] = x > minus_ln2 ? std::log(-std::expm1(x)) : std::log1p(-std::exp(x));
    }
  }
}

// Online statistics of one row, fed chunk by chunk.
template <typename acc_t>
struct RowAccumulator {
  using Vec = at::vec::Vectorized<acc_t>;

  acc_t max_f = kNegInf<acc_t>;   // max f
  acc_t max_s = kNegInf<acc_t>;   // max s
  acc_t max_fw = kNegInf<acc_t>;  // max f + log w
  acc_t sum_f = 0;                // sum exp(f - max_f)
  acc_t sum_fT = 0;               // sum exp((f - max_f) / T)
  acc_t sum_fw = 0;               // sum exp(f + log w - max_fw)
  acc_t sum_sT = 0;               // sum exp((s - max_s) / T)
  acc_t dot_sT = 0;               // sum exp((s - max_s) / T) * (f - s)
  acc_t sum_s = 0;                // sum exp(s - max_s)
  acc_t dot_s = 0;                // sum exp(s - max_s) * f
  acc_t sum_logits = 0;           // sum f (label smoothing)
  acc_t target_logit = 0;         // sum of f_y over the row's positives y

  // Feed classes [col0, col0 + n): student logits f, teacher logits s and log w
  // (filled by log_negative_weights when the double term is on). s and log_w may
  // be null while the teacher terms are on: the teacher rules the whole chunk out
  // (logits -inf: no positive mass, weight 1), as outside a stored top-k.
  KDFAST_HOT void update(const LossConfig& cfg, const acc_t* f, const acc_t* s, const acc_t* log_w, int64_t n,
                         int64_t col0, const RowTarget& target) {
    const acc_t inv_t = acc_t(1) / static_cast<acc_t>(cfg.temperature);
    const bool same_t = cfg.temperature == 1.0;

    if (cfg.hard() || cfg.soft()) {
      const acc_t cm = chunk_max<acc_t>(
          n, [&](int64_t i) { return Vec::loadu(f + i); }, [&](int64_t i) { return f[i]; });
      const acc_t m = std::max(max_f, cm);
      if (m != max_f) {
        sum_f *= rescale_factor(max_f, m);
        sum_fT *= rescale_factor(max_f, m, inv_t);
        max_f = m;
      }
      const acc_t shift = exp_shift(max_f);
      const bool plain = shifted_nonpositive(cm, shift);
      const Vec vshift(shift), vinv_t(inv_t);
      acc_t chunk_f = 0;
      if (cfg.hard() || same_t) {
        chunk_f = chunk_sum<acc_t>(
            n, [&](int64_t i) { return vexp<acc_t>(Vec::loadu(f + i) - vshift, plain); },
            [&](int64_t i) { return std::exp(f[i] - shift); });
        sum_f += chunk_f;
      }
      if (cfg.soft()) {
        sum_fT += same_t ? chunk_f : chunk_sum<acc_t>(
            n, [&](int64_t i) { return vexp<acc_t>((Vec::loadu(f + i) - vshift) * vinv_t, plain); },
            [&](int64_t i) { return std::exp((f[i] - shift) * inv_t); });
      }
    }
    if (cfg.hard()) {
      for (int64_t p = 0; p < target.num_positives; ++p) {
        const int64_t y = target.positives[p];
        if (y >= col0 && y < col0 + n) target_logit += f[y - col0];
      }
      if (cfg.label_smoothing > 0) {
        sum_logits += chunk_sum<acc_t>(
            n, [&](int64_t i) { return Vec::loadu(f + i); }, [&](int64_t i) { return f[i]; });
      }
    }
    if (cfg.needs_teacher() && s) {
      const acc_t cm = chunk_max<acc_t>(
          n, [&](int64_t i) { return Vec::loadu(s + i); }, [&](int64_t i) { return s[i]; });
      const acc_t m = std::max(max_s, cm);
      if (m != max_s) {
        const acc_t r1 = rescale_factor(max_s, m);
        const acc_t rT = rescale_factor(max_s, m, inv_t);
        sum_s *= r1;
        dot_s *= r1;
        sum_sT *= rT;
        dot_sT *= rT;
        max_s = m;
      }
      const acc_t shift = exp_shift(max_s);
      const bool plain = shifted_nonpositive(cm, shift);
      const Vec vshift(shift), vinv_t(inv_t);
      if (cfg.soft()) {  // sum exp((s - max)/T) and sum exp((s - max)/T) (f - s)
        const auto [sum, dot] = chunk_sum_dot<acc_t>(
            n, [&](int64_t i) { return vexp<acc_t>((Vec::loadu(s + i) - vshift) * vinv_t, plain); },
            [&](int64_t i) { return std::exp((s[i] - shift) * inv_t); },
            [&](int64_t i) { return Vec::loadu(f + i) - Vec::loadu(s + i); },
            [&](int64_t i) { return f[i] - s[i]; });
        sum_sT += sum;
        dot_sT += dot;
      }
      if (cfg.dbl()) {  // sum exp(s - max) and sum exp(s - max) f
        const auto [sum, dot] = chunk_sum_dot<acc_t>(
            n, [&](int64_t i) { return vexp<acc_t>(Vec::loadu(s + i) - vshift, plain); },
            [&](int64_t i) { return std::exp(s[i] - shift); }, [&](int64_t i) { return Vec::loadu(f + i); },
            [&](int64_t i) { return f[i]; });
        sum_s += sum;
        dot_s += dot;
      }
    }
    if (cfg.dbl()) {  // LSE(f + log w); log w = 0 where the teacher is absent
      const acc_t cm = log_w ? chunk_max<acc_t>(
          n, [&](int64_t i) { return Vec::loadu(f + i) + Vec::loadu(log_w + i); },
          [&](int64_t i) { return f[i] + log_w[i]; }) : chunk_max<acc_t>(
          n, [&](int64_t i) { return Vec::loadu(f + i); }, [&](int64_t i) { return f[i]; });
      const acc_t m = std::max(max_fw, cm);
      if (m != max_fw) {
        sum_fw *= rescale_factor(max_fw, m);
        max_fw = m;
      }
      const acc_t shift = exp_shift(max_fw);
      const bool plain = shifted_nonpositive(cm, shift);
      const Vec vshift(shift);
      sum_fw += log_w ? chunk_sum<acc_t>(
          n, [&](int64_t i) { return vexp<acc_t>(Vec::loadu(f + i) + Vec::loadu(log_w + i) - vshift, plain); },
          [&](int64_t i) { return std::exp(f[i] + log_w[i] - shift); }) : chunk_sum<acc_t>(
          n, [&](int64_t i) { return vexp<acc_t>(Vec::loadu(f + i) - vshift, plain); },
          [&](int64_t i) { return std::exp(f[i] - shift); });
    }
  }

  // The row's statistics (RowStat order) into stats[0..kNumRowStats).
  void finish_stats(acc_t* stats) const {
    stats[kMaxF] = max_f;
    stats[kLogSumF] = std::log(sum_f);
    stats[kLogSumFT] = std::log(sum_fT);
    stats[kMaxFW] = max_fw;
    stats[kLogSumFW] = std::log(sum_fw);
    stats[kMaxS] = max_s;
    stats[kLogSumST] = std::log(sum_sT);
    stats[kLogSumS] = std::log(sum_s);
  }

  // Fold in another accumulator of the same row over other classes.
  void merge(const LossConfig& cfg, const RowAccumulator& o) {
    const acc_t inv_t = acc_t(1) / static_cast<acc_t>(cfg.temperature);
    {
      const acc_t m = std::max(max_f, o.max_f);
      const acc_t a = rescale_factor(max_f, m), b = rescale_factor(o.max_f, m);
      const acc_t aT = rescale_factor(max_f, m, inv_t), bT = rescale_factor(o.max_f, m, inv_t);
      sum_f = sum_f * a + o.sum_f * b;
      sum_fT = sum_fT * aT + o.sum_fT * bT;
      max_f = m;
    }
    {
      const acc_t m = std::max(max_s, o.max_s);
      const acc_t a = rescale_factor(max_s, m), b = rescale_factor(o.max_s, m);
      const acc_t aT = rescale_factor(max_s, m, inv_t), bT = rescale_factor(o.max_s, m, inv_t);
      sum_s = sum_s * a + o.sum_s * b;
      dot_s = dot_s * a + o.dot_s * b;
      sum_sT = sum_sT * aT + o.sum_sT * bT;
      dot_sT = dot_sT * aT + o.dot_sT * bT;
      max_s = m;
    }
    {
      const acc_t m = std::max(max_fw, o.max_fw);
      sum_fw = sum_fw * rescale_factor(max_fw, m) + o.sum_fw * rescale_factor(o.max_fw, m);
      max_fw = m;
    }
    sum_logits += o.sum_logits;
    target_logit += o.target_logit;
  }

  // The row's weighted loss (summed over its `multiplicity` expanded rows), from its
  // finished stats.
  acc_t loss(const LossConfig& cfg, const acc_t* stats, const RowTarget& target) const {
    const acc_t T = static_cast<acc_t>(cfg.temperature);
    const acc_t m = static_cast<acc_t>(target.multiplicity);
    acc_t total = 0;
    if (cfg.hard()) {
      const acc_t eps = static_cast<acc_t>(cfg.label_smoothing);
      // m LSE(f) - (1 - eps) sum f_y, with the large parts cancelled first
      acc_t hard = (m * stats[kMaxF] - (acc_t(1) - eps) * target_logit) + m * stats[kLogSumF];
      if (eps > 0) hard -= m * eps / static_cast<acc_t>(cfg.num_classes) * sum_logits;
      total += static_cast<acc_t>(cfg.hard_weight) * hard;
    }
    if (cfg.soft()) {
      const acc_t kl = (stats[kMaxF] - stats[kMaxS]) / T + (stats[kLogSumFT] - stats[kLogSumST]) - dot_sT / sum_sT / T;
      total += static_cast<acc_t>(cfg.soft_weight) * T * T * m * kl;
    }
    if (cfg.dbl()) {
      const acc_t lse_fw = stats[kMaxFW] + stats[kLogSumFW];
      total += static_cast<acc_t>(cfg.double_weight) * m * (lse_fw - dot_s / sum_s);
    }
    return total;
  }
};

// LSE(s) of a whole row, for the one_minus_prob pre-pass.
template <typename acc_t>
struct LogSumExp {
  using Vec = at::vec::Vectorized<acc_t>;
  acc_t max = kNegInf<acc_t>;
  acc_t sum = 0;

  KDFAST_HOT void update(const acc_t* x, int64_t n) {
    const acc_t cm = chunk_max<acc_t>(
        n, [&](int64_t i) { return Vec::loadu(x + i); }, [&](int64_t i) { return x[i]; });
    const acc_t m = std::max(max, cm);
    if (m != max) {
      sum *= rescale_factor(max, m);
      max = m;
    }
    const acc_t shift = exp_shift(max);
    const bool plain = shifted_nonpositive(cm, shift);
    const Vec vshift(shift);
    sum += chunk_sum<acc_t>(
        n, [&](int64_t i) { return vexp<acc_t>(Vec::loadu(x + i) - vshift, plain); },
        [&](int64_t i) { return std::exp(x[i] - shift); });
  }
  void merge(const LogSumExp& o) {
    const acc_t m = std::max(max, o.max);
    sum = sum * rescale_factor(max, m) + o.sum * rescale_factor(o.max, m);
    max = m;
  }
  LogPartition<acc_t> value() const { return {max, std::log(sum)}; }
};

// Gradient of the row's loss for classes [col0, col0 + n), times `scale`
// (s and log_w as in RowAccumulator::update)
// (the upstream gradient of the row), written to grad[0..n):
//   m [hw (softmax(f) - eps/V) + sw T (softmax(f/T) - softmax(s/T)) + dw (softmax(f + log w) - softmax(s))]
//   - hw (1 - eps) at each positive
// with m the row's multiplicity.
template <typename acc_t>
KDFAST_HOT inline void gradient_chunk(const LossConfig& cfg, const acc_t* stats, const acc_t* f,
                                      const acc_t* s, const acc_t* log_w, int64_t n, int64_t col0,
                                      const RowTarget& target, acc_t scale, acc_t* grad) {
  using Vec = at::vec::Vectorized<acc_t>;
  const acc_t inv_t = acc_t(1) / static_cast<acc_t>(cfg.temperature);
  // per-term coefficients, folded with the upstream gradient and the multiplicity
  const acc_t ch_one = static_cast<acc_t>(cfg.hard_weight) * scale;
  const acc_t ms = static_cast<acc_t>(target.multiplicity) * scale;
  const acc_t ch = static_cast<acc_t>(cfg.hard_weight) * ms;
  const acc_t cs = static_cast<acc_t>(cfg.soft_weight * cfg.temperature) * ms;
  const acc_t cd = static_cast<acc_t>(cfg.double_weight) * ms;
  const acc_t smooth = cfg.hard() ? ch * static_cast<acc_t>(cfg.label_smoothing / cfg.num_classes) : 0;
  // softmax(x) = exp((x - shift) - log_sum), shift = the max (0 when it is -inf)
  const acc_t shift_f = exp_shift(stats[kMaxF]), shift_fw = exp_shift(stats[kMaxFW]);
  const acc_t shift_s = exp_shift(stats[kMaxS]);
  const acc_t ls_f = stats[kLogSumF], ls_ft = stats[kLogSumFT], ls_fw = stats[kLogSumFW];
  const acc_t ls_st = stats[kLogSumST], ls_s = stats[kLogSumS];
  const Vec vch(ch), vcs(cs), vcd(cd), vinv_t(inv_t), vsmooth(smooth);
  const Vec vshift_f(shift_f), vshift_fw(shift_fw), vshift_s(shift_s);
  const Vec vls_f(ls_f), vls_ft(ls_ft), vls_fw(ls_fw), vls_st(ls_st), vls_s(ls_s);
  const bool hard = cfg.hard(), soft = cfg.soft(), dbl = cfg.dbl();
  // Each exponent below is a log-softmax, <= 0 without NaN when its row's
  // statistics are finite (a NaN or +inf logit makes them NaN).
  auto finite = [](acc_t a, acc_t b) { return std::isfinite(a) && std::isfinite(b); };
  const bool plain = (!hard || finite(shift_f, ls_f)) &&
                     (!soft || (finite(shift_f, ls_ft) && (!s || finite(shift_s, ls_st)))) &&
                     (!dbl || (finite(shift_fw, ls_fw) && (!s || finite(shift_s, ls_s))));

  // The term flags and the teacher's presence (s, log_w null: absent from the
  // chunk, q = 0 and log w = 0) are loop-invariant; the branches predict perfectly.
  auto vec_grad = [&](int64_t i) {
    const Vec fv = Vec::loadu(f + i);
    Vec g(acc_t(0));
    if (hard) g = vch * vexp<acc_t>((fv - vshift_f) - vls_f, plain) - vsmooth;
    if (soft) {
      Vec p = vexp<acc_t>((fv - vshift_f) * vinv_t - vls_ft, plain);
      if (s) p = p - vexp<acc_t>((Vec::loadu(s + i) - vshift_s) * vinv_t - vls_st, plain);
      g = g + vcs * p;
    }
    if (dbl) {
      const Vec fw = log_w ? fv + Vec::loadu(log_w + i) : fv;
      Vec p = vexp<acc_t>(fw - vshift_fw - vls_fw, plain);
      if (s) p = p - vexp<acc_t>((Vec::loadu(s + i) - vshift_s) - vls_s, plain);
      g = g + vcd * p;
    }
    return g;
  };
  auto scalar_grad = [&](int64_t i) {
    acc_t g = 0;
    if (hard) g = ch * std::exp((f[i] - shift_f) - ls_f) - smooth;
    if (soft) {
      acc_t p = std::exp((f[i] - shift_f) * inv_t - ls_ft);
      if (s) p -= std::exp((s[i] - shift_s) * inv_t - ls_st);
      g += cs * p;
    }
    if (dbl) {
      acc_t p = std::exp((log_w ? f[i] + log_w[i] : f[i]) - shift_fw - ls_fw);
      if (s) p -= std::exp((s[i] - shift_s) - ls_s);
      g += cd * p;
    }
    return g;
  };
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) vec_grad(i).store(grad + i);
  for (; i < n; ++i) grad[i] = scalar_grad(i);
  if (hard) {
    const acc_t at_positive = ch_one * (acc_t(1) - static_cast<acc_t>(cfg.label_smoothing));
    for (int64_t p = 0; p < target.num_positives; ++p) {
      const int64_t y = target.positives[p];
      if (y >= col0 && y < col0 + n) grad[y - col0] -= at_positive;
    }
  }
}

}  // namespace kdfast::cpu
