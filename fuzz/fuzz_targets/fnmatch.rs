//! `fnmatch` on arbitrary pattern/name pairs (the input is split at its first NUL byte).
//!
//! Must never panic or hang, must agree with the C library's `fnmatch(pattern, name, 0)`
//! (glibc, C locale), and a pattern that escapes every byte of a name matches that name.

#![no_main]

use std::ffi::CString;

use ivshm_policy::fnmatch::fnmatch_bytes;
use libfuzzer_sys::fuzz_target;

fn libc_fnmatch(pattern: &[u8], name: &[u8]) -> bool {
    let (Ok(pattern), Ok(name)) = (CString::new(pattern), CString::new(name)) else {
        return false;
    };
    // SAFETY: both pointers come from live `CString`s (valid, NUL-terminated) for the duration of
    // the call; fnmatch only reads them.
    unsafe { libc::fnmatch(pattern.as_ptr(), name.as_ptr(), 0) == 0 }
}

fuzz_target!(|data: &[u8]| {
    let (pattern, name) = match data.iter().position(|&b| b == 0) {
        Some(split) => (&data[..split], &data[split + 1..]),
        None => (data, &data[..0]),
    };
    let name = match name.iter().position(|&b| b == 0) {
        Some(end) => &name[..end],
        None => name,
    };
    let ours = fnmatch_bytes(pattern, name);

    // glibc backtracks once per star, so keep its inputs small.
    if pattern.len() <= 64 && name.len() <= 64 {
        assert_eq!(
            ours,
            libc_fnmatch(pattern, name),
            "pattern {:?} name {:?}",
            String::from_utf8_lossy(pattern),
            String::from_utf8_lossy(name)
        );
    }

    let escaped: Vec<u8> = name.iter().flat_map(|&b| [b'\\', b]).collect();
    assert!(fnmatch_bytes(&escaped, name));
    assert!(fnmatch_bytes(b"*", name));
});
