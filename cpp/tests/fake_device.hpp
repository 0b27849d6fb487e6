// The fake device of the device-loop tests (test_device_loop.cpp, test_unclip_loop.cpp): host
// memory standing in for device memory, closures standing in for captured CUDA graphs, the
// kernels' statements run element by element. Logic only, never the CUDA API.
#pragma once

#include <cmath>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "backends/device_loop.hpp"

namespace eclipse::test {
using namespace eclipse::core;  // NOLINT

// ---- the fake device --------------------------------------------------------------------------

class FakeDevice : public DeviceStream {
public:
    std::map<DevicePtr, std::vector<uint8_t>> heap;
    DevicePtr next = 1 << 20;
    int mallocs = 0, synchronizations = 0, kernel_launches = 0, graph_launches = 0;
    std::vector<std::function<void()>> *capturing = nullptr;
    std::map<void *, std::vector<std::function<void()>>> graphs;
    std::map<void *, int> events;  // event -> kernel launches done when recorded
    std::vector<int> waited;       // kernel launches done at each wait
    int poison_from_step = -1;     // the fused step yields NaN from this step on
    std::string fail_capture;      // "begin" or "end"
    int fail_event_at = -1;        // create_event throws on this call (0-based)
    int events_created = 0;
    int next_handle = 1;

    ~FakeDevice() override { EXPECT_NOTHING_LEAKED(); }
    void EXPECT_NOTHING_LEAKED() const {
        if (!heap.empty() || !graphs.empty() || !events.empty()) std::fprintf(stderr, "  fake device: leaked allocations\n");
    }

    uint8_t *view(DevicePtr p, size_t bytes) {
        for (auto &[base, block] : heap) {
            if (base <= p && p + bytes <= base + block.size()) return block.data() + (p - base);
        }
        throw std::runtime_error("fake device: access outside any allocation");
    }
    void queue(std::function<void()> fn) {
        if (capturing) capturing->push_back(std::move(fn));
        else fn();
    }

    DevicePtr malloc(size_t bytes) override {
        const DevicePtr p = next;
        next += ((bytes + 255) / 256 + 1) * 256;
        heap[p].assign(bytes, 0xCD);  // uninitialised memory is not zero
        ++mallocs;
        return p;
    }
    void free(DevicePtr p) noexcept override {
        if (p) heap.erase(p);
    }
    void upload(DevicePtr dst, const void *src, size_t bytes) override {
        if (capturing) throw std::runtime_error("fake device: host copy while capturing");
        std::memcpy(view(dst, bytes), src, bytes);
    }
    void download(void *dst, DevicePtr src, size_t bytes) override {
        queue([=] { std::memcpy(dst, view(src, bytes), bytes); });
    }
    void copy(DevicePtr dst, DevicePtr src, size_t bytes) override {
        queue([=] { std::memmove(view(dst, bytes), view(src, bytes), bytes); });
    }
    void fill_u32(DevicePtr dst, uint32_t value, size_t count) override {
        queue([=] {
            for (size_t i = 0; i < count; ++i) std::memcpy(view(dst + 4 * i, 4), &value, 4);
        });
    }
    void synchronize() override { ++synchronizations; }
    void begin_capture() override {
        if (fail_capture == "begin") throw Error(ECLIPSE_ERR_BACKEND, "CUDA cuStreamBeginCapture failed: fake");
        capturing = new std::vector<std::function<void()>>();
    }
    void *end_capture() override {
        std::unique_ptr<std::vector<std::function<void()>>> work(capturing);
        capturing = nullptr;
        if (fail_capture == "end") throw Error(ECLIPSE_ERR_BACKEND, "CUDA cuStreamEndCapture failed: fake");
        void *handle = reinterpret_cast<void *>(static_cast<uintptr_t>(next_handle++));
        graphs[handle] = std::move(*work);
        return handle;
    }
    void launch_graph(void *graph) override {
        ++graph_launches;
        for (auto &fn : graphs.at(graph)) fn();
    }
    void destroy_graph(void *graph) noexcept override { graphs.erase(graph); }
    void *create_event() override {
        if (events_created++ == fail_event_at) throw Error(ECLIPSE_ERR_BACKEND, "CUDA cuEventCreate failed: fake");
        void *e = reinterpret_cast<void *>(static_cast<uintptr_t>(next_handle++));
        events[e] = -1;
        return e;
    }
    void record_event(void *event) override {
        queue([=] { events.at(event) = kernel_launches; });
    }
    void wait_event(void *event) override { waited.push_back(events.at(event)); }
    void destroy_event(void *event) noexcept override { events.erase(event); }

    // kernels/guided_step.cu's statement, element by element
    void guided_step(const GuidedStepArgs &a) override {
        queue([=] {
            ++kernel_launches;
            for (int64_t i = 0; i < a.n; ++i) {
                auto f = [&](DevicePtr base, int64_t k) -> float & { return *reinterpret_cast<float *>(view(base + 4 * k, 4)); };
                float eps = f(a.pred, i);
                if (a.cfg) {
                    const float c = f(a.pred, i + a.n);
                    eps = eps + a.scale * (c - eps);
                }
                const float x = f(a.latents, i);
                float x0 = (x - a.k.b * eps) / a.k.a;
                x0 = x0 < -a.k.clip ? -a.k.clip : (x0 > a.k.clip ? a.k.clip : x0);
                float prev = a.k.c_x0 * x0 + a.k.c_x * x + a.k.c_eps * eps;
                if (a.noise != 0 && a.k.std != 0.0f) prev = prev + a.k.std * f(a.noise, i);
                if (poison_from_step >= 0 && static_cast<int>(a.step) >= poison_from_step) prev = std::nanf("");
                f(a.latents, i) = prev;
                if (a.sample_out) {
                    f(a.sample_out, i) = prev;
                    if (a.cfg) f(a.sample_out, i + a.n) = prev;
                }
                if (a.bad_step && !std::isfinite(prev)) {
                    uint32_t &flag = *reinterpret_cast<uint32_t *>(view(a.bad_step, 4));
                    if (flag == 0) flag = a.step + 1;
                }
            }
        });
    }
};

}  // namespace eclipse::test
