//! The daemon's configuration: TOML text, then environment overrides
//! (`BMSGW__SECTION__KEY=value`), typed and checked. The input is the TOML
//! text, then optionally a NUL and one override per line.
#![no_main]

use std::path::Path;

use bmsgw::service::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (toml, env) = text.split_once('\0').unwrap_or((text, ""));
    let base = Path::new("/etc/bmsgw");
    let _ = Config::from_toml_str(toml, base);
    let env: Vec<(String, String)> = env
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    if !env.is_empty() {
        let _ = Config::from_toml_str_with_env(toml, base, env);
    }
});
