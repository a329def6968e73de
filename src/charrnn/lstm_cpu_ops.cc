// The LSTM recurrence as TensorFlow ops for lstm_cpu.py's fused LSTM: four ops, each direction of
// one step's gate arithmetic (CharrnnLstmCellForward / Backward) and of the whole recurrence,
// matmuls with the recurrent kernel included (CharrnnLstmSequenceForward / Backward).
//
// Why: in lstm_cpu.fused_lstm's while loop each timestep runs one matmul and about 30 small
// TensorFlow ops (sigmoid, tanh, split, concat, mul, add, ...) on [batch, units] tensors. At the
// CPU-sized model's shapes the ops' dispatch, not their arithmetic, is what the step waits on.
// The cell ops do that arithmetic in one pass each (the matmuls stay TensorFlow's, oneDNN); the
// sequence ops run the whole loop with no TensorFlow op per step. Math and saved tensors are
// exactly those of the Python loop (see lstm_cpu.py). The gates, the cell state and the saved
// factors are float32; the tensors that meet a matmul (hu and h forward, dh_next and dz backward)
// are of type Tmm, float32 or bfloat16 (then rounded here as tf.cast would, which saves the loop
// two cast ops per step and direction). Measurements: benchmarks/lstm_recurrence.py and
// benchmarks/RESULTS.md.
//
// cell_ops.py compiles this file once per machine with the C++ compiler and TensorFlow's own
// headers (tf.sysconfig); lstm_cpu.py falls back to TensorFlow's ops when that is not possible.

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <vector>
#include <type_traits>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define CHARRNN_AMX 1
#endif

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
// work is big enough to pay for the hand-off (the split never changes any result). One block per
// thread, not the cost model's smaller blocks: this runs once per timestep, and with those blocks
// the sequence ops took clearly longer than TensorFlow's bare recurrent matmuls at the CPU-sized
// models' shapes (lstm_recurrence.py).
void ForEachRow(OpKernelContext* ctx, int64_t rows, int64_t cost_per_row,
                const std::function<void(int64_t, int64_t)>& fn) {
  constexpr int64_t kMinParallelCost = 100000;  // ~ cycles; below it the hand-off costs more
  auto* pool = ctx->device()->tensorflow_cpu_worker_threads()->workers;
  const int64_t threads = pool->NumThreads();
  if (threads <= 1 || rows <= 1 || rows * cost_per_row < kMinParallelCost) {
    fn(0, rows);
    return;
  }
  pool->ParallelFor(rows, tsl::thread::ThreadPool::SchedulingParams::Fixed((rows + threads - 1) / threads), fn);
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

// ---- the whole recurrence in one op per direction ---------------------------------------------
//
// Why: with the per-step ops above, each timestep still runs about ten TensorFlow ops (the
// recurrent matmul, the cell op, slices, TensorArray reads and writes, the loop's control), and at
// the CPU-sized model's shapes their dispatch costs as much as the arithmetic. These two ops run
// the whole loop, forward or backward, inside one kernel: per timestep one parallel pass over
// (row block, unit block) tiles, each tile a small matrix product with the recurrent kernel
// followed at once, while the products are still in registers, by that tile's gate arithmetic.
// The recurrent kernel is packed once per call into the tiles' order (for the forward pass the
// four gates of a block of units side by side), so each step's product streams it contiguously.
// Every output element is computed by one thread in a fixed order: results do not depend on how
// the tiles are split over threads. Tmm is the type of the tensors that meet the recurrent matmul
// (h forward, dz backward, and the kernel): float32, or bfloat16 where the compiler targets
// AVX512-BF16 (products summed in float32 by vdpbf16ps, as oneDNN's bf16 matmul sums them, or on
// AMX tiles where the CPU has them: see below). Units must be a multiple of 16 (lstm_cpu.py uses
// the per-step ops otherwise).

namespace {

using Packet = Eigen::internal::packet_traits<float>::type;
using tensorflow::bfloat16;
constexpr int kLanes = Eigen::internal::unpacket_traits<Packet>::size;
// Row tiles: rows x vectors accumulators, plus the panel's vectors and a broadcast, fit the vector
// registers (32 with AVX-512, 16 with AVX2) with at least 8 accumulators in flight, so that two FMA
// pipes of four cycles' latency never wait (AVX2: 6 x 2 + 2 + 1 = 15).
// With AVX2 the forward product runs in two passes of two gates each (6 x 2 accumulators): four
// gates at once leave room for only 2 rows (8 accumulators, which the FMAs' latency exposes).
constexpr int kForwardVectors = kLanes >= 16 ? 4 : 2;
constexpr int kForwardRows = 6;
constexpr int kBackwardRows = kLanes >= 16 ? 8 : 6;
constexpr int kBackwardVectors = 2;
template <typename T>
constexpr int kPair = std::is_same<T, float>::value ? 1 : 2;  // k values per lane in a panel

inline Packet Load(const float* p) { return Eigen::internal::ploadu<Packet>(p); }
inline void Store(float* p, Packet x) { Eigen::internal::pstoreu<float>(p, x); }
#if defined(__AVX512BF16__)  // the bfloat16 kernels exist only there (see REGISTER below)
inline void Store(bfloat16* p, Packet x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x)));
}
#endif
inline Packet Broadcast(float x) { return Eigen::internal::pset1<Packet>(x); }
inline Packet Sigmoid(Packet x) { return Eigen::internal::scalar_logistic_op<float>().packetOp(x); }
inline Packet Tanh(Packet x) { return Eigen::internal::ptanh(x); }

