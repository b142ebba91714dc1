#pragma once
// Python arrays (anything nanobind's ndarray takes: DLPack producers such as PyTorch, NumPy
// through the buffer protocol or DLPack) to the engine's tensor_refs, without copying. Every
// check names the tensor and says what was expected; the library's own checks follow.

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <string>

#include "engine.hpp"

namespace tpo_python {

namespace nb = nanobind;

/// Read-only inputs (a NumPy array loaded with mmap_mode="r" is fine); outputs are writable.
using input_array = nb::ndarray<nb::ro>;
using output_array = nb::ndarray<>;

/// Where an array lives: host memory (CPU, or CUDA host-pinned) or a CUDA device.
enum class place { host, cuda, other };

inline element element_of(nb::dlpack::dtype d) {
    using code = nb::dlpack::dtype_code;
    if (d.lanes != 1) return element::other;
    switch (static_cast<code>(d.code)) {
    case code::Float:
        return d.bits == 32 ? element::f32 : d.bits == 64 ? element::f64 : d.bits == 16 ? element::f16 : element::other;
    case code::Bfloat: return d.bits == 16 ? element::bf16 : element::other;
    case code::Int: return d.bits == 32 ? element::i32 : d.bits == 64 ? element::i64 : element::other;
    case code::UInt: return d.bits == 8 ? element::u8 : element::other;
    default: return element::other;
    }
}

inline std::string dtype_text(nb::dlpack::dtype d) {
    using code = nb::dlpack::dtype_code;
    std::string name;
    switch (static_cast<code>(d.code)) {
    case code::Int: name = "int"; break;
    case code::UInt: name = "uint"; break;
    case code::Float: name = "float"; break;
    case code::Bfloat: name = "bfloat"; break;
    case code::Complex: name = "complex"; break;
    case code::Bool: return d.lanes == 1 ? "bool" : "bool vector";
    default: return tpo::detail::concat("DLPack type code ", int(d.code), " of ", int(d.bits), " bits");
    }
    name += std::to_string(d.bits);
    return d.lanes == 1 ? name : tpo::detail::concat(name, " x ", int(d.lanes), " lanes");
}

template <class A>
place place_of(const A& a) {
    switch (a.device_type()) {
    case nb::device::cpu::value:
    case nb::device::cuda_host::value: return place::host;
    case nb::device::cuda::value:
    case nb::device::cuda_managed::value: return place::cuda;
    default: return place::other;
    }
}

template <class A>
std::string shape_text(const A& a) {
    std::string s = "(";
    for (std::size_t k = 0; k < a.ndim(); ++k) s += (k ? ", " : "") + std::to_string(a.shape(k));
    if (a.ndim() == 1) s += ",";
    return s + ")";
}

/// C order; axes of extent 1 may carry any stride (PyTorch gives them arbitrary ones).
template <class A>
bool c_contiguous(const A& a) {
    std::int64_t expected = 1;
    for (std::size_t k = a.ndim(); k-- > 0;) {
        if (a.shape(k) == 1) continue;
        if (a.stride(k) != expected) return false;
        expected *= static_cast<std::int64_t>(a.shape(k));
    }
    return true;
}

/// An argument from Python: an array, or (for NumPy's missing bfloat16) a pair (uint16 array,
/// "bfloat16") that python/tpo/_arrays.py makes of an ml_dtypes bfloat16 array.
template <class A>
struct typed_array {
    A array;
    bool bfloat16_bits = false;
};

template <class A>
typed_array<A> cast_array(nb::handle h, const std::string& name, const char* what) {
    typed_array<A> r;
    nb::handle source = h;
    if (nb::isinstance<nb::tuple>(h)) {
        nb::tuple t = nb::borrow<nb::tuple>(h);
        if (t.size() != 2 || !nb::isinstance<nb::str>(t[1]) || nb::cast<std::string>(t[1]) != "bfloat16")
            throw tpo::shape_error(tpo::detail::concat(name, ": a tuple, expected ", what));
        source = t[0];
        r.bfloat16_bits = true;
    }
    if (!nb::try_cast(source, r.array, false))
        throw tpo::shape_error(tpo::detail::concat(name, ": ", nb::inst_name(source).c_str(), " is not ", what,
                                                   " (a NumPy array, a PyTorch tensor or another DLPack or "
                                                   "buffer-protocol array)"));
    const nb::dlpack::dtype d = r.array.dtype();
    if (r.bfloat16_bits && !(d.code == static_cast<std::uint8_t>(nb::dlpack::dtype_code::UInt) && d.bits == 16 &&
                             d.lanes == 1))
        throw tpo::shape_error(tpo::detail::concat(name, ": bfloat16 bits given as ", dtype_text(r.array.dtype()),
                                                   ", expected uint16"));
    return r;
}

inline input_array as_input(nb::handle h, const std::string& name, bool* bfloat16_bits = nullptr) {
    typed_array<input_array> r = cast_array<input_array>(h, name, "an array the library can read in place");
    if (bfloat16_bits) *bfloat16_bits = r.bfloat16_bits;
    else if (r.bfloat16_bits) throw tpo::shape_error(tpo::detail::concat(name, ": bfloat16 is not accepted here"));
    return r.array;
}

/// `a` as a tensor_ref of rank `rank`, C-contiguous, of one of the element types `allowed`.
template <class A>
tensor_ref make_ref(const A& a, const std::string& name, int rank, std::initializer_list<element> allowed,
                    bool bfloat16_bits = false) {
    if (static_cast<int>(a.ndim()) != rank)
        throw tpo::shape_error(tpo::detail::concat(name, ": shape ", shape_text(a), " has ", a.ndim(),
                                                   " dimensions, expected ", rank));
    const element e = bfloat16_bits ? element::bf16 : element_of(a.dtype());
    bool ok = false;
    std::string expected;
    for (element x : allowed) {
        ok = ok || x == e;
        expected += (expected.empty() ? "" : " or ") + std::string(element_name(x));
    }
    if (!ok) throw tpo::shape_error(tpo::detail::concat(name, ": dtype ", dtype_text(a.dtype()), ", expected ", expected));
    if (!c_contiguous(a))
        throw tpo::shape_error(tpo::detail::concat(name, ": shape ", shape_text(a),
                                                   " is not C-contiguous; the library reads arrays in place, "
                                                   "pass a contiguous one (numpy.ascontiguousarray, "
                                                   "tensor.contiguous())"));
    if (place_of(a) == place::other)
        throw tpo::shape_error(tpo::detail::concat(name, ": on a device of DLPack type ", a.device_type(),
                                                   ", expected CPU or CUDA memory"));
    tensor_ref r;
    r.data = const_cast<void*>(static_cast<const void*>(a.data()));
    r.type = e;
    r.rank = rank;
    for (int k = 0; k < rank; ++k) r.shape[static_cast<std::size_t>(k)] = static_cast<index_t>(a.shape(static_cast<std::size_t>(k)));
    return r;
}

}  // namespace tpo_python
