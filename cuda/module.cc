// The extension jax_pagedattn._C: the host planner and the table of FFI handlers.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>

#include <cstring>
#include <memory>

#include "jax_pagedattn/handlers.h"
#include "jax_pagedattn/plan_layout.h"
#include "jax_pagedattn/params.h"
#include "jax_pagedattn/tile_rows.h"
#include "planner/planner.h"

#ifdef JAX_PAGEDATTN_WITH_CUDA
#include <stdexcept>

#include "jax_pagedattn/occupancy.h"
#endif

namespace nb = nanobind;
using namespace jax_pagedattn;

namespace {

using HostI32 = nb::ndarray<const int32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
// Plans are values: the buffer reaches Python as a read-only numpy array.
using PlanI32 = nb::ndarray<nb::numpy, const int32_t, nb::ndim<1>>;

template <typename Fn>
nb::capsule Capsule(Fn* fn) {
  return nb::capsule(reinterpret_cast<void*>(fn));
}

// `command_buffers`: register the CUDA handlers that declare kCmdBufferCompatible
// (handlers.h) instead of the plain ones.
nb::dict Registrations(bool command_buffers) {
  nb::dict cpu;
  cpu["jax_pagedattn_decode"] = Capsule(JaxPagedAttnDecodeCpu);
  cpu["jax_pagedattn_prefill"] = Capsule(JaxPagedAttnPrefillCpu);
  cpu["jax_pagedattn_append"] = Capsule(JaxPagedAttnAppendCpu);
  cpu["jax_pagedattn_append_kv"] = Capsule(JaxPagedAttnAppendKvCpu);
  nb::dict all;
  all["cpu"] = cpu;
#ifdef JAX_PAGEDATTN_WITH_CUDA
  nb::dict cuda;
  const bool g = command_buffers;
  cuda["jax_pagedattn_decode"] = Capsule(g ? JaxPagedAttnDecodeCudaGraph : JaxPagedAttnDecodeCuda);
  cuda["jax_pagedattn_prefill"] = Capsule(g ? JaxPagedAttnPrefillCudaGraph : JaxPagedAttnPrefillCuda);
  cuda["jax_pagedattn_append"] = Capsule(g ? JaxPagedAttnAppendCudaGraph : JaxPagedAttnAppendCuda);
  cuda["jax_pagedattn_append_kv"] =
      Capsule(g ? JaxPagedAttnAppendKvCudaGraph : JaxPagedAttnAppendKvCuda);
  all["CUDA"] = cuda;
#endif
  return all;
}

// Plans into a new array, which nothing writes again.
nb::object Plan(nb::object qo_indptr, HostI32 kv_indptr, HostI32 kv_indices,
                HostI32 kv_last_page_len, const PlanSpec& spec) {
  BatchArrays arrays{};
  HostI32 qo;
  if (!qo_indptr.is_none()) {
    qo = nb::cast<HostI32>(qo_indptr);
    arrays.qo_indptr = qo.data();
    arrays.qo_indptr_len = int64_t(qo.shape(0));
  }
  arrays.kv_indptr = kv_indptr.data();
  arrays.kv_indptr_len = int64_t(kv_indptr.shape(0));
  arrays.kv_indices = kv_indices.data();
  arrays.kv_indices_len = int64_t(kv_indices.shape(0));
  arrays.kv_last_page_len = kv_last_page_len.data();
  arrays.kv_last_page_len_len = int64_t(kv_last_page_len.shape(0));
  const size_t n = size_t(PlanLayout::Of(spec.caps).size());
  std::unique_ptr<int32_t[]> buf(new int32_t[n]);
  {
    nb::gil_scoped_release release;
    PlanBatch(arrays, spec, buf.get());
  }
  int32_t* data = buf.release();
  nb::capsule owner(data, [](void* p) noexcept { delete[] static_cast<int32_t*>(p); });
  return nb::cast(PlanI32(data, {n}, owner));
}

Capacities CapsOf(nb::handle caps) {
  return Capacities{nb::cast<int32_t>(caps.attr("batch")),  nb::cast<int32_t>(caps.attr("tokens")),
                    nb::cast<int32_t>(caps.attr("pages")),  nb::cast<int32_t>(caps.attr("work")),
                    nb::cast<int32_t>(caps.attr("partial_rows")), nb::cast<int32_t>(caps.attr("bins"))};
}

#ifdef JAX_PAGEDATTN_WITH_CUDA
// The DType of a canonical dtype name (planning.canonical_dtype); kF32 for any other.
DType DTypeNamed(const std::string& name) {
  if (name == "float16") return DType::kF16;
  if (name == "bfloat16") return DType::kBF16;
  if (name == "float8_e4m3fn") return DType::kF8E4M3;
  if (name == "float8_e5m2") return DType::kF8E5M2;
  return DType::kF32;
}
#endif

nb::dict Layout(nb::handle caps) {
  const Capacities c = CapsOf(caps);
  const PlanLayout L = PlanLayout::Of(c);
  const int32_t work_cap = c.work, bin_cap = c.bins, batch_cap = c.batch, token_cap = c.tokens,
                page_cap = c.pages;
  nb::dict d;
  d["work"] = nb::make_tuple(L.work(), int64_t(work_cap) * kWorkFields);
  d["meta"] = nb::make_tuple(L.meta(), int64_t(kMetaFields));
  d["bin_indptr"] = nb::make_tuple(L.bin_indptr(), int64_t(bin_cap) + 1);
  d["qo_indptr"] = nb::make_tuple(L.qo_indptr(), int64_t(batch_cap) + 1);
  d["kv_indptr"] = nb::make_tuple(L.kv_indptr(), int64_t(batch_cap) + 1);
  d["kv_last_page_len"] = nb::make_tuple(L.kv_last_page_len(), int64_t(batch_cap));
  d["merge_indptr"] = nb::make_tuple(L.merge_indptr(), int64_t(token_cap) + 1);
  d["kv_indices"] = nb::make_tuple(L.kv_indices(), int64_t(page_cap));
  d["size"] = L.size();
  return d;
}

}  // namespace

