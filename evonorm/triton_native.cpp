// Native launches of the fast EvoNorms' compiled Triton kernels: a layer call's forward and backward in C++.
//
// On a GPU a fast EvoNorm call is host-bound at most sizes: the Python autograd function and one Python launch per
// kernel cost more than the kernels. Here the call is a C++ autograd function that replays, for its key (shapes,
// dtypes, alignments, options), the launches that Triton's own launch made on an earlier call of that key: the same
// compiled kernels, grid, block, shared memory and scalar arguments, with the tensors of this call. evonorm/
// triton_native.py records those launches and adds them here; a key without them returns None (the Python path).
//
// A kernel's parameters are packed as Triton's launcher packs them (pointers 8 bytes, i32 / fp32 4, i64 8), and
// what the kernel declares beyond its signature (Triton's scratch pointers) is passed null, as Triton does where no
// scratch memory is needed. add_program checks this against the kernel itself (cuFuncGetParamInfo: count and size
// of every parameter) and refuses a program that does not match, so a Triton that packs otherwise falls back to the
// Python path instead of launching with wrong arguments. The driver is opened with dlopen, as Triton does.
#include <torch/extension.h>

#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <cuda.h>
#include <dlfcn.h>

#include <cstring>
#include <deque>
#include <mutex>
#include <unordered_map>

#include "once_differentiable.h"

namespace {

using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// ------------------------------------------------------------------------------------------------ driver
struct Driver {
  decltype(&cuLaunchKernel) launch = nullptr;
  decltype(&cuCtxGetCurrent) ctx_get_current = nullptr;
  decltype(&cuCtxSetCurrent) ctx_set_current = nullptr;
  decltype(&cuDeviceGet) device_get = nullptr;
  decltype(&cuDevicePrimaryCtxRetain) primary_ctx_retain = nullptr;
  decltype(&cuFuncGetParamInfo) param_info = nullptr;  // CUDA >= 12.4; without it no program is accepted
  decltype(&cuGetErrorString) error_string = nullptr;
};
Driver driver;

template <typename F>
void resolve(void* lib, const char* name, F& slot, bool required) {
  slot = reinterpret_cast<F>(dlsym(lib, name));
  TORCH_CHECK(slot || !required, "evonorm: ", name, " is missing from the CUDA driver");
}

void open_driver(const std::string& path) {
  void* lib = dlopen(path.c_str(), RTLD_NOW | RTLD_GLOBAL);
  TORCH_CHECK(lib, "evonorm: cannot open the CUDA driver ", path, ": ", dlerror());
  resolve(lib, "cuLaunchKernel", driver.launch, true);
  resolve(lib, "cuCtxGetCurrent", driver.ctx_get_current, true);
  resolve(lib, "cuCtxSetCurrent", driver.ctx_set_current, true);
  resolve(lib, "cuDeviceGet", driver.device_get, true);
  resolve(lib, "cuDevicePrimaryCtxRetain", driver.primary_ctx_retain, true);
  resolve(lib, "cuFuncGetParamInfo", driver.param_info, false);
  resolve(lib, "cuGetErrorString", driver.error_string, true);
}

void check(CUresult status, const char* what) {
  if (status == CUDA_SUCCESS) return;
  const char* text = "unknown error";
  driver.error_string(status, &text);
  TORCH_CHECK(false, "evonorm: ", what, " failed: ", text);
}

// ------------------------------------------------------------------------------------------------ programs
// Tensors of a layer call, by the slot a launch argument names.
enum Slot { Y, X, WS, WEIGHT, BIAS, V_OR_WEIGHT, RUNNING_VAR, GRAD_X, GRAD_Y, SLOTS };
enum Kind : int8_t { POINTER, I32, I64, F32, NULL_POINTER };

struct Arg {
  Kind kind;
  int8_t slot;
  int64_t value;  // I32, I64
  float real;     // F32
};

struct Launch {
  CUfunction function;
  unsigned grid, block, shared;
  std::vector<Arg> args;
};

struct Program {
  int64_t workspace;  // floats
  std::vector<Launch> forward, backward;  // backward: empty until recorded, then set once (under the mutex)
};

size_t arg_size(Kind kind) { return kind == I32 || kind == F32 ? 4 : 8; }

// What a call is specialised on: everything Triton specialises the recorded launches on, or finer.
struct Key {
  std::vector<int64_t> fields;
  bool operator==(const Key& other) const { return fields == other.fields; }
};
struct KeyHash {
  size_t operator()(const Key& key) const {
    size_t h = 1469598103934665603ull;
    for (int64_t f : key.fields) h = (h ^ static_cast<size_t>(f)) * 1099511628211ull;
    return h;
  }
};

int64_t bits(double value) {
  int64_t out;
  std::memcpy(&out, &value, sizeof out);
  return out;
}

void add_tensor(std::vector<int64_t>& fields, const Tensor& t) {
  if (!t.defined()) {
    fields.push_back(-1);
    return;
  }
  fields.push_back(static_cast<int64_t>(t.scalar_type()));
  fields.push_back(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0);
}

// kind: 0 B-series (option = variant), 1 S-series (option = groups); flag: training (B) or centered (S). x as the
// kernels get it: x.contiguous(), a fresh (aligned) tensor where x is not contiguous.
Key make_key(int64_t kind, const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& v,
             const Tensor& running_var, int64_t option, double eps, double momentum, bool flag) {
  Key key;
  auto& f = key.fields;
  f.reserve(28);
  f.push_back(kind);
  f.push_back(static_cast<int64_t>(x.device().type()));
  f.push_back(x.device().index());
  f.push_back(x.dim());
  for (int64_t size : x.sizes()) f.push_back(size);
  f.push_back(static_cast<int64_t>(x.scalar_type()));
  f.push_back(!x.is_contiguous() || reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0);
  for (const Tensor* t : {&weight, &bias, &v, &running_var}) add_tensor(f, *t);
  f.push_back(option);
  f.push_back(bits(eps));
  f.push_back(bits(momentum));
  f.push_back(flag);
  return key;
}

std::mutex registry_mutex;
std::unordered_map<Key, Program*, KeyHash> registry;
std::deque<Program> programs;  // never erased: nodes of a graph may point at them

Program* find(const Key& key) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  auto it = registry.find(key);
  return it == registry.end() ? nullptr : it->second;
}