// Packs columns [col0, col0 + width) of a row-major [depth, ld] matrix m (or of its transpose,
// when transposed: m is [width.., depth] then) into panel[k / P][v][lane][k % P], P = kPair<T>.
template <typename T>
void PackPanel(const T* m, int64_t ld, bool transposed, int64_t depth, const int64_t* cols,
               int64_t vectors, T* panel) {
  constexpr int P = kPair<T>;
  for (int64_t k = 0; k < depth; ++k)
    for (int64_t v = 0; v < vectors; ++v)
      for (int64_t lane = 0; lane < kLanes; ++lane) {
        const int64_t col = cols[v] + lane;
        panel[((k / P * vectors + v) * kLanes + lane) * P + k % P] = transposed ? m[col * ld + k] : m[k * ld + col];
      }
}

// acc[r][v] += sum_k a[r * lda + k] * (column v * kLanes + lane of the packed panel)
template <int R, int NV>
inline void TileProduct(const float* a, int64_t lda, const float* panel, int64_t depth, Packet (&acc)[R][NV]) {
  for (int64_t k = 0; k < depth; ++k) {
    Packet b[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) b[v] = Load(panel + (k * NV + v) * kLanes);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const Packet x = Broadcast(a[r * lda + k]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = Eigen::internal::pmadd(x, b[v], acc[r][v]);
    }
  }
}

#if defined(__AVX512BF16__)
template <int R, int NV>
inline void TileProduct(const bfloat16* a, int64_t lda, const bfloat16* panel, int64_t depth, Packet (&acc)[R][NV]) {
  for (int64_t k = 0; k < depth; k += 2) {
    __m512bh b[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v)
      b[v] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(panel + (k * NV + 2 * v) * kLanes));
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      std::memcpy(&pair, a + r * lda + k, sizeof pair);
      const __m512bh x = reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair));
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], x, b[v]);
    }
  }
}
#endif

// The batch's rows split into row_tiles(kRows) tiles of as equal sizes as can be (32 rows with
// kRows 6: 6, 6, 5, 5, 5, 5; no short tile left over). ForRowTile runs fn(R, row0), R a
// std::integral_constant, for tile `tile`.
inline int64_t RowTiles(int64_t rows, int k_rows) { return (rows + k_rows - 1) / k_rows; }

template <int kRows, typename Fn>
inline void ForRowTile(int64_t tile, int64_t rows, Fn&& fn) {
  const int64_t tiles = RowTiles(rows, kRows);
  const int64_t row0 = tile * rows / tiles, row1 = (tile + 1) * rows / tiles;
  switch (row1 - row0) {
#define CASE(k) case k: if constexpr (k <= kRows) fn(std::integral_constant<int, k>{}, row0); break;
    CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
#undef CASE
    default: break;
  }
}

