//! Copies and zeroing that stay inline. The BPF backend turns zeroing runs and copies between
//! possibly overlapping objects (two map values) into calls to `memset` / `memmove`, which here are
//! byte-at-a-time loops: tens of nanoseconds on a path that costs a few. Volatile accesses keep each
//! store a single instruction.

use lb_common::service::Addr;

/// Zeroes `*value` with 4-byte stores (`T` is a `#[repr(C)]` map type, size a multiple of 4).
#[inline(always)]
pub fn zero<T>(value: &mut T) {
    let words = value as *mut T as *mut u32;
    for i in 0..core::mem::size_of::<T>() / 4 {
        // SAFETY: inside `*value`, which is 4-byte aligned (it holds u32 fields).
        unsafe { core::ptr::write_volatile(words.add(i), 0) };
    }
}

/// `*dst = *src` for addresses that may both live in map memory.
#[inline(always)]
pub fn copy_addr(dst: &mut Addr, src: &Addr) {
    for i in 0..4 {
        // SAFETY: reading a valid reference.
        dst.0[i] = unsafe { core::ptr::read_volatile(&src.0[i]) };
    }
}
