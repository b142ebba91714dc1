#pragma once
// Compiler annotations and the versioned namespace shared by every header.
//
// Headers are compiled both by nvcc and by the host compiler inside one program; the inline
// namespace keeps objects built with different TPO_HOST_DEVICE expansions from colliding (ODR).

#ifndef TPO_HOST_DEVICE
#  if defined(__CUDACC__) || defined(__HIPCC__)
#    define TPO_HOST_DEVICE __host__ __device__
#  else
#    define TPO_HOST_DEVICE
#  endif
#endif

#ifndef TPO_FORCE_INLINE
#  if defined(__CUDACC__)
#    define TPO_FORCE_INLINE __forceinline__
#  elif defined(__GNUC__)
#    define TPO_FORCE_INLINE inline __attribute__((always_inline))
#  else
#    define TPO_FORCE_INLINE inline
#  endif
#endif

#define TPO_VERSION_MAJOR 0
#define TPO_VERSION_MINOR 1
#define TPO_VERSION_PATCH 0

#define TPO_BEGIN_NAMESPACE namespace tpo { inline namespace v0 {
#define TPO_END_NAMESPACE } }
