// The extension jax_pagedattn._C: the host planner and the table of FFI handlers.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>

#include <cstring>
#include <memory>

#include "jax_pagedattn/handlers.h"
#include "jax_pagedattn/plan_layout.h"
#include "jax_pagedattn/params.h"
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
                HostI32 kv_last_page_len, int32_t page_size, int32_t group_size,
                int32_t num_kv_heads, int32_t tile_rows, bool causal, int32_t num_pages,
                int32_t batch_cap, int32_t token_cap, int32_t page_cap, int32_t work_cap,
                int32_t partial_rows_cap, int32_t bin_cap, bool decode_names) {
  PlanRequest req{};
  HostI32 qo;
  if (!qo_indptr.is_none()) {
    qo = nb::cast<HostI32>(qo_indptr);
    req.qo_indptr = qo.data();
    req.qo_indptr_len = int64_t(qo.shape(0));
  }
  req.kv_indptr = kv_indptr.data();
  req.kv_indptr_len = int64_t(kv_indptr.shape(0));
  req.kv_indices = kv_indices.data();
  req.kv_indices_len = int64_t(kv_indices.shape(0));
  req.kv_last_page_len = kv_last_page_len.data();
  req.kv_last_page_len_len = int64_t(kv_last_page_len.shape(0));
  req.page_size = page_size;
  req.group_size = group_size;
  req.num_kv_heads = num_kv_heads;
  req.tile_rows = tile_rows;
  req.causal = causal;
  req.num_pages = num_pages;
  req.caps = Capacities{batch_cap, token_cap, page_cap, work_cap, partial_rows_cap, bin_cap};
  if (decode_names) {
    req.name_kv_indptr = "indptr";
    req.name_kv_indices = "indices";
    req.name_kv_last_page_len = "last_page_len";
  }
  const PlanLayout layout{batch_cap, token_cap, page_cap, work_cap, bin_cap};
  const size_t n = size_t(layout.size());
  std::unique_ptr<int32_t[]> buf(new int32_t[n]);
  {
    nb::gil_scoped_release release;
    PlanBatch(req, buf.get());
  }
  int32_t* data = buf.release();
  nb::capsule owner(data, [](void* p) noexcept { delete[] static_cast<int32_t*>(p); });
  return nb::cast(PlanI32(data, {n}, owner));
}

nb::dict Layout(int32_t batch_cap, int32_t token_cap, int32_t page_cap, int32_t work_cap,
                int32_t bin_cap) {
  const PlanLayout L{batch_cap, token_cap, page_cap, work_cap, bin_cap};
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
  m.def("plan", &Plan, nb::arg("qo_indptr").none(), nb::arg("kv_indptr"), nb::arg("kv_indices"),
        nb::arg("kv_last_page_len"), nb::arg("page_size"), nb::arg("group_size"),
        nb::arg("num_kv_heads"), nb::arg("tile_rows"), nb::arg("causal"), nb::arg("num_pages"),
        nb::arg("batch_cap"), nb::arg("token_cap"), nb::arg("page_cap"), nb::arg("work_cap"),
        nb::arg("partial_rows_cap"), nb::arg("bin_cap"), nb::arg("decode_names"),
        "Validates a batch and returns its plan buffer: a new read-only int32 array "
        "(docs/CONTRACT.md).");
  m.def("plan_layout", &Layout, nb::arg("batch_cap"), nb::arg("token_cap"), nb::arg("page_cap"),
        nb::arg("work_cap"), nb::arg("bin_cap"),
        "{section: (offset, length)} of the plan buffer, and its size.");
  m.def(
      "derive_capacities",
      [](int32_t batch_cap, int32_t token_cap, int32_t page_cap, int32_t group_size,
         int32_t tile_rows, int32_t num_kv_heads, int32_t num_ctas, int32_t partial_rows_limit) {
        Capacities c = DeriveCapacities(batch_cap, token_cap, page_cap, group_size, tile_rows,
                                        num_kv_heads, num_ctas, partial_rows_limit);
        return nb::make_tuple(c.batch, c.tokens, c.pages, c.work, c.partial_rows, c.bins);
      },
      "(batch, tokens, pages, work, partial_rows, bins) capacities that hold any batch within "
      "the first three, with bins for num_ctas concurrent CTAs.");
#ifdef JAX_PAGEDATTN_WITH_CUDA
  m.def(
      "ctas_per_sm",
      [](bool tensor_cores, const std::string& dtype, int32_t head_dim, int32_t tile_rows) {
        DType t;
        if (dtype == "float16") t = DType::kF16;
        else if (dtype == "bfloat16") t = DType::kBF16;
        else throw nb::value_error("ctas_per_sm: dtype must be float16 or bfloat16");
        int32_t ctas = 0;
        if (const char* err = AttentionCtasPerSm(tensor_cores, t, head_dim, tile_rows, &ctas))
          throw std::runtime_error(std::string("jax_pagedattn: occupancy query failed: ") + err);
        return ctas;
      },
      nb::arg("tensor_cores"), nb::arg("dtype"), nb::arg("head_dim"), nb::arg("tile_rows"),
      "CTAs of the attention kernel for this configuration one SM of the current device "
      "holds at once (the CUDA occupancy calculator).");
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
