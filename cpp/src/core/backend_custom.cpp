// The custom backend: the caller's function table runs the graphs (how CI runs the C++ chain:
// a Python test serves the graphs from ONNX Runtime's Python package through ctypes).
#include <algorithm>
#include <cstring>

#include "core/backend.hpp"

namespace eclipse::core {
namespace {

eclipse_tensor to_c(const TensorView &t) {
    eclipse_tensor c{};
    c.name = t.name.c_str();
    c.dtype = t.dtype == DType::Float32 ? ECLIPSE_FLOAT32 : ECLIPSE_INT32;
    c.rank = static_cast<int32_t>(t.shape.size());
    for (size_t i = 0; i < t.shape.size() && i < ECLIPSE_MAX_RANK; ++i) c.shape[i] = t.shape[i];
    c.data = t.data;
    return c;
}

class CustomSession final : public Session {
public:
    CustomSession(const eclipse_custom_backend &table, std::string component, void *handle)
        : table_(table), component_(std::move(component)), handle_(handle) {}
    ~CustomSession() override {
        if (table_.free_session) table_.free_session(table_.user_data, handle_);
    }
    void run(SessionState *, const std::vector<TensorView> &inputs, std::vector<TensorView> &outputs) const override {
        std::vector<eclipse_tensor> in, out;
        for (const auto &t : inputs) in.push_back(to_c(t));
        for (const auto &t : outputs) out.push_back(to_c(t));
        if (table_.run(table_.user_data, handle_, in.data(), in.size(), out.data(), out.size()) != 0)
            throw Error(ECLIPSE_ERR_BACKEND, std::string(table_.name ? table_.name : "custom") + " backend failed to run " + component_);
    }
    void *handle() const { return handle_; }

private:
    eclipse_custom_backend table_;
    std::string component_;
    void *handle_;
};

class CustomBackend final : public Backend {
public:
    explicit CustomBackend(const eclipse_custom_backend &table) : table_(table), name_(table.name ? table.name : "custom") {}
    ~CustomBackend() override {
        if (table_.free_user_data) table_.free_user_data(table_.user_data);
    }
    std::string name() const override { return name_; }
    std::unique_ptr<Session> load(const Bundle &, const ComponentFiles &c) const override {
        void *handle = nullptr;
        if (table_.load(table_.user_data, c.name.c_str(), c.graph.string().c_str(), &handle) != 0)
            throw Error(ECLIPSE_ERR_BACKEND, name_ + " backend failed to load " + c.name + " from " + c.graph.string());
        return std::make_unique<CustomSession>(table_, c.name, handle);
    }
    bool has_device_loop() const override { return table_.denoise != nullptr; }
    bool denoise(const Session &unet, SessionState *, const eclipse_denoise_call &call) const override {
        const auto &session = static_cast<const CustomSession &>(unet);
        if (table_.denoise(table_.user_data, session.handle(), &call) != 0) {
            // the callback may have stopped because progress asked it to; the pipeline tells
            // the two apart by whether cancellation was requested
            return false;
        }
        return true;
    }

private:
    eclipse_custom_backend table_;
    std::string name_;
};

}  // namespace

std::shared_ptr<Backend> make_custom_backend(const eclipse_custom_backend &given) {
    eclipse_custom_backend table{};
    // the layouts a caller may have been built with: up to free_session, up to free_user_data
    // (the optional trailing functions left out), and the whole struct; nothing between two fields
    const size_t released[] = {offsetof(eclipse_custom_backend, free_user_data),
                               offsetof(eclipse_custom_backend, denoise), sizeof(table)};
    if (std::find(std::begin(released), std::end(released), given.struct_size) == std::end(released))
        throw Error(ECLIPSE_ERR_INVALID_ARGUMENT, "eclipse_custom_backend.struct_size " + std::to_string(given.struct_size) +
                                                      " is not the size of a released eclipse_custom_backend (" +
                                                      std::to_string(released[0]) + ", " + std::to_string(released[1]) +
                                                      " or " + std::to_string(released[2]) + " bytes)");
    std::memcpy(&table, &given, given.struct_size);  // fields the caller's header lacks stay NULL
    if (!table.load || !table.run)
        throw Error(ECLIPSE_ERR_INVALID_ARGUMENT, "a custom backend needs load and run functions");
    return std::make_shared<CustomBackend>(table);
}

}  // namespace eclipse::core