// Row tiles [tile0, tile1) of the batch's `rows` (kRows per tile) times one packed panel of NV
// vectors: each tile's accumulators start as init(acc, r0), take the product over `depth` (a is
// row-major with leading dimension lda, the panel as PackPanel packs it) and are stored in `out`
// ([rows][NV][lanes] floats, from row 0 of the batch); then finish(r0, R) runs per tile. finish
// runs after the products, not in them: a call there that the compiler does not inline would keep
// the accumulators in memory. (Running the depth in chunks that stay in L1 gained nothing with
// these row tiles, and cost the AVX-512 forward a fifth: lstm_recurrence.py.)
template <int kRows, int NV, typename T, typename Init, typename Finish>
void RowTileProducts(int64_t tile0, int64_t tile1, int64_t rows, const T* a, int64_t lda, const T* panel,
                     int64_t depth, float* out, Init&& init, Finish&& finish) {
  for (int64_t tile = tile0; tile < tile1; ++tile)
    ForRowTile<kRows>(tile, rows, [&](auto r, int64_t r0) {
      constexpr int R = decltype(r)::value;
      Packet acc[R][NV];
      init(acc, r0);
      TileProduct<R, NV>(a + r0 * lda, lda, panel, depth, acc);
      for (int i = 0; i < R; ++i)
        for (int v = 0; v < NV; ++v) Store(out + ((r0 + i) * NV + v) * kLanes, acc[i][v]);
      finish(r0, R);
    });
}

// Work items of a step: unit blocks, each split into row groups where there are too few blocks to
// keep every thread busy (or into single row tiles, for AMX). Item i covers block i / groups and row tiles [first, last) of its group.
struct Items {
  int64_t blocks, groups, row_tiles;
  Items(OpKernelContext* ctx, int64_t blocks, int64_t row_tiles, bool one_tile_per_item = false)
      : blocks(blocks), row_tiles(row_tiles) {
    const int64_t threads = ctx->device()->tensorflow_cpu_worker_threads()->num_threads;
    groups = one_tile_per_item ? row_tiles
                               : std::min(row_tiles, std::max<int64_t>(1, (2 * threads + blocks - 1) / blocks));
  }
  int64_t count() const { return blocks * groups; }
  int64_t block(int64_t item) const { return item / groups; }
  int64_t first_tile(int64_t item) const { return item % groups * row_tiles / groups; }
  int64_t last_tile(int64_t item) const { return (item % groups + 1) * row_tiles / groups; }
};

// ---- AMX: the bfloat16 recurrent product on Intel's tile unit, where the CPU has one ----------
//
// Why: an AMX core multiplies bfloat16 at several times its AVX512-BF16 rate (TensorFlow's oneDNN
// matmul, benchmarks/RESULTS.md), so there the vdpbf16ps tiles above left the bfloat16 ops slower than TensorFlow's per-step matmul.
// A tile product covers 16 rows of the batch: A is 16 rows x 32 k of h (or dz), read in place; B is
// 16 k pairs x 16 columns, which is exactly a stretch of the bfloat16 panels PackPanel writes
// ([k/2][vector][lane][2], a row stride of vectors * 64 bytes); C is 16 x 16 float32. Used when the
// batch is a multiple of 16 and units of 32 (else the AVX512-BF16 tiles), unless CHARRNN_AMX=0.
constexpr int kAmxRows = 16;
#if defined(CHARRNN_AMX)
static_assert(kLanes == 16, "AMX tiles are 16 float32 columns wide");

