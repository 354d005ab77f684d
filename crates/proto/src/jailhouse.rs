//! Jailhouse's ivshmem v2 PCI identity (recognised by guests, not implemented yet).

/// PCI vendor ID (Siemens).
pub const VENDOR_ID: u16 = 0x110a;
/// PCI device ID of ivshmem v2.
pub const IVSHMEM_V2_DEVICE_ID: u16 = 0x4106;
