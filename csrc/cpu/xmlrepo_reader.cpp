// Reader of the Extreme Classification Repository BoW format (shared/DESIGN.md
// section 4): a header line "N D L", then one line per point
//   l1,l2,...,lk f:v f:v ...
// (0-based ids; a point without labels starts with a space; an empty line is a
// point with neither). Lines end in "\n" or "\r\n"; after the header's N points
// only blank lines may follow. Returns CSR arrays of the features and of the
// labels. One pass over the file in memory, integers and floats parsed with
// std::from_chars (no locale, no allocation per token). Malformed input is an
// error naming the file, the line and the token.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

namespace kdfast::cpu {
namespace {

class Parser {
 public:
  Parser(std::string path, const std::string& text) : path_(std::move(path)), p_(text.data()), end_(p_ + text.size()) {}

  // The error, with the token that starts at token_begin (up to a blank or a
  // line end); where none starts there, what is there instead.
  [[noreturn]] void fail(const std::string& what, const char* token_begin = nullptr) const {
    std::string where;
    if (token_begin) {
      const char* e = token_begin;
      while (e < end_ && *e != ' ' && *e != '\t' && *e != '\n' && *e != '\r' && e - token_begin < 40) ++e;
      if (e > token_begin) {
        where = " (token '" + std::string(token_begin, e) + "')";
      } else if (token_begin >= end_) {
        where = " (at the end of the file)";
      } else if (line_end(token_begin)) {
        where = " (at the end of the line)";
      } else {
        where = *token_begin == '\r' ? " (a carriage return inside the line)" : " (at a blank)";
      }
    }
    TORCH_CHECK_VALUE(false, path_, ":", line_, ": ", what, where);
  }

  bool at_end() const { return p_ >= end_; }
  int64_t line() const { return line_; }
  // "\n", "\r\n" or the end of the file (a "\r" elsewhere is not a line end)
  bool line_end(const char* q) const { return q >= end_ || *q == '\n' || (*q == '\r' && (q + 1 >= end_ || q[1] == '\n')); }
  bool at_line_end() const { return line_end(p_); }
  // Only blanks up to the end of the line.
  bool blank_line() const {
    const char* q = p_;
    while (q < end_ && (*q == ' ' || *q == '\t')) ++q;
    return line_end(q);
  }

  void skip_blanks() {
    while (p_ < end_ && (*p_ == ' ' || *p_ == '\t')) ++p_;
  }
  // Past the end of the current line (tolerating "\r\n").
  void next_line() {
    while (p_ < end_ && *p_ != '\n') ++p_;
    if (p_ < end_) ++p_;
    ++line_;
  }

  // An integer at the current position; `token` (default: here) is what an error shows.
  int64_t integer(const char* what, const char* token = nullptr) {
    const char* begin = p_;
    int64_t value = 0;
    const auto [ptr, ec] = std::from_chars(p_, end_, value);
    if (ec == std::errc::result_out_of_range) fail(std::string(what) + " out of the int64 range", token ? token : begin);
    if (ec != std::errc() || ptr == begin) fail(std::string("expected ") + what, token ? token : begin);
    p_ = ptr;
    return value;
  }
  // A finite float32 (parsed as a double: values below float32's range become 0 or
  // subnormal, values above it and inf or NaN are errors). A '+' before a digit or
  // '.' is read as strtod reads it (std::from_chars alone refuses it).
  float real(const char* what, const char* token) {
    const char* begin = p_;
    if (end_ - begin >= 2 && begin[0] == '+' && (std::isdigit(static_cast<unsigned char>(begin[1])) || begin[1] == '.')) {
      ++begin;
    }
    double value = 0;
    const auto [ptr, ec] = std::from_chars(begin, end_, value);
    if (ec == std::errc::result_out_of_range) fail(std::string(what) + " out of the float range", token);
    if (ec != std::errc() || ptr == begin) fail(std::string("expected ") + what, token);
    if (!std::isfinite(value)) fail(std::string(what) + " must be finite", token);
    if (std::abs(value) > std::numeric_limits<float>::max()) fail(std::string(what) + " out of the float32 range", token);
    p_ = ptr;
    return static_cast<float>(value);
  }
  // A "\r" that does not end the line is an error of its own (not a bad token).
  void no_stray_carriage_return() const {
    if (p_ < end_ && *p_ == '\r' && !at_line_end()) fail("a carriage return inside the line", p_);
  }
  char peek() const { return p_ < end_ ? *p_ : '\0'; }
  const char* position() const { return p_; }
  void advance() { ++p_; }

