// CPU kernel of the effective student logit (seed 004, eq. 3): the logit z a
// wide student converges to on a sample when trained on the mix
//   rho * (soft loss at temperature T against teacher logit z_t)
//   + (1 - rho) * (hard loss against label y),
// that is the root of
//   g(z) = (rho / T) (sigmoid(z / T) - sigmoid(z_t / T)) + (1 - rho) (sigmoid(z) - y).
// g is increasing in z, so each element is solved by Newton's method kept
// inside a bracket [lo, hi] with g(lo) < 0 < g(hi), bisecting whenever a Newton
// step would leave it. Everything is computed in float64, and g is evaluated
// times a constant e^scale: where the label agrees with a large teacher logit
// (y = 1, z_t >> 0, or y = 0, z_t << 0) every term of g near the root is of
// order e^(-|z_t|/T) or smaller and would underflow past |z_t| ~ 745 (the
// root then read as wherever g first underflows to 0); scale = |z_t| / T keeps
// them near 1. The terms are made as e^(scale - softplus(.)).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

namespace kdfast::cpu {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

inline double softplus(double x) { return std::max(x, 0.0) + std::log1p(std::exp(-std::abs(x))); }

// e^scale sigmoid(x) = e^(scale - softplus(-x)), and c e^scale with c = 0 kept 0
// (not 0 * inf).
inline double scaled_sigmoid(double x, double scale) { return std::exp(scale - softplus(-x)); }
inline double scaled(double c, double scale) { return c == 0 ? 0.0 : c * std::exp(scale); }

struct Equation {
  double rho, temperature, teacher, label;
  double scale = 0;  // g is evaluated times e^scale