// Linux hands a process the AMX tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM for
// XFEATURE_XTILEDATA); oneDNN asks too, and asking again is harmless.
bool AmxUsable() {
  static const bool usable = [] {
    const char* env = std::getenv("CHARRNN_AMX");
    if (env != nullptr && std::strcmp(env, "0") == 0) return false;
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return usable;
}

// The tile configuration is per thread, and oneDNN's kernels load their own on the same threads:
// each parallel chunk loads ours first and releases the tiles when done.
struct TileScope {
  TileScope() {
    struct alignas(64) {
      uint8_t palette = 1, start_row = 0, reserved[14] = {};
      uint16_t colsb[16] = {};
      uint8_t rows[16] = {};
    } config;
    for (int i = 0; i < 8; ++i) config.colsb[i] = 64, config.rows[i] = kAmxRows;
    _tile_loadconfig(&config);
  }
  ~TileScope() { _tile_release(); }
};
#else
inline bool AmxUsable() { return false; }
struct TileScope {};
#endif

// A TileScope when `amx`, else nothing.
struct TilesIf {
  explicit TilesIf(bool amx) {
    if (amx) scope.emplace();
  }
  std::optional<TileScope> scope;
};

absl::Status SequenceForwardShape(InferenceContext* c) {
  // xz [T, B, 4U], rk [U, 4U], h0 [B, U], c0 [B, U] -> hs [T, B, U], c_last [B, U], saved [T, B, 6U]
  DimensionHandle steps = c->Dim(c->input(0), 0);
  DimensionHandle batch = c->Dim(c->input(3), 0);
  DimensionHandle units = c->Dim(c->input(3), 1);
  DimensionHandle six_units;
  TF_RETURN_IF_ERROR(c->Multiply(units, 6, &six_units));
  c->set_output(0, c->MakeShape({steps, batch, units}));
  c->set_output(1, c->Matrix(batch, units));
  c->set_output(2, c->MakeShape({steps, batch, six_units}));
  return absl::OkStatus();
}

absl::Status SequenceBackwardShape(InferenceContext* c) {
  // d_hs [T, B, U], dh_last, dc_last [B, U], saved [T, B, 6U], rk [U, 4U] -> dz [T, B, 4U], dh0, dc0
  DimensionHandle steps = c->Dim(c->input(0), 0);
  DimensionHandle batch = c->Dim(c->input(0), 1);
  DimensionHandle units = c->Dim(c->input(0), 2);
  DimensionHandle four_units;
  TF_RETURN_IF_ERROR(c->Multiply(units, 4, &four_units));
  c->set_output(0, c->MakeShape({steps, batch, four_units}));
  c->set_output(1, c->Matrix(batch, units));
  c->set_output(2, c->Matrix(batch, units));
  return absl::OkStatus();
}

}  // namespace

REGISTER_OP("CharrnnLstmSequenceForward")
    .Attr("Tmm: {float, bfloat16}")
    .Input("xz: float")
    .Input("recurrent_kernel: Tmm")
    .Input("h0: Tmm")
    .Input("c0: float")
    .Output("hs: Tmm")
    .Output("c_last: float")
    .Output("saved: float")
    .SetShapeFn(SequenceForwardShape)
    .Doc(R"doc(
The LSTM recurrence over all timesteps: z_t = xz[t] + h_{t-1} @ recurrent_kernel, then the gates
as CharrnnLstmCellForward; hs[t] = h_t, saved[t] as CharrnnLstmCellForward's saved.
)doc");

REGISTER_OP("CharrnnLstmSequenceBackward")
    .Attr("Tmm: {float, bfloat16}")
    .Input("d_hs: float")
    .Input("dh_last: float")
    .Input("dc_last: float")
    .Input("saved: float")
    .Input("recurrent_kernel: Tmm")
    .Output("dz: Tmm")
    .Output("dh0: float")
    .Output("dc0: float")
    .SetShapeFn(SequenceBackwardShape)
    .Doc(R"doc(
The gradient of CharrnnLstmSequenceForward w.r.t. the pre-activations of every timestep (dz) and
the initial state, from the gradients of hs and of the last state; the weight gradients are left to
the caller's matmuls over all timesteps.
)doc");