// ------------------------------------------------------------------------------------------------ launching
CUstream current_stream(const Tensor& x) {
  if (!x.is_cuda()) return nullptr;  // CPU tensors: tests with a stand-in driver
  c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
  return static_cast<CUstream>(impl.getStream(x.device()).native_handle());
}

void ensure_context(const Tensor& x) {
  CUcontext context = nullptr;
  check(driver.ctx_get_current(&context), "cuCtxGetCurrent");
  if (context) return;
  CUdevice device;  // as Triton's launcher: the device's primary context
  check(driver.device_get(&device, x.is_cuda() ? x.get_device() : 0), "cuDeviceGet");
  check(driver.primary_ctx_retain(&context, device), "cuDevicePrimaryCtxRetain");
  check(driver.ctx_set_current(context), "cuCtxSetCurrent");
}

void run(const std::vector<Launch>& launches, const Tensor* slots[SLOTS], const Tensor& x) {
  c10::OptionalDeviceGuard guard;
  if (x.is_cuda()) guard.reset_device(x.device());
  ensure_context(x);
  CUstream stream = current_stream(x);
  for (const Launch& launch : launches) {
    if (launch.grid == 0) continue;  // as Triton's launcher: an empty grid launches nothing
    union Value {
      void* pointer;
      int32_t i32;
      int64_t i64;
      float f32;
    };
    Value values[32];
    void* params[32];
    size_t n = launch.args.size();
    for (size_t i = 0; i < n; ++i) {
      const Arg& arg = launch.args[i];
      switch (arg.kind) {
        case POINTER: values[i].pointer = slots[arg.slot]->data_ptr(); break;
        case I32: values[i].i32 = static_cast<int32_t>(arg.value); break;
        case I64: values[i].i64 = arg.value; break;
        case F32: values[i].f32 = arg.real; break;
        case NULL_POINTER: values[i].pointer = nullptr; break;
      }
      params[i] = &values[i];
    }
    check(driver.launch(launch.function, launch.grid, 1, 1, launch.block, 1, 1, launch.shared, stream, params,
                        nullptr),
          "cuLaunchKernel");
  }
}

// ------------------------------------------------------------------------------------------------ autograd
Tensor as_dtype(const Tensor& t, c10::ScalarType dtype) { return t.scalar_type() == dtype ? t : t.to(dtype); }

// The head of the workspace, as the backward kernels wrote it: grad weight | grad bias | grad v (C floats each).
variable_list parameter_grads(const Tensor& ws, int64_t c) {
  return ws.split_with_sizes({c, c, c, ws.numel() - 3 * c});
}

