// A stand-in CUDA driver (libcuda.so.1) for machines without a GPU: Triton's own driver, compiler and launcher, and
// evonorm's native launches, run against it. Every call succeeds; a launch runs nothing and is recorded (the last
// MAX_LAUNCHES) with its configuration and the bytes of each kernel parameter, sized as the kernel declares them
// (fake_set_params, read from the compiled kernel by benchmarks/fake_cuda.py, which builds and loads this file).
#include <cuda.h>
#include <stdint.h>
#include <string.h>

#define MAX_LAUNCHES 4096
#define MAX_FUNCTIONS 1024
#define MAX_PARAMS 64
#define MAX_PARAM_BYTES 512

typedef struct {
  uint64_t function, stream;
  unsigned grid[3], block[3], shared, attributes, param_bytes;
  int known;  // the kernel's parameters were set: the bytes are all of them
  unsigned char bytes[MAX_PARAM_BYTES];
} Launch;

typedef struct {
  uint64_t function;
  unsigned count, sizes[MAX_PARAMS];
} Params;

static Launch launches[MAX_LAUNCHES];
static unsigned launch_count;
static Params params[MAX_FUNCTIONS];
static unsigned function_count;
static int context;  // the one context's handle points here
static uintptr_t next_module = 0x1000;

unsigned fake_launch_count(void) { return launch_count < MAX_LAUNCHES ? launch_count : MAX_LAUNCHES; }
const Launch *fake_launch(unsigned i) { return &launches[i]; }
void fake_reset(void) { launch_count = 0; }

void fake_set_params(uint64_t function, const unsigned *sizes, unsigned count) {
  Params *p = NULL;
  for (unsigned i = 0; i < function_count; ++i)
    if (params[i].function == function) p = &params[i];
  if (!p && function_count < MAX_FUNCTIONS) p = &params[function_count++];
  if (!p || count > MAX_PARAMS) return;
  p->function = function;
  p->count = count;
  memcpy(p->sizes, sizes, count * sizeof(unsigned));
}

static const Params *find_params(CUfunction f) {
  for (unsigned i = 0; i < function_count; ++i)
    if (params[i].function == (uint64_t)f) return &params[i];
  return NULL;
}

static CUresult record(CUfunction f, const unsigned grid[3], const unsigned block[3], unsigned shared,
                       CUstream stream, void **kernel_params, unsigned attributes) {
  Launch *l = &launches[launch_count++ % MAX_LAUNCHES];  // a ring: benchmarks launch on and on
  memset(l, 0, sizeof *l);
  l->function = (uint64_t)f;
  l->stream = (uint64_t)stream;
  memcpy(l->grid, grid, sizeof l->grid);
  memcpy(l->block, block, sizeof l->block);
  l->shared = shared;
  l->attributes = attributes;
  const Params *p = find_params(f);
  if (!p) return CUDA_SUCCESS;
  for (unsigned i = 0; i < p->count; ++i) {
    if (l->param_bytes + p->sizes[i] > MAX_PARAM_BYTES) return CUDA_ERROR_INVALID_VALUE;
    memcpy(l->bytes + l->param_bytes, kernel_params[i], p->sizes[i]);
    l->param_bytes += p->sizes[i];
  }
  l->known = 1;
  return CUDA_SUCCESS;
}

CUresult cuLaunchKernelEx(const CUlaunchConfig *c, CUfunction f, void **kernel_params, void **extra) {
  unsigned grid[3] = {c->gridDimX, c->gridDimY, c->gridDimZ}, block[3] = {c->blockDimX, c->blockDimY, c->blockDimZ};
  return record(f, grid, block, c->sharedMemBytes, c->hStream, kernel_params, c->numAttrs);
}

CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                        unsigned shared, CUstream stream, void **kernel_params, void **extra) {
  unsigned grid[3] = {gx, gy, gz}, block[3] = {bx, by, bz};
  return record(f, grid, block, shared, stream, kernel_params, 0);
}

CUresult cuFuncGetParamInfo(CUfunction f, size_t index, size_t *offset, size_t *size) {
  const Params *p = find_params(f);
  if (!p || index >= p->count) return CUDA_ERROR_INVALID_VALUE;
  size_t at = 0;
  for (size_t i = 0; i < index; ++i) at += p->sizes[i];
  *offset = at;
  *size = p->sizes[index];
  return CUDA_SUCCESS;
}

CUresult cuInit(unsigned flags) { return CUDA_SUCCESS; }
CUresult cuDriverGetVersion(int *version) { *version = 13000; return CUDA_SUCCESS; }
CUresult cuDeviceGet(CUdevice *device, int ordinal) { *device = ordinal; return CUDA_SUCCESS; }
CUresult cuDeviceGetAttribute(int *value, CUdevice_attribute attribute, CUdevice device) {
  *value = attribute == CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN ? 232448 : 1024;
  return CUDA_SUCCESS;
}
CUresult cuDevicePrimaryCtxRetain(CUcontext *c, CUdevice device) { *c = (CUcontext)&context; return CUDA_SUCCESS; }
CUresult cuCtxGetCurrent(CUcontext *c) { *c = (CUcontext)&context; return CUDA_SUCCESS; }
CUresult cuCtxSetCurrent(CUcontext c) { return CUDA_SUCCESS; }
CUresult cuCtxGetDevice(CUdevice *device) { *device = 0; return CUDA_SUCCESS; }
CUresult cuCtxGetLimit(size_t *value, CUlimit limit) { *value = 0; return CUDA_SUCCESS; }
CUresult cuCtxSetLimit(CUlimit limit, size_t value) { return CUDA_SUCCESS; }
CUresult cuModuleLoadData(CUmodule *module, const void *image) {
  *module = (CUmodule)next_module;
  next_module += 0x1000;
  return CUDA_SUCCESS;
}
CUresult cuModuleGetFunction(CUfunction *f, CUmodule module, const char *name) {
  *f = (CUfunction)((uintptr_t)module + 1);
  return CUDA_SUCCESS;
}
CUresult cuModuleUnload(CUmodule module) { return CUDA_SUCCESS; }
CUresult cuFuncGetAttribute(int *value, CUfunction_attribute attribute, CUfunction f) {
  *value = attribute == CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK ? 1024 : 0;
  return CUDA_SUCCESS;
}
CUresult cuFuncSetAttribute(CUfunction f, CUfunction_attribute attribute, int value) { return CUDA_SUCCESS; }
CUresult cuFuncSetCacheConfig(CUfunction f, CUfunc_cache config) { return CUDA_SUCCESS; }
CUresult cuOccupancyMaxActiveClusters(int *count, CUfunction f, const CUlaunchConfig *config) {
  *count = 1;
  return CUDA_SUCCESS;
}
CUresult cuPointerGetAttribute(void *data, CUpointer_attribute attribute, CUdeviceptr pointer) {
  *(CUdeviceptr *)data = pointer;  // host memory stands for device memory
  return CUDA_SUCCESS;
}
CUresult cuGetErrorString(CUresult error, const char **text) { *text = "stand-in driver error"; return CUDA_SUCCESS; }
