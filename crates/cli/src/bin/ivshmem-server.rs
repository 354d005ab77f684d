//! `ivshmem-server`: drop-in replacement for QEMU's program of the same name (placeholder).

fn main() {
    eprintln!("ivshmem-server: not implemented yet");
    std::process::exit(1);
}
