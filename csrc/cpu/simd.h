// Vector-width dispatch shared by the CPU kernels.
#pragma once

// Functions marked DSF_MULTIVERSION are compiled for AVX-512, AVX2 and baseline x86-64 and picked at
// load time, so one build runs everywhere and still uses the widest vectors the machine has.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DSF_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define DSF_MULTIVERSION
#endif

// Hand-written AVX-512 kernels (intrinsics) are compiled with DSF_AVX512 and called only when
// cpu_has_avx512() says the machine runs them; portable loops take over elsewhere.
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#include <cstdlib>
#include <string>
#define DSF_HAVE_AVX512_KERNELS 1
#define DSF_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))

// DECONVSEG_DISABLE_AVX512=1 turns the hand-written kernels off, so tests can compare them with the
// portable paths on the same machine.
inline bool cpu_has_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                         __builtin_cpu_supports("fma") &&
                         !(std::getenv("DECONVSEG_DISABLE_AVX512") &&
                           std::string(std::getenv("DECONVSEG_DISABLE_AVX512")) == "1");
  return ok;
}
#else
inline bool cpu_has_avx512() { return false; }
#endif
