//! Device models for Rust VMMs: an ivshmem PCI device (plain and doorbell) with an
//! in-kernel KVM fast path, the QNX hypervisor `guest_shm` device, the PCI building blocks
//! they use, and `vm-device` adapters. See the crate README.
//!
//! Cargo features (both default): `kvm` (the KVM fast path: [`ivshmem::kvm`] and
//! `guest_shm::KvmRegionWindows`) and `vm-device` ([`adapters`]). Without them the crate is
//! the register models alone, with no rust-vmm dependency.

#[cfg(feature = "vm-device")]
pub mod adapters;
pub mod guest_shm;
pub mod ivshmem;
pub mod pci;
pub mod sched;
