//! `ivshm-e2e`: the QEMU end-to-end test harness.
//!
//! Tests in `crates/e2e/tests/` boot Debian's kernel with a busybox initramfs under QEMU TCG,
//! give the guest `ivshmem` devices, and drive both sides: the guest through its shell on the
//! serial console ([`QemuGuest::run`]), the host through the `ivshm` program
//! ([`IvshmServer`], [`IvshmListener`], [`HostProcess`]). See `crates/e2e/README.md`.
//!
//! Modules by concern:
//! - [`assets`]: kernel, modules, busybox and QEMU; [`require_e2e!`] skips or fails.
//! - [`binaries`]: building `ivshm` for the host and statically for guests, and the C library's
//!   `libivshm.a` for guests.
//! - [`c_chat`]: the C library's example `chat.c`, static for guests, and its checked messages.
//! - [`cpio`] and [`initramfs`]: the guest image and its `/init`.
//! - [`console`] and [`qemu`]: starting guests and the shell protocol on the serial console.
//! - [`background`]: guest commands running in the background while the test goes on.
//! - [`guest_tool`]: the `ivshm guest` tool in VFIO guests (waits, rings, hex reads/writes).
//! - [`pci`]: finding `ivshmem` devices in the guest and `devmem` access to their BARs.
//! - [`qemu_tools`]: QEMU 7.2's own `ivshmem-server` and `ivshmem-client` (reference programs);
//!   [`require_qemu_tools!`] skips or fails.
//! - [`host`]: host processes with captured output lines (from `ivshm-test-support`).
//! - [`ivshm`]: the host `ivshm` server, listener, read and write.
//! - [`scratch`]: temporary directories and `/dev/shm` files removed on drop.
//! - [`orphan`]: children are killed when the test process dies (from `ivshm-test-support`).

pub mod assets;
pub mod background;
pub mod binaries;
pub mod c_chat;
pub mod console;
pub mod cpio;
pub mod guest_tool;
pub mod initramfs;
pub mod ivshm;
pub mod libvirt;
pub mod pci;
pub mod qemu;
pub mod qemu_tools;
pub mod scratch;
pub mod workspace;

pub use ivshm_test_support::orphan;
pub use ivshm_test_support::process as host;

pub use assets::GuestAssets;
pub use background::BackgroundCommand;
pub use console::CommandOutput;
pub use host::{HostProcess, Stream};
pub use ivshm::{IvshmListener, IvshmServer, ListenEvent};
pub use pci::ShellDevice;
pub use qemu::{boot_all, GuestBuilder, Machine, PendingCommand, QemuError, QemuGuest};
pub use qemu_tools::QemuTools;
pub use scratch::{ScratchDir, ShmFile};
