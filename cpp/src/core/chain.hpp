// What every family's chain (core/pipeline.cpp: Kandinsky 2.2, core/chain_karlo.cpp: Karlo)
// uses to run its graphs: feeds, outputs, one component call, timings and errors.
#pragma once

#include <chrono>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "core/pipeline.hpp"

namespace eclipse::core::chain {

struct Feed {
    const void *data;
    size_t count;  // elements the pipeline holds: the spec's shape must agree, or the graph would read past them
    DType dtype;
};
// by output name; an int32 output is stored in a float buffer of the same count (read it with int32_output)
using Outputs = std::map<std::string, std::vector<float>>;

double seconds_since(std::chrono::steady_clock::time_point t0);
[[noreturn]] void bad_request(const std::string &message);
[[noreturn]] void bad_io(const std::string &component, const std::string &why);
std::string format_number(double v);
const std::vector<float> &output(const Outputs &out, const std::string &component, const std::string &name);
Outputs run_component(State &state, const std::string &name, const std::map<std::string, Feed> &feed,
                      const std::map<std::string, int64_t> &dims);
void stage_done(State &state, const std::string &name, Result &result);
Feed f32(const std::vector<float> &v);

inline std::vector<int32_t> int32_output(const Outputs &out, const std::string &component, const std::string &name) {
    const std::vector<float> &raw = output(out, component, name);
    std::vector<int32_t> v(raw.size());
    std::memcpy(v.data(), raw.data(), raw.size() * sizeof(int32_t));
    return v;
}

}  // namespace eclipse::core::chain
