// Compiler attributes shared by the CPU kernels.
#pragma once

// The 64-byte vector helpers are always inlined into one ISA's clone, so their ABI never matters.
#pragma GCC diagnostic ignored "-Wpsabi"

// Each dtype's work loop is compiled for AVX-512, AVX2+FMA and the x86-64 baseline, and the dynamic
// loader picks the widest the CPU has: no -march=native, which would make a cached build crash on an
// older CPU sharing the home directory.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define BLIP2_FAST_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define BLIP2_FAST_CLONES
#endif
#if defined(__GNUC__)
#define BLIP2_FAST_INLINE inline __attribute__((always_inline))  // into each clone, compiled for its ISA
#else
#define BLIP2_FAST_INLINE inline
#endif