NB_MODULE(_C, m) {
  m.doc() = "jax_pagedattn native extension: host planner and XLA FFI handlers.";
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const PlanError& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    }
  });
  m.def("registrations", &Registrations, nb::arg("command_buffers") = false,
        "{platform: {target name: FFI handler capsule}} for every handler built; "
        "command_buffers picks the CUDA handlers that XLA may record into CUDA graphs.");
  nb::class_<PlanSpec>(m, "PlanSpec",
                       "Everything about a plan but the index arrays (planner.h); immutable.")
      .def(
          "__init__",
          [](PlanSpec* self, int32_t page_size, int32_t group_size, int32_t tile_rows, bool causal,
             nb::handle caps, int32_t deal, bool decode_names, int32_t num_pages,
             int32_t fixed_split_size, bool disable_split_kv, int32_t window_left,
             bool longest_first) {
            if (deal < int32_t(Deal::kAuto) || deal > int32_t(Deal::kEqual))
              throw nb::value_error("PlanSpec: deal must be 0 (auto), 1 (bins) or 2 (equal)");
            new (self) PlanSpec{page_size, group_size, tile_rows, causal, num_pages,
                                CapsOf(caps), Deal(deal), decode_names, fixed_split_size,
                                disable_split_kv, window_left, longest_first};
          },
          nb::kw_only(), nb::arg("page_size"), nb::arg("group_size"), nb::arg("tile_rows"),
          nb::arg("causal"), nb::arg("caps"), nb::arg("deal") = 0,
          nb::arg("decode_names") = false, nb::arg("num_pages") = -1,
          nb::arg("fixed_split_size") = -1, nb::arg("disable_split_kv") = false,
          nb::arg("window_left") = -1, nb::arg("longest_first") = false,
          "caps: any object with the fields of planning.Capacities; fixed_split_size in pages.")
      .def_ro("page_size", &PlanSpec::page_size)
      .def_ro("group_size", &PlanSpec::group_size)
      .def_ro("tile_rows", &PlanSpec::tile_rows)
      .def_ro("causal", &PlanSpec::causal)
      .def_ro("num_pages", &PlanSpec::num_pages)
      .def_ro("decode_names", &PlanSpec::decode_names)
      .def_ro("fixed_split_size", &PlanSpec::fixed_split_size)
      .def_ro("disable_split_kv", &PlanSpec::disable_split_kv)
      .def_ro("window_left", &PlanSpec::window_left)
      .def_ro("longest_first", &PlanSpec::longest_first)
      .def_prop_ro("deal", [](const PlanSpec& s) { return int32_t(s.deal); });
  m.def("plan", &Plan, nb::arg("qo_indptr").none(), nb::arg("kv_indptr"), nb::arg("kv_indices"),
        nb::arg("kv_last_page_len"), nb::arg("spec"),
        "Validates a batch and returns its plan buffer: a new read-only int32 array "
        "(docs/CONTRACT.md).");
  m.def("plan_layout", &Layout, nb::arg("caps"),
        "{section: (offset, length)} of the plan buffer of these capacities (any object with "
        "the fields of planning.Capacities), and its size.");
  m.def(
      "tile_rows",
      [](int32_t kernel, int32_t group_size, int32_t head_dim, bool hopper_prefill) {
        if (kernel < 0 || kernel > int32_t(AttentionKernel::kPrefill))
          throw nb::value_error("tile_rows: kernel must be 0 (decode), 1 (tensor-core decode) or 2 (prefill)");
        return TileRows(AttentionKernel(kernel), group_size, head_dim, hopper_prefill);
      },
      nb::arg("kernel"), nb::arg("group_size"), nb::arg("head_dim"),
      nb::arg("hopper_prefill") = false,
      "Packed query rows per work item of the kernel (tile_rows.h); hopper_prefill: the "
      "Hopper prefill kernel runs the call (hopper_prefill_covers).");
  m.def(
      "workspace_bytes",
      [](nb::handle caps, int32_t num_qo_heads, int32_t head_dim, int32_t num_kv_heads,
         int32_t page_size, int32_t pos_encoding, bool sm90_rope_keys, int32_t q_itemsize) {
        AttentionAttrs a{};
        a.caps = CapsOf(caps);
        a.num_qo_heads = num_qo_heads;
        a.head_dim = head_dim;
        a.num_kv_heads = num_kv_heads;
        a.page_size = page_size;
        a.pos_encoding = PosEncoding(pos_encoding);
        a.sm90_rope_keys = sm90_rope_keys;
        const DType q = q_itemsize == 4 ? DType::kF32 : DType::kBF16;  // only its size counts
        return WorkspaceBytes(a.caps, num_qo_heads, head_dim, num_kv_heads, RopeKeysBytes(a, q));
      },
      nb::arg("caps"), nb::arg("num_qo_heads"), nb::arg("head_dim"), nb::arg("num_kv_heads"),
      nb::arg("page_size") = 1, nb::arg("pos_encoding") = 0, nb::arg("sm90_rope_keys") = false,
      nb::arg("q_itemsize") = 2,
      "Bytes of an attention call's workspace (params.h), with the rotated keys' section "
      "where sm90_rope_keys and RoPE (pos_encoding 1) ask for it.");
  m.def("partial_row_bytes", &PartialRowBytes, nb::arg("num_qo_heads"), nb::arg("head_dim"),
        "Workspace bytes of one split-KV partial row (params.h).");
  m.def(
      "derive_capacities",
      [](int32_t batch_cap, int32_t token_cap, int32_t page_cap, int32_t group_size,
         int32_t tile_rows, int32_t num_kv_heads, int32_t num_ctas, int32_t partial_rows_limit,
         int32_t fixed_split_size, int32_t max_qo_len) {
        Capacities c = DeriveCapacities(batch_cap, token_cap, page_cap, group_size, tile_rows,
                                        num_kv_heads, num_ctas, partial_rows_limit,
                                        fixed_split_size, max_qo_len);
        return nb::make_tuple(c.batch, c.tokens, c.pages, c.work, c.partial_rows, c.bins);
      },
      nb::arg("batch_cap"), nb::arg("token_cap"), nb::arg("page_cap"), nb::arg("group_size"),
      nb::arg("tile_rows"), nb::arg("num_kv_heads"), nb::arg("num_ctas"),
      nb::arg("partial_rows_limit"), nb::arg("fixed_split_size") = -1,
      nb::arg("max_qo_len") = -1,
      "(batch, tokens, pages, work, partial_rows, bins) capacities that hold any batch within "
      "the first three, with bins for num_ctas concurrent CTAs (and, for fixed_split_size > 0 "
      "pages, its fixed pieces of requests of at most max_qo_len queries; -1: token_cap).");