struct LayerFn : public torch::autograd::Function<LayerFn> {
  // x as given (saved as it is, made contiguous again in backward, as the Python path does); v None for B1, B2,
  // S1, S2, running_var None for the S-series
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const Tensor& bias,
                        const std::optional<Tensor>& v_in, const std::optional<Tensor>& running_var_in,
                        Program* program) {
    Tensor v = v_in.value_or(Tensor()), running_var = running_var_in.value_or(Tensor());
    Tensor xc = x.contiguous();
    Tensor y = torch::empty_like(xc);
    Tensor ws = torch::empty({program->workspace}, xc.options().dtype(torch::kFloat32));
    const Tensor& v_or_weight = v.defined() ? v : weight;
    const Tensor* slots[SLOTS] = {&y, &xc, &ws, &weight, &bias, &v_or_weight, &running_var, nullptr, nullptr};
    run(program->forward, slots, xc);
    ctx->save_for_backward({x, weight, v, ws});
    ctx->saved_data["program"] = reinterpret_cast<int64_t>(program);
    ctx->saved_data["bias_dtype"] = static_cast<int64_t>(bias.scalar_type());
    ctx->saved_data["workspace_used"] = false;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return evonorm::once_differentiable(grads, [&] { return launch_backward(ctx, grads); });
  }

  static variable_list launch_backward(AutogradContext* ctx, const variable_list& grads) {
    auto saved = ctx->get_saved_variables();
    const Tensor &weight = saved[1], &v = saved[2];
    Tensor x = saved[0].contiguous(), ws = saved[3];
    auto* program = reinterpret_cast<Program*>(ctx->saved_data["program"].toInt());
    if (ctx->saved_data["workspace_used"].toBool()) {
      ws = ws.clone();  // retain_graph: the first backward's parameter gradients are views of the workspace
    }
    ctx->saved_data["workspace_used"] = true;
    Tensor grad_y = grads[0].contiguous();
    if (reinterpret_cast<uintptr_t>(grad_y.data_ptr()) % 16 != 0) {
      grad_y = grad_y.clone();  // programs are recorded with an aligned gradient
    }
    Tensor grad_x = torch::empty_like(x);
    const Tensor& v_or_weight = v.defined() ? v : weight;
    const Tensor* slots[SLOTS] = {nullptr, &x, &ws, &weight, nullptr, &v_or_weight, nullptr, &grad_x, &grad_y};
    run(program->backward, slots, x);
    auto params = parameter_grads(ws, x.size(1));
    auto bias_dtype = static_cast<c10::ScalarType>(ctx->saved_data["bias_dtype"].toInt());
    return {grad_x, as_dtype(params[0], weight.scalar_type()), as_dtype(params[1], bias_dtype),
            v.defined() ? as_dtype(params[2], v.scalar_type()) : Tensor(), Tensor(), Tensor()};
  }
};

bool needs_grad(std::initializer_list<const Tensor*> tensors) {
  if (!torch::GradMode::is_enabled()) return false;
  for (const Tensor* t : tensors) {
    if (t->defined() && t->requires_grad()) return true;
  }
  return false;
}

// torch.func transforms and forward-mode AD take no C++ autograd function, and would fail it after its launches:
// such calls take the Python path, which rejects them with its own error, and native launches stay on.
bool python_only(std::initializer_list<const Tensor*> tensors) {
  if (c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode)) return true;
  for (const Tensor* t : tensors) {
    if (t->defined() && t->_fw_grad(/*level=*/0).defined()) return true;
  }
  return false;
}

// None: no program for this key (or none for its backward where a gradient is needed): the caller takes the
// Python path, which records one.
std::optional<Tensor> call(int64_t kind, const Tensor& x, const Tensor& weight, const Tensor& bias,
                           const std::optional<Tensor>& v_in, const std::optional<Tensor>& running_var_in,
                           int64_t option, double eps, double momentum, bool flag) {
  if (!driver.launch) return std::nullopt;
  Tensor v = v_in.value_or(Tensor()), running_var = running_var_in.value_or(Tensor());
  if (python_only({&x, &weight, &bias, &v})) return std::nullopt;
  Program* program = find(make_key(kind, x, weight, bias, v, running_var, option, eps, momentum, flag));
  if (!program) return std::nullopt;
  if (needs_grad({&x, &weight, &bias, &v})) {
    std::lock_guard<std::mutex> lock(registry_mutex);
    if (program->backward.empty()) return std::nullopt;
  }
  return LayerFn::apply(x, weight, bias, v_in, running_var_in, program);
}

// ------------------------------------------------------------------------------------------------ Python API
// A recorded launch from Python: (function handle, grid, block, shared bytes, [(kind, slot or value), ...], the
// compiled kernel).
std::vector<Launch> parse(const py::list& recorded) {
  std::vector<Launch> out;
  for (const auto& item : recorded) {
    auto launch = item.cast<py::tuple>();
    Launch l{reinterpret_cast<CUfunction>(launch[0].cast<uintptr_t>()), launch[1].cast<unsigned>(),
             launch[2].cast<unsigned>(), launch[3].cast<unsigned>(), {}};
    for (const auto& a : launch[4].cast<py::list>()) {
      auto arg = a.cast<py::tuple>();
      auto kind = static_cast<Kind>(arg[0].cast<int>());
      Arg parsed{kind, 0, 0, 0.0f};
      if (kind == POINTER) parsed.slot = static_cast<int8_t>(arg[1].cast<int>());
      if (kind == I32 || kind == I64) parsed.value = arg[1].cast<int64_t>();
      if (kind == F32) parsed.real = static_cast<float>(arg[1].cast<double>());
      l.args.push_back(parsed);
    }
    out.push_back(std::move(l));
  }
  return out;
}

