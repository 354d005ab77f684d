//! Device models for Rust VMMs: an ivshmem PCI device (plain and doorbell) with an
//! in-kernel KVM fast path, the PCI building blocks it uses, and a small test VMM on KVM.

pub mod guest_shm;
pub mod ivshmem;
pub mod pci;
pub mod testvmm;
