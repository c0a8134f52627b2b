#include "vmbusd.h"

uint32_t vmb_native_abi(void)
{
    return VMBUSD_NATIVE_ABI;
}
