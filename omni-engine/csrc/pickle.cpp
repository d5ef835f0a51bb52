// Reading `torch.save` pickles with libtorch's own unpickler
// (torch::pickle_load), for files models ship that are not safetensors:
// Qwen2.5-Omni's `spk_dict.pt` ({name: {"cond": Tensor, "ref_mel": Tensor,
// "bos_token": int}}).
//
// The result is flattened for the C boundary: an opaque list of entries,
// each a key path ("Chelsie.cond"), and a tensor or an integer.
#include <torch/serialize.h>

#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "shim.h"

namespace {

struct Entry {
  std::string key;
  bool is_tensor;
  at::Tensor tensor;
  int64_t integer;
};

struct Entries {
  std::vector<Entry> items;
};

void flatten(const c10::IValue& v, const std::string& prefix, Entries& out, int depth) {
  TORCH_CHECK(depth < 8, "nested deeper than 8 levels at ", prefix);
  if (v.isTensor()) {
    out.items.push_back({prefix, true, v.toTensor(), 0});
  } else if (v.isInt()) {
    out.items.push_back({prefix, false, at::Tensor(), v.toInt()});
  } else if (v.isBool()) {
    out.items.push_back({prefix, false, at::Tensor(), v.toBool() ? 1 : 0});
  } else if (v.isGenericDict()) {
    for (const auto& kv : v.toGenericDict()) {
      TORCH_CHECK(kv.key().isString(), "a dict key at ", prefix.empty() ? "the top" : prefix,
                  " is not a string");
      const std::string key = kv.key().toStringRef();
      flatten(kv.value(), prefix.empty() ? key : prefix + "." + key, out, depth + 1);
    }
  }
  // Other values (strings, floats, None) carry nothing a model reads here.
}

}  // namespace

extern "C" {

// Loads the pickle at `path`. Returns an opaque handle (free with
// omni_pickle_free), or null with *err set.
void* omni_pickle_load(const char* path, char** err) {
  return omni::guarded_ptr(err, [&]() -> void* {
    std::ifstream in(path, std::ios::binary);
    TORCH_CHECK(in, "cannot open ", path);
    std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    c10::IValue value = torch::pickle_load(bytes);
    auto* entries = new Entries();
    try {
      flatten(value, "", *entries, 0);
    } catch (...) {
      delete entries;
      throw;
    }
    return entries;
  });
}

int64_t omni_pickle_len(const void* handle) {
  return static_cast<int64_t>(static_cast<const Entries*>(handle)->items.size());
}

// Entry `i`: its key (valid while the handle lives), and either a new
// tensor in *tensor or an integer in *integer (*tensor null).
const char* omni_pickle_entry(const void* handle, int64_t i, at::Tensor** tensor, int64_t* integer) {
  const Entry& e = static_cast<const Entries*>(handle)->items.at(static_cast<size_t>(i));
  *tensor = e.is_tensor ? new at::Tensor(e.tensor) : nullptr;
  *integer = e.integer;
  return e.key.c_str();
}

void omni_pickle_free(void* handle) { delete static_cast<Entries*>(handle); }

}  // extern "C"