template <typename Tmm>
class LstmSequenceForward : public OpKernel {
 public:
  explicit LstmSequenceForward(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& xz = ctx->input(0);
    const Tensor& rk = ctx->input(1);
    const Tensor& h0 = ctx->input(2);
    const Tensor& c0 = ctx->input(3);
    OP_REQUIRES(ctx, xz.dims() == 3 && rk.dims() == 2 && c0.dims() == 2 && h0.shape() == c0.shape(),
                absl::InvalidArgumentError("CharrnnLstmSequenceForward: xz [T,B,4U], rk [U,4U], h0 and c0 [B,U]"));
    const int64_t steps = xz.dim_size(0), batch = c0.dim_size(0), u = c0.dim_size(1);
    OP_REQUIRES(ctx, xz.dim_size(1) == batch && xz.dim_size(2) == 4 * u && rk.dim_size(0) == u &&
                         rk.dim_size(1) == 4 * u && u % kLanes == 0,
                absl::InvalidArgumentError("CharrnnLstmSequenceForward: mismatched shapes, or units not a multiple of the vector width"));
    Tensor *hs = nullptr, *c_last = nullptr, *saved = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, tensorflow::TensorShape({steps, batch, u}), &hs));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, c0.shape(), &c_last));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, tensorflow::TensorShape({steps, batch, 6 * u}), &saved));
    // Per block of kLanes units, the four gates' columns of those units side by side: one panel of
    // four vectors, or (AVX2) two panels of two, gates (i, f) then (c, o).
    Tensor panel_t;
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DataTypeToEnum<Tmm>::value,
                                           tensorflow::TensorShape({u * 4 * u}), &panel_t));
    Tmm* panel = panel_t.flat<Tmm>().data();
    const int64_t blocks = u / kLanes;
    constexpr int kPasses = 4 / kForwardVectors;
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t cols[4] = {blk * kLanes, u + blk * kLanes, 2 * u + blk * kLanes, 3 * u + blk * kLanes};
      for (int pass = 0; pass < kPasses; ++pass)
        PackPanel(rk.flat<Tmm>().data(), 4 * u, false, u, cols + pass * kForwardVectors, kForwardVectors,
                  panel + (blk * kPasses + pass) * u * kForwardVectors * kLanes);
    }
    float* c = c_last->flat<float>().data();
    std::copy_n(c0.flat<float>().data(), batch * u, c);
    const float* xz_p = xz.flat<float>().data();
    Tmm* hs_p = hs->flat<Tmm>().data();
    float* s_p = saved->flat<float>().data();
    const bool amx = std::is_same<Tmm, bfloat16>::value && batch % kAmxRows == 0 && u % 32 == 0 && AmxUsable();
    const int64_t row_tiles = amx ? batch / kAmxRows : RowTiles(batch, kForwardRows);
    const int64_t tile_cost = kForwardRows * 4 * kLanes * (2 * u + 40);
    const Items items(ctx, blocks, row_tiles);

    // Row b's gates for units [j, j + kLanes) from its pre-activations z (i, f, g, o).
    auto gates = [&](const Packet (&z)[4], int64_t b, int64_t j, Tmm* h_t, float* s_t) {
      using Eigen::internal::pmadd;
      using Eigen::internal::pmul;
      using Eigen::internal::psub;
      const Packet one = Broadcast(1.0f);
      const Packet i = Sigmoid(z[0]), f = Sigmoid(z[1]);
      const Packet g = Tanh(z[2]), o = Sigmoid(z[3]);
      const Packet c_prev = Load(c + b * u + j);
      const Packet cn = pmadd(f, c_prev, pmul(i, g));
      const Packet tc = Tanh(cn);
      Store(c + b * u + j, cn);
      Store(h_t + b * u + j, pmul(o, tc));
      float* s = s_t + b * 6 * u + j;
      Store(s, pmul(g, psub(i, pmul(i, i))));
      Store(s + u, pmul(c_prev, psub(f, pmul(f, f))));
      Store(s + 2 * u, pmul(i, psub(one, pmul(g, g))));
      Store(s + 3 * u, pmul(tc, psub(o, pmul(o, o))));
      Store(s + 4 * u, pmul(o, psub(one, pmul(tc, tc))));
      Store(s + 5 * u, f);
    };

    for (int64_t t = 0; t < steps; ++t) {
      const Tmm* h_prev = t == 0 ? h0.flat<Tmm>().data() : hs_p + (t - 1) * batch * u;
      const float* x_t = xz_p + t * batch * 4 * u;
      Tmm* h_t = hs_p + t * batch * u;
      float* s_t = s_p + t * batch * 6 * u;
#if defined(CHARRNN_AMX)
      if constexpr (std::is_same<Tmm, bfloat16>::value) {
        if (amx) {
          // Item: 16 rows x 16 units; C tiles 0-3 the four gates (started from xz), A tile 4,
          // B tiles 5 and 6 in turn.
          ForEachRow(ctx, row_tiles * blocks, tile_cost, [&](int64_t begin, int64_t end) {
            TileScope tiles;
            alignas(64) float z[4][kAmxRows][kLanes];
            for (int64_t item = begin; item < end; ++item) {
              const int64_t blk = item / row_tiles, j = blk * kLanes, r0 = item % row_tiles * kAmxRows;
              const float* x = x_t + r0 * 4 * u + j;
              const int64_t x_stride = 4 * u * sizeof(float), b_stride = 4 * 64;
              _tile_loadd(0, x, x_stride);
              _tile_loadd(1, x + u, x_stride);
              _tile_loadd(2, x + 2 * u, x_stride);
              _tile_loadd(3, x + 3 * u, x_stride);
              const Tmm* a = h_prev + r0 * u;
              const Tmm* panel_k = panel + blk * u * 4 * kLanes;
              for (int64_t k = 0; k < u; k += 32, panel_k += 16 * 4 * 32) {
                _tile_loadd(4, a + k, u * sizeof(Tmm));
                _tile_loadd(5, panel_k, b_stride);
                _tile_dpbf16ps(0, 4, 5);
                _tile_loadd(6, panel_k + 32, b_stride);
                _tile_dpbf16ps(1, 4, 6);
                _tile_loadd(5, panel_k + 64, b_stride);
                _tile_dpbf16ps(2, 4, 5);
                _tile_loadd(6, panel_k + 96, b_stride);
                _tile_dpbf16ps(3, 4, 6);
              }
              _tile_stored(0, z[0], 64);
              _tile_stored(1, z[1], 64);
              _tile_stored(2, z[2], 64);
              _tile_stored(3, z[3], 64);
              for (int r = 0; r < kAmxRows; ++r) {
                const Packet zr[4] = {Load(z[0][r]), Load(z[1][r]), Load(z[2][r]), Load(z[3][r])};
                gates(zr, r0 + r, j, h_t, s_t);
              }
            }
          });
          continue;
        }
      }
#endif
      ForEachRow(ctx, items.count(), tile_cost * row_tiles / items.groups, [&](int64_t begin, int64_t end) {
        std::vector<float> z(kPasses * batch * kForwardVectors * kLanes);  // [pass][row][vector][lane]
        for (int64_t item = begin; item < end; ++item) {
          const int64_t blk = items.block(item), j = blk * kLanes;
          for (int pass = 0; pass < kPasses; ++pass) {
            float* z_pass = z.data() + pass * batch * kForwardVectors * kLanes;
            RowTileProducts<kForwardRows, kForwardVectors>(
                items.first_tile(item), items.last_tile(item), batch, h_prev, u,
                panel + (blk * kPasses + pass) * u * kForwardVectors * kLanes, u, z_pass,
                [&](auto& acc, int64_t r0) {  // z starts as xz
                  for (int r = 0; r < std::extent<std::remove_reference_t<decltype(acc)>>::value; ++r)
                    for (int v = 0; v < kForwardVectors; ++v)
                      acc[r][v] = Load(x_t + (r0 + r) * 4 * u + (pass * kForwardVectors + v) * u + j);
                },
                [&](int64_t r0, int rows) {
                  if (pass + 1 < kPasses) return;  // the gates once every pass is done
                  for (int64_t b = r0; b < r0 + rows; ++b) {
                    Packet zr[4];
                    for (int g = 0; g < 4; ++g)
                      zr[g] = Load(z.data() + ((g / kForwardVectors * batch + b) * kForwardVectors +
                                               g % kForwardVectors) * kLanes);
                    gates(zr, b, j, h_t, s_t);
                  }
                });
          }
        }
      });
    }
  }
};

