// See core.h: a stand-in so fbgemm's headers parse without asmjit.
#pragma once
#include "core.h"
