//! Parses arbitrary bytes as a QNX `vdev shmem` block.
//!
//! Must never panic. Whatever parses must render to text that parses to the same block, must
//! build a `VmPolicy`, and that policy must decide any name without panicking.

#![no_main]

use ivshm_policy::{GuestShmStatus, VdevShmem, VmPolicy};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let Ok(block) = VdevShmem::parse(&text) else {
        return;
    };
    let rendered = block.to_string();
    assert_eq!(
        VdevShmem::parse(&rendered).as_ref(),
        Ok(&block),
        "render/parse round trip:\n{rendered}"
    );
    let policy = match VmPolicy::from_vdev(block) {
        Ok(policy) => policy,
        Err(error) => panic!("a parsed block must make a policy: {error}"),
    };
    let _ = policy.pre_created();
    // Decide a name taken from the input itself, and its factory-field form.
    let name: String = text.chars().rev().take(40).collect();
    let decision = policy.decide(&name);
    assert_eq!(
        decision.name_error.is_some(),
        decision.status == GuestShmStatus::IllegalName
    );
    let _ = policy.decide_factory_field(&data[..data.len().min(32)]);
});