template <typename Tmm>
class LstmSequenceBackward : public OpKernel {
 public:
  explicit LstmSequenceBackward(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& d_hs = ctx->input(0);
    const Tensor& dh_last = ctx->input(1);
    const Tensor& dc_last = ctx->input(2);
    const Tensor& saved = ctx->input(3);
    const Tensor& rk = ctx->input(4);
    OP_REQUIRES(ctx, d_hs.dims() == 3 && saved.dims() == 3 && rk.dims() == 2,
                absl::InvalidArgumentError("CharrnnLstmSequenceBackward: d_hs [T,B,U], saved [T,B,6U], rk [U,4U]"));
    const int64_t steps = d_hs.dim_size(0), batch = d_hs.dim_size(1), u = d_hs.dim_size(2);
    const tensorflow::TensorShape state({batch, u});
    OP_REQUIRES(ctx, dh_last.shape() == state && dc_last.shape() == state && saved.dim_size(0) == steps &&
                         saved.dim_size(1) == batch && saved.dim_size(2) == 6 * u && rk.dim_size(0) == u &&
                         rk.dim_size(1) == 4 * u && u % kLanes == 0,
                absl::InvalidArgumentError("CharrnnLstmSequenceBackward: mismatched shapes, or units not a multiple of the vector width"));
    Tensor *dz = nullptr, *dh0 = nullptr, *dc0 = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, tensorflow::TensorShape({steps, batch, 4 * u}), &dz));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, state, &dh0));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, state, &dc0));
    // Unit blocks of kBackwardVectors vectors (a narrower one at the end where needed), each
    // with its panel of rk^T's columns: dh_prev[:, block] = dz @ rk[block, :]^T.
    Tensor panel_t, dh_t;
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DataTypeToEnum<Tmm>::value,
                                           tensorflow::TensorShape({u * 4 * u}), &panel_t));
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_FLOAT, state, &dh_t));
    Tmm* panel = panel_t.flat<Tmm>().data();
    const int64_t wide = kBackwardVectors * kLanes;
    const int64_t blocks = (u + wide - 1) / wide;
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t j = blk * wide, vectors = std::min(wide, u - j) / kLanes;
      const int64_t cols[kBackwardVectors] = {j, j + kLanes};
      PackPanel(rk.flat<Tmm>().data(), 4 * u, true, 4 * u, cols, vectors, panel + j * 4 * u);
    }
    float* dc = dc0->flat<float>().data();  // the running dc_next; dc0 when the loop ends
    float* dh_next = dh_t.flat<float>().data();
    std::copy_n(dc_last.flat<float>().data(), batch * u, dc);
    std::copy_n(dh_last.flat<float>().data(), batch * u, dh_next);
    const float* dhs_p = d_hs.flat<float>().data();
    const float* s_p = saved.flat<float>().data();
    Tmm* dz_p = dz->flat<Tmm>().data();
    const bool amx = std::is_same<Tmm, bfloat16>::value && batch % kAmxRows == 0 && u % wide == 0 && AmxUsable();
    const int64_t row_tiles = amx ? batch / kAmxRows : RowTiles(batch, kBackwardRows);
    const int64_t tile_cost = kBackwardRows * wide * (8 * u + 20);

    // Item i's rows and unit block: dh_next[rows, block] = dz_src[rows] @ rk[block]^T (kept as it
    // is when dz_src is null), then then(r0, rows, j, width) per row tile.
    const Items items(ctx, blocks, row_tiles, /*one_tile_per_item=*/amx);
    auto recurrent_product = [&](const Tmm* dz_src, int64_t item, float* parked, auto&& then) {
      const int64_t blk = items.block(item), j = blk * wide, w = std::min(wide, u - j);
#if defined(CHARRNN_AMX)
      if constexpr (std::is_same<Tmm, bfloat16>::value && kBackwardVectors == 2) {
        if (amx) {  // 16 rows x 32 units: C tiles 0 and 1, A tile 4, B tiles 5 and 6
          const int64_t r0 = items.first_tile(item) * kAmxRows;
          if (dz_src != nullptr) {
            _tile_zero(0);
            _tile_zero(1);
            const Tmm* a = dz_src + r0 * 4 * u;
            const Tmm* panel_k = panel + j * 4 * u;
            for (int64_t k = 0; k < 4 * u; k += 32, panel_k += 16 * 2 * 32) {
              _tile_loadd(4, a + k, 4 * u * sizeof(Tmm));
              _tile_loadd(5, panel_k, 2 * 64);
              _tile_dpbf16ps(0, 4, 5);
              _tile_loadd(6, panel_k + 32, 2 * 64);
              _tile_dpbf16ps(1, 4, 6);
            }
            _tile_stored(0, dh_next + r0 * u + j, u * sizeof(float));
            _tile_stored(1, dh_next + r0 * u + j + kLanes, u * sizeof(float));
          }
          then(r0, kAmxRows, j, w);
          return;
        }
      }
#endif
      if (dz_src == nullptr) {
        for (int64_t tile = items.first_tile(item); tile < items.last_tile(item); ++tile)
          ForRowTile<kBackwardRows>(tile, batch, [&](auto rows, int64_t r0) { then(r0, decltype(rows)::value, j, w); });
        return;
      }
      auto product = [&](auto vectors) {
        constexpr int NV = decltype(vectors)::value;
        RowTileProducts<kBackwardRows, NV>(
            items.first_tile(item), items.last_tile(item), batch, dz_src, 4 * u, panel + j * 4 * u, 4 * u, parked,
            [](auto& acc, int64_t) {
              for (auto& row : acc)
                for (auto& v : row) v = Broadcast(0.0f);
            },
            [&](int64_t r0, int rows) {
              for (int64_t b = r0; b < r0 + rows; ++b)
                std::copy_n(parked + b * NV * kLanes, NV * kLanes, dh_next + b * u + j);
              then(r0, rows, j, w);
            });
      };
      if (w == wide) product(std::integral_constant<int, kBackwardVectors>{});
      else product(std::integral_constant<int, 1>{});
    };
    const int64_t item_cost = tile_cost * row_tiles / items.groups;

    for (int64_t t = steps - 1; t >= 0; --t) {
      const Tmm* dz_next = t == steps - 1 ? nullptr : dz_p + (t + 1) * batch * 4 * u;
      const float* do_t = dhs_p + t * batch * u;
      const float* s_t = s_p + t * batch * 6 * u;
      Tmm* dz_t = dz_p + t * batch * 4 * u;
      ForEachRow(ctx, items.count(), item_cost, [&](int64_t begin, int64_t end) {
        TilesIf tiles(amx);
        std::vector<float> parked(batch * wide);
        for (int64_t item = begin; item < end; ++item) {
          recurrent_product(dz_next, item, parked.data(), [&](int64_t r0, int rows, int64_t j, int64_t w) {
            using Eigen::internal::padd;
            using Eigen::internal::pmadd;
            using Eigen::internal::pmul;
            for (int64_t b = r0; b < r0 + rows; ++b)
              for (int64_t jj = j; jj < j + w; jj += kLanes) {
                const float* s = s_t + b * 6 * u + jj;
                const Packet dh = padd(Load(do_t + b * u + jj), Load(dh_next + b * u + jj));
                const Packet dcv = pmadd(dh, Load(s + 4 * u), Load(dc + b * u + jj));
                Tmm* z = dz_t + b * 4 * u + jj;
                Store(z, pmul(dcv, Load(s)));
                Store(z + u, pmul(dcv, Load(s + u)));
                Store(z + 2 * u, pmul(dcv, Load(s + 2 * u)));
                Store(z + 3 * u, pmul(dh, Load(s + 3 * u)));
                Store(dc + b * u + jj, pmul(dcv, Load(s + 5 * u)));
              }
          });
        }
      });
    }
    if (steps > 0) {  // dh0 = dz[0] @ rk^T (dh_last itself when there are no steps)
      ForEachRow(ctx, items.count(), item_cost, [&](int64_t begin, int64_t end) {
        TilesIf tiles(amx);
        std::vector<float> parked(batch * wide);
        for (int64_t item = begin; item < end; ++item)
          recurrent_product(dz_p, item, parked.data(), [](int64_t, int, int64_t, int64_t) {});
      });
    }
    std::copy_n(dh_next, batch * u, dh0->flat<float>().data());
  }
};

#define REGISTER(T)                                                                               \
  REGISTER_KERNEL_BUILDER(                                                                        \
      Name("CharrnnLstmSequenceForward").Device(tensorflow::DEVICE_CPU).TypeConstraint<T>("Tmm"),  \
      LstmSequenceForward<T>);                                                                    \
  REGISTER_KERNEL_BUILDER(                                                                        \
      Name("CharrnnLstmSequenceBackward").Device(tensorflow::DEVICE_CPU).TypeConstraint<T>("Tmm"), \
      LstmSequenceBackward<T>);
REGISTER(float)
#if defined(__AVX512BF16__)
REGISTER(bfloat16)
#endif
#undef REGISTER

// The vector instruction set this library was compiled for, read by cell_ops.py (ctypes) so that
// a run records what its kernels were built for, not what the CPU could do.
extern "C" const char* charrnn_ops_isa() {
#if defined(CHARRNN_AMX)
  return "AMX";
#elif defined(__AVX512BF16__)
  return "AVX512-BF16";
#elif defined(__AVX512F__)
  return "AVX-512";
#elif defined(__AVX2__)
  return "AVX2";
#else
  return "generic";
#endif
}
