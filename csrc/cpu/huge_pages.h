// Output allocation for the CPU kernels.
//
// torch's default CPU allocator hands out large buffers as fresh 4 KB pages, and the first touch of
// each page is a fault: for a (4, 64, 360, 480) float32 activation that is 43,000 faults and costs
// more than the kernel that fills it. Buffers of 2 MB and more are therefore allocated 2 MB-aligned
// and marked MADV_HUGEPAGE -- what torch itself does when THP_MEM_ALLOC_ENABLE=1 is set, applied
// here to the outputs of our ops only. Memory is returned to the system on free as usual.
#pragma once

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace deconvseg {

class HugePageAllocator final : public c10::Allocator {
 public:
  static constexpr size_t kHuge = size_t(2) << 20;

  c10::DataPtr allocate(size_t nbytes) override {
    if (nbytes < kHuge) return c10::GetCPUAllocator()->allocate(nbytes);
    void* ptr = nullptr;
    const size_t rounded = (nbytes + kHuge - 1) / kHuge * kHuge;
    TORCH_CHECK(posix_memalign(&ptr, kHuge, rounded) == 0 && ptr != nullptr, "deconvseg: out of memory allocating ",
                nbytes, " bytes");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(ptr, rounded, MADV_HUGEPAGE);  // advisory: without THP support it is a no-op
#endif
    return {ptr, ptr, &HugePageAllocator::release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &HugePageAllocator::release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }

 private:
  static void release(void* ptr) { std::free(ptr); }
};

inline c10::Allocator* huge_page_allocator() {
  static HugePageAllocator alloc;
  return &alloc;
}

// at::empty for a CPU output of our ops.
inline at::Tensor empty_output(at::IntArrayRef sizes, at::ScalarType dtype, at::MemoryFormat format) {
  return at::detail::empty_generic(sizes, huge_page_allocator(), c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                   format);
}

}  // namespace deconvseg
