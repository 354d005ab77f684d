//! Parses arbitrary bytes as the server's TOML configuration file.
//!
//! Must never panic. An error must name the file; a line number, when given, must lie in the
//! text. An accepted file must validate, and every VM's policy must decide names.

#![no_main]

use std::path::Path;

use ivshm_server::config_file;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let path = Path::new("fuzz.toml");
    match config_file::parse(&text, path) {
        Err(error) => {
            assert_eq!(error.path, path);
            if let Some(line) = error.line {
                assert!(
                    line >= 1 && line <= text.lines().count().max(1) + 1,
                    "{error}"
                );
            }
            let _ = error.to_string();
        }
        Ok(config) => {
            if let Err(error) = config.validate() {
                panic!("a parsed file does not validate: {error}");
            }
            let named = config
                .named
                .expect("a file always configures named regions");
            for vm in &named.vms {
                let _ = vm.policy.decide("mem");
                let _ = vm.policy.pre_created();
                for region in &named.regions {
                    let _ = ivshm_server::named::guest_name_for(&vm.policy, region.name.as_str());
                }
            }
        }
    }
});
