// Operator schemas of the lazykernel library and the argument checks shared by
// every backend. Backends register their kernels with TORCH_LIBRARY_IMPL in
// cpu/ and cuda/; the fake (meta) kernels live in lazykernel/ops.py.
#include <Python.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/core/grad_mode.h>
#include <torch/library.h>

#include <sstream>

#include "gram_hadamard.h"

extern "C" {
// `import lazykernel._C` only has to load this shared object so that the
// static TORCH_LIBRARY registrations run; the module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "lazykernel compiled operators", -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace lazykernel {

namespace {

std::string shape_string(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

void check_layer_tensor(const at::Tensor& t, const char* name, size_t index,
                        int64_t expected_dim, const at::Tensor& out) {
  TORCH_CHECK(t.dim() == expected_dim, "gram_hadamard_accumulate_: ", name, "[",
              index, "] must have ", expected_dim, " dimensions, got shape ",
              shape_string(t));
  TORCH_CHECK(t.scalar_type() == out.scalar_type(), "gram_hadamard_accumulate_: ", name,
              "[", index, "] has dtype ", t.scalar_type(), " but out has dtype ",
              out.scalar_type(), "; all tensors must share one dtype");
  TORCH_CHECK(t.device() == out.device(), "gram_hadamard_accumulate_: ", name, "[", index,
              "] is on ", t.device(), " but out is on ", out.device());
  // The op writes out in place and records nothing for autograd, so a loss built
  // on out would silently lack this term's gradient.
  TORCH_CHECK(!(t.requires_grad() && at::GradMode::is_enabled()), "gram_hadamard_accumulate_: ",
              name, "[", index, "] requires grad, but the op has no derivative (it adds to out in "
              "place and records nothing for autograd); call it under torch.no_grad() or pass ",
              name, "[", index, "].detach()");
  // The kernels read the operands while they write out tile by tile: an operand
  // in out's memory would change under them.
  const at::MemOverlapStatus overlap = at::get_overlap_status(out, t);
  TORCH_CHECK(overlap != at::MemOverlapStatus::Full && overlap != at::MemOverlapStatus::Partial,
              "gram_hadamard_accumulate_: out shares memory with ", name, "[", index,
              "]; pass a separate out tensor (or ", name, "[", index, "].clone())");
}

// Whether two operands hold the same values: the same memory viewed the same way
// (no work), else an element-wise comparison (linear in the operand's size, small
// next to the op; on a GPU it waits for the comparison's result).
bool same_operand(const at::Tensor& a, const at::Tensor& b) {
  if (a.is_same(b)) return true;
  if (a.sizes() != b.sizes()) return false;
  if (a.numel() == 0) return true;
  if (a.data_ptr() == b.data_ptr() && a.strides() == b.strides()) return true;
  return at::equal(a, b);
}

}  // namespace

GramOutput parse_gram_output(c10::string_view output) {
  if (output == "trace") return GramOutput::Trace;
  if (output == "diagonal") return GramOutput::Diagonal;
  if (output == "full") return GramOutput::Full;
  TORCH_CHECK(false, "gram_hadamard_accumulate_: output must be 'trace', 'diagonal' or "
              "'full', got '", std::string(output), "'");
}

GramProblem check_gram_hadamard_inputs(const at::Tensor& out, at::TensorList a1,
                                       at::TensorList a2, at::TensorList g1,
                                       at::TensorList g2, c10::string_view output,
                                       bool symmetric) {
  GramProblem problem;
  problem.output = parse_gram_output(output);
  TORCH_CHECK(out.scalar_type() == at::kFloat || out.scalar_type() == at::kDouble,
              "gram_hadamard_accumulate_: out must be float32 or float64, got ",
              out.scalar_type());
  const size_t count = a1.size();
  TORCH_CHECK(a2.size() == count && g1.size() == count && g2.size() == count,
              "gram_hadamard_accumulate_: a1, a2, g1, g2 must list the same number of "
              "layers, got ", a1.size(), ", ", a2.size(), ", ", g1.size(), ", ", g2.size());

  const int64_t expected_out_dim = problem.output == GramOutput::Trace      ? 2
                                   : problem.output == GramOutput::Diagonal ? 3
                                                                            : 4;
  TORCH_CHECK(out.dim() == expected_out_dim, "gram_hadamard_accumulate_: for output='",
              std::string(output), "' out must have ", expected_out_dim,
              " dimensions, got shape ", shape_string(out));
  problem.n1 = out.size(0);
  problem.n2 = out.size(1);
  problem.outputs = problem.output == GramOutput::Trace ? -1 : out.size(2);
  if (problem.output == GramOutput::Full) {
    TORCH_CHECK(out.size(3) == out.size(2), "gram_hadamard_accumulate_: full out must be "
                "[N1, N2, O, O], got shape ", shape_string(out));
  }
  if (symmetric) {
    TORCH_CHECK(problem.n1 == problem.n2, "gram_hadamard_accumulate_: symmetric=True needs "
                "N1 == N2, got out of shape ", shape_string(out));
  }
  TORCH_CHECK(at::has_internal_overlap(out) != at::MemOverlap::Yes,
              "gram_hadamard_accumulate_: out has elements that share memory (an expand()ed or "
              "similar view, strides ", out.strides(), "); pass a tensor whose elements each "
              "have their own memory, e.g. out.clone()");

  for (size_t l = 0; l < count; ++l) {
    check_layer_tensor(a1[l], "a1", l, 3, out);
    check_layer_tensor(a2[l], "a2", l, 3, out);
    check_layer_tensor(g1[l], "g1", l, 4, out);
    check_layer_tensor(g2[l], "g2", l, 4, out);
    const at::Tensor& A = a1[l];
    const at::Tensor& B = a2[l];
    const at::Tensor& G = g1[l];
    const at::Tensor& H = g2[l];
    TORCH_CHECK(A.size(0) == problem.n1 && G.size(0) == problem.n1,
                "gram_hadamard_accumulate_: layer ", l, ": a1 and g1 must have N1 = ",
                problem.n1, " rows like out, got a1 ", shape_string(A), " and g1 ",
                shape_string(G));
    TORCH_CHECK(B.size(0) == problem.n2 && H.size(0) == problem.n2,
                "gram_hadamard_accumulate_: layer ", l, ": a2 and g2 must have N2 = ",
                problem.n2, " rows like out, got a2 ", shape_string(B), " and g2 ",
                shape_string(H));
    const int64_t T = A.size(1);
    TORCH_CHECK(B.size(1) == T && G.size(1) == T && H.size(1) == T,
                "gram_hadamard_accumulate_: layer ", l, ": a1, a2, g1, g2 must share the "
                "positions axis T (dim 1), got a1 ", shape_string(A), ", a2 ", shape_string(B),
                ", g1 ", shape_string(G), ", g2 ", shape_string(H));
    TORCH_CHECK(B.size(2) == A.size(2), "gram_hadamard_accumulate_: layer ", l,
                ": a1 and a2 must share their last dimension K, got a1 ", shape_string(A),
                " and a2 ", shape_string(B));
    TORCH_CHECK(H.size(2) == G.size(2) && H.size(3) == G.size(3),
                "gram_hadamard_accumulate_: layer ", l, ": g1 and g2 must share [O, D], got g1 ",
                shape_string(G), " and g2 ", shape_string(H));
    if (problem.outputs < 0) {
      problem.outputs = G.size(2);
    }
    TORCH_CHECK(G.size(2) == problem.outputs, "gram_hadamard_accumulate_: layer ", l,
                " has O = ", G.size(2), " outputs but ",
                problem.output == GramOutput::Trace ? "an earlier layer has "
                                                    : "out has ",
                problem.outputs);
    problem.layers.push_back(GramLayer{T, A.size(2), G.size(3)});
  }
  // The kernels compute only the upper tiles and mirror them, so the lower
  // triangle is right only if the two sides are the same examples.
  for (size_t l = 0; symmetric && l < count; ++l) {
    const bool a_same = same_operand(a1[l], a2[l]);
    TORCH_CHECK(a_same && same_operand(g1[l], g2[l]), "gram_hadamard_accumulate_: symmetric=True "
                "promises a2 == a1 and g2 == g1, but ", a_same ? "g2[" : "a2[", l, "] differs from ",
                a_same ? "g1[" : "a1[", l, "]; pass symmetric=False for two different sets of "
                "examples");
  }
  return problem;
}

TORCH_LIBRARY(lazykernel, m) {
  m.def(
      "gram_hadamard_accumulate_(Tensor(a!) out, Tensor[] a1, Tensor[] a2, Tensor[] g1, "
      "Tensor[] g2, str output, bool symmetric) -> ()");
  m.def(
      "linear_jvp(Tensor xs, Tensor weight, Tensor? weight_dot, Tensor? bias, "
      "Tensor? bias_dot) -> Tensor");
}

}  // namespace lazykernel