#ifdef JAX_PAGEDATTN_WITH_CUDA
  m.def(
      "ctas_per_sm",
      [](bool tensor_cores, const std::string& dtype, int32_t head_dim, int32_t tile_rows,
         bool sm90_prefill) {
        const DType t = DTypeNamed(dtype);
        if (t != DType::kF16 && t != DType::kBF16)
          throw nb::value_error("ctas_per_sm: dtype must be float16 or bfloat16");
        int32_t ctas = 0;
        if (const char* err =
                AttentionCtasPerSm(tensor_cores, t, head_dim, tile_rows, sm90_prefill, &ctas))
          throw std::runtime_error(std::string("jax_pagedattn: occupancy query failed: ") + err);
        return ctas;
      },
      nb::arg("tensor_cores"), nb::arg("dtype"), nb::arg("head_dim"), nb::arg("tile_rows"),
      nb::arg("sm90_prefill"),
      "CTAs of the attention kernel for this configuration one SM of the current device "
      "holds at once (the CUDA occupancy calculator).");
  m.def(
      "hopper_prefill_covers",
      [](const std::string& dtype, const std::string& kv_dtype, int32_t head_dim) {
        return HopperPrefillCovers(DTypeNamed(dtype), DTypeNamed(kv_dtype), head_dim);
      },
      nb::arg("dtype"), nb::arg("kv_dtype"), nb::arg("head_dim"),
      "Whether this build's Hopper prefill kernel runs calls of these dtype names and "
      "head_dim on the current device (prefill_sm90.h).");
#endif
  m.attr("WORK_FIELDS") = int(kWorkFields);
  m.attr("HAS_CUDA") =
#ifdef JAX_PAGEDATTN_WITH_CUDA
      true;
#else
      false;
#endif
  // The Hopper prefill kernel (cuda/kernels/sm90/) is in this build; it runs on devices
  // of compute capability 9.0 for the settings prefill_sm90.h lists.
  m.attr("HAS_SM90_PREFILL") =
#ifdef JAX_PAGEDATTN_WITH_SM90
      true;
#else
      false;
#endif
}
