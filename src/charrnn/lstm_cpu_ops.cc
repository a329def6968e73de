// The LSTM cell's gate arithmetic as two TensorFlow ops, one per direction, for lstm_cpu.py's loop.
//
// Why: in lstm_cpu.fused_lstm's while loop each timestep runs one matmul and about 30 small
// TensorFlow ops (sigmoid, tanh, split, concat, mul, add, ...) on [batch, units] tensors. At the
// CPU-sized model's shapes the ops' dispatch, not their arithmetic, is what the step waits on.
// These two kernels do that arithmetic in one pass each; the matmuls stay TensorFlow's (oneDNN).
// Math and saved tensors are exactly those of the Python loop (see lstm_cpu.py). The gates, the
// cell state and the saved factors are float32; the tensors that meet a matmul (hu and h forward,
// dh_next and dz backward) are of type Tmm, float32 or bfloat16 (then rounded here as tf.cast
// would, which saves the loop two cast ops per step and direction).
//
// lstm_cpu.py compiles this file once per machine with the C++ compiler and TensorFlow's own
// headers (tf.sysconfig) and falls back to the Python ops when that is not possible.

#include <cstdint>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/platform/threadpool.h"
#include "unsupported/Eigen/CXX11/Tensor"

namespace {

using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::shape_inference::DimensionHandle;
using tensorflow::shape_inference::InferenceContext;
using Row = Eigen::Map<Eigen::ArrayXf>;
using ConstRow = Eigen::Map<const Eigen::ArrayXf>;
template <typename T>
using RowOf = Eigen::Map<Eigen::Array<T, Eigen::Dynamic, 1>>;
template <typename T>
using ConstRowOf = Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, 1>>;

// Rows of the batch are independent; split them over TensorFlow's intra-op threads when the
// work is big enough to pay for the hand-off (the split never changes any result).
void ForEachRow(OpKernelContext* ctx, int64_t rows, int64_t cost_per_row,
                const std::function<void(int64_t, int64_t)>& fn) {
  ctx->device()->tensorflow_cpu_worker_threads()->workers->ParallelFor(rows, cost_per_row, fn);
}

// A float32 view of n values of type T (float: the values themselves; bfloat16: widened, exact).
template <typename T>
auto Widen(const T* p, int64_t n) {
  return ConstRowOf<T>(p, n).template cast<float>();
}

absl::Status ForwardShape(InferenceContext* c) {
  // xz [B, 4U], hu [B, 4U], c [B, U] -> h [B, U], c_new [B, U], saved [B, 6U]
  DimensionHandle batch = c->Dim(c->input(2), 0);
  DimensionHandle units = c->Dim(c->input(2), 1);
  DimensionHandle six_units;
  TF_RETURN_IF_ERROR(c->Multiply(units, 6, &six_units));
  c->set_output(0, c->Matrix(batch, units));
  c->set_output(1, c->Matrix(batch, units));
  c->set_output(2, c->Matrix(batch, six_units));
  return absl::OkStatus();
}

absl::Status BackwardShape(InferenceContext* c) {
  // d_out [B, U], dh_next [B, U], dc_next [B, U], saved [B, 6U] -> dz [B, 4U], dc_prev [B, U]
  DimensionHandle batch = c->Dim(c->input(0), 0);
  DimensionHandle units = c->Dim(c->input(0), 1);
  DimensionHandle four_units;
  TF_RETURN_IF_ERROR(c->Multiply(units, 4, &four_units));
  c->set_output(0, c->Matrix(batch, four_units));
  c->set_output(1, c->Matrix(batch, units));
  return absl::OkStatus();
}

}  // namespace

REGISTER_OP("CharrnnLstmCellForward")
    .Attr("Tmm: {float, bfloat16}")
    .Input("xz: float")
    .Input("hu: Tmm")
    .Input("c: float")
    .Output("h: Tmm")
    .Output("c_new: float")
    .Output("saved: float")
    .SetShapeFn(ForwardShape)
    .Doc(R"doc(
One LSTM step's gates from the pre-activations z = xz + hu (Keras' gate order i, f, c, o).
saved = [g*i', c*f', i*(1-g^2), tanh(c_new)*o' | o*(1-tanh(c_new)^2) | f], what the backward step needs.
)doc");

REGISTER_OP("CharrnnLstmCellBackward")
    .Attr("Tmm: {float, bfloat16}")
    .Input("d_out: float")
    .Input("dh_next: Tmm")
    .Input("dc_next: float")
    .Input("saved: float")
    .Output("dz: Tmm")
    .Output("dc_prev: float")
    .SetShapeFn(BackwardShape)
    .Doc(R"doc(
One LSTM step's gradient w.r.t. the pre-activations z, from the step's output gradient d_out, the
gradients flowing back from the next step and the step's saved factors; dh_prev = dz @ U^T is left
to the caller's matmul.
)doc");