 private:
  std::string path_;
  const char* p_;
  const char* end_;
  int64_t line_ = 1;
};

std::string read_file(const std::string& path) {
  std::error_code error;
  TORCH_CHECK_VALUE(!std::filesystem::is_directory(path, error), path, ": is a directory, not a file");
  std::ifstream in(path, std::ios::binary);
  TORCH_CHECK_VALUE(in.good(), path, ": cannot open the file");
  in.seekg(0, std::ios::end);
  const std::streamoff size = in.tellg();
  TORCH_CHECK_VALUE(size >= 0, path, ": cannot read the file's size");
  std::string text(static_cast<size_t>(size), '\0');
  in.seekg(0, std::ios::beg);
  in.read(text.data(), static_cast<std::streamsize>(text.size()));
  TORCH_CHECK_VALUE(in.good() || in.eof(), path, ": read failed");
  return text;
}

// -> feature indptr [N+1], indices, values (float32), label indptr [N+1], label
// indices, and the header [N, D, L]; all int64 but the values.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> read_xmlrepo(
    c10::string_view path_view) {
  const std::string path(path_view);
  const std::string text = read_file(path);
  Parser in(path, text);

  in.skip_blanks();
  const int64_t N = in.integer("the number of points N in the header 'N D L'");
  in.skip_blanks();
  const int64_t D = in.integer("the number of features D in the header 'N D L'");
  in.skip_blanks();
  const int64_t L = in.integer("the number of labels L in the header 'N D L'");
  in.skip_blanks();
  if (!in.at_line_end()) in.fail("the header must be 'N D L'", in.position());
  TORCH_CHECK_VALUE(N >= 0 && D >= 0 && L >= 0, path, ":1: negative count in the header");
  in.next_line();

  std::vector<int64_t> x_indptr{0}, y_indptr{0}, x_indices, y_indices;
  std::vector<float> x_values;
  // (not N itself: a header can claim more points than the file could hold)
  const int64_t lines = std::count(text.begin(), text.end(), '\n') + 1;
  x_indptr.reserve(std::min(N, lines) + 1);
  y_indptr.reserve(std::min(N, lines) + 1);
  int64_t points = 0;
  while (!in.at_end()) {
    if (points == N) {  // after the last point: blank lines only
      if (!in.blank_line()) in.fail("more points than the header's N = " + std::to_string(N), in.position());
      in.skip_blanks();
      in.next_line();
      continue;
    }
    // labels: comma-separated, absent when the line starts with a blank (or is empty)
    if (!in.at_line_end() && in.peek() != ' ' && in.peek() != '\t') {
      const char* labels = in.position();
      while (true) {
        const char* token = in.position();
        const int64_t label = in.integer("a label id", labels);
        if (label < 0 || label >= L) {
          in.fail("label " + std::to_string(label) + " outside [0, L = " + std::to_string(L) + ")", token);
        }
        y_indices.push_back(label);
        if (in.peek() != ',') break;
        in.advance();
      }
      in.no_stray_carriage_return();
      if (!in.at_line_end() && in.peek() != ' ' && in.peek() != '\t') {
        in.fail("expected ',' or ' ' after a label", in.position());
      }
    }
    // features: f:v separated by blanks
    while (true) {
      in.skip_blanks();
      if (in.at_line_end()) break;
      const char* token = in.position();
      const int64_t feature = in.integer("a feature 'id:value'", token);
      if (in.peek() != ':') in.fail("expected 'id:value'", token);
      in.advance();
      const float value = in.real("a feature value after ':'", token);
      in.no_stray_carriage_return();
      if (feature < 0 || feature >= D) {
        in.fail("feature " + std::to_string(feature) + " outside [0, D = " + std::to_string(D) + ")", token);
      }
      if (!in.at_line_end() && in.peek() != ' ' && in.peek() != '\t') in.fail("expected 'id:value'", token);
      x_indices.push_back(feature);
      x_values.push_back(value);
    }
    x_indptr.push_back(static_cast<int64_t>(x_indices.size()));
    y_indptr.push_back(static_cast<int64_t>(y_indices.size()));
    ++points;
    in.next_line();
  }
  TORCH_CHECK_VALUE(points == N, path, ": the header says N = ", N, " points but the file has ", points);

  auto as_tensor = [](auto& v, at::ScalarType type) {
    at::Tensor t = at::empty({static_cast<int64_t>(v.size())}, at::TensorOptions().dtype(type));
    std::copy(v.begin(), v.end(), t.data_ptr<typename std::decay_t<decltype(v)>::value_type>());
    return t;
  };
  at::Tensor header = at::tensor({N, D, L}, at::TensorOptions().dtype(at::kLong));
  return {as_tensor(x_indptr, at::kLong), as_tensor(x_indices, at::kLong), as_tensor(x_values, at::kFloat),
          as_tensor(y_indptr, at::kLong), as_tensor(y_indices, at::kLong), header};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CompositeExplicitAutograd, m) {
  m.impl("read_xmlrepo", &read_xmlrepo);
}

}  // namespace kdfast::cpu
