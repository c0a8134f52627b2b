/* Small shared helpers. */
uint32_t vmb_native_abi(void);
