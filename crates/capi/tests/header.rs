//! `include/ivshm.h` is what cbindgen (the version pinned in the workspace) generates from the
//! crate with `cbindgen.toml`. `IVSHM_BLESS=1` writes it instead of comparing.

use std::path::Path;

#[test]
fn the_checked_in_header_is_current() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).unwrap();
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_crate(crate_dir)
        .with_config(config)
        .generate()
        .expect("cbindgen failed on crates/capi")
        .write(&mut generated);
    let path = crate_dir.join("include/ivshm.h");
    if std::env::var_os("IVSHM_BLESS").is_some() {
        std::fs::write(&path, &generated).unwrap();
        return;
    }
    let checked_in = std::fs::read(&path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "{} is not what cbindgen generates from crates/capi/src; run \
         `IVSHM_BLESS=1 cargo test -p ivshm-capi --test header` to regenerate it and commit it",
        path.display()
    );
}
