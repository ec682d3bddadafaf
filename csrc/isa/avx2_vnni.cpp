// The AVX2 table with AVX-VNNI (VPDPBUSD on ymm) for the int8/int4 dot products: avx2.cpp compiled once more
// with -mavxvnni (CMakeLists.txt). Used where the CPU has avx_vnni (Alder Lake and later, Sapphire Rapids, Zen 5).
#define LLAVA_FAST_AVX2_VNNI 1
#include "avx2.cpp"