  // e^scale (sigmoid(a) - sigmoid(b)), without cancellation when both are near 1;
  // where both scaled terms overflow (inf - inf), +-inf by the sign of a - b.
  double sigmoid_difference(double a, double b) const {
    const double d = (a > 0 && b > 0) ? scaled_sigmoid(-b, scale) - scaled_sigmoid(-a, scale)
                                      : scaled_sigmoid(a, scale) - scaled_sigmoid(b, scale);
    return std::isnan(d) ? (a < b ? -kInf : kInf) : d;
  }
  // e^scale (sigmoid(z) - y), without cancellation when y is near 1 and z large;
  // inf - inf as above, by the sign of the unscaled difference.
  double sigmoid_minus(double z, double y) const {
    const double d =
        z > 0 ? scaled(1.0 - y, scale) - scaled_sigmoid(-z, scale) : scaled_sigmoid(z, scale) - scaled(y, scale);
    return std::isnan(d) ? (scaled_sigmoid(z, 0.0) < y ? -kInf : kInf) : d;
  }
  double value(double z) const {
    return rho / temperature * sigmoid_difference(z / temperature, teacher / temperature) +
           (1.0 - rho) * sigmoid_minus(z, label);
  }
  // e^scale g'(z); sigmoid'(x) = e^(-softplus(x) - softplus(-x))
  double slope(double z) const {
    const double a = z / temperature;
    return rho / (temperature * temperature) * std::exp(scale - softplus(a) - softplus(-a)) +
           (1.0 - rho) * std::exp(scale - softplus(z) - softplus(-z));
  }
};

double solve(Equation eq) {
  if (std::isnan(eq.teacher) || std::isnan(eq.label)) return std::numeric_limits<double>::quiet_NaN();
  if (eq.rho == 1.0) return eq.teacher;  // sigmoid(z/T) = sigmoid(z_t/T)
  if (eq.rho == 0.0) {                   // sigmoid(z) = y
    if (eq.label <= 0.0) return -kInf;
    if (eq.label >= 1.0) return kInf;
    return std::log(eq.label) - std::log1p(-eq.label);
  }
  // an infinite teacher logit agreeing with the label: g < 0 (> 0) at every finite z
  if (eq.label >= 1.0 && eq.teacher == kInf) return kInf;
  if (eq.label <= 0.0 && eq.teacher == -kInf) return -kInf;
  if ((eq.label >= 1.0 && eq.teacher > 0) || (eq.label <= 0.0 && eq.teacher < 0)) {
    eq.scale = std::abs(eq.teacher) / eq.temperature;
  }
  // Bracket the root by doubling outwards (g scaled: an underflow no longer
  // stops the bracket short of the root).
  double lo = -1.0, hi = 1.0;
  while (eq.value(hi) < 0) {
    lo = hi;
    hi *= 2;
    if (!std::isfinite(hi)) return kInf;
  }
  while (eq.value(lo) > 0) {
    hi = lo;
    lo *= 2;
    if (!std::isfinite(lo)) return -kInf;
  }
  double z = std::isfinite(eq.teacher) && eq.teacher > lo && eq.teacher < hi ? eq.teacher : 0.5 * (lo + hi);
  // Bracket widths one and two steps back: Newton on g's exponential tails moves
  // about 1 per step, so a step bisects unless the bracket halved in the last two.
  double width_1 = kInf, width_2 = kInf;
  for (int iteration = 0; iteration < 400; ++iteration) {
    const double gz = eq.value(z);
    if (gz == 0) return z;
    (gz < 0 ? lo : hi) = z;
    const double slope = eq.slope(z);
    // Newton only where both are finite (far from the root the scaled g overflows)
    const bool newton = slope > 0 && std::isfinite(slope) && std::isfinite(gz) && hi - lo <= 0.5 * width_2;
    double next = newton ? z - gz / slope : lo;
    if (!(next > lo && next < hi)) next = 0.5 * (lo + hi);
    width_2 = width_1;
    width_1 = hi - lo;
    if (std::abs(next - z) <= 1e-15 * std::max(1.0, std::abs(next)) || next == lo || next == hi) return next;
    z = next;
  }
  return z;
}

at::Tensor effective_student_logits_cpu(const at::Tensor& teacher_logits, const at::Tensor& hard_labels,
                                        double soft_ratio, double temperature) {
  TORCH_CHECK_TYPE(at::isFloatingType(teacher_logits.scalar_type()),
                   "teacher_logits must be a floating-point tensor, got ", teacher_logits.scalar_type());
  TORCH_CHECK_TYPE(at::isFloatingType(hard_labels.scalar_type()), "hard_labels must be a floating-point tensor, got ",
                   hard_labels.scalar_type());
  TORCH_CHECK_VALUE(hard_labels.sizes() == teacher_logits.sizes(), "hard_labels must have the shape of teacher_logits ",
                    teacher_logits.sizes(), ", got ", hard_labels.sizes());
  TORCH_CHECK_VALUE(hard_labels.device() == teacher_logits.device(), "hard_labels is on ", hard_labels.device(),
                    " but teacher_logits is on ", teacher_logits.device());
  TORCH_CHECK_VALUE(soft_ratio >= 0 && soft_ratio <= 1, "soft_ratio must be in [0, 1], got ", soft_ratio);
  TORCH_CHECK_VALUE(temperature > 0 && std::isfinite(temperature), "temperature must be finite and > 0, got ",
                    temperature);
  const at::Tensor teacher = teacher_logits.to(at::kDouble).contiguous();
  const at::Tensor labels = hard_labels.to(at::kDouble).contiguous();
  TORCH_CHECK_VALUE(labels.numel() == 0 || (labels.ge(0).logical_and(labels.le(1))).all().item<bool>(),
                    "hard_labels must lie in [0, 1]");
  at::Tensor out = at::empty_like(teacher);
  const double* zt = teacher.const_data_ptr<double>();
  const double* y = labels.const_data_ptr<double>();
  double* z = out.data_ptr<double>();
  at::parallel_for(0, teacher.numel(), 1024, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) z[i] = solve({soft_ratio, temperature, zt[i], y[i]});
  });
  return out.to(teacher_logits.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("effective_student_logits", &effective_student_logits_cpu);
}

}  // namespace kdfast::cpu
