//! Bootstrap YAML/JSON text -> parse -> translate. Neither step may panic, whatever the input;
//! errors are the expected outcome for most inputs.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(bootstrap) = weir_proxy::config::parse_bootstrap(text) else {
        return;
    };
    let _ = weir_proxy::config::translate(bootstrap, &weir_proxy::stats::Store::new());
});
