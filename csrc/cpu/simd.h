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
// cpu_has_avx512() says the machine runs them; some have AVX2 versions (DSF_AVX2, cpu_has_avx2()) for
// the many machines without AVX-512 (AMD before Zen 4, most Intel client cores); portable loops take
// over elsewhere.
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#include <cstdlib>
#include <string>
#define DSF_HAVE_AVX512_KERNELS 1
#define DSF_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define DSF_AVX2 __attribute__((target("avx2,fma")))

// Whether the environment variable `name` is "1".
inline bool env_flag(const char* name) {
  const char* v = std::getenv(name);
  return v && std::string(v) == "1";
}

// DECONVSEG_DISABLE_AVX512=1 turns the AVX-512 kernels off (the AVX2 ones, where there are any, take
// over), DECONVSEG_DISABLE_AVX2=1 the AVX2 ones: so tests can compare every path with the portable
// loops on one machine.
inline bool cpu_has_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                         __builtin_cpu_supports("fma") && !env_flag("DECONVSEG_DISABLE_AVX512");
  return ok;
}
inline bool cpu_has_avx2() {
  static const bool ok =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && !env_flag("DECONVSEG_DISABLE_AVX2");
  return ok;
}
#else
inline bool cpu_has_avx512() { return false; }
inline bool cpu_has_avx2() { return false; }
#endif
