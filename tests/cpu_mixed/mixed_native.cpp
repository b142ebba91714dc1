// Built with -march=native (see mixed.hpp).
#define MIXED_RUN run_native
#include "cpu_mixed/mixed_unit.inl"
