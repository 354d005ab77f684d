//! `ivshmem-client`: drop-in replacement for QEMU's program of the same name (placeholder).

fn main() {
    eprintln!("ivshmem-client: not implemented yet");
    std::process::exit(1);
}
