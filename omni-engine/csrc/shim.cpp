#include "shim.h"

extern "C" void omni_shim_free_error(char* err) { free(err); }
