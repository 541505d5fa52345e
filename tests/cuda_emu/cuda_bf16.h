// Emulation stub: the types come from cuda_emu.h (included first with -include).
#pragma once
