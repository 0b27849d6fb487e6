/* A stand-in NVIDIA driver (libcuda.so.1) for machines without one: every driver entry point
 * exists and answers CUDA_ERROR_NO_DEVICE, as a real driver does with no GPU. cuda.bindings
 * (and the CUDA runtime inside it) find their functions through cuGetProcAddress, so with this
 * library on LD_LIBRARY_PATH every call the backend makes goes through cuda.bindings' real
 * argument conversion and comes back as an error status instead of "driver not found".
 * Built by tests/test_cuda_api.py with the system C compiler; never shipped. */
#include <stddef.h>

#define CUDA_ERROR_NO_DEVICE 100

static int no_device(void) { return CUDA_ERROR_NO_DEVICE; }

int cuGetProcAddress_v2(const char *symbol, void **pfn, int version, unsigned long long flags, int *status) {
    (void)symbol; (void)version; (void)flags;
    if (pfn) *pfn = (void *)no_device;
    if (status) *status = 0; /* CU_GET_PROC_ADDRESS_SUCCESS */
    return 0;
}

int cuGetProcAddress(const char *symbol, void **pfn, int version, unsigned long long flags) {
    return cuGetProcAddress_v2(symbol, pfn, version, flags, NULL);
}

int cuInit(unsigned int flags) { (void)flags; return CUDA_ERROR_NO_DEVICE; }

int cuDriverGetVersion(int *version) {
    if (version) *version = 13000; /* a CUDA 13 driver, so cuda.bindings 13 accepts it */
    return 0;
}
