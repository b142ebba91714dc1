// Built with the compiler's default instruction set (see mixed.hpp).
#define MIXED_RUN run_default
#include "cpu_mixed/mixed_unit.inl"
