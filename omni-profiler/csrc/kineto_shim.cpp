// A C ABI over libtorch's Kineto profiler and RecordFunction, for omni-profiler.
//
// Why a shim: tch exposes no profiler API, and these are C++ APIs
// (torch/csrc/autograd/profiler_kineto.h, ATen/record_function.h).
// Every entry point catches C++ exceptions and reports them as a malloc'ed
// message in `*err` (freed by omni_kineto_free_str), because an exception
// unwinding into Rust is undefined behaviour.
#include <torch/csrc/autograd/profiler_kineto.h>
#include <ATen/Context.h>
#include <ATen/record_function.h>
#include <kineto/libkineto.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <fstream>
#include <mutex>
#include <set>
#include <string>

namespace {

char* dup_message(const char* msg) {
  size_t n = std::strlen(msg);
  char* out = static_cast<char*>(std::malloc(n + 1));
  if (out != nullptr) {
    std::memcpy(out, msg, n + 1);
  }
  return out;
}

}  // namespace

extern "C" {

void omni_kineto_free_str(char* s) { std::free(s); }

// Initialises Kineto once, on the calling thread, which must be the one that
// loaded libtorch (the process's main thread): libtorch registers its Kineto
// client from its static initialisers, and Kineto runs that client's init
// only on the registering thread. Left to the first prepareProfiler (on a
// model thread), Kineto prints "ERROR: External init callback must run in
// same thread as registerClient" (a raw fprintf, libkineto_api.cpp).
//
// Also sets Kineto's log threshold (KINETO_LOG_LEVEL, read by
// libkineto_init; a value the user set is kept): 6 is above USDT (5), so
// neither the "USDT: profiler_start/stop" lines nor the
// "gpuGetDeviceCount failed" error of a machine without a GPU reach stderr
// (both go through Kineto's logger, which writes straight to std::cerr).
// KINETO_LOG_LEVEL=4 brings back Kineto's errors.
int omni_kineto_init(char** err) {
  try {
    static std::once_flag once;
    std::call_once(once, [] {
      setenv("KINETO_LOG_LEVEL", "6", /*overwrite=*/0);
      if (!libkineto::api().isProfilerRegistered()) {
        // The same test prepareProfiler makes; it will not initialise again.
        bool cpu_only = !(at::hasCUDA() || at::hasXPU() || at::hasMTIA());
        libkineto_init(cpu_only, /*logOnError=*/true);
        libkineto::api().suppressLogMessages();
      }
    });
    return 0;
  } catch (const std::exception& e) {
    *err = dup_message(e.what());
  } catch (...) {
    *err = dup_message("unknown c++ exception in kineto init");
  }
  return 1;
}

// Prepares and enables Kineto. CPU activities always; CUDA when `cuda` != 0.
// `all_threads`: record CPU ops of every thread, not only the calling one
// (ExperimentalConfig::profile_all_threads); the calling thread is recorded
// either way. Returns 0 on success.
int omni_kineto_start(int cuda, int record_shapes, int profile_memory,
                      int with_stack, int with_flops, int all_threads,
                      char** err) {
  try {
    using namespace torch::profiler::impl;
    ExperimentalConfig experimental;
    experimental.profile_all_threads = all_threads != 0;
    // FLOPs are estimated from input shapes, so with_flops needs them, as
    // torch.autograd.profiler.profile forces (record_shapes |= with_flops).
    ProfilerConfig config(ProfilerState::KINETO,
                          record_shapes != 0 || with_flops != 0,
                          profile_memory != 0, with_stack != 0,
                          with_flops != 0, /*with_modules=*/false,
                          experimental);
    std::set<ActivityType> activities{ActivityType::CPU};
    if (cuda != 0) {
      activities.insert(ActivityType::CUDA);
    }
    torch::autograd::profiler::prepareProfiler(config, activities);
    torch::autograd::profiler::enableProfiler(config, activities);
    return 0;
  } catch (const std::exception& e) {
    *err = dup_message(e.what());
  } catch (...) {
    *err = dup_message("unknown c++ exception in enableProfiler");
  }
  return 1;
}

// Disables Kineto and saves the Chrome trace to `path`. When `flops_path`
// is not null, also writes one line `<start ns>\t<flops>\t<name>` per op
// with a FLOP estimate: Kineto computes them (KinetoEvent::flops) but does
// not put them in the trace, which PyTorch leaves to its Python side.
// Returns 0 on success.
int omni_kineto_stop(const char* path, const char* flops_path, char** err) {
  try {
    auto result = torch::autograd::profiler::disableProfiler();
    if (!result) {
      *err = dup_message("disableProfiler returned no result");
      return 1;
    }
    result->save(std::string(path));
    if (flops_path != nullptr) {
      std::ofstream out(flops_path);
      for (const auto& ev : result->events()) {
        if (ev.flops() > 0) {
          out << ev.startNs() << '\t' << ev.flops() << '\t' << ev.name() << '\n';
        }
      }
      if (!out) {
        *err = dup_message("cannot write the flops side file");
        return 1;
      }
    }
    return 0;
  } catch (const std::exception& e) {
    *err = dup_message(e.what());
  } catch (...) {
    *err = dup_message("unknown c++ exception in disableProfiler/save");
  }
  return 1;
}

// Opens a USER_SCOPE range named `name` on the calling thread, as
// torch.autograd.profiler.record_function does. Returns null when no
// profiler callback is active on this thread (nothing to end then).
void* omni_rf_begin(const char* name) {
  try {
    auto* rf = new at::RecordFunction(at::RecordScope::USER_SCOPE);
    if (!rf->isActive()) {
      delete rf;
      return nullptr;
    }
    rf->before(std::string_view(name));
    return rf;
  } catch (...) {
    return nullptr;
  }
}

// Closes a range opened by omni_rf_begin, on the thread that opened it.
void omni_rf_end(void* handle) {
  if (handle == nullptr) {
    return;
  }
  try {
    delete static_cast<at::RecordFunction*>(handle);
  } catch (...) {
  }
}

}  // extern "C"
