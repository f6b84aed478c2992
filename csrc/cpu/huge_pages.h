// Output allocation for the CPU kernels.
//
// torch's default CPU allocator hands out large buffers as fresh 4 KB pages, and the first touch of
// each page is a fault in which the kernel zeroes it: for a (4, 64, 360, 480) float32 activation
// that is 43,000 faults, and they cost more than the kernel that fills the buffer. Two remedies:
//  * buffers of 2 MB and more are 2 MB-aligned and marked MADV_HUGEPAGE (what torch does when
//    THP_MEM_ALLOC_ENABLE=1 is set), so a fault maps 2 MB at once;
//  * freed buffers are kept in a small cache keyed by size and handed to the next request of the
//    same size, so a network that allocates the same activations every forward pass stops faulting
//    altogether. The cache holds at most DECONVSEG_CPU_CACHE_MB megabytes (default 1024; 0 turns it
//    off); anything past that goes back to the system at once.
// Every kernel writes all of its output, so a reused buffer never leaks old contents.
#pragma once

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <unordered_map>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace deconvseg {

class HugePageAllocator final : public c10::Allocator {
 public:
  static constexpr size_t kHuge = size_t(2) << 20;

  HugePageAllocator() {
    const char* env = std::getenv("DECONVSEG_CPU_CACHE_MB");
    const long long mb = env ? std::atoll(env) : 1024;
    capacity_ = mb > 0 ? static_cast<size_t>(mb) << 20 : 0;
  }

  c10::DataPtr allocate(size_t nbytes) override {
    if (nbytes < kHuge) return c10::GetCPUAllocator()->allocate(nbytes);
    const size_t rounded = (nbytes + kHuge - 1) / kHuge * kHuge;
    void* ptr = take_cached(rounded);
    if (ptr == nullptr) {
      TORCH_CHECK(posix_memalign(&ptr, kHuge, rounded) == 0 && ptr != nullptr, "deconvseg: out of memory allocating ",
                  nbytes, " bytes");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
      madvise(ptr, rounded, MADV_HUGEPAGE);  // advisory: without THP support it is a no-op
#endif
    }
    return {ptr, new Block{ptr, rounded}, &HugePageAllocator::release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }

  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }

  static HugePageAllocator& instance() {
    // Never destroyed: tensors may be freed during interpreter shutdown, after static destructors.
    static HugePageAllocator* alloc = new HugePageAllocator();
    return *alloc;
  }

 private:
  struct Block {
    void* ptr;
    size_t bytes;
  };

  void* take_cached(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = free_.find(bytes);
    if (it == free_.end() || it->second.empty()) return nullptr;
    void* ptr = it->second.back();
    it->second.pop_back();
    cached_ -= bytes;
    return ptr;
  }

  bool keep(void* ptr, size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (cached_ + bytes > capacity_) return false;
    free_[bytes].push_back(ptr);
    cached_ += bytes;
    return true;
  }

  static void release(void* ctx) {
    auto* block = static_cast<Block*>(ctx);
    if (!instance().keep(block->ptr, block->bytes)) std::free(block->ptr);
    delete block;
  }

  std::mutex mutex_;
  std::unordered_map<size_t, std::vector<void*>> free_;
  size_t cached_ = 0;
  size_t capacity_ = 0;
};

// at::empty for a CPU output of our ops.
inline at::Tensor empty_output(at::IntArrayRef sizes, at::ScalarType dtype, at::MemoryFormat format) {
  return at::detail::empty_generic(sizes, &HugePageAllocator::instance(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   dtype, format);
}

}  // namespace deconvseg