template <typename Tmm>
class LstmCellForward : public OpKernel {
 public:
  explicit LstmCellForward(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& xz = ctx->input(0);
    const Tensor& hu = ctx->input(1);
    const Tensor& c = ctx->input(2);
    OP_REQUIRES(ctx, c.dims() == 2 && xz.dims() == 2 && hu.dims() == 2,
                absl::InvalidArgumentError("CharrnnLstmCellForward takes matrices"));
    const int64_t batch = c.dim_size(0), units = c.dim_size(1);
    OP_REQUIRES(ctx, xz.dim_size(0) == batch && xz.dim_size(1) == 4 * units &&
                         hu.dim_size(0) == batch && hu.dim_size(1) == 4 * units,
                absl::InvalidArgumentError("CharrnnLstmCellForward: xz and hu must be [batch, 4*units]"));
    Tensor *h = nullptr, *c_new = nullptr, *saved = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, c.shape(), &h));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, c.shape(), &c_new));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, tensorflow::TensorShape({batch, 6 * units}), &saved));
    const float* xz_p = xz.flat<float>().data();
    const Tmm* hu_p = hu.flat<Tmm>().data();
    const float* c_p = c.flat<float>().data();
    Tmm* h_p = h->flat<Tmm>().data();
    float* cn_p = c_new->flat<float>().data();
    float* s_p = saved->flat<float>().data();
    const int64_t u = units;
    ForEachRow(ctx, batch, 60 * u, [&](int64_t begin, int64_t end) {
      Eigen::ArrayXf i(u), f(u), g(u), o(u), tc(u);
      for (int64_t b = begin; b < end; ++b) {
        const float* x = xz_p + b * 4 * u;
        const Tmm* r = hu_p + b * 4 * u;
        ConstRow c_prev(c_p + b * u, u);
        i = (ConstRow(x, u) + Widen(r, u)).logistic();
        f = (ConstRow(x + u, u) + Widen(r + u, u)).logistic();
        g = (ConstRow(x + 2 * u, u) + Widen(r + 2 * u, u)).tanh();
        o = (ConstRow(x + 3 * u, u) + Widen(r + 3 * u, u)).logistic();
        Row cn(cn_p + b * u, u);
        cn = f * c_prev + i * g;
        tc = cn.tanh();
        RowOf<Tmm>(h_p + b * u, u) = (o * tc).template cast<Tmm>();
        float* s = s_p + b * 6 * u;
        Row(s, u) = g * (i - i * i);
        Row(s + u, u) = c_prev * (f - f * f);
        Row(s + 2 * u, u) = i * (1.0f - g * g);
        Row(s + 3 * u, u) = tc * (o - o * o);
        Row(s + 4 * u, u) = o * (1.0f - tc * tc);
        Row(s + 5 * u, u) = f;
      }
    });
  }
};

template <typename Tmm>
class LstmCellBackward : public OpKernel {
 public:
  explicit LstmCellBackward(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& d_out = ctx->input(0);
    const Tensor& dh_next = ctx->input(1);
    const Tensor& dc_next = ctx->input(2);
    const Tensor& saved = ctx->input(3);
    OP_REQUIRES(ctx, d_out.dims() == 2 && saved.dims() == 2,
                absl::InvalidArgumentError("CharrnnLstmCellBackward takes matrices"));
    const int64_t batch = d_out.dim_size(0), units = d_out.dim_size(1);
    OP_REQUIRES(ctx, dh_next.shape() == d_out.shape() && dc_next.shape() == d_out.shape() &&
                         saved.dim_size(0) == batch && saved.dim_size(1) == 6 * units,
                absl::InvalidArgumentError("CharrnnLstmCellBackward: mismatched shapes"));
    Tensor *dz = nullptr, *dc_prev = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, tensorflow::TensorShape({batch, 4 * units}), &dz));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, d_out.shape(), &dc_prev));
    const float* do_p = d_out.flat<float>().data();
    const Tmm* dhn_p = dh_next.flat<Tmm>().data();
    const float* dcn_p = dc_next.flat<float>().data();
    const float* s_p = saved.flat<float>().data();
    Tmm* dz_p = dz->flat<Tmm>().data();
    float* dcp_p = dc_prev->flat<float>().data();
    const int64_t u = units;
    ForEachRow(ctx, batch, 12 * u, [&](int64_t begin, int64_t end) {
      Eigen::ArrayXf dh(u), dc(u);
      for (int64_t b = begin; b < end; ++b) {
        const float* s = s_p + b * 6 * u;
        dh = ConstRow(do_p + b * u, u) + Widen(dhn_p + b * u, u);
        dc = ConstRow(dcn_p + b * u, u) + dh * ConstRow(s + 4 * u, u);
        Tmm* z = dz_p + b * 4 * u;
        RowOf<Tmm>(z, u) = (dc * ConstRow(s, u)).template cast<Tmm>();
        RowOf<Tmm>(z + u, u) = (dc * ConstRow(s + u, u)).template cast<Tmm>();
        RowOf<Tmm>(z + 2 * u, u) = (dc * ConstRow(s + 2 * u, u)).template cast<Tmm>();
        RowOf<Tmm>(z + 3 * u, u) = (dh * ConstRow(s + 3 * u, u)).template cast<Tmm>();
        Row(dcp_p + b * u, u) = dc * ConstRow(s + 5 * u, u);
      }
    });
  }
};

#define REGISTER(T)                                                                           \
  REGISTER_KERNEL_BUILDER(                                                                    \
      Name("CharrnnLstmCellForward").Device(tensorflow::DEVICE_CPU).TypeConstraint<T>("Tmm"),  \
      LstmCellForward<T>);                                                                    \
  REGISTER_KERNEL_BUILDER(                                                                    \
      Name("CharrnnLstmCellBackward").Device(tensorflow::DEVICE_CPU).TypeConstraint<T>("Tmm"), \
      LstmCellBackward<T>);
REGISTER(float)
REGISTER(tensorflow::bfloat16)
#undef REGISTER