// Keep a registered program's compiled kernels alive for good: deleting one unloads its function.
void pin(const py::list& recorded) {
  for (const auto& item : recorded) item.cast<py::tuple>()[5].cast<py::object>().release();  // a reference kept
}

// The kernel's own parameters must be the recorded ones, then only 8-byte ones (Triton's scratch pointers), which
// are passed null. Returns "" when they are, else why not.
std::string complete(std::vector<Launch>& launches) {
  if (!driver.param_info) return "the CUDA driver has no cuFuncGetParamInfo (CUDA < 12.4)";
  for (Launch& launch : launches) {
    size_t declared = 0, offset = 0, size = 0;
    while (driver.param_info(launch.function, declared, &offset, &size) == CUDA_SUCCESS) {
      if (declared < launch.args.size()) {
        if (size != arg_size(launch.args[declared].kind)) {
          return "parameter " + std::to_string(declared) + " of a kernel takes " + std::to_string(size) +
                 " bytes, the recorded argument " + std::to_string(arg_size(launch.args[declared].kind));
        }
      } else if (size == 8) {
        launch.args.push_back({NULL_POINTER, 0, 0, 0.0f});
      } else {
        return "a kernel declares a parameter of " + std::to_string(size) + " bytes beyond its signature";
      }
      ++declared;
    }
    if (declared < launch.args.size() || launch.args.size() > 32) {
      return "a kernel declares " + std::to_string(declared) + " parameters, " +
             std::to_string(launch.args.size()) + " were recorded";
    }
  }
  return "";
}

// (why not or "", the key): the key's forward launches, recorded by the Python path with these arguments
py::tuple add_forward(int64_t kind, const Tensor& x, const Tensor& weight, const Tensor& bias,
                      const std::optional<Tensor>& v, const std::optional<Tensor>& running_var, int64_t option,
                      double eps, double momentum, bool flag, int64_t workspace, const py::list& recorded) {
  Key key = make_key(kind, x, weight, bias, v.value_or(Tensor()), running_var.value_or(Tensor()), option, eps,
                     momentum, flag);
  auto launches = parse(recorded);
  std::string why = complete(launches);
  if (why.empty()) {
    std::lock_guard<std::mutex> lock(registry_mutex);
    if (!registry.count(key)) {
      programs.push_back(Program{workspace, std::move(launches), {}});
      registry[key] = &programs.back();
      pin(recorded);
    }
  }
  return py::make_tuple(why, key.fields);
}

// why not or "": the backward launches of the key that add_forward returned
std::string add_backward(const std::vector<int64_t>& fields, const py::list& recorded) {
  auto launches = parse(recorded);
  std::string why = complete(launches);
  if (!why.empty()) return why;
  std::lock_guard<std::mutex> lock(registry_mutex);
  auto it = registry.find(Key{fields});
  if (it == registry.end()) return "no forward program for this key";
  if (it->second->backward.empty()) {
    it->second->backward = std::move(launches);
    pin(recorded);
  }
  return "";
}

int64_t program_count() {
  std::lock_guard<std::mutex> lock(registry_mutex);
  return static_cast<int64_t>(registry.size());
}

// Forget every key (the programs stay: graphs may hold them): for new launch plans
void clear() {
  std::lock_guard<std::mutex> lock(registry_mutex);
  registry.clear();
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("open_driver", &open_driver, "dlopen the CUDA driver at this path");
  m.def("call", &call, "a layer call through its recorded program, or None");
  m.def("add_forward", &add_forward, "add a key's forward launches; '' or why they were refused");
  m.def("add_backward", &add_backward, "add a key's backward launches; '' or why they were refused");
  m.def("program_count", &program_count);
  m.def("clear", &clear);
  m.attr("POINTER") = static_cast<int>(POINTER);
  m.attr("I32") = static_cast<int>(I32);
  m.attr("I64") = static_cast<int>(I64);
  m.attr("F32") = static_cast<int>(F32);
  m.attr("SLOTS") = py::make_tuple("y", "x", "ws", "weight", "bias", "v_or_weight", "running_var", "grad_x",
                                   "grad_y");
}
