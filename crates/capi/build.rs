//! Gives `libivshm.so` its SONAME, `libivshm.so.<major>` (from the crate's version): a program
//! linked with `-livshm` records that name (`NEEDED`) and, when it runs, loads whatever
//! `libivshm.so.<major>` points to, the `libivshm.so.<major>.<minor>.<patch>` that
//! `scripts/install-capi` and the Debian package install with the symlinks `libivshm.so.<major>`
//! and `libivshm.so`. Only the cdylib gets the flag; `libivshm.a` and the rlib have no SONAME.

fn main() {
    let major = env!("CARGO_PKG_VERSION_MAJOR");
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libivshm.so.{major}");
    println!("cargo:rerun-if-changed=build.rs");
}
