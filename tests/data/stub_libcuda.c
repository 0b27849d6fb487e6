/* A stand-in NVIDIA driver (libcuda.so.1) for machines without one: every driver entry point
 * exists and answers CUDA_ERROR_NO_DEVICE, as a real driver does with no GPU. cuda.bindings
 * (and the CUDA runtime inside it) find their functions through cuGetProcAddress, so with this
 * library on LD_LIBRARY_PATH every call the backend makes goes through cuda.bindings' real
 * argument conversion and comes back as an error status instead of "driver not found".
 *
 * Built with -DSTUB_CONTEXTS, the context calls work instead (a per-thread context stack, as the
 * driver keeps: cuCtxPushCurrent / cuCtxPopCurrent / cuCtxGetCurrent / cuCtxSetCurrent), so a
 * check can see which context the library leaves current on the caller's thread.
 * Built by tests/test_cuda_api.py with the system C compiler; never shipped. */
#include <stddef.h>
#include <string.h>

#define CUDA_ERROR_NO_DEVICE 100

static int no_device(void) { return CUDA_ERROR_NO_DEVICE; }

#ifdef STUB_CONTEXTS
#define CUDA_ERROR_INVALID_CONTEXT 201
static __thread void *stack[64];
static __thread int depth = 0; /* stack[depth - 1] is current; depth 0: none */

int cuCtxPushCurrent(void *ctx) {
    if (depth == 64) return CUDA_ERROR_INVALID_CONTEXT;
    stack[depth++] = ctx;
    return 0;
}
int cuCtxPopCurrent(void **ctx) {
    if (depth == 0) return CUDA_ERROR_INVALID_CONTEXT;
    void *top = stack[--depth];
    if (ctx) *ctx = top;
    return 0;
}
int cuCtxGetCurrent(void **ctx) {
    if (ctx) *ctx = depth ? stack[depth - 1] : NULL;
    return 0;
}
int cuCtxSetCurrent(void *ctx) { /* replaces the top, as the driver does (pushes on an empty stack) */
    if (depth == 0) depth = 1;
    stack[depth - 1] = ctx;
    return 0;
}
#endif

int cuGetProcAddress_v2(const char *symbol, void **pfn, int version, unsigned long long flags, int *status) {
    (void)version; (void)flags;
    if (pfn) *pfn = (void *)no_device;
#ifdef STUB_CONTEXTS
    if (pfn && symbol) {
        if (strcmp(symbol, "cuCtxPushCurrent") == 0) *pfn = (void *)cuCtxPushCurrent;
        if (strcmp(symbol, "cuCtxPopCurrent") == 0) *pfn = (void *)cuCtxPopCurrent;
        if (strcmp(symbol, "cuCtxGetCurrent") == 0) *pfn = (void *)cuCtxGetCurrent;
        if (strcmp(symbol, "cuCtxSetCurrent") == 0) *pfn = (void *)cuCtxSetCurrent;
    }
#else
    (void)symbol;
#endif
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
