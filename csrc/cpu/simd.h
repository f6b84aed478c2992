// Vector-width dispatch shared by the CPU kernels.
#pragma once

// Functions marked DSF_MULTIVERSION are compiled for AVX-512, AVX2 and baseline x86-64 and picked at
// load time, so one build runs everywhere and still uses the widest vectors the machine has.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DSF_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define DSF_MULTIVERSION
#endif
