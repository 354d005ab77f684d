//! Device models for Rust VMMs: an ivshmem PCI device (plain and doorbell) with an
//! in-kernel KVM fast path, the QNX hypervisor `guest_shm` device, the PCI building blocks
//! they use, and `vm-device` adapters. See the crate README.

pub mod adapters;
pub mod guest_shm;
pub mod ivshmem;
pub mod pci;
